//! Table maintenance, as the `maintenance` writer (the lease reconcile's repair takes too):
//! `sluice compact` merges a partition's small files into files of about a target size, one
//! commit per partition, the row multiset unchanged; `sluice vacuum` deletes what no live
//! commit needs: files commits removed (under `_sluice/removed/`) once their commit is older
//! than the retention, staged files of writers that are not running and whose newest commit
//! does not name them, raw-archive files older than the archive retention, and commit-log
//! entries and checkpoints older than the log retention that the newest checkpoint folds.
//!
//! Every delete is made under the maintenance lease's fence ([`crate::store::lease::Fence::guard`]):
//! a vacuum stalled past its lease (SIGSTOP, a long GC pause of its host) deletes nothing after
//! another process took the lease over, and recovering another writer's staging is done under
//! that writer's lease and fence.
//!
//! Log retention (as Delta's `logRetentionDuration`): an entry goes when it is older than the
//! retention **and** older than the newest checkpoint, which holds every writer's newest entry,
//! the live files and a summary of every entry (reconcile's ranges and archive files), so
//! recovery, readers and reconcile never need it again. Checkpoints older than the newest go on
//! the same terms. What reads every entry (`sluice check`, the quality report) reads those left.
//!
//! Both are safe while `sluice run` writes the same table: the stream only adds files, and a
//! compaction commits only if every file it merged is still live when it commits.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::reconcile::{MAINTENANCE_WRITER, read_parquet};
use crate::error::{EngineError, Result};
use crate::log::checkpoint::EntrySummary;
use crate::log::commit::{CommitLog, FileAction, Origin};
use crate::log::transaction::Transaction;
use crate::store::lease::WriterLease;
use crate::store::TableStore;

/// Default `--target-file-size`.
pub const DEFAULT_TARGET_FILE_SIZE: u64 = 128 << 20;

/// What a compaction did to one partition.
#[derive(Debug, Clone, Serialize)]
pub struct CompactedPartition {
    /// `k=v/...`.
    pub partition: String,
    /// Files before.
    pub files_before: usize,
    /// Files after.
    pub files_after: usize,
    /// Rows rewritten.
    pub rows: u64,
    /// The commit.
    pub epoch: u64,
}

/// What [`compact`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactReport {
    /// Partitions compacted (one commit each), in path order.
    pub partitions: Vec<CompactedPartition>,
}

/// Merges the small files (below `target` bytes) of every partition matching `filter` (each
/// `key=value` must match) into files of about `target` bytes, one commit per partition. Files
/// of different pipelines or different schemas are never merged together.
pub async fn compact(table: &TableStore, target: u64, filter: &[(String, String)]) -> Result<CompactReport> {
    let lease = WriterLease::acquire(table, MAINTENANCE_WRITER).await?;
    let result = compact_holding(table, &lease, target, filter).await;
    lease.release().await;
    result
}

async fn compact_holding(
    table: &TableStore,
    lease: &WriterLease,
    target: u64,
    filter: &[(String, String)],
) -> Result<CompactReport> {
    let log = CommitLog::new(table.clone(), MAINTENANCE_WRITER).with_fence(lease.fence());
    log.recover().await?;
    let snap = log.snapshot().await?;
    let mut next_epoch = snap.newest_epoch() + 1;
    let folded = snap.folded();
    let schema = folded.schema.clone();
    // Small files by (partition, pipeline), in commit order.
    let mut groups: BTreeMap<(String, String), Vec<(FileAction, Origin)>> = BTreeMap::new();
    for (f, origin) in folded.files {
        let matches = filter.iter().all(|(k, v)| {
            f.partition
                .iter()
                .any(|(pk, pv)| pk == k && pv.as_deref() == Some(v.as_str()))
        });
        if matches && f.bytes < target {
            let dir = f.path.rfind('/').map_or(String::new(), |i| f.path[..=i].to_string());
            groups
                .entry((dir, origin.pipeline.clone()))
                .or_default()
                .push((f, origin));
        }
    }
    let mut report = CompactReport::default();
    for ((dir, pipeline), files) in groups {
        if files.len() < 2 {
            continue;
        }
        // Runs of files (in commit order) of at most `target` bytes together, two or more each.
        let mut runs: Vec<Vec<(FileAction, Origin)>> = vec![vec![]];
        let mut bytes = 0;
        for f in files {
            if bytes + f.0.bytes > target && !runs.last().is_some_and(|r| r.is_empty()) {
                runs.push(vec![]);
                bytes = 0;
            }
            bytes += f.0.bytes;
            if let Some(r) = runs.last_mut() {
                r.push(f);
            }
        }
        runs.retain(|r| r.len() >= 2);
        if runs.is_empty() {
            continue;
        }
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for (n, run) in runs.iter().enumerate() {
            let Some(merged) = merge(table, run).await? else {
                continue;
            };
            let path = format!("{dir}part-{MAINTENANCE_WRITER}-{next_epoch}-{n}.parquet");
            let size = merged.1.len() as u64;
            log.stage(&path, merged.1).await?;
            let epochs = run
                .iter()
                .fold([u64::MAX, 0], |[a, b], (_, o)| [a.min(o.epochs[0]), b.max(o.epochs[1])]);
            add.push(FileAction {
                path,
                rows: merged.0,
                bytes: size,
                partition: run[0].0.partition.clone(),
                covers: Some(Origin {
                    pipeline: pipeline.clone(),
                    epochs,
                }),
            });
            remove.extend(run.iter().map(|(f, _)| f.path.clone()));
        }
        if add.is_empty() {
            continue;
        }
        let files_before = remove.len();
        let rows = add.iter().map(|f| f.rows).sum();
        let files_after = add.len();
        let entry = Transaction::new(MAINTENANCE_WRITER, None, next_epoch, schema.clone())
            .doing("compacting")
            .add(add)
            .remove(remove)
            .commit(&log)
            .await?;
        next_epoch = entry.epoch + 1;
        report.partitions.push(CompactedPartition {
            partition: dir,
            files_before,
            files_after,
            rows,
            epoch: entry.epoch,
        });
    }
    Ok(report)
}

