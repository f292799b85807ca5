//! The Kafka source: a consumer-group member reading one topic, its offsets kept in the sink's
//! commit log.
//!
//! The consumer runs on a thread of its own (librdkafka's poll loop and rebalance callbacks are
//! blocking calls). Messages are gathered into chunks, decoded with the declared schema, and
//! sent to the pipeline with the source's position after them: the next offset of every
//! partition this writer knows ([`KafkaPosition`]).
//!
//! Exactly once:
//! - **Assignment**: the consumer seeks each partition it is handed to the highest offset any
//!   writer's newest entry records (read from the log at that moment, not from the group's
//!   committed offsets, which may lag or lead), or to `start` when no entry has it.
//! - **Revocation** (rebalance, shutdown): before a partition is released, everything read
//!   from it is sent and committed (the pipeline is told to close its batch, and the source
//!   waits for the commit). The next owner therefore reads from exactly where this server's
//!   commits end. If that commit cannot happen within [`REVOKE_TIMEOUT`], the process aborts
//!   instead of releasing: a restart recovers from the log, whereas releasing and committing
//!   later would duplicate what the next owner reads.
//! - **Group offsets** are committed after each Sluice commit, for lag tools only.
//!
//! Back-pressure: when the pipeline's budget is full, the assigned partitions are paused (the
//! consumer keeps polling, so it stays in the group and serves rebalances) and resumed when
//! room frees. librdkafka's prefetch queue is bounded to a share of the budget.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use serde_json::json;
use sluice_engine::budget::Budget;
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::{Format, RecordDecoder};
use sluice_engine::connector::source::{Chunk, Lag, LogPositions, Message, Source, SourceContext};
use sluice_engine::{EngineError, Result};
use tokio::sync::{mpsc, watch};

use super::config::{KafkaSourceConfig, MessageFormat, Start};
use super::position::{KafkaPosition, committed_offsets, merge};

/// Bytes of message values gathered before a chunk is decoded and sent.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Messages gathered before a chunk is decoded and sent.
pub const CHUNK_MESSAGES: usize = 32 * 1024;
/// How long a revoked partition's in-flight data may take to commit before the process aborts.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one poll of the consumer waits for a message.
const POLL: Duration = Duration::from_millis(100);

/// The metadata columns a Kafka table may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaColumn {
    /// `_kafka_partition`: INT.
    Partition,
    /// `_kafka_offset`: BIGINT.
    Offset,
    /// `_kafka_timestamp`: TIMESTAMP (the message's timestamp, milliseconds).
    Timestamp,
    /// `_kafka_key`: VARCHAR (lossy UTF-8) or BYTEA.
    Key,
}

impl MetaColumn {
    /// The metadata column named `name`, if it is one.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "_kafka_partition" => Some(MetaColumn::Partition),
            "_kafka_offset" => Some(MetaColumn::Offset),
            "_kafka_timestamp" => Some(MetaColumn::Timestamp),
            "_kafka_key" => Some(MetaColumn::Key),
            _ => None,
        }
    }

    fn accepts(&self, t: &DataType) -> bool {
        match self {
            MetaColumn::Partition => matches!(t, DataType::Int32 | DataType::Int64),
            MetaColumn::Offset => matches!(t, DataType::Int64),
            MetaColumn::Timestamp => matches!(t, DataType::Timestamp(_, _)),
            MetaColumn::Key => matches!(
                t,
                DataType::Utf8
                    | DataType::Utf8View
                    | DataType::LargeUtf8
                    | DataType::Binary
                    | DataType::BinaryView
                    | DataType::LargeBinary
            ),
        }
    }
}

/// How the declared columns split into the message value's and the metadata.
#[derive(Debug, Clone)]
pub struct Columns {
    /// The declared schema.
    pub declared: SchemaRef,
    /// The value's columns (declared minus metadata).
    pub value: SchemaRef,
    /// Per declared column: `None` for a value column, else which metadata it is.
    pub meta: Vec<Option<MetaColumn>>,
}

