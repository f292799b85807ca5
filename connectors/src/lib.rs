//! `sluice-connectors` holds Sluice's concrete sources and sinks, each behind the engine's
//! [`Source`](sluice_engine::connector::source::Source) / [`Sink`](sluice_engine::connector::sink::Sink) traits and
//! registered by its `STORED AS` name:
//!
//! | STORED AS | role | module |
//! |---|---|---|
//! | `HTTP` | source: `POST /v1/sources/{name}` | [`http`] |
//! | `NDJSON`, `CSV` | source: new files in a directory | [`files`] |
//! | `KAFKA` | source: a topic, read by a consumer group (feature `kafka`) | `kafka` |
//! | `PARQUET` | sink: hive-partitioned Parquet | [`parquet`] |
//!
//! ```
//! let registry = sluice_connectors::registry();
//! assert!(registry.source("http").is_some());
//! assert!(registry.sink("parquet").is_some());
//! ```

pub mod files;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod parquet;

use std::path::Path;
use std::sync::Arc;

use sluice_engine::connector::registry::Registry;

/// Where `sluice run` keeps local state (ingest logs) unless told otherwise: this directory
/// beside the first pipeline file (not the working directory, so the state cannot drift with
/// where the server is started from).
pub const DEFAULT_STATE_DIR: &str = ".sluice";

/// A registry with every connector of this build, keeping local state in [`DEFAULT_STATE_DIR`].
pub fn registry() -> Registry {
    registry_with_state(Path::new(DEFAULT_STATE_DIR))
}

/// A registry with every connector of this build, keeping local state under `state_dir`.
pub fn registry_with_state(state_dir: &Path) -> Registry {
    registry_for_run(http::HttpSourceFactory::new(state_dir))
}

/// A registry for `sluice run`, with the HTTP source factory as the server's flags set it up
/// (state directory, ingest-log adoption, body budget and limits).
pub fn registry_for_run(http: http::HttpSourceFactory) -> Registry {
    let mut r = Registry::new();
    r.add_source(Arc::new(http));
    r.add_source(Arc::new(files::DirSourceFactory::new(files::config::DirFormat::Ndjson)));
    r.add_source(Arc::new(files::DirSourceFactory::new(files::config::DirFormat::Csv)));
    #[cfg(feature = "kafka")]
    r.add_source(Arc::new(kafka::KafkaSourceFactory));
    r.add_sink(Arc::new(parquet::ParquetSinkFactory));
    r
}
