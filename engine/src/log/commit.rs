//! The commit log of a sink table: `_sluice/log/<epoch:020>.json`, one entry per micro-batch
//! (or compaction / repair), created with an atomic create-if-absent.
//!
//! ```text
//!   stage ──────────────► put log entry N ─────────► move staged files ─────► done
//!   (files under              (PutMode::Create;          (rename staging/W/x
//!    _sluice/staging/W/)       AlreadyExists: same commit  to x)
//!                              = done, other writer = try
//!                              N+1, same writer = stop)
//!        crash here:               crash here:                crash here:
//!        staged files are          entry exists: recovery     recovery finishes
//!        orphans, removed          finishes the moves         the moves
//!        on recovery
//! ```
//!
//! Invariants:
//! 1. A file is visible to log readers iff some entry adds it and no later entry removes it.
//! 2. Entry N+1 is written only after entry N exists; epochs are contiguous from 1.
//! 3. Staged paths are `_sluice/staging/<writer>/<target>`, so an entry alone says where each of
//!    its files was staged; recovery can finish an interrupted commit without other state, and
//!    one writer's recovery never touches another writer's staged files.
//! 4. Every file named by the writer's newest entry is at its target after [`CommitLog::recover`].
//! 5. Nothing under the writer's staging directory survives [`CommitLog::recover`].
//! 7. Target file names carry the writer's name, so two writers never move files onto each other.
//! 6. An entry's `sources` holds the writer's full source positions after that epoch, so its
//!    newest entry alone tells where to resume.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::TableStore;
use crate::retry::RetryPolicy;

/// The log format version this build writes and reads.
pub const LOG_VERSION: u32 = 1;

/// A checkpoint ([`crate::log::checkpoint`]) is written when a commit's epoch is a multiple of
/// this.
pub const CHECKPOINT_INTERVAL: u64 = 100;

/// A data file added by a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAction {
    /// Table-relative path (`order_date=2026-11-22/part-p-42-0.parquet`).
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// Hive partition values, in `PARTITIONED BY` order (`None` = null).
    pub partition: Vec<(String, Option<String>)>,
    /// Whose rows these are, when not the adding commit's own (a repair or a compaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers: Option<Origin>,
}

/// The pipeline and the span of its stream epochs whose raw events a file's rows come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The pipeline.
    pub pipeline: String,
    /// Its epochs, `[first, last]`.
    pub epochs: [u64; 2],
}

impl Origin {
    /// True when the span shares an epoch with `[lo, hi]`.
    pub fn overlaps(&self, [lo, hi]: [u64; 2]) -> bool {
        self.epochs[0] <= hi && self.epochs[1] >= lo
    }
}

/// The raw-archive file of an epoch: every event it accepted, as decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFile {
    /// Table-relative path under `_sluice/raw/`.
    pub path: String,
    /// Events in it.
    pub rows: u64,
    /// Bytes in the file.
    pub bytes: u64,
}

/// A dead-letter file added by a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterFile {
    /// Table-relative path under `_sluice/dead_letter/`.
    pub path: String,
    /// Records in it.
    pub records: u64,
}

/// What happened to the records of an epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Records received from the source.
    pub received: u64,
    /// Records that decoded.
    pub decoded: u64,
    /// Records sent to dead letters (decode, transform or expectation).
    pub dead_lettered: u64,
    /// Rows dropped by an explicit policy: expectations with `ON VIOLATION DROP`, late rows
    /// with `'late' 'drop'`, dedup repeats (the last two also in [`StateEntry`]).
    #[serde(default)]
    pub dropped: u64,
    /// Rows written.
    pub output: u64,
    /// Records received per sender, when the source knows who sent them (HTTP: the token's
    /// name or the client certificate's subject; anonymous requests are not listed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub principals: BTreeMap<String, u64>,
}

/// One column of the committed table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSpec {
    /// Column name.
    pub name: String,
    /// Arrow data type, in Arrow's display form (parsed back with `DataType::from_str`).
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether nulls are allowed.
    pub nullable: bool,
}

/// The table's schema as recorded in the log: all columns, and which are partition columns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Every column, partition columns included, in output order.
    pub columns: Vec<ColumnSpec>,
    /// The `PARTITIONED BY` columns.
    pub partition_by: Vec<String>,
}

