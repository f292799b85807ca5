//! `sluice-sql` parses, validates and plans pipeline files. It owns the pipeline SQL dialect
//! (DESIGN §3) and knows nothing about I/O: connectors are described to it by a
//! [`ConnectorCatalog`].
//!
//! Invariants:
//! - every user error is a [`SqlError::Invalid`] carrying `file:line:column`, the quoted line
//!   and, where one can be found, a hint (nearest name, expected keyword);
//! - each pipeline is planned exactly once, here; the engine reuses the plan for every batch;
//! - unknown `STORED AS` connectors and unknown OPTIONS keys are errors.
//!
//! ```
//! use sluice_sql::{compile, ConnectorCatalog, ConnectorSpec, PipelineText, Role};
//! let mut catalog = ConnectorCatalog::new();
//! catalog.register(ConnectorSpec { name: "HTTP".into(), role: Role::Source, options: vec![], check: None });
//! catalog.register(ConnectorSpec { name: "PARQUET".into(), role: Role::Sink, options: vec![], check: None });
//! let text = PipelineText::new("p.sql", "
//!   CREATE UNBOUNDED EXTERNAL TABLE clicks (user_id BIGINT, url VARCHAR)
//!   STORED AS HTTP LOCATION '/v1/sources/clicks';
//!   CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '/tmp/out/';
//!   INSERT INTO out SELECT user_id, upper(url) AS url FROM clicks WHERE user_id > 0;
//! ").unwrap();
//! let ctx = datafusion::prelude::SessionContext::new();
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! let program = rt.block_on(compile(&ctx, &catalog, &[text])).unwrap();
//! assert_eq!(program.pipelines[0].source, "clicks");
//! ```

mod catalog;
mod compile;
mod error;
mod event_time;
mod expect;
mod static_table;
mod text;
mod window;

pub use catalog::{
    ConnectorCatalog, ConnectorSpec, OptionCheck, OptionError, OptionSpec, Options, Role, option_bytes, option_choice,
    option_count, option_delimiter, option_duration, parse_bytes, parse_duration,
};
pub use compile::{PipelineDef, Program, SinkDef, SourceDef, bind_scan, compile, substitute_env};
pub use error::{SourceLocation, SqlError, nearest};
pub use event_time::{DedupDef, EventTimeDef, LatePolicy, option_specs as event_time_option_specs};
pub use expect::{Action, EXPECTATION_INPUT, ExpectationDef, Level};
pub use static_table::StaticTable;
pub use text::PipelineText;
pub use window::{Lowered, LoweredAggregate, WINDOW_TABLE, WindowDef};

/// A DataFusion session configured the way pipeline files are planned: spans collected so that
/// planning errors point into the file.
pub fn session() -> datafusion::prelude::SessionContext {
    let config = datafusion::prelude::SessionConfig::new()
        .set_bool("datafusion.sql_parser.collect_spans", true)
        .with_information_schema(false);
    let ctx = datafusion::prelude::SessionContext::new_with_config(config);
    window::register_functions(&ctx);
    ctx
}
