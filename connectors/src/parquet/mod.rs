//! `STORED AS PARQUET` sinks: hive-partitioned Parquet on an object store (local disk by
//! default), committed through the table's Sluice commit log.

pub mod config;
pub mod sink;

use std::sync::Arc;

use sluice_engine::store::TableStore;
use sluice_engine::connector::registry::SinkFactory;
use sluice_engine::connector::sink::Sink;
use sluice_engine::{EngineError, Result};
use sluice_sql::{ConnectorSpec, Role, SinkDef};

use config::ParquetSinkConfig;
use sink::ParquetSink;

/// Makes Parquet sinks.
#[derive(Debug, Default)]
pub struct ParquetSinkFactory;

impl SinkFactory for ParquetSinkFactory {
    fn spec(&self) -> ConnectorSpec {
        ConnectorSpec {
            name: "PARQUET".into(),
            role: Role::Sink,
            options: config::option_specs(),
            check: Some(Arc::new(|opts, location| {
                ParquetSinkConfig::from_options(opts)?;
                sluice_engine::store::check(location, opts)
            })),
        }
    }

    fn create(&self, def: &SinkDef) -> Result<Arc<dyn Sink>> {
        sink_on(TableStore::open_for(&def.location, &def.options)?, def)
    }

    fn create_on(&self, table: TableStore, def: &SinkDef) -> Result<Arc<dyn Sink>> {
        sink_on(table, def)
    }
}

/// A Parquet sink for `def` on an already opened table store (a wrapped or custom store).
pub fn sink_on(table: TableStore, def: &SinkDef) -> Result<Arc<dyn Sink>> {
    let config =
        ParquetSinkConfig::from_options(&def.options).map_err(|e| EngineError::config(e.message, None::<String>))?;
    Ok(Arc::new(ParquetSink::new(
        table,
        def.schema.clone(),
        &def.partition_by,
        &config,
    )?))
}
