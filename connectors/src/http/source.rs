//! The HTTP ingest endpoint: `POST /v1/sources/{name}` with NDJSON or a JSON array.
//!
//! A request is decoded on arrival (so the reply can say how many records were accepted and
//! rejected), admitted against every reading pipeline's memory budget, appended to the source's
//! ingest log, and answered 200 only once the log is fsynced. The log's writer hands each record
//! to the pipelines in log order, tagged with its sequence number; a pipeline's commit records
//! the highest sequence it covers, and on restart the log is replayed after it. Segments every
//! pipeline has committed are deleted.
//!
//! Retries are idempotent by `X-Request-Id`: the ids of logged requests are remembered
//! ([`super::dedup`]: bounded, persisted before log segments are deleted, rebuilt on start), and
//! a request whose id is already logged is answered 200 without being appended again. A producer that retries every request
//! with the same id until it gets a 2xx gets exactly-once delivery.
//!
//! | answer | when |
//! |---|---|
//! | 200 `{accepted, rejected, errors, request_id, seq}` | durable; rejected records are dead letters |
//! | 200 `{duplicate: true, request_id, seq}` | this `X-Request-Id` is already in the log: nothing added |
//! | 409 `{error}` + `Retry-After` | a request with this `X-Request-Id` is being written right now |
//! | 400 `{error}` | the body is not JSON at all (nothing is kept) |
//! | 404 `{error}` | no source has that name |
//! | 413 `{error}` | the body is larger than `max_body_bytes` |
//! | 429 `{error}` + `Retry-After` | a pipeline's budget is full (`when_full` = `reject`); with `block` the request waits, with `spill` it is accepted from the log and the pipeline catches up later |
//! | 503 `{error}` + `Retry-After` | starting, shutting down, or the ingest log cannot write |

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_engine::budget::{Budget, WhenFull};
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::{Decoded, RecordDecoder, lines};
use sluice_engine::ingest::wal::IngestLog;
use sluice_engine::source::{Chunk, Health, Source, SourceContext};

use super::dedup::DedupWindow;
use sluice_engine::{EngineError, Result};
use tokio::sync::{mpsc, watch};

/// Distinguishes this process start in minted request ids (nanoseconds since the epoch at first use).
static BOOT_ID: std::sync::LazyLock<u128> = std::sync::LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
});

/// Seconds a client is told to wait after a 429 or 503.
pub const RETRY_AFTER_SECONDS: u64 = 1;
/// Errors listed in a 200 reply (the rest are only counted).
pub const MAX_ERRORS_IN_REPLY: usize = 10;

/// A pipeline reading an endpoint.
#[derive(Clone)]
struct Subscriber {
    tx: mpsc::Sender<Chunk>,
    health: Health,
    budget: Arc<Budget>,
    delivery: Arc<std::sync::Mutex<Delivery>>,
    wake: Arc<tokio::sync::Notify>,
}

/// Where a pipeline's delivery from the log stands. Live: the log writer hands it each record
/// (`next` is the sequence it expects). Behind (`when_full` = `spill` and its budget was full):
/// records are only in the log; its catch-up reader re-reads them from `next` as budget frees,
/// then goes live again. Either way every record reaches the pipeline once, in log order.
#[derive(Debug)]
struct Delivery {
    next: u64,
    behind: bool,
}

/// One ingest endpoint: its log and the pipelines it feeds.
pub struct Endpoint {
    /// The source table's name.
    pub source: String,
    /// Decodes bodies into the source's schema.
    pub decoder: RecordDecoder,
    /// Largest body accepted.
    pub max_body_bytes: u64,
    /// The source's ingest log.
    pub wal: Arc<IngestLog>,
    /// How many pipelines read this source; intake opens when all have subscribed.
    pub expected: usize,
    subscribers: BTreeMap<String, Subscriber>,
    committed: BTreeMap<String, u64>,
    /// Request ids in the log (`Some(seq)`) or being written (`None`).
    seen: DedupWindow,
}

