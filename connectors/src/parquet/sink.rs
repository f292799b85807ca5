//! The Parquet sink: splits an epoch's output by the `PARTITIONED BY` columns and stages one
//! zstd Parquet file per partition, `<k>=<v>/.../part-<pipeline>-<epoch>-<n>.parquet`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::StreamExt;
use parquet::file::properties::WriterProperties;
use sluice_engine::log::commit::{CommitLog, FileAction};
use sluice_engine::store::TableStore;
use sluice_engine::connector::sink::Sink;
use sluice_engine::{EngineError, Result};

use super::config::ParquetSinkConfig;
use sluice_engine::parquet_file::encode_file;

/// The directory name Hive uses for a null partition value.
pub const HIVE_NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// A hive-partitioned Parquet table.
#[derive(Debug)]
pub struct ParquetSink {
    table: TableStore,
    schema: SchemaRef,
    partition_by: Vec<usize>,
    data_columns: Vec<usize>,
    file_schema: SchemaRef,
    /// The whole table as stored: data columns as in the files, partition columns as output.
    stored: SchemaRef,
    props: WriterProperties,
}

impl ParquetSink {
    /// A sink writing `schema` (the pipeline output) partitioned by `partition_by`.
    pub fn new(
        table: TableStore,
        schema: SchemaRef,
        partition_by: &[String],
        config: &ParquetSinkConfig,
    ) -> Result<Self> {
        let mut pidx = Vec::new();
        for p in partition_by {
            pidx.push(
                schema
                    .index_of(p)
                    .map_err(|_| EngineError::Internal(format!("partition column {p} not in output")))?,
            );
        }
        let data_columns: Vec<usize> = (0..schema.fields().len()).filter(|i| !pidx.contains(i)).collect();
        let file_schema = stored_schema(&schema.project(&data_columns)?, config.nanosecond_timestamps);
        let stored = Arc::new(arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| match file_schema.field_with_name(f.name()) {
                    Ok(stored) => stored.clone(),
                    Err(_) => f.as_ref().clone(),
                })
                .collect::<Vec<_>>(),
        ));
        let props = config.writer_properties();
        Ok(ParquetSink {
            table,
            schema,
            partition_by: pidx,
            data_columns,
            file_schema,
            stored,
            props,
        })
    }

    /// Splits `batch` into (partition values, rows) groups, sorted by partition path.
    fn split(&self, batch: &RecordBatch) -> Result<Vec<(Vec<Option<String>>, RecordBatch)>> {
        if self.partition_by.is_empty() {
            return Ok(vec![(vec![], batch.clone())]);
        }
        if batch.num_rows() == 0 {
            return Ok(vec![]);
        }
        let cols: Vec<_> = self.partition_by.iter().map(|i| batch.column(*i).clone()).collect();
        let conv = RowConverter::new(cols.iter().map(|c| SortField::new(c.data_type().clone())).collect())?;
        let rows = conv.convert_columns(&cols)?;
        let mut groups: HashMap<&[u8], Vec<u32>> = HashMap::new();
        let first = rows.row(0);
        if rows.iter().all(|r| r == first) {
            // One partition (common: an epoch within one day): no per-row grouping.
            groups.insert(first.data(), vec![0]);
        } else {
            for (i, row) in rows.iter().enumerate() {
                groups.entry(row.data()).or_default().push(i as u32);
            }
        }
        let opts = FormatOptions::default();
        let formatters = cols
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(groups.len());
        let whole = groups.len() == 1;
        for idx in groups.into_values() {
            let first = idx[0] as usize;
            let values: Vec<Option<String>> = cols
                .iter()
                .zip(&formatters)
                .map(|(c, f)| {
                    if c.is_null(first) {
                        None
                    } else {
                        Some(f.value(first).to_string())
                    }
                })
                .collect();
            // One partition (common: an epoch within one day): the batch itself, no copy.
            let taken = if whole {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(idx))?
            };
            out.push((values, taken));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The directory (`k=v/.../`) and the named values of a partition.
    fn partition_dir(&self, values: &[Option<String>]) -> (String, Vec<(String, Option<String>)>) {
        let mut dir = String::new();
        let mut partition = Vec::new();
        for (i, v) in self.partition_by.iter().zip(values) {
            let name = self.schema.field(*i).name();
            let seg = v
                .as_deref()
                .map_or_else(|| HIVE_NULL_PARTITION.to_string(), escape_partition_value);
            dir.push_str(&format!("{name}={seg}/"));
            partition.push((name.clone(), v.clone()));
        }
        (dir, partition)
    }

    /// The output schema this sink accepts.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

/// The schema a file stores for `schema`: nanosecond timestamps as microseconds unless
/// `nanos` (Spark and other readers refuse INT64 TIMESTAMP(NANOS)).
pub fn stored_schema(schema: &arrow::datatypes::Schema, nanos: bool) -> SchemaRef {
    use arrow::datatypes::{DataType, Field, TimeUnit};
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(TimeUnit::Nanosecond, tz) if !nanos => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(TimeUnit::Microsecond, tz.clone())),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

/// Encodes the data columns of `batches` as one Parquet file on up to `threads` threads.
fn encode(
    batches: &[RecordBatch],
    data_columns: &[usize],
    file_schema: SchemaRef,
    props: WriterProperties,
    threads: usize,
) -> Result<Vec<u8>> {
    let data = stored_rows(batches, data_columns, &file_schema)?;
    encode_file(&data, &file_schema, &props, threads)
        .map_err(|e| EngineError::Internal(format!("encoding parquet: {e}")))
}

/// The data columns of `batches`, cast to the types the files store.
fn stored_rows(batches: &[RecordBatch], data_columns: &[usize], file_schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    batches
        .iter()
        .map(|b| {
            let columns = b
                .project(data_columns)?
                .columns()
                .iter()
                .zip(file_schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c.clone())
                    } else {
                        arrow::compute::cast(c, f.data_type())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(file_schema.clone(), columns)?)
        })
        .collect::<Result<Vec<_>>>()
}

