//! `sluice-connectors` holds Sluice's concrete sources and sinks, each behind the engine's
//! [`Source`](sluice_engine::source::Source) / [`Sink`](sluice_engine::sink::Sink) traits and
//! registered by its `STORED AS` name:
//!
//! | STORED AS | role | module |
//! |---|---|---|
//! | `HTTP` | source: `POST /v1/sources/{name}` | [`http`] |
//! | `NDJSON`, `CSV` | source: new files in a directory | [`files`] |
//! | `PARQUET` | sink: hive-partitioned Parquet | [`parquet`] |
//!
//! ```
//! let registry = sluice_connectors::registry();
//! assert!(registry.source("http").is_some());
//! assert!(registry.sink("parquet").is_some());
//! ```

pub mod files;
pub mod http;
pub mod parquet;

use std::sync::Arc;

use sluice_engine::registry::Registry;

/// A registry with every connector of this build.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.add_source(Arc::new(http::HttpSourceFactory::default()));
    r.add_source(Arc::new(files::DirSourceFactory::new(
        files::config::DirFormat::Ndjson,
    )));
    r.add_source(Arc::new(files::DirSourceFactory::new(
        files::config::DirFormat::Csv,
    )));
    r.add_sink(Arc::new(parquet::ParquetSinkFactory));
    r
}
