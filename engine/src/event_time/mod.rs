//! Event time (DESIGN §3, §5): the watermark of a source, late rows, deduplication by key,
//! windowed aggregation state, and the checkpoint of all of it with each commit.
//!
//! Every decision is made row by row in input order, never per micro-batch, so a restart that
//! cuts the input into other batches gives the same output:
//! - the watermark before a row is the newest event time of the rows before it minus
//!   `watermark.delay`; a row below it (or without event time) is late;
//! - a row whose `dedup.key` was kept at event time `t0` is a repeat when its own event time is
//!   within `dedup.ttl` of `t0`; a key is forgotten once the watermark passes `t0 + ttl`, when
//!   no row that is not late could repeat it any more;
//! - a window `[start, end)` is emitted once, when the watermark after a micro-batch reaches
//!   `end`; every row that could still fall in it would be late.

pub mod dedup;
pub mod state;
pub mod window;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Schema, TimeUnit, TimestampNanosecondType};
use sluice_sql::EventTimeDef;

use crate::error::{EngineError, Result};

/// A source's watermark, late-row split and dedup state.
pub struct EventTime {
    /// The source's event-time settings.
    pub def: EventTimeDef,
    column: usize,
    delay_ns: i64,
    /// Newest event time seen (nanoseconds since the Unix epoch).
    max_ns: Option<i64>,
    /// Keys kept recently, when the source deduplicates.
    pub dedup: Option<dedup::Dedup>,
}

/// One micro-batch after the event-time step.
#[derive(Default)]
pub struct Split {
    /// Rows on time and not repeats, in input order.
    pub kept: Vec<RecordBatch>,
    /// Late rows (below the watermark, or without event time), in input order.
    pub late: Vec<RecordBatch>,
    /// Repeats dropped by dedup.
    pub duplicates: u64,
}

/// Nanoseconds since the Unix epoch as RFC 3339 (UTC).
pub fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

impl EventTime {
    /// The event-time step of a source declaring `schema`.
    pub fn new(def: EventTimeDef, schema: &Schema) -> Result<Self> {
        let column = schema
            .index_of(&def.column)
            .map_err(|_| EngineError::Internal(format!("event-time column {} not in the source", def.column)))?;
        let delay_ns = i64::try_from(def.delay.as_nanos()).unwrap_or(i64::MAX);
        let dedup = match &def.dedup {
            Some(d) => Some(dedup::Dedup::new(d, schema)?),
            None => None,
        };
        Ok(EventTime {
            def,
            column,
            delay_ns,
            max_ns: None,
            dedup,
        })
    }

    /// The watermark: the newest event time seen minus the delay; `None` before any row.
    pub fn watermark(&self) -> Option<i64> {
        self.max_ns.map(|m| m.saturating_sub(self.delay_ns))
    }

    /// The newest event time seen.
    pub fn max_event_time(&self) -> Option<i64> {
        self.max_ns
    }

    /// Resumes from a checkpoint's newest event time.
    pub fn set_max_event_time(&mut self, max_ns: Option<i64>) {
        self.max_ns = max_ns;
    }

    /// Splits `batches` (in input order) into rows kept, late rows and repeats, advancing the
    /// watermark and the dedup state row by row.
    pub fn split(&mut self, batches: &[RecordBatch]) -> Result<Split> {
        let mut out = Split::default();
        for batch in batches {
            let ts = cast(batch.column(self.column), &DataType::Timestamp(TimeUnit::Nanosecond, None))
                .map_err(|e| EngineError::Internal(format!("reading event time: {e}")))?;
            let ts = ts.as_primitive::<TimestampNanosecondType>();
            let n = batch.num_rows();
            let mut on_time = Vec::with_capacity(n);
            for i in 0..n {
                if ts.is_null(i) {
                    on_time.push(false);
                    continue;
                }
                let t = ts.value(i);
                let late = self.watermark().is_some_and(|w| t < w);
                if !late {
                    self.max_ns = Some(self.max_ns.map_or(t, |m| m.max(t)));
                }
                on_time.push(!late);
            }
            let mask = BooleanArray::from(on_time);
            if mask.true_count() < n {
                let late = arrow::compute::not(&mask).map_err(|e| EngineError::Internal(e.to_string()))?;
                out.late
                    .push(filter_record_batch(batch, &late).map_err(|e| EngineError::Internal(e.to_string()))?);
            }
            let mut keep = mask.clone();
            if let Some(d) = &mut self.dedup {
                let (kept, repeats) = d.check(batch, ts, &mask)?;
                keep = kept;
                out.duplicates += repeats;
            }
            if keep.true_count() == n {
                out.kept.push(batch.clone());
            } else if keep.true_count() > 0 {
                out.kept
                    .push(filter_record_batch(batch, &keep).map_err(|e| EngineError::Internal(e.to_string()))?);
            }
        }
        let watermark = self.watermark();
        if let (Some(d), Some(w)) = (&mut self.dedup, watermark) {
            d.expire(w);
        }
        Ok(out)
    }
}
