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

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::{CommitError, EngineError, Result};
pub use crate::log::entry::{
    AnomalyEvent, ArchiveFile, ColumnSpec, CommitEntry, Counts, DeadLetterFile, FileAction, LOG_VERSION, Origin,
    QualityEntry, StateEntry, StateFile, TableSchema, TableSummary, Violations, fold_files, live_files, removed_path,
    writer_name,
};
use crate::retry::RetryPolicy;
use crate::store::TableStore;

/// A checkpoint ([`crate::log::checkpoint`]) is written when a commit's epoch is a multiple of
/// this.
pub const CHECKPOINT_INTERVAL: u64 = 100;

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
        self.list_epochs(&self.table.log_dir(), after).await
    }

    /// The epochs of the `<epoch:020>.json` objects in `dir` (the log, the checkpoints) after
    /// `after`, in order: the store lists from `after`'s name on (all of them when 0).
    pub(crate) async fn list_epochs(&self, dir: &Path, after: u64) -> Result<Vec<u64>> {
        let offset = dir.clone().join(format!("{after:020}.json"));
        let metas: Vec<_> = self
            .retry
            .run("listing the commit log", || async {
                let listed = if after == 0 {
                    self.table.store.list(Some(dir))
                } else {
                    self.table.store.list_with_offset(Some(dir), &offset)
                };
                listed
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(EngineError::store(format!("listing {dir} of {}", self.table.location)))
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
        let snap = self.snapshot().await?;
        let from = snap.newest_epoch().saturating_sub(n as u64);
        // The snapshot read the entries after its checkpoint already; only older ones are read.
        let mut out = Vec::new();
        for epoch in self.epochs_after(from).await? {
            match snap.after.iter().find(|e| e.epoch == epoch) {
                Some(e) => out.push(e.clone()),
                None => out.push(self.read(epoch).await?),
            }
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
                Err(object_store::Error::NotFound { .. }) => Err(CommitError::MissingFile {
                    entry: self.entry_path(entry.epoch).to_string(),
                    file: target.to_string(),
                }
                .into()),
                Err(e) => Err(EngineError::store(format!("checking {to}"))(e)),
            },
            Err(e) => Err(EngineError::store(format!("moving {from} to {to}"))(e)),
        }
    }

    /// The newest checkpoint at or after `epoch`, if any: an entry created at `epoch` then lies
    /// in the part of the log that checkpoint folds (and log retention may have expired).
    /// Checkpoints are written only for epochs that exist and entries are contiguous, so a
    /// checkpoint at or after `epoch` means `epoch` was taken before, and expired.
    async fn covering_checkpoint(&self, epoch: u64) -> Result<Option<u64>> {
        let after = self.list_epochs(&self.table.checkpoint_dir(), epoch.saturating_sub(1)).await?;
        Ok(after.last().copied())
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
                Ok(_) => match self.covering_checkpoint(entry.epoch).await? {
                    None => break,
                    Some(newest) => {
                        // An epoch log retention expired (a writer whose next epoch is older
                        // than the newest checkpoint): readers would never see this entry.
                        // It goes, and the commit moves past the checkpoint's log.
                        self.fenced(async {
                            match self.table.store.delete(&path).await {
                                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                                Err(e) => Err(EngineError::store(format!("withdrawing {path}"))(e)),
                            }
                        })
                        .await?;
                        tracing::warn!(epoch = entry.epoch, checkpoint = newest, writer = %self.writer, "an entry landed in the expired part of the log; committing it again after the newest checkpoint");
                        entry.epoch = self.snapshot().await?.newest_epoch().max(newest) + 1;
                    }
                },
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
                        return Err(CommitError::Conflict {
                            epoch: entry.epoch,
                            pipeline: entry.pipeline.clone(),
                        }
                        .into());
                    }
                    metrics::counter!("sluice_commit_conflicts_total", "pipeline" => entry.pipeline.clone())
                        .increment(1);
                    // Only the entries after the taken epoch are listed (not the whole log).
                    let newest = self.epochs_after(entry.epoch).await?.last().copied().unwrap_or(entry.epoch);
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
            Err(EngineError::Commit(CommitError::Conflict { epoch: 1, .. }))
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
