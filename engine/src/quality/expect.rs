//! Expectations at run time: the `CREATE EXPECTATION`s of one side of a pipeline (its source
//! or its sink), evaluated on each micro-batch before the commit.
//!
//! - row-level checks are physical expressions evaluated on each Arrow batch (vectorised); a
//!   row fails when its CHECK is FALSE (NULL passes). A row failing several checks is counted
//!   under each and routed once: DEAD_LETTER before DROP before WARN;
//! - batch-level checks are aggregate plans run over the whole micro-batch (the rows the row
//!   checks kept), giving one boolean: WARN logs, QUARANTINE sends every row of the batch to
//!   dead letters, FAIL stops the pipeline before the commit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, BooleanArray};
use arrow::compute::{filter_record_batch, not, or, prep_null_mask_filter};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::DFSchema;
use datafusion::datasource::provider_as_source;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use sluice_sql::{Action, EXPECTATION_INPUT, ExpectationDef, Level};

use crate::error::{EngineError, Result};
pub use crate::log::commit::Violations;

/// The checks of one side of a pipeline.
pub struct Checks {
    checks: Vec<Check>,
}

struct Check {
    def: ExpectationDef,
    row: Option<Arc<dyn PhysicalExpr>>,
    batch: Option<BatchCheck>,
}

/// The rows a batch check reads: set before each run of its plan.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    batches: Mutex<Vec<RecordBatch>>,
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.batches.lock().map(|b| b.clone()).unwrap_or_default();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// A batch-level check: its physical plan, built once (one partition, so the plan holds no
/// state between runs) over a [`Slot`] that each epoch refills — no planning per epoch.
struct BatchCheck {
    slot: Arc<Slot>,
    plan: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
}

impl BatchCheck {
    async fn new(def: &ExpectationDef, logical: &LogicalPlan) -> Result<BatchCheck> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        let slot = Arc::new(Slot {
            schema: def.schema.clone(),
            batches: Mutex::new(Vec::new()),
        });
        let stream: Arc<dyn PartitionStream> = slot.clone();
        let table = StreamingTable::try_new(def.schema.clone(), vec![stream])?;
        let source = provider_as_source(Arc::new(table));
        let bound = sluice_sql::bind_scan(logical, EXPECTATION_INPUT, &source)?;
        let plan = ctx.state().create_physical_plan(&bound).await?;
        Ok(BatchCheck {
            slot,
            plan,
            task: ctx.task_ctx(),
        })
    }

    /// Runs the check over `batches`; an empty result or NULL passes.
    async fn passes(&self, batches: &[RecordBatch]) -> Result<bool> {
        if let Ok(mut b) = self.slot.batches.lock() {
            *b = batches.to_vec();
        }
        let out = datafusion::physical_plan::collect(self.plan.clone(), self.task.clone()).await;
        if let Ok(mut b) = self.slot.batches.lock() {
            b.clear();
        }
        for b in out.map_err(EngineError::Environment)? {
            if b.num_columns() == 0 || b.num_rows() == 0 {
                continue;
            }
            if let Some(ok) = b.column(0).as_any().downcast_ref::<BooleanArray>() {
                return Ok(ok.is_null(0) || ok.value(0));
            }
        }
        Ok(true)
    }
}

/// A row that failed a DEAD_LETTER check: the row and why.
pub struct FailedRow {
    /// The row, alone in a batch.
    pub row: RecordBatch,
    /// Its index among the rows checked (row-level), or among the quarantined batch's rows.
    pub index: usize,
    /// The expectations it failed.
    pub reason: String,
    /// True when it went with a quarantined batch (not for a check of its own).
    pub quarantined: bool,
}

/// The result of checking one micro-batch.
#[derive(Default)]
pub struct Checked {
    /// The rows that go on.
    pub kept: Vec<RecordBatch>,
    /// Rows for dead letters (DEAD_LETTER rows, or the whole batch on QUARANTINE).
    pub dead: Vec<FailedRow>,
    /// Violations per expectation.
    pub violations: BTreeMap<String, Violations>,
}

impl Checks {
    /// Compiles the expectations on `table` among `all`.
    pub async fn new(ctx: &SessionContext, all: &[ExpectationDef], table: &str) -> Result<Checks> {
        let mut checks = Vec::new();
        for def in all.iter().filter(|d| d.table == table) {
            let (row, batch) = match (&def.plan, def.level) {
                (Some(plan), Level::Batch) => (None, Some(BatchCheck::new(def, plan).await?)),
                _ => {
                    let schema = DFSchema::try_from_qualified_schema(EXPECTATION_INPUT, &def.schema)?;
                    (Some(ctx.state().create_physical_expr(def.expr.clone(), &schema)?), None)
                }
            };
            checks.push(Check {
                def: def.clone(),
                row,
                batch,
            });
        }
        Ok(Checks { checks })
    }

