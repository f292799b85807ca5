//! Order-independent digests of a set of rows, for comparing what the stream wrote with what
//! a batch recompute gives: the row count, per column a wrapping sum of per-value hashes and a
//! null count, a wrapping sum of whole-row hashes (so values swapped between rows differ), and,
//! when the table declares a key, each key's row hash (so missing, extra and changed keys can
//! be named). Value hashes are DataFusion's own (`create_hashes`) under a seed drawn per run, so
//! collisions cannot be prepared in advance; a row's hash mixes its columns' hashes, each with
//! its position, through a non-linear finalizer (a sum of per-column hashes would let values
//! swapped between rows cancel out).

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// One column's digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ColumnDigest {
    /// Wrapping sum of the hashes of its non-null values.
    pub sum: u64,
    /// Nulls in it.
    pub nulls: u64,
}

/// The seed of one comparison's hashes: both sides of a comparison must share it.
#[derive(Debug, Clone)]
pub struct Seed(QualityRandomState);

impl Seed {
    /// A seed drawn at random.
    pub fn random() -> Seed {
        use std::hash::BuildHasher;
        Seed(QualityRandomState::with_seed(std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)))
    }
}

/// SplitMix64's finalizer: a bijective, non-linear mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stands for a null in a row's hash (a value's hash never needs to avoid it: it is mixed
/// with the column's position first).
const NULL_TAG: u64 = 0x6e75_6c6c_6e75_6c6c;

/// The digest of a multiset of rows.
#[derive(Debug, Clone, Default)]
pub struct Digest {
    /// Rows.
    pub rows: u64,
    /// Per column, by name.
    pub columns: BTreeMap<String, ColumnDigest>,
    /// Wrapping sum of whole-row hashes (columns in name order).
    pub row_sum: u64,
    /// Per key (its values as text, comma-separated): the wrapping sum of its rows' hashes and
    /// how many rows carry it. Empty when no key is declared.
    pub keys: HashMap<String, (u64, u32)>,
}

impl Digest {
    /// Adds `batch`'s rows under `seed`; `key` names the key columns (none: no per-key
    /// digests; key columns the batch does not hold, such as hive partition columns, are
    /// constant within a partition and left out).
    pub fn add(&mut self, batch: &RecordBatch, key: &[String], seed: &Seed) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        self.rows += n as u64;
        let schema = batch.schema();
        let mut by_name: Vec<(&str, &ArrayRef)> =
            schema.fields().iter().map(|f| f.name().as_str()).zip(batch.columns()).collect();
        by_name.sort_by(|a, b| a.0.cmp(b.0));
        let mut hashes = vec![0u64; n];
        let mut rows = vec![0u64; n];
        for (position, (name, col)) in by_name.iter().enumerate() {
            hashes.iter_mut().for_each(|h| *h = 0);
            create_hashes([*col], &seed.0, &mut hashes).map_err(hash_err)?;
            let d = self.columns.entry(name.to_string()).or_default();
            // The validity bitmap once per column (not a dynamic call per value).
            let nulls = col.logical_nulls().filter(|n| n.null_count() > 0);
            d.nulls += nulls.as_ref().map_or(0, |n| n.null_count()) as u64;
            let tag = (position as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            // Xor then multiply: carries make the fold non-linear across columns.
            let fold = |r: u64, v: u64| (r ^ v ^ tag).wrapping_mul(0xbf58_476d_1ce4_e5b9).rotate_left(29);
            match &nulls {
                // No nulls: branch-free loops the compiler can vectorise.
                None => {
                    d.sum = hashes.iter().fold(d.sum, |s, h| s.wrapping_add(*h));
                    rows.iter_mut().zip(&hashes).for_each(|(r, h)| *r = fold(*r, *h));
                }
                Some(valid) => {
                    for (i, (h, r)) in hashes.iter().zip(rows.iter_mut()).enumerate() {
                        let v = if valid.is_valid(i) {
                            d.sum = d.sum.wrapping_add(*h);
                            *h
                        } else {
                            NULL_TAG
                        };
                        *r = fold(*r, v);
                    }
                }
            }
        }
        for r in rows.iter_mut() {
            *r = mix(*r);
        }
        self.row_sum = rows.iter().fold(self.row_sum, |s, h| s.wrapping_add(*h));
        let key_cols: Vec<&ArrayRef> = key.iter().filter_map(|k| batch.column_by_name(k)).collect();
        if !key_cols.is_empty() {
            let opts = FormatOptions::default();
            let fmts = key_cols
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| EngineError::Internal(format!("formatting key values: {e}")))?;
            let value = |c: usize, i: usize| (!key_cols[c].is_null(i)).then(|| fmts[c].value(i).to_string());
            for (i, h) in rows.iter().enumerate() {
                // One column: its value (NULL for a null); several: a JSON array (unambiguous).
                let text = if fmts.len() == 1 {
                    value(0, i).unwrap_or_else(|| "NULL".to_string())
                } else {
                    serde_json::Value::from((0..fmts.len()).map(|c| value(c, i)).collect::<Vec<_>>()).to_string()
                };
                let e = self.keys.entry(text).or_default();
                e.0 = e.0.wrapping_add(*h);
                e.1 += 1;
            }
        }
        Ok(())
    }

    /// Adds `other`'s rows (digests of disjoint row sets merge by adding, under one seed).
    pub fn merge(&mut self, other: Digest) {
        self.rows += other.rows;
        self.row_sum = self.row_sum.wrapping_add(other.row_sum);
        for (name, c) in other.columns {
            let d = self.columns.entry(name).or_default();
            d.sum = d.sum.wrapping_add(c.sum);
            d.nulls += c.nulls;
        }
        for (k, (h, n)) in other.keys {
            let e = self.keys.entry(k).or_default();
            e.0 = e.0.wrapping_add(h);
            e.1 += n;
        }
    }

    /// The columns whose digests differ between `self` and `other` (present on one side only
    /// included), in name order.
    pub fn columns_differing(&self, other: &Digest) -> Vec<String> {
        let mut names: Vec<&String> = self.columns.keys().chain(other.columns.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| self.columns.get(*n) != other.columns.get(*n))
            .cloned()
            .collect()
    }

    /// True when both hold the same multiset of rows (up to hash collisions).
    pub fn same(&self, other: &Digest) -> bool {
        self.rows == other.rows && self.row_sum == other.row_sum && self.columns == other.columns
    }
}