impl Endpoint {
    /// A new endpoint with no pipeline yet; the request ids already logged are loaded.
    pub fn new(source: String, decoder: RecordDecoder, max_body_bytes: u64, wal: Arc<IngestLog>) -> Result<Self> {
        let mut e = Endpoint {
            source,
            decoder,
            max_body_bytes,
            wal,
            expected: 0,
            subscribers: BTreeMap::new(),
            committed: BTreeMap::new(),
            seen: DedupWindow::default(),
        };
        let wal = e.wal.clone();
        // Ids of requests whose segments were deleted, then those still in the log.
        e.seen.load(wal.dir())?;
        wal.read_from(0, |seq, payload| {
            let split = payload.iter().position(|b| *b == b'\n').unwrap_or(payload.len());
            e.remember(&String::from_utf8_lossy(&payload[..split]), Some(seq));
            Ok(())
        })?;
        Ok(e)
    }

    fn remember(&mut self, id: &str, seq: Option<u64>) {
        self.seen.remember(id, seq);
        metrics::gauge!("sluice_http_dedup_window_bytes", "source" => self.source.clone())
            .set(self.seen.bytes() as f64);
    }

    fn forget(&mut self, id: &str) {
        self.seen.forget(id);
    }
}

/// Every HTTP endpoint of the server, by `{name}`.
#[derive(Default)]
pub struct Endpoints {
    by_name: RwLock<BTreeMap<String, Endpoint>>,
    next_request: AtomicU64,
    /// Turns true at shutdown (held requests give up waiting for budget).
    stop: RwLock<Option<watch::Receiver<bool>>>,
}

impl Endpoints {
    /// Declares an endpoint (the first call creates it) and counts one more reading pipeline.
    pub fn declare(&self, name: &str, make: impl FnOnce() -> Result<Endpoint>) -> Result<()> {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(name) {
            map.insert(name.to_string(), make()?);
        }
        if let Some(e) = map.get_mut(name) {
            e.expected += 1;
        }
        Ok(())
    }

    /// The largest body any endpoint accepts.
    pub fn max_body_bytes(&self) -> u64 {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.values().map(|e| e.max_body_bytes).max().unwrap_or(0)
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Endpoint) -> T) -> Option<T> {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        map.get_mut(name).map(f)
    }
}

/// The records of a body: a buffer and the byte range of each record in it.
type Split<'a> = (Cow<'a, [u8]>, Vec<Range<usize>>);

/// Records of a body: the elements of a JSON array (copied out, one per line) or the non-blank
/// lines of NDJSON (the body itself).
fn split_body(body: &[u8]) -> std::result::Result<Split<'_>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let elems: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
        let mut buf = Vec::with_capacity(body.len());
        let mut ranges = Vec::with_capacity(elems.len());
        for e in elems {
            let start = buf.len();
            buf.extend_from_slice(e.get().as_bytes());
            ranges.push(start..buf.len());
            buf.push(b'\n');
        }
        Ok((Cow::Owned(buf), ranges))
    } else {
        Ok((Cow::Borrowed(body), lines(body)))
    }
}

/// Decodes a body; `Err` when it is not JSON at all.
fn decode_body(
    decoder: &RecordDecoder,
    source: &str,
    request_id: &str,
    body: &[u8],
) -> std::result::Result<(Decoded, Vec<DeadLetter>), (StatusCode, String)> {
    let (buf, ranges) = split_body(body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let decoded = decoder
        .decode(&buf, &ranges, true)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")))?;
    if decoded.batch.num_rows() == 0 && !decoded.rejected.is_empty() && decoded.rejected.iter().all(|r| r.syntax) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {}", decoded.rejected[0].error),
        ));
    }
    let dead = decoded
        .rejected
        .iter()
        .map(|r| (r, DeadLetter::raw_fields(&buf[ranges[r.index].clone()])))
        .map(|(r, raw)| DeadLetter {
            source: source.to_string(),
            position: json!({ "request_id": request_id, "record": r.index }),
            stage: Stage::Decode,
            error: r.error.clone(),
            raw: raw.0,
            raw_base64: raw.1,
        })
        .collect();
    Ok((decoded, dead))
}

/// The ingest-log record of a request, `request_id \n body`, as parts (the body is not copied).
fn log_record(request_id: &str, body: &Bytes) -> Vec<Bytes> {
    vec![Bytes::from(format!("{request_id}\n")), body.clone()]
}

