//! What a connector is and what it may use: the [`source::Source`] and [`sink::Sink`] traits
//! and what the engine gives them, the factories and [`registry::Registry`] the server makes
//! them with, the options every connector accepts ([`options`]: batching, the raw archive),
//! and who may send ([`auth`]: tokens, principals, refusals, shared with the server's edge).
//! The crates of connectors import only this module of the engine's upper layers (not
//! `server`, `pipeline` or `batch`).

pub mod auth;
pub mod options;
pub mod registry;
pub mod sink;
pub mod source;
