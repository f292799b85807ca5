//! The commit log of a sink table: `_sluice/log/<epoch:020>.json`, one entry per micro-batch
//! (or compaction / repair), created with an atomic create-if-absent.
//!
//! ```text
//!   stage ──────────────► put log entry N ─────────► move staged files ─────► done
//!   (files under              (PutMode::Create;          (rename staging/N/x
//!    _sluice/staging/N/)       AlreadyExists = another     to x)
//!                              writer won epoch N)
//!        crash here:               crash here:                crash here:
//!        staged files are          entry exists: recovery     recovery finishes
//!        orphans, removed          finishes the moves         the moves
//!        on recovery
//! ```
//!
//! Invariants:
//! 1. A file is visible to log readers iff some entry adds it and no later entry removes it.
//! 2. Entry N+1 is written only after entry N exists; epochs are contiguous from 1.
//! 3. Staged paths are `_sluice/staging/<epoch>/<target>`, so an entry alone says where each of
//!    its files was staged; recovery can finish an interrupted commit without other state.
//! 4. Every file named by the newest entry is at its target after [`CommitLog::recover`].
//! 5. Nothing under `_sluice/staging/` survives [`CommitLog::recover`].
//! 6. An entry's `sources` holds the pipeline's full source positions after that epoch, so the
//!    newest entry alone tells where to resume.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::TableStore;

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
    /// Records sent to dead letters (decode or transform).
    pub dead_lettered: u64,
    /// Rows written.
    pub output: u64,
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

/// One commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitEntry {
    /// Log format version.
    pub version: u32,
    /// The epoch (1, 2, ...): the entry's file name.
    pub epoch: u64,
    /// The pipeline (or job) that wrote it.
    pub pipeline: String,
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
}

impl CommitEntry {
    /// True when `other` commits the same thing (everything equal but the wall-clock time).
    pub fn same_commit(&self, other: &CommitEntry) -> bool {
        let mut a = self.clone();
        a.committed_at.clone_from(&other.committed_at);
        &a == other
    }

    /// Every table-relative target this entry moves into place.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.add
            .iter()
            .map(|a| a.path.as_str())
            .chain(self.dead_letters.iter().map(|d| d.path.as_str()))
    }
}

/// The commit log of one table.
#[derive(Debug, Clone)]
pub struct CommitLog {
    table: TableStore,
}

/// What [`CommitLog::recover`] found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The newest entry, if any.
    pub last: Option<CommitEntry>,
    /// Staged files removed because no commit names them.
    pub orphans_removed: usize,
    /// Staged files moved into place to finish the newest commit.
    pub moves_completed: usize,
}

impl Recovered {
    /// The epoch the next commit gets.
    pub fn next_epoch(&self) -> u64 {
        self.last.as_ref().map_or(1, |e| e.epoch + 1)
    }
}

impl CommitLog {
    /// The log of `table`.
    pub fn new(table: TableStore) -> Self {
        CommitLog { table }
    }

    /// The table this log belongs to.
    pub fn table(&self) -> &TableStore {
        &self.table
    }

    fn entry_path(&self, epoch: u64) -> Path {
        self.table.log_dir().join(format!("{epoch:020}.json"))
    }