/// Keys present in `batch` but not `stream` (missing from the stream), in `stream` but not
/// `batch` (extra in the stream), and in both with different rows (changed), each sorted.
pub fn key_differences(stream: &Digest, batch: &Digest) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut missing: Vec<String> = batch.keys.keys().filter(|k| !stream.keys.contains_key(*k)).cloned().collect();
    let mut extra: Vec<String> = stream.keys.keys().filter(|k| !batch.keys.contains_key(*k)).cloned().collect();
    let mut changed: Vec<String> = stream
        .keys
        .iter()
        .filter(|(k, v)| batch.keys.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k.clone())
        .collect();
    for keys in [&mut missing, &mut extra, &mut changed] {
        keys.sort_by(|a, b| key_order(a, b));
    }
    (missing, extra, changed)
}

/// Keys in reading order: numbers by value, other keys as text after them.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

fn hash_err(e: datafusion::error::DataFusionError) -> EngineError {
    EngineError::Internal(format!("hashing rows: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(ids: &[i64], amounts: &[Option<f64>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("amount", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(Float64Array::from(amounts.to_vec())),
            ],
        )
        .unwrap()
    }

    fn digest(batches: &[RecordBatch], key: &[String]) -> Digest {
        thread_local!(static SEED: Seed = Seed::random());
        let mut d = Digest::default();
        for b in batches {
            SEED.with(|s| d.add(b, key, s)).unwrap();
        }
        d
    }

    fn names(ids: &[i64], names: &[Option<&str>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(arrow::array::StringArray::from(names.to_vec()))],
        )
        .unwrap()
    }

    // A wrong join swaps text between rows: every column's multiset is unchanged, the rows are
    // not (a linear combination of per-column hashes would miss it).
    #[test]
    fn text_swapped_between_rows_differs() {
        let a = digest(&[names(&[1, 2, 3], &[Some("a"), Some("b"), None])], &[]);
        let b = digest(&[names(&[1, 2, 3], &[Some("b"), Some("a"), None])], &[]);
        let c = digest(&[names(&[1, 2, 3], &[Some("a"), None, Some("b")])], &[]);
        assert!(a.columns_differing(&b).is_empty() && !a.same(&b));
        assert!(a.columns_differing(&c).is_empty() && !a.same(&c));
        let again = digest(&[names(&[3, 1], &[None, Some("a")]), names(&[2], &[Some("b")])], &[]);
        assert!(a.same(&again));
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let s = |v: Vec<Option<&str>>| -> ArrayRef { Arc::new(arrow::array::StringArray::from(v)) };
        let batch = RecordBatch::try_new(schema, vec![s(vec![Some("x,y"), Some("x")]), s(vec![Some("z"), Some("y,z")])]).unwrap();
        let d = digest(&[batch], &["a".to_string(), "b".to_string(), "day".to_string()]);
        assert_eq!(d.keys.len(), 2, "{:?}", d.keys.keys().collect::<Vec<_>>());
    }

    #[test]
    fn order_and_batching_do_not_matter_values_do() {
        let key = vec!["id".to_string()];
        let a = digest(&[batch(&[1, 2, 3], &[Some(1.0), None, Some(3.0)])], &key);
        let b = digest(&[batch(&[3], &[Some(3.0)]), batch(&[2, 1], &[None, Some(1.0)])], &key);
        assert!(a.same(&b));
        assert!(a.columns_differing(&b).is_empty());

        // Values swapped between rows: column sums agree, row sums do not.
        let swapped = digest(&[batch(&[1, 2, 3], &[Some(3.0), None, Some(1.0)])], &key);
        assert!(!a.same(&swapped));
        assert!(a.columns_differing(&swapped).is_empty());
        assert_eq!(key_differences(&a, &swapped).2, vec!["1".to_string(), "3".to_string()]);

        // A changed value, a missing and an extra key.
        let c = digest(&[batch(&[1, 2, 4], &[Some(1.5), None, Some(3.0)])], &key);
        assert_eq!(a.columns_differing(&c), vec!["amount".to_string(), "id".to_string()]);
        let (missing, extra, changed) = key_differences(&a, &c);
        assert_eq!((missing, extra, changed), (vec!["4".into()], vec!["3".into()], vec!["1".into()]));

        // A duplicated row is a difference.
        let dup = digest(&[batch(&[1, 2, 3, 3], &[Some(1.0), None, Some(3.0), Some(3.0)])], &key);
        assert!(!a.same(&dup));
        assert_eq!(key_differences(&a, &dup).2, vec!["3".to_string()]);
    }
}