impl Columns {
    /// Splits `declared`; a metadata column of the wrong type is an error.
    pub fn new(declared: SchemaRef) -> Result<Self> {
        let mut meta = Vec::new();
        let mut value = Vec::new();
        for f in declared.fields() {
            let m = MetaColumn::named(f.name());
            if let Some(m) = m {
                if !m.accepts(f.data_type()) {
                    return Err(EngineError::config(
                        format!("column {} has type {}, which Kafka metadata cannot fill", f.name(), f.data_type()),
                        Some("declare _kafka_partition INT, _kafka_offset BIGINT, _kafka_timestamp TIMESTAMP, _kafka_key VARCHAR or BYTEA".to_string()),
                    ));
                }
            } else {
                value.push(f.as_ref().clone());
            }
            meta.push(m);
        }
        Ok(Columns {
            declared: declared.clone(),
            value: Arc::new(Schema::new(value)),
            meta,
        })
    }
}

/// A Kafka source feeding one pipeline.
pub struct KafkaSource {
    /// The source table's name.
    pub source: String,
    /// The pipeline it feeds (the default group is `sluice-<pipeline>`).
    pub pipeline: String,
    /// Settings.
    pub config: KafkaSourceConfig,
    /// Decodes message values into the value columns.
    pub decoder: RecordDecoder,
    /// Declared, value and metadata columns.
    pub columns: Columns,
    /// Messages per chunk: at most [`CHUNK_MESSAGES`], and no more than a micro-batch holds.
    pub chunk_messages: usize,
}

/// One message's metadata, kept beside its value until the chunk is decoded.
#[derive(Debug)]
struct Meta {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
}

/// Messages read and not yet sent.
#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    meta: Vec<Meta>,
}

impl Pending {
    fn is_full(&self, messages: usize) -> bool {
        self.buf.len() >= CHUNK_BYTES || self.meta.len() >= messages
    }
}

/// A decoded chunk not yet handed to the pipeline.
struct Ready {
    chunk: Chunk,
    /// The next offset of each partition once it is sent.
    advance: Vec<(i32, i64)>,
    /// Whether its bytes are already taken from the budget.
    acquired: bool,
}

/// What the consumer thread and its callbacks share.
struct State {
    /// The next offset to read of every partition this writer knows (what was read, sent or
    /// not, and what the log recorded).
    known: BTreeMap<i32, i64>,
    /// The next offset of every partition whose messages were handed to the pipeline.
    sent: BTreeMap<i32, i64>,
    /// A chunk waiting for budget or channel room (partitions are paused meanwhile).
    held: Option<Ready>,
    /// Partitions assigned to this server now.
    assigned: BTreeSet<i32>,
    /// The next offset expected from each assigned partition (messages before it, left in
    /// librdkafka's queue from before a seek, are skipped).
    expect: BTreeMap<i32, i64>,
    /// Messages read, not yet sent.
    pending: Pending,
    /// Whether the assigned partitions are paused (budget full).
    paused: bool,
    /// Newest log-end offset seen per partition (statistics).
    high: BTreeMap<i32, i64>,
    /// An error that must stop the source.
    failed: Option<EngineError>,
}

/// How a commit of what is in flight ended.
enum InFlight {
    /// Everything sent from the partitions is committed.
    Committed,
    /// The pipeline stopped: nothing more it holds can be committed.
    PipelineGone,
    /// Not committed within [`REVOKE_TIMEOUT`].
    TimedOut,
}

/// The consumer's context: the callbacks librdkafka makes from inside `poll`.
struct Ctx {
    source: String,
    pipeline: String,
    config: KafkaSourceConfig,
    decoder: RecordDecoder,
    columns: Columns,
    rt: tokio::runtime::Handle,
    tx: mpsc::Sender<Message>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
    committed: Mutex<watch::Receiver<Option<serde_json::Value>>>,
    log_positions: LogPositions,
    lag: Lag,
    chunk_messages: usize,
    state: Mutex<State>,
}