    /// The epochs present in the log, ascending.
    pub async fn epochs(&self) -> Result<Vec<u64>> {
        let metas: Vec<_> = self
            .table
            .store
            .list(Some(&self.table.log_dir()))
            .try_collect()
            .await
            .map_err(EngineError::store(format!(
                "listing the commit log of {}",
                self.table.location
            )))?;
        let mut epochs: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// Reads the entry of `epoch`.
    pub async fn read(&self, epoch: u64) -> Result<CommitEntry> {
        let path = self.entry_path(epoch);
        let bytes = self
            .table
            .store
            .get(&path)
            .await
            .map_err(EngineError::store(format!("reading {path}")))?
            .bytes()
            .await
            .map_err(EngineError::store(format!("reading {path}")))?;
        let entry: CommitEntry =
            serde_json::from_slice(&bytes).map_err(|e| EngineError::CommitLog {
                path: path.to_string(),
                message: format!("not a valid entry: {e}"),
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
            out.push(self.read(e).await?);
        }
        Ok(out)
    }

    /// The newest entry, if any.
    pub async fn latest(&self) -> Result<Option<CommitEntry>> {
        match self.epochs().await?.last() {
            Some(e) => Ok(Some(self.read(*e).await?)),
            None => Ok(None),
        }
    }

    /// The files of the committed table: added and not removed, in commit order.
    pub async fn committed_files(&self) -> Result<(Vec<FileAction>, Option<TableSchema>)> {
        let mut files: Vec<FileAction> = Vec::new();
        let mut schema = None;
        for entry in self.entries().await? {
            files.retain(|f| !entry.remove.contains(&f.path));
            files.retain(|f| !entry.add.iter().any(|a| a.path == f.path));
            files.extend(entry.add.iter().cloned());
            schema = Some(entry.schema.clone());
        }
        Ok((files, schema))
    }

    /// Brings the table to a clean committed state: finishes the moves of the newest entry
    /// (invariant 4) and removes every staged file (invariant 5).
    pub async fn recover(&self) -> Result<Recovered> {
        let mut rec = Recovered {
            last: self.latest().await?,
            ..Default::default()
        };
        if let Some(last) = &rec.last {
            for target in last.targets() {
                let to = self.table.path(target);
                match self.table.store.head(&to).await {
                    Ok(_) => continue,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(EngineError::store(format!("checking {to}"))(e)),
                }
                let from = self.table.staged(last.epoch, target);
                self.table.store.rename(&from, &to).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => EngineError::CommitLog {
                        path: self.entry_path(last.epoch).to_string(),
                        message: format!("file {target} is committed but neither it nor its staged copy exists"),
                    },
                    e => EngineError::store(format!("moving {from} to {to}"))(e),
                })?;
                rec.moves_completed += 1;
            }
        }
        let staged: Vec<_> = self
            .table
            .store
            .list(Some(&self.table.staging_dir()))
            .try_collect()
            .await
            .map_err(EngineError::store("listing staged files"))?;
        for meta in staged {
            match self.table.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => rec.orphans_removed += 1,
                Err(e) => {
                    return Err(EngineError::store(format!(
                        "removing orphan {}",
                        meta.location
                    ))(e));
                }
            }
        }
        Ok(rec)
    }

    /// Writes `bytes` to the staging path of `target` for `epoch`.
    pub async fn stage(&self, epoch: u64, target: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.table.staged(epoch, target);
        self.table
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(EngineError::store(format!("staging {path}")))?;
        Ok(())
    }

    /// Commits `entry`: creates its log file (failing if the epoch exists), then moves its staged
    /// files into place. Every file the entry names must have been staged for its epoch.
    pub async fn commit(&self, entry: &CommitEntry) -> Result<()> {
        let path = self.entry_path(entry.epoch);
        let body = serde_json::to_vec_pretty(entry)
            .map_err(|e| EngineError::Internal(format!("encoding commit entry: {e}")))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .table
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Our own earlier attempt (the put succeeded, its answer was lost)? Then finish it.
                let existing = self.read(entry.epoch).await?;
                if !existing.same_commit(entry) {
                    return Err(EngineError::CommitLog {
                        path: path.to_string(),
                        message: format!("epoch {} was committed by another writer", entry.epoch),
                    });
                }
            }
            Err(e) => return Err(EngineError::store(format!("writing {path}"))(e)),
        }
        for target in entry.targets() {
            let from = self.table.staged(entry.epoch, target);
            let to = self.table.path(target);
            match self.table.store.rename(&from, &to).await {
                Ok(()) => {}
                // Moved by an earlier attempt of this same commit.
                Err(object_store::Error::NotFound { .. })
                    if self.table.store.head(&to).await.is_ok() => {}
                Err(e) => return Err(EngineError::store(format!("moving {from} to {to}"))(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(epoch: u64, files: &[&str]) -> CommitEntry {
        CommitEntry {
            version: LOG_VERSION,
            epoch,
            pipeline: "p".into(),
            committed_at: String::new(),
            add: files
                .iter()
                .map(|f| FileAction {
                    path: f.to_string(),
                    rows: 1,
                    bytes: 1,
                    partition: vec![],
                })
                .collect(),
            remove: vec![],
            dead_letters: vec![],
            sources: BTreeMap::new(),
            counts: Counts::default(),
            schema: TableSchema::default(),
        }
    }

    #[tokio::test]
    async fn commit_moves_files_and_recovery_cleans_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new(TableStore::open(dir.path().to_str().unwrap()).unwrap());
        log.stage(1, "a/x.parquet", b"1".to_vec()).await.unwrap();
        log.commit(&entry(1, &["a/x.parquet"])).await.unwrap();
        assert!(dir.path().join("a/x.parquet").exists());
        // An epoch is committed once.
        log.stage(1, "a/y.parquet", b"2".to_vec()).await.unwrap();
        assert!(matches!(
            log.commit(&entry(1, &["a/y.parquet"])).await,
            Err(EngineError::CommitLog { .. })
        ));
        let rec = log.recover().await.unwrap();
        assert_eq!(rec.next_epoch(), 2);
        assert_eq!(rec.orphans_removed, 1);
        assert!(
            !dir.path()
                .join("_sluice/staging")
                .join(format!("{:020}", 1))
                .join("a/y.parquet")
                .exists()
        );
    }

    #[tokio::test]
    async fn recovery_finishes_an_interrupted_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::new(TableStore::open(dir.path().to_str().unwrap()).unwrap());
        log.stage(1, "f.parquet", b"1".to_vec()).await.unwrap();
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
}
