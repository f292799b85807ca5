//! The source side of a pipeline: what a connector hands the engine ([`Chunk`]) and the
//! [`Source`] trait it implements.

use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot, watch};

use std::sync::Arc;

use crate::budget::Budget;
use crate::dead_letter::DeadLetter;
use crate::error::Result;
use crate::log::commit::CommitLog;

/// What a source sends its pipeline.
#[derive(Debug)]
pub enum Message {
    /// Records.
    Chunk(Chunk),
    /// The source has nothing more to read right now: the pipeline closes its open micro-batch
    /// instead of waiting for `batch.interval`.
    Idle,
}

impl From<Chunk> for Message {
    fn from(c: Chunk) -> Self {
        Message::Chunk(c)
    }
}

/// A group of decoded records from one source, with the source position after them.
#[derive(Debug)]
pub struct Chunk {
    /// The records that decoded, in the source's declared schema.
    pub batch: RecordBatch,
    /// The records that did not.
    pub dead_letters: Vec<DeadLetter>,
    /// The source position after this chunk, recorded in the commit that covers it (`None` for
    /// sources without replayable positions).
    pub position: Option<serde_json::Value>,
    /// Raw bytes received, for batching by size.
    pub bytes: usize,
    /// Who sent these records, when the source knows (an HTTP request's token name or client
    /// certificate subject); counted per principal in the commit entry.
    pub principal: Option<String>,
}

impl Chunk {
    /// Records received: decoded plus dead-lettered.
    pub fn received(&self) -> usize {
        self.batch.num_rows() + self.dead_letters.len()
    }
}

/// Whether a pipeline takes input, shared by the pipeline, its source and the server's health
/// endpoints. Set (with the reason) while the pipeline is failed or stopped, or its source
/// cannot deliver; a source refuses intake while it is set (HTTP answers 503 with the reason),
/// so nothing is acknowledged that would not be delivered.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<std::sync::Mutex<Option<String>>>);

impl Health {
    /// Marks the pipeline as not taking input, and why.
    pub fn fail(&self, why: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    /// Marks the pipeline as taking input again.
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why the pipeline does not take input, if it does not.
    pub fn failed(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Every writer's newest recorded position of one source in the sink's commit log, read on
/// demand. A source whose input is split among several servers (Kafka partitions of one
/// consumer group) reads it when it is handed a part, since another server may have committed
/// that part since this one started.
#[derive(Debug, Clone)]
pub struct LogPositions {
    log: CommitLog,
    source: String,
}

impl LogPositions {
    /// The positions of `source` recorded in `log`.
    pub fn new(log: CommitLog, source: &str) -> Self {
        LogPositions {
            log,
            source: source.to_string(),
        }
    }

    /// Each writer's newest position of the source (writers that never recorded one are left
    /// out), read from the log now (the newest checkpoint and the entries after it).
    pub async fn read(&self) -> Result<Vec<serde_json::Value>> {
        let snap = self.log.snapshot().await?;
        Ok(snap
            .newest_by_writer()
            .values()
            .filter_map(|e| e.sources.get(&self.source).cloned())
            .collect())
    }
}

/// How far a source's pipeline is behind its input, per part of the input (Kafka: per
/// partition, log-end offset minus the committed offset). Set by the source, shown in
/// `GET /v1/pipelines`.
#[derive(Debug, Clone, Default)]
pub struct Lag(Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>);

impl Lag {
    /// Records the lag of `part`.
    pub fn set(&self, part: &str, lag: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(part.to_string(), lag);
    }

    /// Forgets `part` (no longer read by this server).
    pub fn remove(&self, part: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(part);
    }

    /// The lag of every part.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl serde::Serialize for Lag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

/// What a running source gets from the engine.
#[derive(Debug)]
pub struct SourceContext {
    /// The pipeline this source instance feeds.
    pub pipeline: String,
    /// The source table's name.
    pub source: String,
    /// The position recorded by the last commit, if any: resume after it.
    pub start: Option<serde_json::Value>,
    /// Where chunks go. Bounded: a full channel is back-pressure.
    pub tx: mpsc::Sender<Message>,
    /// Becomes `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Fired by [`SourceContext::mark_started`].
    pub started: Option<oneshot::Sender<()>>,
    /// The pipeline's memory budget: acquire a chunk's `bytes` before sending it (the pipeline
    /// releases them after the commit that covers the chunk).
    pub budget: Arc<Budget>,
    /// The newest committed position of this source for this pipeline (after each commit), so
    /// the source can discard what is durable downstream (ingest-log segments, offsets).
    pub committed: watch::Receiver<Option<serde_json::Value>>,
    /// The pipeline's health: refuse intake while it is failed; set it when this source can
    /// no longer deliver (with the reason).
    pub health: Health,
    /// Every writer's newest position of this source in the sink's log.
    pub log_positions: LogPositions,
    /// Where the source reports how far behind its input the pipeline is.
    pub lag: Lag,
}

impl SourceContext {
    /// Tells the runtime the source has resumed and takes input; the server reports ready only
    /// when every source has done so (or stopped).
    pub fn mark_started(&mut self) {
        if let Some(tx) = self.started.take() {
            let _ = tx.send(());
        }
    }
}

/// A running source for one pipeline.
///
/// Implementors MUST:
/// - call [`SourceContext::mark_started`] once it takes input;
/// - resume strictly after `ctx.start` (no record before it is sent again, none after it skipped);
/// - attach to each chunk the position after its last record, when positions exist;
/// - acquire `chunk.bytes` from `ctx.budget` before sending a chunk (reject or wait as the
///   budget's policy says), so memory stays bounded;
/// - return promptly once `ctx.shutdown` turns `true`, dropping `ctx.tx` so the pipeline can
///   flush and commit what it has;
/// - never panic on bad input: undecodable records become [`DeadLetter`]s in the chunk.
#[async_trait::async_trait]
pub trait Source: Send {
    /// Checks, before the server starts, that the source can resume after `start` (the
    /// position its pipeline's newest commit recorded); an error stops the server at start
    /// with what to do, instead of resuming from the wrong place.
    fn check_start(&self, _pipeline: &str, _start: Option<&serde_json::Value>) -> Result<()> {
        Ok(())
    }

    /// Runs until shutdown.
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<()>;
}
