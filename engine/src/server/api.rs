//! The server's management endpoints: `GET /healthz`, `GET /readyz`, `GET /metrics`
//! (Prometheus) and `GET /v1/pipelines`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::pipeline::{PipelineState, PipelineStatus, StatusHandle};
use crate::connector::auth::{self, Auth};
use crate::connector::source::Health;

/// What the management endpoints read.
#[derive(Clone)]
pub struct ApiState {
    /// Every pipeline's status.
    pub statuses: Arc<Vec<StatusHandle>>,
    /// Every pipeline's health (whether it takes input), in the same order.
    pub healths: Arc<Vec<Health>>,
    /// Becomes true when the server shuts down (stopped pipelines are then expected).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// True once every pipeline has recovered and its source runs.
    pub ready: Arc<AtomicBool>,
    /// Renders metrics.
    pub metrics: PrometheusHandle,
    /// Tokens: `/metrics` and `/v1/pipelines` need an `admin` one when a token file is set.
    pub auth: Arc<Auth>,
}

/// The management router: `/healthz` and `/readyz` open to all (probes), the rest behind
/// [`auth::require_admin`].
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/pipelines", get(pipelines))
        .layer(axum::middleware::from_fn_with_state(state.auth.clone(), auth::require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
}

async fn readyz(State(s): State<ApiState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Acquire) {
        // Which pipelines are not up yet, and why (a lease held by a process that died waits
        // until it expires).
        let waiting: Vec<String> = s
            .statuses
            .iter()
            .filter_map(|h| {
                let st = h.lock().unwrap_or_else(|p| p.into_inner());
                match st.state {
                    PipelineState::WaitingForLease => Some(format!(
                        "{} (waiting for its lease for {} s)",
                        st.name,
                        st.waiting_since.map_or(0, |t| t.elapsed().as_secs())
                    )),
                    PipelineState::Running => None,
                    // The error itself is in `/v1/pipelines` (behind the admin token).
                    PipelineState::Failed => Some(format!("{} (failed)", st.name)),
                    _ => Some(format!("{} (starting)", st.name)),
                }
            })
            .collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("starting: {}", waiting.join(", ")),
        );
    }
    // Not ready while any pipeline is failed or does not take input (its source stopped, its
    // catch-up failed, it stopped outside a shutdown).
    let stopping = *s.stopping.borrow();
    let failed: Vec<String> = s
        .statuses
        .iter()
        .zip(s.healths.iter())
        .filter_map(|(h, health)| {
            let st = h.lock().unwrap_or_else(|p| p.into_inner());
            let why = health.failed();
            let down = matches!(st.state, PipelineState::Failed) || (why.is_some() && !stopping);
            down.then(|| match why {
                Some(why) => format!("{} ({why})", st.name),
                None => st.name.clone(),
            })
        })
        .collect();
    if failed.is_empty() {
        (StatusCode::OK, "ready".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed: {}", failed.join(", ")),
        )
    }
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
}

async fn pipelines(State(s): State<ApiState>) -> Json<Vec<PipelineStatus>> {
    Json(
        s.statuses
            .iter()
            .zip(s.healths.iter())
            .map(|(h, health)| {
                let mut st = h.lock().unwrap_or_else(|p| p.into_inner()).clone();
                st.intake_error = health.failed();
                st.waiting_for_lease_secs = st.waiting_since.map(|t| t.elapsed().as_secs());
                st
            })
            .collect(),
    )
}
