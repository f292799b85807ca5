//! One pipeline's micro-batch loop: closing batches ([`batcher`]), running the pipeline's
//! DataFusion plan over them ([`crate::plan`]), and staging and committing each epoch
//! ([`task`]).

pub mod batcher;
pub mod task;

pub use task::{PipelineState, PipelineStatus, PipelineTask, StatusHandle, update};