impl TableSchema {
    /// The record of a table stored as `schema`, partitioned by `partition_by`.
    pub fn of(schema: &arrow::datatypes::Schema, partition_by: &[String]) -> TableSchema {
        TableSchema {
            columns: schema
                .fields()
                .iter()
                .map(|f| ColumnSpec {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    nullable: f.is_nullable(),
                })
                .collect(),
            partition_by: partition_by.to_vec(),
        }
    }
}

/// One commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitEntry {
    /// Log format version.
    pub version: u32,
    /// The epoch (1, 2, ...): the entry's file name.
    pub epoch: u64,
    /// The pipeline (or job) that wrote it.
    pub pipeline: String,
    /// The server instance that wrote it, when several servers run the pipeline
    /// (`sluice run --instance`, Kafka consumer groups); with `pipeline` it names the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Wall-clock time of the commit, informational only.
    pub committed_at: String,
    /// Data files added.
    pub add: Vec<FileAction>,
    /// Data files removed (table-relative paths).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Dead-letter files added.
    #[serde(default)]
    pub dead_letters: Vec<DeadLetterFile>,
    /// Source positions after this epoch, by source name.
    #[serde(default)]
    pub sources: BTreeMap<String, serde_json::Value>,
    /// Record counts of this epoch.
    #[serde(default)]
    pub counts: Counts,
    /// The table's schema.
    pub schema: TableSchema,
    /// Quality figures of this epoch (profile file, violations, summary), when profiled or checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualityEntry>,
    /// The epoch's raw-archive file, when the sink archives (`archive` = `on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveFile>,
    /// Event time and the state kept across micro-batches, when the source has event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateEntry>,
}

/// What a commit records about event time and the state a pipeline keeps across micro-batches
/// (windows, dedup keys): enough to resume exactly where it left off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateEntry {
    /// Newest event time seen (nanoseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_time_ns: Option<i64>,
    /// The watermark after this epoch (nanoseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_ns: Option<i64>,
    /// The same watermark as RFC 3339, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Each partition's newest event time, with `watermark.partition`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, i64>,
    /// Late rows in this epoch (dropped or dead-lettered by the source's `late` option).
    #[serde(default)]
    pub late: u64,
    /// Repeats dropped by dedup in this epoch.
    #[serde(default)]
    pub duplicates: u64,
    /// Windows emitted in this epoch.
    #[serde(default)]
    pub windows_emitted: u64,
    /// The partitions (`k=v/.../`) this epoch's late rows would have written to: the
    /// reconciliation job's work list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirty: Vec<String>,
    /// The state of every open window, one file each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<StateFile>,
    /// The dedup keys still remembered, one file per epoch that kept keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedup: Vec<StateFile>,
    /// The state files this entry adds (the rest were added by earlier entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    /// Bytes of state held in memory after this epoch.
    #[serde(default)]
    pub state_bytes: u64,
    /// The sink did not archive this epoch's rows (`archive` = `off`): windows its rows
    /// went into cannot be recomputed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unarchived: bool,
}

/// One checkpointed state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Table-relative path.
    pub path: String,
    /// A window's end, or the newest time a key in a dedup file was kept at (nanoseconds).
    pub time_ns: i64,
    /// Rows (groups or keys).
    pub rows: u64,
}

/// What a commit records about the quality of its epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityEntry {
    /// The profile file committed with the epoch (table-relative), when profiling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Violations per expectation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expectations: BTreeMap<String, Violations>,
    /// Rows and nulls per column, by `source.<table>` / `sink.<table>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub summary: BTreeMap<String, TableSummary>,
    /// The sink's drift metrics for this epoch, by `column.metric` (the baseline's input).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Anomaly episodes that started or ended with this epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<AnomalyEvent>,
    /// The anomaly file committed with the epoch (table-relative), when there were events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_file: Option<String>,
}

/// What an epoch's checks found, per expectation, as recorded in the commit entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violations {
    /// The action the expectation takes.
    pub action: String,
    /// `row` or `batch`.
    pub level: String,
    /// Rows that failed (row-level), or 1 when the batch failed (batch-level).
    pub violations: u64,
}

