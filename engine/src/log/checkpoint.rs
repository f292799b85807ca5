//! Commit-log checkpoints: every [`CHECKPOINT_INTERVAL`](crate::log::commit::CHECKPOINT_INTERVAL) epochs, the writer that commits the
//! epoch folds the log into `_sluice/checkpoints/<epoch>.json`: the live files with their
//! origins, each writer's newest entry (recovery and source positions), a summary of every
//! entry (epoch, writer, commit time, archive file, rows written: reconcile's ranges), and the
//! table's schema. Readers take the newest checkpoint and the entries after it
//! ([`CommitLog::snapshot`]) instead of every entry since the beginning.
//!
//! A checkpoint is an optimisation: it is written after its epoch's commit, whole (create, then
//! an atomic rename by the store), and a missing or unreadable one only means reading more
//! entries. Entries are never deleted because of it (only `vacuum`'s log retention deletes
//! entries, and only ones a newer checkpoint folds).
//!
//! Finding the newest checkpoint costs O(1) reads, not a LIST of every checkpoint: the writer of
//! a checkpoint then writes the hint `_sluice/_last_checkpoint` (`{"epoch": N}`, as Delta's
//! `_last_checkpoint`). The hint is only a place to start: a reader lists the checkpoints after
//! it (a stale hint, from a slower writer, costs the few listed after it) and the entries after
//! the newest valid checkpoint (`list_with_offset`, S3's `start-after`), so a snapshot reads
//! O(entries since the newest checkpoint) objects whatever the table's age. A missing, damaged
//! or dangling hint falls back to listing every checkpoint.

use std::collections::{BTreeMap, HashSet};

use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::log::commit::{ArchiveFile, CommitEntry, CommitLog, FileAction, Origin, TableSchema, fold_files};

/// Format version of checkpoint files. A checkpoint of another version is skipped and the log
/// folded from its entries, which are never deleted (version 2: the index holds each entry's
/// watermark, newest event time, instance and archive flag, which reconcile of windowed
/// pipelines reads).
pub const CHECKPOINT_VERSION: u32 = 2;

/// What a reader needs of one entry once it is folded into a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// Its epoch.
    pub epoch: u64,
    /// Its writer.
    pub pipeline: String,
    /// When it was committed.
    pub committed_at: String,
    /// Its raw-archive file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveFile>,
    /// Rows it wrote.
    pub output: u64,
    /// The partitions its late rows would have written to (its `state.dirty`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late_dirty: Vec<String>,
    /// The event-time watermark after it (its `state.watermark_ns`): windows ending by it had
    /// been emitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_ns: Option<i64>,
    /// The newest event time seen by then (its `state.max_event_time_ns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_time_ns: Option<i64>,
    /// The server instance that wrote it (several with a Kafka consumer group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// It ran with the archive off (its `state.unarchived`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unarchived: bool,
}

impl From<&CommitEntry> for EntrySummary {
    fn from(e: &CommitEntry) -> Self {
        EntrySummary {
            epoch: e.epoch,
            pipeline: e.pipeline.clone(),
            committed_at: e.committed_at.clone(),
            archive: e.archive.clone(),
            output: e.counts.output,
            late_dirty: e.state.as_ref().map(|s| s.dirty.clone()).unwrap_or_default(),
            watermark_ns: e.state.as_ref().and_then(|s| s.watermark_ns),
            max_event_time_ns: e.state.as_ref().and_then(|s| s.max_event_time_ns),
            instance: e.instance.clone(),
            unarchived: e.state.as_ref().is_some_and(|s| s.unarchived),
        }
    }
}

/// The log folded up to an epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Every entry up to this epoch is folded in.
    pub epoch: u64,
    /// The live files and their origins, in commit order.
    pub files: Vec<(FileAction, Origin)>,
    /// Each writer's newest entry.
    pub newest: BTreeMap<String, CommitEntry>,
    /// Every entry, summarised, in epoch order.
    pub index: Vec<EntrySummary>,
    /// The table's schema as of `epoch`.
    pub schema: TableSchema,
}

