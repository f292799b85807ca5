//! The endpoints of HTTP sources: each `{name}` with its ingest log, decoder, dedup window and
//! the pipelines subscribed to it ([`Endpoint`]), shared by the request handler and the
//! sources ([`Endpoints`]).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use sluice_engine::Result;
use sluice_engine::budget::{Budget, ServerBudget};
use sluice_engine::decode::RecordDecoder;
use sluice_engine::ingest::wal::IngestLog;
use sluice_engine::connector::auth::{TokenHash, token_matches};
use sluice_engine::connector::source::{Health, Message};
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
    /// The source's own token (`auth.token`), hashed.
    pub token: Option<TokenHash>,
    /// The source's ingest log.
    pub wal: Arc<IngestLog>,
    /// How many pipelines read this source; intake opens when all have subscribed.
    pub expected: usize,
    pub(super) subscribers: BTreeMap<String, Subscriber>,
    pub(super) committed: BTreeMap<String, u64>,
    /// Request ids in the log (`Some(seq)`) or being written (`None`).
    pub(super) seen: DedupWindow,
    /// The server budget the window's bytes are counted against (from the first subscriber),
    /// and how many are counted now.
    server_budget: Option<Arc<ServerBudget>>,
    charged: u64,
}

impl Endpoint {
    /// A new endpoint with no pipeline yet; the request ids already logged are loaded.
    pub fn new(source: String, decoder: RecordDecoder, max_body_bytes: u64, wal: Arc<IngestLog>) -> Result<Self> {
        let mut e = Endpoint {
            source,
            decoder,
            max_body_bytes,
            token: None,
            wal,
            expected: 0,
            subscribers: BTreeMap::new(),
            committed: BTreeMap::new(),
            seen: DedupWindow::default(),
            server_budget: None,
            charged: 0,
        };
        let wal = e.wal.clone();
        // Ids of requests whose segments were deleted, then those still in the log.
        e.seen.load(wal.dir())?;
        wal.read_from(0, |seq, payload| {
            let record = super::body::parse_log_record(payload);
            e.remember(
                &super::dedup::dedup_key(record.principal.as_deref(), &record.request_id),
                Some(seq),
            );
            Ok(())
        })?;
        Ok(e)
    }

    pub(super) fn remember(&mut self, id: &str, seq: Option<u64>) {
        self.seen.remember(id, seq);
        self.charge();
    }

    pub(super) fn forget(&mut self, id: &str) {
        self.seen.forget(id);
        self.charge();
    }

    /// Adds a reading pipeline; the window's bytes are counted against the server budget from
    /// the first one on.
    pub(super) fn subscribe(&mut self, pipeline: String, sub: Subscriber) {
        if self.server_budget.is_none() {
            self.server_budget = Some(sub.budget.server().clone());
            self.charge();
        }
        self.subscribers.insert(pipeline, sub);
    }

    /// Brings the window's count in the server budget (and its gauge) up to date.
    fn charge(&mut self) {
        let now = self.seen.bytes() as u64;
        if let Some(server) = &self.server_budget {
            if now > self.charged {
                server.hold(now - self.charged);
            } else {
                server.unhold(self.charged - now);
            }
            self.charged = now;
        }
        metrics::gauge!("sluice_http_dedup_window_bytes", "source" => self.source.clone()).set(now as f64);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(server) = &self.server_budget {
            server.unhold(self.charged);
        }
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

    /// Whether any source has its own token.
    pub fn any_token(&self) -> bool {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.values().any(|e| e.token.is_some())
    }

    /// The source whose own token hashes to `presented` (every one compared, in constant time).
    pub fn token_owner(&self, presented: &TokenHash) -> Option<String> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (name, e) in map.iter() {
            if e.token.is_some_and(|t| token_matches(presented, &t)) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// Every endpoint's name.
    pub fn names(&self) -> Vec<String> {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    pub(super) fn with<T>(&self, name: &str, f: impl FnOnce(&mut Endpoint) -> T) -> Option<T> {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        map.get_mut(name).map(f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use sluice_engine::budget::{Budget, BufferPolicy, ServerBudget};
    use sluice_engine::decode::{Format, RecordDecoder};
    use sluice_engine::ingest::wal::IngestLog;
    use sluice_engine::connector::source::Health;

    use super::*;

    /// The idempotency window's bytes count against the server budget from the first
    /// subscriber on (ids already in the log included), follow it as it grows, and are given
    /// back when the endpoint goes.
    #[test]
    fn the_window_is_counted_in_the_server_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(wal.append_wait(b"before-restart\n{}".to_vec())).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut e = Endpoint::new("ev".into(), RecordDecoder::new(Format::Json, schema), 1 << 20, Arc::new(wal)).unwrap();
        let loaded = e.seen.bytes() as u64;
        assert!(loaded > 0, "the logged id is in the window");

        let server = ServerBudget::new(1 << 30);
        let (tx, _rx) = mpsc::channel(1);
        let sub = Subscriber {
            tx,
            health: Health::default(),
            budget: Budget::new("p", BufferPolicy::default(), server.clone()),
            delivery: Arc::new(std::sync::Mutex::new(Delivery { next: 0, behind: false })),
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        e.subscribe("p".into(), sub.clone());
        assert_eq!(server.used(), loaded);
        for i in 0..100 {
            e.remember(&format!("request-{i}"), Some(i + 1));
        }
        assert_eq!(server.used(), e.seen.bytes() as u64);
        assert!(server.used() > loaded);
        e.subscribe("q".into(), sub);
        assert_eq!(server.used(), e.seen.bytes() as u64, "counted once, not per pipeline");
        drop(e);
        assert_eq!(server.used(), 0);
    }
}
