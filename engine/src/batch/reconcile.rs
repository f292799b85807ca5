//! `sluice reconcile`: recompute a range of a pipeline in batch from the raw archive, compare
//! the result with what the stream committed partition by partition, and (with `--repair`)
//! replace every differing partition's files with the batch result in one commit.
//!
//! **What a range covers.** An event is in `[from, to)` when the commit that covered it was
//! staged in that range (its archive's `_sluice_ingest_time`, equal to the entry's
//! `committed_at`); either end may be open. The epochs found are widened to whole files: a
//! file made by an earlier repair (or compaction) covers a span of epochs, and a range that
//! touches it takes the whole span. The batch side is the pipeline's SELECT over exactly those
//! epochs' archive files, through the pipeline's row-level expectations (`DEAD_LETTER` and
//! `DROP` remove rows, as in the stream), with the static tables and the SQL as the file says
//! now. The stream side is every live file covering those epochs, plus any file in the touched
//! partition directories that no commit names (plain readers read it). Partitions are
//! compared by row count, per-column digests and whole-row digests ([`super::digest`]), and by
//! key when the sink declares `key`. Both sides are digested as they stream (the batch side
//! per partition of its plan, the stream's files batch by batch), so memory holds batches, not
//! the range (and for a windowed pipeline the windows being recomputed).
//!
//! **Windowed pipelines.** The stream emitted a window in the epoch whose watermark passed its
//! end, from rows of any earlier epoch. A range's epochs therefore cover the windows ending
//! after the watermark before the range and by the watermark after it (the entries'
//! `state.watermark_ns`); the batch side recomputes them from the raw archive (late rows
//! included; from the first epoch whose newest event time reaches the earliest start of those
//! windows) with the stream's own window state ([`WindowAggregate`], only those windows
//! opened), then through the part of the SELECT above the aggregate and the sink's row-level
//! expectations. Refused for several writers (the servers of a consumer group close windows at
//! different watermarks) and when an epoch read ran with the archive off.
//!
//! **Repair** writes the batch result of each differing partition through the sink (same
//! encoding and partitioning as the stream), then commits one entry that adds those files
//! (with `covers` = the range's epochs) and removes the stream's files of those partitions;
//! removed files leave the partition directories at once (moved under `_sluice/removed/`).
//! It holds the `maintenance` writer lease. Epochs the stream commits after the recompute read
//! the log are outside the range, so their files are never removed: nothing the stream
//! commits meanwhile is lost or doubled. Before committing, the log is read again and the
//! repair stops if a file it would remove is no longer live.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext, col};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;
use sluice_sql::{Action, Level, PipelineDef, Program, StaticTable};

use super::digest::{Digest, Seed, key_differences};
use crate::error::{EngineError, Result};
use crate::log::checkpoint::EntrySummary;
use crate::log::commit::{CommitLog, Counts, FileAction, Origin, TableSchema};
use crate::log::transaction::Transaction;
use crate::event_time::window::{WindowAggregate, add_isolating};
use crate::plan::BatchPlan;
use crate::store::lease::WriterLease;
use crate::store::TableStore;
use crate::connector::sink::Sink;

/// The writer name of maintenance jobs (reconcile's repair; later compaction): their lease,
/// their staging directory and the `pipeline` of their commit entries.
pub const MAINTENANCE_WRITER: &str = "maintenance";

/// The writer name reconcile reads the log as (it never commits under it).
const READER: &str = "sluice-reconcile-reader";

/// A time range `[from, to)` in microseconds since the Unix epoch; `None` is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TimeRange {
    /// Inclusive start.
    pub from_us: Option<i64>,
    /// Exclusive end.
    pub to_us: Option<i64>,
}

impl TimeRange {
    fn contains(&self, us: i64) -> bool {
        self.from_us.is_none_or(|f| us >= f) && self.to_us.is_none_or(|t| us < t)
    }
}

/// Parses `--from`/`--to`: a date (`2026-11-25`, midnight UTC) or an RFC 3339 instant, in
/// microseconds since the Unix epoch.
pub fn parse_instant(text: &str) -> Result<i64> {
    let t = text.trim();
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map_or(0, |dt| dt.and_utc().timestamp_micros()));
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_micros())
        .map_err(|_| {
            EngineError::config(
                format!("'{text}' is neither a date nor an RFC 3339 instant"),
                Some("write 2026-11-25 or 2026-11-25T03:00:00Z".to_string()),
            )
        })
}

/// What to reconcile and how.
#[derive(Clone, Default)]
pub struct ReconcileOptions {
    /// The commit-time range.
    pub range: TimeRange,
    /// Replace differing partitions with the batch result.
    pub repair: bool,
    /// Where the recompute runs: a session connected to an Apache Ballista cluster; `None`
    /// runs it in process. The comparison runs in process either way.
    pub exec: Option<SessionContext>,
}

/// How a partition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Same rows.
    Equal,
    /// Different rows.
    Differs,
}

/// Keys that differ in one partition (all of them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyReport {
    /// In the batch result, not in the stream's output.
    pub missing: Vec<String>,
    /// In the stream's output, not in the batch result.
    pub extra: Vec<String>,
    /// In both, with different rows.
    pub changed: Vec<String>,
}