impl Ctx {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes `pending` into a chunk positioned after it.
    fn chunk(&self, pending: Pending, known: &BTreeMap<i32, i64>) -> Result<Chunk> {
        let decoded = self.decoder.decode(&pending.buf, &pending.ranges)?;
        let rejected: BTreeSet<usize> = decoded.rejected.iter().map(|r| r.index).collect();
        let dead_letters = decoded
            .rejected
            .iter()
            .map(|r| {
                let m = &pending.meta[r.index];
                let (raw, raw_base64) = DeadLetter::raw_fields(&pending.buf[pending.ranges[r.index].clone()]);
                DeadLetter {
                    source: self.source.clone(),
                    position: json!({
                        "topic": self.config.topic,
                        "partition": m.partition,
                        "offset": m.offset,
                        "key": m.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                    }),
                    stage: Stage::Decode,
                    error: r.error.clone(),
                    raw,
                    raw_base64,
                    principal: None,
                }
            })
            .collect();
        let kept: Vec<&Meta> = pending
            .meta
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected.contains(i))
            .map(|(_, m)| m)
            .collect();
        let batch = with_metadata(&self.columns, decoded.batch, &kept)?;
        let position = KafkaPosition {
            topic: self.config.topic.clone(),
            offsets: known.clone(),
        };
        Ok(Chunk {
            batch,
            dead_letters,
            position: Some(position.to_value()),
            bytes: pending.buf.len() + pending.meta.len() * 64,
            principal: None,
        })
    }

    /// Takes what is pending as a chunk positioned after it, or `None` when nothing is. `known`
    /// moves on only once the chunk decoded (a decode failure stops the source with nothing
    /// skipped).
    fn take_chunk(&self) -> Result<Option<Ready>> {
        let (pending, known) = {
            let mut st = self.state();
            if st.pending.meta.is_empty() {
                return Ok(None);
            }
            let pending = std::mem::take(&mut st.pending);
            let mut known = st.known.clone();
            for m in &pending.meta {
                let k = known.entry(m.partition).or_insert(m.offset + 1);
                *k = (*k).max(m.offset + 1);
            }
            (pending, known)
        };
        let mut advance: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &pending.meta {
            advance.insert(m.partition, m.offset + 1);
        }
        let chunk = self.chunk(pending, &known)?;
        self.state().known = known;
        Ok(Some(Ready {
            chunk,
            advance: advance.into_iter().collect(),
            acquired: false,
        }))
    }

    /// Records that `advance` was handed to the pipeline.
    fn mark_sent(&self, advance: &[(i32, i64)]) {
        let mut st = self.state();
        for (p, o) in advance {
            st.sent.insert(*p, *o);
        }
    }

    /// Whether anything read from `partitions` is not covered by this writer's commits.
    fn in_flight(&self, partitions: &BTreeSet<i32>) -> bool {
        let committed = self.committed_offsets();
        let st = self.state();
        let unsent = |p: &i32| {
            st.pending.meta.iter().any(|m| m.partition == *p)
                || st.held.as_ref().is_some_and(|h| h.advance.iter().any(|(q, _)| q == p))
        };
        partitions
            .iter()
            .any(|p| unsent(p) || st.sent.get(p).is_some_and(|o| committed.get(p).is_none_or(|c| c < o)))
    }

    /// This writer's committed offsets.
    fn committed_offsets(&self) -> BTreeMap<i32, i64> {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        committed_offsets(committed.borrow().as_ref())
    }

    /// Sends what is held and pending (waiting for budget and channel room), asks the pipeline
    /// to commit, and waits until its commits cover everything sent from `partitions`; all
    /// within [`REVOKE_TIMEOUT`].
    fn commit_in_flight(&self, partitions: &BTreeSet<i32>) -> InFlight {
        let held = self.state().held.take();
        let pending = match self.take_chunk() {
            Ok(p) => p,
            Err(e) => {
                self.fail(e.to_string());
                None
            }
        };
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let work = async {
            // A stop signal that never fires (its sender lives until the wait ends): what was
            // read must be committed before its partitions are released, shutdown or not.
            let (_keep, mut never) = watch::channel(false);
            for ready in held.into_iter().chain(pending) {
                if !ready.acquired {
                    tokio::select! {
                        _ = self.budget.acquire(ready.chunk.bytes as u64, &mut never) => {}
                        _ = self.tx.closed() => return InFlight::PipelineGone,
                    }
                }
                if self.tx.send(ready.chunk.into()).await.is_err() {
                    return InFlight::PipelineGone;
                }
                self.mark_sent(&ready.advance);
            }
            let want: BTreeMap<i32, i64> = {
                let st = self.state();
                st.sent
                    .iter()
                    .filter(|(p, _)| partitions.contains(p))
                    .map(|(p, o)| (*p, *o))
                    .collect()
            };
            let covered = |v: &Option<serde_json::Value>| {
                let got = committed_offsets(v.as_ref());
                want.iter().all(|(p, o)| got.get(p).is_some_and(|g| g >= o))
            };
            if covered(&committed.borrow()) {
                return InFlight::Committed;
            }
            if self.tx.send(Message::Idle).await.is_err() {
                return InFlight::PipelineGone;
            }
            tokio::select! {
                r = committed.wait_for(|v| covered(v)) => if r.is_ok() { InFlight::Committed } else { InFlight::PipelineGone },
                _ = self.tx.closed() => InFlight::PipelineGone,
            }
        };
        self.rt
            .block_on(async { tokio::time::timeout(REVOKE_TIMEOUT, work).await })
            .unwrap_or(InFlight::TimedOut)
    }

    /// Hands the held chunk to the pipeline if the budget and the channel have room, without
    /// waiting; pauses the partitions while it cannot. False when the pipeline is gone.
    fn try_send_held(&self, consumer: &BaseConsumer<Ctx>) -> bool {
        let Some(mut ready) = self.state().held.take() else {
            return true;
        };
        if !ready.acquired {
            ready.acquired = self.budget.try_acquire(ready.chunk.bytes as u64);
        }
        if ready.acquired {
            match self.tx.try_send(Message::Chunk(ready.chunk)) {
                Ok(()) => {
                    self.mark_sent(&ready.advance);
                    set_paused(consumer, false);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(msg)) => match msg {
                    Message::Chunk(c) => ready.chunk = c,
                    Message::Idle => return true,
                },
            }
        }
        self.state().held = Some(ready);
        set_paused(consumer, true);
        true
    }

    fn fail(&self, why: String) {
        let mut st = self.state();
        if st.failed.is_none() {
            st.failed = Some(EngineError::BadInput(why));
        }
    }

    /// Seeks each newly assigned partition to the log's offset (or `start`) and assigns them.
    fn on_assign(&self, consumer: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) {
        let positions = match self.rt.block_on(self.log_positions.read()) {
            Ok(p) => p,
            Err(e) => {
                // Without the log's offsets the partitions cannot be read exactly: take none.
                tracing::error!(source = %self.source, error = %e, "cannot read the sink's log to resume the assigned partitions");
                self.fail(format!("reading the sink's commit log on partition assignment: {e}"));
                return;
            }
        };
        let mut st = self.state();
        if let Err(e) = merge(&mut st.known, &self.config.topic, &positions) {
            drop(st);
            self.fail(e.to_string());
            return;
        }
        st.assigned.clear();
        st.expect.clear();
        for e in tpl.elements() {
            let p = e.partition();
            st.assigned.insert(p);
            if let Some(o) = st.known.get(&p).copied() {
                st.expect.insert(p, o);
            }
        }
        for p in st.assigned.clone() {
            let offset = match st.known.get(&p) {
                Some(o) => Offset::Offset(*o),
                None => match self.config.start {
                    Start::Earliest => Offset::Beginning,
                    Start::Latest => Offset::End,
                },
            };
            if let Err(e) = tpl.set_partition_offset(&self.config.topic, p, offset) {
                tracing::error!(source = %self.source, partition = p, error = %self.config.redact(&e.to_string()), "cannot set the partition's offset");
            }
        }
        let parts: Vec<i32> = st.assigned.iter().copied().collect();
        st.paused = false;
        drop(st);
        tracing::info!(source = %self.source, pipeline = %self.pipeline, partitions = ?parts, "partitions assigned");
        metrics::counter!("sluice_kafka_rebalances_total", "pipeline" => self.pipeline.clone(), "kind" => "assign")
            .increment(1);
        if let Err(e) = consumer.assign(tpl) {
            self.fail(format!("assigning partitions: {}", self.config.redact(&e.to_string())));
        }
    }

    /// Commits what was read from the revoked partitions, then releases them.
    fn on_revoke(&self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let revoked: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(source = %self.source, pipeline = %self.pipeline, partitions = ?revoked, "partitions revoked; committing what was read from them");
        metrics::counter!("sluice_kafka_rebalances_total", "pipeline" => self.pipeline.clone(), "kind" => "revoke")
            .increment(1);
        if consumer.assignment_lost() {
            // The group already gave these partitions to another member, which reads from the
            // log's offsets: what this server read and has not committed must never commit.
            if self.in_flight(&revoked) {
                tracing::error!(source = %self.source, pipeline = %self.pipeline, partitions = ?revoked,
                    "partitions were lost to the group (session or poll interval exceeded) with uncommitted data; aborting so it is never committed (a restart resumes from the commit log)");
                std::process::abort();
            }
        } else if let InFlight::TimedOut = self.commit_in_flight(&revoked) {
            tracing::error!(source = %self.source, pipeline = %self.pipeline, partitions = ?revoked,
                "what was read from revoked partitions could not be committed in time; aborting rather than release them (a restart resumes from the commit log)");
            std::process::abort();
        }
        // Committed, or the pipeline stopped: nothing it still holds can commit any more, and
        // the next owner reads from the log's offsets.
        {
            let mut st = self.state();
            for p in &revoked {
                st.assigned.remove(p);
                st.expect.remove(p);
                self.lag.remove(&p.to_string());
            }
            st.paused = false;
        }
        if let Err(e) = consumer.unassign() {
            tracing::warn!(source = %self.source, error = %self.config.redact(&e.to_string()), "unassigning partitions");
        }
    }
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let message = self.config.redact(message);
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(source = %self.source, facility = fac, "librdkafka: {message}"),
            _ => tracing::debug!(source = %self.source, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(source = %self.source, error = %self.config.redact(&error.to_string()), reason = %self.config.redact(reason), "kafka client error (retrying)");
        metrics::counter!("sluice_kafka_errors_total", "pipeline" => self.pipeline.clone()).increment(1);
    }

    fn stats(&self, stats: Statistics) {
        let mut st = self.state();
        if let Some(t) = stats.topics.get(&self.config.topic) {
            for (p, part) in &t.partitions {
                // The last stable offset: with read_committed (librdkafka's default) a
                // transaction's trailing marker is never a message to read.
                if *p >= 0 && part.ls_offset >= 0 {
                    st.high.insert(*p, part.ls_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer, tpl),
            other => {
                tracing::error!(source = %self.source, error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(source = %self.source, error = %self.config.redact(&e.to_string()), "committing offsets to the group failed (lag tools may lag; Sluice's own log is the truth)");
        }
    }
}

/// Appends the metadata columns to the decoded value columns, in declared order.
fn with_metadata(columns: &Columns, values: RecordBatch, meta: &[&Meta]) -> Result<RecordBatch> {
    if columns.meta.iter().all(Option::is_none) {
        return Ok(values);
    }
    let mut value_cols = values.columns().iter();
    let mut out: Vec<ArrayRef> = Vec::with_capacity(columns.meta.len());
    for (f, m) in columns.declared.fields().iter().zip(&columns.meta) {
        let col: ArrayRef = match m {
            None => value_cols
                .next()
                .cloned()
                .ok_or_else(|| EngineError::Internal("decoded batch lacks a column".into()))?,
            Some(MetaColumn::Partition) => match f.data_type() {
                DataType::Int64 => Arc::new(Int64Array::from_iter_values(meta.iter().map(|m| m.partition as i64))),
                _ => Arc::new(Int32Array::from_iter_values(meta.iter().map(|m| m.partition))),
            },
            Some(MetaColumn::Offset) => Arc::new(Int64Array::from_iter_values(meta.iter().map(|m| m.offset))),
            Some(MetaColumn::Timestamp) => {
                let ms: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter(meta.iter().map(|m| m.timestamp)));
                arrow::compute::cast(&ms, f.data_type())
                    .map_err(|e| EngineError::Internal(format!("casting _kafka_timestamp: {e}")))?
            }
            Some(MetaColumn::Key) => {
                let key: ArrayRef = match f.data_type() {
                    DataType::Binary | DataType::BinaryView | DataType::LargeBinary => {
                        Arc::new(BinaryArray::from_iter(meta.iter().map(|m| m.key.as_deref())))
                    }
                    _ => Arc::new(StringArray::from_iter(
                        meta.iter()
                            .map(|m| m.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned())),
                    )),
                };
                arrow::compute::cast(&key, f.data_type())
                    .map_err(|e| EngineError::Internal(format!("casting _kafka_key: {e}")))?
            }
        };
        out.push(col);
    }
    RecordBatch::try_new(columns.declared.clone(), out)
        .map_err(|e| EngineError::Internal(format!("adding Kafka metadata columns: {e}")))
}

/// The decoder format of a message format.
pub fn decoder_format(format: MessageFormat) -> Format {
    match format {
        MessageFormat::Json => Format::Json,
        MessageFormat::Csv { delimiter } => Format::Csv { delimiter },
    }
}

impl KafkaSource {
    fn client_config(&self, budget: &Budget) -> ClientConfig {
        let mut c = ClientConfig::new();
        let group = self
            .config
            .group_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{}", self.pipeline));
        // librdkafka's prefetch queue, bounded to a quarter of the pipeline's budget.
        let queue_kb = (budget.policy().max_bytes / 4 / 1024).clamp(1024, 64 * 1024);
        c.set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // Partitions start where the log says or at `start`, set explicitly on assignment;
            // a recorded offset the broker no longer has is an error, never a silent reset.
            .set("auto.offset.reset", "error")
            .set("statistics.interval.ms", "5000")
            .set("queued.max.messages.kbytes", queue_kb.to_string())
            // Micro-batches want large fetches (librdkafka's 1 MiB per partition makes a
            // round trip per megabyte), within the prefetch bound.
            .set("fetch.max.bytes", (queue_kb * 1024).to_string())
            .set("max.partition.fetch.bytes", (queue_kb * 1024).min(16 << 20).to_string())
            .set("client.id", format!("sluice-{}", self.pipeline));
        for (k, v) in &self.config.client {
            c.set(k, v);
        }
        c
    }
}

#[async_trait::async_trait]
impl Source for KafkaSource {
    fn check_start(&self, _pipeline: &str, start: Option<&serde_json::Value>) -> Result<()> {
        if let Some(v) = start {
            let p = KafkaPosition::from_value(v)?;
            if p.topic != self.config.topic {
                return Err(EngineError::config(
                    format!(
                        "source {} reads topic '{}', but its pipeline's commits are positions in topic '{}'",
                        self.source, self.config.topic, p.topic
                    ),
                    Some("a pipeline keeps its topic; write a new topic's events to a new sink".to_string()),
                ));
            }
        }
        Ok(())
    }

    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<()> {
        let mut known = BTreeMap::new();
        if let Some(v) = &ctx.start {
            merge(&mut known, &self.config.topic, std::slice::from_ref(v))?;
        }
        let client = self.client_config(&ctx.budget);
        let shared = Ctx {
            source: self.source.clone(),
            pipeline: self.pipeline.clone(),
            config: self.config.clone(),
            decoder: self.decoder.clone(),
            columns: self.columns.clone(),
            rt: tokio::runtime::Handle::current(),
            tx: ctx.tx.clone(),
            budget: ctx.budget.clone(),
            shutdown: ctx.shutdown.clone(),
            committed: Mutex::new(ctx.committed.clone()),
            log_positions: ctx.log_positions.clone(),
            lag: ctx.lag.clone(),
            chunk_messages: self.chunk_messages,
            state: Mutex::new(State {
                known,
                sent: BTreeMap::new(),
                held: None,
                assigned: BTreeSet::new(),
                expect: BTreeMap::new(),
                pending: Pending::default(),
                paused: false,
                high: BTreeMap::new(),
                failed: None,
            }),
        };
        let consumer: BaseConsumer<Ctx> = client.create_with_context(shared).map_err(|e| {
            EngineError::config(
                format!(
                    "cannot create the Kafka consumer of {}: {}",
                    self.source,
                    self.config.redact(&e.to_string())
                ),
                Some("check the kafka.* options".to_string()),
            )
        })?;
        consumer.subscribe(&[&self.config.topic]).map_err(|e| {
            EngineError::BadInput(format!(
                "subscribing to {}: {}",
                self.config.topic,
                self.config.redact(&e.to_string())
            ))
        })?;
        ctx.mark_started();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let committed = ctx.committed.clone();
        std::thread::Builder::new()
            .name(format!("kafka-{}", self.source))
            .spawn(move || {
                let result = consume(&consumer, committed);
                // Leaving the group revokes what is left (nothing is in flight by now).
                drop(consumer);
                let _ = done_tx.send(result);
            })
            .map_err(EngineError::io("starting the Kafka consumer thread"))?;
        drop(ctx.tx);
        match done_rx.await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Internal("the Kafka consumer thread panicked".into())),
        }
    }
}