/// The rows of `run`'s files as one Parquet file (rows, bytes); `None` when a file is missing
/// or the files' schemas differ (such a run is left alone).
async fn merge(table: &TableStore, run: &[(FileAction, Origin)]) -> Result<Option<(u64, Vec<u8>)>> {
    let mut batches = Vec::new();
    for (f, _) in run {
        match read_parquet(table, &table.path(&f.path)).await? {
            Some(rows) => batches.extend(rows),
            None => return Ok(None),
        }
    }
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(None);
    };
    if batches.iter().any(|b| b.schema() != schema) {
        return Ok(None);
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).map_err(|e| EngineError::Internal(e.to_string()))?,
        ))
        .set_dictionary_page_size_limit(16 * 1024)
        .build();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bytes =
        tokio::task::spawn_blocking(move || crate::parquet_file::encode_file(&batches, &schema, &props, threads))
            .await
            .map_err(|e| EngineError::Internal(format!("compaction encode task failed: {e}")))?
            .map_err(|e| EngineError::Internal(format!("encoding a compacted file: {e}")))?;
    Ok(Some((rows, bytes)))
}

/// What [`vacuum`] deleted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VacuumReport {
    /// Files removed by commits older than the retention.
    pub removed_files: Vec<String>,
    /// Staged files no commit names, of writers that were not running.
    pub staging_orphans: usize,
    /// Raw-archive files older than the archive retention.
    pub archive_files: Vec<String>,
    /// Commit-log entries deleted by the log retention.
    pub log_entries: usize,
    /// Checkpoints deleted by the log retention.
    pub checkpoints: usize,
}

/// What `sluice vacuum` keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Files removed by commits younger than this stay (time-travel and slow readers).
    pub removed: Duration,
    /// Raw-archive files of commits older than this go (`None`: kept).
    pub archive: Option<Duration>,
    /// Commit-log entries and checkpoints older than this (and than the newest checkpoint) go.
    pub log: Duration,
}

/// The shortest log retention: entries a slow reader or a lagging writer may still need live
/// at least this long.
pub const MIN_LOG_RETENTION: Duration = Duration::from_secs(3600);

/// Deletes the files no live commit needs: files removed by commits older than
/// `keep.removed`, staging orphans of writers not running (their recovery runs), with
/// `keep.archive` archive files of commits older than it, and log entries and checkpoints
/// older than `keep.log` and than the newest checkpoint. Never a file a live commit names as
/// data.
pub async fn vacuum(table: &TableStore, keep: Retention) -> Result<VacuumReport> {
    // A reader that found a file moved to `_sluice/removed/` finds where through the entries
    // after its snapshot: they outlive the removed files.
    if keep.log < keep.removed.max(MIN_LOG_RETENTION) {
        return Err(EngineError::config(
            format!(
                "a log retention of {:?} is shorter than {:?} (the removed files' retention, and at least an hour)",
                keep.log,
                keep.removed.max(MIN_LOG_RETENTION)
            ),
            Some("give --log-retention at least --retention and 1h (default 30d)".to_string()),
        ));
    }
    let lease = WriterLease::acquire(table, MAINTENANCE_WRITER).await?;
    let result = vacuum_holding(table, &lease, keep).await;
    lease.release().await;
    result
}