/// One partition's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// `k=v/...` (empty for an unpartitioned table).
    pub partition: String,
    /// Rows the stream wrote (as plain readers see them).
    pub stream_rows: u64,
    /// Rows of the batch result.
    pub batch_rows: u64,
    /// Columns whose digests differ.
    pub columns: Vec<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// The stream's files (table-relative) it compared.
    pub stream_files: Vec<String>,
    /// Files committed by the log but absent from the store.
    pub missing_files: Vec<String>,
    /// Files in the partition directory that no commit names.
    pub stray_files: Vec<String>,
    /// Key differences, when the sink declares a key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyReport>,
}

/// What a repair committed.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The repair's commit epoch.
    pub epoch: u64,
    /// Files removed.
    pub removed: Vec<String>,
    /// Files added.
    pub added: Vec<String>,
}

/// The reconciliation of one pipeline over one range.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    /// The pipeline.
    pub pipeline: String,
    /// The sink's LOCATION.
    pub sink: String,
    /// The requested range.
    pub range: TimeRange,
    /// The stream epochs covered, `[first, last]` (none when the range holds no commit).
    pub epochs: Option<[u64; 2]>,
    /// Archive files read.
    pub archive_files: usize,
    /// Archived events recomputed.
    pub archive_events: u64,
    /// Every partition either side has, in path order.
    pub partitions: Vec<PartitionReport>,
    /// Partitions that differ.
    pub differing: usize,
    /// The partitions the range's late rows would have written to (their entries'
    /// `state.dirty`): the stream left those rows out, the batch result has them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub late_partitions: Vec<String>,
    /// The repair, when one was asked for and needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairReport>,
    /// Things that make the comparison less than exact (a SELECT that calls `now()`, ...).
    pub warnings: Vec<String>,
}

/// Progress of a long step: `(step, done, total)`.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// The pipeline `name` of `program` and its sink, or an error listing the pipelines there are.
pub fn pipeline_and_sink<'a>(program: &'a Program, name: &str) -> Result<(&'a PipelineDef, &'a sluice_sql::SinkDef)> {
    let def = program.pipelines.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = program.pipelines.iter().map(|p| p.name.as_str()).collect();
        EngineError::config(
            format!("no pipeline {name} in the files"),
            Some(format!("pipelines: {}", names.join(", "))),
        )
    })?;
    let sink = program
        .sinks
        .get(&def.name)
        .ok_or_else(|| EngineError::Internal(format!("pipeline {} lost its sink", def.name)))?;
    Ok((def, sink))
}

/// Reconciles `pipeline` of `program` (compiled in `ctx`) over `opts.range`. `sink` is the
/// pipeline's sink; `shadow` is the same sink on a scratch store (the batch result is encoded
/// there first, exactly as the sink would write it).
pub async fn reconcile(
    ctx: &SessionContext,
    program: &Program,
    pipeline: &str,
    sink: Arc<dyn Sink>,
    shadow: Arc<dyn Sink>,
    opts: &ReconcileOptions,
    progress: Progress<'_>,
) -> Result<ReconcileReport> {
    let (def, sink_def) = pipeline_and_sink(program, pipeline)?;
    let key = sink_key(sink_def);
    let table = sink.table().clone();
    let (log, lease) = open_log(&table, opts.repair).await?;
    let snap = log.snapshot().await?;
    let Range {
        epochs,
        windows,
        live,
        late_partitions,
        archive_paths,
        archive_events,
    } = select_range(&table, def, snap.folded(), opts.range).await?;
    let covered = |span: [u64; 2]| covers(epochs, span);

    // The stream side is read and digested while the batch side is recomputed.
    let seed = Seed::random();
    let key: Arc<[String]> = key.into();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stream_units: Vec<Unit> = live
        .iter()
        .filter(|(_, o)| covered(o.epochs))
        .map(|(f, _)| Unit::Stream(partition_dir(f), f.path.clone(), snap.newest_epoch()))
        .collect();
    let stream_side = tokio::spawn(run_units(table.clone(), stream_units, key.clone(), seed.clone(), parallel));
    let started = std::time::Instant::now();
    progress("recomputing", 0, archive_paths.len() as u64);
    // The batch side is digested as the recompute streams it, per partition of the plan; its
    // rows are kept only for a repair (which stages them).
    let computed = recompute_batch_side(
        BatchSide {
            ctx,
            program,
            def,
            table: &table,
            archive_paths: &archive_paths,
            windows: windows.as_ref(),
            sink: sink.clone(),
        },
        key.clone(),
        seed.clone(),
        opts,
    )
    .await?;
    progress("recomputing", archive_paths.len() as u64, archive_paths.len() as u64);
    let next_epoch = snap.newest_epoch() + 1;
    let recomputed = started.elapsed();

    // Both sides by partition.
    let mut sides: BTreeMap<String, Vec<FileAction>> = BTreeMap::new();
    for (f, origin) in &live {
        if covered(origin.epochs) {
            sides.entry(partition_dir(f)).or_default().push(f.clone());
        }
    }
    for dir in computed.digests.keys() {
        sides.entry(dir.clone()).or_default();
    }
    let total = sides.len() as u64;
    progress("comparing", 0, total);
    let mut digested = stream_side
        .await
        .map_err(|e| EngineError::Internal(format!("reading the stream side failed: {e}")))?;
    digested.extend(computed.digests.into_iter().map(|(dir, d)| Ok((dir, Outcome::Batch(d)))));
    let Compared {
        partitions,
        repair_parts,
        strays,
    } = compare(&table, &log, sides, digested, (&key, &seed, parallel)).await?;
    progress("comparing", total, total);
    tracing::debug!(
        recompute_ms = recomputed.as_millis() as u64,
        compare_ms = (started.elapsed() - recomputed).as_millis() as u64,
        partitions = total,
        "reconcile phases"
    );
    let differing = repair_parts.len();
    let mut report = ReconcileReport {
        pipeline: def.name.clone(),
        sink: table.location.clone(),
        range: opts.range,
        epochs,
        archive_files: archive_paths.len(),
        archive_events,
        partitions,
        differing,
        late_partitions,
        repair: None,
        warnings: volatile_calls(def),
    };
    if opts.repair && differing > 0 {
        let origin = Origin {
            pipeline: def.name.clone(),
            epochs: epochs.unwrap_or([next_epoch, next_epoch]),
        };
        let schema = TableSchema::of(&shadow.stored_schema(), &sink_def.partition_by);
        let planned = PlannedRepair {
            origin,
            schema,
            epoch: next_epoch,
            parts: repair_parts,
            strays,
        };
        report.repair = Some(repair(&log, &shadow, planned, computed.rows).await?);
    }
    if let Some(lease) = lease {
        lease.release().await;
    }
    Ok(report)
}

