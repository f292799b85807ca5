//! Table maintenance, as the `maintenance` writer (the lease reconcile's repair takes too):
//! `sluice compact` merges a partition's small files into files of about a target size, one
//! commit per partition, the row multiset unchanged; `sluice vacuum` deletes what no live
//! commit needs: files commits removed (under `_sluice/removed/`) once their commit is older
//! than the retention, staged files of writers that are not running and whose newest commit
//! does not name them, and raw-archive files older than the archive retention.
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
use crate::log::commit::{CommitEntry, CommitLog, Counts, FileAction, LOG_VERSION, Origin};
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
        let now = log.snapshot().await?;
        let live = now.live_paths();
        if let Some(p) = remove.iter().find(|p| !live.contains(*p)) {
            return Err(EngineError::config(
                format!("{p} was removed by another commit while compacting; nothing more was changed"),
                Some("run the compaction again".to_string()),
            ));
        }
        let files_before = remove.len();
        let rows = add.iter().map(|f| f.rows).sum();
        let files_after = add.len();
        let mut entry = CommitEntry {
            version: LOG_VERSION,
            epoch: (now.newest_epoch() + 1).max(next_epoch),
            pipeline: MAINTENANCE_WRITER.to_string(),
            instance: None,
            committed_at: chrono::Utc::now().to_rfc3339(),
            add,
            remove,
            dead_letters: vec![],
            sources: BTreeMap::new(),
            counts: Counts::default(),
            schema: schema.clone(),
            quality: None,
            archive: None,
            state: None,
        };
        log.commit(&mut entry).await?;
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
}

/// Deletes the files no live commit needs: files removed by commits older than `retention`,
/// staging orphans of writers not running (their recovery runs), and, with
/// `archive_retention`, archive files of commits older than it. Never a file a live commit
/// names as data.
pub async fn vacuum(
    table: &TableStore,
    retention: Duration,
    archive_retention: Option<Duration>,
) -> Result<VacuumReport> {
    let lease = WriterLease::acquire(table, MAINTENANCE_WRITER).await?;
    let result = vacuum_holding(table, &lease, retention, archive_retention).await;
    lease.release().await;
    result
}

async fn vacuum_holding(
    table: &TableStore,
    lease: &WriterLease,
    retention: Duration,
    archive_retention: Option<Duration>,
) -> Result<VacuumReport> {
    let log = CommitLog::new(table.clone(), MAINTENANCE_WRITER).with_fence(lease.fence());
    log.recover().await?;
    let mut report = VacuumReport::default();
    let now = chrono::Utc::now();
    let older = |e: &EntrySummary, keep: Duration| {
        chrono::DateTime::parse_from_rfc3339(&e.committed_at)
            .is_ok_and(|t| now.signed_duration_since(t).to_std().is_ok_and(|age| age >= keep))
    };
    let folded = log.snapshot().await?.folded();
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
                delete(table, &path).await?;
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
            let recovered = CommitLog::new(table.clone(), &writer).recover().await;
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
            delete(table, &p.location).await?;
        }
    }
    if let Some(keep) = archive_retention {
        for e in folded.index.iter().filter(|e| older(e, keep)) {
            // Archive files live under `_sluice/raw/`: never a data file a commit names.
            if let Some(a) = &e.archive {
                match table.store.delete(&table.path(&a.path)).await {
                    Ok(()) => report.archive_files.push(a.path.clone()),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(err) => return Err(EngineError::store(format!("deleting {}", a.path))(err)),
                }
            }
        }
    }
    Ok(report)
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

async fn delete(table: &TableStore, path: &object_store::path::Path) -> Result<()> {
    match table.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(EngineError::store(format!("deleting {path}"))(e)),
    }
}
