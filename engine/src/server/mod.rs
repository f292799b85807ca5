//! The micro-batch server: connector registry ([`registry`]), start-up and shutdown of every
//! pipeline ([`runtime`]), the management HTTP endpoints ([`api`]), metrics ([`telemetry`]),
//! the network edge every connection comes through ([`edge`]: connection and header limits,
//! TLS) and bearer tokens ([`auth`]).

pub mod api;
pub mod auth;
pub mod edge;
pub mod registry;
pub mod runtime;
pub mod telemetry;