/// The sink's `key` option: the columns that identify a row (none: rows compare whole).
fn sink_key(sink_def: &sluice_sql::SinkDef) -> Vec<String> {
    sink_def
        .options
        .get("key")
        .map(|k| {
            k.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The log a reconcile reads (and a repair commits to). A repair holds the maintenance lease
/// throughout (its commit is fenced by it); a report finishes an interrupted repair first
/// when no maintenance job runs (else both versions of a partition would be compared).
async fn open_log(table: &TableStore, repair: bool) -> Result<(CommitLog, Option<WriterLease>)> {
    if repair {
        let lease = WriterLease::acquire(table, MAINTENANCE_WRITER).await?;
        let log = CommitLog::new(table.clone(), MAINTENANCE_WRITER).with_fence(lease.fence());
        log.recover().await?;
        Ok((log, Some(lease)))
    } else {
        finish_interrupted_maintenance(table).await?;
        Ok((CommitLog::new(table.clone(), MAINTENANCE_WRITER), None))
    }
}

/// What the comparison found: each partition's report, the files a repair would remove per
/// differing partition, and the strays among them.
struct Compared {
    partitions: Vec<PartitionReport>,
    repair_parts: Vec<(String, Vec<String>)>,
    strays: BTreeSet<String>,
}

/// The comparison phase: files in the partition directories that no entry names are listed
/// first, then the log is read again (a commit names its files before they move into place,
/// so a file the stream committed meanwhile is named by the second read and is never taken
/// for a stray); strays are digested like the stream's files, one per core at a time; with
/// the stream's and the batch's digests (`digested`) each partition gets its verdict.
async fn compare(
    table: &TableStore,
    log: &CommitLog,
    sides: BTreeMap<String, Vec<FileAction>>,
    digested: Vec<Result<(String, Outcome)>>,
    (key, seed, parallel): (&Arc<[String]>, &Seed, usize),
) -> Result<Compared> {
    let mut listed = BTreeMap::new();
    for dir in sides.keys() {
        listed.insert(dir.clone(), list_parquet(table, dir).await?);
    }
    let again = log.snapshot().await?;
    let mut named: BTreeSet<String> = again.live_paths().into_iter().collect();
    named.extend(again.after.iter().flat_map(|e| e.add.iter().map(|a| a.path.clone())));
    let mut units = Vec::new();
    let mut partition_sides = Vec::with_capacity(sides.len());
    for (dir, stream) in sides {
        let stray: Vec<String> = listed
            .remove(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !named.contains(p))
            .collect();
        units.extend(stray.iter().map(|p| Unit::Stray(dir.clone(), p.clone())));
        partition_sides.push(Side { dir, stream, stray });
    }
    let mut outcomes = run_units(table.clone(), units, key.clone(), seed.clone(), parallel).await;
    outcomes.extend(digested);
    let mut acc: BTreeMap<String, Accumulated> = BTreeMap::new();
    for next in outcomes {
        let (dir, outcome) = next?;
        let a = acc.entry(dir).or_default();
        match outcome {
            Outcome::Stream(d) => a.stream.merge(d),
            Outcome::Batch(d) => a.batch.merge(d),
            Outcome::Missing(path) => a.missing_files.push(path),
            Outcome::Unreadable => a.unreadable = true,
        }
    }
    let mut out = Compared {
        partitions: Vec::new(),
        repair_parts: Vec::new(),
        strays: BTreeSet::new(),
    };
    for side in partition_sides {
        let mut a = acc.remove(&side.dir).unwrap_or_default();
        a.missing_files.sort();
        let (report, remove) = verdict(side, a, !key.is_empty());
        if let Some(remove) = remove {
            out.strays.extend(report.stray_files.iter().cloned());
            out.repair_parts.push((report.partition.clone(), remove));
        }
        out.partitions.push(report);
    }
    Ok(out)
}

/// What the batch side of a reconcile recomputes from.
struct BatchSide<'a> {
    ctx: &'a SessionContext,
    program: &'a Program,
    def: &'a PipelineDef,
    table: &'a TableStore,
    archive_paths: &'a [String],
    windows: Option<&'a Windows>,
    sink: Arc<dyn Sink>,
}

/// The batch side: the range recomputed from its archive files (on the cluster when `opts`
/// says so), its windows closed for a windowed pipeline, through the sink's row-level
/// expectations, digested per partition as it streams (its rows kept only for a repair).
async fn recompute_batch_side(b: BatchSide<'_>, key: Arc<[String]>, seed: Seed, opts: &ReconcileOptions) -> Result<Computed> {
    let BatchSide {
        ctx,
        program,
        def,
        table,
        archive_paths,
        windows,
        sink,
    } = b;
    let computed = if archive_paths.is_empty() {
        Computed::default()
    } else {
        let frame = recompute(
            opts.exec.as_ref().unwrap_or(ctx),
            opts.exec.is_some(),
            program,
            def,
            table,
            archive_paths,
        )
        .await?;
        let frame = match (&def.window, windows) {
            (Some(w), Some(bounds)) => {
                let rows = recompute_windows(ctx, frame, w, bounds).await?;
                (!rows.is_empty()).then(|| ctx.read_batches(rows)).transpose()?
            }
            _ => Some(frame),
        };
        match frame {
            Some(frame) => {
                // Through the sink's row-level expectations, as the stream's output goes.
                let mut out = frame;
                for e in removing_checks(program, &def.name) {
                    out = out.filter(e.is_not_false())?;
                }
                digest_batch_side(out, sink, key, seed, opts.repair).await?
            }
            None => Computed::default(),
        }
    };
    Ok(computed)
}

/// A repair as the comparison planned it: per differing partition, the files to remove; the
/// strays among them; whose epochs the new files cover; the table's schema; its epoch.
struct PlannedRepair {
    origin: Origin,
    schema: TableSchema,
    epoch: u64,
    parts: Vec<(String, Vec<String>)>,
    strays: BTreeSet<String>,
}

/// Encodes the batch result with the sink itself on the scratch store, then commits the
/// differing partitions' files in place of the stream's, as one maintenance commit.
async fn repair(
    log: &CommitLog,
    shadow: &Arc<dyn Sink>,
    plan: PlannedRepair,
    rows: Vec<RecordBatch>,
) -> Result<RepairReport> {
    let shadow_log = CommitLog::new(shadow.table().clone(), MAINTENANCE_WRITER);
    let files = shadow.stage(&shadow_log, plan.epoch, rows).await?;
    let parts = plan
        .parts
        .into_iter()
        .map(|(dir, remove)| {
            (
                remove,
                files.iter().filter(|f| partition_dir(f) == dir).cloned().collect(),
            )
        })
        .collect();
    let job = Repair {
        log,
        shadow: shadow.table(),
        shadow_log: &shadow_log,
        origin: plan.origin,
        schema: plan.schema,
        epoch: plan.epoch,
        strays: plan.strays,
    };
    job.commit(parts).await
}

/// The stream epochs a range covers, widened to whole files: the span `[lo, hi]`.
fn covers(epochs: Option<[u64; 2]>, [a, b]: [u64; 2]) -> bool {
    epochs.is_some_and(|[lo, hi]| a <= hi && b >= lo)
}

/// What a range of a reconcile reads and compares (its first phase).
struct Range {
    /// The stream epochs covered, widened so that every file is whole in or out.
    epochs: Option<[u64; 2]>,
    /// For a windowed pipeline, the windows to recompute.
    windows: Option<Windows>,
    /// The pipeline's live files and the epochs they cover.
    live: Vec<(FileAction, Origin)>,
    /// Partitions late rows of the range would have written to.
    late_partitions: Vec<String>,
    /// The raw-archive files to recompute from.
    archive_paths: Vec<String>,
    /// Events in them.
    archive_events: u64,
}

/// Selects the range: the stream epochs committed in `range` (widened to whole files), the
/// windows a windowed pipeline emitted in them, and the archive files that recompute them;
/// refused when the archive cannot (it was off, or is gone, or several instances wrote windows).
async fn select_range(
    table: &TableStore,
    def: &PipelineDef,
    folded: crate::log::checkpoint::Checkpoint,
    range: TimeRange,
) -> Result<Range> {
    // The stream epochs of the range, widened to whole files.
    let mine: Vec<&EntrySummary> = folded.index.iter().filter(|e| e.pipeline == def.name).collect();
    let in_range: Vec<u64> = mine
        .iter()
        .filter(|e| {
            chrono::DateTime::parse_from_rfc3339(&e.committed_at)
                .is_ok_and(|t| range.contains(t.timestamp_micros()))
        })
        .map(|e| e.epoch)
        .collect();
    let live: Vec<(FileAction, Origin)> = folded
        .files
        .into_iter()
        .filter(|(_, o)| o.pipeline == def.name)
        .collect();
    let epochs = match (in_range.iter().min(), in_range.iter().max()) {
        (Some(&lo), Some(&hi)) => {
            let (mut lo, mut hi) = (lo, hi);
            loop {
                let (l, h) = live
                    .iter()
                    .filter(|(_, o)| o.overlaps([lo, hi]))
                    .fold((lo, hi), |(l, h), (_, o)| (l.min(o.epochs[0]), h.max(o.epochs[1])));
                if (l, h) == (lo, hi) {
                    break;
                }
                (lo, hi) = (l, h);
            }
            Some([lo, hi])
        }
        _ => None,
    };
    let covered = |span: [u64; 2]| covers(epochs, span);
    // A windowed pipeline emitted, in the range's epochs, the windows ending after the
    // watermark before them and by the watermark after them; those windows take rows from
    // any later epoch (late rows included), so the archive is read from the first epoch that
    // can hold their rows (the first whose newest event time reaches the earliest start of a
    // window ending after that watermark) and only they are opened.
    let windows = match (&def.window, epochs) {
        (Some(w), Some([lo, hi])) => {
            let newest = |below: u64| mine.iter().filter(|e| e.epoch < below).filter_map(|e| e.watermark_ns).last();
            let (after, through) = (newest(lo), newest(hi + 1));
            let first = match after.map(|a| a.saturating_sub(w.width_ns)) {
                // None found (an index without event times): every epoch.
                Some(t) => mine
                    .iter()
                    .find(|e| e.max_event_time_ns.is_some_and(|m| m >= t))
                    .map_or(0, |e| e.epoch),
                None => 0,
            };
            Some(Windows { after, through, first })
        }
        _ => None,
    };
    let archived: Vec<&EntrySummary> = mine
        .iter()
        .copied()
        .filter(|e| match &windows {
            Some(w) => e.epoch >= w.first,
            None => covered([e.epoch, e.epoch]),
        })
        .collect();
    // An epoch that wrote rows read them, so it archived them unless the archive was off; a
    // windowed pipeline's epochs read rows that later windows hold, so it is refused when any
    // epoch it reads ran with the archive off (recorded in the entry's state).
    if let Some(e) = archived
        .iter()
        .find(|e| e.archive.is_none() && (e.output > 0 || (windows.is_some() && e.unarchived)))
    {
        return Err(EngineError::config(
            format!(
                "epoch {} of pipeline {} was committed without a raw archive (sink option archive = off), so the range cannot be recomputed",
                e.epoch, def.name
            ),
            Some("reconcile a range that starts after the archive was turned on".to_string()),
        ));
    }
    if windows.is_some() {
        let instances: BTreeSet<&str> = archived.iter().filter_map(|e| e.instance.as_deref()).collect();
        if instances.len() > 1 {
            return Err(EngineError::config(
                format!(
                    "pipeline {} aggregates windows and is written by {} instances (a consumer group), whose watermarks close windows at different times",
                    def.name,
                    instances.len()
                ),
                Some("reconcile windowed pipelines that one server writes".to_string()),
            ));
        }
    }
    if let Some(Windows { through: None, .. }) = &windows
        && live.iter().any(|(_, o)| covered(o.epochs))
    {
        return Err(EngineError::config(
            format!(
                "pipeline {} wrote windows in the range but its log records no watermark for it",
                def.name
            ),
            Some("reconcile a range committed by this version of sluice".to_string()),
        ));
    }
    let late_partitions: Vec<String> = mine
        .iter()
        .filter(|e| covered([e.epoch, e.epoch]))
        .flat_map(|e| e.late_dirty.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let archive_paths: Vec<String> = archived
        .iter()
        .filter_map(|e| e.archive.as_ref().map(|a| a.path.clone()))
        .collect();
    for (e, path) in archived
        .iter()
        .filter_map(|e| e.archive.as_ref().map(|a| (e.epoch, &a.path)))
    {
        match table.store.head(&table.path(path)).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(EngineError::config(
                    format!(
                        "the raw archive of epoch {e} ({path}) is gone (deleted by vacuum past its archive retention?), so the range cannot be recomputed"
                    ),
                    Some("reconcile a more recent range".to_string()),
                ));
            }
            Err(err) => return Err(EngineError::store(format!("checking {path}"))(err)),
        }
    }
    let archive_events: u64 = archived.iter().filter_map(|e| e.archive.as_ref().map(|a| a.rows)).sum();
    Ok(Range {
        epochs,
        windows,
        live,
        late_partitions,
        archive_paths,
        archive_events,
    })
}

/// Finishes the newest maintenance entry's moves when no maintenance job holds the lease (a
/// repair killed after its commit entry was written).
pub async fn finish_interrupted_maintenance(table: &TableStore) -> Result<()> {
    if let Ok(lease) = WriterLease::acquire_if_stopped(table, MAINTENANCE_WRITER).await {
        // Its moves and deletes are made under the maintenance lease's fence: a maintenance
        // job that starts meanwhile waits until it expires.
        let recovered = CommitLog::new(table.clone(), MAINTENANCE_WRITER)
            .with_fence(lease.fence())
            .recover()
            .await;
        lease.release().await;
        recovered?;
    }
    Ok(())
}

/// Functions in the SELECT whose value differs from run to run: the batch recompute cannot
/// match the stream on columns they feed.
fn volatile_calls(def: &PipelineDef) -> Vec<String> {
    const PER_RUN: [&str; 8] = [
        "now",
        "current_timestamp",
        "current_date",
        "current_time",
        "random",
        "uuid",
        "today",
        "localtimestamp",
    ];
    let mut found = BTreeSet::new();
    let _ = def.plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::ScalarFunction(f) = x
                    && PER_RUN.contains(&f.name())
                {
                    found.insert(f.name().to_string());
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
        })
    });
    found
        .into_iter()
        .map(|f| {
            format!("the SELECT calls {f}(), whose value differs from run to run: the columns it feeds will differ")
        })
        .collect()
}

