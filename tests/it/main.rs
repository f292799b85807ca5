//! Sluice's end-to-end tests, compiled into one binary (linking DataFusion once).

mod cli;
mod delivery;
mod dir_source;
mod faults;
mod harness;
mod http;
mod quickstart;
mod slt;