impl Checkpoint {
    /// Folds `entries` (in epoch order, all after `self.epoch`) in.
    fn fold(&mut self, entries: &[CommitEntry]) {
        self.files = fold_files(std::mem::take(&mut self.files), entries);
        for entry in entries {
            self.newest.insert(entry.writer(), entry.clone());
            self.index.push(EntrySummary::from(entry));
            if !entry.schema.columns.is_empty() {
                self.schema = entry.schema.clone();
            }
            self.epoch = self.epoch.max(entry.epoch);
        }
    }
}

/// The newest checkpoint (if any) and the entries after it: the whole log, read cheaply.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Folded state up to its epoch.
    pub checkpoint: Checkpoint,
    /// Entries after the checkpoint, in epoch order.
    pub after: Vec<CommitEntry>,
}

impl Snapshot {
    /// The whole log folded: live files with origins, newest entries, summaries, schema.
    pub fn folded(&self) -> Checkpoint {
        let mut cp = self.checkpoint.clone();
        cp.fold(&self.after);
        cp
    }

    /// The newest epoch in the log (0 when empty).
    pub fn newest_epoch(&self) -> u64 {
        self.after.last().map_or(self.checkpoint.epoch, |e| e.epoch)
    }

    /// `writer`'s newest entry.
    pub fn newest_of(&self, writer: &str) -> Option<CommitEntry> {
        self.after
            .iter()
            .rev()
            .find(|e| e.writer() == writer)
            .or_else(|| self.checkpoint.newest.get(writer))
            .cloned()
    }

    /// Each writer's newest entry, by writer name.
    pub fn newest_by_writer(&self) -> BTreeMap<String, &CommitEntry> {
        let mut out: BTreeMap<String, &CommitEntry> =
            self.checkpoint.newest.iter().map(|(w, e)| (w.clone(), e)).collect();
        for e in &self.after {
            out.insert(e.writer(), e);
        }
        out
    }

    /// The paths of the live files.
    pub fn live_paths(&self) -> HashSet<String> {
        // Only the files are folded (not the entries' index and newest entries).
        fold_files(self.checkpoint.files.clone(), &self.after)
            .into_iter()
            .map(|(f, _)| f.path)
            .collect()
    }
}

fn checkpoint_dir(log: &CommitLog) -> object_store::path::Path {
    log.table().checkpoint_dir()
}

/// The table-relative path of the newest-checkpoint hint.
pub const LAST_CHECKPOINT: &str = "_sluice/_last_checkpoint";

/// The hint's content.
#[derive(Debug, Serialize, Deserialize)]
struct LastCheckpoint {
    epoch: u64,
}

