//! `STORED AS HTTP` sources: producers `POST /v1/sources/{name}` with NDJSON or a JSON array.

pub mod config;
pub mod source;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use sluice_engine::decode::{Format, RecordDecoder};
use sluice_engine::registry::SourceFactory;
use sluice_engine::source::Source;
use sluice_engine::{EngineError, Result};
use sluice_sql::{ConnectorSpec, Role, SourceDef};

use config::HttpSourceConfig;
use source::{Endpoint, Endpoints, HttpSource};

/// Makes HTTP sources and serves their endpoint.
#[derive(Default)]
pub struct HttpSourceFactory {
    endpoints: Arc<Endpoints>,
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
        self.endpoints.declare(&config.endpoint, || Endpoint {
            source: def.name.clone(),
            decoder: RecordDecoder::new(Format::Json, def.schema.clone()),
            max_body_bytes: config.max_body_bytes,
            subscribers: Default::default(),
        });
        Ok(Box::new(HttpSource {
            endpoints: self.endpoints.clone(),
            endpoint: config.endpoint,
        }))
    }

    fn routes(&self) -> Option<Router> {
        // Bodies over every endpoint's limit are refused by axum before reading; the handler
        // applies each endpoint's own limit.
        let limit = usize::try_from(
            self.endpoints
                .max_body_bytes()
                .max(config::DEFAULT_MAX_BODY_BYTES),
        )
        .unwrap_or(usize::MAX);
        Some(
            Router::new()
                .route("/v1/sources/{name}", post(source::ingest))
                .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
                .with_state(self.endpoints.clone()),
        )
    }
}
