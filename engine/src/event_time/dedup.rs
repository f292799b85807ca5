//! Deduplication by key within a time-to-live of event time: the keys kept recently, in Arrow's
//! row format, with the event time each was kept at. Keys kept in an epoch are checkpointed as
//! that epoch's file; a file is dropped from the checkpoint once every key in it has expired.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use arrow::row::{RowConverter, SortField};
use sluice_sql::DedupDef;

use crate::error::{EngineError, Result};

/// Bytes one remembered key costs besides its own bytes (hash table slot, box, time).
const ENTRY_OVERHEAD: usize = 48;

/// The keys kept within the TTL.
pub struct Dedup {
    columns: Vec<usize>,
    converter: RowConverter,
    ttl_ns: i64,
    seen: HashMap<Box<[u8]>, i64>,
    key_bytes: usize,
    schema: SchemaRef,
    added: Vec<RecordBatch>,
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(format!("dedup: {e}"))
}

impl Dedup {
    /// Empty state for `def` over a source declaring `source`.
    pub fn new(def: &DedupDef, source: &Schema) -> Result<Self> {
        let columns: Vec<usize> = def
            .key
            .iter()
            .map(|k| source.index_of(k).map_err(internal))
            .collect::<Result<_>>()?;
        let converter = RowConverter::new(
            columns
                .iter()
                .map(|i| SortField::new(source.field(*i).data_type().clone()))
                .collect(),
        )
        .map_err(internal)?;
        let mut fields: Vec<Field> = columns
            .iter()
            .map(|i| Field::new(source.field(*i).name(), source.field(*i).data_type().clone(), true))
            .collect();
        fields.push(Field::new(
            "__kept_at",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ));
        Ok(Dedup {
            columns,
            converter,
            ttl_ns: i64::try_from(def.ttl.as_nanos()).unwrap_or(i64::MAX),
            seen: HashMap::new(),
            key_bytes: 0,
            schema: Arc::new(Schema::new(fields)),
            added: Vec::new(),
        })
    }

    /// Which rows of `batch` (among those `candidates` marks, with event times `ts`) are kept,
    /// and how many are repeats.
    pub fn check(
        &mut self,
        batch: &RecordBatch,
        ts: &arrow::array::PrimitiveArray<TimestampNanosecondType>,
        candidates: &BooleanArray,
    ) -> Result<(BooleanArray, u64)> {
        let keys: Vec<ArrayRef> = self.columns.iter().map(|i| batch.column(*i).clone()).collect();
        let rows = self.converter.convert_columns(&keys).map_err(internal)?;
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut kept_rows = Vec::new();
        let mut repeats = 0;
        for i in 0..batch.num_rows() {
            if !candidates.value(i) {
                keep.push(false);
                continue;
            }
            let t = ts.value(i);
            let key = rows.row(i);
            match self.seen.get_mut(key.as_ref()) {
                Some(t0) if t.abs_diff(*t0) < self.ttl_ns as u64 => {
                    repeats += 1;
                    keep.push(false);
                }
                Some(t0) => {
                    // Kept again (its TTL had passed): remembered from the newest time it was
                    // kept, so expiry only moves forward.
                    *t0 = (*t0).max(t);
                    kept_rows.push(i as u32);
                    keep.push(true);
                }
                None => {
                    self.key_bytes += key.as_ref().len() + ENTRY_OVERHEAD;
                    self.seen.insert(key.as_ref().into(), t);
                    kept_rows.push(i as u32);
                    keep.push(true);
                }
            }
        }
        if !kept_rows.is_empty() {
            let idx = UInt32Array::from(kept_rows);
            let mut cols: Vec<ArrayRef> = keys
                .iter()
                .map(|k| take(k.as_ref(), &idx, None).map_err(internal))
                .collect::<Result<_>>()?;
            cols.push(take(ts, &idx, None).map_err(internal)?);
            self.added
                .push(RecordBatch::try_new(self.schema.clone(), cols).map_err(internal)?);
        }
        Ok((BooleanArray::from(keep), repeats))
    }

    /// Forgets keys no row that is not late could repeat once the watermark is `watermark`.
    pub fn expire(&mut self, watermark: i64) {
        let ttl = self.ttl_ns;
        let mut freed = 0;
        self.seen.retain(|k, t0| {
            let live = t0.saturating_add(ttl) > watermark;
            if !live {
                freed += k.len() + ENTRY_OVERHEAD;
            }
            live
        });
        self.key_bytes -= freed;
    }

    /// Whether a checkpoint file whose newest key was kept at `max_kept` may still matter.
    pub fn file_live(&self, max_kept: i64, watermark: Option<i64>) -> bool {
        watermark.is_none_or(|w| max_kept.saturating_add(self.ttl_ns) > w)
    }

    /// The keys kept since the last call, with the time each was kept at (the newest of
    /// them as well), for this epoch's checkpoint file.
    pub fn take_added(&mut self) -> Result<Option<(RecordBatch, i64)>> {
        if self.added.is_empty() {
            return Ok(None);
        }
        let batch = concat_batches(&self.schema, &std::mem::take(&mut self.added)).map_err(internal)?;
        let kept = batch
            .column(batch.num_columns() - 1)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .and_then(|a| a.iter().flatten().max());
        Ok(kept.map(|k| (batch, k)))
    }

    /// Loads a checkpoint file (files in epoch order: a later one overrides).
    pub fn load(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = self.columns.len();
        if batch.num_columns() != n + 1 {
            return Err(internal("a checkpoint file does not match dedup.key: the source's options changed"));
        }
        let rows = self.converter.convert_columns(&batch.columns()[..n]).map_err(internal)?;
        let kept = arrow::compute::cast(batch.column(n), &DataType::Timestamp(TimeUnit::Nanosecond, None))
            .map_err(internal)?;
        let kept = kept
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .ok_or_else(|| internal("checkpoint time column"))?;
        for i in 0..batch.num_rows() {
            let key = rows.row(i);
            if self.seen.insert(key.as_ref().into(), kept.value(i)).is_none() {
                self.key_bytes += key.as_ref().len() + ENTRY_OVERHEAD;
            }
        }
        Ok(())
    }

    /// Forgets everything (before loading a checkpoint again).
    pub fn clear(&mut self) {
        self.seen.clear();
        self.added.clear();
        self.key_bytes = 0;
    }

    /// Approximate bytes the remembered keys hold.
    pub fn size(&self) -> usize {
        self.key_bytes
    }
}
