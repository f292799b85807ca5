//! One pipeline's micro-batch loop: closing batches ([`batcher`]), running the pipeline's
//! DataFusion plan over them ([`exec`]), and staging and committing each epoch ([`task`]).

pub mod batcher;
pub mod exec;
pub mod task;

pub use task::{PipelineState, PipelineStatus, PipelineTask, StatusHandle, update};
