//! Column profiles: what a micro-batch's Arrow arrays say about each column, computed in one
//! pass per column and **mergeable**, so the profile of an hour, a day or a whole table is the
//! merge of its batches' profiles, never a re-read of the data.
//!
//! By type (the rest of the columns get rows and nulls only):
//! - integers, floats, decimals, dates and timestamps: min, max, sum, mean, M2 (variance =
//!   M2 / (n − 1), merged with Chan's formula), a t-digest for quantiles; floats also count NaN
//!   and ±infinity, which stay out of the other figures;
//! - strings and binary: min, max and total length in bytes, empty values, and (strings) the
//!   most frequent values;
//! - booleans: true count;
//! - timestamps: freshness (commit time minus the newest value), for the batch that commits;
//! - every type: an approximate distinct count (HyperLogLog).
//!
//! Counts, min, max and lengths merge exactly; sums, means and M2 are floating point (equal to
//! the figures of the concatenated data within rounding); distinct, quantiles and top values
//! within their sketches' stated error ([`crate::quality::sketch`]).
//!
//! Cost: every figure but two reads every row in a tight loop (or an arrow kernel). The two that
//! would cost a sort or a hash map per row, the quantile digest and the frequent values, are
//! built from a systematic sample of at most [`SAMPLE`] values per batch, their weights scaled to
//! the batch; a batch that small is read whole (exact). This keeps profiling within the ≤ 10% of
//! pipeline CPU the benchmark checks.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::quality::sketch::{Distinct, Quantiles, TopValues};

/// Which side of the transform a profile describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The source's decoded records, before the SQL.
    Source,
    /// The rows committed to the sink, after the SQL.
    Sink,
}

impl Side {
    /// The name used in profile files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Sink => "sink",
        }
    }
}

/// How a column is profiled, by its Arrow type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Integers (signed, and unsigned up to 32 bits), dates and timestamps: exact i64 extremes.
    Integer,
    /// Floats, decimals and u64: f64 extremes, NaN and infinity counted apart.
    Float,
    /// Text.
    Text,
    /// Bytes.
    Binary,
    /// Booleans.
    Boolean,
    /// Anything else (lists, structs): rows and nulls only.
    Other,
}

impl Kind {
    /// The kind of a column of `t`.
    pub fn of(t: &DataType) -> Kind {
        match t {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _) => Kind::Integer,
            DataType::UInt64
            | DataType::Float16
            | DataType::Float32
            | DataType::Float64
            | DataType::Decimal32(_, _)
            | DataType::Decimal64(_, _)
            | DataType::Decimal128(_, _)
            | DataType::Decimal256(_, _) => Kind::Float,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
                Kind::Binary
            }
            DataType::Boolean => Kind::Boolean,
            _ => Kind::Other,
        }
    }
}

/// The profile of one column over some rows (one batch, or the merge of many).
#[derive(Debug, Clone, Default)]
pub struct ColumnProfile {
    /// Column name.
    pub column: String,
    /// Arrow type, display form.
    pub data_type: String,
    /// Rows seen.
    pub rows: u64,
    /// Nulls among them.
    pub nulls: u64,
    /// Smallest value (integers, dates, timestamps in their stored unit).
    pub min_int: Option<i64>,
    /// Largest value (integers, dates, timestamps in their stored unit).
    pub max_int: Option<i64>,
    /// Smallest finite value (floats).
    pub min_float: Option<f64>,
    /// Largest finite value (floats).
    pub max_float: Option<f64>,
    /// Values in the moments below (non-null, finite).
    pub moments_n: u64,
    /// Sum of those values.
    pub sum: Option<f64>,
    /// Their mean.
    pub mean: Option<f64>,
    /// Sum of squared differences from the mean (variance = m2 / (n − 1)).
    pub m2: Option<f64>,
    /// NaN values (floats).
    pub nan: u64,
    /// ±infinity values (floats).
    pub infinite: u64,
    /// Shortest value, in bytes (UTF-8 for text).
    pub min_len: Option<u64>,
    /// Longest value.
    pub max_len: Option<u64>,
    /// Total length of the non-null values.
    pub sum_len: u64,
    /// Empty values (text and binary).
    pub empty: u64,
    /// True values (booleans).
    pub true_count: Option<u64>,
    /// Distinct-count sketch.
    pub distinct: Option<Distinct>,
    /// Quantile sketch (numbers, dates, timestamps).
    pub quantiles: Option<Quantiles>,
    /// Most frequent values (text).
    pub top: Option<TopValues>,
    /// Milliseconds from the newest timestamp to the commit (timestamps; set when committing).
    pub freshness_ms: Option<i64>,
}

