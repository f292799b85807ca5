//! The connector registry: source and sink factories by `STORED AS` name. The connectors crate
//! fills it; the binary hands it to the runtime. The front end's [`ConnectorCatalog`] is derived
//! from it, with the engine's own per-source options (batching) added to every source.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_sql::{ConnectorCatalog, ConnectorSpec, Role, SinkDef, SourceDef};

use crate::budget::BufferPolicy;
use crate::connector::options::BatchPolicy;
use crate::connector::sink::Sink;
use crate::connector::source::Source;
use crate::error::Result;

/// Makes sources of one connector.
///
/// Implementors MUST reject, in [`ConnectorSpec::check`], every option value that
/// [`SourceFactory::create`] would refuse, so that `sluice validate` catches it.
pub trait SourceFactory: Send + Sync {
    /// What the front end needs to know (name, options, value checks).
    fn spec(&self) -> ConnectorSpec;

    /// A source instance feeding `pipeline` from the table `def`.
    fn create(&self, def: &SourceDef, pipeline: &str) -> Result<Box<dyn Source>>;

    /// HTTP routes this connector serves on the server's listener (e.g. ingest endpoints).
    fn routes(&self) -> Option<axum::Router> {
        None
    }

    /// True when several servers may read the source together, each a writer of its own
    /// (`sluice run --instance`: Kafka consumer groups split the partitions). A source one
    /// server owns (HTTP, a directory) keeps its position under the pipeline's own name.
    fn shared_by_instances(&self) -> bool {
        false
    }
}

/// Makes sinks of one connector.
pub trait SinkFactory: Send + Sync {
    /// What the front end needs to know (name, options, value checks).
    fn spec(&self) -> ConnectorSpec;

    /// The sink for table `def` (its schema is the pipeline's output).
    fn create(&self, def: &SinkDef) -> Result<Arc<dyn Sink>>;

    /// The same sink writing to another store (reconcile encodes its batch result on a scratch
    /// store first, exactly as the sink would write it). Sinks that cannot do so say so.
    fn create_on(&self, _table: crate::store::TableStore, _def: &SinkDef) -> Result<Arc<dyn Sink>> {
        Err(crate::error::EngineError::config(
            format!("the {} sink cannot be reconciled", self.spec().name),
            None::<String>,
        ))
    }
}

/// Source and sink factories by upper-case `STORED AS` name.
#[derive(Default, Clone)]
pub struct Registry {
    sources: BTreeMap<String, Arc<dyn SourceFactory>>,
    sinks: BTreeMap<String, Arc<dyn SinkFactory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a source factory under its spec's name.
    pub fn add_source(&mut self, f: Arc<dyn SourceFactory>) {
        self.sources.insert(f.spec().name.to_uppercase(), f);
    }

    /// Registers a sink factory under its spec's name.
    pub fn add_sink(&mut self, f: Arc<dyn SinkFactory>) {
        self.sinks.insert(f.spec().name.to_uppercase(), f);
    }

    /// The source factory for a connector name.
    pub fn source(&self, name: &str) -> Option<&Arc<dyn SourceFactory>> {
        self.sources.get(&name.to_uppercase())
    }

    /// The sink factory for a connector name.
    pub fn sink(&self, name: &str) -> Option<&Arc<dyn SinkFactory>> {
        self.sinks.get(&name.to_uppercase())
    }

    /// Every source factory.
    pub fn sources(&self) -> impl Iterator<Item = &Arc<dyn SourceFactory>> {
        self.sources.values()
    }

    /// The front end's view: every connector, sources with the batching options added.
    pub fn catalog(&self) -> ConnectorCatalog {
        let mut c = ConnectorCatalog::new();
        for f in self.sources.values() {
            let mut spec = f.spec();
            spec.role = Role::Source;
            spec.options.extend(BatchPolicy::option_specs());
            spec.options.extend(BufferPolicy::option_specs());
            spec.options.extend(crate::decode::timestamp::option_specs());
            spec.options.extend(sluice_sql::event_time_option_specs());
            let inner = spec.check.take();
            spec.check = Some(Arc::new(move |opts, location| {
                BatchPolicy::from_options(opts)?;
                BufferPolicy::from_options(opts)?;
                crate::decode::timestamp::epoch_unit_from_options(opts)?;
                match &inner {
                    Some(check) => check(opts, location),
                    None => Ok(()),
                }
            }));
            c.register(spec);
        }
        for f in self.sinks.values() {
            let mut spec = f.spec();
            spec.role = Role::Sink;
            c.register(spec);
        }
        c
    }
}