async fn vacuum_holding(table: &TableStore, lease: &WriterLease, keep: Retention) -> Result<VacuumReport> {
    let (retention, archive_retention) = (keep.removed, keep.archive);
    let log = CommitLog::new(table.clone(), MAINTENANCE_WRITER).with_fence(lease.fence());
    log.recover().await?;
    let mut report = VacuumReport::default();
    let now = chrono::Utc::now();
    let older = |e: &EntrySummary, keep: Duration| {
        chrono::DateTime::parse_from_rfc3339(&e.committed_at)
            .is_ok_and(|t| now.signed_duration_since(t).to_std().is_ok_and(|age| age >= keep))
    };
    let snap = log.snapshot().await?;
    let newest_checkpoint = snap.checkpoint.epoch;
    let folded = snap.folded();
    let by_epoch: BTreeMap<u64, &EntrySummary> = folded.index.iter().map(|e| (e.epoch, e)).collect();
    // `_sluice/removed/<epoch>/`: one directory per removing commit.
    let removed = table
        .store
        .list_with_delimiter(Some(&table.path("_sluice/removed")))
        .await
        .map_err(EngineError::store("listing _sluice/removed"))?;
    for dir in removed.common_prefixes {
        let epoch: Option<u64> = dir.filename().and_then(|n| n.parse().ok());
        if epoch
            .and_then(|e| by_epoch.get(&e))
            .is_some_and(|e| older(e, retention))
        {
            for path in list(table, &dir).await? {
                delete(table, lease, &path).await?;
                report.removed_files.push(table.relative(&path));
            }
        }
    }
    // Staging orphans: every writer with a staging directory that no process runs.
    let staging = table.path("_sluice/staging");
    let listed = table
        .store
        .list_with_delimiter(Some(&staging))
        .await
        .map_err(EngineError::store("listing _sluice/staging"))?;
    for dir in listed.common_prefixes {
        let writer = dir.filename().unwrap_or_default().to_string();
        if writer.is_empty() || writer == MAINTENANCE_WRITER {
            continue;
        }
        if let Ok(held) = WriterLease::acquire_if_stopped(table, &writer).await {
            // Under the writer's lease: a writer that comes back meanwhile takes it over only
            // after this one's fence expired, and no delete is sent after that.
            let recovered = CommitLog::new(table.clone(), &writer)
                .with_fence(held.fence())
                .recover()
                .await;
            held.release().await;
            report.staging_orphans += recovered?.orphans_removed;
        }
    }
    // Probe objects of the store check (`_sluice/probe/`) left by a killed process.
    let probes: Vec<_> = table
        .store
        .list(Some(&table.path("_sluice/probe")))
        .try_collect()
        .await
        .map_err(EngineError::store("listing _sluice/probe"))?;
    for p in probes {
        if now.signed_duration_since(p.last_modified) > chrono::Duration::hours(1) {
            delete(table, lease, &p.location).await?;
        }
    }
    if let Some(keep) = archive_retention {
        for e in folded.index.iter().filter(|e| older(e, keep)) {
            // Archive files live under `_sluice/raw/`: never a data file a commit names.
            if let Some(a) = &e.archive {
                delete(table, lease, &table.path(&a.path)).await?;
                report.archive_files.push(a.path.clone());
            }
        }
    }
    if newest_checkpoint > 0 {
        let expired = |epoch: u64| epoch < newest_checkpoint && by_epoch.get(&epoch).is_some_and(|e| older(e, keep.log));
        (report.log_entries, report.checkpoints) = expire_log(table, lease, &log, expired).await?;
    }
    Ok(report)
}

/// Deletes the entries (oldest first) and checkpoints for which `expired` holds; returns how
/// many of each.
async fn expire_log(
    table: &TableStore,
    lease: &WriterLease,
    log: &CommitLog,
    expired: impl Fn(u64) -> bool,
) -> Result<(usize, usize)> {
    // Old checkpoints first: a reader never finds a checkpoint whose following entries are
    // gone (it would see a gap, and look again).
    let mut checkpoints = 0;
    for path in list(table, &table.checkpoint_dir()).await? {
        let epoch = path.filename().and_then(|n| n.strip_suffix(".json")?.parse::<u64>().ok());
        if epoch.is_some_and(&expired) {
            delete(table, lease, &path).await?;
            checkpoints += 1;
        }
    }
    let mut entries = 0;
    for epoch in log.epochs().await?.into_iter().filter(|e| expired(*e)) {
        delete(table, lease, &table.log_dir().join(format!("{epoch:020}.json"))).await?;
        entries += 1;
    }
    Ok((entries, checkpoints))
}