impl ColumnProfile {
    /// A profile of `parts` (one column) with only its rows and nulls counted yet.
    fn counted(name: &str, data_type: &DataType, parts: &[ArrayRef]) -> ColumnProfile {
        ColumnProfile {
            column: name.to_string(),
            data_type: data_type.to_string(),
            rows: parts.iter().map(|a| a.len() as u64).sum(),
            nulls: parts.iter().map(|a| a.null_count() as u64).sum(),
            ..Default::default()
        }
    }

    /// The estimated distinct count (0 without a sketch).
    pub fn distinct_estimate(&self) -> u64 {
        match &self.distinct {
            Some(d) => d.estimate().unwrap_or(0),
            None if self.true_count.is_some() => {
                let t = self.true_count.unwrap_or(0);
                u64::from(t > 0) + u64::from(self.rows - self.nulls - t > 0)
            }
            None => 0,
        }
    }

    /// Records the moments of `n` finite values: their sum, mean and sum of squared deviations.
    fn set_moments(&mut self, n: usize, sum: f64, mean: f64, m2: f64) {
        self.moments_n = n as u64;
        self.sum = Some(sum);
        self.mean = Some(mean);
        self.m2 = Some(m2);
    }

    /// Sample variance (n − 1), when there are two values or more.
    pub fn variance(&self) -> Option<f64> {
        (self.moments_n > 1).then(|| self.m2.unwrap_or(0.0) / (self.moments_n - 1) as f64)
    }

    /// The fraction of rows that are null (0 for no rows).
    pub fn null_fraction(&self) -> f64 {
        if self.rows == 0 { 0.0 } else { self.nulls as f64 / self.rows as f64 }
    }

    /// Mean length of the non-null values (text and binary).
    pub fn mean_len(&self) -> Option<f64> {
        let n = self.rows - self.nulls;
        (self.min_len.is_some() && n > 0).then(|| self.sum_len as f64 / n as f64)
    }

    /// The estimated `q`-quantile (numbers, dates, timestamps).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantiles.as_ref().map(|d| d.quantile(q))
    }
}

/// Profiles every column of `batches` (one schema), in schema order. The batches are read as
/// they are (no concatenated copy).
pub fn profile_batches(batches: &[RecordBatch], schema: &arrow::datatypes::Schema) -> Result<Vec<ColumnProfile>> {
    let mut out = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let parts: Vec<ArrayRef> = batches.iter().map(|b| b.column(i).clone()).filter(|a| !a.is_empty()).collect();
        out.push(profile_column(field.name(), field.data_type(), &parts)?);
    }
    Ok(out)
}

