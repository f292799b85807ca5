//! The mergeable sketches a column profile holds, each with a byte form for the profile files:
//!
//! - [`Distinct`]: HyperLogLog registers from DataFusion's own `approx_distinct` accumulator
//!   (`state()` to store, `merge_batch()` to merge), so a profile's distinct count is the one
//!   `approx_distinct` gives in a query (standard error about 0.8%, 2^14 registers);
//! - [`Quantiles`]: DataFusion's t-digest (the one behind `approx_percentile_cont`), stored as
//!   its parts and read back through `TDigest::try_from_parts`, which validates them;
//! - [`TopValues`]: the most frequent strings. DataFusion has no frequent-items aggregate, so
//!   this is a Misra-Gries summary written here (Agarwal et al., "Mergeable Summaries", 2012):
//!   with `k` counters, a count is under-estimated by at most `error` (≤ n/(k+1) over n values),
//!   and when a column has at most `k` distinct values every count is exact (`error` = 0).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Schema};
use datafusion::functions_aggregate::approx_distinct::approx_distinct_udaf;
use datafusion::logical_expr::Accumulator;
use datafusion::logical_expr::function::AccumulatorArgs;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::scalar::ScalarValue;
use datafusion_functions_aggregate_common::tdigest::{Centroid, TDigest};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Centroids kept by a t-digest (DataFusion's default for `approx_percentile_cont`).
pub const DIGEST_SIZE: usize = 100;

/// Counters kept by a [`TopValues`] summary.
pub const TOP_COUNTERS: usize = 64;

/// Longest value a [`TopValues`] summary keeps, in bytes: a longer one is counted under its
/// first bytes followed by `…` (profiles are for shapes, not for copies of long texts).
pub const MAX_TOP_VALUE_BYTES: usize = 128;

/// `v` cut to at most [`MAX_TOP_VALUE_BYTES`] on a character boundary, marked with `…`.
fn capped(v: &str) -> String {
    if v.len() <= MAX_TOP_VALUE_BYTES {
        return v.to_string();
    }
    let mut end = MAX_TOP_VALUE_BYTES;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &v[..end])
}

/// Bytes of a HyperLogLog state (2^14 one-byte registers).
const HLL_BYTES: usize = 1 << 14;

fn bad(what: &str, why: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(format!("damaged {what} sketch: {why}"))
}

/// An approximate distinct count: HyperLogLog registers.
#[derive(Debug, Clone)]
pub struct Distinct {
    registers: Vec<u8>,
    /// The estimate, computed once (it reads all registers).
    estimate: std::sync::OnceLock<u64>,
}

impl PartialEq for Distinct {
    fn eq(&self, other: &Self) -> bool {
        self.registers == other.registers
    }
}

impl Eq for Distinct {}

impl Distinct {
    /// The sketch of the non-null values of `array`, or `None` for types `approx_distinct`
    /// does not take (nested types).
    pub fn of(array: &ArrayRef) -> Option<Distinct> {
        Distinct::of_parts(std::slice::from_ref(array))
    }

    /// The sketch of the non-null values of consecutive arrays of one type.
    pub fn of_parts(parts: &[ArrayRef]) -> Option<Distinct> {
        let first = parts.first()?;
        let mut acc = accumulator(Distinct::hashed(first)?.data_type()).ok()?;
        for part in parts {
            acc.update_batch(&[Distinct::hashed(part)?]).ok()?;
        }
        Distinct::from_state(acc.state().ok()?)
    }

    /// `array` as the values the sketch hashes (small domains widened, floats as their bits).
    fn hashed(array: &ArrayRef) -> Option<ArrayRef> {
        // Small domains get a bitmap state in DataFusion; widen them to share the HLL form.
        let array = match array.data_type() {
            DataType::Boolean | DataType::Int8 | DataType::Int16 | DataType::UInt8 | DataType::UInt16 => {
                arrow::compute::cast(array, &DataType::Int32).ok()?
            }
            // approx_distinct takes no floats: hash their bits (one +0.0 for ±0, one NaN).
            t if t.is_floating() || matches!(t, DataType::Decimal128(_, _) | DataType::Decimal256(_, _)) => {
                let f = arrow::compute::cast(array, &DataType::Float64).ok()?;
                let f = f.as_primitive::<Float64Type>();
                let bits: Int64Array = f.unary(|v| {
                    let v = if v == 0.0 { 0.0 } else if v.is_nan() { f64::NAN } else { v };
                    v.to_bits() as i64
                });
                Arc::new(bits)
            }
            _ => array.clone(),
        };
        Some(array)
    }

