//! The micro-batch server: start-up and shutdown of every pipeline ([`runtime`]), the
//! management HTTP endpoints ([`api`]), metrics ([`telemetry`]) and the network edge every
//! connection comes through ([`edge`]: connection and header limits, TLS). Connectors, their
//! registry and bearer tokens are [`crate::connector`].

pub mod api;
pub mod edge;
pub mod runtime;
pub mod telemetry;
