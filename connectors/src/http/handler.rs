//! The request handler of `POST /v1/sources/{name}`: idempotency by `X-Request-Id`,
//! admission against every reading pipeline's budget, the durable append, the hand-off to the
//! pipelines in log order, and the answer (see the table in [`super::source`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_engine::budget::WhenFull;
use sluice_engine::source::Chunk;

use super::body::{decode_body, log_record};
use super::delivery::LogPosition;
use super::endpoint::{Endpoints, Subscriber};

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

/// A JSON error answer (`Retry-After` on 429 and 503).
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
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
    body: Result<Bytes, BytesRejection>,
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
                let wait = sub.budget.policy().block_timeout;
                // Dropping the wait holds nothing: a reservation is taken whole or not at all.
                match tokio::time::timeout(wait, sub.budget.acquire(bytes, &mut stop)).await {
                    Ok(true) => taken.push(sub),
                    Ok(false) => {
                        release(&taken);
                        settle(None);
                        return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
                    }
                    Err(_) => {
                        release(&taken);
                        settle(None);
                        metrics::counter!("sluice_http_rejected_total", "source" => source.clone(), "reason" => "block_timeout")
                            .increment(1);
                        return error(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!(
                                "pipeline {pipeline} stayed at its memory budget for {} ms (block.timeout); retry later",
                                wait.as_millis()
                            ),
                        );
                    }
                }
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
                    if s.tx.blocking_send(chunk.into()).is_err() {
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

/// The bytes of request bodies being received at once, across every HTTP source: a request is
/// admitted (before its body is read) only if its declared length fits, so slow or many
/// clients cannot pin unbounded memory in bodies that are still arriving.
#[derive(Debug)]
pub struct BodyBudget {
    max: u64,
    per_body: u64,
    used: std::sync::atomic::AtomicU64,
}

impl BodyBudget {
    /// At most `max` bytes of bodies at once; a body without a declared length counts as
    /// `per_body` (the largest accepted).
    pub fn new(max: u64, per_body: u64) -> Arc<Self> {
        Arc::new(BodyBudget {
            max,
            per_body,
            used: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn try_take(self: &Arc<Self>, bytes: u64) -> Option<BodyCharge> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u == 0 || u + bytes <= self.max).then_some(u + bytes)
            })
            .ok()
            .map(|u| {
                metrics::gauge!("sluice_http_body_bytes_in_flight").set((u + bytes) as f64);
                BodyCharge(self.clone(), bytes)
            })
    }
}

/// Bytes of a body in flight, given back when the request is done (or its client gone).
struct BodyCharge(Arc<BodyBudget>, u64);

impl Drop for BodyCharge {
    fn drop(&mut self) {
        let before = self.0.used.fetch_sub(self.1, Ordering::AcqRel);
        metrics::gauge!("sluice_http_body_bytes_in_flight").set(before.saturating_sub(self.1) as f64);
    }
}

/// Middleware of the ingest routes: admits a request against the [`BodyBudget`] by its
/// declared length before the body is read; 429 (JSON, `Retry-After`) when it does not fit.
pub async fn limit_bodies(
    State(budget): State<Arc<BodyBudget>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Over the per-body limit: refused with 413 before it is read, so nothing to hold.
    let bytes = declared
        .unwrap_or(budget.per_body)
        .min(budget.per_body.saturating_add(1));
    let Some(_charge) = budget.try_take(bytes) else {
        metrics::counter!("sluice_http_rejected_total", "source" => "*", "reason" => "bodies_in_flight").increment(1);
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many request bodies in flight (over {} bytes); retry later",
                budget.max
            ),
        );
    };
    next.run(request).await
}
