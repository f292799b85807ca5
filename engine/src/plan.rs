//! Running a pipeline's plan over one micro-batch (the stream's epochs, reconcile's windows). The logical plan comes from `sluice-sql`,
//! planned once; here its source scan is bound to a [`BatchSlot`], a table whose contents are the
//! current micro-batch. Each batch is optimized and physically planned afresh (cheap, and it keeps
//! `now()` and friends per batch), never parsed.

use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::provider_as_source;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, LogicalPlan, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use sluice_sql::PipelineDef;

use crate::error::Result;

/// Rows below which a batch is not split across partitions.
pub const MIN_ROWS_PER_PARTITION: usize = 8192;

/// A table holding the current micro-batch, split into partitions for parallel execution.
#[derive(Debug)]
pub struct BatchSlot {
    schema: SchemaRef,
    partitions: usize,
    current: Mutex<Vec<Vec<RecordBatch>>>,
}

impl BatchSlot {
    /// Makes `batches` the slot's contents: contiguous runs of about equal rows, one per
    /// partition (slices, no copies), so output order follows input order.
    fn set(&self, batches: &[RecordBatch]) {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let n = self.partitions.min(rows / MIN_ROWS_PER_PARTITION).max(1);
        let per = rows.div_ceil(n).max(1);
        let parts = (0..n)
            .map(|i| {
                let start = (i * per).min(rows);
                slice_rows(batches, start, per.min(rows - start))
            })
            .collect();
        if let Ok(mut cur) = self.current.lock() {
            *cur = parts;
        }
    }
}

/// Rows `offset..offset + len` of `batches` taken as one sequence (zero-copy slices).
pub fn slice_rows(batches: &[RecordBatch], offset: usize, len: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (offset, len);
    for b in batches {
        if want == 0 {
            break;
        }
        if skip >= b.num_rows() {
            skip -= b.num_rows();
            continue;
        }
        let take = want.min(b.num_rows() - skip);
        out.push(b.slice(skip, take));
        want -= take;
        skip = 0;
    }
    out
}

#[async_trait::async_trait]
impl TableProvider for BatchSlot {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let parts = self
            .current
            .lock()
            .map_err(|_| DataFusionError::Internal("batch slot lock poisoned".into()))?
            .clone();
        let exec: Arc<dyn ExecutionPlan> =
            MemorySourceConfig::try_new_exec(&parts, self.schema.clone(), projection.cloned())?;
        Ok(exec)
    }
}

/// A pipeline's plan bound to its batch slot.
pub struct BatchPlan {
    ctx: SessionContext,
    plan: LogicalPlan,
    slot: Arc<BatchSlot>,
    output: SchemaRef,
}

impl BatchPlan {
    /// Binds `def`'s source scan to a fresh slot of `source_schema`.
    pub fn new(ctx: &SessionContext, def: &PipelineDef, source_schema: SchemaRef) -> Result<Self> {
        Self::bind(ctx, &def.plan, &def.source, source_schema)
    }

    /// Binds the scans of `table` in `plan` to a fresh slot of `schema`.
    pub fn bind(ctx: &SessionContext, plan: &LogicalPlan, table: &str, schema: SchemaRef) -> Result<Self> {
        let partitions = ctx.state().config().target_partitions().max(1);
        let slot = Arc::new(BatchSlot {
            schema,
            partitions,
            current: Mutex::new(vec![]),
        });
        let plan = sluice_sql::bind_scan(plan, table, &provider_as_source(slot.clone()))?;
        let output = Arc::new(plan.schema().as_arrow().clone());
        Ok(BatchPlan {
            ctx: ctx.clone(),
            plan,
            slot,
            output,
        })
    }

    /// The schema of the batches [`BatchPlan::execute`] takes (the source's declared columns).
    pub fn input_schema(&self) -> &SchemaRef {
        &self.slot.schema
    }

    /// The schema of what [`BatchPlan::execute`] returns.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output
    }

    /// Runs the plan over `batches` (one micro-batch, in order). The output comes partition by
    /// partition, in partition order (not as the partitions finish), so the same input gives
    /// the same row order: what a windowed aggregate is fed does not depend on thread timing.
    pub async fn execute(&self, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.slot.set(batches);
        let df = DataFrame::new(self.ctx.state(), self.plan.clone());
        let out = df.collect_partitioned().await;
        self.slot.set(&[]);
        Ok(out?.into_iter().flatten().collect())
    }
}
