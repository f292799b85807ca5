//! The HTTP ingest endpoint: `POST /v1/sources/{name}` with NDJSON or a JSON array.
//!
//! Each request is decoded on arrival (so the reply can say how many records were accepted and
//! rejected), and the decoded chunk goes to every pipeline reading the source. A request is
//! accepted by all of them or by none: capacity is reserved in every pipeline's channel first,
//! and a full one answers 429 with `Retry-After`.
//!
//! | answer | when |
//! |---|---|
//! | 200 `{accepted, rejected, errors}` | the body was read; rejected records went to dead letters |
//! | 400 `{error}` | the body is not JSON at all (nothing is kept) |
//! | 404 `{error}` | no source has that name |
//! | 413 `{error}` | the body is larger than `max_body_bytes` |
//! | 429 `{error}` + `Retry-After` | a pipeline's buffer is full |
//! | 503 `{error}` | the server is shutting down |

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::{RecordDecoder, lines};
use sluice_engine::source::{Chunk, Source, SourceContext};
use tokio::sync::mpsc;

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_SECONDS: u64 = 1;
/// Errors listed in a 200 reply (the rest are only counted).
pub const MAX_ERRORS_IN_REPLY: usize = 10;

/// One ingest endpoint and the pipelines it feeds.
pub struct Endpoint {
    /// The source table's name.
    pub source: String,
    /// Decodes bodies into the source's schema.
    pub decoder: RecordDecoder,
    /// Largest body accepted.
    pub max_body_bytes: u64,
    /// Channels of the pipelines reading this source, by pipeline name.
    pub subscribers: BTreeMap<String, mpsc::Sender<Chunk>>,
}

/// Every HTTP endpoint of the server, by `{name}`.
#[derive(Default)]
pub struct Endpoints {
    by_name: RwLock<BTreeMap<String, Endpoint>>,
    next_request: AtomicU64,
}

impl Endpoints {
    /// Declares an endpoint (once per source; later calls keep the first).
    pub fn declare(&self, name: &str, make: impl FnOnce() -> Endpoint) {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_insert_with(make);
    }

    fn subscribe(&self, name: &str, pipeline: &str, tx: mpsc::Sender<Chunk>) {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(name) {
            e.subscribers.insert(pipeline.to_string(), tx);
        }
    }

    fn unsubscribe(&self, name: &str, pipeline: &str) {
        let mut map = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(name) {
            e.subscribers.remove(pipeline);
        }
    }

    /// The largest body any endpoint accepts.
    pub fn max_body_bytes(&self) -> u64 {
        let map = self.by_name.read().unwrap_or_else(|p| p.into_inner());
        map.values().map(|e| e.max_body_bytes).max().unwrap_or(0)
    }
}

/// One pipeline's subscription to an endpoint.
pub struct HttpSource {
    /// The shared endpoints.
    pub endpoints: Arc<Endpoints>,
    /// The `{name}` subscribed to.
    pub endpoint: String,
}

#[async_trait::async_trait]
impl Source for HttpSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> sluice_engine::Result<()> {
        self.endpoints
            .subscribe(&self.endpoint, &ctx.pipeline, ctx.tx.clone());
        ctx.mark_started();
        let _ = ctx.shutdown.wait_for(|v| *v).await;
        self.endpoints.unsubscribe(&self.endpoint, &ctx.pipeline);
        Ok(())
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `POST /v1/sources/{name}`.
pub async fn ingest(
    State(endpoints): State<Arc<Endpoints>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "req-{}",
                endpoints.next_request.fetch_add(1, Ordering::Relaxed)
            )
        });
    let (decoder, source, max_body, subscribers) = {
        let map = endpoints.by_name.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = map.get(&name) else {
            let known: Vec<&String> = map.keys().collect();
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown source '{name}'; this server has: {known:?}"),
            );
        };
        (
            e.decoder.clone(),
            e.source.clone(),
            e.max_body_bytes,
            e.subscribers.clone(),
        )
    };
    if body.len() as u64 > max_body {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body of {} bytes exceeds max_body_bytes = {max_body}",
                body.len()
            ),
        );
    }
    if subscribers.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }

    // Records: the elements of a JSON array, or the non-blank lines of NDJSON.
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let (buf, ranges, contiguous): (Vec<u8>, _, bool) = if first == Some(b'[') {
        let elems: Vec<&serde_json::value::RawValue> = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("body is not valid JSON: {e}"),
                );
            }
        };
        let mut buf = Vec::with_capacity(body.len());
        let mut ranges = Vec::with_capacity(elems.len());
        for e in elems {
            let start = buf.len();
            buf.extend_from_slice(e.get().as_bytes());
            ranges.push(start..buf.len());
            buf.push(b'\n');
        }
        (buf, ranges, true)
    } else {
        let ranges = lines(&body);
        (body.to_vec(), ranges, true)
    };
    let decoded = match decoder.decode(&buf, &ranges, contiguous) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("decoding failed: {e}"),
            );
        }
    };
    if decoded.batch.num_rows() == 0
        && !decoded.rejected.is_empty()
        && decoded.rejected.iter().all(|r| r.syntax)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {}", decoded.rejected[0].error),
        );
    }
    let accepted = decoded.batch.num_rows();
    let errors: Vec<Value> = decoded
        .rejected
        .iter()
        .take(MAX_ERRORS_IN_REPLY)
        .map(|r| json!({ "record": r.index, "error": r.error }))
        .collect();
    let dead_letters: Vec<DeadLetter> = decoded
        .rejected
        .iter()
        .map(|r| DeadLetter {
            source: source.clone(),
            position: json!({ "request_id": request_id, "record": r.index }),
            stage: Stage::Decode,
            error: r.error.clone(),
            raw: String::from_utf8_lossy(&buf[ranges[r.index].clone()]).into_owned(),
        })
        .collect();
    let rejected = dead_letters.len();

    // All pipelines or none: reserve everywhere first.
    let mut permits = Vec::with_capacity(subscribers.len());
    for (pipeline, tx) in &subscribers {
        match tx.try_reserve() {
            Ok(p) => permits.push(p),
            Err(mpsc::error::TrySendError::Full(())) => {
                metrics::counter!("sluice_http_rejected_total", "source" => source.clone(), "reason" => "busy").increment(1);
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("pipeline {pipeline} is busy; retry later"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
                return r;
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("pipeline {pipeline} has stopped"),
                );
            }
        }
    }
    for permit in permits {
        permit.send(Chunk {
            batch: decoded.batch.clone(),
            dead_letters: dead_letters.clone(),
            position: None,
            bytes: body.len(),
        });
    }
    (StatusCode::OK, Json(json!({ "accepted": accepted, "rejected": rejected, "errors": errors, "request_id": request_id }))).into_response()
}
