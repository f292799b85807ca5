//! Commit-log checkpoints: every [`CHECKPOINT_INTERVAL`](crate::log::commit::CHECKPOINT_INTERVAL) epochs, the writer that commits the
//! epoch folds the log into `_sluice/checkpoints/<epoch>.json`: the live files with their
//! origins, each writer's newest entry (recovery and source positions), a summary of every
//! entry (epoch, writer, commit time, archive file, rows written: reconcile's ranges), and the
//! table's schema. Readers take the newest checkpoint and the entries after it
//! ([`CommitLog::snapshot`]) instead of every entry since the beginning.
//!
//! A checkpoint is an optimisation: it is written after its epoch's commit, whole (create, then
//! an atomic rename by the store), and a missing or unreadable one only means reading more
//! entries. Entries are never deleted because of it.

use std::collections::{BTreeMap, HashSet};

use futures::TryStreamExt;
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
    log.table().path("_sluice/checkpoints")
}

impl CommitLog {
    /// The newest checkpoint and the entries after it.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let table = self.table();
        let dir = checkpoint_dir(self);
        let metas: Vec<_> = self
            .retry()
            .run("listing checkpoints", || async {
                table
                    .store
                    .list(Some(&dir))
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(EngineError::store("listing checkpoints"))
            })
            .await?;
        let mut points: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        points.sort_unstable();
        let mut checkpoint = Checkpoint::default();
        for epoch in points.iter().rev() {
            // A checkpoint that is not valid is skipped: the entries are the truth.
            if let Some(cp) = self.read_checkpoint(*epoch).await? {
                checkpoint = cp;
                break;
            }
        }
        let mut after = Vec::new();
        for epoch in self.epochs().await?.into_iter().filter(|e| *e > checkpoint.epoch) {
            after.push(self.read(epoch).await?);
        }
        Ok(Snapshot { checkpoint, after })
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
        let payload = PutPayload::from(body);
        self.retry()
            .run("writing a checkpoint", || async {
                self.table()
                    .store
                    .put(&path, payload.clone())
                    .await
                    .map_err(EngineError::store(format!("writing {path}")))
            })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
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

    /// An in-memory store that counts reads of commit entries.
    #[derive(Debug, Default)]
    struct Counting {
        inner: InMemory,
        entry_reads: AtomicU64,
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
            self.inner.list(prefix)
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
}