/// An HTTP source's position, as recorded in commit entries: the last ingest-log record a
/// commit covers, and which log it is in (entries written before logs had identities carry
/// none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogPosition {
    /// Sequence number of the last record covered.
    pub seq: u64,
    /// The ingest log's identity ([`IngestLog::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl LogPosition {
    /// The position after record `seq` of log `log`.
    pub fn new(seq: u64, log: &str) -> Self {
        LogPosition {
            seq,
            log: Some(log.to_string()),
        }
    }

    /// Reads a recorded position (`None` when absent or not an HTTP source's).
    pub fn from_value(v: Option<&Value>) -> Option<Self> {
        serde_json::from_value(v?.clone()).ok()
    }

    /// The form recorded in a commit entry.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

fn seq_of(position: &Option<Value>) -> Option<u64> {
    LogPosition::from_value(position.as_ref()).map(|p| p.seq)
}

/// One pipeline's subscription to an endpoint.
pub struct HttpSource {
    /// The shared endpoints.
    pub endpoints: Arc<Endpoints>,
    /// The `{name}` subscribed to.
    pub endpoint: String,
    /// Whether a committed position in another ingest log is accepted (`--adopt-ingest-log`):
    /// this log is then read from its beginning.
    pub adopt_log: bool,
}

impl HttpSource {
    /// The first sequence of this source's log the pipeline has not committed.
    fn resume_from(&self, start: &Option<Value>) -> u64 {
        let Some(pos) = LogPosition::from_value(start.as_ref()) else {
            return 0;
        };
        let ours = self.endpoints.with(&self.endpoint, |e| e.wal.id().to_string());
        match (&pos.log, ours) {
            // Adopted: the position is in another log (or in one that had no identity).
            (theirs, Some(ours)) if self.adopt_log && theirs.as_deref() != Some(ours.as_str()) => 0,
            _ => pos.seq + 1,
        }
    }

    /// Sends every logged record after the committed position to the pipeline, before intake
    /// opens (so nothing can interleave). Returns the next sequence.
    async fn replay(&self, ctx: &SourceContext) -> Result<u64> {
        let from = self.resume_from(&ctx.start);
        let Some(reader) = self.reader(ctx) else {
            return Err(EngineError::Internal(format!("endpoint {} vanished", self.endpoint)));
        };
        reader.send_from(from, |_| true).await
    }

    fn reader(&self, ctx: &SourceContext) -> Option<LogReader> {
        self.endpoints.with(&self.endpoint, |e| LogReader {
            wal: e.wal.clone(),
            decoder: e.decoder.clone(),
            source: e.source.clone(),
            tx: ctx.tx.clone(),
            budget: ctx.budget.clone(),
            stop: ctx.shutdown.clone(),
        })
    }

