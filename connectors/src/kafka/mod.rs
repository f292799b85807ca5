//! `STORED AS KAFKA` unbounded sources: a topic read by a consumer group, with offsets kept in
//! the sink's commit log next to the files they produced (see [`source`]).

pub mod config;
pub mod position;
pub mod source;

use std::sync::Arc;

use sluice_engine::decode::RecordDecoder;
use sluice_engine::connector::registry::SourceFactory;
use sluice_engine::connector::source::Source;
use sluice_engine::{EngineError, Result};
use sluice_sql::{ConnectorSpec, Role, SourceDef};

use config::KafkaSourceConfig;
use source::{Columns, KafkaSource, decoder_format};

/// Makes Kafka sources.
#[derive(Debug, Default)]
pub struct KafkaSourceFactory;

impl SourceFactory for KafkaSourceFactory {
    fn shared_by_instances(&self) -> bool {
        true
    }

    fn spec(&self) -> ConnectorSpec {
        ConnectorSpec {
            name: "KAFKA".into(),
            role: Role::Source,
            options: config::option_specs(),
            check: Some(Arc::new(|opts, location| {
                KafkaSourceConfig::new(opts, location).map(|_| ())
            })),
        }
    }

    fn create(&self, def: &SourceDef, pipeline: &str) -> Result<Box<dyn Source>> {
        let config = KafkaSourceConfig::new(&def.options, &def.location)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let unit = sluice_engine::decode::timestamp::epoch_unit_from_options(&def.options)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let columns = Columns::new(def.schema.clone())?;
        let batch = sluice_engine::connector::options::BatchPolicy::from_options(&def.options)
            .map_err(|e| EngineError::config(e.message, None::<String>))?;
        let decoder = RecordDecoder::new(decoder_format(config.format), columns.value.clone()).with_epoch_unit(unit);
        Ok(Box::new(KafkaSource {
            source: def.name.clone(),
            pipeline: pipeline.to_string(),
            config,
            decoder,
            columns,
            chunk_messages: batch.max_rows.clamp(1, source::CHUNK_MESSAGES),
        }))
    }
}
