//! The micro-batcher: gathers chunks until the batch is full by rows or bytes, or its interval
//! has passed since the first chunk arrived, whichever comes first.
//!
//! Batches grow while the pipeline is behind: when a batch closes full and more input is
//! already waiting (a backlog), the next one may hold twice as much (rows and bytes), up to
//! [`MAX_GROWTH`] times the configured sizes and never more bytes than the cap the pipeline
//! gives (half its memory budget, so the source can read ahead meanwhile). Once the pipeline
//! catches up (a batch closes by its interval, or the source is idle), sizes return to the
//! configured ones. Small configured batches thus cost little per event on a backlog, and
//! freshness at low rates is what the interval says.

use std::time::Duration;

use sluice_sql::{OptionError, OptionSpec, Options, option_bytes, option_count, option_duration};
use tokio::time::Instant;

use crate::source::Chunk;

/// Default `batch.max_rows`.
pub const DEFAULT_BATCH_MAX_ROWS: usize = 100_000;
/// Default `batch.max_bytes` (raw input bytes).
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 32 << 20;
/// Default `batch.interval`.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most a batch may grow over the configured sizes while the pipeline is behind.
pub const MAX_GROWTH: u64 = 64;

/// When a micro-batch closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Close once this many records are buffered.
    pub max_rows: usize,
    /// Close once this many raw bytes are buffered.
    pub max_bytes: u64,
    /// Close this long after the batch's first chunk arrived.
    pub interval: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_rows: DEFAULT_BATCH_MAX_ROWS,
            max_bytes: DEFAULT_BATCH_MAX_BYTES,
            interval: DEFAULT_BATCH_INTERVAL,
        }
    }
}

impl BatchPolicy {
    /// The OPTIONS keys every source accepts for batching.
    pub fn option_specs() -> Vec<OptionSpec> {
        vec![
            OptionSpec {
                key: "batch.max_rows",
                doc: "close a micro-batch at this many records (default 100000)",
            },
            OptionSpec {
                key: "batch.max_bytes",
                doc: "close a micro-batch at this many raw bytes, e.g. '32MB' (default 32MB)",
            },
            OptionSpec {
                key: "batch.interval",
                doc: "close a micro-batch this long after its first record, e.g. '500ms' (default 1s)",
            },
        ]
    }

    /// Reads the batching options of a source.
    pub fn from_options(options: &Options) -> Result<Self, OptionError> {
        Ok(BatchPolicy {
            max_rows: option_count(options, "batch.max_rows", DEFAULT_BATCH_MAX_ROWS)?,
            max_bytes: option_bytes(options, "batch.max_bytes", DEFAULT_BATCH_MAX_BYTES)?,
            interval: option_duration(options, "batch.interval", DEFAULT_BATCH_INTERVAL)?,
        })
    }
}

/// The open micro-batch.
#[derive(Debug)]
pub struct Batcher {
    policy: BatchPolicy,
    chunks: Vec<Chunk>,
    rows: usize,
    bytes: u64,
    opened: Option<Instant>,
    /// How many times the configured sizes the current batch may hold (1 when caught up).
    growth: u64,
    /// The most bytes a grown batch may hold.
    byte_cap: u64,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(policy: BatchPolicy) -> Self {
        Batcher {
            policy,
            chunks: Vec::new(),
            rows: 0,
            bytes: 0,
            opened: None,
            growth: 1,
            byte_cap: policy.max_bytes,
        }
    }

    /// Lets grown batches hold up to `cap` bytes (never less than the configured size).
    pub fn with_byte_cap(mut self, cap: u64) -> Self {
        self.byte_cap = cap.max(self.policy.max_bytes);
        self
    }

    /// The pipeline is behind: the next batches may hold twice as much (see the module docs).
    pub fn grow(&mut self) {
        self.growth = (self.growth * 2).min(MAX_GROWTH);
    }

    /// The pipeline has caught up: back to the configured sizes.
    pub fn reset_growth(&mut self) {
        self.growth = 1;
    }

    /// How many times the configured sizes a batch may hold now.
    pub fn growth(&self) -> u64 {
        self.growth
    }

    /// Adds a chunk; returns true when the batch is now full and should close.
    pub fn push(&mut self, chunk: Chunk) -> bool {
        self.opened.get_or_insert_with(Instant::now);
        self.rows += chunk.received();
        self.bytes += chunk.bytes as u64;
        self.chunks.push(chunk);
        self.is_full()
    }

    /// True when rows or bytes reached their limit.
    pub fn is_full(&self) -> bool {
        let rows = self.policy.max_rows.saturating_mul(self.growth as usize);
        let bytes = self.policy.max_bytes.saturating_mul(self.growth).min(self.byte_cap);
        self.rows >= rows || self.bytes >= bytes
    }

    /// When the open batch closes by time (`None` when empty).
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.policy.interval)
    }

    /// Records buffered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Closes the batch, returning its chunks.
    pub fn take(&mut self) -> Vec<Chunk> {
        self.rows = 0;
        self.bytes = 0;
        self.opened = None;
        std::mem::take(&mut self.chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Schema;
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    fn chunk(bytes: usize) -> Chunk {
        let batch = RecordBatch::new_empty(Arc::new(Schema::empty()));
        Chunk {
            batch,
            dead_letters: vec![],
            position: None,
            bytes,
        }
    }

    #[test]
    fn closes_on_bytes_and_reports_deadline() {
        let mut b = Batcher::new(BatchPolicy {
            max_rows: 10,
            max_bytes: 100,
            interval: Duration::from_millis(50),
        });
        assert!(b.deadline().is_none());
        assert!(!b.push(chunk(60)));
        assert!(b.deadline().is_some());
        assert!(b.push(chunk(60)));
        assert_eq!(b.take().len(), 2);
        assert!(b.is_empty() && b.deadline().is_none());
    }

    // Reproducer for #12 (item 14): with small configured batches, a backlog was committed in
    // small epochs, each paying the per-epoch cost (plan, file, fsyncs).
    #[test]
    fn batches_grow_while_behind_within_the_byte_cap_and_reset() {
        let mut b = Batcher::new(BatchPolicy {
            max_rows: 10,
            max_bytes: 100,
            interval: Duration::from_millis(50),
        })
        .with_byte_cap(350);
        assert!(b.push(chunk(100)), "configured size");
        b.take();
        b.grow();
        assert!(!b.push(chunk(100)));
        assert!(b.push(chunk(100)), "twice the size");
        b.take();
        for _ in 0..10 {
            b.grow();
        }
        assert_eq!(b.growth(), MAX_GROWTH);
        assert!(!b.push(chunk(300)));
        assert!(b.push(chunk(50)), "never more bytes than the cap");
        b.take();
        b.reset_growth();
        assert!(b.push(chunk(100)), "back to the configured size");
    }

    #[test]
    fn options_are_checked() {
        let mut o = Options::new();
        o.insert("batch.interval".into(), "soon".into());
        assert_eq!(BatchPolicy::from_options(&o).unwrap_err().key, "batch.interval");
        o.insert("batch.interval".into(), "250ms".into());
        o.insert("batch.max_bytes".into(), "1MB".into());
        let p = BatchPolicy::from_options(&o).unwrap();
        assert_eq!((p.interval, p.max_bytes), (Duration::from_millis(250), 1 << 20));
    }
}
