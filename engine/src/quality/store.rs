//! Profile files: one Parquet file per committed epoch under
//! `<sink>/_sluice/quality/profiles/<pipeline>/<epoch:020>.parquet`, named by its commit entry
//! and moved into place by the same commit. One row per (epoch, side, table, column): the plain
//! figures in typed columns (DuckDB or `sluice query` read them directly), the sketch states in
//! binary columns (`hll`, `tdigest`) and the frequent values as JSON text (`top_values`).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit, UInt64Type};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{EngineError, Result};
use crate::quality::profile::{ColumnProfile, Side};
use crate::quality::sketch::{Distinct, Quantiles, TopValues};

/// Where the profile file of `pipeline`'s `epoch` goes (table-relative).
pub fn profile_path(pipeline: &str, epoch: u64) -> String {
    format!("_sluice/quality/profiles/{pipeline}/{epoch:020}.parquet")
}

/// Where the anomaly events of `pipeline`'s `epoch` go (table-relative).
pub fn anomaly_path(pipeline: &str, epoch: u64) -> String {
    format!("_sluice/quality/anomalies/{pipeline}/{epoch:020}.parquet")
}

/// Anomaly events of one epoch as a zstd Parquet file: one row per episode start or end.
pub fn encode_anomalies(
    pipeline: &str,
    epoch: u64,
    at_us: i64,
    events: &[crate::quality::drift::AnomalyEvent],
) -> Result<Bytes> {
    let f = |n: &str| Field::new(n, DataType::Float64, false);
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let schema = Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::UInt64, false),
        s("pipeline"),
        Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        s("event"),
        s("column"),
        s("metric"),
        f("value"),
        f("baseline"),
        f("mad"),
        f("score"),
        Field::new("started_epoch", DataType::UInt64, false),
    ]));
    let n = events.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(vec![epoch; n])),
        texts((0..n).map(|_| Some(pipeline.to_string()))),
        Arc::new(TimestampMicrosecondArray::from(vec![at_us; n]).with_timezone("UTC")),
        texts(events.iter().map(|e| Some(e.event.clone()))),
        texts(events.iter().map(|e| Some(e.column.clone()))),
        texts(events.iter().map(|e| Some(e.metric.clone()))),
        Arc::new(Float64Array::from_iter_values(events.iter().map(|e| e.value))),
        Arc::new(Float64Array::from_iter_values(events.iter().map(|e| e.baseline))),
        Arc::new(Float64Array::from_iter_values(events.iter().map(|e| e.mad))),
        Arc::new(Float64Array::from_iter_values(events.iter().map(|e| e.score))),
        Arc::new(UInt64Array::from_iter_values(events.iter().map(|e| e.started))),
    ];
    write_parquet(&RecordBatch::try_new(schema, columns)?)
}

/// One stored profile: a column of one side of one epoch.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    /// The epoch that committed it.
    pub epoch: u64,
    /// The pipeline.
    pub pipeline: String,
    /// Before or after the SQL.
    pub side: Side,
    /// The source or sink table.
    pub table: String,
    /// Commit time, microseconds since the epoch (UTC).
    pub committed_at_us: i64,
    /// The figures and sketches.
    pub profile: ColumnProfile,
}

/// The schema of profile files.
pub fn schema() -> SchemaRef {
    let i = |n: &str| Field::new(n, DataType::Int64, true);
    let f = |n: &str| Field::new(n, DataType::Float64, true);
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::UInt64, false),
        s("pipeline"),
        s("side"),
        s("table"),
        s("column"),
        s("data_type"),
        Field::new("committed_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        i("rows"),
        i("nulls"),
        f("null_fraction"),
        i("min_int"),
        i("max_int"),
        f("min_float"),
        f("max_float"),
        i("moments_n"),
        f("sum"),
        f("mean"),
        f("m2"),
        f("stddev"),
        i("nan"),
        i("infinite"),
        i("min_len"),
        i("max_len"),
        i("sum_len"),
        f("mean_len"),
        i("empty"),
        i("true_count"),
        i("distinct"),
        f("p50"),
        f("p90"),
        f("p99"),
        i("freshness_ms"),
        s("top_values"),
        Field::new("hll", DataType::Binary, true),
        Field::new("tdigest", DataType::Binary, true),
    ]))
}

