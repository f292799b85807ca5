//! The micro-batcher: gathers chunks until the batch is full by rows or bytes, or its interval
//! has passed since the first chunk arrived, whichever comes first.
//!
//! Batches grow while the pipeline is behind: when a batch closes full and more input is
//! already waiting (a backlog), the next one may hold twice as many rows, up to [`MAX_GROWTH`]
//! times the configured count, while its bytes stay under the cap the pipeline gives (a quarter
//! of its memory budget, and never more than `batch.max_bytes`): the batch being committed,
//! the next one and the requests in flight must fit without pushing producers back. Once the pipeline
//! catches up (a batch closes by its interval, or the source is idle), sizes return to the
//! configured ones. Small configured batches thus cost little per event on a backlog, and
//! freshness at low rates is what the interval says.

use tokio::time::Instant;

use crate::connector::source::Chunk;

pub use crate::connector::options::{
    BatchPolicy, DEFAULT_BATCH_INTERVAL, DEFAULT_BATCH_MAX_BYTES, DEFAULT_BATCH_MAX_ROWS, MAX_GROWTH,
};


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
    /// Bytes of the batch [`Batcher::take`] closed last.
    closed_bytes: u64,
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
            closed_bytes: 0,
        }
    }

    /// Lets grown batches hold up to `cap` bytes.
    pub fn with_byte_cap(mut self, cap: u64) -> Self {
        self.byte_cap = cap;
        self
    }

    /// The pipeline is behind: unless the batch that closed last already reached the byte
    /// cap, the next batches may hold twice as many rows.
    pub fn grow(&mut self) {
        if self.closed_bytes < self.byte_cap {
            self.growth = (self.growth * 2).min(MAX_GROWTH);
        }
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
        let bytes = if self.growth > 1 {
            self.policy.max_bytes.min(self.byte_cap)
        } else {
            self.policy.max_bytes
        };
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
        self.closed_bytes = self.bytes;
        self.rows = 0;
        self.bytes = 0;
        self.opened = None;
        std::mem::take(&mut self.chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use arrow::datatypes::Schema;
    use sluice_sql::Options;
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    fn chunk(bytes: usize) -> Chunk {
        let batch = RecordBatch::new_empty(Arc::new(Schema::empty()));
        Chunk {
            batch,
            dead_letters: vec![],
            position: None,
            bytes,
            principal: None,
        }
    }

    /// A chunk of one record of one byte.
    fn row_chunk() -> Chunk {
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
            "x",
            arrow::datatypes::DataType::Int64,
            false,
        )]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(arrow::array::Int64Array::from(vec![1]))]).unwrap();
        Chunk {
            batch,
            dead_letters: vec![],
            position: None,
            bytes: 1,
            principal: None,
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
        .with_byte_cap(60);
        // Rows close it (10 rows of 1 byte each).
        let rows = |b: &mut Batcher, n: usize| (0..n).map(|_| b.push(row_chunk())).last().unwrap_or(false);
        assert!(rows(&mut b, 10), "configured size");
        b.take();
        b.grow();
        assert!(!rows(&mut b, 10));
        assert!(rows(&mut b, 10), "twice the rows");
        b.take();
        for _ in 0..10 {
            b.grow();
        }
        assert_eq!(b.growth(), MAX_GROWTH);
        assert!(!b.push(chunk(59)));
        assert!(b.push(chunk(1)), "never more bytes than the cap");
        b.take();
        b.reset_growth();
        // A batch that closed at the cap does not grow the next.
        b.grow();
        assert_eq!(b.growth(), 1);
        assert!(rows(&mut b, 10), "back to the configured size");
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
