//! Open windows of a windowed aggregation: per window end, DataFusion's own group values and
//! groups accumulators (the vectorised partial state `AggregateExec` keeps). Each micro-batch
//! updates them; a window is evaluated and dropped once the watermark passes its end, so memory
//! grows with open groups, never with rows. A window's state round-trips through Arrow
//! (`state()` then `merge_batch()`) for checkpoints.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, TimestampNanosecondArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use sluice_sql::{Lowered, LoweredAggregate, WindowDef};

use crate::error::EngineError;

type DfResult<T> = Result<T, DataFusionError>;

/// The windows one [`WindowAggregate::close`] closed.
#[derive(Default)]
pub struct Closed {
    /// Their rows, in the emitted schema.
    pub emitted: Vec<RecordBatch>,
    /// Windows that failed to evaluate: end, groups, error.
    pub failed: Vec<(i64, usize, String)>,
}

/// A batch's GROUP BY keys, aggregate inputs and filters, evaluated ([`WindowAggregate::prepare`]).
pub struct Prepared {
    base: TimestampNanosecondArray,
    keys: Vec<ArrayRef>,
    inputs: Vec<Vec<ArrayRef>>,
    filters: Vec<Option<ArrayRef>>,
}

/// One open window's groups and their partial aggregates.
struct Window {
    groups: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Updated since its state was last checkpointed.
    changed: bool,
}

/// The open windows of one pipeline.
pub struct WindowAggregate {
    lowered: Lowered,
    window: usize,
    width_ns: i64,
    slide_ns: Option<i64>,
    keys: SchemaRef,
    emitted: SchemaRef,
    state: SchemaRef,
    /// How many state columns each aggregate keeps, in order.
    state_widths: Vec<usize>,
    /// Windows ending at or before this were emitted: a row for one of them is dropped (late),
    /// never allowed to open it again.
    closed_through: Option<i64>,
    /// Rows dropped because their window had closed, since the last call to
    /// [`WindowAggregate::take_closed_rows`].
    closed_rows: u64,
    /// Open windows by end. Behind a mutex only so that the pipeline task is `Sync` (group
    /// values and accumulators are `Send` only); every access has `&mut self`.
    open: Mutex<BTreeMap<i64, Window>>,
    /// Only windows ending in `(after, through]` are opened (a recompute of some windows);
    /// rows count in none of the others.
    only: Option<(Option<i64>, i64)>,
}

fn accumulator(agg: &LoweredAggregate) -> DfResult<Box<dyn GroupsAccumulator>> {
    if agg.function.groups_accumulator_supported() {
        return agg.function.create_groups_accumulator();
    }
    let f = agg.function.clone();
    Ok(Box::new(GroupsAccumulatorAdapter::new(move || f.create_accumulator())))
}

/// An empty window for groups of `keys` and the aggregates of `lowered`.
fn new_window(keys: &SchemaRef, lowered: &Lowered) -> DfResult<Window> {
    Ok(Window {
        groups: new_group_values(keys.clone(), &GroupOrdering::None)?,
        accumulators: lowered.aggregates.iter().map(accumulator).collect::<DfResult<_>>()?,
        changed: true,
    })
}

fn evaluate(expr: &Arc<dyn datafusion::physical_expr::PhysicalExpr>, batch: &RecordBatch) -> DfResult<ArrayRef> {
    expr.evaluate(batch)?.into_array(batch.num_rows())
}

impl WindowAggregate {
    /// Empty state for `def`, whose expressions are lowered with `props`.
    pub fn new(def: &WindowDef, props: &datafusion::execution::context::ExecutionProps) -> DfResult<Self> {
        let lowered = def.lower(props)?;
        let input = def.input.schema().as_arrow().clone();
        let keys: SchemaRef = Arc::new(Schema::new(
            lowered
                .group_by
                .iter()
                .enumerate()
                .map(|(i, e)| Ok(Field::new(format!("k{i}"), e.data_type(&input)?, true)))
                .collect::<DfResult<Vec<_>>>()?,
        ));
        let mut fields: Vec<Field> = keys.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut state_widths = Vec::with_capacity(lowered.aggregates.len());
        for (a, agg) in lowered.aggregates.iter().enumerate() {
            let state = agg.function.state_fields()?;
            state_widths.push(state.len());
            for (s, f) in state.iter().enumerate() {
                fields.push(Field::new(format!("a{a}_{s}"), f.data_type().clone(), true));
            }
        }
        Ok(WindowAggregate {
            window: def.window,
            width_ns: def.width_ns,
            slide_ns: def.slide_ns,
            keys,
            emitted: def.emitted.clone(),
            state: Arc::new(Schema::new(fields)),
            state_widths,
            open: Mutex::new(BTreeMap::new()),
            closed_through: None,
            closed_rows: 0,
            only: None,
            lowered,
        })
    }