/// One partition: its directory, the stream's files and the stray files in it.
struct Side {
    dir: String,
    stream: Vec<FileAction>,
    stray: Vec<String>,
}

/// One unit of comparison work, for the partition directory it names first.
enum Unit {
    /// A file the stream committed, named by the snapshot of this epoch.
    Stream(String, String, u64),
    /// A file in the partition directory that no commit names.
    Stray(String, String),
}

/// Digests `units`, `parallel` at a time; each result names its partition.
async fn run_units(
    table: TableStore,
    units: Vec<Unit>,
    key: Arc<[String]>,
    seed: Seed,
    parallel: usize,
) -> Vec<Result<(String, Outcome)>> {
    futures::stream::iter(units.into_iter().map(|u| digest_unit(&table, u, &key, &seed)))
        .buffer_unordered(parallel)
        .collect()
        .await
}

/// What a unit found.
enum Outcome {
    Stream(Digest),
    Batch(Digest),
    Missing(String),
    Unreadable,
}

/// A partition's digests, as units finish.
#[derive(Default)]
struct Accumulated {
    stream: Digest,
    batch: Digest,
    missing_files: Vec<String>,
    unreadable: bool,
}

/// Reads and digests one unit on a blocking thread.
async fn digest_unit(table: &TableStore, unit: Unit, key: &[String], seed: &Seed) -> Result<(String, Outcome)> {
    let (key, seed) = (key.to_vec(), seed.clone());
    let blocking = |f: Box<dyn FnOnce() -> Result<Outcome> + Send>| async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| EngineError::Internal(format!("comparing failed: {e}")))?
    };
    match unit {
        // A compaction or repair that committed after the snapshot may have moved it to
        // `_sluice/removed/`: it is read from there.
        Unit::Stream(i, path, as_of) => match CommitLog::new(table.clone(), READER).read_as_of(&path, as_of).await? {
            None => Ok((i, Outcome::Missing(path))),
            Some(bytes) => Ok((
                i,
                blocking(Box::new(move || Ok(Outcome::Stream(digest_file(bytes, &path, &key, &seed)?)))).await?,
            )),
        },
        Unit::Stray(i, path) => {
            // A stray file that cannot be read still differs (readers trip on it).
            let Ok(Some(bytes)) = table.get_if_exists(&table.path(&path)).await else {
                return Ok((i, Outcome::Unreadable));
            };
            let out = blocking(Box::new(move || {
                Ok(match digest_file(bytes, &path, &key, &seed) {
                    Ok(d) => Outcome::Stream(d),
                    Err(_) => Outcome::Unreadable,
                })
            }))
            .await?;
            Ok((i, out))
        }
    }
}