/// Escapes a partition value for a path segment the way Hive does.
pub fn escape_partition_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_control() || "\"#%'*/:=?\\\u{7f}{[]^".contains(c) {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[async_trait::async_trait]
impl Sink for ParquetSink {
    fn table(&self) -> &TableStore {
        &self.table
    }

    fn stored_schema(&self) -> SchemaRef {
        self.stored.clone()
    }

    async fn stage(&self, log: &CommitLog, epoch: u64, batches: Vec<RecordBatch>) -> Result<Vec<FileAction>> {
        let pipeline = log.writer();
        // Group rows by partition batch by batch (no copy of the whole epoch), in path order.
        let mut groups: std::collections::BTreeMap<Vec<Option<String>>, Vec<RecordBatch>> = Default::default();
        for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
            for (values, rows) in self.split(&b)? {
                groups.entry(values).or_default().push(rows);
            }
        }
        let mut actions = Vec::new();
        // Encode partitions' files on blocking threads, at most one per core at a time (each
        // holds its encoded file), and stage them in order; with fewer partitions than cores
        // (often one), each file's columns are spread over the idle cores.
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = parallel.div_ceil(groups.len().max(1));
        let (cols, schema, props) = (self.data_columns.clone(), self.file_schema.clone(), self.props.clone());
        let mut encoded = futures::stream::iter(groups.into_iter().map(|(values, rows)| {
            let (cols, schema, props) = (cols.clone(), schema.clone(), props.clone());
            async move {
                let n = rows.iter().map(|r| r.num_rows() as u64).sum::<u64>();
                let bytes = tokio::task::spawn_blocking(move || encode(&rows, &cols, schema, props, threads))
                    .await
                    .map_err(|e| EngineError::Internal(format!("parquet encode task failed: {e}")))??;
                Ok::<_, EngineError>((values, n, bytes))
            }
        }))
        .buffered(parallel);
        while let Some(next) = encoded.next().await {
            let (values, n, bytes) = next?;
            let (dir, partition) = self.partition_dir(&values);
            let path = format!("{dir}part-{pipeline}-{epoch}-0.parquet");
            let size = bytes.len() as u64;
            log.stage(&path, bytes).await?;
            actions.push(FileAction {
                path,
                rows: n,
                bytes: size,
                partition,
                covers: None,
            });
        }
        Ok(actions)
    }

    fn partition(&self, batches: Vec<RecordBatch>) -> Result<Vec<(String, Vec<RecordBatch>)>> {
        let mut groups: std::collections::BTreeMap<String, Vec<RecordBatch>> = Default::default();
        for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
            for (values, rows) in self.split(&b)? {
                let (dir, _) = self.partition_dir(&values);
                let stored = stored_rows(&[rows], &self.data_columns, &self.file_schema)?;
                groups.entry(dir).or_default().extend(stored);
            }
        }
        Ok(groups.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_hive() {
        assert_eq!(escape_partition_value("a/b=c"), "a%2Fb%3Dc");
        assert_eq!(escape_partition_value("2026-11-22"), "2026-11-22");
    }
}
