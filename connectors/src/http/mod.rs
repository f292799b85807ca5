//! `STORED AS HTTP` sources: producers `POST /v1/sources/{name}` with NDJSON or a JSON array.

pub mod body;
pub mod config;
pub mod dedup;
pub mod delivery;
pub mod endpoint;
pub mod handler;
pub mod intake;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use sluice_engine::decode::{Format, RecordDecoder};
use sluice_engine::ingest::wal::IngestLog;
use sluice_engine::connector::registry::SourceFactory;
use sluice_engine::connector::source::Source;
use sluice_engine::{EngineError, Result};
use sluice_sql::{ConnectorSpec, Role, SourceDef};

use body::BadRecords;
use config::HttpSourceConfig;
use intake::{BodyBudget, BodyLimits};
use endpoint::{Endpoint, Endpoints};
use source::HttpSource;

/// Makes HTTP sources and serves their endpoint. Each source's ingest log lives under
/// `<state_dir>/ingest/<source>/`.
pub struct HttpSourceFactory {
    endpoints: Arc<Endpoints>,
    state_dir: PathBuf,
    adopt_logs: bool,
    body_budget: u64,
    limits: BodyLimits,
    bad_records: BadRecords,
}

impl HttpSourceFactory {
    /// A factory keeping ingest logs under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        HttpSourceFactory {
            endpoints: Arc::default(),
            state_dir: state_dir.into(),
            adopt_logs: false,
            body_budget: sluice_engine::budget::DEFAULT_SERVER_BUDGET,
            limits: BodyLimits::default(),
            bad_records: BadRecords::default(),
        }
    }

    /// Bytes of request bodies that may be held at once, across every HTTP source (default:
    /// the default server budget); see [`intake::BodyBudget`].
    pub fn with_body_budget(mut self, bytes: u64) -> Self {
        self.body_budget = bytes;
        self
    }

    /// How request bodies must arrive (read timeout, minimum rate).
    pub fn with_body_limits(mut self, limits: BodyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The most dead letters one request may make before it is refused whole.
    pub fn with_bad_records(mut self, limit: BadRecords) -> Self {
        self.bad_records = limit;
        self
    }

    /// Accepts ingest logs that are not the ones a sink's commits came from (each is then read
    /// from its beginning) instead of refusing to start; see [`source::HttpSource::adopt_log`].
    pub fn with_adopt_logs(mut self, adopt: bool) -> Self {
        self.adopt_logs = adopt;
        self
    }
}

impl SourceFactory for HttpSourceFactory {
    fn spec(&self) -> ConnectorSpec {
        ConnectorSpec {
            name: "HTTP".into(),
            role: Role::Source,
            options: config::option_specs(),
            check: Some(Arc::new(|opts, location| {
                HttpSourceConfig::new(opts, location).map(|_| ())
            })),
        }
    }

    fn create(&self, def: &SourceDef, _pipeline: &str) -> Result<Box<dyn Source>> {
        let config = HttpSourceConfig::new(&def.options, &def.location)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let dir = self.state_dir.join("ingest").join(&def.name);
        self.endpoints.declare(&config.endpoint, || {
            let (wal, report) = IngestLog::open(&dir, config.segment_bytes, config.durable_ack)?;
            if report.truncated_bytes > 0 || !report.quarantined.is_empty() {
                tracing::warn!(source = %def.name, truncated = report.truncated_bytes, repaired = report.quarantined.len(), lost = ?report.lost, "ingest log repaired on open");
            }
            let unit = sluice_engine::decode::timestamp::epoch_unit_from_options(&def.options)
                .map_err(|e| EngineError::config(e.message, None::<String>))?;
            let decoder = RecordDecoder::new(Format::Json, def.schema.clone()).with_epoch_unit(unit);
            let mut endpoint = Endpoint::new(def.name.clone(), decoder, config.max_body_bytes, Arc::new(wal))?;
            endpoint.token = config.token;
            Ok(endpoint)
        })?;
        Ok(Box::new(HttpSource {
            endpoints: self.endpoints.clone(),
            endpoint: config.endpoint,
            adopt_log: self.adopt_logs,
        }))
    }

    fn routes(&self) -> Option<Router> {
        // The handler reads bodies itself, within each endpoint's limit.
        let state = handler::Ingest {
            endpoints: self.endpoints.clone(),
            bodies: BodyBudget::new(self.body_budget),
            limits: self.limits,
            bad_records: self.bad_records,
            decoders: handler::default_decoders(),
        };
        Some(
            Router::new()
                .route("/v1/sources/{name}", post(handler::ingest))
                .layer(DefaultBodyLimit::disable())
                .with_state(state),
        )
    }
}