fn ints(rows: &[ProfileRow], f: impl Fn(&ColumnProfile) -> Option<i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter(rows.iter().map(|r| f(&r.profile))))
}

fn floats(rows: &[ProfileRow], f: impl Fn(&ColumnProfile) -> Option<f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter(rows.iter().map(|r| f(&r.profile))))
}

fn texts(values: impl Iterator<Item = Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(values))
}

/// The rows as a record batch of [`schema`].
pub fn to_batch(rows: &[ProfileRow]) -> Result<RecordBatch> {
    let n = |v: u64| Some(v as i64);
    let top = |p: &ColumnProfile| p.top.as_ref().and_then(|t| serde_json::to_string(t).ok());
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.epoch))),
        texts(rows.iter().map(|r| Some(r.pipeline.clone()))),
        texts(rows.iter().map(|r| Some(r.side.as_str().to_string()))),
        texts(rows.iter().map(|r| Some(r.table.clone()))),
        texts(rows.iter().map(|r| Some(r.profile.column.clone()))),
        texts(rows.iter().map(|r| Some(r.profile.data_type.clone()))),
        Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.committed_at_us)).with_timezone("UTC")),
        ints(rows, |p| n(p.rows)),
        ints(rows, |p| n(p.nulls)),
        floats(rows, |p| Some(p.null_fraction())),
        ints(rows, |p| p.min_int),
        ints(rows, |p| p.max_int),
        floats(rows, |p| p.min_float),
        floats(rows, |p| p.max_float),
        ints(rows, |p| n(p.moments_n)),
        floats(rows, |p| p.sum),
        floats(rows, |p| p.mean),
        floats(rows, |p| p.m2),
        floats(rows, |p| p.variance().map(f64::sqrt)),
        ints(rows, |p| n(p.nan)),
        ints(rows, |p| n(p.infinite)),
        ints(rows, |p| p.min_len.map(|v| v as i64)),
        ints(rows, |p| p.max_len.map(|v| v as i64)),
        ints(rows, |p| n(p.sum_len)),
        floats(rows, |p| p.mean_len()),
        ints(rows, |p| n(p.empty)),
        ints(rows, |p| p.true_count.map(|v| v as i64)),
        ints(rows, |p| n(p.distinct_estimate())),
        floats(rows, |p| p.quantile(0.5)),
        floats(rows, |p| p.quantile(0.9)),
        floats(rows, |p| p.quantile(0.99)),
        ints(rows, |p| p.freshness_ms),
        texts(rows.iter().map(|r| top(&r.profile))),
        Arc::new(BinaryArray::from_iter(rows.iter().map(|r| r.profile.distinct.as_ref().map(|d| d.bytes().to_vec())))),
        Arc::new(BinaryArray::from_iter(rows.iter().map(|r| r.profile.quantiles.as_ref().map(|q| q.to_bytes())))),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// The rows as a zstd Parquet file.
pub fn encode(rows: &[ProfileRow]) -> Result<Bytes> {
    write_parquet(&to_batch(rows)?)
}

fn write_parquet(batch: &RecordBatch) -> Result<Bytes> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(parquet_err)?;
    w.write(batch).map_err(parquet_err)?;
    w.close().map_err(parquet_err)?;
    Ok(Bytes::from(buf))
}

fn parquet_err(e: parquet::errors::ParquetError) -> EngineError {
    EngineError::Internal(format!("profile file: {e}"))
}