impl CommitLog {
    /// The newest checkpoint and the entries after it.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        // An entry that vanishes between the listing and its read was deleted by log retention
        // after a newer checkpoint folded it (this reader listed before that checkpoint was
        // written): a second look starts from that checkpoint.
        let mut attempts = 0;
        loop {
            match self.snapshot_once().await {
                Err(EngineError::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) if attempts < 2 => attempts += 1,
                other => return other,
            }
        }
    }

    async fn snapshot_once(&self) -> Result<Snapshot> {
        let hint = self.last_checkpoint_hint().await?;
        let mut checkpoint = None;
        if let Some(hint) = hint {
            checkpoint = self.newest_checkpoint(Some(hint)).await?;
        }
        if checkpoint.is_none() {
            checkpoint = self.newest_checkpoint(None).await?;
        }
        let checkpoint = checkpoint.unwrap_or_default();
        let epochs = self.epochs_after(checkpoint.epoch).await?;
        // The entries go on from the checkpoint without a gap (invariant 2). A gap means log
        // retention expired them after this reader chose an older checkpoint (a second look
        // finds the newer one), or, with no checkpoint this build reads, that the log's start
        // is gone for this build.
        if let Some(missing) = (checkpoint.epoch + 1..).zip(&epochs).find_map(|(want, got)| (want != *got).then_some(want)) {
            let context = if checkpoint.epoch == 0 && missing == 1 {
                format!(
                    "reading the commit log: its first entries are gone (expired by log retention) and no checkpoint this build reads (version {CHECKPOINT_VERSION}) folds them; read the table with the Sluice version that wrote its checkpoints"
                )
            } else {
                format!("reading commit entry {missing} (gone: expired by log retention meanwhile, or damaged)")
            };
            return Err(EngineError::Store {
                context,
                source: object_store::Error::NotFound {
                    path: format!("{missing:020}.json"),
                    source: "a gap in the listed entries".into(),
                },
            });
        }
        let mut after = Vec::new();
        for epoch in epochs {
            after.push(self.read(epoch).await?);
        }
        Ok(Snapshot { checkpoint, after })
    }

    /// The hint's epoch; `None` when there is none or it is not a valid hint.
    async fn last_checkpoint_hint(&self) -> Result<Option<u64>> {
        let path = self.table().path(LAST_CHECKPOINT);
        let bytes = self
            .retry()
            .run("reading the checkpoint hint", || self.table().get_if_exists(&path))
            .await?;
        Ok(bytes
            .and_then(|b| serde_json::from_slice::<LastCheckpoint>(&b).ok())
            .map(|h| h.epoch)
            .filter(|e| *e > 0))
    }

    /// The newest valid checkpoint among those from `hint` on (every one when `None`).
    async fn newest_checkpoint(&self, hint: Option<u64>) -> Result<Option<Checkpoint>> {
        let listed = self.list_epochs(&checkpoint_dir(self), hint.unwrap_or(0)).await?;
        let mut points: Vec<u64> = listed.into_iter().chain(hint).collect();
        points.sort_unstable();
        points.dedup();
        for epoch in points.iter().rev() {
            // A checkpoint that is not valid is skipped: the entries are the truth.
            if let Some(cp) = self.read_checkpoint(*epoch).await? {
                return Ok(Some(cp));
            }
        }
        Ok(None)
    }

    /// The checkpoint of `epoch`; `None` when it is gone or not a valid checkpoint.
    async fn read_checkpoint(&self, epoch: u64) -> Result<Option<Checkpoint>> {
        let path = checkpoint_dir(self).join(format!("{epoch:020}.json"));
        let bytes = self
            .retry()
            .run("reading a checkpoint", || self.table().get_if_exists(&path))
            .await?;
        let cp = bytes.and_then(|b| serde_json::from_slice::<Checkpoint>(&b).ok());
        Ok(cp.filter(|cp| cp.version == CHECKPOINT_VERSION && cp.epoch == epoch))
    }

    /// Writes the checkpoint of `epoch`: the newest checkpoint below it and the entries after
    /// it, up to `epoch`.
    pub async fn write_checkpoint(&self, epoch: u64) -> Result<()> {
        let snap = self.snapshot().await?;
        if snap.checkpoint.epoch >= epoch {
            return Ok(());
        }
        let mut cp = snap.checkpoint;
        let upto: Vec<CommitEntry> = snap.after.into_iter().filter(|e| e.epoch <= epoch).collect();
        cp.fold(&upto);
        cp.version = CHECKPOINT_VERSION;
        cp.epoch = epoch;
        let body = serde_json::to_vec(&cp).map_err(|e| EngineError::Internal(format!("encoding a checkpoint: {e}")))?;
        let path = checkpoint_dir(self).join(format!("{epoch:020}.json"));
        self.put("writing a checkpoint", &path, body).await?;
        // The hint goes after the checkpoint it names exists.
        let hint = serde_json::to_vec(&LastCheckpoint { epoch })
            .map_err(|e| EngineError::Internal(format!("encoding the checkpoint hint: {e}")))?;
        self.put("writing the checkpoint hint", &self.table().path(LAST_CHECKPOINT), hint)
            .await
    }

    /// Writes `body` to `path` whole (the store's put is atomic), retrying.
    async fn put(&self, what: &str, path: &object_store::path::Path, body: Vec<u8>) -> Result<()> {
        let payload = PutPayload::from(body);
        self.retry()
            .run(what, || async {
                self.table()
                    .store
                    .put(path, payload.clone())
                    .await
                    .map(|_| ())
                    .map_err(EngineError::store(format!("writing {path}")))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use futures::TryStreamExt;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
        PutOptions, PutResult, RenameOptions,
    };

    use super::*;
    use crate::log::commit::live_files;
    use crate::store::TableStore;

    /// An in-memory store that counts reads of commit entries, every read, and every object
    /// a LIST returns.
    #[derive(Debug, Default)]
    struct Counting {
        inner: InMemory,
        entry_reads: AtomicU64,
        gets: AtomicU64,
        listed: Arc<AtomicU64>,
    }

    impl Counting {
        /// Reads and listed objects since the last call, and resets both.
        fn take(&self) -> (u64, u64) {
            (
                self.gets.swap(0, Ordering::Relaxed),
                self.listed.swap(0, Ordering::Relaxed),
            )
        }
    }

    impl std::fmt::Display for Counting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Counting")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Counting {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
            if location.as_ref().starts_with("_sluice/log/") {
                self.entry_reads.fetch_add(1, Ordering::Relaxed);
            }
            self.gets.fetch_add(1, Ordering::Relaxed);
            self.inner.get_opts(location, options).await
        }
        async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
            self.inner.get_ranges(location, ranges).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            let listed = self.listed.clone();
            Box::pin(self.inner.list(prefix).inspect_ok(move |_| {
                listed.fetch_add(1, Ordering::Relaxed);
            }))
        }
        fn list_with_offset(
            &self,
            prefix: Option<&Path>,
            offset: &Path,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            // What S3's start-after returns: only the keys after the offset are counted.
            let listed = self.listed.clone();
            Box::pin(self.inner.list_with_offset(prefix, offset).inspect_ok(move |_| {
                listed.fetch_add(1, Ordering::Relaxed);
            }))
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
        async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
            self.inner.rename_opts(from, to, options).await
        }
    }

    fn entry(epoch: u64, writer: &str, add: &[String], remove: &[String]) -> CommitEntry {
        let add: Vec<&str> = add.iter().map(String::as_str).collect();
        CommitEntry {
            remove: remove.to_vec(),
            sources: BTreeMap::from([("src".to_string(), serde_json::json!({ "seq": epoch }))]),
            ..CommitEntry::adding(epoch, writer, &add)
        }
    }

    /// A log of 1,050 commits (a stream, and a compaction now and then that removes files):
    /// recovery and the committed file list read the newest checkpoint and the 50 entries after
    /// it, not 1,050, and agree with folding every entry.
    #[tokio::test]
    async fn readers_read_the_checkpoint_and_the_entries_after_it() {
        let store = Arc::new(Counting::default());
        let table = TableStore::from_store(store.clone(), Path::default(), "memory://t");
        let stream = CommitLog::new(table.clone(), "p");
        let job = CommitLog::new(table.clone(), "maintenance");
        for epoch in 1..=1050u64 {
            let (log, e) = if epoch % 97 == 0 {
                let gone = format!("d/f-{}.parquet", epoch - 5);
                (
                    &job,
                    entry(epoch, "maintenance", &[format!("d/m-{epoch}.parquet")], &[gone]),
                )
            } else {
                (&stream, entry(epoch, "p", &[format!("d/f-{epoch}.parquet")], &[]))
            };
            for a in &e.add {
                log.stage(&a.path, b"x".to_vec()).await.unwrap();
            }
            let mut e = e;
            log.commit(&mut e).await.unwrap();
        }
        let all = stream.entries().await.unwrap();
        assert_eq!(all.len(), 1050);

        store.entry_reads.store(0, Ordering::Relaxed);
        let rec = CommitLog::new(table.clone(), "p").recover().await.unwrap();
        assert_eq!(
            store.entry_reads.load(Ordering::Relaxed),
            50,
            "entries 1001..=1050 only"
        );
        assert_eq!(rec.next_epoch(), 1051);
        assert_eq!(
            rec.last.as_ref().map(|e| e.sources["src"]["seq"].as_u64()),
            Some(Some(1050))
        );

        store.entry_reads.store(0, Ordering::Relaxed);
        let (files, _) = CommitLog::new(table.clone(), "sluice-query")
            .committed_files()
            .await
            .unwrap();
        assert_eq!(store.entry_reads.load(Ordering::Relaxed), 50);
        assert_eq!(
            files,
            live_files(&all),
            "the checkpoint folds exactly what the entries say"
        );

        // A writer whose newest entry is only in the checkpoint still finds it there.
        let snap = job.snapshot().await.unwrap();
        assert_eq!(snap.newest_of("maintenance").map(|e| e.epoch), Some(970));
        assert_eq!(snap.folded().index.len(), 1050);

        // A checkpoint of an older format (an index without watermarks) is skipped: readers
        // take the checkpoint before it and the entries after that, and fold the same.
        let newest = snap.checkpoint.epoch;
        let path = checkpoint_dir(&stream).join(format!("{newest:020}.json"));
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        let mut old: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        old["version"] = serde_json::json!(1);
        store.put(&path, serde_json::to_vec(&old).unwrap().into()).await.unwrap();
        store.entry_reads.store(0, Ordering::Relaxed);
        let again = stream.snapshot().await.unwrap();
        assert!(again.checkpoint.epoch < newest, "the old-format checkpoint was read");
        assert_eq!(store.entry_reads.load(Ordering::Relaxed), 1050 - again.checkpoint.epoch);
        assert_eq!(again.folded().index, snap.folded().index);
    }

    /// A year's log: 100,000 commits (one a few minutes, a compaction every 1,000) and 1,000
    /// checkpoints, written by a generator that puts real entries and a real folded checkpoint.
    /// A snapshot, a recovery and the committed file list each read about 100 objects (the
    /// hint, the newest checkpoint, the entries after it) and list only those entries — not
    /// 100,000 entries and 1,000 checkpoints; a stale, dangling or missing hint costs more
    /// reads but never a wrong answer.
    #[tokio::test]
    async fn a_year_of_commits_is_read_in_about_a_hundred_objects() {
        const COMMITS: u64 = 100_000;
        const NEWEST_CHECKPOINT: u64 = 99_900;
        let store = Arc::new(Counting::default());
        let table = TableStore::from_store(store.clone(), Path::default(), "memory://t");
        let log = CommitLog::new(table.clone(), "p");
        let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let mut entries = Vec::new();
        for epoch in 1..=COMMITS {
            let mut e = if epoch % 1000 == 0 {
                let gone: Vec<String> = (epoch - 999..epoch).map(|x| format!("d/f-{x}.parquet")).collect();
                entry(epoch, "maintenance", &[format!("d/m-{epoch}.parquet")], &gone)
            } else {
                entry(epoch, "p", &[format!("d/f-{epoch}.parquet")], &[])
            };
            e.committed_at = (start + chrono::Duration::seconds(315 * epoch as i64)).to_rfc3339();
            let path = log.table().log_dir().join(format!("{epoch:020}.json"));
            store.put(&path, serde_json::to_vec(&e).unwrap().into()).await.unwrap();
            entries.push(e);
        }
        // Older checkpoints as objects a full listing would return (their content is never
        // read when the hint is good), then the newest, folded from the entries.
        for epoch in (100..NEWEST_CHECKPOINT).step_by(100) {
            let path = checkpoint_dir(&log).join(format!("{epoch:020}.json"));
            store.put(&path, b"{}".to_vec().into()).await.unwrap();
        }
        let mut cp = Checkpoint::default();
        cp.fold(&entries[..NEWEST_CHECKPOINT as usize]);
        cp.version = CHECKPOINT_VERSION;
        let path = checkpoint_dir(&log).join(format!("{NEWEST_CHECKPOINT:020}.json"));
        store.put(&path, serde_json::to_vec(&cp).unwrap().into()).await.unwrap();
        let hint = table.path(LAST_CHECKPOINT);
        store
            .put(&hint, serde_json::to_vec(&LastCheckpoint { epoch: NEWEST_CHECKPOINT }).unwrap().into())
            .await
            .unwrap();
        let expected = live_files(&entries);
        let tail = COMMITS - NEWEST_CHECKPOINT;
        // Recovery checks that the writer's newest commit's files are in place.
        store
            .put(&Path::from(format!("d/f-{}.parquet", COMMITS - 1)), b"x".to_vec().into())
            .await
            .unwrap();

        store.take();
        let snap = log.snapshot().await.unwrap();
        let (gets, listed) = store.take();
        assert_eq!(snap.checkpoint.epoch, NEWEST_CHECKPOINT);
        assert_eq!(snap.newest_epoch(), COMMITS);
        assert_eq!(gets, 2 + tail, "the hint, the checkpoint and the entries after it");
        assert_eq!(listed, tail, "only the entries after the checkpoint are listed");
        assert!(gets + listed < 210, "{gets} reads and {listed} listed");

        let rec = CommitLog::new(table.clone(), "p").recover().await.unwrap();
        let (gets, listed) = store.take();
        assert_eq!(rec.next_epoch(), COMMITS + 1);
        assert_eq!(rec.last.map(|e| e.epoch), Some(COMMITS - 1), "p's newest (the last is a compaction)");
        assert!(gets < 2 * tail + 10 && listed < tail + 10, "recovery: {gets} reads, {listed} listed");

        let (files, _) = log.committed_files().await.unwrap();
        let (gets, listed) = store.take();
        assert_eq!(files, expected, "the checkpoint and the tail fold what every entry says");
        assert!(gets + listed < 210, "committed files: {gets} reads, {listed} listed");
        let recent = log.recent_entries(10).await.unwrap();
        assert_eq!(recent.iter().map(|e| e.epoch).collect::<Vec<_>>(), (COMMITS - 9..=COMMITS).collect::<Vec<_>>());

        // A stale hint (a slower writer's): the checkpoints after it are listed, the newest wins.
        store
            .put(&hint, serde_json::to_vec(&LastCheckpoint { epoch: 99_000 }).unwrap().into())
            .await
            .unwrap();
        store.take();
        let stale = log.snapshot().await.unwrap();
        let (_, listed) = store.take();
        assert_eq!(stale.checkpoint.epoch, NEWEST_CHECKPOINT);
        assert!(listed < tail + 20, "a stale hint lists the few checkpoints after it: {listed}");

        // A dangling hint (its checkpoint is not valid) and a damaged one: every checkpoint is
        // listed, the answer is the same.
        for bad in [serde_json::to_vec(&LastCheckpoint { epoch: 500 }).unwrap(), b"not json".to_vec()] {
            store.put(&hint, bad.into()).await.unwrap();
            store.take();
            let again = log.snapshot().await.unwrap();
            let (_, listed) = store.take();
            assert_eq!(again.checkpoint.epoch, NEWEST_CHECKPOINT);
            assert_eq!(again.folded().files, snap.folded().files);
            assert!(listed >= NEWEST_CHECKPOINT / 100, "fell back to listing every checkpoint");
        }
    }
}