    fn from_state(state: Vec<ScalarValue>) -> Option<Distinct> {
        match state.into_iter().next()? {
            ScalarValue::Binary(Some(registers)) if registers.len() == HLL_BYTES => Some(Distinct {
                registers,
                estimate: std::sync::OnceLock::new(),
            }),
            _ => None,
        }
    }

    /// The registers, as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.registers
    }

    /// Reads stored registers back.
    pub fn from_bytes(bytes: &[u8]) -> Result<Distinct> {
        if bytes.len() != HLL_BYTES {
            return Err(bad("distinct", format!("{} bytes, expected {HLL_BYTES}", bytes.len())));
        }
        Ok(Distinct {
            registers: bytes.to_vec(),
            estimate: std::sync::OnceLock::new(),
        })
    }

    /// The sketch of the union of `parts`.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Distinct>) -> Result<Option<Distinct>> {
        let states: Vec<&[u8]> = parts.into_iter().map(|d| d.registers.as_slice()).collect();
        if states.is_empty() {
            return Ok(None);
        }
        let mut acc = accumulator(&DataType::Binary)?;
        let array: ArrayRef = Arc::new(BinaryArray::from(states));
        acc.merge_batch(&[array])?;
        Ok(Distinct::from_state(acc.state()?))
    }

    /// The estimated number of distinct values.
    pub fn estimate(&self) -> Result<u64> {
        if let Some(n) = self.estimate.get() {
            return Ok(*n);
        }
        let n = self.compute_estimate()?;
        let _ = self.estimate.set(n);
        Ok(n)
    }

    fn compute_estimate(&self) -> Result<u64> {
        let mut acc = accumulator(&DataType::Binary)?;
        let array: ArrayRef = Arc::new(BinaryArray::from(vec![self.registers.as_slice()]));
        acc.merge_batch(&[array])?;
        match acc.evaluate()? {
            ScalarValue::UInt64(Some(n)) => Ok(n),
            other => Err(bad("distinct", format!("estimate {other:?}"))),
        }
    }
}

/// DataFusion's `approx_distinct` accumulator for values of `data_type`.
fn accumulator(data_type: &DataType) -> Result<Box<dyn Accumulator>> {
    let field: FieldRef = Arc::new(Field::new("v", data_type.clone(), true));
    let schema = Schema::new(vec![field.as_ref().clone()]);
    let expr: Arc<dyn PhysicalExpr> = Arc::new(Column::new("v", 0));
    let args = AccumulatorArgs {
        return_field: Arc::new(Field::new("approx_distinct(v)", DataType::UInt64, false)),
        schema: &schema,
        ignore_nulls: false,
        order_bys: &[],
        is_reversed: false,
        name: "approx_distinct(v)",
        is_distinct: false,
        exprs: &[expr],
        expr_fields: &[field],
    };
    Ok(approx_distinct_udaf().accumulator(args)?)
}

/// Approximate quantiles of finite numbers: a t-digest.
#[derive(Debug, Clone)]
pub struct Quantiles {
    digest: TDigest,
}

impl Quantiles {
    /// The digest of `values` (finite numbers only; NaN and infinities are counted apart).
    pub fn of(values: Vec<f64>) -> Option<Quantiles> {
        if values.is_empty() {
            return None;
        }
        Some(Quantiles {
            digest: TDigest::new(DIGEST_SIZE).merge_unsorted_f64(values),
        })
    }

