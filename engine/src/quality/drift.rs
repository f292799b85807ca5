//! Drift: a rolling, robust baseline per profiled metric of a pipeline's sink, and anomaly
//! **episodes** when a batch's value leaves it.
//!
//! Metrics: rows per batch (`volume`), and per column `null_fraction`, `distinct`, and for
//! numbers `mean`, `p50`, `p99`. The baseline of a metric is the median and the MAD (median
//! absolute deviation) of its values over the batches committed within `quality.window`; a
//! value's score is |value − median| / (1.4826 · MAD), with the scale floored at 1% of the
//! median and at a per-metric minimum (0.01 for a null fraction, one row or one value for
//! volume and distinct counts) so a metric that never moved does not alert on one stray value.
//! An episode that outlives its baseline (a lasting shift: `quality.window` passes with the
//! metric out of line) ends, and the new level becomes the baseline. A score above
//! `quality.threshold` opens an episode (after `quality.min_batches` batches of baseline); the
//! episode stays open, and its values stay out of the baseline, until a batch scores within the
//! threshold again, which closes it: one anomaly with a start and an end, not one per batch.
//!
//! State lives in the commit log: each entry carries the epoch's metric values and the episode
//! events, so a restart rebuilds the baseline and the open episodes from the newest entries.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use sluice_sql::{Options, option_count, option_duration};

use crate::error::{EngineError, Result};
pub use crate::log::commit::AnomalyEvent;
use crate::log::commit::CommitEntry;
use crate::quality::profile::ColumnProfile;

/// Default `quality.window`: the baseline spans the batches of the last hour.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);
/// Default `quality.threshold`, in scaled MADs (a robust z-score).
pub const DEFAULT_THRESHOLD: f64 = 4.0;
/// Default `quality.min_batches` of baseline before anything is flagged.
pub const DEFAULT_MIN_BATCHES: usize = 10;
/// Most batches a baseline keeps, whatever the window.
pub const MAX_BASELINE_BATCHES: usize = 1000;

/// Drift settings (sink OPTIONS `quality.window`, `quality.threshold`, `quality.min_batches`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftPolicy {
    /// How far back the baseline reaches.
    pub window: Duration,
    /// Score above which a value is anomalous.
    pub threshold: f64,
    /// Batches of baseline needed before anything is flagged.
    pub min_batches: usize,
}

impl Default for DriftPolicy {
    fn default() -> Self {
        DriftPolicy {
            window: DEFAULT_WINDOW,
            threshold: DEFAULT_THRESHOLD,
            min_batches: DEFAULT_MIN_BATCHES,
        }
    }
}

impl DriftPolicy {
    /// Reads the sink's options.
    pub fn from_options(options: &Options) -> Result<DriftPolicy> {
        let cfg = |e: sluice_sql::OptionError| EngineError::config(e.message, None::<String>);
        let threshold = match options.get("quality.threshold") {
            None => DEFAULT_THRESHOLD,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(t) if t.is_finite() && t > 0.0 => t,
                _ => {
                    return Err(EngineError::config(
                        format!("quality.threshold must be a positive number of MADs, got '{v}'"),
                        None::<String>,
                    ));
                }
            },
        };
        Ok(DriftPolicy {
            window: option_duration(options, "quality.window", DEFAULT_WINDOW).map_err(cfg)?,
            threshold,
            min_batches: option_count(options, "quality.min_batches", DEFAULT_MIN_BATCHES).map_err(cfg)?,
        })
    }
}

/// The drift metrics of one epoch's sink profile, keyed `column.metric` (`*.volume`).
pub fn metrics(rows: u64, columns: &[ColumnProfile]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    out.insert("*.volume".to_string(), rows as f64);
    if rows == 0 {
        return out;
    }
    for c in columns {
        out.insert(format!("{}.null_fraction", c.column), c.null_fraction());
        if c.distinct.is_some() {
            out.insert(format!("{}.distinct", c.column), c.distinct_estimate() as f64);
        }
        // Only numeric columns have a mean and quantiles.
        for (name, v) in [("mean", c.mean), ("p50", c.quantile(0.5)), ("p99", c.quantile(0.99))] {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                out.insert(format!("{}.{name}", c.column), v);
            }
        }
    }
    out
}

/// The rolling baselines and open episodes of one pipeline.
#[derive(Debug, Default)]
pub struct Drift {
    policy: DriftPolicy,
    /// Per metric: (commit time in ms, value), oldest first.
    history: BTreeMap<String, VecDeque<(i64, f64)>>,
    /// Open episodes by metric key: the epoch they started in.
    open: BTreeMap<String, u64>,
}

/// The median of `v` (NaN when empty); sorts `v`.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The smallest deviation that counts for `metric`, whatever its baseline's spread: a metric
/// that never moved (a column never null) must not alert on one stray value.
fn floor(metric: &str) -> f64 {
    match metric {
        "null_fraction" => 0.01,
        "volume" | "distinct" => 1.0,
        _ => 1e-9,
    }
}

fn split(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or(("*", key))
}

impl Drift {
    /// An empty baseline.
    pub fn new(policy: DriftPolicy) -> Drift {
        Drift {
            policy,
            ..Default::default()
        }
    }

    /// Rebuilds the baselines and open episodes from committed entries (oldest first).
    pub fn restore(&mut self, entries: &[CommitEntry]) {
        for e in entries {
            let Some(q) = &e.quality else { continue };
            let at = chrono::DateTime::parse_from_rfc3339(&e.committed_at).map_or(0, |t| t.timestamp_millis());
            self.apply(at, &q.metrics, &q.anomalies);
        }
    }

