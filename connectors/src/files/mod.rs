//! `STORED AS NDJSON` and `STORED AS CSV` unbounded sources: directories whose new files are
//! read once, in name order, with progress kept in the sink's commit log.

pub mod config;
pub mod source;

use std::sync::Arc;

use sluice_engine::decode::RecordDecoder;
use sluice_engine::connector::registry::SourceFactory;
use sluice_engine::connector::source::Source;
use sluice_engine::{EngineError, Result};
use sluice_sql::{ConnectorSpec, Role, SourceDef};

use config::{DirFormat, DirSourceConfig};
use source::{DirSource, decoder_format};

/// Makes directory sources of one format.
#[derive(Debug)]
pub struct DirSourceFactory {
    format: DirFormat,
}

impl DirSourceFactory {
    /// A factory for `format`.
    pub fn new(format: DirFormat) -> Self {
        DirSourceFactory { format }
    }
}

impl SourceFactory for DirSourceFactory {
    fn spec(&self) -> ConnectorSpec {
        ConnectorSpec {
            name: match self.format {
                DirFormat::Ndjson => "NDJSON".into(),
                DirFormat::Csv => "CSV".into(),
            },
            role: Role::Source,
            options: config::option_specs(self.format),
            check: Some(Arc::new(|opts, location| {
                DirSourceConfig::new(opts, location).map(|_| ())
            })),
        }
    }

    fn create(&self, def: &SourceDef, _pipeline: &str) -> Result<Box<dyn Source>> {
        let config = DirSourceConfig::new(&def.options, &def.location)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let unit = sluice_engine::decode::timestamp::epoch_unit_from_options(&def.options)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let decoder = RecordDecoder::new(decoder_format(self.format, &config), def.schema.clone())
            .with_epoch_unit(unit)
            .with_max_record_bytes(usize::try_from(config.max_line_bytes).unwrap_or(usize::MAX));
        Ok(Box::new(DirSource {
            source: def.name.clone(),
            config,
            format: self.format,
            decoder,
        }))
    }
}