/// The consumer loop: poll, gather, send; pause when the budget is full; commit group offsets
/// after each Sluice commit; on shutdown commit what was read, then leave.
fn consume(consumer: &BaseConsumer<Ctx>, mut committed: watch::Receiver<Option<serde_json::Value>>) -> Result<()> {
    let cx = consumer.context();
    let mut idle_sent = false;
    let mut last_lag = Instant::now();
    loop {
        if let Some(e) = cx.state().failed.take() {
            return Err(e);
        }
        if cx.tx.is_closed() {
            // The pipeline stopped: leave the group so the partitions go to another member.
            return Ok(());
        }
        if *cx.shutdown.borrow() {
            let all: BTreeSet<i32> = cx.state().assigned.clone();
            cx.commit_in_flight(&all);
            return Ok(());
        }
        // A held chunk goes first; while it waits the partitions are paused.
        if !cx.try_send_held(consumer) {
            return Ok(());
        }
        if committed.has_changed().unwrap_or(false) {
            let v = committed.borrow_and_update().clone();
            commit_group_offsets(consumer, v.as_ref());
        }
        if last_lag.elapsed() >= Duration::from_secs(1) {
            last_lag = Instant::now();
            report_lag(cx, committed.borrow().as_ref());
        }
        match consumer.poll(POLL) {
            Some(Ok(m)) => {
                idle_sent = false;
                let mut st = cx.state();
                let p = m.partition();
                if !st.assigned.contains(&p) {
                    continue;
                }
                let want = st.expect.get(&p).copied();
                if want.is_some_and(|w| m.offset() < w) {
                    continue;
                }
                st.expect.insert(p, m.offset() + 1);
                let value = m.payload().unwrap_or_default();
                let start = st.pending.buf.len();
                st.pending.buf.extend_from_slice(value);
                let end = st.pending.buf.len();
                st.pending.ranges.push(start..end);
                st.pending.meta.push(Meta {
                    partition: p,
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                });
                let take = st.pending.is_full(cx.chunk_messages) && st.held.is_none();
                drop(st);
                if take {
                    let ready = cx.take_chunk()?;
                    cx.state().held = ready;
                }
            }
            Some(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange),
            ))) => {
                // The offset the log recorded is gone from the broker (retention, a recreated
                // topic): resuming anywhere else would skip or repeat data silently.
                return Err(EngineError::BadInput(format!(
                    "topic {}: a partition's committed offset is out of range on the broker ({code}): the messages after it were deleted (retention) or the topic was recreated; Sluice never skips data silently: point the pipeline at a new sink, or restore the topic",
                    cx.config.topic
                )));
            }
            Some(Err(e)) => {
                tracing::warn!(source = %cx.source, error = %cx.config.redact(&e.to_string()), "kafka consumer error (retrying)");
                metrics::counter!("sluice_kafka_errors_total", "pipeline" => cx.pipeline.clone()).increment(1);
            }
            None => {
                if cx.state().held.is_none() {
                    let ready = cx.take_chunk()?;
                    let nothing = ready.is_none();
                    cx.state().held = ready;
                    if nothing && !idle_sent {
                        // A hint only: when the channel is full the pipeline is busy anyway.
                        idle_sent = cx.tx.try_send(Message::Idle).is_ok();
                    }
                }
            }
        }
    }
}

