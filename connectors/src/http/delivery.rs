//! Delivery from the ingest log to a pipeline: positions in the log ([`LogPosition`]) and the
//! reader that replays records after a commit's position or catches a spilling pipeline up.

use std::sync::Arc;

use serde_json::{Value, json};
use sluice_engine::budget::Budget;
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::RecordDecoder;
use sluice_engine::ingest::wal::IngestLog;
use sluice_engine::connector::source::{Chunk, Message};
use sluice_engine::{EngineError, Result};
use tokio::sync::{mpsc, watch};

use super::body::{decode_body, parse_log_record};

/// An HTTP source's position, as recorded in commit entries: the last ingest-log record a
/// commit covers, and which log it is in (entries written before logs had identities carry
/// none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogPosition {
    /// Sequence number of the last record covered.
    pub seq: u64,
    /// The ingest log's identity ([`IngestLog::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl LogPosition {
    /// The position after record `seq` of log `log`.
    pub fn new(seq: u64, log: &str) -> Self {
        LogPosition {
            seq,
            log: Some(log.to_string()),
        }
    }

    /// Reads a recorded position (`None` when absent or not an HTTP source's).
    pub fn from_value(v: Option<&Value>) -> Option<Self> {
        serde_json::from_value(v?.clone()).ok()
    }

    /// The form recorded in a commit entry.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

pub(super) fn seq_of(position: &Option<Value>) -> Option<u64> {
    LogPosition::from_value(position.as_ref()).map(|p| p.seq)
}

/// Reads records of a source's log and sends them to one pipeline.
pub(super) struct LogReader {
    pub(super) wal: Arc<IngestLog>,
    pub(super) decoder: RecordDecoder,
    pub(super) source: String,
    pub(super) tx: mpsc::Sender<Message>,
    pub(super) budget: Arc<Budget>,
    pub(super) stop: watch::Receiver<bool>,
}

impl LogReader {
    /// Sends every durable record from `from` on (decoding it, waiting for budget), calling
    /// `sent(seq)` after each. Returns the sequence after the last one sent.
    pub(super) async fn send_from(&self, from: u64, mut sent: impl FnMut(u64) -> bool + Send + 'static) -> Result<u64> {
        let (wal, decoder, source) = (self.wal.clone(), self.decoder.clone(), self.source.clone());
        let (tx, budget, mut stop) = (self.tx.clone(), self.budget.clone(), self.stop.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut next = from;
            wal.read_from(from, |seq, payload| {
                let record = parse_log_record(payload);
                let (request_id, principal, body) = (record.request_id, record.principal, record.body);
                // Charged like a live request: the body and its dead letters.
                let (batch, dead_letters, dead_bytes) = match decode_body(&decoder, &source, &request_id, principal.as_deref(), body, None, None) {
                    Ok(b) => (b.decoded.batch, b.dead_letters, b.dead_bytes),
                    Err(refusal) => (
                        arrow::record_batch::RecordBatch::new_empty(decoder.schema().clone()),
                        vec![DeadLetter {
                            source: source.clone(),
                            position: json!({ "request_id": request_id, "seq": seq }),
                            stage: Stage::Decode,
                            error: refusal.message,
                            raw: DeadLetter::raw_fields(body).0,
                            raw_base64: DeadLetter::raw_fields(body).1,
                            principal: principal.clone(),
                        }],
                        body.len(),
                    ),
                };
                let bytes = body.len() + dead_bytes;
                if !handle.block_on(budget.acquire(bytes as u64, &mut stop)) {
                    return Err(EngineError::Stopped(source.clone()));
                }
                let chunk = Chunk {
                    batch,
                    dead_letters,
                    position: Some(LogPosition::new(seq, wal.id()).to_value()),
                    bytes,
                    principal,
                };
                tx.blocking_send(chunk.into())
                    .map_err(|_| EngineError::Stopped(source.clone()))?;
                next = seq + 1;
                sent(seq);
                Ok(())
            })?;
            Ok(next)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("log reader task failed: {e}")))?
    }
}
