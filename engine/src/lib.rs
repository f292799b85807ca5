//! `sluice-engine` is the Sluice runtime: it turns a compiled pipeline program into running
//! micro-batch loops. It defines the [`Source`](source::Source) and [`Sink`](sink::Sink) traits and
//! knows no concrete connector; connectors register factories in a [`Registry`](connector::registry::Registry).
//!
//! Data flow per pipeline: source → [`Chunk`](source::Chunk)s (decoded with
//! [`decode::RecordDecoder`], bad records as dead letters) → [`pipeline::batcher::Batcher`] →
//! [`plan::BatchPlan`] (the pipeline's DataFusion plan) → sink staging → one
//! [`log::commit::CommitLog`] entry per epoch. Every durability step on local disk goes
//! through [`durability`].
//!
//! Subsystems, each a folder, imports pointing down: [`decode`] (records to Arrow),
//! [`ingest`] (the ingest log), [`store`] (where a table lives: local disk or S3, multipart
//! uploads, the writer lease), [`log`] (a table's commit log, checkpoints, check, reader),
//! [`pipeline`] (batching, plan, epoch commit), [`quality`] (profiles, expectations, drift),
//! [`batch`] (the raw archive and reconciliation), [`server`] (runtime, API, registry, metrics).
//! At the root: the [`source`] and [`sink`] traits, [`budget`], [`dead_letter`], [`retry`],
//! [`parquet_file`] (the multi-threaded Parquet encoder the sink and the archive share),
//! [`durability`], [`crash`] points and the [`error`] type.
//!
//! Invariants:
//! - every record received ends as an output row, a dead letter, or a row removed by the
//!   pipeline's own WHERE (counted in the commit entry);
//! - a sink table's readable content is exactly what its commit log names;
//! - a pipeline resumes its source from the positions in its newest commit.
//!
//! ```
//! use sluice_engine::decode::{Format, RecordDecoder, lines};
//! use arrow::datatypes::{DataType, Field, Schema};
//! use std::sync::Arc;
//! let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
//! let buf = b"{\"id\": 1}\nnot json\n{\"id\": 3}\n";
//! let out = RecordDecoder::new(Format::Json, schema).decode(buf, &lines(buf)).unwrap();
//! assert_eq!(out.batch.num_rows(), 2);
//! assert_eq!(out.rejected[0].index, 1);
//! ```

pub mod batch;
pub mod budget;
pub mod connector;
pub mod crash;
pub mod dead_letter;
pub mod decode;
pub mod durability;
pub mod error;
pub mod event_time;
pub mod ingest;
pub mod log;
pub mod parquet_file;
pub mod pipeline;
pub mod plan;
pub mod quality;
pub mod retry;
pub mod server;
pub mod store;

pub use error::{EngineError, Result};