/// One anomaly event: an episode's start or end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// `start` or `end`.
    pub event: String,
    /// The column (`*` for volume).
    pub column: String,
    /// The metric.
    pub metric: String,
    /// The batch's value.
    pub value: f64,
    /// The baseline's median.
    pub baseline: f64,
    /// The baseline's MAD.
    pub mad: f64,
    /// The robust score of the value.
    pub score: f64,
    /// The epoch the episode started in.
    pub started: u64,
}

/// Rows and nulls per column of one side of an epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSummary {
    /// Rows.
    pub rows: u64,
    /// Nulls per column (columns without nulls left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nulls: BTreeMap<String, u64>,
}

/// The writer name of `pipeline` run as `instance`: the pipeline's name alone, or
/// `<pipeline>.<instance>` (a `.` cannot occur in a pipeline name, which is an unqualified
/// table name). File names, staging directories and leases carry it.
pub fn writer_name(pipeline: &str, instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("{pipeline}.{i}"),
        None => pipeline.to_string(),
    }
}

impl CommitEntry {
    /// The writer that made this entry ([`writer_name`]).
    pub fn writer(&self) -> String {
        writer_name(&self.pipeline, self.instance.as_deref())
    }

    /// True when `other` commits the same thing (everything equal but the wall-clock time).
    /// The floats of the quality figures are compared to within a few units in the last place:
    /// one side usually was read back from the log, and serde_json's float parsing need not
    /// give back the last bit.
    pub fn same_commit(&self, other: &CommitEntry) -> bool {
        let (mut a, mut b) = (self.clone(), other.clone());
        a.committed_at.clone_from(&b.committed_at);
        let (qa, qb) = (a.quality.take(), b.quality.take());
        a == b
            && match (serde_json::to_value(&qa), serde_json::to_value(&qb)) {
                (Ok(x), Ok(y)) => json_close(&x, &y),
                _ => false,
            }
    }

    /// Every table-relative target this entry moves into place.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.add
            .iter()
            .map(|a| a.path.as_str())
            .chain(self.dead_letters.iter().map(|d| d.path.as_str()))
            .chain(self.quality.iter().filter_map(|q| q.profile.as_deref()))
            .chain(self.quality.iter().filter_map(|q| q.anomaly_file.as_deref()))
            .chain(self.archive.iter().map(|a| a.path.as_str()))
            .chain(self.state.iter().flat_map(|s| s.added.iter().map(String::as_str)))
    }
}

/// Where a file removed by the commit of `epoch` goes (out of the partition directories,
/// so plain hive readers no longer see it; vacuum deletes it later).
pub fn removed_path(epoch: u64, path: &str) -> String {
    format!("_sluice/removed/{epoch:020}/{path}")
}

/// JSON trees equal but for floats within a few units in the last place.
fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            _ if x == y => true,
            (Some(p), Some(q)) => (p - q).abs() <= 8.0 * f64::EPSILON * p.abs().max(q.abs()),
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_close(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

/// The files `entries` (in epoch order) leave in the table: added and not removed, in commit
/// order (invariant 1).
pub fn live_files(entries: &[CommitEntry]) -> Vec<FileAction> {
    fold_files(Vec::new(), entries).into_iter().map(|(f, _)| f).collect()
}

/// `files` (live, each with the pipeline and stream epochs its rows come from: `covers`, or
/// the commit that added it) after `entries` (in epoch order): removed and replaced files go,
/// added ones come at the end.
pub fn fold_files(files: Vec<(FileAction, Origin)>, entries: &[CommitEntry]) -> Vec<(FileAction, Origin)> {
    let mut at: std::collections::HashMap<String, usize> = files
        .iter()
        .enumerate()
        .map(|(i, (f, _))| (f.path.clone(), i))
        .collect();
    let mut files: Vec<Option<(FileAction, Origin)>> = files.into_iter().map(Some).collect();
    for entry in entries {
        for path in entry.remove.iter().chain(entry.add.iter().map(|a| &a.path)) {
            if let Some(i) = at.remove(path) {
                files[i] = None;
            }
        }
        for a in &entry.add {
            at.insert(a.path.clone(), files.len());
            let origin = a.covers.clone().unwrap_or_else(|| Origin {
                pipeline: entry.pipeline.clone(),
                epochs: [entry.epoch, entry.epoch],
            });
            files.push(Some((a.clone(), origin)));
        }
    }
    files.into_iter().flatten().collect()
}

/// The commit log of one table, as seen by one writer (a pipeline or a job).
#[derive(Debug, Clone)]
pub struct CommitLog {
    table: TableStore,
    writer: String,
    retry: RetryPolicy,
    fence: Option<crate::store::lease::Fence>,
}

/// What [`CommitLog::recover`] found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// This writer's newest entry, if any.
    pub last: Option<CommitEntry>,
    /// The newest epoch of the log (any writer).
    pub newest_epoch: u64,
    /// Staged files removed because no commit names them.
    pub orphans_removed: usize,
    /// Staged files moved into place to finish this writer's newest commit.
    pub moves_completed: usize,
    /// Unfinished multipart uploads of this writer aborted ([`crate::store::upload`]).
    pub uploads_aborted: usize,
}

