//! One running pipeline: receives chunks from its source, closes micro-batches by the
//! [`BatchPolicy`], runs the plan, stages the output through the sink, and commits one log entry
//! per epoch (files, dead letters, source positions, counts).
//!
//! A record that makes the plan fail is found by bisection and dead-lettered at the `transform`
//! stage, so one bad value never blocks the batch. Transient store failures are retried with
//! capped exponential back-off; the batch is kept in memory meanwhile and the bounded channel
//! pushes back on the source.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::budget::Budget;
use crate::dead_letter::{DeadLetter, Stage, to_ndjson};
use crate::error::{EngineError, Result};
use crate::event_time::state::StreamState;
use crate::event_time::window::{WindowAggregate, add_isolating};
use crate::log::commit::{
    ArchiveFile, CommitEntry, CommitLog, Counts, DeadLetterFile, QualityEntry, StateEntry, TableSchema, TableSummary,
};
use crate::log::transaction::Transaction;
use crate::pipeline::batcher::{BatchPolicy, Batcher};
use crate::plan::{BatchPlan, slice_rows};
use crate::quality::Quality;
use crate::quality::drift::AnomalyEvent;
use crate::quality::expect::FailedRow;
use crate::quality::profile::{self, ColumnProfile, Side, profile_batches};
use crate::quality::store::{self, ProfileRow, profile_path};
use crate::retry::{RetryPolicy, is_transient};
use crate::connector::sink::Sink;
use crate::connector::source::{Chunk, Health, Message};

/// The life-cycle state of a pipeline, as shown by `GET /v1/pipelines`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    /// Recovering its table and starting its source.
    #[default]
    Starting,
    /// Waiting for its writer lease on the sink (after a kill -9 on an object store, until the
    /// dead holder's lease expires).
    WaitingForLease,
    /// Taking input and committing.
    Running,
    /// A commit failed; retrying with back-off.
    Retrying,
    /// Failed repeatedly: not ready, input refused, still retrying; see `last_error`.
    Failed,
    /// Drained and stopped.
    Stopped,
}

/// What `GET /v1/pipelines` shows about a pipeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineStatus {
    /// Pipeline (sink) name.
    pub name: String,
    /// Source table.
    pub source: String,
    /// Sink LOCATION.
    pub sink_location: String,
    /// Life-cycle state.
    pub state: PipelineState,
    /// Newest committed epoch.
    pub last_epoch: Option<u64>,
    /// When it was committed (UTC, RFC 3339).
    pub last_commit_at: Option<String>,
    /// Records received since start.
    pub events_received: u64,
    /// Rows written since start.
    pub events_written: u64,
    /// Records dead-lettered since start.
    pub events_dead_lettered: u64,
    /// Records in the open micro-batch.
    pub buffered_records: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Why the pipeline does not take input right now (its sources answer 503), if it does not.
    pub intake_error: Option<String>,
    /// Violations per expectation since start.
    pub expectation_violations: BTreeMap<String, u64>,
    /// Open anomaly episodes (`column.metric`) with the epoch each started in.
    pub open_anomalies: BTreeMap<String, u64>,
    /// Bytes of the newest committed profile file (0 when profiling is off).
    pub last_profile_bytes: u64,
    /// How far behind its input the pipeline is, per part of the input (Kafka: messages per
    /// partition between the log end and the committed offset); empty for other sources.
    pub source_lag: crate::connector::source::Lag,
    /// The committed watermark (RFC 3339), when the source has event time.
    pub watermark: Option<String>,
    /// Bytes of state (open windows, dedup keys) as of the newest commit.
    pub state_bytes: u64,
    /// Windows open as of the newest commit.
    pub open_windows: u64,
    /// Late rows since start.
    pub late_rows: u64,
    /// Repeats dropped by dedup since start.
    pub duplicates_dropped: u64,
    /// Seconds it has waited for its writer lease, while `state` is `waiting_for_lease`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for_lease_secs: Option<u64>,
    /// Since when it waits for its lease.
    #[serde(skip)]
    pub waiting_since: Option<Instant>,
}

/// Shared, updatable status of one pipeline.
pub type StatusHandle = Arc<Mutex<PipelineStatus>>;

