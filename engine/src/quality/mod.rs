//! Data quality on the Arrow columns each micro-batch already holds: mergeable column
//! [`profile`]s and the [`sketch`]es in them, the profile files committed with each epoch
//! ([`store`]), expectations ([`expect`]), drift baselines and anomaly episodes ([`drift`]), and
//! what reads them back: merged profiles ([`report`]), suggested checks ([`suggest`]) and the
//! quality report ([`health`]).

pub mod drift;
pub mod expect;
pub mod health;
pub mod profile;
pub mod report;
pub mod sketch;
pub mod store;
pub mod suggest;

use datafusion::prelude::SessionContext;
use sluice_sql::{ExpectationDef, Options, option_choice};

use crate::error::{EngineError, Result};
use crate::quality::drift::{Drift, DriftPolicy};
use crate::quality::expect::Checks;

/// The quality work of one pipeline: the checks on its source and on its sink, and whether
/// both sides are profiled.
pub struct Quality {
    /// Expectations on the pipeline's source, checked before the SQL.
    pub source: Checks,
    /// Expectations on the pipeline's sink, checked on the SQL's output.
    pub sink: Checks,
    /// Whether each epoch's columns are profiled (`quality.profile` on or full).
    pub profile: bool,
    /// Whether the source side gets the full profile too (`full`), or only its exact figures
    /// (`on`: rows, nulls, min, max, lengths, true counts — no sketches, no moments).
    pub full_source: bool,
    /// The sink's drift baselines (used when profiling).
    pub drift: Drift,
}

impl Quality {
    /// The quality work of the pipeline reading `source` into `sink`, whose sink has `options`.
    pub async fn new(
        ctx: &SessionContext,
        expectations: &[ExpectationDef],
        source: &str,
        sink: &str,
        options: &Options,
    ) -> Result<Quality> {
        let (profile, full_source) = option_choice(
            options,
            "quality.profile",
            (true, false),
            &[("on", (true, false)), ("full", (true, true)), ("off", (false, false))],
        )
        .map_err(|e| EngineError::config(e.message, None::<String>))?;
        Ok(Quality {
            source: Checks::new(ctx, expectations, source).await?,
            sink: Checks::new(ctx, expectations, sink).await?,
            profile,
            full_source,
            drift: Drift::new(DriftPolicy::from_options(options)?),
        })
    }
}