/// Pauses or resumes every assigned partition (once per change).
fn set_paused(consumer: &BaseConsumer<Ctx>, pause: bool) {
    let cx = consumer.context();
    let mut st = cx.state();
    if st.paused == pause || st.assigned.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for p in &st.assigned {
        tpl.add_partition(&cx.config.topic, *p);
    }
    let r = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    match r {
        Ok(()) => {
            st.paused = pause;
            metrics::counter!("sluice_kafka_pauses_total", "pipeline" => cx.pipeline.clone(), "kind" => if pause { "pause" } else { "resume" }).increment(1);
        }
        Err(e) => {
            tracing::warn!(source = %cx.source, error = %cx.config.redact(&e.to_string()), "pausing or resuming partitions")
        }
    }
}

/// Commits the newest Sluice-committed offsets of the assigned partitions to the group, so
/// lag tools see progress.
fn commit_group_offsets(consumer: &BaseConsumer<Ctx>, committed: Option<&serde_json::Value>) {
    let cx = consumer.context();
    let offsets = committed_offsets(committed);
    let assigned = cx.state().assigned.clone();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets.iter().filter(|(p, _)| assigned.contains(p)) {
        let _ = tpl.add_partition_offset(&cx.config.topic, *p, Offset::Offset(*o));
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
    {
        tracing::debug!(source = %cx.source, error = %cx.config.redact(&e.to_string()), "committing group offsets");
    }
}

/// Publishes per-partition lag: log-end offset minus the committed offset.
fn report_lag(cx: &Ctx, committed: Option<&serde_json::Value>) {
    let offsets = committed_offsets(committed);
    let st = cx.state();
    for p in &st.assigned {
        let Some(high) = st.high.get(p) else { continue };
        let done = offsets.get(p).or(st.known.get(p)).copied().unwrap_or(0);
        let lag = (*high - done).max(0) as u64;
        cx.lag.set(&p.to_string(), lag);
        metrics::gauge!("sluice_kafka_lag", "pipeline" => cx.pipeline.clone(), "topic" => cx.config.topic.clone(), "partition" => p.to_string())
            .set(lag as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Field, Int64Type, TimeUnit, TimestampMicrosecondType};

    fn schema(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    #[test]
    fn metadata_columns_must_have_a_type_metadata_can_fill() {
        let bad = schema(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("_kafka_offset", DataType::Utf8, true),
        ]);
        let e = Columns::new(bad).unwrap_err().to_string();
        assert!(e.contains("_kafka_offset"), "{e}");
        let ok = Columns::new(schema(vec![
            Field::new("_kafka_key", DataType::Utf8View, true),
            Field::new("id", DataType::Int64, false),
            Field::new("_kafka_partition", DataType::Int64, true),
        ]))
        .unwrap();
        assert_eq!(ok.value.fields().len(), 1);
        assert_eq!(ok.meta, vec![Some(MetaColumn::Key), None, Some(MetaColumn::Partition)]);
    }

    #[test]
    fn metadata_is_placed_in_declared_order_with_each_message_s_own_values() {
        let columns = Columns::new(schema(vec![
            Field::new("_kafka_partition", DataType::Int32, true),
            Field::new("id", DataType::Int64, false),
            Field::new(
                "_kafka_timestamp",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("_kafka_key", DataType::Binary, true),
            Field::new("_kafka_offset", DataType::Int64, true),
        ]))
        .unwrap();
        let decoder = RecordDecoder::new(Format::Json, columns.value.clone());
        let buf = br#"{"id": 7}{"id": 8}"#;
        let decoded = decoder.decode(buf, &[0..9, 9..18]).unwrap();
        let meta = [
            Meta {
                partition: 3,
                offset: 41,
                timestamp: Some(1_700_000_000_123),
                key: Some(b"k".to_vec()),
            },
            Meta {
                partition: 1,
                offset: 9,
                timestamp: None,
                key: None,
            },
        ];
        let refs: Vec<&Meta> = meta.iter().collect();
        let batch = with_metadata(&columns, decoded.batch, &refs).unwrap();
        assert_eq!(batch.schema(), columns.declared);
        assert_eq!(
            batch.column(0).as_primitive::<arrow::datatypes::Int32Type>().values(),
            &[3, 1]
        );
        assert_eq!(batch.column(1).as_primitive::<Int64Type>().values(), &[7, 8]);
        let ts = batch.column(2).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_700_000_000_123_000);
        assert!(ts.is_null(1));
        let key = batch.column(3).as_binary::<i32>();
        assert_eq!(key.value(0), b"k");
        assert!(key.is_null(1));
        assert_eq!(batch.column(4).as_primitive::<Int64Type>().values(), &[41, 9]);
    }
}