/// The exact figures only (rows, nulls, min, max, NaN/infinity and true counts) of every
/// column: no sketches, no moments, no text lengths; one tight pass per numeric column. The
/// source side's default (`quality.profile` = `on`).
pub fn exact_figures(batches: &[RecordBatch], schema: &arrow::datatypes::Schema) -> Result<Vec<ColumnProfile>> {
    let mut out = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let parts: Vec<ArrayRef> = batches.iter().map(|b| b.column(i).clone()).filter(|a| !a.is_empty()).collect();
        let mut p = ColumnProfile::counted(field.name(), field.data_type(), &parts);
        if p.rows > p.nulls {
            match Kind::of(field.data_type()) {
                Kind::Integer => {
                    for part in &parts {
                        let ints = as_i64(part)?;
                        let ints = ints.as_primitive::<Int64Type>();
                        p.min_int = min_opt(p.min_int, arrow::compute::min(ints));
                        p.max_int = max_opt(p.max_int, arrow::compute::max(ints));
                    }
                }
                Kind::Float => {
                    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                    for part in &parts {
                        let floats = arrow::compute::cast(part, &DataType::Float64)?;
                        let (l, h, nan, inf) = fold_valid(
                            floats.as_primitive::<Float64Type>(),
                            (f64::INFINITY, f64::NEG_INFINITY, 0u64, 0u64),
                            |(l, h, nan, inf), v| {
                                if v.is_finite() {
                                    (l.min(v), h.max(v), nan, inf)
                                } else {
                                    (l, h, nan + u64::from(v.is_nan()), inf + u64::from(v.is_infinite()))
                                }
                            },
                        );
                        (lo, hi) = (lo.min(l), hi.max(h));
                        p.nan += nan;
                        p.infinite += inf;
                    }
                    if lo <= hi {
                        p.min_float = Some(lo);
                        p.max_float = Some(hi);
                    }
                }
                // Text lengths are a full pass over every value: left to the sink's full profile.
                Kind::Text => {}
                Kind::Boolean => p.true_count = Some(parts.iter().map(|a| a.as_boolean().true_count() as u64).sum()),
                Kind::Binary | Kind::Other => {}
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// Values a batch's quantile digest and frequent-values summary are built from, at most: a
/// systematic sample of the non-null values (weights scaled to the whole batch). Every other
/// figure reads every row.
pub const SAMPLE: usize = 4096;

/// Every `step`-th value so that at most [`SAMPLE`] of `n` remain.
fn sample_step(n: usize) -> usize {
    n.div_ceil(SAMPLE).max(1)
}

/// Profiles one column, its rows split over `parts` (all of type `data_type`).
pub fn profile_column(name: &str, data_type: &DataType, parts: &[ArrayRef]) -> Result<ColumnProfile> {
    let mut p = ColumnProfile::counted(name, data_type, parts);
    if p.rows == p.nulls {
        return Ok(p);
    }
    match Kind::of(data_type) {
        Kind::Integer => {
            let ints: Vec<ArrayRef> = parts.iter().map(as_i64).collect::<Result<_>>()?;
            let ints: Vec<&arrow::array::Int64Array> = ints.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
            for a in &ints {
                p.min_int = min_opt(p.min_int, arrow::compute::min(*a));
                p.max_int = max_opt(p.max_int, arrow::compute::max(*a));
            }
            // Sum, then squared deviations from the mean: two tight passes over the values.
            let n = (p.rows - p.nulls) as usize;
            let sum: f64 = ints.iter().map(|a| fold_valid(a, 0.0, |acc, v| acc + v as f64)).sum();
            let mean = sum / n as f64;
            let m2: f64 = ints.iter().map(|a| fold_valid(a, 0.0, |acc, v| acc + (v as f64 - mean) * (v as f64 - mean))).sum();
            p.set_moments(n, sum, mean, m2);
            let mut sampler = Sampler::new(n);
            let mut sample = Vec::with_capacity(n.min(SAMPLE) + 1);
            for a in &ints {
                sampler.take(a, |v| v as f64, |_| true, true, &mut sample);
            }
            p.quantiles = digest(sample, n, p.min_int.map(|v| v as f64), p.max_int.map(|v| v as f64));
            p.distinct = Distinct::of_parts(parts);
        }
        Kind::Float => {
            let floats: Vec<ArrayRef> =
                parts.iter().map(|a| arrow::compute::cast(a, &DataType::Float64)).collect::<Result<_, _>>()?;
            let floats: Vec<&arrow::array::Float64Array> = floats.iter().map(|a| a.as_primitive::<Float64Type>()).collect();
            let (mut lo, mut hi, mut n, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0usize, 0.0f64);
            for a in &floats {
                let (l, h, k, s) = fold_valid(a, (f64::INFINITY, f64::NEG_INFINITY, 0usize, 0.0f64), |(l, h, k, s), v| {
                    if v.is_finite() { (l.min(v), h.max(v), k + 1, s + v) } else { (l, h, k, s) }
                });
                (lo, hi, n, sum) = (lo.min(l), hi.max(h), n + k, sum + s);
            }
            let present = (p.rows - p.nulls) as usize;
            if n < present {
                for a in &floats {
                    for v in a.iter().flatten() {
                        if v.is_nan() {
                            p.nan += 1;
                        } else if v.is_infinite() {
                            p.infinite += 1;
                        }
                    }
                }
            }
            if n > 0 {
                let mean = sum / n as f64;
                let m2: f64 = floats
                    .iter()
                    .map(|a| fold_valid(a, 0.0, |acc, v| if v.is_finite() { acc + (v - mean) * (v - mean) } else { acc }))
                    .sum();
                p.min_float = Some(lo);
                p.max_float = Some(hi);
                p.set_moments(n, sum, mean, m2);
                let mut sampler = Sampler::new(n);
                let mut sample = Vec::with_capacity(n.min(SAMPLE) + 1);
                for a in &floats {
                    sampler.take(a, |v| v, |v| v.is_finite(), n == present, &mut sample);
                }
                p.quantiles = digest(sample, n, p.min_float, p.max_float);
            }
            p.distinct = Distinct::of_parts(parts);
        }
        Kind::Text => {
            let present = (p.rows - p.nulls) as usize;
            let step = sample_step(present);
            let mut sample: Vec<&str> = Vec::with_capacity(present.min(SAMPLE) + 1);
            let mut lens = Lengths::default();
            for part in parts {
                text_lengths(part, &mut lens);
            }
            let mut sampler = Sampler::new(present);
            for part in parts {
                match data_type {
                    DataType::Utf8 => sampler.text(part.as_string::<i32>(), &mut sample),
                    DataType::LargeUtf8 => sampler.text(part.as_string::<i64>(), &mut sample),
                    _ => sampler.text(part.as_string_view(), &mut sample),
                }
            }
            lens.set(&mut p);
            let top = TopValues::of(sample.into_iter().map(Some));
            p.top = Some(if step == 1 { top } else { top.scaled(present as u64) });
            p.distinct = Distinct::of_parts(parts);
        }
        Kind::Binary => {
            let mut lens = Lengths::default();
            for part in parts {
                let bin = arrow::compute::cast(part, &DataType::LargeBinary)?;
                for b in bin.as_binary::<i64>().iter().flatten() {
                    lens.add(b.len() as u64);
                }
            }
            lens.set(&mut p);
            p.distinct = Distinct::of_parts(parts);
        }
        Kind::Boolean => {
            p.true_count = Some(parts.iter().map(|a| a.as_boolean().true_count() as u64).sum());
        }
        Kind::Other => {}
    }
    Ok(p)
}

/// Integers, dates and timestamps as i64 (their stored unit).
fn as_i64(array: &ArrayRef) -> Result<ArrayRef> {
    Ok(match array.data_type() {
        DataType::Int64 => array.clone(),
        DataType::Date32 => arrow::compute::cast(&arrow::compute::cast(array, &DataType::Int32)?, &DataType::Int64)?,
        _ => arrow::compute::cast(array, &DataType::Int64)?,
    })
}

/// Folds the valid values of a primitive array (a tight loop over the values when it has no
/// nulls).
fn fold_valid<T, A>(a: &arrow::array::PrimitiveArray<T>, init: A, f: impl Fn(A, T::Native) -> A) -> A
where
    T: arrow::datatypes::ArrowPrimitiveType,
{
    match a.nulls() {
        None => a.values().iter().fold(init, |acc, v| f(acc, *v)),
        Some(_) => a.iter().flatten().fold(init, f),
    }
}

/// The t-digest of `sample` (every k-th of `n` values), its weights scaled to all of them,
/// with the exact extremes.
fn digest(sample: Vec<f64>, n: usize, min: Option<f64>, max: Option<f64>) -> Option<Quantiles> {
    if sample.len() >= n {
        return Quantiles::of(sample);
    }
    let scale = n as f64 / sample.len() as f64;
    Quantiles::of(sample)?.scaled(scale, min?, max?)
}

/// Lengths (in bytes) of the non-null values of a text array, read from its offsets or views.
fn text_lengths(part: &ArrayRef, lens: &mut Lengths) {
    let nulls = part.logical_nulls();
    match part.data_type() {
        DataType::Utf8 => lens.add_iter(part.as_string::<i32>().offsets().windows(2).map(|w| (w[1] - w[0]) as u64), nulls.as_ref()),
        DataType::LargeUtf8 => {
            lens.add_iter(part.as_string::<i64>().offsets().windows(2).map(|w| (w[1] - w[0]) as u64), nulls.as_ref())
        }
        // A view's low 32 bits are its length.
        _ if nulls.is_none() => lens.add_views(part.as_string_view().views()),
        _ => lens.add_iter(part.as_string_view().views().iter().map(|v| u64::from(*v as u32)), nulls.as_ref()),
    }
}

/// A systematic sample across consecutive arrays: every `step`-th kept value, counted by a
/// countdown (no division per value), jumping straight to the sampled rows of an array without
/// nulls when every value is kept.
struct Sampler {
    step: usize,
    /// Kept values to skip before the next sampled one.
    skip: usize,
}

impl Sampler {
    fn new(n: usize) -> Sampler {
        Sampler {
            step: sample_step(n),
            skip: 0,
        }
    }

    /// Samples the values of `a` that pass `keep`, converted by `conv`.
    fn take<T, O>(
        &mut self,
        a: &arrow::array::PrimitiveArray<T>,
        conv: impl Fn(T::Native) -> O,
        keep: impl Fn(T::Native) -> bool,
        all_kept: bool,
        out: &mut Vec<O>,
    ) where
        T: arrow::datatypes::ArrowPrimitiveType,
    {
        if a.null_count() == 0 && all_kept {
            // No nulls and nothing refused: jump straight to the sampled rows.
            let values = a.values();
            let mut i = self.skip;
            while i < values.len() {
                out.push(conv(values[i]));
                i += self.step;
            }
            self.skip = i - values.len();
            return;
        }
        for v in a.iter().flatten().filter(|v| keep(*v)) {
            if self.skip == 0 {
                out.push(conv(v));
                self.skip = self.step - 1;
            } else {
                self.skip -= 1;
            }
        }
    }

    /// Samples the non-null values of a text array.
    fn text<'a, A>(&mut self, array: A, out: &mut Vec<&'a str>)
    where
        A: arrow::array::StringArrayType<'a> + Copy,
    {
        let n = array.len();
        if array.null_count() == 0 {
            let mut i = self.skip;
            while i < n {
                out.push(array.value(i));
                i += self.step;
            }
            // Rows of this array left before the next sample: carried to the next array.
            self.skip = i - n;
            return;
        }
        for i in 0..n {
            if array.is_valid(i) {
                if self.skip == 0 {
                    out.push(array.value(i));
                    self.skip = self.step - 1;
                } else {
                    self.skip -= 1;
                }
            }
        }
    }
}

/// Running length figures.
struct Lengths {
    min: u64,
    max: u64,
    sum: u64,
    empty: u64,
}

impl Default for Lengths {
    fn default() -> Self {
        Lengths {
            min: u64::MAX,
            max: 0,
            sum: 0,
            empty: 0,
        }
    }
}

impl Lengths {
    /// Adds the lengths of string views with no nulls: one pass over their low 32 bits.
    fn add_views(&mut self, views: &[u128]) {
        let (mut min, mut max, mut sum, mut empty) = (u32::MAX, 0u32, 0u64, 0u64);
        for v in views {
            let l = *v as u32;
            min = min.min(l);
            max = max.max(l);
            sum += u64::from(l);
            empty += u64::from(l == 0);
        }
        if !views.is_empty() {
            self.min = self.min.min(u64::from(min));
            self.max = self.max.max(u64::from(max));
        }
        self.sum += sum;
        self.empty += empty;
    }

    /// Adds the lengths of the valid rows, in one pass without a copy.
    fn add_iter(&mut self, lens: impl Iterator<Item = u64>, nulls: Option<&arrow::buffer::NullBuffer>) {
        let (mut min, mut max, mut sum, mut empty) = (self.min, self.max, self.sum, self.empty);
        match nulls {
            None => {
                for l in lens {
                    min = min.min(l);
                    max = max.max(l);
                    sum += l;
                    empty += u64::from(l == 0);
                }
            }
            Some(n) => {
                for (i, l) in lens.enumerate() {
                    if n.is_valid(i) {
                        min = min.min(l);
                        max = max.max(l);
                        sum += l;
                        empty += u64::from(l == 0);
                    }
                }
            }
        }
        (self.min, self.max, self.sum, self.empty) = (min, max, sum, empty);
    }

    #[inline]
    fn add(&mut self, l: u64) {
        self.min = self.min.min(l);
        self.max = self.max.max(l);
        self.sum += l;
        self.empty += u64::from(l == 0);
    }

    fn set(&self, p: &mut ColumnProfile) {
        if self.min != u64::MAX {
            p.min_len = Some(self.min);
            p.max_len = Some(self.max);
        }
        p.sum_len = self.sum;
        p.empty = self.empty;
    }
}

fn min_opt<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y < x { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y > x { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The profile of the union of `parts` (profiles of one column over disjoint rows).
pub fn merge(parts: &[&ColumnProfile]) -> Result<ColumnProfile> {
    let Some(first) = parts.first() else {
        return Ok(ColumnProfile::default());
    };
    let mut m = ColumnProfile {
        column: first.column.clone(),
        data_type: first.data_type.clone(),
        ..Default::default()
    };
    for p in parts {
        m.rows += p.rows;
        m.nulls += p.nulls;
        m.min_int = min_opt(m.min_int, p.min_int);
        m.max_int = max_opt(m.max_int, p.max_int);
        m.min_float = min_opt(m.min_float, p.min_float);
        m.max_float = max_opt(m.max_float, p.max_float);
        m.nan += p.nan;
        m.infinite += p.infinite;
        m.min_len = min_opt(m.min_len, p.min_len);
        m.max_len = max_opt(m.max_len, p.max_len);
        m.sum_len += p.sum_len;
        m.empty += p.empty;
        m.true_count = match (m.true_count, p.true_count) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        // Chan et al.: combine (n, mean, M2) pairwise.
        if p.moments_n > 0 {
            let (na, nb) = (m.moments_n as f64, p.moments_n as f64);
            let (ma, mb) = (m.mean.unwrap_or(0.0), p.mean.unwrap_or(0.0));
            let n = na + nb;
            let delta = mb - ma;
            m.mean = Some(ma + delta * nb / n);
            m.m2 = Some(m.m2.unwrap_or(0.0) + p.m2.unwrap_or(0.0) + delta * delta * na * nb / n);
            m.sum = Some(m.sum.unwrap_or(0.0) + p.sum.unwrap_or(0.0));
            m.moments_n += p.moments_n;
        }
        m.freshness_ms = match (m.freshness_ms, p.freshness_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    m.distinct = Distinct::merge(parts.iter().filter_map(|p| p.distinct.as_ref()))?;
    m.quantiles = Quantiles::merge(parts.iter().filter_map(|p| p.quantiles.as_ref()));
    let tops: Vec<&TopValues> = parts.iter().filter_map(|p| p.top.as_ref()).collect();
    m.top = (!tops.is_empty()).then(|| TopValues::merge(tops));
    Ok(m)
}

/// Sets each timestamp column's freshness: `now` minus its newest value, in milliseconds.
pub fn set_freshness(profiles: &mut [ColumnProfile], schema: &arrow::datatypes::Schema, now: chrono::DateTime<chrono::Utc>) {
    for (p, f) in profiles.iter_mut().zip(schema.fields()) {
        if let (DataType::Timestamp(unit, _), Some(max)) = (f.data_type(), p.max_int) {
            let newest_ms = match unit {
                TimeUnit::Second => max.saturating_mul(1000),
                TimeUnit::Millisecond => max,
                TimeUnit::Microsecond => max / 1000,
                TimeUnit::Nanosecond => max / 1_000_000,
            };
            p.freshness_ms = Some(now.timestamp_millis().saturating_sub(newest_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::quality::store;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("i", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("all_null", DataType::Int64, true),
        ]))
    }

    /// A batch of `n` rows with nulls, NaN, ±infinity, extremes and non-ASCII text.
    fn batch(rng: &mut Rng, n: usize) -> RecordBatch {
        let words = ["", "a", "héllo", "日本語", "x y", "🚀🚀", "zzz"];
        let i: Int64Array = (0..n)
            .map(|_| match rng.below(20) {
                0 => None,
                1 => Some(i64::MAX / 4),
                2 => Some(i64::MIN / 4),
                _ => Some(rng.below(1000) as i64 - 500),
            })
            .collect();
        let f: Float64Array = (0..n)
            .map(|_| match rng.below(25) {
                0 => None,
                1 => Some(f64::NAN),
                2 => Some(f64::INFINITY),
                3 => Some(f64::NEG_INFINITY),
                4 => Some(1e300),
                _ => Some(rng.below(1_000_000) as f64 / 7.0),
            })
            .collect();
        let s: StringArray = (0..n)
            .map(|_| match rng.below(10) {
                0 => None,
                k => Some(words[(k as usize + rng.below(3) as usize) % words.len()].to_string()),
            })
            .collect();
        let b: BooleanArray = (0..n).map(|_| (rng.below(5) != 0).then(|| rng.below(2) == 0)).collect();
        let t: TimestampMicrosecondArray = (0..n).map(|_| (rng.below(9) != 0).then(|| rng.below(1 << 40) as i64)).collect();
        let all_null = Int64Array::from(vec![None::<i64>; n]);
        RecordBatch::try_new(
            schema(),
            vec![Arc::new(i), Arc::new(f), Arc::new(s), Arc::new(b), Arc::new(t), Arc::new(all_null)],
        )
        .unwrap()
    }

    /// Equal within rounding: floating sums are exact only up to about n·ε times the largest
    /// magnitude summed (`scale`), whatever the order.
    fn close_at(a: Option<f64>, b: Option<f64>, scale: f64) -> bool {
        match (a, b) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0) + 1e-10 * scale,
            (None, None) => true,
            _ => false,
        }
    }

    /// Every exact figure against a naive computation over the rows.
    fn check_against_naive(p: &[ColumnProfile], batches: &[RecordBatch]) {
        let all = arrow::compute::concat_batches(&schema(), batches).unwrap();
        let ints = all.column(0).as_primitive::<Int64Type>();
        let vals: Vec<i64> = ints.iter().flatten().collect();
        assert_eq!(p[0].rows, all.num_rows() as u64);
        assert_eq!(p[0].nulls, (all.num_rows() - vals.len()) as u64);
        assert_eq!(p[0].min_int, vals.iter().copied().min());
        assert_eq!(p[0].max_int, vals.iter().copied().max());
        let naive_mean = (!vals.is_empty()).then(|| vals.iter().map(|v| *v as f64).sum::<f64>() / vals.len() as f64);
        let scale = vals.iter().map(|v| (*v as f64).abs()).fold(0.0, f64::max);
        assert!(close_at(p[0].mean, naive_mean, scale), "{:?} {:?}", p[0].mean, naive_mean);
        if vals.len() > 1 {
            let m = naive_mean.unwrap();
            let var = vals.iter().map(|v| (*v as f64 - m).powi(2)).sum::<f64>() / (vals.len() - 1) as f64;
            assert!(close_at(p[0].variance(), Some(var), scale * scale), "{:?} {var}", p[0].variance());
        }
        let floats: Vec<f64> = all.column(1).as_primitive::<Float64Type>().iter().flatten().collect();
        assert_eq!(p[1].nan, floats.iter().filter(|v| v.is_nan()).count() as u64);
        assert_eq!(p[1].infinite, floats.iter().filter(|v| v.is_infinite()).count() as u64);
        let finite: Vec<f64> = floats.iter().copied().filter(|v| v.is_finite()).collect();
        assert_eq!(p[1].moments_n, finite.len() as u64);
        assert_eq!(p[1].min_float, finite.iter().copied().reduce(f64::min));
        let mut bits: Vec<u64> = floats.iter().map(|v| if v.is_nan() { f64::NAN.to_bits() } else { v.to_bits() }).collect();
        bits.sort_unstable();
        bits.dedup();
        let est = p[1].distinct_estimate() as f64;
        assert!((est - bits.len() as f64).abs() <= 0.05 * bits.len() as f64 + 1.0, "{est} vs {}", bits.len());
        assert_eq!(p[1].max_float, finite.iter().copied().reduce(f64::max));
        let strs: Vec<&str> = all.column(2).as_string::<i32>().iter().flatten().collect();
        assert_eq!(p[2].nulls, (all.num_rows() - strs.len()) as u64);
        assert_eq!(p[2].min_len, strs.iter().map(|s| s.len() as u64).min());
        assert_eq!(p[2].max_len, strs.iter().map(|s| s.len() as u64).max());
        assert_eq!(p[2].sum_len, strs.iter().map(|s| s.len() as u64).sum::<u64>());
        assert_eq!(p[2].empty, strs.iter().filter(|s| s.is_empty()).count() as u64);
        let top = p[2].top.as_ref().unwrap();
        if strs.len() <= SAMPLE {
            assert!(top.is_exact(), "7 distinct values fit the counters");
            for (v, c) in &top.items {
                assert_eq!(*c, strs.iter().filter(|s| *s == v).count() as u64, "{v}");
            }
        } else {
            // Sampled: every one of the few values is found, counts near the truth.
            let mut values: Vec<&str> = top.items.iter().map(|i| i.0.as_str()).collect();
            values.sort_unstable();
            let mut truth = strs.clone();
            truth.sort_unstable();
            truth.dedup();
            assert_eq!(values, truth);
            for (v, c) in &top.items {
                let exact = strs.iter().filter(|s| *s == v).count() as f64;
                assert!((*c as f64 - exact).abs() <= 0.1 * exact + 50.0, "{v}: {c} vs {exact}");
            }
        }
        let mut distinct: Vec<&str> = strs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(p[2].distinct_estimate(), distinct.len() as u64);
        let bools: Vec<bool> = all.column(3).as_boolean().iter().flatten().collect();
        assert_eq!(p[3].true_count, Some(bools.iter().filter(|b| **b).count() as u64));
        let ts: Vec<i64> = all.column(4).as_primitive::<arrow::datatypes::TimestampMicrosecondType>().iter().flatten().collect();
        assert_eq!(p[4].max_int, ts.iter().copied().max());
        assert_eq!(p[5].nulls, all.num_rows() as u64);
        assert_eq!(p[5].min_int, None);
        assert_eq!(p[5].distinct_estimate(), 0);
        // Quantiles: within the digest's error of the exact rank.
        if let Some(q) = p[0].quantile(0.5) {
            let below = vals.iter().filter(|v| (**v as f64) <= q).count() as f64 / vals.len() as f64;
            assert!((below - 0.5).abs() < 0.05, "median {q} has rank {below}");
        }
    }

    #[test]
    fn profiles_match_a_naive_reference_and_merge_like_the_concatenation() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for round in 0..30 {
            let batches: Vec<RecordBatch> = (0..1 + rng.below(5))
                .map(|k| {
                    let n = if k == 1 { 0 } else { rng.below(3000) as usize };
                    batch(&mut rng, n)
                })
                .collect();
            let each: Vec<Vec<ColumnProfile>> =
                batches.iter().map(|b| profile_batches(std::slice::from_ref(b), &schema()).unwrap()).collect();
            let whole = profile_batches(&batches, &schema()).unwrap();
            check_against_naive(&whole, &batches);
            let merged: Vec<ColumnProfile> = (0..schema().fields().len())
                .map(|c| merge(&each.iter().map(|p| &p[c]).collect::<Vec<_>>()).unwrap())
                .collect();
            check_against_naive(&merged, &batches);
            for (m, w) in merged.iter().zip(&whole) {
                assert_eq!((m.rows, m.nulls, m.min_int, m.max_int), (w.rows, w.nulls, w.min_int, w.max_int), "round {round}");
                assert_eq!((m.min_float, m.max_float, m.nan, m.infinite), (w.min_float, w.max_float, w.nan, w.infinite));
                assert_eq!((m.min_len, m.max_len, m.sum_len, m.empty, m.true_count), (w.min_len, w.max_len, w.sum_len, w.empty, w.true_count));
                let scale = m.min_int.map_or(0.0, |v| (v as f64).abs()).max(m.max_int.map_or(0.0, |v| (v as f64).abs()))
                    .max(m.min_float.map_or(0.0, f64::abs)).max(m.max_float.map_or(0.0, f64::abs));
                assert!(close_at(m.mean, w.mean, scale) && close_at(m.sum, w.sum, scale * 20_000.0), "{} {:?} {:?}", m.column, m.mean, w.mean);
                // HLL registers merge to exactly the registers of the whole.
                assert_eq!(m.distinct, w.distinct, "{}", m.column);
                if m.rows - m.nulls <= SAMPLE as u64 {
                    assert_eq!(m.top, w.top, "{}", m.column);
                }
            }
            // The stored form gives back the same profiles.
            let rows: Vec<store::ProfileRow> = merged
                .iter()
                .map(|p| store::ProfileRow {
                    epoch: round,
                    pipeline: "p".into(),
                    side: Side::Sink,
                    table: "t".into(),
                    committed_at_us: 1,
                    profile: p.clone(),
                })
                .collect();
            let back = store::decode(store::encode(&rows).unwrap()).unwrap();
            for (a, b) in back.iter().zip(&merged) {
                assert_eq!((a.profile.rows, a.profile.min_int, a.profile.max_float), (b.rows, b.min_int, b.max_float));
                assert_eq!(a.profile.distinct, b.distinct);
                assert_eq!(a.profile.top, b.top);
                assert_eq!(a.profile.quantile(0.9), b.quantile(0.9));
            }
        }
    }
}
