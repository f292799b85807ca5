//! The checkpoint of a pipeline's event-time state with each commit: open windows (one Parquet
//! file per window, rewritten only when the epoch changed it) and dedup keys (one file per
//! epoch that kept keys, dropped once all its keys expired), named in the commit entry's
//! [`StateEntry`] and staged like every other file, so they are in place before the entry that
//! names them exists. A restart loads the files its last entry names; a failed attempt at an
//! epoch reloads them too, so no micro-batch is ever applied to the state twice.

use std::collections::BTreeSet;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{EngineError, Result};
use crate::event_time::EventTime;
use crate::event_time::window::WindowAggregate;
use crate::log::commit::{CommitLog, StateEntry, StateFile};

/// Everything a pipeline keeps across micro-batches.
pub struct StreamState {
    /// Watermark, late rows, dedup.
    pub event_time: EventTime,
    /// Open windows, for a windowed pipeline.
    pub windows: Option<WindowAggregate>,
    /// What the last commit recorded.
    last: StateEntry,
    /// True when the in-memory state may be ahead of the last commit (an epoch failed after
    /// changing it): reload before the next epoch.
    pub stale: bool,
}

fn encode(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None)
        .map_err(|e| EngineError::Internal(format!("encoding state: {e}")))?;
    w.write(batch)
        .and_then(|_| w.close().map(|_| ()))
        .map_err(|e| EngineError::Internal(format!("encoding state: {e}")))?;
    Ok(buf)
}

fn decode(path: &str, bytes: Bytes) -> Result<Vec<RecordBatch>> {
    let bad = |e: &dyn std::fmt::Display| EngineError::CommitLog {
        path: path.to_string(),
        message: format!("state file is not readable: {e}"),
    };
    ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| bad(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))
}

/// Where `writer`'s state files of `epoch` go.
fn state_dir(writer: &str, epoch: u64) -> String {
    format!("_sluice/state/{writer}/{epoch:020}")
}

impl StreamState {
    /// Fresh state.
    pub fn new(event_time: EventTime, windows: Option<WindowAggregate>) -> Self {
        StreamState {
            event_time,
            windows,
            last: StateEntry::default(),
            stale: false,
        }
    }

    /// Bytes held in memory (open windows and dedup keys).
    pub fn size(&self) -> usize {
        self.windows.as_ref().map_or(0, |w| w.size()) + self.event_time.dedup.as_ref().map_or(0, |d| d.size())
    }

    /// Stages this epoch's state files through `log` and returns the entry part naming every
    /// live one (`late`, `duplicates`, `dirty` and `windows_emitted` are the caller's).
    pub async fn checkpoint(&mut self, log: &CommitLog, epoch: u64) -> Result<StateEntry> {
        let dir = state_dir(log.writer(), epoch);
        let watermark = self.event_time.watermark();
        let mut entry = StateEntry {
            max_event_time_ns: self.event_time.max_event_time(),
            partitions: self.event_time.partitions(),
            watermark_ns: watermark,
            watermark: watermark.map(super::rfc3339),
            ..Default::default()
        };
        if let Some(w) = &mut self.windows {
            let changed = w
                .checkpoint()
                .map_err(|e| EngineError::Internal(format!("checkpointing windows: {e}")))?;
            let mut files: std::collections::BTreeMap<i64, StateFile> = self
                .last
                .windows
                .iter()
                .map(|f| (f.time_ns, f.clone()))
                .collect();
            for (end, batch) in changed {
                let path = format!("{dir}/window-{end}.parquet");
                log.stage(&path, encode(&batch)?).await?;
                entry.added.push(path.clone());
                files.insert(
                    end,
                    StateFile {
                        path,
                        time_ns: end,
                        rows: batch.num_rows() as u64,
                    },
                );
            }
            let open: BTreeSet<i64> = w.open_ends().into_iter().collect();
            entry.windows = files.into_values().filter(|f| open.contains(&f.time_ns)).collect();
        }
        if let Some(d) = &mut self.event_time.dedup {
            entry.dedup = self
                .last
                .dedup
                .iter()
                .filter(|f| d.file_live(f.time_ns, watermark))
                .cloned()
                .collect();
            if let Some((batch, newest)) = d.take_added()? {
                let path = format!("{dir}/dedup.parquet");
                log.stage(&path, encode(&batch)?).await?;
                entry.added.push(path.clone());
                entry.dedup.push(StateFile {
                    path,
                    time_ns: newest,
                    rows: batch.num_rows() as u64,
                });
            }
        }
        entry.state_bytes = self.size() as u64;
        Ok(entry)
    }