async fn list(table: &TableStore, prefix: &object_store::path::Path) -> Result<Vec<object_store::path::Path>> {
    let metas: Vec<_> = table
        .store
        .list(Some(prefix))
        .try_collect()
        .await
        .map_err(EngineError::store(format!("listing {prefix}")))?;
    Ok(metas.into_iter().map(|m| m.location).collect())
}

async fn delete(table: &TableStore, lease: &WriterLease, path: &object_store::path::Path) -> Result<()> {
    lease
        .fence()
        .guard(MAINTENANCE_WRITER, async {
            match table.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(EngineError::store(format!("deleting {path}"))(e)),
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::commit::CommitEntry;

    /// Log retention: with 250 commits, checkpoints at 100 and 200 and a retention of zero,
    /// vacuum deletes entries 1–199 and the checkpoint at 100 (everything older than the
    /// newest checkpoint), and nothing a reader needs: the snapshot, recovery, the live files
    /// and `sluice check` say the same as before; the entries after the checkpoint stay.
    #[tokio::test]
    async fn log_retention_deletes_only_what_the_newest_checkpoint_folds() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let log = CommitLog::new(table.clone(), "p");
        for epoch in 1..=250u64 {
            let file = format!("d/f-{epoch}.parquet");
            log.stage(&file, b"x".to_vec()).await.unwrap();
            let mut e = CommitEntry::adding(epoch, "p", &[file.as_str()]);
            e.committed_at = (chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339();
            e.sources.insert("src".into(), serde_json::json!({ "seq": epoch }));
            log.commit(&mut e).await.unwrap();
            if epoch % 100 == 0 {
                log.write_checkpoint(epoch).await.unwrap();
            }
        }
        let before = log.snapshot().await.unwrap().folded();
        // A retention of a week keeps everything (the commits are three days old); one below
        // an hour, or below the removed files', is refused.
        let day = Duration::from_secs(86_400);
        let week = Retention {
            removed: day,
            archive: None,
            log: 7 * day,
        };
        let kept = vacuum(&table, week).await.unwrap();
        assert_eq!((kept.log_entries, kept.checkpoints), (0, 0));
        for log in [Duration::ZERO, Duration::from_secs(600), day / 2] {
            assert!(vacuum(&table, Retention { log, ..week }).await.is_err(), "{log:?}");
        }

        let report = vacuum(&table, Retention { log: day, ..week }).await.unwrap();
        assert_eq!(report.log_entries, 199, "entries 1..=199");
        assert_eq!(report.checkpoints, 1, "the checkpoint at 100");
        assert_eq!(log.epochs().await.unwrap(), (200..=250).collect::<Vec<_>>());
        let after = log.snapshot().await.unwrap().folded();
        assert_eq!(after.files, before.files, "the same live files");
        assert_eq!(after.index, before.index, "every entry's summary is kept");
        let rec = log.recover().await.unwrap();
        assert_eq!(rec.next_epoch(), 251);
        assert_eq!(rec.last.map(|e| e.sources["src"]["seq"].as_u64()), Some(Some(250)));
        let check = crate::log::check::check_table(&table).await.unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.files, 250, "files of deleted entries are still live");
        // The table goes on: a new commit, and a second vacuum finds nothing more to expire.
        let mut e = CommitEntry::adding(251, "p", &["d/f-251.parquet"]);
        log.stage("d/f-251.parquet", b"x".to_vec()).await.unwrap();
        log.commit(&mut e).await.unwrap();
        let again = vacuum(&table, Retention { log: day, ..week }).await.unwrap();
        assert_eq!((again.log_entries, again.checkpoints), (0, 0));
        // A writer whose next epoch is in the expired part (idle for longer than the
        // retention): its entry would be created there and never read; it moves past the
        // newest checkpoint instead, and readers see it.
        let idle = CommitLog::new(table.clone(), "q");
        idle.stage("d/q.parquet", b"q".to_vec()).await.unwrap();
        let mut late = CommitEntry::adding(5, "q", &["d/q.parquet"]);
        idle.commit(&mut late).await.unwrap();
        assert_eq!(late.epoch, 252, "committed after the log's newest entry");
        assert!(!log.epochs().await.unwrap().contains(&5), "nothing left in the expired part");
        let (files, _) = log.committed_files().await.unwrap();
        assert!(files.iter().any(|f| f.path == "d/q.parquet"), "readers see the idle writer's file");
    }
}
