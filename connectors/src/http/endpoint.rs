//! The endpoints of HTTP sources: each `{name}` with its ingest log, decoder, dedup window and
//! the pipelines subscribed to it ([`Endpoint`]), shared by the request handler and the
//! sources ([`Endpoints`]).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use sluice_engine::Result;
use sluice_engine::budget::Budget;
use sluice_engine::decode::RecordDecoder;
use sluice_engine::ingest::wal::IngestLog;
use sluice_engine::source::{Health, Message};
use tokio::sync::{mpsc, watch};

use super::dedup::DedupWindow;

/// A pipeline reading an endpoint.
#[derive(Clone)]
pub(super) struct Subscriber {
    pub(super) tx: mpsc::Sender<Message>,
    pub(super) health: Health,
    pub(super) budget: Arc<Budget>,
    pub(super) delivery: Arc<std::sync::Mutex<Delivery>>,
    pub(super) wake: Arc<tokio::sync::Notify>,
}

/// Where a pipeline's delivery from the log stands. Live: the log writer hands it each record
/// (`next` is the sequence it expects). Behind (`when_full` = `spill` and its budget was full):
/// records are only in the log; its catch-up reader re-reads them from `next` as budget frees,
/// then goes live again. Either way every record reaches the pipeline once, in log order.
#[derive(Debug)]
pub(super) struct Delivery {
    pub(super) next: u64,
    pub(super) behind: bool,
}

/// One ingest endpoint: its log and the pipelines it feeds.
pub struct Endpoint {
    /// The source table's name.
    pub source: String,
    /// Decodes bodies into the source's schema.
    pub decoder: RecordDecoder,
    /// Largest body accepted.
    pub max_body_bytes: u64,
    /// The source's ingest log.
    pub wal: Arc<IngestLog>,
    /// How many pipelines read this source; intake opens when all have subscribed.
    pub expected: usize,
    pub(super) subscribers: BTreeMap<String, Subscriber>,
    pub(super) committed: BTreeMap<String, u64>,
    /// Request ids in the log (`Some(seq)`) or being written (`None`).
    pub(super) seen: DedupWindow,
}

impl Endpoint {
    /// A new endpoint with no pipeline yet; the request ids already logged are loaded.
    pub fn new(source: String, decoder: RecordDecoder, max_body_bytes: u64, wal: Arc<IngestLog>) -> Result<Self> {
        let mut e = Endpoint {
            source,
            decoder,
            max_body_bytes,
            wal,
            expected: 0,
            subscribers: BTreeMap::new(),
            committed: BTreeMap::new(),
            seen: DedupWindow::default(),
        };
        let wal = e.wal.clone();
        // Ids of requests whose segments were deleted, then those still in the log.
        e.seen.load(wal.dir())?;
        wal.read_from(0, |seq, payload| {
            let split = payload.iter().position(|b| *b == b'\n').unwrap_or(payload.len());
            e.remember(&String::from_utf8_lossy(&payload[..split]), Some(seq));
            Ok(())
        })?;
        Ok(e)
    }

    pub(super) fn remember(&mut self, id: &str, seq: Option<u64>) {
        self.seen.remember(id, seq);
        metrics::gauge!("sluice_http_dedup_window_bytes", "source" => self.source.clone())
            .set(self.seen.bytes() as f64);
    }

    pub(super) fn forget(&mut self, id: &str) {
        self.seen.forget(id);
    }
}

/// Every HTTP endpoint of the server, by `{name}`.
#[derive(Default)]
pub struct Endpoints {
    pub(super) by_name: RwLock<BTreeMap<String, Endpoint>>,
    pub(super) next_request: AtomicU64,
    /// Turns true at shutdown (held requests give up waiting for budget).
    pub(super) stop: RwLock<Option<watch::Receiver<bool>>>,
}

impl Endpoints {
    /// Declares an endpoint (the first call creates it) and counts one more reading pipeline.
    pub fn declare(&self, name: &str, make: impl FnOnce() -> Result<Endpoint>) -> Result<()> {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(name) {
            map.insert(name.to_string(), make()?);
        }
        if let Some(e) = map.get_mut(name) {
            e.expected += 1;
        }
        Ok(())
    }

    /// The largest body any endpoint accepts.
    pub fn max_body_bytes(&self) -> u64 {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.values().map(|e| e.max_body_bytes).max().unwrap_or(0)
    }

    pub(super) fn with<T>(&self, name: &str, f: impl FnOnce(&mut Endpoint) -> T) -> Option<T> {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        map.get_mut(name).map(f)
    }
}
