//! The request handler of `POST /v1/sources/{name}`: who sends (tokens, client certificates),
//! reading the body within limits, idempotency by `X-Request-Id`,
//! admission against every reading pipeline's budget, the durable append, the hand-off to the
//! pipelines in log order, and the answer (see the table in [`super::source`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_engine::budget::WhenFull;
use sluice_engine::connector::source::Chunk;

use sluice_engine::connector::auth::{self, Auth, Verdict, bearer};
use sluice_engine::connector::auth::{PeerCertificate, refused};

use super::body::{BadRecords, Refusal, decode_body, log_record};
use super::dedup::dedup_key;
use super::intake::{BodyBudget, BodyCharge, BodyLimits, read_body};
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

/// What the ingest route reads: the endpoints, and the limits every body is read within.
#[derive(Clone)]
pub struct Ingest {
    /// Every HTTP source's endpoint.
    pub endpoints: Arc<Endpoints>,
    /// Bytes of bodies held at once, across sources.
    pub bodies: Arc<BodyBudget>,
    /// How bodies must arrive.
    pub limits: BodyLimits,
    /// The most dead letters one request may make.
    pub bad_records: BadRecords,
    /// Bodies decoded at once (one per core): decoding is CPU work, more at once only adds
    /// their working memory, so a flood of bodies waits here holding just its bytes.
    pub decoders: Arc<tokio::sync::Semaphore>,
}

/// Bodies decoded at once by default: the machine's parallelism.
pub fn default_decoders() -> Arc<tokio::sync::Semaphore> {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    Arc::new(tokio::sync::Semaphore::new(n))
}

/// A refusal as a JSON answer, counted in `sluice_http_refused_total{reason}`.
fn refuse(r: Refusal) -> Response {
    refused(r.reason);
    error(r.status, r.message)
}

/// `POST /v1/sources/{name}`.
///
/// The sender is checked first (before a byte of the body is read), then the body is read
/// within the limits ([`super::intake`]), then the request is handled in a task of its own: a
/// client that disconnects drops this future, never the handling, so a claimed request id is
/// always settled and budget taken for some pipelines is always handed on or given back (the
/// request completes as if the client had waited; a retry then finds it).
pub async fn ingest(State(ingest): State<Ingest>, Path(name): Path<String>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut access = AccessLine {
        source: name.clone(),
        principal: None,
        remote: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        status: None,
        bytes: 0,
        started: std::time::Instant::now(),
    };
    // The server always installs its tokens; without them nothing is admitted (fail closed).
    let Some(auth) = parts.extensions.get::<Arc<Auth>>().cloned() else {
        return access.done(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server's token configuration is missing",
        ));
    };
    let peer = parts.extensions.get::<PeerCertificate>();
    let principal = match admit(&ingest.endpoints, &auth, &name, &parts.headers, peer) {
        Err(r) => return access.done(r),
        Ok(p) => p,
    };
    access.principal = principal.clone();
    let max = ingest.endpoints.with(&name, |e| e.max_body_bytes).unwrap_or(0);
    let mut charge = ingest.bodies.charge();
    let body = match read_body(&parts.headers, body, max, ingest.limits, &mut charge, &ingest.decoders).await {
        Err(r) => return access.done(refuse(r)),
        Ok(body) => body,
    };
    access.bytes = body.len();
    let task = handle(
        ingest.endpoints.clone(),
        name,
        parts.headers.clone(),
        body,
        principal,
        ingest.bad_records,
        charge,
        ingest.decoders.clone(),
    );
    let response = match tokio::spawn(task).await {
        Ok(response) => response,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request handler failed: {e}"),
        ),
    };
    access.done(response)
}

/// One line of the access log (tracing target `sluice::access`), written when the request is
/// answered, or when its client goes away first (then without a status: the request itself is
/// still handled to its end).
struct AccessLine {
    source: String,
    principal: Option<String>,
    remote: Option<SocketAddr>,
    request_id: Option<String>,
    status: Option<u16>,
    bytes: usize,
    started: std::time::Instant,
}

impl AccessLine {
    fn done(mut self, response: Response) -> Response {
        self.status = Some(response.status().as_u16());
        response
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        // Client-given text is logged escaped (`?`): a name or id cannot forge log lines.
        tracing::info!(
            target: "sluice::access",
            source = ?self.source,
            principal = %self.principal.as_deref().unwrap_or("-"),
            remote = %self.remote.map_or("-".to_string(), |a| a.to_string()),
            request_id = ?self.request_id.as_deref().unwrap_or("-"),
            status = %self.status.map_or("client-gone".to_string(), |s| s.to_string()),
            bytes = self.bytes,
            ms = self.started.elapsed().as_millis() as u64,
            "ingest"
        );
    }
}