/// Reads a profile file back.
pub fn decode(bytes: Bytes) -> Result<Vec<ProfileRow>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet_err)?
        .build()
        .map_err(parquet_err)?;
    let mut out = Vec::new();
    for batch in reader {
        out.extend(from_batch(&batch?)?);
    }
    Ok(out)
}

/// Reads rows out of a batch of [`schema`].
pub fn from_batch(b: &RecordBatch) -> Result<Vec<ProfileRow>> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| EngineError::Internal(format!("profile file has no column {name}")))
    };
    let text = |name: &str| -> Result<Vec<Option<String>>> {
        Ok(col(name)?.as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect())
    };
    let int = |name: &str| -> Result<Vec<Option<i64>>> { Ok(col(name)?.as_primitive::<Int64Type>().iter().collect()) };
    let float = |name: &str| -> Result<Vec<Option<f64>>> { Ok(col(name)?.as_primitive::<Float64Type>().iter().collect()) };
    let bin = |name: &str| -> Result<Vec<Option<Vec<u8>>>> {
        Ok(col(name)?.as_binary::<i32>().iter().map(|v| v.map(<[u8]>::to_vec)).collect())
    };
    let epochs: Vec<u64> = col("epoch")?.as_primitive::<UInt64Type>().values().to_vec();
    let at = col("committed_at")?;
    let at = at
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| EngineError::Internal("profile file: committed_at is not a timestamp".into()))?;
    let (pipeline, side, table, column, data_type, top) = (
        text("pipeline")?,
        text("side")?,
        text("table")?,
        text("column")?,
        text("data_type")?,
        text("top_values")?,
    );
    let u = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
    let (rows, nulls, min_int, max_int, moments_n) =
        (int("rows")?, int("nulls")?, int("min_int")?, int("max_int")?, int("moments_n")?);
    let (min_float, max_float, sum, mean, m2) =
        (float("min_float")?, float("max_float")?, float("sum")?, float("mean")?, float("m2")?);
    let (nan, infinite, min_len, max_len, sum_len, empty, true_count, freshness) = (
        int("nan")?,
        int("infinite")?,
        int("min_len")?,
        int("max_len")?,
        int("sum_len")?,
        int("empty")?,
        int("true_count")?,
        int("freshness_ms")?,
    );
    let (hll, tdigest) = (bin("hll")?, bin("tdigest")?);
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let profile = ColumnProfile {
            column: column[i].clone().unwrap_or_default(),
            data_type: data_type[i].clone().unwrap_or_default(),
            rows: u(rows[i]),
            nulls: u(nulls[i]),
            min_int: min_int[i],
            max_int: max_int[i],
            min_float: min_float[i],
            max_float: max_float[i],
            moments_n: u(moments_n[i]),
            sum: sum[i],
            mean: mean[i],
            m2: m2[i],
            nan: u(nan[i]),
            infinite: u(infinite[i]),
            min_len: min_len[i].map(|v| v as u64),
            max_len: max_len[i].map(|v| v as u64),
            sum_len: u(sum_len[i]),
            empty: u(empty[i]),
            true_count: true_count[i].map(|v| v as u64),
            distinct: hll[i].as_deref().map(Distinct::from_bytes).transpose()?,
            quantiles: tdigest[i].as_deref().map(Quantiles::from_bytes).transpose()?,
            top: match &top[i] {
                Some(t) => Some(
                    serde_json::from_str::<TopValues>(t)
                        .map_err(|e| EngineError::Internal(format!("profile file: top_values: {e}")))?,
                ),
                None => None,
            },
            freshness_ms: freshness[i],
        };
        out.push(ProfileRow {
            epoch: epochs[i],
            pipeline: pipeline[i].clone().unwrap_or_default(),
            side: if side[i].as_deref() == Some("source") { Side::Source } else { Side::Sink },
            table: table[i].clone().unwrap_or_default(),
            committed_at_us: if at.is_null(i) { 0 } else { at.value(i) },
            profile,
        });
    }
    Ok(out)
}