/// Updates a status under its lock (a poisoned lock is recovered: status is informational).
pub fn update(status: &StatusHandle, f: impl FnOnce(&mut PipelineStatus)) {
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

/// The part of a windowed pipeline above its aggregate, run over the windows the watermark
/// closes (the task's `plan` is then the part below it).
pub struct Windowed {
    /// The split pipeline.
    pub def: sluice_sql::WindowDef,
    /// The part above the aggregate, bound to the emitted windows.
    pub output: BatchPlan,
}

impl Windowed {
    /// Empty window state for this pipeline.
    pub fn state(&self) -> Result<WindowAggregate> {
        WindowAggregate::new(&self.def, &datafusion::execution::context::ExecutionProps::new())
            .map_err(EngineError::Environment)
    }
}

/// Everything a running pipeline owns.
pub struct PipelineTask {
    /// Pipeline (sink) name.
    pub name: String,
    /// Source table name.
    pub source: String,
    /// The bound plan.
    pub plan: BatchPlan,
    /// The sink.
    pub sink: Arc<dyn Sink>,
    /// The sink's commit log, opened as this pipeline's writer.
    pub log: CommitLog,
    /// The server instance running it (`sluice run --instance`), recorded in its entries.
    pub instance: Option<String>,
    /// When batches close.
    pub policy: BatchPolicy,
    /// The next epoch to commit.
    pub next_epoch: u64,
    /// Source positions as of the newest commit.
    pub positions: BTreeMap<String, serde_json::Value>,
    /// The table schema recorded in each entry.
    pub schema: TableSchema,
    /// Shared status.
    pub status: StatusHandle,
    /// The pipeline's memory budget (released after each commit).
    pub budget: Arc<Budget>,
    /// Where committed source positions are announced to the source.
    pub committed: watch::Sender<Option<serde_json::Value>>,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Back-off for failed commits.
    pub retry: RetryPolicy,
    /// Whether the pipeline takes input (failed or stopped: its sources refuse intake).
    pub health: Health,
    /// Expectations and profiles.
    pub quality: Quality,
    /// Whether each epoch's accepted events go to the raw archive (sink option `archive`).
    pub archive: bool,
    /// Watermark, dedup and window state, when the source has event time.
    pub state: Option<StreamState>,
    /// The windowed part, when the pipeline aggregates windows.
    pub windowed: Option<Windowed>,
}

impl PipelineTask {
    /// Runs until the source side closes the channel, then commits what is buffered.
    pub async fn run(mut self, rx: mpsc::Receiver<Message>) -> Result<()> {
        let health = self.health.clone();
        let result = self.run_loop(rx).await;
        health.fail(match &result {
            Ok(()) => "the pipeline has stopped".to_string(),
            Err(e) => format!("the pipeline has stopped: {e}"),
        });
        result
    }

    async fn run_loop(&mut self, mut rx: mpsc::Receiver<Message>) -> Result<()> {
        update(&self.status, |s| s.state = PipelineState::Running);
        // Grown batches stay within a quarter of the budget: the batch being committed, the one
        // filling and the requests in flight must fit without pushing producers back.
        let mut batcher = Batcher::new(self.policy).with_byte_cap(self.budget.policy().max_bytes / 4);
        loop {
            let deadline = batcher.deadline();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Message::Idle) => {
                        batcher.reset_growth();
                        if !batcher.is_empty() {
                            self.flush(&mut batcher).await?;
                        }
                    }
                    Some(Message::Chunk(chunk)) => {
                        let n = chunk.received() as u64;
                        metrics::counter!("sluice_events_received_total", "pipeline" => self.name.clone()).increment(n);
                        let full = batcher.push(chunk);
                        let rows = batcher.rows() as u64;
                        update(&self.status, |s| { s.events_received += n; s.buffered_records = rows; });
                        if full {
                            self.flush(&mut batcher).await?;
                            // Input already waiting: behind, so the next batch may be bigger.
                            if rx.is_empty() {
                                batcher.reset_growth();
                            } else {
                                batcher.grow();
                            }
                        }
                    }
                    None => {
                        if !batcher.is_empty() {
                            self.flush(&mut batcher).await?;
                        }
                        update(&self.status, |s| s.state = PipelineState::Stopped);
                        return Ok(());
                    }
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    batcher.reset_growth();
                    self.flush(&mut batcher).await?
                }
            }
        }
    }

    /// Commits the open batch. Transient failures are retried with back-off: after
    /// `retry.max_attempts` the pipeline reports `failed` (not ready, input refused by the
    /// budget) and keeps retrying at the longest delay until the store recovers — or, once the
    /// server is shutting down, gives up (what was acknowledged stays in the source's log).
    ///
    /// The epoch is transformed and staged once: a retry after staging re-commits exactly the
    /// entry that was staged (same files, sizes and dead letters), never a recomputation, whose
    /// output could differ (partition order, `now()`) from an attempt that reached the log.
    async fn flush(&mut self, batcher: &mut Batcher) -> Result<()> {
        let chunks = batcher.take();
        let bytes: u64 = chunks.iter().map(|c| c.bytes as u64).sum();
        let mut staged: Option<Staged> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match staged.as_mut() {
                Some(s) => self.commit_staged(s).await,
                None => match self.stage_epoch(&chunks).await {
                    Ok(s) => self.commit_staged(staged.insert(s)).await,
                    Err(e) => {
                        // The state may hold part of this epoch: reloaded before the retry.
                        if let Some(st) = &mut self.state {
                            st.stale = true;
                        }
                        Err(e)
                    }
                },
            };
            match result {
                Ok(()) => {
                    self.budget.release(bytes);
                    if attempt > 1 {
                        self.health.clear();
                    }
                    update(&self.status, |s| {
                        s.state = PipelineState::Running;
                        s.buffered_records = 0;
                        s.last_error = None;
                    });
                    return Ok(());
                }
                Err(e) => {
                    tracing::error!(pipeline = %self.name, epoch = self.next_epoch, attempt, error = %e, "commit failed");
                    metrics::counter!("sluice_commit_retries_total", "pipeline" => self.name.clone()).increment(1);
                    let msg = e.to_string();
                    let stopping = *self.shutdown.borrow();
                    if !is_transient(&e) || (stopping && attempt >= self.retry.max_attempts) {
                        update(&self.status, |s| {
                            s.state = PipelineState::Failed;
                            s.last_error = Some(msg);
                        });
                        return Err(e);
                    }
                    let state = if attempt >= self.retry.max_attempts {
                        self.health.fail(format!("pipeline {} cannot commit: {msg}", self.name));
                        PipelineState::Failed
                    } else {
                        PipelineState::Retrying
                    };
                    update(&self.status, |s| {
                        s.state = state;
                        s.last_error = Some(msg);
                    });
                    // Back-off between attempts of a failed commit (not test synchronisation).
                    tokio::time::sleep(self.retry.delay(attempt.min(self.retry.max_attempts))).await;
                }
            }
        }
    }

    /// Runs the plan over one epoch, checks and profiles both sides, and stages its files,
    /// dead letters and profile; returns the entry that commits them.
    async fn stage_epoch(&mut self, chunks: &[Chunk]) -> Result<Staged> {
        let started = Instant::now();
        let epoch = self.next_epoch;
        let now = chrono::Utc::now();
        let Intake {
            mut dead,
            received,
            principals,
            input,
        } = Intake::of(chunks);
        let decoded: u64 = input.iter().map(|b| b.num_rows() as u64).sum();
        let decode_dead = dead.len() as u64;
        let mut profiles: Vec<(Side, String, Vec<ColumnProfile>)> = self.profile_source(&input, epoch).into_iter().collect();
        let checked = self.quality.source.check(&self.name, input).await?;
        let mut violations = checked.violations;
        let mut dropped =
            decoded - checked.kept.iter().map(|b| b.num_rows() as u64).sum::<u64>() - checked.dead.len() as u64;
        dead.extend(
            checked
                .dead
                .into_iter()
                .map(|f| self.expectation_letter(Side::Source, epoch, f)),
        );
        let positions = self.positions_after(chunks);
        // Event time: late rows and repeats leave before the plan; late rows are still
        // archived (reconciliation brings them into the batch view), repeats are not.
        let split = self.split_event_time(checked.kept).await?;
        let (kept, late, duplicates) = (split.kept, split.late, split.duplicates);
        let late_rows: u64 = late.iter().map(|b| b.num_rows() as u64).sum();
        dropped += self.apply_late_policy(&late, &split.reasons, &mut dead) + duplicates;
        // The raw archive of what the SQL reads is encoded on a blocking thread while the plan
        // runs (on one thread: the plan and the sink's encoder have the other cores). Rows the
        // plan fails on are rare: the archive is then encoded again without them.
        let position = positions.get(&self.source).map(|p| p.to_string());
        let archived = |failed: &[usize]| {
            let mut rows = without_rows(&kept, failed);
            rows.extend(late.iter().cloned());
            rows
        };
        let archiving = self
            .archive
            .then(|| self.encode_archive(archived(&[]), epoch, position.clone(), now));
        let (output, failed) = self.transform(&kept, &mut dead).await?;
        let archiving = match archiving {
            Some(_) if !failed.is_empty() => Some(self.encode_archive(archived(&failed), epoch, position, now)),
            other => other,
        };
        let (output, windows_emitted, closed_rows) = self.close_windows(output, &mut dead).await?;
        // Rows whose window had already been emitted are late too (dropped, counted).
        dropped += closed_rows;
        let late_rows = late_rows + closed_rows;
        let dirty = if late.is_empty() { Vec::new() } else { self.dirty_partitions(&late).await };

        let sink = self.check_sink(output, epoch, &mut dead).await?;
        // Quarantined whole: every event is a dead letter, none is archived.
        let archiving = archiving.filter(|_| !sink.quarantined);
        violations.extend(sink.violations);
        let (output, written) = (sink.kept, sink.written);
        dropped += sink.dropped;
        let expectation_dead = dead.iter().filter(|d| d.stage == Stage::Expectation).count() as u64;
        let drift = match self.profile_sink(&output, epoch, now, written) {
            Some((p, drift)) => {
                profiles.push((Side::Sink, self.name.clone(), p));
                drift
            }
            None => (BTreeMap::new(), Vec::new()),
        };

        let files = self.sink.stage(&self.log, epoch, output).await?;
        let dead_letters = self.stage_dead_letters(epoch, &dead).await?;
        let (quality, profile_bytes) = self.stage_quality(epoch, now, profiles, violations, drift).await?;
        let archive = match archiving {
            Some(task) => self.stage_archive(task, epoch, now).await?,
            None => None,
        };
        let state = self
            .checkpoint_state(
                epoch,
                EpochState {
                    late: late_rows,
                    duplicates,
                    dirty,
                    windows_emitted,
                },
            )
            .await?;
        let late_dead = dead.iter().filter(|d| d.stage == Stage::Late).count() as u64;
        // Rows an event-time policy dropped (late with `drop`, repeats): in `dropped`, but not
        // the expectations'.
        let policy_dropped = (late_rows - late_dead) + duplicates;
        let entry = Transaction::new(&self.name, self.instance.clone(), epoch, self.schema.clone())
            .at(now)
            .add(files)
            .dead_letters(dead_letters)
            .sources(positions)
            .counts(Counts {
                received,
                decoded,
                dead_lettered: dead.len() as u64,
                dropped,
                output: written,
                principals,
            })
            .quality(quality)
            .archive(archive)
            .state(state)
            .into_entry();
        Ok(Staged {
            entry,
            decode_dead,
            expectation_dead,
            late_dead,
            policy_dropped,
            started,
            profile_bytes,
        })
    }

    /// Late rows go to dead letters (`'late' 'dead_letter'`) or are dropped; returns how
    /// many were dropped.
    fn apply_late_policy(&self, late: &[RecordBatch], reasons: &[String], dead: &mut Vec<DeadLetter>) -> u64 {
        let to_dead_letters = self
            .state
            .as_ref()
            .is_some_and(|st| st.event_time.def.late == sluice_sql::LatePolicy::DeadLetter);
        if to_dead_letters {
            dead.extend(self.late_letters(late, reasons));
            0
        } else {
            late.iter().map(|b| b.num_rows() as u64).sum()
        }
    }

    /// The source positions after `chunks`: the newest chunk's position for this source.
    fn positions_after(&self, chunks: &[Chunk]) -> BTreeMap<String, serde_json::Value> {
        let mut positions = self.positions.clone();
        if let Some(p) = chunks.iter().rev().find_map(|c| c.position.clone()) {
            positions.insert(self.source.clone(), p);
        }
        positions
    }

    /// Runs the sink-side expectations over the epoch's output; the rows they fail join `dead`.
    async fn check_sink(&self, output: Vec<RecordBatch>, epoch: u64, dead: &mut Vec<DeadLetter>) -> Result<SinkChecked> {
        let produced: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        let checked = self.quality.sink.check(&self.name, output).await?;
        let quarantined = checked.dead.iter().any(|f| f.quarantined);
        let written: u64 = checked.kept.iter().map(|b| b.num_rows() as u64).sum();
        let dropped = produced - written - checked.dead.len() as u64;
        dead.extend(
            checked
                .dead
                .into_iter()
                .map(|f| self.expectation_letter(Side::Sink, epoch, f)),
        );
        Ok(SinkChecked {
            kept: checked.kept,
            written,
            dropped,
            violations: checked.violations,
            quarantined,
        })
    }

    /// The source-side profile of the epoch's input, when profiling (it informs; it never
    /// blocks a commit).
    fn profile_source(&self, input: &[RecordBatch], epoch: u64) -> Option<(Side, String, Vec<ColumnProfile>)> {
        if !self.quality.profile {
            return None;
        }
        let profiled = if self.quality.full_source {
            profile_batches(input, self.plan.input_schema())
        } else {
            profile::exact_figures(input, self.plan.input_schema())
        };
        match profiled {
            Ok(p) => Some((Side::Source, self.source.clone(), p)),
            Err(e) => {
                tracing::warn!(pipeline = %self.name, epoch, error = %e, "source profile skipped");
                None
            }
        }
    }

    /// The sink-side profile of the epoch's output and its drift figures and anomaly events,
    /// when profiling.
    fn profile_sink(
        &mut self,
        output: &[RecordBatch],
        epoch: u64,
        now: chrono::DateTime<chrono::Utc>,
        written: u64,
    ) -> Option<(Vec<ColumnProfile>, (BTreeMap<String, f64>, Vec<AnomalyEvent>))> {
        if !self.quality.profile {
            return None;
        }
        let mut p = profile_batches(output, self.output_schema())
            .map_err(|e| tracing::warn!(pipeline = %self.name, epoch, error = %e, "sink profile skipped"))
            .ok()?;
        profile::set_freshness(&mut p, self.output_schema(), now);
        let values = crate::quality::drift::metrics(written, &p);
        let events = self.quality.drift.evaluate(epoch, now.timestamp_millis(), &values);
        Some((p, (values, events)))
    }

    /// Event time: late rows and repeats leave `kept` (the state reloaded first when a failed
    /// epoch left it stale); without event time every row is kept.
    async fn split_event_time(&mut self, kept: Vec<RecordBatch>) -> Result<crate::event_time::Split> {
        match &mut self.state {
            Some(st) => {
                if st.stale {
                    let windowed = &self.windowed;
                    st.reload(&self.log, || windowed.as_ref().map(|w| w.state()).transpose())
                        .await?;
                }
                st.event_time.split(&kept)
            }
            None => Ok(crate::event_time::Split {
                kept,
                ..Default::default()
            }),
        }
    }

    /// Stages the epoch's dead letters as one NDJSON file, named by pipeline and epoch only
    /// (never the clock), like every staged file.
    async fn stage_dead_letters(&self, epoch: u64, dead: &[DeadLetter]) -> Result<Vec<DeadLetterFile>> {
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        let path = dead_letter_path(self.log.writer(), epoch);
        self.log.stage(&path, to_ndjson(dead)).await?;
        Ok(vec![DeadLetterFile {
            path,
            records: dead.len() as u64,
        }])
    }

    /// Stages the epoch's raw-archive file once its encoding finished (none when no row was
    /// archived).
    async fn stage_archive(
        &self,
        task: tokio::task::JoinHandle<Result<(u64, Vec<u8>)>>,
        epoch: u64,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<ArchiveFile>> {
        let (rows, bytes) = task
            .await
            .map_err(|e| EngineError::Internal(format!("archive encode task failed: {e}")))??;
        if rows == 0 {
            return Ok(None);
        }
        let path = crate::batch::archive::archive_path(self.log.writer(), epoch, now);
        let size = bytes.len() as u64;
        self.log.stage(&path, bytes).await?;
        Ok(Some(ArchiveFile {
            path,
            rows,
            bytes: size,
        }))
    }

    /// Stages the event-time state after the epoch (windows, dedup keys), when the source has
    /// event time, with the epoch's late rows, repeats and dirty partitions.
    async fn checkpoint_state(&mut self, epoch: u64, e: EpochState) -> Result<Option<StateEntry>> {
        let Some(st) = &mut self.state else {
            return Ok(None);
        };
        let mut s = st.checkpoint(&self.log, epoch).await?;
        s.late = e.late;
        s.duplicates = e.duplicates;
        s.dirty = e.dirty;
        s.windows_emitted = e.windows_emitted;
        s.unarchived = !self.archive;
        if crate::crash::fails_alternately("after_state") {
            return Err(EngineError::Io {
                context: "staging an epoch (injected after its state changed: SLUICE_FAIL_AT=after_state)".into(),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(Some(s))
    }

    /// Stages the epoch's profile file (when profiling) and returns the entry's quality part
    /// and the profile file's size.
    async fn stage_quality(
        &self,
        epoch: u64,
        now: chrono::DateTime<chrono::Utc>,
        profiles: Vec<(Side, String, Vec<ColumnProfile>)>,
        expectations: BTreeMap<String, crate::quality::expect::Violations>,
        (metrics, anomalies): (BTreeMap<String, f64>, Vec<AnomalyEvent>),
    ) -> Result<(Option<QualityEntry>, u64)> {
        if profiles.is_empty() && expectations.is_empty() {
            return Ok((None, 0));
        }
        let mut summary = BTreeMap::new();
        let mut rows = Vec::new();
        for (side, table, columns) in profiles {
            let s = TableSummary {
                rows: columns.first().map_or(0, |c| c.rows),
                nulls: columns
                    .iter()
                    .filter(|c| c.nulls > 0)
                    .map(|c| (c.column.clone(), c.nulls))
                    .collect(),
            };
            summary.insert(format!("{}.{table}", side.as_str()), s);
            rows.extend(columns.into_iter().map(|profile| ProfileRow {
                epoch,
                pipeline: self.name.clone(),
                side,
                table: table.clone(),
                committed_at_us: now.timestamp_micros(),
                profile,
            }));
        }
        let mut profile_bytes = 0;
        let profile = if rows.is_empty() {
            None
        } else {
            let path = profile_path(self.log.writer(), epoch);
            let bytes = store::encode(&rows)?.to_vec();
            profile_bytes = bytes.len() as u64;
            self.log.stage(&path, bytes).await?;
            Some(path)
        };
        let anomaly_file = if anomalies.is_empty() {
            None
        } else {
            let path = store::anomaly_path(self.log.writer(), epoch);
            let bytes = store::encode_anomalies(&self.name, epoch, now.timestamp_micros(), &anomalies)?;
            self.log.stage(&path, bytes.to_vec()).await?;
            Some(path)
        };
        let entry = QualityEntry {
            profile,
            expectations,
            summary,
            metrics,
            anomalies,
            anomaly_file,
        };
        Ok((Some(entry), profile_bytes))
    }

    /// The dead letter of a row that failed an expectation (or was in a quarantined batch).
    fn expectation_letter(&self, side: Side, epoch: u64, f: FailedRow) -> DeadLetter {
        DeadLetter {
            source: self.source.clone(),
            position: if f.quarantined {
                serde_json::json!({ "epoch": epoch, "side": side.as_str(), "quarantined_row": f.index })
            } else {
                serde_json::json!({ "epoch": epoch, "side": side.as_str(), "row": f.index })
            },
            stage: Stage::Expectation,
            error: f.reason,
            raw: row_json(std::slice::from_ref(&f.row)),
            raw_base64: None,
            principal: None,
        }
    }

    /// Commits a staged epoch (again, after a failed attempt: the same entry).
    async fn commit_staged(&mut self, staged: &mut Staged) -> Result<()> {
        let entry = &mut staged.entry;
        if crate::crash::held("commit") {
            return Err(EngineError::Io {
                context: "committing (injected: commits held by SLUICE_HOLD_AT)".into(),
                source: std::io::Error::other("held"),
            });
        }
        self.log.commit(entry).await?;
        let epoch = entry.epoch;
        self.next_epoch = epoch + 1;
        crate::crash::point("after_commit");
        let _ = self.committed.send(entry.sources.get(&self.source).cloned());
        self.positions = entry.sources.clone();

        let (written, dl, received) = (entry.counts.output, entry.counts.dead_lettered, entry.counts.received);
        let name = self.name.clone();
        metrics::counter!("sluice_events_written_total", "pipeline" => name.clone()).increment(written);
        metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "decode", "reason" => "dead_letter")
            .increment(staged.decode_dead);
        metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "transform", "reason" => "dead_letter")
            .increment(dl - staged.decode_dead - staged.expectation_dead - staged.late_dead);
        metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "late", "reason" => "dead_letter")
            .increment(staged.late_dead);
        metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "expectation", "reason" => "dead_letter")
            .increment(staged.expectation_dead);
        metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "expectation", "reason" => "drop")
            .increment(entry.counts.dropped - staged.policy_dropped);
        for (expectation, v) in entry.quality.iter().flat_map(|q| q.expectations.iter()) {
            metrics::counter!("sluice_expectation_violations_total", "pipeline" => name.clone(), "expectation" => expectation.clone(), "action" => v.action.clone())
                .increment(v.violations);
        }
        metrics::counter!("sluice_commits_total", "pipeline" => name.clone()).increment(1);
        metrics::histogram!("sluice_batch_duration_seconds", "pipeline" => name.clone())
            .record(staged.started.elapsed().as_secs_f64());
        metrics::histogram!("sluice_batch_records", "pipeline" => name.clone()).record(received as f64);
        if let Some(q) = &entry.quality {
            let at_ms = chrono::DateTime::parse_from_rfc3339(&entry.committed_at).map_or(0, |t| t.timestamp_millis());
            self.quality.drift.apply(at_ms, &q.metrics, &q.anomalies);
            for a in &q.anomalies {
                if a.event == "start" {
                    tracing::warn!(pipeline = %name, column = %a.column, metric = %a.metric, value = a.value, baseline = a.baseline, mad = a.mad, score = a.score, epoch, "quality anomaly started");
                    metrics::counter!("sluice_quality_anomalies_total", "pipeline" => name.clone(), "column" => a.column.clone(), "metric" => a.metric.clone())
                        .increment(1);
                } else {
                    tracing::info!(pipeline = %name, column = %a.column, metric = %a.metric, value = a.value, started = a.started, epoch, "quality anomaly ended");
                }
            }
        }
        if let (Some(st), Some(s)) = (&mut self.state, &entry.state) {
            st.committed(&self.log, s).await;
            let late_dropped = staged.policy_dropped - s.duplicates;
            metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "late", "reason" => "drop")
                .increment(late_dropped);
            metrics::counter!("sluice_events_discarded_total", "pipeline" => name.clone(), "stage" => "dedup", "reason" => "drop")
                .increment(s.duplicates);
            metrics::counter!("sluice_windows_emitted_total", "pipeline" => name.clone()).increment(s.windows_emitted);
            metrics::gauge!("sluice_state_bytes", "pipeline" => name.clone()).set(s.state_bytes as f64);
            if let Some(w) = s.watermark_ns {
                metrics::gauge!("sluice_watermark_seconds", "pipeline" => name.clone()).set(w as f64 / 1e9);
            }
            let s = s.clone();
            update(&self.status, |status| {
                status.watermark = s.watermark.clone();
                status.state_bytes = s.state_bytes;
                status.open_windows = s.windows.len() as u64;
                status.late_rows += s.late;
                status.duplicates_dropped += s.duplicates;
            });
        }
        let at = entry.committed_at.clone();
        let open = self.quality.drift.open().clone();
        let profile_bytes = staged.profile_bytes;
        update(&self.status, |s| {
            s.last_epoch = Some(epoch);
            s.last_commit_at = Some(at);
            s.events_written += written;
            s.events_dead_lettered += dl;
            for (name, v) in entry.quality.iter().flat_map(|q| q.expectations.iter()) {
                *s.expectation_violations.entry(name.clone()).or_default() += v.violations;
            }
            s.open_anomalies = open;
            if profile_bytes > 0 {
                s.last_profile_bytes = profile_bytes;
            }
        });
        tracing::debug!(pipeline = %self.name, epoch, received, written, dead_lettered = dl, "committed");
        Ok(())
    }

    /// The schema of what the pipeline writes.
    fn output_schema(&self) -> &arrow::datatypes::SchemaRef {
        match &self.windowed {
            Some(w) => w.output.output_schema(),
            None => self.plan.output_schema(),
        }
    }

    /// For a windowed pipeline: adds `rows` (the aggregate's input) to the open windows and
    /// returns the output of the windows the watermark now closes, how many closed, and how
    /// many rows fell in windows already emitted (dropped as late); other pipelines' rows pass
    /// through. A row the GROUP BY or aggregate arguments fail on, and a closed window the part
    /// above the aggregate fails on, are dead-lettered (stage `transform`).
    async fn close_windows(
        &mut self,
        rows: Vec<RecordBatch>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<RecordBatch>, u64, u64)> {
        let Some(st) = self.state.as_mut() else {
            return Ok((rows, 0, 0));
        };
        let watermark = st.event_time.watermark();
        let Some(open) = st.windows.as_mut() else {
            return Ok((rows, 0, 0));
        };
        let mut bad = Vec::new();
        let mut offset = 0;
        for b in &rows {
            add_isolating(open, b, offset, &mut bad)?;
            offset += b.num_rows();
        }
        let closed_rows = open.take_closed_rows();
        let closed = match watermark {
            Some(wm) => open.close(wm).map_err(EngineError::Environment)?,
            None => Default::default(),
        };
        for ((row, at), error) in bad {
            let position = serde_json::json!({ "aggregate_input_row": at });
            dead.push(self.letter(Stage::Transform, position, error, row_json(&[row])));
        }
        for (end, groups, error) in closed.failed {
            let end = crate::event_time::rfc3339(end);
            let error = format!("the window ending {end} ({groups} groups) could not be evaluated: {error}");
            dead.push(self.letter(Stage::Transform, serde_json::json!({ "window_end": end }), error, String::new()));
        }
        let (Some(w), false) = (&self.windowed, closed.emitted.is_empty()) else {
            return Ok((Vec::new(), 0, closed_rows));
        };
        let n = closed.emitted.len() as u64;
        let (out, _) = self.isolating(&w.output, "window_row", &closed.emitted, dead).await?;
        Ok((out, n, closed_rows))
    }

    /// The partitions (`k=v/.../`) `late` rows would have written to, had they been on time:
    /// what they produce through the plan on their own. Best effort: the list informs
    /// reconciliation, and a row the plan fails on is left out.
    async fn dirty_partitions(&self, late: &[RecordBatch]) -> Vec<String> {
        let produced = async {
            let late = match &self.state {
                Some(st) => st.event_time.with_event_time(late)?,
                None => late.to_vec(),
            };
            let rows = self.plan.execute(&late).await.map_err(EngineError::Environment)?;
            let Some(w) = &self.windowed else { return Ok(rows) };
            let mut open = w.state()?;
            let mut bad = Vec::new();
            for b in &rows {
                add_isolating(&mut open, b, 0, &mut bad)?;
            }
            let emitted = open.close_all().map_err(EngineError::Environment)?;
            w.output.execute(&emitted).await.map_err(EngineError::Environment)
        };
        match produced.await.and_then(|rows| self.sink.partition(rows)) {
            Ok(parts) => parts.into_iter().map(|(dir, _)| dir).collect(),
            Err(e) => {
                tracing::warn!(pipeline = %self.name, error = %e, "could not work out the partitions late rows touch");
                Vec::new()
            }
        }
    }

    /// A dead letter of this pipeline's source, at `position` within the epoch being staged.
    fn letter(&self, stage: Stage, position: serde_json::Value, error: String, raw: String) -> DeadLetter {
        let mut position = position;
        position["epoch"] = serde_json::json!(self.next_epoch);
        DeadLetter {
            source: self.source.clone(),
            position,
            stage,
            error,
            raw,
            raw_base64: None,
            principal: None,
        }
    }

    /// The dead letters of late rows.
    fn late_letters(&self, late: &[RecordBatch], reasons: &[String]) -> Vec<DeadLetter> {
        late.iter()
            .flat_map(|b| (0..b.num_rows()).map(move |i| b.slice(i, 1)))
            .enumerate()
            .map(|(i, row)| {
                let reason = reasons.get(i).cloned().unwrap_or_else(|| "late".to_string());
                self.letter(Stage::Late, serde_json::json!({ "late_row": i }), reason, row_json(&[row]))
            })
            .collect()
    }

    /// Starts encoding `rows` as the epoch's archive file on a blocking thread (its row count and
    /// bytes).
    fn encode_archive(
        &self,
        rows: Vec<RecordBatch>,
        epoch: u64,
        position: Option<String>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> tokio::task::JoinHandle<Result<(u64, Vec<u8>)>> {
        let schema = self.plan.input_schema().clone();
        let at = now.timestamp_micros();
        tokio::task::spawn_blocking(move || {
            let n = rows.iter().map(|b| b.num_rows() as u64).sum();
            Ok((
                n,
                crate::batch::archive::encode(&rows, &schema, epoch, position.as_deref(), at, 1)?,
            ))
        })
    }

    /// Runs the plan; when it fails, isolates the failing rows by bisection and dead-letters
    /// them. Returns the output and the indexes of the input rows it failed on.
    async fn transform(
        &self,
        input: &[RecordBatch],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<RecordBatch>, Vec<usize>)> {
        self.isolating(&self.plan, "row", input, dead).await
    }

    /// Runs `plan` over `input`; when it fails, isolates the failing rows (their position
    /// named `what`) by bisection and dead-letters them at the `transform` stage. Returns the
    /// output and the indexes of the input rows it failed on.
    async fn isolating(
        &self,
        plan: &BatchPlan,
        what: &str,
        input: &[RecordBatch],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<RecordBatch>, Vec<usize>)> {
        let rows: usize = input.iter().map(|b| b.num_rows()).sum();
        match plan.execute(input).await {
            Ok(out) => return Ok((out, vec![])),
            Err(e) if rows == 0 || environment_error(&e) => return Err(EngineError::Environment(e)),
            Err(e) => {
                // A plan that fails without any row fails for its environment (a static table
                // missing or half-written, the store), not for a row: retried, never
                // dead-lettered.
                let empty = RecordBatch::new_empty(plan.input_schema().clone());
                if let Err(env) = plan.execute(&[empty]).await {
                    return Err(EngineError::Environment(env));
                }
                tracing::warn!(pipeline = %self.name, error = %e, "batch failed in the plan; isolating bad rows")
            }
        }
        let mut out = Vec::new();
        let mut failed = Vec::new();
        let mut stack = vec![(0usize, rows)];
        while let Some((offset, len)) = stack.pop() {
            let part = slice_rows(input, offset, len);
            match plan.execute(&part).await {
                Ok(b) => out.push((offset, b)),
                Err(e) if len == 1 => {
                    failed.push(offset);
                    let position = serde_json::json!({ what: offset });
                    dead.push(self.letter(Stage::Transform, position, e.strip_backtrace(), row_json(&part)));
                }
                Err(_) => {
                    let half = len / 2;
                    stack.push((offset + half, len - half));
                    stack.push((offset, half));
                }
            }
        }
        // A plan failing on an empty batch fails on everything: not a data problem.
        out.sort_by_key(|(o, _)| *o);
        failed.sort_unstable();
        Ok((out.into_iter().flat_map(|(_, b)| b).collect(), failed))
    }
}

