//! Parquet file encoding with the columns of each row group spread over several threads
//! (the Parquet sink's data files and the raw archive).
//!
//! An epoch often lands in a single partition, so one file per partition leaves all but one
//! core idle while that file is encoded. arrow-rs encodes columns independently
//! ([`ArrowColumnWriter`]); here each thread encodes a share of the columns and the chunks are
//! appended in schema order, so the file is byte for byte what [`ArrowWriter`] would write
//! (checked by the test below).
//!
//! [`ArrowWriter`]: parquet::arrow::ArrowWriter

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory, compute_leaves};
use parquet::arrow::{ArrowSchemaConverter, add_encoded_arrow_schema_to_metadata};
use parquet::errors::{ParquetError, Result};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

/// The most [`encode_file`] reserves for a file before encoding it.
const MAX_RESERVE: usize = 256 << 20;

/// Encodes `batches` (all with `schema`) as one Parquet file, using up to `threads` threads.
/// Row groups hold at most `props.max_row_group_row_count()` rows, like [`ArrowWriter`]'s
/// (a byte limit on row groups is not applied).
///
/// [`ArrowWriter`]: parquet::arrow::ArrowWriter
pub fn encode_file(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    props: &WriterProperties,
    threads: usize,
) -> Result<Vec<u8>> {
    let mut props = props.clone();
    add_encoded_arrow_schema_to_metadata(schema, &mut props);
    let parquet_schema = ArrowSchemaConverter::new()
        .with_coerce_types(props.coerce_types())
        .convert(schema)?;
    let max_rows = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
    let props = Arc::new(props);
    // Reserved up front at the rows' in-memory size (of the slices, not the buffers they
    // share), which the encoded file rarely exceeds: growing the buffer by doubling would copy
    // it and fault its pages in twice. Reserved pages that are never written cost no memory;
    // a reservation that fails leaves the buffer to grow.
    let reserve = batches
        .iter()
        .flat_map(|b| b.columns())
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
        .fold(0usize, usize::saturating_add)
        .min(MAX_RESERVE);
    let mut buffer = Vec::new();
    let _ = buffer.try_reserve(reserve);
    let mut file = SerializedFileWriter::new(buffer, parquet_schema.root_schema_ptr(), props)?;
    let factory = ArrowRowGroupWriterFactory::new(&file, schema.clone());
    for (index, group) in row_groups(batches, max_rows).iter().enumerate() {
        let writers = factory.create_column_writers(index)?;
        let chunks = encode_columns(group, schema, writers, threads)?;
        let mut row_group = file.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
    }
    file.into_inner()
}

/// `batches` cut into runs of at most `max_rows` rows (slices, no copies).
fn row_groups(batches: &[RecordBatch], max_rows: usize) -> Vec<Vec<RecordBatch>> {
    let mut groups: Vec<Vec<RecordBatch>> = Vec::new();
    let mut rows = max_rows; // rows in the last group; "full" so the first batch opens one
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            if rows == max_rows {
                groups.push(Vec::new());
                rows = 0;
            }
            let take = (max_rows - rows).min(batch.num_rows() - offset);
            if let Some(group) = groups.last_mut() {
                group.push(batch.slice(offset, take));
            }
            rows += take;
            offset += take;
        }
    }
    groups
}

/// One row group's column chunks, in schema order; the columns are dealt to `threads` threads,
/// largest first to the least loaded.
fn encode_columns(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    writers: Vec<ArrowColumnWriter>,
    threads: usize,
) -> Result<Vec<ArrowColumnChunk>> {
    // (in-memory size, column, writer), largest first, each to the least loaded share.
    let mut columns: Vec<(usize, usize, ArrowColumnWriter)> = writers
        .into_iter()
        .enumerate()
        .map(|(c, w)| (batches.iter().map(|b| b.column(c).get_array_memory_size()).sum(), c, w))
        .collect();
    columns.sort_by_key(|(size, ..)| std::cmp::Reverse(*size));
    let threads = threads.clamp(1, columns.len().max(1));
    let mut shares: Vec<(usize, Vec<(usize, ArrowColumnWriter)>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for (size, c, w) in columns {
        if let Some(least) = shares.iter_mut().min_by_key(|(load, _)| *load) {
            least.0 += size;
            least.1.push((c, w));
        }
    }
    let encode = |share: Vec<(usize, ArrowColumnWriter)>| -> Result<Vec<(usize, ArrowColumnChunk)>> {
        share
            .into_iter()
            .map(|(c, mut w)| {
                for batch in batches {
                    for leaf in compute_leaves(schema.field(c), batch.column(c))? {
                        w.write(&leaf)?;
                    }
                }
                Ok((c, w.close()?))
            })
            .collect()
    };
    let mut done: Vec<(usize, ArrowColumnChunk)> = std::thread::scope(|s| {
        let mut shares = shares.into_iter().map(|(_, share)| share);
        let mine = shares.next().unwrap_or_default();
        let others: Vec<_> = shares.map(|share| s.spawn(move || encode(share))).collect();
        let mut done = encode(mine)?;
        for handle in others {
            let part = handle
                .join()
                .map_err(|_| ParquetError::General("a column encoding thread panicked".into()))??;
            done.extend(part);
        }
        Ok::<_, ParquetError>(done)
    })?;
    done.sort_by_key(|(c, _)| *c);
    Ok(done.into_iter().map(|(_, chunk)| chunk).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringViewArray, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use parquet::arrow::ArrowWriter;

    fn batch(schema: &SchemaRef, start: i64, n: i64) -> RecordBatch {
        let ids: Vec<i64> = (start..start + n).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Float64Array::from_iter(
                ids.iter().map(|i| (i % 7 != 0).then_some(*i as f64 * 0.25)),
            )),
            Arc::new(StringViewArray::from_iter(
                ids.iter().map(|i| (i % 5 != 0).then(|| format!("code-{}", i % 13))),
            )),
            Arc::new(TimestampNanosecondArray::from(
                ids.iter().map(|i| i * 1_000_000_007).collect::<Vec<_>>(),
            )),
        ];
        RecordBatch::try_new(schema.clone(), columns).unwrap()
    }

    /// Same bytes as `ArrowWriter` for any thread count, including several row groups split
    /// across batch boundaries.
    #[test]
    fn files_match_arrow_writer() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("amount", DataType::Float64, true),
            Field::new("code", DataType::Utf8View, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        ]));
        let batches = vec![
            batch(&schema, 0, 2500),
            batch(&schema, 2500, 10),
            batch(&schema, 2510, 4000),
        ];
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(3000))
            .set_dictionary_page_size_limit(1024)
            .build();
        let mut reference = Vec::new();
        let mut w = ArrowWriter::try_new(&mut reference, schema.clone(), Some(props.clone())).unwrap();
        for b in &batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
        for threads in [1, 2, 3, 8] {
            let ours = encode_file(&batches, &schema, &props, threads).unwrap();
            assert!(ours == reference, "{threads} threads: file differs from ArrowWriter's");
        }
        assert_eq!(row_groups(&batches, 3000).len(), 3);
        assert!(encode_file(&[], &schema, &props, 2).is_ok());
    }
}
