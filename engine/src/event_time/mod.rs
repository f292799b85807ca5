//! Event time (DESIGN §3, §5): the watermark of a source, late rows, deduplication by key,
//! windowed aggregation state, and the checkpoint of all of it with each commit.
//!
//! Every decision is made row by row in input order, never per micro-batch, so a restart that
//! cuts the input into other batches gives the same output:
//! - the watermark before a row is the newest event time of the rows before it minus
//!   `watermark.delay`; a row below it (or without event time, or more than
//!   `watermark.max_ahead` ahead of the clock) is late. With
//!   `watermark.partition` it is the minimum over partitions (values of that column) of each
//!   one's newest event time, minus the delay, never moving back; a partition silent for
//!   `watermark.idle_timeout` (wall clock) stops holding it back, and for that long after a
//!   start the watermark does not move at all (a partition not heard from yet may still send
//!   older rows: a consumer reads partitions' backlogs one after another). That one depends on how
//!   partitions interleave, so it is the only rule that is not the same on every run;
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
    /// The watermark (never moves back).
    watermark: Option<i64>,
    /// Per-partition newest event times, with `watermark.partition`.
    parts: Option<Partitions>,
    /// With partitions and an idle timeout: the watermark does not move before this (a
    /// partition not heard from yet since the start may still send older rows).
    hold_until: Option<std::time::Instant>,
    /// Keys kept recently, when the source deduplicates.
    pub dedup: Option<dedup::Dedup>,
}

/// Partitions tracked at most: rows of further partitions do not hold the watermark back.
pub const MAX_PARTITIONS: usize = 10_000;

/// The newest event time of each partition of a source, and when each last had a row.
struct Partitions {
    column: usize,
    idle: Option<std::time::Duration>,
    newest: std::collections::HashMap<String, (i64, std::time::Instant)>,
    /// The same newest times, ordered: the watermark's low point without a scan per row.
    order: std::collections::BTreeSet<(i64, String)>,
}

impl Partitions {
    fn is_idle(&self, seen: std::time::Instant, now: std::time::Instant) -> bool {
        self.idle.is_some_and(|idle| now.duration_since(seen) >= idle)
    }

    /// Records a row of `name` at event time `t`, seen at `now`. Past [`MAX_PARTITIONS`], idle
    /// partitions are forgotten to make room; a new one that still finds no room is not
    /// tracked (it does not hold the watermark back).
    fn update(&mut self, name: &str, t: i64, now: std::time::Instant) {
        if let Some((old, seen)) = self.newest.get_mut(name) {
            *seen = now;
            if t > *old {
                self.order.remove(&(*old, name.to_string()));
                *old = t;
                self.order.insert((t, name.to_string()));
            }
            return;
        }
        if self.newest.len() >= MAX_PARTITIONS {
            let idle: Vec<String> = self
                .newest
                .iter()
                .filter(|(_, (_, seen))| self.is_idle(*seen, now))
                .map(|(k, _)| k.clone())
                .collect();
            for k in idle {
                if let Some((t, _)) = self.newest.remove(&k) {
                    self.order.remove(&(t, k));
                }
            }
        }
        if self.newest.len() < MAX_PARTITIONS {
            self.newest.insert(name.to_string(), (t, now));
            self.order.insert((t, name.to_string()));
        }
    }

    /// Sets every partition's newest time (from a checkpoint), all seen `now`.
    fn restore(&mut self, partitions: &std::collections::BTreeMap<String, i64>, now: std::time::Instant) {
        self.newest = partitions.iter().map(|(k, t)| (k.clone(), (*t, now))).collect();
        self.order = partitions.iter().map(|(k, t)| (*t, k.clone())).collect();
    }

    /// The oldest newest-event-time over partitions not idle at `now` (all partitions idle:
    /// the newest of them). Idle ones are skipped from the low end.
    fn low(&self, now: std::time::Instant) -> Option<i64> {
        let active = self.order.iter().find(|(_, k)| {
            self.newest.get(k).is_some_and(|(_, seen)| !self.is_idle(*seen, now))
        });
        active.or_else(|| self.order.last()).map(|(t, _)| *t)
    }
}