    /// The digest of the union of `parts`.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Quantiles>) -> Option<Quantiles> {
        let digests: Vec<&TDigest> = parts.into_iter().map(|q| &q.digest).collect();
        if digests.is_empty() {
            return None;
        }
        Some(Quantiles {
            digest: TDigest::merge_digests(digests),
        })
    }

    /// The digest with every weight multiplied by `scale` (a sample standing for all values)
    /// and the exact extremes.
    pub fn scaled(&self, scale: f64, min: f64, max: f64) -> Option<Quantiles> {
        let d = &self.digest;
        let centroids = d.centroids().iter().map(|c| Centroid::new(c.mean(), c.weight() * scale)).collect();
        let digest = TDigest::try_from_parts(d.max_size(), d.sum() * scale, d.count() * scale, max, min, centroids).ok()?;
        Some(Quantiles { digest })
    }

    /// The estimated `q`-quantile (0 ≤ q ≤ 1).
    pub fn quantile(&self, q: f64) -> f64 {
        self.digest.estimate_quantile(q)
    }

    /// The byte form: size, sum, count, max, min, then (mean, weight) per centroid, all
    /// little-endian 8-byte numbers.
    pub fn to_bytes(&self) -> Vec<u8> {
        let d = &self.digest;
        let mut out = Vec::with_capacity(40 + 16 * d.centroids().len());
        out.extend_from_slice(&(d.max_size() as u64).to_le_bytes());
        for v in [d.sum(), d.count(), d.max(), d.min()] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for c in d.centroids() {
            out.extend_from_slice(&c.mean().to_le_bytes());
            out.extend_from_slice(&c.weight().to_le_bytes());
        }
        out
    }

    /// Reads the byte form back, validating it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Quantiles> {
        if bytes.len() < 40 || (bytes.len() - 40) % 16 != 0 {
            return Err(bad("quantile", format!("{} bytes", bytes.len())));
        }
        let word = |i: usize| -> [u8; 8] {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            w
        };
        let num = |i: usize| f64::from_le_bytes(word(i));
        let size = u64::from_le_bytes(word(0));
        if size == 0 || size > 1 << 20 {
            return Err(bad("quantile", format!("size {size}")));
        }
        let centroids = (0..(bytes.len() - 40) / 16)
            .map(|c| Centroid::new(num(5 + 2 * c), num(6 + 2 * c)))
            .collect();
        let digest = TDigest::try_from_parts(size as usize, num(1), num(2), num(3), num(4), centroids)
            .map_err(|e| bad("quantile", e))?;
        Ok(Quantiles { digest })
    }
}

/// Keeps the [`TOP_COUNTERS`] largest counts, each lowered by the next largest (the
/// Misra-Gries merge step), most frequent first (ties by value); the lowering is added to
/// `error`. Selects before sorting, so a batch of many distinct values costs a linear pass.
fn reduce<S: Ord>(mut items: Vec<(S, u64)>, mut error: u64) -> (Vec<(S, u64)>, u64) {
    let order = |a: &(S, u64), b: &(S, u64)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    if items.len() > TOP_COUNTERS {
        items.select_nth_unstable_by(TOP_COUNTERS, order);
        items.truncate(TOP_COUNTERS + 1);
    }
    items.sort_unstable_by(order);
    if items.len() > TOP_COUNTERS {
        let cut = items[TOP_COUNTERS].1;
        items.truncate(TOP_COUNTERS);
        for item in &mut items {
            item.1 -= cut;
        }
        items.retain(|i| i.1 > 0);
        error += cut;
    }
    (items, error)
}

/// The most frequent values of a column with their (lower-bound) counts: a Misra-Gries summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopValues {
    /// Values and counts, most frequent first (ties by value); at most [`TOP_COUNTERS`].
    pub items: Vec<(String, u64)>,
    /// The most any count may be below the true count (0: every count is exact).
    pub error: u64,
    /// True when the counts were scaled from a sample (estimates: a rare value may be missing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
}

