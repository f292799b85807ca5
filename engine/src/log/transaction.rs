//! A commit as a value: a [`Transaction`] builds every entry a writer commits — a stream's
//! epoch, a compaction, a repair — from the writer, the epoch it read the log at and the files
//! it removes, and [`Transaction::commit`] checks it against the log before the entry is
//! written (as delta-rs' `CommitBuilder` → `PreparedCommit` with its conflict checker):
//!
//! 1. every file it removes that a commit named must still be live (a compaction or repair
//!    that committed meanwhile removed it: [`CommitError::RemovedConcurrently`], nothing is
//!    written);
//! 2. the entry takes the first epoch after the log's newest (and not before the one it was
//!    built for);
//! 3. [`CommitLog::commit`] writes it atomically and moves its files into place, under the
//!    writer's fence.
//!
//! Files no commit named (strays a reconcile found) are removed without the check.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{CommitError, Result};
use crate::log::commit::CommitLog;
use crate::log::entry::{
    ArchiveFile, CommitEntry, Counts, DeadLetterFile, FileAction, LOG_VERSION, QualityEntry, StateEntry, TableSchema,
};

/// One entry being built, with what must still hold when it is committed.
#[derive(Debug, Clone)]
pub struct Transaction {
    entry: CommitEntry,
    /// Removed files that must still be live at commit (all removed files but strays).
    expect_live: BTreeSet<String>,
    /// What the writer is doing, for the error when a removed file went meanwhile.
    job: String,
}

impl Transaction {
    /// A transaction of `pipeline` (run as `instance`, when several servers share it) for
    /// `epoch` (the first epoch after the log it read), writing a table of `schema`.
    pub fn new(pipeline: &str, instance: Option<String>, epoch: u64, schema: TableSchema) -> Self {
        Transaction {
            entry: CommitEntry {
                version: LOG_VERSION,
                epoch,
                pipeline: pipeline.to_string(),
                instance,
                committed_at: chrono::Utc::now().to_rfc3339(),
                add: vec![],
                remove: vec![],
                dead_letters: vec![],
                sources: BTreeMap::new(),
                counts: Counts::default(),
                schema,
                quality: None,
                archive: None,
                state: None,
            },
            expect_live: BTreeSet::new(),
            job: "committing".to_string(),
        }
    }

    /// Names what the writer is doing (`compacting`, `reconciling`) in its errors.
    pub fn doing(mut self, job: &str) -> Self {
        self.job = job.to_string();
        self
    }

    /// The commit time recorded in the entry (informational).
    pub fn at(mut self, when: chrono::DateTime<chrono::Utc>) -> Self {
        self.entry.committed_at = when.to_rfc3339();
        self
    }

    /// Adds data files.
    pub fn add(mut self, files: impl IntoIterator<Item = FileAction>) -> Self {
        self.entry.add.extend(files);
        self
    }

    /// Removes files a commit named: each must still be live when the entry is written.
    pub fn remove(mut self, paths: impl IntoIterator<Item = String>) -> Self {
        for p in paths {
            self.expect_live.insert(p.clone());
            self.entry.remove.push(p);
        }
        self
    }

    /// Removes files no commit named (strays): no liveness check.
    pub fn remove_unnamed(mut self, paths: impl IntoIterator<Item = String>) -> Self {
        self.entry.remove.extend(paths);
        self
    }

    /// Records the epoch's dead-letter files.
    pub fn dead_letters(mut self, files: Vec<DeadLetterFile>) -> Self {
        self.entry.dead_letters = files;
        self
    }

    /// Records the writer's source positions after this entry.
    pub fn sources(mut self, positions: BTreeMap<String, serde_json::Value>) -> Self {
        self.entry.sources = positions;
        self
    }

    /// Records the epoch's counts.
    pub fn counts(mut self, counts: Counts) -> Self {
        self.entry.counts = counts;
        self
    }