/// The digest of a Parquet file's rows, batch by batch as they are decoded.
fn digest_file(bytes: bytes::Bytes, path: &str, key: &[String], seed: &Seed) -> Result<Digest> {
    let mut d = Digest::default();
    for batch in batches(bytes, path)? {
        d.add(&batch?, key, seed)?;
    }
    Ok(d)
}

/// The batch side as the recompute streams it: each partition's digest (partitioned as the
/// sink would store the rows), and the rows themselves when `keep` (a repair stages them).
#[derive(Default)]
struct Computed {
    digests: BTreeMap<String, Digest>,
    rows: Vec<RecordBatch>,
}

/// Runs `frame` and digests its rows as they come, one task per partition of its plan.
async fn digest_batch_side(
    frame: DataFrame,
    sink: Arc<dyn Sink>,
    key: Arc<[String]>,
    seed: Seed,
    keep: bool,
) -> Result<Computed> {
    let streams = frame.execute_stream_partitioned().await?;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let (sink, key, seed) = (sink.clone(), key.clone(), seed.clone());
            tokio::spawn(async move {
                let mut part = Computed::default();
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    if keep {
                        part.rows.push(batch.clone());
                    }
                    for (dir, rows) in sink.partition(vec![batch])? {
                        let d = part.digests.entry(dir).or_default();
                        rows.iter().try_for_each(|r| d.add(r, &key, &seed))?;
                    }
                }
                Ok::<_, EngineError>(part)
            })
        })
        .collect();
    let mut all = Computed::default();
    for task in tasks {
        let part = task
            .await
            .map_err(|e| EngineError::Internal(format!("recomputing failed: {e}")))??;
        for (dir, d) in part.digests {
            all.digests.entry(dir).or_default().merge(d);
        }
        all.rows.extend(part.rows);
    }
    Ok(all)
}