    /// No checks.
    pub fn empty() -> Checks {
        Checks { checks: Vec::new() }
    }

    /// True when there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Checks one micro-batch. A FAIL check that fails is an error
    /// ([`EngineError::ExpectationFailed`]); nothing is committed.
    pub async fn check(&self, pipeline: &str, batches: Vec<RecordBatch>) -> Result<Checked> {
        let mut out = Checked::default();
        if self.checks.is_empty() {
            out.kept = batches;
            return Ok(out);
        }
        for c in &self.checks {
            out.violations.insert(
                c.def.name.clone(),
                Violations {
                    action: c.def.action.as_str().to_string(),
                    level: match c.def.level {
                        Level::Row => "row",
                        Level::Batch => "batch",
                    }
                    .to_string(),
                    violations: 0,
                },
            );
        }
        let mut offset = 0;
        for batch in batches {
            let n = batch.num_rows();
            let (keep, dead) = self.check_rows(&batch, offset, &mut out.violations)?;
            out.dead.extend(dead);
            match keep {
                Some(mask) => keep_rows(&batch, &mask, &mut out.kept)?,
                None => out.kept.push(batch),
            }
            offset += n;
        }
        // A batch check over no rows says nothing (an epoch of only bad records, a quarantined
        // batch, an empty tail): skipped.
        let rows_left: usize = out.kept.iter().map(|b| b.num_rows()).sum();
        for c in self.checks.iter().filter(|c| c.batch.is_some() && rows_left > 0) {
            let Some(plan) = &c.batch else { continue };
            match plan.passes(&out.kept).await {
                Ok(true) => continue,
                Ok(false) => {}
                // A CHECK that cannot be computed on this batch (an overflow, a cast) is a
                // violation, handled by its action.
                Err(e) => tracing::warn!(pipeline, expectation = %c.def.name, error = %e, "batch check failed to evaluate; counted as a violation"),
            }
            if let Some(v) = out.violations.get_mut(&c.def.name) {
                v.violations += 1;
            }
            let rows: usize = out.kept.iter().map(|b| b.num_rows()).sum();
            match c.def.action {
                Action::Fail => {
                    return Err(EngineError::ExpectationFailed {
                        pipeline: pipeline.to_string(),
                        expectation: c.def.name.clone(),
                        check: c.def.check.clone(),
                    });
                }
                Action::Quarantine => {
                    tracing::warn!(pipeline, expectation = %c.def.name, rows, "batch failed its expectation; quarantined to dead letters");
                    let reason = format!("batch quarantined by expectation {}: CHECK ({})", c.def.name, c.def.check);
                    let mut index = 0;
                    for b in std::mem::take(&mut out.kept) {
                        for r in 0..b.num_rows() {
                            out.dead.push(FailedRow {
                                row: b.slice(r, 1),
                                index,
                                reason: reason.clone(),
                                quarantined: true,
                            });
                            index += 1;
                        }
                    }
                }
                _ => {
                    tracing::warn!(pipeline, expectation = %c.def.name, check = %c.def.check, rows, "batch failed its expectation");
                }
            }
        }
        Ok(out)
    }