impl TopValues {
    /// The summary of `values` (nulls skipped).
    pub fn of<'a>(values: impl Iterator<Item = Option<&'a str>>) -> TopValues {
        let mut counts: ahash::AHashMap<&str, u64> = ahash::AHashMap::new();
        for v in values.flatten() {
            *counts.entry(v).or_insert(0) += 1;
        }
        // Cut down while borrowed; only the kept values are copied.
        let (items, error) = reduce(counts.into_iter().collect(), 0);
        TopValues {
            items: items.into_iter().map(|(v, c)| (capped(v), c)).collect(),
            error,
            sampled: false,
        }
    }

    /// The summary of a sample standing for `total` values: counts scaled to it.
    pub fn scaled(mut self, total: u64) -> TopValues {
        let seen: u64 = self.items.iter().map(|i| i.1).sum::<u64>() + self.error;
        if seen > 0 && seen < total {
            let f = total as f64 / seen as f64;
            for item in &mut self.items {
                item.1 = ((item.1 as f64) * f).round() as u64;
            }
            self.error = ((self.error as f64) * f).round() as u64;
            self.sampled = true;
        }
        self
    }

    /// The summary of the union of `parts`: counts added, then cut back to [`TOP_COUNTERS`].
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a TopValues>) -> TopValues {
        let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut error = 0;
        let mut sampled = false;
        for p in parts {
            error += p.error;
            sampled |= p.sampled;
            for (v, c) in &p.items {
                *counts.entry(v.clone()).or_insert(0) += c;
            }
        }
        TopValues {
            sampled,
            ..TopValues::reduce(counts.into_iter().collect(), error)
        }
    }

    fn reduce(items: Vec<(String, u64)>, error: u64) -> TopValues {
        let (items, error) = reduce(items, error);
        TopValues {
            items,
            error,
            sampled: false,
        }
    }

    /// True when the summary holds every value of the column with its exact count.
    pub fn is_exact(&self) -> bool {
        self.error == 0 && !self.sampled && !self.items.iter().any(|(v, _)| v.len() > MAX_TOP_VALUE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    #[test]
    fn distinct_sketches_merge_to_the_union() {
        let a: ArrayRef = Arc::new(Int64Array::from_iter_values(0..6000));
        let b: ArrayRef = Arc::new(Int64Array::from_iter_values(4000..10000));
        let (da, db) = (Distinct::of(&a).unwrap(), Distinct::of(&b).unwrap());
        let merged = Distinct::merge([&da, &db]).unwrap().unwrap();
        let est = merged.estimate().unwrap() as f64;
        assert!((est - 10_000.0).abs() / 10_000.0 < 0.03, "{est}");
        let again = Distinct::from_bytes(merged.bytes()).unwrap();
        assert_eq!(again.estimate().unwrap(), merged.estimate().unwrap());
        assert!(Distinct::from_bytes(&[1, 2, 3]).is_err());
        let f: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![Some(1.5), Some(-0.0), Some(0.0), None, Some(1.5)]));
        assert_eq!(Distinct::of(&f).unwrap().estimate().unwrap(), 2);
        let s: ArrayRef = Arc::new(StringArray::from(vec![Some("x"), None, Some("y"), Some("x")]));
        assert_eq!(Distinct::of(&s).unwrap().estimate().unwrap(), 2);
    }

    #[test]
    fn quantiles_survive_their_byte_form() {
        let q = Quantiles::of((0..10_001).map(f64::from).collect()).unwrap();
        let back = Quantiles::from_bytes(&q.to_bytes()).unwrap();
        assert!((back.quantile(0.5) - 5000.0).abs() < 50.0);
        assert_eq!(back.quantile(0.99), q.quantile(0.99));
        assert!(Quantiles::from_bytes(&[0u8; 41]).is_err());
        let mut damaged = q.to_bytes();
        damaged[24..32].copy_from_slice(&(-1.0f64).to_le_bytes()); // max below min
        assert!(Quantiles::from_bytes(&damaged).is_err());
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(100);
        let top = TopValues::of([Some(long.as_str()), Some("short")].into_iter());
        let cut = &top.items.iter().find(|i| i.0 != "short").unwrap().0;
        assert!(cut.ends_with('…') && cut.len() <= MAX_TOP_VALUE_BYTES + '…'.len_utf8(), "{cut}");
        assert!(!top.is_exact());
    }

    #[test]
    fn top_values_are_exact_for_few_values_and_bounded_otherwise() {
        let few = TopValues::of(["a", "b", "a", "c", "a"].into_iter().map(Some));
        assert_eq!(few.items[0], ("a".to_string(), 3));
        assert!(few.is_exact());
        // Many values: the heavy one keeps a count within the error of the truth.
        let many: Vec<String> = (0..10_000).map(|i| if i % 3 == 0 { "hot".into() } else { format!("v{i}") }).collect();
        let halves: Vec<TopValues> = many.chunks(5000).map(|c| TopValues::of(c.iter().map(|s| Some(s.as_str())))).collect();
        let merged = TopValues::merge(&halves);
        let hot = merged.items.iter().find(|i| i.0 == "hot").unwrap().1;
        let truth = many.iter().filter(|s| *s == "hot").count() as u64;
        assert!(hot <= truth && truth - hot <= merged.error, "{hot} {truth} {}", merged.error);
        assert!(merged.error <= 10_000 / (TOP_COUNTERS as u64 + 1));
    }
}
