//! Sluice's end-to-end tests, compiled into one binary (linking DataFusion once).

mod cli;
mod dir_source;
mod harness;
mod http;
mod quickstart;
mod slt;