    /// Records the epoch's quality figures.
    pub fn quality(mut self, quality: Option<QualityEntry>) -> Self {
        self.entry.quality = quality;
        self
    }

    /// Records the epoch's raw-archive file.
    pub fn archive(mut self, archive: Option<ArchiveFile>) -> Self {
        self.entry.archive = archive;
        self
    }

    /// Records the event-time state after the epoch.
    pub fn state(mut self, state: Option<StateEntry>) -> Self {
        self.entry.state = state;
        self
    }

    /// The entry as built so far.
    pub fn entry(&self) -> &CommitEntry {
        &self.entry
    }

    /// The entry, for a writer that commits it itself later (a stream epoch retried as is).
    pub fn into_entry(self) -> CommitEntry {
        self.entry
    }

    /// Checks the transaction against the log as it is now and commits it (its files staged
    /// with `log` beforehand); returns the entry as committed (its epoch may have moved on).
    pub async fn commit(self, log: &CommitLog) -> Result<CommitEntry> {
        let Transaction {
            mut entry,
            expect_live,
            job,
        } = self;
        if !expect_live.is_empty() {
            let snap = log.snapshot().await?;
            let live = snap.live_paths();
            if let Some(path) = expect_live.iter().find(|p| !live.contains(*p)) {
                return Err(CommitError::RemovedConcurrently {
                    path: path.clone(),
                    job,
                }
                .into());
            }
            entry.epoch = entry.epoch.max(snap.newest_epoch() + 1);
        }
        log.commit(&mut entry).await?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::EngineError;
    use crate::store::TableStore;

    /// A compaction whose input a repair removed meanwhile is refused whole (nothing written);
    /// one whose inputs are live takes the first free epoch after the log's newest.
    #[tokio::test]
    async fn a_removed_input_refuses_the_commit_and_epochs_move_on() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let stream = CommitLog::new(table.clone(), "p");
        for (epoch, f) in [(1, "a.parquet"), (2, "b.parquet"), (3, "c.parquet")] {
            stream.stage(f, b"x".to_vec()).await.unwrap();
            let mut e = CommitEntry::adding(epoch, "p", &[f]);
            stream.commit(&mut e).await.unwrap();
        }
        let job = CommitLog::new(table.clone(), "maintenance");
        // A repair removes a.parquet.
        job.stage("r.parquet", b"r".to_vec()).await.unwrap();
        let repair = Transaction::new("maintenance", None, 4, TableSchema::default())
            .add([FileAction::new("r.parquet", 1, 1)])
            .remove(["a.parquet".to_string()]);
        assert_eq!(repair.commit(&job).await.unwrap().epoch, 4);
        // A compaction built at epoch 4 over a and b: a is gone.
        job.stage("m.parquet", b"m".to_vec()).await.unwrap();
        let stale = Transaction::new("maintenance", None, 4, TableSchema::default())
            .doing("compacting")
            .add([FileAction::new("m.parquet", 2, 2)])
            .remove(["a.parquet".to_string(), "b.parquet".to_string()]);
        let err = stale.commit(&job).await.unwrap_err();
        assert!(
            matches!(&err, EngineError::Commit(CommitError::RemovedConcurrently { path, .. }) if path == "a.parquet"),
            "{err}"
        );
        assert!(err.to_string().contains("while compacting"), "{err}");
        assert_eq!(job.epochs().await.unwrap(), vec![1, 2, 3, 4], "nothing written");
        // Over b and c, still live: committed at epoch 5 though built for 4.
        let ok = Transaction::new("maintenance", None, 4, TableSchema::default())
            .add([FileAction::new("m.parquet", 2, 2)])
            .remove(["b.parquet".to_string(), "c.parquet".to_string()]);
        let done = ok.commit(&job).await.unwrap();
        assert_eq!(done.epoch, 5);
        let (files, _) = job.committed_files().await.unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["r.parquet", "m.parquet"]);
    }
}
