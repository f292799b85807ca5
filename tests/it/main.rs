//! Sluice's end-to-end tests, compiled into one binary (linking DataFusion once).

mod cli;
mod delivery;
mod dir_source;
mod event_time;
mod disconnect;
mod faults;
mod fuzz;
mod harness;
mod http;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "s3")]
mod moto;
#[cfg(feature = "fault-injection")]
mod power_loss;
mod quality;
mod quickstart;
mod readers;
mod reconcile;
#[cfg(feature = "s3")]
mod s3;
mod security;
#[cfg(feature = "kafka")]
mod services;
mod slt;
mod stalls;
mod state_dir;
mod writers;
mod year_log;