impl Recovered {
    /// The epoch the next commit tries first.
    pub fn next_epoch(&self) -> u64 {
        self.newest_epoch + 1
    }
}

impl CommitLog {
    /// The log of `table` for `writer` (entries it writes carry this name).
    pub fn new(table: TableStore, writer: &str) -> Self {
        CommitLog {
            table,
            writer: writer.to_string(),
            retry: RetryPolicy::default(),
            fence: None,
        }
    }

    /// Refuses to commit once `fence`'s lease is lost.
    pub fn with_fence(mut self, fence: crate::store::lease::Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Uses `retry` for transient store failures.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The table this log belongs to.
    pub fn table(&self) -> &TableStore {
        &self.table
    }

    /// The back-off for transient store failures.
    pub(crate) fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The writer name.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    fn entry_path(&self, epoch: u64) -> Path {
        self.table.log_dir().join(format!("{epoch:020}.json"))
    }

    /// Where this writer stages `target` (table-relative) before its commit moves it.
    pub fn staged_path(&self, target: &str) -> Path {
        self.staged(target)
    }

    fn staged(&self, target: &str) -> Path {
        self.table.path(&format!("_sluice/staging/{}/{target}", self.writer))
    }

    /// Every epoch in the log, in order (a LIST of the whole log: readers of the table's
    /// state use [`CommitLog::snapshot`], which lists only the entries after the newest
    /// checkpoint).
    pub async fn epochs(&self) -> Result<Vec<u64>> {
        self.epochs_after(0).await
    }

    /// The epochs after `after`, in order: the store lists from `after`'s entry on (S3's
    /// `start-after`), so the cost is the count of newer entries, not the log's length.
    pub async fn epochs_after(&self, after: u64) -> Result<Vec<u64>> {
        let log_dir = self.table.log_dir();
        let offset = self.entry_path(after);
        let metas: Vec<_> = self
            .retry
            .run("listing the commit log", || async {
                let listed = if after == 0 {
                    self.table.store.list(Some(&log_dir))
                } else {
                    self.table.store.list_with_offset(Some(&log_dir), &offset)
                };
                listed.try_collect::<Vec<_>>().await.map_err(EngineError::store(format!(
                    "listing the commit log of {}",
                    self.table.location
                )))
            })
            .await?;
        let mut epochs: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .filter(|e| *e > after)
            .collect();
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// The bytes of `path`, a file live in the snapshot of epoch `as_of`, even when a commit
    /// after it (a compaction, a repair) has moved it to `_sluice/removed/<epoch>/` meanwhile:
    /// the entries after `as_of` say which commit removed it. `None` when the file is gone for
    /// good (vacuum deleted it past its retention, or it was lost).
    pub async fn read_as_of(&self, path: &str, as_of: u64) -> Result<Option<bytes::Bytes>> {
        if let Some(bytes) = self.table.get_if_exists(&self.table.path(path)).await? {
            return Ok(Some(bytes));
        }
        for epoch in self.epochs_after(as_of).await? {
            if self.read(epoch).await?.remove.iter().any(|r| r == path) {
                let moved = self.table.path(&removed_path(epoch, path));
                return self.table.get_if_exists(&moved).await;
            }
        }
        Ok(None)
    }

    /// The newest `n` entries (fewer when the log is shorter), oldest first: a snapshot and
    /// a LIST from `n` before its newest epoch.
    pub async fn recent_entries(&self, n: usize) -> Result<Vec<CommitEntry>> {
        let newest = self.snapshot().await?.newest_epoch();
        let mut out = Vec::new();
        for epoch in self.epochs_after(newest.saturating_sub(n as u64)).await? {
            out.push(self.read(epoch).await?);
        }
        Ok(out)
    }

    /// Reads the entry of `epoch`.
    pub async fn read(&self, epoch: u64) -> Result<CommitEntry> {
        let path = self.entry_path(epoch);
        let bytes = self
            .retry
            .run("reading a commit entry", || async {
                let get = self
                    .table
                    .store
                    .get(&path)
                    .await
                    .map_err(EngineError::store(format!("reading {path}")))?;
                get.bytes().await.map_err(EngineError::store(format!("reading {path}")))
            })
            .await?;
        let entry: CommitEntry = serde_json::from_slice(&bytes).map_err(|e| EngineError::CommitLog {
            path: path.to_string(),
            message: format!("not a valid entry ({e}); the entry was damaged after it was written (entries are created whole, atomically)"),
        })?;
        if entry.version != LOG_VERSION {
            return Err(EngineError::CommitLog {
                path: path.to_string(),
                message: format!(
                    "log version {} is not supported (this build reads {LOG_VERSION})",
                    entry.version
                ),
            });
        }
        if entry.epoch != epoch {
            return Err(EngineError::CommitLog {
                path: path.to_string(),
                message: format!("entry says epoch {}", entry.epoch),
            });
        }
        Ok(entry)
    }

    /// Reads every entry, in epoch order.
    pub async fn entries(&self) -> Result<Vec<CommitEntry>> {
        let mut out = Vec::new();
        for e in self.epochs().await? {
            match self.read(e).await {
                Ok(entry) => out.push(entry),
                // Deleted by vacuum's log retention since the listing.
                Err(EngineError::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The files of the committed table: added and not removed, in commit order (read from
    /// the newest checkpoint and the entries after it).
    pub async fn committed_files(&self) -> Result<(Vec<FileAction>, Option<TableSchema>)> {
        let snap = self.snapshot().await?;
        let empty = snap.newest_epoch() == 0;
        let folded = snap.folded();
        let schema = (!empty).then_some(folded.schema);
        Ok((folded.files.into_iter().map(|(f, _)| f).collect(), schema))
    }

    /// Brings the table to a clean state for this writer: finishes the moves of its newest entry
    /// (invariant 4) and removes its staged files (invariant 5).
    pub async fn recover(&self) -> Result<Recovered> {
        self.table.check_atomic_create().await?;
        let snap = self.snapshot().await?;
        let mut rec = Recovered {
            newest_epoch: snap.newest_epoch(),
            last: snap.newest_of(&self.writer),
            ..Default::default()
        };
        if let Some(last) = rec.last.clone() {
            // Data files a later commit removed (a repair, a compaction) are not moved back.
            let live = snap.live_paths();
            let removed_later = last
                .add
                .iter()
                .filter(|a| !live.contains(&a.path))
                .map(|a| a.path.clone())
                .collect();
            rec.moves_completed = self.move_into_place(&last, &removed_later).await?;
        }
        rec.uploads_aborted = crate::store::upload::abort_recorded(&self.table, &self.writer, &self.retry).await?;
        let prefix = self.table.path(&format!("_sluice/staging/{}", self.writer));
        let staged: Vec<_> = self
            .retry
            .run("listing staged files", || async {
                self.table
                    .store
                    .list(Some(&prefix))
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(EngineError::store("listing staged files"))
            })
            .await?;
        for meta in staged {
            crate::crash::point("before_orphan_delete");
            self.retry
                .run("removing an orphan", || {
                    self.fenced(async {
                        match self.table.store.delete(&meta.location).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(EngineError::store(format!("removing orphan {}", meta.location))(e)),
                        }
                    })
                })
                .await?;
            rec.orphans_removed += 1;
        }
        Ok(rec)
    }

    /// Writes `bytes` to the staging path of `target` (table-relative), within the fence (a
    /// staged name depends only on the writer and the epoch: a write landing after a takeover
    /// would overwrite the new holder's file of the same epoch).
    pub async fn stage(&self, target: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.staged(target);
        if let Some(multipart) = &self.table.multipart
            && bytes.len() > self.table.settings.part_size
        {
            return self
                .fenced(crate::store::upload::put_recorded(
                    &self.table,
                    multipart,
                    &self.writer,
                    target,
                    &path,
                    bytes,
                    &self.retry,
                ))
                .await;
        }
        let payload = PutPayload::from(bytes);
        self.retry
            .run("staging a file", || async {
                self.fenced(async {
                    self.table
                        .store
                        .put(&path, payload.clone())
                        .await
                        .map_err(EngineError::store(format!("staging {path}")))
                })
                .await
            })
            .await?;
        Ok(())
    }

    /// Runs `write` while this writer's fence holds: checked first, and the write abandoned
    /// (dropped: no further attempt) once the fence expires; a renewal meanwhile lets it go on.
    /// A process that takes the lease over waits one more TTL before its recovery, so a write
    /// sent in time has landed or been abandoned by then (`store::lease`).
    pub(crate) async fn fenced<T>(&self, write: impl Future<Output = Result<T>>) -> Result<T> {
        match &self.fence {
            Some(fence) => fence.guard(&self.writer, write).await,
            None => write.await,
        }
    }

    /// Moves the staged files of `entry` into place (but those in `skip`: removed by a later
    /// commit), and its removed files out of the way; idempotent. Returns how many it moved.
    async fn move_into_place(&self, entry: &CommitEntry, skip: &std::collections::BTreeSet<String>) -> Result<usize> {
        let mut moved = 0;
        for target in entry.targets().filter(|t| !skip.contains(*t)) {
            let from = self.staged(target);
            let to = self.table.path(target);
            let did = self
                .retry
                .run("moving a committed file into place", || {
                    self.fenced(self.move_one(entry, target, &from, &to))
                })
                .await?;
            if did {
                moved += 1;
                crate::crash::point("after_move");
            }
        }
        for path in &entry.remove {
            let from = self.table.path(path);
            let to = self.table.path(&removed_path(entry.epoch, path));
            self.retry
                .run("moving a removed file out", || {
                    self.fenced(async {
                        match self.table.store.rename(&from, &to).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(EngineError::store(format!("moving {from} to {to}"))(e)),
                        }
                    })
                })
                .await?;
        }
        Ok(moved)
    }

    /// Moves one committed file from staging into place: `true` when moved, `false` when it
    /// already was.
    async fn move_one(&self, entry: &CommitEntry, target: &str, from: &Path, to: &Path) -> Result<bool> {
        match self.table.store.rename(from, to).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => match self.table.store.head(to).await {
                // Moved by an earlier attempt of this same commit.
                Ok(_) => Ok(false),
                Err(object_store::Error::NotFound { .. }) => Err(EngineError::CommitLog {
                    path: self.entry_path(entry.epoch).to_string(),
                    message: format!("file {target} is committed but neither it nor its staged copy exists"),
                }),
                Err(e) => Err(EngineError::store(format!("checking {to}"))(e)),
            },
            Err(e) => Err(EngineError::store(format!("moving {from} to {to}"))(e)),
        }
    }

    /// Commits `entry`: creates its log file with create-if-absent, then moves its staged files
    /// into place. When another writer took the epoch first, the entry moves to the next free
    /// epoch (its `epoch` is updated); when the same writer did (a second instance of the same
    /// pipeline), the commit stops with an error. Every file the entry names must be staged.
    pub async fn commit(&self, entry: &mut CommitEntry) -> Result<()> {
        crate::crash::point("after_stage");
        self.table.check_atomic_create().await?;
        let mut conflicts = 0u32;
        loop {
            let path = self.entry_path(entry.epoch);
            let body = serde_json::to_vec_pretty(&*entry)
                .map_err(|e| EngineError::Internal(format!("encoding commit entry: {e}")))?;
            let payload = PutPayload::from(body);
            let put = self
                .retry
                .run("writing a commit entry", || async {
                    self.fenced(async {
                        self.table
                            .create(&path, payload.clone())
                            .await
                            .map_err(EngineError::store(format!("writing {path}")))
                    })
                    .await
                })
                .await;
            match put {
                Ok(_) => break,
                Err(EngineError::Store {
                    source: object_store::Error::AlreadyExists { .. },
                    ..
                }) => {
                    let existing = match self.read(entry.epoch).await {
                        Ok(e) => e,
                        // A conflict answer (S3's 409) with nothing there yet: try again.
                        Err(EngineError::Store {
                            source: object_store::Error::NotFound { .. },
                            ..
                        }) if conflicts < 10 => {
                            conflicts += 1;
                            tokio::time::sleep(self.retry.delay(conflicts)).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if existing.same_commit(entry) {
                        // Our own earlier attempt got through; its answer was lost.
                        break;
                    }
                    if existing.writer() == entry.writer() {
                        return Err(EngineError::CommitLog {
                            path: path.to_string(),
                            message: format!(
                                "epoch {} was committed by another instance of pipeline {}; two servers are running the same pipeline on this table",
                                entry.epoch, entry.pipeline
                            ),
                        });
                    }
                    metrics::counter!("sluice_commit_conflicts_total", "pipeline" => entry.pipeline.clone())
                        .increment(1);
                    let newest = self.epochs().await?.last().copied().unwrap_or(entry.epoch);
                    entry.epoch = newest.max(entry.epoch) + 1;
                }
                Err(e) => return Err(e),
            }
        }
        crate::crash::point("after_log_put");
        self.move_into_place(entry, &Default::default()).await?;
        if entry.epoch % CHECKPOINT_INTERVAL == 0
            && let Err(e) = self.write_checkpoint(entry.epoch).await
        {
            // Only an optimisation: readers read more entries without it.
            tracing::warn!(epoch = entry.epoch, error = %e, "could not write a commit-log checkpoint");
        }
        Ok(())
    }
}

#[cfg(test)]
impl CommitEntry {
    /// A bare entry of `pipeline` at `epoch` adding `files` (one row and one byte each).
    pub(crate) fn adding(epoch: u64, pipeline: &str, files: &[&str]) -> CommitEntry {
        CommitEntry {
            version: LOG_VERSION,
            epoch,
            pipeline: pipeline.into(),
            instance: None,
            committed_at: String::new(),
            add: files
                .iter()
                .map(|f| FileAction {
                    path: f.to_string(),
                    rows: 1,
                    bytes: 1,
                    partition: vec![],
                    covers: None,
                })
                .collect(),
            remove: vec![],
            dead_letters: vec![],
            quality: None,
            archive: None,
            state: None,
            sources: BTreeMap::new(),
            counts: Counts::default(),
            schema: TableSchema::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(epoch: u64, files: &[&str]) -> CommitEntry {
        CommitEntry::adding(epoch, "p", files)
    }

    // A retried commit compares its entry with the one in the log: floats in the quality
    // figures must not make the same commit look like another writer's.
    #[test]
    fn an_entry_with_floats_is_the_same_commit_after_a_trip_through_the_log() {
        let mut e = entry(1, &["a"]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let metrics = (0..2000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (
                    format!("c{i}.mean"),
                    f64::from_bits(x >> 2) * if i % 2 == 0 { 1.0 } else { -1.0 },
                )
            })
            .filter(|(_, v)| v.is_finite())
            .collect();
        e.quality = Some(QualityEntry {
            metrics,
            ..Default::default()
        });
        let back: CommitEntry = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(back.same_commit(&e) && e.same_commit(&back));
        let mut other = back.clone();
        other.add[0].rows = 2;
        assert!(!other.same_commit(&e));
    }

    #[tokio::test]
    async fn commit_moves_files_and_recovery_cleans_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new(TableStore::open(dir.path().to_str().unwrap()).unwrap(), "p");
        log.stage("a/x.parquet", b"1".to_vec()).await.unwrap();
        let mut e = entry(1, &["a/x.parquet"]);
        log.commit(&mut e).await.unwrap();
        assert!(dir.path().join("a/x.parquet").exists());
        // Committing the same entry again is a no-op.
        log.commit(&mut e).await.unwrap();
        assert_eq!(e.epoch, 1);
        // The same writer cannot commit something else at a taken epoch.
        log.stage("a/y.parquet", b"2".to_vec()).await.unwrap();
        assert!(matches!(
            log.commit(&mut entry(1, &["a/y.parquet"])).await,
            Err(EngineError::CommitLog { .. })
        ));
        let rec = log.recover().await.unwrap();
        assert_eq!(rec.next_epoch(), 2);
        assert_eq!(rec.orphans_removed, 1);
        assert!(!dir.path().join("_sluice/staging/p/a/y.parquet").exists());
    }

    // A writer whose last commit's files a later repair or compaction removed restarts: it
    // neither fails on the moved-away file nor puts it back where readers read.
    #[tokio::test]
    async fn recovery_leaves_files_a_later_commit_removed() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let log = CommitLog::new(table.clone(), "p");
        log.stage("a/f.parquet", b"1".to_vec()).await.unwrap();
        log.commit(&mut entry(1, &["a/f.parquet"])).await.unwrap();
        let job = CommitLog::new(table, "maintenance");
        job.stage("a/g.parquet", b"2".to_vec()).await.unwrap();
        let mut repair = entry(2, &["a/g.parquet"]);
        repair.pipeline = "maintenance".into();
        repair.remove = vec!["a/f.parquet".into()];
        job.commit(&mut repair).await.unwrap();
        assert!(
            !dir.path().join("a/f.parquet").exists(),
            "moved out of the readers' way"
        );
        assert!(
            dir.path()
                .join("_sluice/removed/00000000000000000002/a/f.parquet")
                .exists()
        );
        // A reader whose snapshot (epoch 1) still names the file reads it from where the
        // compaction moved it; a file no commit removed and that is gone is `None`.
        assert_eq!(
            log.read_as_of("a/f.parquet", 1).await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(log.read_as_of("a/g.parquet", 1).await.unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(log.read_as_of("a/lost.parquet", 1).await.unwrap(), None);
        let rec = log.recover().await.unwrap();
        assert_eq!(rec.moves_completed, 0);
        assert!(!dir.path().join("a/f.parquet").exists());
        let (files, _) = log.committed_files().await.unwrap();
        assert_eq!(
            files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            vec!["a/g.parquet"]
        );
    }

    #[tokio::test]
    async fn recovery_finishes_an_interrupted_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new(TableStore::open(dir.path().to_str().unwrap()).unwrap(), "p");
        log.stage("f.parquet", b"1".to_vec()).await.unwrap();
        // Entry written, moves not done (a crash between the two).
        let e = entry(1, &["f.parquet"]);
        let path = log.entry_path(1);
        log.table
            .store
            .put(&path, PutPayload::from(serde_json::to_vec(&e).unwrap()))
            .await
            .unwrap();
        let rec = log.recover().await.unwrap();
        assert_eq!(rec.moves_completed, 1);
        assert!(dir.path().join("f.parquet").exists());
        let (files, _) = log.committed_files().await.unwrap();
        assert_eq!(files.len(), 1);
    }

    #[tokio::test]
    async fn a_truncated_entry_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new(TableStore::open(dir.path().to_str().unwrap()).unwrap(), "p");
        log.stage("f.parquet", b"1".to_vec()).await.unwrap();
        log.commit(&mut entry(1, &["f.parquet"])).await.unwrap();
        let p = dir.path().join(format!("_sluice/log/{:020}.json", 1));
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let err = log.recover().await.unwrap_err().to_string();
        assert!(err.contains("not a valid entry"), "{err}");
    }

    // Concurrent committers: several writers race on one log; epochs stay contiguous and each
    // file is committed exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_committers() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let writers = 4;
        let per = 15;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let log = CommitLog::new(table.clone(), &format!("w{w}"));
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    let next = log.recover().await.unwrap().next_epoch();
                    let target = format!("part-w{w}-{i}.parquet");
                    log.stage(&target, vec![w as u8, i as u8]).await.unwrap();
                    let mut e = entry(next, &[&target]);
                    e.pipeline = format!("w{w}");
                    log.commit(&mut e).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let log = CommitLog::new(table, "reader");
        let epochs = log.epochs().await.unwrap();
        assert_eq!(epochs, (1..=(writers * per) as u64).collect::<Vec<_>>());
        let (files, _) = log.committed_files().await.unwrap();
        let mut names: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), writers * per);
        for n in names {
            assert!(dir.path().join(&n).exists(), "{n} in place");
        }
    }
}