    /// From now on opens only the windows ending after `after` (none: from the first) and by
    /// `through`: a batch recompute of the windows a stream emitted between two watermarks.
    pub fn only_ending_in(&mut self, after: Option<i64>, through: i64) {
        self.only = Some((after, through));
    }

    /// The window ending at `end`, opened empty when it is not open yet.
    fn window_at(&mut self, end: i64) -> DfResult<&mut Window> {
        let (keys, lowered) = (&self.keys, &self.lowered);
        let open = self.open.get_mut().unwrap_or_else(|p| p.into_inner());
        Ok(match open.entry(end) {
            std::collections::btree_map::Entry::Occupied(w) => w.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(new_window(keys, lowered)?),
        })
    }

    /// Evaluates the GROUP BY keys, aggregate arguments and filters over `batch` without
    /// changing any state: a failure here is the data's (a division by zero, a null event
    /// time), and the same rows can be tried again in parts.
    pub fn prepare(&self, batch: &RecordBatch) -> DfResult<Prepared> {
        let keys: Vec<ArrayRef> = self
            .lowered
            .group_by
            .iter()
            .map(|e| evaluate(e, batch))
            .collect::<DfResult<_>>()?;
        let inputs: Vec<Vec<ArrayRef>> = self
            .lowered
            .aggregates
            .iter()
            .map(|a| a.inputs.iter().map(|e| evaluate(e, batch)).collect::<DfResult<Vec<_>>>())
            .collect::<DfResult<_>>()?;
        let filters: Vec<Option<ArrayRef>> = self
            .lowered
            .aggregates
            .iter()
            .map(|a| a.filter.as_ref().map(|f| evaluate(f, batch)).transpose())
            .collect::<DfResult<_>>()?;
        let base = cast(&keys[self.window], &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
        let base = base.as_primitive::<TimestampNanosecondType>().clone();
        if base.null_count() > 0 {
            return Err(DataFusionError::Execution(
                "a row has no window: its window column is null".into(),
            ));
        }
        Ok(Prepared {
            base,
            keys,
            inputs,
            filters,
        })
    }

    /// Adds prepared rows to their windows.
    pub fn apply(&mut self, p: Prepared) -> DfResult<()> {
        let Prepared {
            base,
            keys,
            inputs,
            filters,
        } = p;
        if base.is_empty() {
            return Ok(());
        }
        let base = &base;
        // A hopping window's key is the newest start containing the row; the row also counts
        // in the width / slide - 1 windows that started before it (at most MAX_HOPS, checked
        // by validate).
        let (copies, slide) = match self.slide_ns {
            Some(slide) => (self.width_ns / slide, slide),
            None => (1, 0),
        };
        for k in 0..copies {
            // A row is counted as dropped once, when its newest window had closed (then all
            // its older ones had too); one still counting in a newer window is not dropped.
            if k == 0 {
                self.add(base, &keys, &inputs, &filters, true)?;
            } else {
                let starts: TimestampNanosecondArray = base.unary(|t| t.saturating_sub(k.saturating_mul(slide)));
                let mut shifted = keys.clone();
                shifted[self.window] = cast(&starts, keys[self.window].data_type())?;
                self.add(&starts, &shifted, &inputs, &filters, false)?;
            }
        }
        Ok(())
    }

    /// Adds rows to the windows starting at `starts`.
    fn add(
        &mut self,
        starts: &TimestampNanosecondArray,
        keys: &[ArrayRef],
        inputs: &[Vec<ArrayRef>],
        filters: &[Option<ArrayRef>],
        count_closed: bool,
    ) -> DfResult<()> {
        // Rows by window end, in row order (usually one or two windows per batch).
        let mut by_end: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for (i, s) in starts.values().iter().enumerate() {
            by_end.entry(s.saturating_add(self.width_ns)).or_default().push(i as u32);
        }
        let whole = by_end.len() == 1;
        for (end, rows) in by_end {
            if let Some((after, through)) = self.only
                && (after.is_some_and(|a| end <= a) || end > through)
            {
                continue;
            }
            // A window already emitted is never opened again (only possible when the window
            // column is not exactly the event time; such rows are late).
            if self.closed_through.is_some_and(|c| end <= c) {
                if count_closed {
                    self.closed_rows += rows.len() as u64;
                }
                continue;
            }
            let pick = |a: &ArrayRef| -> DfResult<ArrayRef> {
                if whole {
                    Ok(a.clone())
                } else {
                    Ok(take(a.as_ref(), &UInt32Array::from(rows.clone()), None)?)
                }
            };
            let k: Vec<ArrayRef> = keys.iter().map(pick).collect::<DfResult<_>>()?;
            let v: Vec<Vec<ArrayRef>> = inputs
                .iter()
                .map(|cols| cols.iter().map(pick).collect::<DfResult<Vec<_>>>())
                .collect::<DfResult<_>>()?;
            let f: Vec<Option<ArrayRef>> = filters
                .iter()
                .map(|f| f.as_ref().map(pick).transpose())
                .collect::<DfResult<_>>()?;
            let w = self.window_at(end)?;
            let mut groups = Vec::with_capacity(rows.len());
            w.groups.intern(&k, &mut groups)?;
            let n = w.groups.len();
            for ((acc, values), filter) in w.accumulators.iter_mut().zip(&v).zip(&f) {
                let filter: Option<&BooleanArray> = filter.as_ref().map(|a| a.as_boolean());
                acc.update_batch(values, &groups, filter, n)?;
            }
            w.changed = true;
        }
        Ok(())
    }

    /// Evaluates and drops every window whose end is at or below `watermark_ns`, oldest first:
    /// rows in the emitted schema (GROUP BY values, then aggregate values). A window whose
    /// evaluation fails (an aggregate overflowing) is dropped too, and returned in `failed` with
    /// its end, groups and the error: it can never evaluate, so keeping it would stop the
    /// pipeline for good.
    pub fn close(&mut self, watermark_ns: i64) -> DfResult<Closed> {
        self.closed_through = Some(self.closed_through.map_or(watermark_ns, |c| c.max(watermark_ns)));
        let mut out = Closed::default();
        loop {
            let w = match self.windows().first_entry() {
                Some(entry) if *entry.key() <= watermark_ns => (*entry.key(), entry.remove()),
                _ => break,
            };
            let (end, mut w) = w;
            let groups = w.groups.len();
            match self.evaluate(&mut w) {
                Ok(b) => out.emitted.push(b),
                Err(e) => out.failed.push((end, groups, e.strip_backtrace())),
            }
        }
        Ok(out)
    }

    /// Evaluates and drops every open window (for what late rows would have produced).
    pub fn close_all(&mut self) -> DfResult<Vec<RecordBatch>> {
        Ok(self.close(i64::MAX)?.emitted)
    }

    /// Resumes after a checkpoint taken at `watermark`: windows ending by it were emitted.
    pub fn resume(&mut self, watermark: Option<i64>) {
        self.closed_through = watermark;
    }

    /// Rows dropped since the last call because their window had already been emitted.
    pub fn take_closed_rows(&mut self) -> u64 {
        std::mem::take(&mut self.closed_rows)
    }

    fn evaluate(&self, w: &mut Window) -> DfResult<RecordBatch> {
        let mut cols = w.groups.emit(EmitTo::All)?;
        for acc in &mut w.accumulators {
            cols.push(acc.evaluate(EmitTo::All)?);
        }
        let cols = cols
            .into_iter()
            .zip(self.emitted.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    Ok(cast(&c, f.data_type())?)
                }
            })
            .collect::<DfResult<Vec<_>>>()?;
        Ok(RecordBatch::try_new(self.emitted.clone(), cols)?)
    }

    fn windows(&mut self) -> &mut BTreeMap<i64, Window> {
        self.open.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Window>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ends of the open windows.
    pub fn open_ends(&self) -> Vec<i64> {
        self.locked().keys().copied().collect()
    }

    /// Bytes the open windows hold (group values and accumulators).
    pub fn size(&self) -> usize {
        self.locked()
            .values()
            .map(|w| w.groups.size() + w.accumulators.iter().map(|a| a.size()).sum::<usize>())
            .sum()
    }

    /// The partial state of each window updated since the last call, by window end: GROUP BY
    /// values then each aggregate's state columns. The windows stay open (their state is read
    /// out and merged back).
    pub fn checkpoint(&mut self) -> DfResult<Vec<(i64, RecordBatch)>> {
        let ends: Vec<i64> = self
            .windows()
            .iter()
            .filter(|(_, w)| w.changed)
            .map(|(e, _)| *e)
            .collect();
        let mut out = Vec::with_capacity(ends.len());
        for end in ends {
            let Some(mut w) = self.windows().remove(&end) else { continue };
            let mut cols = w.groups.emit(EmitTo::All)?;
            for acc in &mut w.accumulators {
                cols.extend(acc.state(EmitTo::All)?);
            }
            let batch = RecordBatch::try_new(self.state.clone(), cols)?;
            self.merge(end, &batch)?.changed = false;
            out.push((end, batch));
        }
        Ok(out)
    }

    /// Marks every open window as saved (just loaded from the checkpoint that holds it).
    pub fn mark_saved(&mut self) {
        for w in self.windows().values_mut() {
            w.changed = false;
        }
    }

    /// Merges a checkpointed window state (as [`WindowAggregate::checkpoint`] gives it) into
    /// the window ending at `end`.
    pub fn restore(&mut self, end: i64, batch: &RecordBatch) -> DfResult<()> {
        let types = |s: &Schema| s.fields().iter().map(|f| f.data_type().clone()).collect::<Vec<_>>();
        if types(&batch.schema()) != types(&self.state) {
            return Err(DataFusionError::Execution(format!(
                "the checkpointed window state ({} columns) is not what this pipeline's aggregate keeps ({} columns): the pipeline's GROUP BY or aggregates changed since the last commit",
                batch.num_columns(),
                self.state.fields().len()
            )));
        }
        self.merge(end, batch)?;
        Ok(())
    }

    /// Merges window state in [`WindowAggregate::checkpoint`]'s layout into the window ending
    /// at `end`.
    fn merge(&mut self, end: i64, batch: &RecordBatch) -> DfResult<&mut Window> {
        let nk = self.keys.fields().len();
        let widths = self.state_widths.clone();
        let w = self.window_at(end)?;
        let mut groups = Vec::with_capacity(batch.num_rows());
        w.groups.intern(&batch.columns()[..nk], &mut groups)?;
        let n = w.groups.len();
        let mut at = nk;
        for (acc, width) in w.accumulators.iter_mut().zip(widths) {
            acc.merge_batch(&batch.columns()[at..at + width], &groups, n)?;
            at += width;
        }
        w.changed = true;
        Ok(w)
    }
}

/// Adds `batch` (rows `base..` of the epoch's aggregate input) to the open windows; the rows
/// whose GROUP BY or aggregate arguments fail to evaluate (found by bisection; evaluation
/// changes nothing) are left out and returned in `bad` with their index and the error.
pub fn add_isolating(
    open: &mut WindowAggregate,
    batch: &RecordBatch,
    base: usize,
    bad: &mut Vec<((RecordBatch, usize), String)>,
) -> Result<(), EngineError> {
    let mut stack = vec![(0usize, batch.num_rows())];
    while let Some((offset, len)) = stack.pop() {
        let part = batch.slice(offset, len);
        match open.prepare(&part) {
            // Rows that evaluated but cannot be added are not a transient fault: fail visibly.
            Ok(prepared) => open
                .apply(prepared)
                .map_err(|e| EngineError::Internal(format!("adding rows to the open windows: {}", e.strip_backtrace())))?,
            Err(e) if len == 1 => bad.push(((part, base + offset), e.strip_backtrace())),
            Err(e) if len == 0 => return Err(EngineError::Environment(e)),
            Err(_) => {
                let half = len / 2;
                stack.push((offset + half, len - half));
                stack.push((offset, half));
            }
        }
    }
    Ok(())
}