    /// Evaluates the row-level checks on one batch: the rows to keep (None = all) and the
    /// dead-lettered rows.
    fn check_rows(
        &self,
        batch: &RecordBatch,
        offset: usize,
        violations: &mut BTreeMap<String, Violations>,
    ) -> Result<(Option<BooleanArray>, Vec<FailedRow>)> {
        let n = batch.num_rows();
        let mut dead_mask: Option<BooleanArray> = None;
        let mut drop_mask: Option<BooleanArray> = None;
        let mut failed: Vec<(&Check, BooleanArray)> = Vec::new();
        let mut warned = Vec::new();
        let mut unchecked: Vec<(usize, String)> = Vec::new();
        for c in &self.checks {
            let Some(expr) = &c.row else { continue };
            let fails = match failing_rows(expr.as_ref(), batch) {
                Ok(f) => f,
                Err(e) => {
                    // The CHECK cannot be computed on some row (a cast, a division by zero):
                    // find those rows one by one; each is dead-lettered with the error, whatever
                    // the action, since it could not be checked.
                    let mut f = Vec::with_capacity(n);
                    let before = unchecked.len();
                    for i in 0..n {
                        match failing_rows(expr.as_ref(), &batch.slice(i, 1)) {
                            Ok(one) => f.push(one.value(0)),
                            Err(row_err) => {
                                f.push(false);
                                unchecked.push((i, format!("{}: CHECK ({}) could not be evaluated: {row_err}", c.def.name, c.def.check)));
                            }
                        }
                    }
                    if let Some(v) = violations.get_mut(&c.def.name) {
                        v.violations += (unchecked.len() - before) as u64;
                    }
                    tracing::warn!(expectation = %c.def.name, error = %e, "a row-level check failed to evaluate; checking row by row");
                    BooleanArray::from(f)
                }
            };
            let count = fails.true_count() as u64;
            if count == 0 {
                continue;
            }
            if let Some(v) = violations.get_mut(&c.def.name) {
                v.violations += count;
            }
            let merge = |m: Option<BooleanArray>| -> Result<BooleanArray> {
                Ok(match m {
                    Some(m) => or(&m, &fails)?,
                    None => fails.clone(),
                })
            };
            match c.def.action {
                Action::DeadLetter => {
                    dead_mask = Some(merge(dead_mask)?);
                    failed.push((c, fails.clone()));
                }
                Action::Drop => drop_mask = Some(merge(drop_mask)?),
                _ => warned.push((c.def.name.as_str(), count)),
            }
        }
        for (name, count) in warned {
            tracing::warn!(expectation = name, rows = count, "rows failed their expectation (kept)");
        }
        if !unchecked.is_empty() {
            let mask = BooleanArray::from((0..n).map(|i| unchecked.iter().any(|(j, _)| *j == i)).collect::<Vec<bool>>());
            dead_mask = Some(match dead_mask {
                Some(m) => or(&m, &mask)?,
                None => mask,
            });
        }
        let gone = match (&dead_mask, &drop_mask) {
            (Some(d), Some(p)) => Some(or(d, p)?),
            (Some(d), None) => Some(d.clone()),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        let mut dead = Vec::new();
        if let Some(d) = &dead_mask {
            for i in (0..n).filter(|&i| d.value(i)) {
                let names: Vec<String> = failed
                    .iter()
                    .filter(|(_, f)| f.value(i))
                    .map(|(c, _)| format!("{}: CHECK ({})", c.def.name, c.def.check))
                    .chain(unchecked.iter().filter(|(j, _)| *j == i).map(|(_, why)| why.clone()))
                    .collect();
                dead.push(FailedRow {
                    quarantined: false,
                    row: batch.slice(i, 1),
                    index: offset + i,
                    reason: format!("failed expectation {}", names.join("; ")),
                });
            }
        }
        Ok((gone.map(|g| not(&g)).transpose()?, dead))
    }
}

/// Most rows removed from a batch by zero-copy slicing around them; past it the batch is
/// filtered (copied) once.
const MAX_SLICED_GAPS: usize = 16;

/// Pushes the rows of `batch` where `keep` is true: as slices between the removed rows when
/// they are few (no copy of the batch for a handful of bad rows), else as one filtered copy.
fn keep_rows(batch: &RecordBatch, keep: &BooleanArray, out: &mut Vec<RecordBatch>) -> Result<()> {
    let removed = keep.len() - keep.true_count();
    if removed > MAX_SLICED_GAPS {
        out.push(filter_record_batch(batch, keep)?);
        return Ok(());
    }
    let mut start = 0;
    for i in (0..keep.len()).filter(|&i| !keep.value(i)) {
        if i > start {
            out.push(batch.slice(start, i - start));
        }
        start = i + 1;
    }
    if start < batch.num_rows() {
        out.push(batch.slice(start, batch.num_rows() - start));
    }
    Ok(())
}

/// The rows of `batch` whose CHECK is FALSE (TRUE and NULL pass).
fn failing_rows(expr: &dyn PhysicalExpr, batch: &RecordBatch) -> Result<BooleanArray> {
    let n = batch.num_rows();
    let value = expr.evaluate(batch)?.into_array(n)?;
    let ok = value
        .as_any()
        .downcast_ref::<BooleanArray>()
        .cloned()
        .unwrap_or_else(|| BooleanArray::from(vec![None; n]));
    let fails = not(&ok)?;
    Ok(if fails.nulls().is_some() { prep_null_mask_filter(&fails) } else { fails })
}
