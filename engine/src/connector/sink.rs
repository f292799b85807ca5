//! The sink side of a pipeline: the [`Sink`] trait a connector implements to turn a batch's
//! output into staged files of its table.

use arrow::record_batch::RecordBatch;

use crate::error::Result;
use crate::log::commit::{CommitLog, FileAction};
use crate::store::TableStore;

/// A table a pipeline commits to.
///
/// Implementors MUST:
/// - write every file through [`CommitLog::stage`], never at its target (the commit moves it
///   there);
/// - derive file names from the writer ([`CommitLog::writer`]), the epoch and the partition only
///   (never from the clock), so re-running an epoch rewrites the same names;
/// - return one [`FileAction`] per staged file, with table-relative target paths.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// The table's store.
    fn table(&self) -> &TableStore;

    /// The table's columns as stored (the pipeline's output, with any type the sink stores
    /// differently, e.g. timestamps at a coarser unit); recorded in commit entries.
    fn stored_schema(&self) -> arrow::datatypes::SchemaRef;

    /// Stages the output of one epoch.
    async fn stage(&self, log: &CommitLog, epoch: u64, batches: Vec<RecordBatch>) -> Result<Vec<FileAction>>;

    /// The rows of `batches` as [`Sink::stage`] would store them, by partition directory
    /// (`k=v/.../`, empty for an unpartitioned table): the stored data columns only, in stored
    /// types. Lets a comparison see what the files would hold without writing them.
    fn partition(&self, batches: Vec<RecordBatch>) -> Result<Vec<(String, Vec<RecordBatch>)>>;
}