/// Who sends (the principal, `None` when anonymous), or the refusal: 401/403 by token, 404
/// for an unknown source (naming the known ones only when no token is configured).
fn admit(
    endpoints: &Endpoints,
    auth: &Auth,
    name: &str,
    headers: &HeaderMap,
    peer: Option<&PeerCertificate>,
) -> Result<Option<String>, Response> {
    let own_token = endpoints.with(name, |e| e.token);
    if !auth.has_file() && !endpoints.any_token() {
        // No token anywhere: open, the certificate's subject (mTLS) is the sender when given.
        return match own_token {
            Some(_) => Ok(peer.map(|p| p.subject.clone())),
            None => {
                refused("unknown_source");
                Err(error(
                    StatusCode::NOT_FOUND,
                    format!("unknown source '{name}'; this server has: {:?}", endpoints.names()),
                ))
            }
        };
    }
    // One answer for every stranger, whether the source exists or not.
    let stranger = || auth::refusal(&Verdict::Unauthorized, "posting");
    let presented = bearer(headers);
    let entry = presented.as_ref().and_then(|h| auth.lookup(h));
    let Some(own) = own_token else {
        // Only a known sender learns that the source does not exist.
        let known = entry.is_some() || presented.is_some_and(|h| endpoints.token_owner(&h).is_some());
        if !known {
            return Err(stranger());
        }
        refused("unknown_source");
        return Err(error(StatusCode::NOT_FOUND, format!("unknown source '{name}'")));
    };
    let Some(h) = presented else {
        // A source no token guards (only others have their own, and there is no token file)
        // stays open; a client certificate alone never passes a token rule.
        if own.is_none() && !auth.has_file() {
            return Ok(peer.map(|p| p.subject.clone()));
        }
        return Err(stranger());
    };
    if own.is_some_and(|o| auth::token_matches(&h, &o)) {
        return Ok(Some(format!("auth.token@{name}")));
    }
    if let Some(e) = entry {
        return if e.allows(name) {
            Ok(Some(e.name))
        } else {
            Err(auth::refusal(&Verdict::Forbidden(e.name), &format!("post to source '{name}'")))
        };
    }
    if let Some(other) = endpoints.token_owner(&h) {
        return Err(auth::refusal(
            &Verdict::Forbidden(format!("auth.token@{other}")),
            &format!("post to source '{name}'"),
        ));
    }
    Err(stranger())
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

async fn handle(
    endpoints: Arc<Endpoints>,
    name: String,
    headers: HeaderMap,
    body: Bytes,
    principal: Option<String>,
    bad_records: BadRecords,
    body_charge: BodyCharge,
    decoders: Arc<tokio::sync::Semaphore>,
) -> Response {
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
    // Ids are scoped by sender: another sender's request with the same id is not a duplicate
    // (and learns nothing of it).
    let key = dedup_key(principal.as_deref(), &request_id);
    let found = endpoints.with(&name, |e| {
        let open = e.subscribers.len() == e.expected;
        let seen = if idempotent { e.seen.get(&key) } else { None };
        (
            e.decoder.clone(),
            e.source.clone(),
            e.wal.clone(),
            open.then(|| e.subscribers.clone()),
            seen,
        )
    });
    let Some((decoder, source, wal, subscribers, seen)) = found else {
        return error(StatusCode::NOT_FOUND, format!("unknown source '{name}'"));
    };
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
    // Decoding is CPU work: on a blocking thread, so a large or hostile body never holds an
    // async worker (and with it every other client's requests). Its dead letters are charged
    // to the body budget as they are made.
    let Ok(slot) = decoders.acquire_owned().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
    };
    let decoding = {
        let (decoder, source, request_id, principal, body) =
            (decoder.clone(), source.clone(), request_id.clone(), principal.clone(), body.clone());
        let mut charge = body_charge;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut grow = |n: u64| charge.grow(n);
            let result = decode_body(
                &decoder,
                &source,
                &request_id,
                principal.as_deref(),
                &body,
                Some(bad_records),
                Some(&mut grow),
            );
            (result, charge)
        })
    };
    // The body's bytes and its dead letters stay charged until it is handed on or refused.
    let (decoded_body, _body_charge) = match decoding.await {
        Ok((Ok(d), charge)) => (d, charge),
        Ok((Err(r), _)) => return refuse(r),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")),
    };
    let (decoded, dead_letters) = (decoded_body.decoded, decoded_body.dead_letters);
    // Claim the id (a concurrent duplicate now gets 409 until this one is settled).
    let claimed = endpoints.with(&name, |e| match e.seen.get(&key).filter(|_| idempotent) {
        Some(_) => false,
        None => {
            if idempotent {
                e.remember(&key, None);
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
            Some(s) => e.remember(&key, Some(s)),
            None => e.forget(&key),
        });
    };

    // Admission: every reading pipeline's budget, or none; dead letters count with the body.
    let bytes = (body.len() + decoded_body.dead_bytes) as u64;
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
    let size = bytes as usize;
    let log_id = wal.id().to_string();
    let chunk_principal = principal.clone();
    wal.append(
        log_record(&request_id, principal.as_deref(), &body),
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
                        principal: chunk_principal.clone(),
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
