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

use std::sync::Arc;

use serde_json::Value;
use sluice_engine::connector::source::{Source, SourceContext};
use sluice_engine::{EngineError, Result};

use super::delivery::{LogPosition, LogReader, seq_of};
use super::endpoint::{Delivery, Endpoints, Subscriber};

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
            .with(&self.endpoint, |e| e.subscribe(ctx.pipeline.clone(), sub));
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
                super::dedup::write_snapshot(wal.dir(), &snapshot)?;
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
