//! Reading a sink's committed profiles back: every profile file its commit log names, merged
//! per (side, table, column) — the profile of the whole table without re-reading its data.

use std::collections::BTreeMap;
use std::str::FromStr;

use arrow::datatypes::DataType;
use datafusion::scalar::ScalarValue;

use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::log::commit::CommitLog;
use crate::store::TableStore;
use crate::decode::nanos_per;
use crate::quality::profile::{ColumnProfile, merge};
use crate::quality::store::{ProfileRow, decode};

/// The merged profile of one column, in the plain figures people read.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColumnSummary {
    /// `source` or `sink`.
    pub side: String,
    /// The source or sink table.
    pub table: String,
    /// Column name.
    pub column: String,
    /// Arrow type.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Rows.
    pub rows: u64,
    /// Nulls.
    pub nulls: u64,
    /// nulls / rows.
    pub null_fraction: f64,
    /// Approximate distinct values.
    pub distinct: u64,
    /// Smallest value (text form).
    pub min: Option<String>,
    /// Largest value (text form).
    pub max: Option<String>,
    /// Mean of the finite values.
    pub mean: Option<f64>,
    /// Sample standard deviation.
    pub stddev: Option<f64>,
    /// Approximate median.
    pub p50: Option<f64>,
    /// Approximate 99th percentile.
    pub p99: Option<f64>,
    /// NaN values.
    pub nan: u64,
    /// ±infinity values.
    pub infinite: u64,
    /// Shortest, longest and mean length (text, binary).
    pub min_len: Option<u64>,
    /// Longest length.
    pub max_len: Option<u64>,
    /// Mean length.
    pub mean_len: Option<f64>,
    /// Empty values.
    pub empty: u64,
    /// True values (booleans).
    pub true_count: Option<u64>,
    /// Most frequent values with lower-bound counts (text).
    pub top_values: Vec<(String, u64)>,
    /// Freshness of the newest epoch, in milliseconds (timestamps).
    pub freshness_ms: Option<i64>,
}

/// A table's merged profile.
#[derive(Debug, Clone, Serialize)]
pub struct TableProfile {
    /// Epochs whose profiles were merged.
    pub epochs: usize,
    /// One entry per (side, table, column), source side first.
    pub columns: Vec<ColumnSummary>,
    /// Rows of the smallest committed batch on the sink side.
    pub min_batch_rows: Option<u64>,
}

/// Reads every committed profile file of `table` (all writers) and merges them.
pub async fn table_profile(table: &TableStore) -> Result<TableProfile> {
    let log = CommitLog::new(table.clone(), "sluice-quality-reader");
    let entries = log.entries().await?;
    let mut rows: Vec<ProfileRow> = Vec::new();
    let mut epochs = 0;
    let mut min_batch_rows = None;
    let mut newest_freshness: BTreeMap<(String, String, String), Option<i64>> = BTreeMap::new();
    for e in &entries {
        let Some(path) = e.quality.as_ref().and_then(|q| q.profile.as_deref()) else {
            continue;
        };
        let part = read_profile(table, path).await?;
        for r in &part {
            newest_freshness.insert(
                (r.side.as_str().to_string(), r.table.clone(), r.profile.column.clone()),
                r.profile.freshness_ms,
            );
        }
        if let Some(first) = part.iter().find(|r| r.side == crate::quality::profile::Side::Sink) {
            min_batch_rows = Some(min_batch_rows.map_or(first.profile.rows, |m: u64| m.min(first.profile.rows)));
        }
        rows.extend(part);
        epochs += 1;
    }
    let mut groups: BTreeMap<(u8, String, String), Vec<(usize, &ColumnProfile)>> = BTreeMap::new();
    let mut order: BTreeMap<(u8, String, String), usize> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let key = (r.side as u8, r.table.clone(), r.profile.column.clone());
        order.entry(key.clone()).or_insert(i);
        groups.entry(key).or_default().push((i, &r.profile));
    }
    let mut keyed: Vec<_> = groups.into_iter().collect();
    keyed.sort_by_key(|(k, _)| (k.0, order.get(k).copied().unwrap_or(0)));
    let mut columns = Vec::new();
    for ((side, table, column), parts) in keyed {
        let profiles: Vec<&ColumnProfile> = parts.into_iter().map(|(_, p)| p).collect();
        let mut m = merge(&profiles)?;
        let side = if side == 0 { "source" } else { "sink" };
        m.freshness_ms = newest_freshness
            .get(&(side.to_string(), table.clone(), column.clone()))
            .copied()
            .flatten();
        columns.push(summarize(side, &table, &m));
    }
    Ok(TableProfile {
        epochs,
        columns,
        min_batch_rows,
    })
}