/// Whether a plan failed for its environment (a store, a file, I/O) whatever its rows: retried,
/// never dead-lettered. (An empty batch is not always a proof: a hash join whose build side is
/// empty never reads its other side.)
fn environment_error(e: &datafusion::error::DataFusionError) -> bool {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::ObjectStore(_) | E::IoError(_) | E::ParquetError(_) => true,
        E::ArrowError(a, _) => matches!(a.as_ref(), arrow::error::ArrowError::IoError(..)),
        _ => false,
    }
}

/// `batches` without the rows at `skip` (sorted indexes over the batches taken as one
/// sequence); zero-copy slices.
fn without_rows(batches: &[RecordBatch], skip: &[usize]) -> Vec<RecordBatch> {
    if skip.is_empty() {
        return batches.to_vec();
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut out = Vec::new();
    let mut from = 0;
    for &i in skip.iter().chain(std::iter::once(&rows)) {
        if i > from {
            out.extend(slice_rows(batches, from, i - from));
        }
        from = i + 1;
    }
    out
}

/// An epoch transformed and staged, waiting for its commit.
struct Staged {
    /// The entry that commits it.
    entry: CommitEntry,
    /// How many of its dead letters come from decoding.
    decode_dead: u64,
    /// How many come from expectations.
    expectation_dead: u64,
    /// How many are late rows (the rest come from the transform).
    late_dead: u64,
    /// Rows dropped by an event-time policy (late rows with `drop`, dedup repeats).
    policy_dropped: u64,
    /// When the epoch started, for the batch duration metric.
    started: Instant,
    /// Bytes of its profile file (0 without one).
    profile_bytes: u64,
}

/// What a micro-batch's chunks hold together: their dead letters (from decoding), records
/// received (in all and per sender) and the decoded rows, as they are (no concatenated copy).
struct Intake {
    dead: Vec<DeadLetter>,
    received: u64,
    principals: BTreeMap<String, u64>,
    input: Vec<RecordBatch>,
}

impl Intake {
    fn of(chunks: &[Chunk]) -> Intake {
        let mut principals = BTreeMap::<String, u64>::new();
        for c in chunks {
            if let Some(p) = &c.principal {
                *principals.entry(p.clone()).or_default() += c.received() as u64;
            }
        }
        Intake {
            dead: chunks.iter().flat_map(|c| c.dead_letters.iter().cloned()).collect(),
            received: chunks.iter().map(|c| c.received() as u64).sum(),
            principals,
            input: chunks
                .iter()
                .filter(|c| c.batch.num_rows() > 0)
                .map(|c| c.batch.clone())
                .collect(),
        }
    }
}

/// An epoch's output after the sink-side expectations.
struct SinkChecked {
    /// The rows that go to the sink.
    kept: Vec<RecordBatch>,
    /// How many.
    written: u64,
    /// Rows `ON VIOLATION DROP` dropped.
    dropped: u64,
    /// Violations per expectation.
    violations: BTreeMap<String, crate::quality::expect::Violations>,
    /// The epoch was quarantined whole (every event a dead letter, none archived).
    quarantined: bool,
}

/// What an epoch did to the event-time state, recorded with it.
struct EpochState {
    late: u64,
    duplicates: u64,
    dirty: Vec<String>,
    windows_emitted: u64,
}

/// Where the dead letters of `pipeline`'s `epoch` go: `_sluice/dead_letter/<pipeline>/<epoch>.ndjson`.
pub fn dead_letter_path(pipeline: &str, epoch: u64) -> String {
    format!("_sluice/dead_letter/{pipeline}/{epoch:020}.ndjson")
}

/// The row(s) of `batches` as NDJSON text.
fn row_json(batches: &[RecordBatch]) -> String {
    let mut buf = Vec::new();
    let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
    if batches.iter().any(|b| w.write(b).is_err()) || w.finish().is_err() {
        return String::new();
    }
    drop(w);
    String::from_utf8_lossy(&buf).trim_end().to_string()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