    /// The catch-up loop of a spilling pipeline: whenever it falls behind, re-read its records
    /// from the log (waiting for budget), then go live again once nothing newer is durable.
    async fn catch_up(
        reader: LogReader,
        delivery: Arc<std::sync::Mutex<Delivery>>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<()> {
        let mut stop = reader.stop.clone();
        loop {
            let notified = wake.notified();
            let behind = delivery.lock().unwrap_or_else(|p| p.into_inner()).behind;
            if !behind {
                tokio::select! {
                    _ = notified => {}
                    r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
                }
                continue;
            }
            let from = delivery.lock().unwrap_or_else(|p| p.into_inner()).next;
            if sluice_engine::crash::fails("catch_up") {
                return Err(EngineError::Io {
                    context: "reading the ingest log to catch up".into(),
                    source: std::io::Error::other("injected fault (SLUICE_FAIL_AT=catch_up)"),
                });
            }
            let d = delivery.clone();
            let next = reader
                .send_from(from, move |seq| {
                    d.lock().unwrap_or_else(|p| p.into_inner()).next = seq + 1;
                    true
                })
                .await?;
            let mut st = delivery.lock().unwrap_or_else(|p| p.into_inner());
            st.next = st.next.max(next);
            if reader.wal.durable_seq() <= st.next {
                // Nothing newer is durable, so no newer record's hand-off has run: go live.
                st.behind = false;
                metrics::counter!("sluice_http_spill_caught_up_total", "source" => reader.source.clone()).increment(1);
            }
        }
    }
}

/// Reads records of a source's log and sends them to one pipeline.
struct LogReader {
    wal: Arc<IngestLog>,
    decoder: RecordDecoder,
    source: String,
    tx: mpsc::Sender<Chunk>,
    budget: Arc<Budget>,
    stop: watch::Receiver<bool>,
}

impl LogReader {
    /// Sends every durable record from `from` on (decoding it, waiting for budget), calling
    /// `sent(seq)` after each. Returns the sequence after the last one sent.
    async fn send_from(&self, from: u64, mut sent: impl FnMut(u64) -> bool + Send + 'static) -> Result<u64> {
        let (wal, decoder, source) = (self.wal.clone(), self.decoder.clone(), self.source.clone());
        let (tx, budget, mut stop) = (self.tx.clone(), self.budget.clone(), self.stop.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut next = from;
            wal.read_from(from, |seq, payload| {
                let split = payload.iter().position(|b| *b == b'\n').unwrap_or(payload.len());
                let request_id = String::from_utf8_lossy(&payload[..split]).into_owned();
                let body = payload.get(split + 1..).unwrap_or_default();
                let (batch, dead_letters) = match decode_body(&decoder, &source, &request_id, body) {
                    Ok((d, dead)) => (d.batch, dead),
                    Err((_, e)) => (
                        arrow::record_batch::RecordBatch::new_empty(decoder.schema().clone()),
                        vec![DeadLetter {
                            source: source.clone(),
                            position: json!({ "request_id": request_id, "seq": seq }),
                            stage: Stage::Decode,
                            error: e,
                            raw: DeadLetter::raw_fields(body).0,
                            raw_base64: DeadLetter::raw_fields(body).1,
                        }],
                    ),
                };
                let bytes = body.len();
                if !handle.block_on(budget.acquire(bytes as u64, &mut stop)) {
                    return Err(EngineError::Stopped(source.clone()));
                }
                let chunk = Chunk {
                    batch,
                    dead_letters,
                    position: Some(LogPosition::new(seq, wal.id()).to_value()),
                    bytes,
                };
                tx.blocking_send(chunk)
                    .map_err(|_| EngineError::Stopped(source.clone()))?;
                next = seq + 1;
                sent(seq);
                Ok(())
            })?;
            Ok(next)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("log reader task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl Source for HttpSource {
    fn check_start(&self, pipeline: &str, start: Option<&Value>) -> Result<()> {
        let Some(pos) = LogPosition::from_value(start) else {
            return Ok(());
        };
        let Some((id, dir, durable)) = self.endpoints.with(&self.endpoint, |e| {
            (e.wal.id().to_string(), e.wal.dir().to_path_buf(), e.wal.durable_seq())
        }) else {
            return Ok(());
        };
        let adopt_hint = "if that directory is lost for good, start once with --adopt-ingest-log: records it acknowledged that were not yet committed are then lost, and this log is read from its beginning";
        match &pos.log {
            Some(theirs) if *theirs != id && self.adopt_log => {
                tracing::warn!(pipeline, log = %dir.display(), committed_log = %theirs, committed_seq = pos.seq,
                    "adopting this ingest log: the sink's commits came from another one; reading this one from its beginning");
                Ok(())
            }
            Some(theirs) if *theirs != id => Err(EngineError::config(
                format!(
                    "pipeline {pipeline}: the ingest log at {} (id {id}) is not the one whose records the sink has committed (log {theirs}, up to record {}); new requests would never be delivered",
                    dir.display(),
                    pos.seq
                ),
                Some(format!(
                    "start with the --state-dir that holds log {theirs}; {adopt_hint}"
                )),
            )),
            Some(_) if pos.seq >= durable => Err(EngineError::config(
                format!(
                    "pipeline {pipeline}: the sink has committed records up to {} of the ingest log at {}, which only reaches {}: the log lost records it had acknowledged (with ack = 'written', a power cut can do that)",
                    pos.seq,
                    dir.display(),
                    durable.saturating_sub(1)
                ),
                Some(format!(
                    "move {} aside and start with --adopt-ingest-log to begin a new log",
                    dir.display()
                )),
            )),
            None if pos.seq >= durable && !self.adopt_log => Err(EngineError::config(
                format!(
                    "pipeline {pipeline}: the sink has committed records up to {} of source {}'s ingest log, but the log at {} only reaches {}; it is not the log those records came from",
                    pos.seq,
                    self.endpoint,
                    dir.display(),
                    durable.saturating_sub(1)
                ),
                Some(format!(
                    "start with the --state-dir that holds the original log; {adopt_hint}"
                )),
            )),
            _ => Ok(()),
        }
    }

    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<()> {
        {
            let mut stop = self.endpoints.stop.write().unwrap_or_else(|p| p.into_inner());
            stop.get_or_insert_with(|| ctx.shutdown.clone());
        }
        let from = self.resume_from(&ctx.start);
        let next = match self.replay(&ctx).await {
            Ok(n) => n,
            Err(EngineError::Stopped(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if next > from {
            tracing::info!(pipeline = %ctx.pipeline, source = %ctx.source, records = next - from, "replayed the ingest log");
        }
        // Intake is closed until every pipeline of the endpoint subscribes: the log ends here.
        let durable = self
            .endpoints
            .with(&self.endpoint, |e| e.wal.durable_seq())
            .unwrap_or(next);
        let delivery = Arc::new(std::sync::Mutex::new(Delivery {
            next: durable.max(next),
            behind: false,
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        if let Some(reader) = self.reader(&ctx) {
            let (d, w, pipeline, health) = (delivery.clone(), wake.clone(), ctx.pipeline.clone(), ctx.health.clone());
            tokio::spawn(async move {
                match HttpSource::catch_up(reader, d, w).await {
                    Ok(()) | Err(EngineError::Stopped(_)) => {}
                    Err(e) => {
                        // Records stay in the log (acknowledged, not delivered): stop intake
                        // rather than acknowledge more that would not be delivered either.
                        tracing::error!(pipeline = %pipeline, error = %e, "catch-up from the ingest log failed; intake stopped");
                        metrics::counter!("sluice_http_catch_up_failures_total", "pipeline" => pipeline.clone())
                            .increment(1);
                        health.fail(format!(
                            "catching up from the ingest log failed: {e}; restart the server to replay it"
                        ));
                    }
                }
            });
        }
        let sub = Subscriber {
            tx: ctx.tx.clone(),
            health: ctx.health.clone(),
            budget: ctx.budget.clone(),
            delivery,
            wake,
        };
        self.endpoints
            .with(&self.endpoint, |e| e.subscribers.insert(ctx.pipeline.clone(), sub));
        ctx.mark_started();
        let mut stop = ctx.shutdown.clone();
        loop {
            if *stop.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = stop.changed() => if r.is_err() { break },
                changed = ctx.committed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let seq = seq_of(&ctx.committed.borrow_and_update());
                    if let Some(seq) = seq {
                        self.discard_committed(&ctx.pipeline, seq).await;
                    }
                }
            }
        }
        self.endpoints
            .with(&self.endpoint, |e| e.subscribers.remove(&ctx.pipeline));
        Ok(())
    }
}

impl HttpSource {
    /// Records that `pipeline` committed through `seq` and deletes the log segments every
    /// pipeline has committed.
    async fn discard_committed(&self, pipeline: &str, seq: u64) {
        let Some((wal, min, snapshot)) = self.endpoints.with(&self.endpoint, |e| {
            e.committed.insert(pipeline.to_string(), seq);
            let min = if e.committed.len() == e.expected {
                e.committed.values().min().copied()
            } else {
                None
            };
            // The ids in the segments about to go are kept in the snapshot first.
            let snapshot = min.filter(|m| e.wal.deletable_before(m + 1)).map(|_| e.seen.snapshot());
            (e.wal.clone(), min, snapshot)
        }) else {
            return;
        };
        if let (Some(min), Some(snapshot)) = (min, snapshot) {
            let res = tokio::task::spawn_blocking(move || {
                let path = wal.dir().join(super::dedup::SNAPSHOT_FILE);
                sluice_engine::durability::write_atomic(&path, &snapshot)
                    .map_err(EngineError::io(format!("writing {}", path.display())))?;
                wal.delete_before(min + 1)
            })
            .await;
            match res {
                Ok(Ok(n)) if n > 0 => tracing::debug!(segments = n, "deleted committed ingest log segments"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not delete committed ingest log segments"),
                _ => {}
            }
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (status, Json(json!({ "error": message.into() }))).into_response();
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        r.headers_mut().insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
    }
    r
}

/// `POST /v1/sources/{name}`.
///
/// The request is handled in a task of its own: a client that disconnects drops this future,
/// never the handling, so a claimed request id is always settled and budget taken for some
/// pipelines is always handed on or given back (the request completes as if the client had
/// waited; a retry then finds it).
pub async fn ingest(
    State(endpoints): State<Arc<Endpoints>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    // A body over the listener's limit (or one that could not be read) is answered here, as
    // JSON like every other error.
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    match tokio::spawn(handle(endpoints, name, headers, body)).await {
        Ok(response) => response,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request handler failed: {e}"),
        ),
    }
}

/// Counts a request in `sluice_http_requests_in_flight` while it is handled.
struct InFlight(String);

impl InFlight {
    fn new(name: &str) -> Self {
        metrics::gauge!("sluice_http_requests_in_flight", "source" => name.to_string()).increment(1.0);
        InFlight(name.to_string())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("sluice_http_requests_in_flight", "source" => self.0.clone()).decrement(1.0);
    }
}

async fn handle(endpoints: Arc<Endpoints>, name: String, headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = InFlight::new(&name);
    // Only a producer's own X-Request-Id is an idempotency key. Without one, the id is minted
    // unique to this process start (it names the request in dead letters) and never deduplicated.
    // Reproducer: minted ids restarting at 0 after a restart collided with logged ones.
    let client_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.contains('\n'))
        .map(str::to_string);
    let idempotent = client_id.is_some();
    let request_id = client_id.unwrap_or_else(|| {
        format!(
            "req-{}-{}",
            *BOOT_ID,
            endpoints.next_request.fetch_add(1, Ordering::Relaxed)
        )
    });
    let found = endpoints.with(&name, |e| {
        let open = e.subscribers.len() == e.expected;
        let seen = if idempotent { e.seen.get(&request_id) } else { None };
        (
            e.decoder.clone(),
            e.source.clone(),
            e.max_body_bytes,
            e.wal.clone(),
            open.then(|| e.subscribers.clone()),
            seen,
        )
    });
    let Some((decoder, source, max_body, wal, subscribers, seen)) = found else {
        let known: Vec<String> = endpoints
            .by_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown source '{name}'; this server has: {known:?}"),
        );
    };
    if body.len() as u64 > max_body {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {} bytes exceeds max_body_bytes = {max_body}", body.len()),
        );
    }
    let Some(subscribers) = subscribers.filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the source is starting or shutting down",
        );
    };
    // Nothing is acknowledged that a pipeline would not take.
    for (pipeline, sub) in &subscribers {
        if let Some(why) = sub.health.failed() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("pipeline {pipeline} does not take input: {why}"),
            );
        }
        if sub.tx.is_closed() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("pipeline {pipeline} has stopped"),
            );
        }
    }
    match seen {
        Some(Some(seq)) => {
            metrics::counter!("sluice_http_duplicates_total", "source" => source.clone()).increment(1);
            return (
                StatusCode::OK,
                Json(json!({ "duplicate": true, "request_id": request_id, "seq": seq })),
            )
                .into_response();
        }
        Some(None) => {
            return error(
                StatusCode::CONFLICT,
                format!("request {request_id} is being written; retry"),
            );
        }
        None => {}
    }
    let (decoded, dead_letters) = match decode_body(&decoder, &source, &request_id, &body) {
        Ok(d) => d,
        Err((status, msg)) => return error(status, msg),
    };
    // Claim the id (a concurrent duplicate now gets 409 until this one is settled).
    let claimed = endpoints.with(&name, |e| match e.seen.get(&request_id).filter(|_| idempotent) {
        Some(_) => false,
        None => {
            if idempotent {
                e.remember(&request_id, None);
            }
            true
        }
    });
    if claimed != Some(true) {
        return error(
            StatusCode::CONFLICT,
            format!("request {request_id} is being written; retry"),
        );
    }
    let settle = |seq: Option<u64>| {
        if !idempotent {
            return;
        }
        endpoints.with(&name, |e| match seq {
            Some(s) => e.remember(&request_id, Some(s)),
            None => e.forget(&request_id),
        });
    };