    /// The episode events the metrics of epoch `epoch` raise (start or end); pure, so a retried
    /// commit of a staged epoch does not count twice (state moves in [`Drift::apply`]).
    pub fn evaluate(&self, epoch: u64, now_ms: i64, values: &BTreeMap<String, f64>) -> Vec<AnomalyEvent> {
        let mut events = Vec::new();
        for (key, &value) in values {
            let (column, metric) = split(key);
            let (baseline, mad, n) = self.baseline(key, now_ms).unwrap_or((f64::NAN, 0.0, 0));
            if n < self.policy.min_batches {
                // An episode that outlived its baseline (a lasting shift): end it, so the new
                // level becomes the baseline instead of silencing the metric for good.
                if let Some(&started) = self.open.get(key) {
                    events.push(AnomalyEvent {
                        event: "end".into(),
                        column: column.to_string(),
                        metric: metric.to_string(),
                        value,
                        baseline: if baseline.is_finite() { baseline } else { value },
                        mad,
                        score: 0.0,
                        started,
                    });
                }
                continue;
            }
            let scale = (1.4826 * mad).max(0.01 * baseline.abs()).max(floor(metric));
            let score = (value - baseline).abs() / scale;
            let event = |kind: &str, started: u64| AnomalyEvent {
                event: kind.to_string(),
                column: column.to_string(),
                metric: metric.to_string(),
                value,
                baseline,
                mad,
                score,
                started,
            };
            match (self.open.get(key), score > self.policy.threshold) {
                (None, true) => events.push(event("start", epoch)),
                (Some(&started), false) => events.push(event("end", started)),
                _ => {}
            }
        }
        events
    }

    /// Moves the state by a committed epoch: its values join the baselines (except those of
    /// metrics in an open episode), episodes open and close.
    pub fn apply(&mut self, at_ms: i64, values: &BTreeMap<String, f64>, events: &[AnomalyEvent]) {
        for e in events {
            let key = format!("{}.{}", e.column, e.metric);
            if e.event == "start" {
                self.open.insert(key, e.started);
            } else {
                self.open.remove(&key);
            }
        }
        let horizon = at_ms - self.policy.window.as_millis() as i64;
        for (key, &v) in values {
            let h = self.history.entry(key.clone()).or_default();
            if !self.open.contains_key(key) {
                h.push_back((at_ms, v));
            }
            while h.len() > MAX_BASELINE_BATCHES || h.front().is_some_and(|(t, _)| *t < horizon) {
                h.pop_front();
            }
        }
    }

    /// Median, MAD and size of a metric's baseline as of `now_ms`.
    pub fn baseline(&self, key: &str, now_ms: i64) -> Option<(f64, f64, usize)> {
        let horizon = now_ms - self.policy.window.as_millis() as i64;
        let mut vals: Vec<f64> = self.history.get(key)?.iter().filter(|(t, _)| *t >= horizon).map(|(_, v)| *v).collect();
        if vals.is_empty() {
            return None;
        }
        let m = median(&mut vals);
        let mut dev: Vec<f64> = vals.iter().map(|v| (v - m).abs()).collect();
        Some((m, median(&mut dev), vals.len()))
    }

    /// The open episodes: metric key and starting epoch.
    pub fn open(&self) -> &BTreeMap<String, u64> {
        &self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(d: &mut Drift, epoch: u64, v: f64) -> Vec<AnomalyEvent> {
        let values = BTreeMap::from([("a.null_fraction".to_string(), v)]);
        let ev = d.evaluate(epoch, epoch as i64 * 1000, &values);
        d.apply(epoch as i64 * 1000, &values, &ev);
        ev
    }

    #[test]
    fn a_long_excursion_is_one_episode() {
        let mut d = Drift::new(DriftPolicy::default());
        let mut events = Vec::new();
        for e in 1..=200u64 {
            let v = if (100..140).contains(&e) { 0.30 } else { 0.01 + (e % 3) as f64 * 0.001 };
            events.extend(step(&mut d, e, v));
        }
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!((events[0].event.as_str(), events[0].started), ("start", 100));
        assert_eq!((events[1].event.as_str(), events[1].started), ("end", 100));
        assert!(d.open().is_empty());
    }

    #[test]
    fn a_lasting_shift_ends_its_episode_and_becomes_the_baseline() {
        let policy = DriftPolicy {
            window: Duration::from_secs(60),
            ..DriftPolicy::default()
        };
        let mut d = Drift::new(policy);
        let mut events = Vec::new();
        for e in 1..=300u64 {
            events.extend(step(&mut d, e, if e < 100 { 0.01 } else { 0.5 }));
        }
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1].event, "end");
        assert!(d.open().is_empty());
        // One stray null in a never-null column is not an anomaly.
        let mut d = Drift::new(DriftPolicy::default());
        for e in 1..50 {
            assert!(step(&mut d, e, 0.0).is_empty());
        }
        assert!(step(&mut d, 50, 0.00001).is_empty());
    }

    #[test]
    fn nothing_is_flagged_before_min_batches_and_a_steady_metric_is_quiet() {
        let mut d = Drift::new(DriftPolicy::default());
        assert!(step(&mut d, 1, 0.5).is_empty());
        for e in 2..9 {
            assert!(step(&mut d, e, 0.01).is_empty());
        }
        for e in 9..100 {
            assert!(step(&mut d, e, 0.01).is_empty(), "epoch {e}");
        }
    }
}
