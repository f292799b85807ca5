//! The records of the commit log: an entry ([`CommitEntry`]) and what it names — data files and
//! the epochs they cover, dead-letter, archive, profile and state files, counts, the table's
//! schema — with the pure functions over them (folding entries into the live files, a
//! writer's name, where a removed file goes). The protocol that writes and reads them is
//! [`crate::log::commit`]; building an entry is [`crate::log::transaction`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The log format version this build writes and reads.
pub const LOG_VERSION: u32 = 1;

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

impl FileAction {
    /// A file of `rows` rows and `bytes` bytes at `path`, in no partition, whose rows are the
    /// adding commit's own.
    pub fn new(path: &str, rows: u64, bytes: u64) -> Self {
        FileAction {
            path: path.to_string(),
            rows,
            bytes,
            partition: vec![],
            covers: None,
        }
    }
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
