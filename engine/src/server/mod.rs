//! The micro-batch server: connector registry ([`registry`]), start-up and shutdown of every
//! pipeline ([`runtime`]), the management HTTP endpoints ([`api`]) and metrics ([`telemetry`]).

pub mod api;
pub mod registry;
pub mod runtime;
pub mod telemetry;