/// A partition's report, and the files a repair removes when its sides differ.
fn verdict(side: Side, a: Accumulated, keyed: bool) -> (PartitionReport, Option<Vec<String>>) {
    let (s, b) = (a.stream, a.batch);
    let same = !a.unreadable && side.stray.is_empty() && s.same(&b) && (!keyed || s.keys == b.keys);
    let keys = keyed.then(|| {
        let (missing, extra, changed) = key_differences(&s, &b);
        KeyReport {
            missing,
            extra,
            changed,
        }
    });
    let mut columns = s.columns_differing(&b);
    if !same && columns.is_empty() && s.rows == b.rows && !a.unreadable {
        // Same values per column, arranged in different rows.
        columns.push("(rows)".to_string());
    }
    let stream_files: Vec<String> = side.stream.iter().map(|f| f.path.clone()).collect();
    let remove = (!same).then(|| stream_files.iter().chain(&side.stray).cloned().collect());
    let report = PartitionReport {
        partition: side.dir,
        stream_rows: s.rows,
        batch_rows: b.rows,
        columns,
        verdict: if same { Verdict::Equal } else { Verdict::Differs },
        stream_files,
        missing_files: a.missing_files,
        stray_files: side.stray,
        keys,
    };
    (report, remove)
}

/// The pipeline's SELECT (a windowed one's part below its aggregate) over the archive files,
/// through the source's row-level expectations, planned on `ctx`. `remote`: static tables are read through their own format's provider (a listing
/// table a cluster can serialise) rather than Sluice's read-whole wrapper.
async fn recompute(
    ctx: &SessionContext,
    remote: bool,
    program: &Program,
    def: &PipelineDef,
    table: &TableStore,
    archive: &[String],
) -> Result<DataFrame> {
    let source = program
        .sources
        .get(&def.source)
        .ok_or_else(|| EngineError::Internal(format!("pipeline {} lost its source", def.name)))?;
    let urls = table_urls(ctx, table, archive)?;
    // Read with the schema the files were written with (no view types in place of the
    // source's declared ones).
    let schema = super::archive::archive_schema(&source.schema);
    let raw = ctx
        .read_parquet(urls, ParquetReadOptions::default().schema(&schema))
        .await?;
    let names: Vec<&str> = source.schema.fields().iter().map(|f| f.name().as_str()).collect();
    let mut input = raw.select_columns(&names)?;
    for e in removing_checks(program, &def.source) {
        input = input.filter(e.is_not_false())?;
    }
    // A windowed pipeline's windows take the rows with an event time, as the stream's do.
    if let (Some(_), Some(et)) = (&def.window, &source.event_time) {
        let column = col(datafusion::common::Column::new_unqualified(et.column.as_str()));
        input = input.filter(column.is_not_null())?;
    }
    // The source's scan is replaced by the archive's plan under the source's name (a plan, not
    // a view: a cluster serialises plans of standard nodes and listing tables only).
    let input = input.into_unoptimized_plan();
    // A windowed pipeline's part below its aggregate: the windows are recomputed after.
    let plan = def.window.as_ref().map_or(&def.plan, |w| &w.input);
    let plan = plan
        .clone()
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) if scan.table_name.table() == def.source => {
                let mut b = LogicalPlanBuilder::from(input.clone()).alias(scan.table_name.clone())?;
                if let Some(columns) = &scan.projection {
                    let schema = b.schema().clone();
                    b = b.project(
                        columns
                            .iter()
                            .map(|i| Expr::Column(datafusion::common::Column::from(schema.qualified_field(*i)))),
                    )?;
                }
                Ok(Transformed::yes(b.build()?))
            }
            LogicalPlan::TableScan(mut scan) if remote => {
                let inner = source_as_provider(&scan.source)?
                    .downcast_ref::<StaticTable>()
                    .map(|t| t.inner().clone());
                match inner {
                    Some(inner) => {
                        scan.source = provider_as_source(inner);
                        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                    }
                    None => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
                }
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    Ok(DataFrame::new(ctx.state(), plan))
}