/// One micro-batch after the event-time step.
#[derive(Default)]
pub struct Split {
    /// Rows on time and not repeats, in input order.
    pub kept: Vec<RecordBatch>,
    /// Late rows (below the watermark, or without event time), in input order.
    pub late: Vec<RecordBatch>,
    /// Why each late row is late, in the same order.
    pub reasons: Vec<String>,
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
        let parts = match &def.partition {
            Some(p) => Some(Partitions {
                column: schema
                    .index_of(p)
                    .map_err(|_| EngineError::Internal(format!("watermark partition column {p} not in the source")))?,
                idle: def.idle_timeout,
                newest: Default::default(),
                order: Default::default(),
            }),
            None => None,
        };
        let hold_until = parts
            .as_ref()
            .and(def.idle_timeout)
            .and_then(|d| std::time::Instant::now().checked_add(d));
        Ok(EventTime {
            def,
            column,
            delay_ns,
            max_ns: None,
            watermark: None,
            parts,
            hold_until,
            dedup,
        })
    }

    /// The watermark; `None` before any row.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Each partition's newest event time (with `watermark.partition`).
    pub fn partitions(&self) -> std::collections::BTreeMap<String, i64> {
        self.parts
            .iter()
            .flat_map(|p| p.newest.iter().map(|(k, (t, _))| (k.clone(), *t)))
            .collect()
    }

    /// The watermark once the newest event time (of the row's partition) has moved.
    fn advance(&mut self, now: std::time::Instant) {
        if self.hold_until.is_some_and(|h| now < h) {
            return;
        }
        let low = match &self.parts {
            Some(p) => p.low(now),
            None => self.max_ns,
        };
        if let Some(low) = low {
            let w = low.saturating_sub(self.delay_ns);
            self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
        }
    }

    /// The newest event time seen.
    pub fn max_event_time(&self) -> Option<i64> {
        self.max_ns
    }

    /// Resumes from a checkpoint: the newest event time, the watermark, and each partition's
    /// newest event time (counted as seen now: a partition holds the watermark back again
    /// until it has been idle for the timeout).
    pub fn resume(
        &mut self,
        max_ns: Option<i64>,
        watermark: Option<i64>,
        partitions: &std::collections::BTreeMap<String, i64>,
    ) {
        self.max_ns = max_ns;
        self.watermark = watermark;
        if let Some(p) = &mut self.parts {
            // Counted as seen now; the hold after the start was armed when the step was made
            // (a reload after a failed epoch does not arm it again).
            let now = std::time::Instant::now();
            p.restore(partitions, now);
        }
    }

    /// The rows of `batches` that have an event time.
    pub fn with_event_time(&self, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        batches
            .iter()
            .map(|b| {
                let keep = arrow::compute::is_not_null(b.column(self.column))
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                filter_record_batch(b, &keep).map_err(|e| EngineError::Internal(e.to_string()))
            })
            .collect()
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
            let now = std::time::Instant::now();
            let ahead_limit = chrono::Utc::now()
                .timestamp_nanos_opt()
                .unwrap_or(i64::MAX)
                .saturating_add(i64::try_from(self.def.max_ahead.as_nanos()).unwrap_or(i64::MAX));

            let part_names = match &self.parts {
                Some(p) => {
                    let col = batch.column(p.column);
                    let f = arrow::util::display::ArrayFormatter::try_new(col.as_ref(), &Default::default())
                        .map_err(|e| EngineError::Internal(format!("reading the partition column: {e}")))?;
                    Some((0..n).map(|i| f.value(i).to_string()).collect::<Vec<_>>())
                }
                None => None,
            };
            let mut on_time = Vec::with_capacity(n);
            for i in 0..n {
                if ts.is_null(i) {
                    on_time.push(false);
                    out.reasons.push(format!("late: {} is null", self.def.column));
                    continue;
                }
                let t = ts.value(i);
                let late = match self.watermark {
                    Some(w) if t < w => {
                        out.reasons
                            .push(format!("late: event time {} is below the watermark {}", rfc3339(t), rfc3339(w)));
                        true
                    }
                    _ if t > ahead_limit => {
                        out.reasons.push(format!(
                            "late: event time {} is more than watermark.max_ahead ({}s) ahead of the clock",
                            rfc3339(t),
                            self.def.max_ahead.as_secs()
                        ));
                        true
                    }
                    _ => false,
                };
                if !late {
                    self.max_ns = Some(self.max_ns.map_or(t, |m| m.max(t)));
                    if let (Some(p), Some(names)) = (&mut self.parts, &part_names) {
                        p.update(&names[i], t, now);
                    }
                    self.advance(now);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::array::{Int64Array, TimestampNanosecondArray};
    use arrow::datatypes::Field;
    use sluice_sql::LatePolicy;

    use super::*;

    fn def(delay_s: u64) -> EventTimeDef {
        EventTimeDef {
            column: "ts".into(),
            delay: Duration::from_secs(delay_s),
            late: LatePolicy::Drop,
            partition: None,
            idle_timeout: None,
            max_ahead: Duration::from_secs(3600),
            dedup: None,
        }
    }

    fn batch(rows: &[(i64, Option<i64>)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
        ]));
        let ids = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let ts = TimestampNanosecondArray::from(rows.iter().map(|r| r.1.map(|s| s * 1_000_000_000)).collect::<Vec<_>>());
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(ts)]).unwrap()
    }

    fn ids(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec())
            .collect()
    }

    #[test]
    fn lateness_is_decided_row_by_row_whatever_the_batches() {
        let now = chrono::Utc::now().timestamp();
        let rows = [(1, Some(100)), (2, Some(95)), (3, Some(89)), (4, Some(120)), (5, None), (6, Some(111)), (7, Some(109)), (8, Some(now + 7200))];
        let schema = batch(&rows).schema();
        let mut whole = EventTime::new(def(10), &schema).unwrap();
        let a = whole.split(&[batch(&rows)]).unwrap();
        // 3 is 11 s behind 100; 5 has no time; 7 is 11 s behind 120; 8 is two hours ahead of
        // the clock (max_ahead 1 h) and moves nothing.
        assert_eq!(ids(&a.kept), vec![1, 2, 4, 6]);
        assert_eq!(ids(&a.late), vec![3, 5, 7, 8]);
        assert_eq!(whole.watermark(), Some(110 * 1_000_000_000));
        for cut in 1..rows.len() {
            let mut cuts = EventTime::new(def(10), &schema).unwrap();
            let mut kept = Vec::new();
            for part in [&rows[..cut], &rows[cut..]] {
                kept.extend(cuts.split(&[batch(part)]).unwrap().kept);
            }
            assert_eq!(ids(&kept), vec![1, 2, 4, 6], "cut at {cut}");
            assert_eq!(cuts.watermark(), whole.watermark());
        }
    }

    #[test]
    fn partitions_keep_their_low_point_in_order_and_make_room_past_the_cap() {
        let now = std::time::Instant::now();
        let mut p = Partitions {
            column: 0,
            idle: None,
            newest: Default::default(),
            order: Default::default(),
        };
        for (name, t) in [("a", 30), ("b", 10), ("c", 20), ("b", 25), ("b", 5)] {
            p.update(name, t, now);
        }
        // b moved to 25 (a later 5 does not move it back): the low point is c's 20.
        assert_eq!(p.low(now), Some(20));
        assert_eq!(p.order.len(), 3);
        for i in 0..MAX_PARTITIONS {
            p.update(&format!("p{i}"), 100, now);
        }
        assert_eq!(p.newest.len(), MAX_PARTITIONS, "no room past the cap while none is idle");
        // Idle ones make room; everything idle: the newest of them.
        p.idle = Some(Duration::from_secs(1));
        let later = now + Duration::from_secs(2);
        p.update("new", 7, later);
        assert_eq!((p.newest.len(), p.low(later)), (1, Some(7)));
        assert_eq!(p.low(later + Duration::from_secs(2)), Some(7));
    }

    #[test]
    fn the_watermark_is_the_slowest_partition() {
        let mut d = def(0);
        d.partition = Some("id".into());
        let rows = [(1, Some(100)), (2, Some(120)), (1, Some(200))];
        // With an idle timeout, the watermark holds still for that long after the start.
        let mut held = d.clone();
        held.idle_timeout = Some(Duration::from_secs(3600));
        let mut et = EventTime::new(held, &batch(&rows).schema()).unwrap();
        assert_eq!(et.split(&[batch(&rows)]).unwrap().kept.len(), 1);
        assert_eq!(et.watermark(), None);
        let mut et = EventTime::new(d, &batch(&rows).schema()).unwrap();
        let s = et.split(&[batch(&rows)]).unwrap();
        assert_eq!(ids(&s.kept), vec![1, 2, 1]);
        // Partition 2 holds it at 120 s (not 200 s): a row of partition 1 at 130 s is on time,
        // one of partition 2 at 115 s is late.
        assert_eq!(et.watermark(), Some(120 * 1_000_000_000));
        let s = et.split(&[batch(&[(1, Some(130)), (2, Some(115))])]).unwrap();
        assert_eq!((ids(&s.kept), ids(&s.late)), (vec![1], vec![2]));
        assert_eq!(et.partitions().len(), 2);
    }
}