/// The rows of one committed profile file.
async fn read_profile(table: &TableStore, path: &str) -> Result<Vec<ProfileRow>> {
    let get = table
        .store
        .get(&table.path(path))
        .await
        .map_err(EngineError::store(format!("reading profile {path}")))?;
    decode(get.bytes().await.map_err(EngineError::store(format!("reading profile {path}")))?)
}

/// The columns of one profile file, each summarized alone (the newest epoch's profile).
pub async fn summarize_rows(table: &TableStore, path: &str) -> Result<Vec<ColumnSummary>> {
    Ok(read_profile(table, path)
        .await?
        .iter()
        .map(|r| summarize(r.side.as_str(), &r.table, &r.profile))
        .collect())
}

/// The time unit of a timestamp column's type text (`Timestamp(Microsecond, None)`), if it is one.
fn time_unit(data_type: &str) -> Option<arrow::datatypes::TimeUnit> {
    match DataType::from_str(data_type) {
        Ok(DataType::Timestamp(unit, _)) => Some(unit),
        _ => None,
    }
}

/// A figure of a column of `data_type` (its mean or a quantile) as text: an RFC 3339 instant
/// for timestamp columns (their figures are counts of the column's unit), else the number.
pub fn figure(data_type: &str, v: f64) -> String {
    match time_unit(data_type) {
        Some(u) if v.is_finite() => {
            chrono::DateTime::from_timestamp_nanos((v * nanos_per(u) as f64) as i64).to_rfc3339()
        }
        _ if v.is_nan() => "-".into(),
        _ if v == v.trunc() && v.abs() < 1e15 => format!("{}", v as i64),
        _ => format!("{v:.4}"),
    }
}

/// A spread (a deviation) of a column of `data_type` as text: seconds for timestamp columns.
pub fn spread(data_type: &str, v: f64) -> String {
    match time_unit(data_type) {
        Some(u) if v.is_finite() => format!("{:.3}s", v * nanos_per(u) as f64 / 1e9),
        _ => figure("", v),
    }
}

fn summarize(side: &str, table: &str, p: &ColumnProfile) -> ColumnSummary {
    let unit = time_unit(&p.data_type);
    let text = |v: i64| match unit {
        Some(u) => chrono::DateTime::from_timestamp_nanos(v.saturating_mul(nanos_per(u))).to_rfc3339(),
        None => v.to_string(),
    };
    let (min, max) = if p.min_int.is_some() {
        (p.min_int.map(text), p.max_int.map(text))
    } else {
        (p.min_float.map(|v| v.to_string()), p.max_float.map(|v| v.to_string()))
    };
    ColumnSummary {
        side: side.to_string(),
        table: table.to_string(),
        column: p.column.clone(),
        data_type: p.data_type.clone(),
        rows: p.rows,
        nulls: p.nulls,
        null_fraction: p.null_fraction(),
        distinct: p.distinct_estimate(),
        min,
        max,
        mean: p.mean,
        stddev: p.variance().map(f64::sqrt),
        p50: p.quantile(0.5),
        p99: p.quantile(0.99),
        nan: p.nan,
        infinite: p.infinite,
        min_len: p.min_len,
        max_len: p.max_len,
        mean_len: p.mean_len(),
        empty: p.empty,
        true_count: p.true_count,
        top_values: p.top.as_ref().map(|t| t.items.iter().take(20).cloned().collect()).unwrap_or_default(),
        freshness_ms: p.freshness_ms,
    }
}