/// Which windows a range of a windowed pipeline covers, and where their rows are.
struct Windows {
    /// The watermark before the range: windows ending by it were emitted earlier (none: from
    /// the first).
    after: Option<i64>,
    /// The watermark after the range: windows ending by it were emitted (none: no window yet).
    through: Option<i64>,
    /// The first epoch that can hold their rows.
    first: u64,
}

/// The windows a windowed pipeline emitted between two watermarks (`after`, exclusive;
/// `through`, inclusive), recomputed from the rows of `input` (the part below the aggregate,
/// over the archive) with the stream's own window state (only those windows open), then
/// through the part above it. Rows whose GROUP BY or aggregate arguments fail to evaluate, windows that fail to evaluate
/// and window rows that fail in the part above are left out, as the stream dead-letters them.
async fn recompute_windows(
    ctx: &SessionContext,
    input: DataFrame,
    def: &sluice_sql::WindowDef,
    bounds: &Windows,
) -> Result<Vec<RecordBatch>> {
    let Some(through) = bounds.through else {
        return Ok(Vec::new());
    };
    let mut open = WindowAggregate::new(def, &ExecutionProps::new())?;
    open.only_ending_in(bounds.after, through);
    let mut rows = input.execute_stream().await?;
    while let Some(batch) = rows.next().await {
        add_isolating(&mut open, &batch?, 0, &mut Vec::new())?;
    }
    let emitted = open.close(through)?.emitted;
    let output = BatchPlan::bind(ctx, &def.output, sluice_sql::WINDOW_TABLE, def.emitted.clone())?;
    if let Ok(rows) = output.execute(&emitted).await {
        return Ok(rows);
    }
    // The part above the aggregate failed: on nothing, the environment's fault (a static
    // table gone); else some window rows fail, and each is tried on its own, the failing ones
    // left out (as the stream isolates and dead-letters them).
    output.execute(&[]).await?;
    let mut rows = Vec::new();
    for window in &emitted {
        match output.execute(std::slice::from_ref(window)).await {
            Ok(out) => rows.extend(out),
            Err(_) => {
                for i in 0..window.num_rows() {
                    if let Ok(out) = output.execute(&[window.slice(i, 1)]).await {
                        rows.extend(out);
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// The row-level checks on `table` that remove rows (`DEAD_LETTER`, `DROP`), unqualified.
fn removing_checks(program: &Program, table: &str) -> Vec<Expr> {
    program
        .expectations
        .iter()
        .filter(|d| d.table == table && d.level == Level::Row && matches!(d.action, Action::DeadLetter | Action::Drop))
        .filter_map(|d| {
            d.expr
                .clone()
                .transform_up(|e| match e {
                    Expr::Column(c) => Ok(Transformed::yes(col(datafusion::common::Column::new_unqualified(
                        c.name,
                    )))),
                    other => Ok(Transformed::no(other)),
                })
                .ok()
                .map(|t| t.data)
        })
        .collect()
}

/// URLs DataFusion can read `paths` (table-relative) at: local files, or the table's store
/// registered under a private scheme.
fn table_urls(ctx: &SessionContext, table: &TableStore, paths: &[String]) -> Result<Vec<String>> {
    if let Some(dir) = &table.local_dir {
        let dir = std::fs::canonicalize(dir).map_err(EngineError::io(format!("resolving {}", dir.display())))?;
        return Ok(paths.iter().map(|p| dir.join(p).display().to_string()).collect());
    }
    let base = url::Url::parse("sluice-table://sink/").map_err(|e| EngineError::Internal(e.to_string()))?;
    ctx.register_object_store(&base, table.store.clone());
    Ok(paths
        .iter()
        .map(|p| format!("sluice-table://sink/{}", table.path(p)))
        .collect())
}

/// A file's partition directory (`k=v/.../`), from its path.
fn partition_dir(f: &FileAction) -> String {
    match f.path.rfind('/') {
        Some(i) => f.path[..=i].to_string(),
        None => String::new(),
    }
}

/// Parquet files directly in partition directory `dir` (table-relative paths, sorted).
async fn list_parquet(table: &TableStore, dir: &str) -> Result<Vec<String>> {
    let listed = table
        .store
        .list_with_delimiter(Some(&table.path(dir)))
        .await
        .map_err(EngineError::store(format!("listing {dir}")))?;
    let mut out: Vec<String> = listed
        .objects
        .iter()
        .map(|m| table.relative(&m.location))
        .filter(|p| p.ends_with(".parquet") && !p.starts_with("_sluice/"))
        .collect();
    out.sort();
    Ok(out)
}

/// A Parquet file's rows; `None` when it does not exist.
pub(crate) async fn read_parquet(
    table: &TableStore,
    path: &object_store::path::Path,
) -> Result<Option<Vec<RecordBatch>>> {
    match table.get_if_exists(path).await? {
        Some(bytes) => Ok(Some(decode(bytes, path.as_ref())?)),
        None => Ok(None),
    }
}

/// The rows of a Parquet file's bytes.
fn decode(bytes: bytes::Bytes, path: &str) -> Result<Vec<RecordBatch>> {
    batches(bytes, path)?.collect()
}

/// A Parquet file's batches, decoded as they are taken.
fn batches(bytes: bytes::Bytes, path: &str) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<'_>> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| EngineError::Internal(format!("reading {path}: {e}")))?;
    Ok(reader.map(move |b| b.map_err(|e| EngineError::Internal(format!("reading {path}: {e}")))))
}

/// A repair's commit: where the batch files are and what the entry records.
struct Repair<'a> {
    log: &'a CommitLog,
    shadow: &'a TableStore,
    shadow_log: &'a CommitLog,
    origin: Origin,
    schema: TableSchema,
    epoch: u64,
    /// Files to remove that no commit named (a stray need not be live).
    strays: BTreeSet<String>,
}

impl Repair<'_> {
    /// Commits one entry replacing each differing partition's files with the batch's.
    async fn commit(self, parts: Vec<(Vec<String>, Vec<FileAction>)>) -> Result<RepairReport> {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for (gone, files) in parts {
            remove.extend(gone);
            for f in files {
                let staged = self.shadow_log.staged_path(&f.path);
                let bytes = self
                    .shadow
                    .store
                    .get(&staged)
                    .await
                    .map_err(EngineError::store(format!("reading staged {}", f.path)))?
                    .bytes()
                    .await
                    .map_err(EngineError::store(format!("reading staged {}", f.path)))?;
                self.log.stage(&f.path, bytes.to_vec()).await?;
                add.push(FileAction {
                    covers: Some(self.origin.clone()),
                    ..f
                });
            }
        }
        // What the comparison saw must still hold: every file to remove that a commit named is
        // still live (strays were named by no commit, and new commits name new files).
        let (strays, named): (Vec<String>, Vec<String>) = remove.into_iter().partition(|p| self.strays.contains(p));
        let output = add.iter().map(|f: &FileAction| f.rows).sum();
        let entry = Transaction::new(MAINTENANCE_WRITER, None, self.epoch, self.schema)
            .doing("reconciling")
            .counts(Counts {
                output,
                ..Default::default()
            })
            .add(add)
            .remove(named)
            .remove_unnamed(strays)
            .commit(&self.log)
            .await?;
        Ok(RepairReport {
            epoch: entry.epoch,
            removed: entry.remove.clone(),
            added: entry.add.iter().map(|f| f.path.clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_dates_or_rfc3339() {
        assert_eq!(parse_instant("1970-01-02").unwrap(), 86_400_000_000);
        assert_eq!(parse_instant("1970-01-01T00:00:01.000002Z").unwrap(), 1_000_002);
        assert_eq!(parse_instant("1970-01-01T01:00:00+01:00").unwrap(), 0);
        assert!(parse_instant("yesterday").is_err());
        let r = TimeRange {
            from_us: Some(10),
            to_us: Some(20),
        };
        assert!(r.contains(10) && r.contains(19) && !r.contains(20) && !r.contains(9));
        assert!(TimeRange::default().contains(i64::MIN));
    }
}