    // Admission: every reading pipeline's budget, or none.
    let bytes = body.len() as u64;
    let mut taken: Vec<&Subscriber> = Vec::new();
    let release = |taken: &[&Subscriber]| taken.iter().for_each(|s| s.budget.release(bytes));
    for (pipeline, sub) in &subscribers {
        if sub.budget.policy().when_full == WhenFull::Spill {
            // Charged at hand-off; if full then, the pipeline falls behind and re-reads the log.
            continue;
        }
        if sub.budget.try_acquire(bytes) {
            taken.push(sub);
            continue;
        }
        match sub.budget.policy().when_full {
            WhenFull::Reject => {
                release(&taken);
                settle(None);
                metrics::counter!("sluice_http_rejected_total", "source" => source.clone(), "reason" => "budget")
                    .increment(1);
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("pipeline {pipeline} is at its memory budget; retry later"),
                );
            }
            WhenFull::Spill => {}
            WhenFull::Block => {
                let stop = endpoints.stop.read().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(mut stop) = stop else {
                    release(&taken);
                    settle(None);
                    return error(StatusCode::SERVICE_UNAVAILABLE, "the source is starting");
                };
                if !sub.budget.acquire(bytes, &mut stop).await {
                    release(&taken);
                    settle(None);
                    return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
                }
                taken.push(sub);
            }
        }
    }

    // Durable, then delivered in log order, then answered.
    let accepted = decoded.batch.num_rows();
    let rejected = dead_letters.len();
    let errors: Vec<Value> = decoded
        .rejected
        .iter()
        .take(MAX_ERRORS_IN_REPLY)
        .map(|r| json!({ "record": r.index, "error": r.error }))
        .collect();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let batch = decoded.batch;
    let subs: Vec<Subscriber> = subscribers.into_values().collect();
    let size = body.len();
    let log_id = wal.id().to_string();
    wal.append(
        log_record(&request_id, &body),
        Box::new(move |res| {
            if let Ok(seq) = res {
                for s in &subs {
                    let prepaid = s.budget.policy().when_full != WhenFull::Spill;
                    {
                        let mut st = s.delivery.lock().unwrap_or_else(|p| p.into_inner());
                        let live = !st.behind && seq == st.next;
                        let charged = live && (prepaid || s.budget.try_acquire(bytes));
                        if !charged {
                            if prepaid {
                                s.budget.release(bytes);
                            }
                            if seq >= st.next {
                                // Stays in the log; the catch-up reader brings it in order.
                                st.behind = true;
                                s.wake.notify_one();
                            }
                            continue;
                        }
                        st.next = seq + 1;
                    }
                    let chunk = Chunk {
                        batch: batch.clone(),
                        dead_letters: dead_letters.clone(),
                        position: Some(LogPosition::new(seq, &log_id).to_value()),
                        bytes: size,
                    };
                    if s.tx.blocking_send(chunk).is_err() {
                        s.budget.release(bytes);
                    }
                }
            } else {
                subs.iter()
                    .filter(|s| s.budget.policy().when_full != WhenFull::Spill)
                    .for_each(|s| s.budget.release(bytes));
            }
            let _ = done_tx.send(res);
        }),
    );
    let done = done_rx.await;
    settle(match &done {
        Ok(Ok(seq)) => Some(*seq),
        _ => None,
    });
    match done {
        Ok(Ok(seq)) => (
            StatusCode::OK,
            Json(json!({ "accepted": accepted, "rejected": rejected, "errors": errors, "request_id": request_id, "seq": seq })),
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("could not make the events durable: {e}")),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the ingest log stopped"),
    }
}