/// The profile of the committed files of one partition (`filter`: every `key=value` must
/// match), from their Parquet footers alone: rows, nulls, min and max per data column. Footer
/// statistics are exact for these and free to read; sketch figures (distinct, quantiles) are
/// per batch, not per partition, and are left out.
pub async fn partition_profile(table: &TableStore, filter: &[(String, String)]) -> Result<TableProfile> {
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    use parquet::file::metadata::ParquetMetaDataReader;

    let entries = CommitLog::new(table.clone(), "sluice-quality-reader").entries().await?;
    let files: Vec<_> = crate::log::commit::live_files(&entries)
        .into_iter()
        .filter(|f| {
            filter
                .iter()
                .all(|(k, v)| f.partition.iter().any(|(pk, pv)| pk == k && pv.as_deref() == Some(v.as_str())))
        })
        .collect();
    // Per column: rows, nulls, min, max (as scalars, compared by their own order).
    let mut acc: Vec<(String, String, u64, u64, Option<ScalarValue>, Option<ScalarValue>)> = Vec::new();
    let pq = |e: parquet::errors::ParquetError| EngineError::Internal(format!("reading a Parquet footer: {e}"));
    for f in &files {
        let meta = read_footer(table, &f.path, f.bytes).await?;
        let meta = ParquetMetaDataReader::decode_metadata(&meta).map_err(pq)?;
        let file_meta = meta.file_metadata();
        let schema = parquet::arrow::parquet_to_arrow_schema(file_meta.schema_descr(), file_meta.key_value_metadata())
            .map_err(pq)?;
        for field in schema.fields() {
            let conv = StatisticsConverter::try_new(field.name(), &schema, file_meta.schema_descr()).map_err(pq)?;
            let groups = meta.row_groups();
            let rows: u64 = conv.row_group_row_counts(groups).map_err(pq)?.map_or(0, |a| a.values().iter().sum());
            let nulls: u64 = conv.row_group_null_counts(groups).map_err(pq)?.iter().flatten().sum();
            let fold = |arr: arrow::array::ArrayRef, want_min: bool| -> Option<ScalarValue> {
                let mut best: Option<ScalarValue> = None;
                for i in 0..arr.len() {
                    let Ok(v) = ScalarValue::try_from_array(&arr, i) else { continue };
                    if v.is_null() {
                        continue;
                    }
                    let better = match &best {
                        None => true,
                        Some(b) => match v.partial_cmp(b) {
                            Some(std::cmp::Ordering::Less) => want_min,
                            Some(std::cmp::Ordering::Greater) => !want_min,
                            _ => false,
                        },
                    };
                    if better {
                        best = Some(v);
                    }
                }
                best
            };
            let (lo, hi) = (
                fold(conv.row_group_mins(groups).map_err(pq)?, true),
                fold(conv.row_group_maxes(groups).map_err(pq)?, false),
            );
            let slot = match acc.iter().position(|a| &a.0 == field.name()) {
                Some(i) => &mut acc[i],
                None => {
                    acc.push((field.name().clone(), field.data_type().to_string(), 0, 0, None, None));
                    let n = acc.len() - 1;
                    &mut acc[n]
                }
            };
            slot.2 += rows;
            slot.3 += nulls;
            for (cur, new, want_min) in [(&mut slot.4, lo, true), (&mut slot.5, hi, false)] {
                if let Some(n) = new {
                    let replace = match cur.as_ref().and_then(|c| n.partial_cmp(c)) {
                        None => cur.is_none(),
                        Some(o) => (o == std::cmp::Ordering::Less) == want_min && o != std::cmp::Ordering::Equal,
                    };
                    if replace {
                        *cur = Some(n);
                    }
                }
            }
        }
    }
    let table_name = entries.last().map(|e| e.pipeline.clone()).unwrap_or_default();
    let columns = acc
        .into_iter()
        .map(|(column, data_type, rows, nulls, lo, hi)| ColumnSummary {
            side: "sink".into(),
            table: table_name.clone(),
            column,
            data_type,
            rows,
            nulls,
            null_fraction: if rows == 0 { 0.0 } else { nulls as f64 / rows as f64 },
            distinct: 0,
            min: lo.map(|v| v.to_string()),
            max: hi.map(|v| v.to_string()),
            ..Default::default()
        })
        .collect();
    Ok(TableProfile {
        epochs: files.len(),
        columns,
        min_batch_rows: None,
    })
}

/// The footer metadata bytes of the Parquet file at `path` (`size` bytes): two ranged reads of
/// the end of the file, never its data.
async fn read_footer(table: &TableStore, path: &str, size: u64) -> Result<bytes::Bytes> {
    let location = table.path(path);
    let bad = || EngineError::Internal(format!("{path} is not a Parquet file (bad footer)"));
    if size < 12 {
        return Err(bad());
    }
    let tail = table
        .store
        .get_range(&location, size - 8..size)
        .await
        .map_err(EngineError::store(format!("reading the footer of {path}")))?;
    if tail.len() != 8 || &tail[4..] != b"PAR1" {
        return Err(bad());
    }
    let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if len + 8 > size {
        return Err(bad());
    }
    table
        .store
        .get_range(&location, size - 8 - len..size - 8)
        .await
        .map_err(EngineError::store(format!("reading the footer of {path}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_figures_read_as_instants_and_spreads_as_seconds() {
        let ty = "Timestamp(Microsecond, None)";
        assert_eq!(figure(ty, 1_764_115_200_000_000.0), "2025-11-26T00:00:00+00:00");
        assert_eq!(spread(ty, 1_500_000.0), "1.500s");
        assert_eq!(figure("Int64", 42.0), "42");
        assert_eq!(figure("Float64", 0.125), "0.1250");
        assert_eq!(figure("Float64", f64::NAN), "-");
        assert_eq!(spread("Int64", 3.0), "3");
    }
}