    /// Records that `entry` committed, and deletes the state files it no longer names
    /// (best effort: [`StreamState::sweep`] removes what a crash left).
    pub async fn committed(&mut self, log: &CommitLog, entry: &StateEntry) {
        let keep: BTreeSet<&str> = entry.windows.iter().chain(&entry.dedup).map(|f| f.path.as_str()).collect();
        for f in self.last.windows.iter().chain(&self.last.dedup) {
            if !keep.contains(f.path.as_str()) {
                let path = log.table().path(&f.path);
                let deleted = log
                    .fenced(async { log.table().store.delete(&path).await.map_err(EngineError::store("deleting a state file")) })
                    .await;
                if let Err(e) = deleted {
                    tracing::debug!(path = %path, error = %e, "state file not deleted; the next start sweeps it");
                }
            }
        }
        self.last = entry.clone();
        self.stale = false;
    }

    /// Loads the state `entry` names (none: empty state), replacing what is in memory.
    pub async fn restore(&mut self, log: &CommitLog, entry: Option<&StateEntry>, rebuild: impl Fn() -> Result<Option<WindowAggregate>>) -> Result<()> {
        let entry = entry.cloned().unwrap_or_default();
        self.event_time
            .resume(entry.max_event_time_ns, entry.watermark_ns, &entry.partitions);
        self.windows = rebuild()?;
        if let Some(w) = &mut self.windows {
            w.resume(entry.watermark_ns);
            for f in &entry.windows {
                for batch in read(log, &f.path).await? {
                    w.restore(f.time_ns, &batch).map_err(|e| EngineError::CommitLog {
                        path: f.path.clone(),
                        message: format!("window state does not fit the pipeline: {e}"),
                    })?;
                }
            }
            // Loaded state is what the entry names: nothing to write again.
            w.mark_saved();
        }
        if let Some(d) = &mut self.event_time.dedup {
            d.clear();
            for f in &entry.dedup {
                for batch in read(log, &f.path).await? {
                    d.load(&batch)?;
                }
            }
            if let Some(w) = entry.watermark_ns {
                d.expire(w);
            }
        }
        self.last = entry;
        self.stale = false;
        Ok(())
    }

    /// Reloads the state of the last commit (after an epoch failed part-way through).
    pub async fn reload(&mut self, log: &CommitLog, rebuild: impl Fn() -> Result<Option<WindowAggregate>>) -> Result<()> {
        let last = self.last.clone();
        self.restore(log, Some(&last), rebuild).await
    }

    /// Deletes `log`'s writer's state files the last commit does not name (left by a crash
    /// between a commit and the deletion of the files it replaced, or by an epoch never
    /// committed).
    pub async fn sweep(&self, log: &CommitLog) -> Result<usize> {
        let prefix = log.table().path(&format!("_sluice/state/{}", log.writer()));
        let keep: BTreeSet<object_store::path::Path> = self
            .last
            .windows
            .iter()
            .chain(&self.last.dedup)
            .map(|f| log.table().path(&f.path))
            .collect();
        let listed: Vec<_> = log
            .table()
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(EngineError::store("listing state files"))?;
        let mut n = 0;
        for meta in listed {
            if !keep.contains(&meta.location) {
                log.fenced(async {
                    match log.table().store.delete(&meta.location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(EngineError::store(format!("deleting {}", meta.location))(e)),
                    }
                })
                .await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

async fn read(log: &CommitLog, path: &str) -> Result<Vec<RecordBatch>> {
    let full = log.table().path(path);
    match log.table().get_if_exists(&full).await? {
        Some(bytes) => decode(path, bytes),
        None => Err(EngineError::CommitLog {
            path: path.to_string(),
            message: "a state file the last commit names is missing".into(),
        }),
    }
}
