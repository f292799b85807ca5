//! The engine's error type. Kinds are kept apart because they are handled apart: configuration
//! errors stop a pipeline at start with a hint, bad data goes to dead letters, transient I/O is
//! retried, and `Internal` is a bug.

/// Errors of the Sluice runtime.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline definition or a setting is wrong (never retried).
    #[error("{message}{}", .hint.as_ref().map(|h| format!("\nhelp: {h}")).unwrap_or_default())]
    Config {
        /// What is wrong.
        message: String,
        /// What to do about it.
        hint: Option<String>,
    },
    /// A pipeline file failed to compile.
    #[error(transparent)]
    Sql(#[from] sluice_sql::SqlError),
    /// Input that cannot be decoded as a whole (a body that is not JSON at all).
    #[error("bad input: {0}")]
    BadInput(String),
    /// An object store call failed (transient ones are retried by the caller).
    #[error("object store error while {context}: {source}")]
    Store {
        /// What Sluice was doing.
        context: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A local file operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What Sluice was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The plan failed for a reason outside the data (a static table missing or unreadable, a
    /// store): retried with back-off like transient I/O, never dead-lettered.
    #[error("the pipeline's plan cannot run (not a data error; retrying): {0}")]
    Environment(datafusion::error::DataFusionError),
    /// DataFusion failed to plan or run a batch.
    #[error("query execution failed: {0}")]
    Execution(#[from] datafusion::error::DataFusionError),
    /// Arrow failed to build or convert arrays.
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The commit log holds something this version cannot accept.
    #[error("commit log at {path}: {message}")]
    CommitLog {
        /// The entry's path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A batch-level expectation with `ON VIOLATION FAIL` failed: the epoch is not committed.
    #[error(
        "pipeline {pipeline} stopped: expectation {expectation} failed (CHECK ({check}), ON VIOLATION FAIL); the batch was not committed and stays in the source for a retry after a fix"
    )]
    ExpectationFailed {
        /// The pipeline.
        pipeline: String,
        /// The expectation's name.
        expectation: String,
        /// Its CHECK condition.
        check: String,
    },
    /// The runtime is shutting down or a channel closed.
    #[error("pipeline {0} stopped")]
    Stopped(String),
    /// A commit that could not be made (see [`CommitError`]).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A pipeline that could not come up (its lease, its recovery); the cause itself is what
    /// `Server::ready` returns.
    #[error("pipeline {pipeline} did not come up: {message}")]
    NotUp {
        /// The pipeline (its writer name).
        pipeline: String,
        /// The cause, as text.
        message: String,
    },
    /// A bug in Sluice.
    #[error("internal error (a bug in sluice, please report it): {0}")]
    Internal(String),
}

impl EngineError {
    /// A configuration error with a hint.
    pub fn config(message: impl Into<String>, hint: impl Into<Option<String>>) -> Self {
        EngineError::Config {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// Wraps an object store error with what was being done.
    pub fn store(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> Self {
        let context = context.into();
        move |source| EngineError::Store { context, source }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| EngineError::Io { context, source }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Why a commit was not made. A damaged entry is [`EngineError::CommitLog`].
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The writer lost its lease (another process took it over, or it could not be renewed in
    /// time): it changes nothing more on the table.
    #[error(
        "writer {writer} no longer holds its lease on the table (another process took it over, or it could not be renewed within lease.ttl); it stops before changing the table\nhelp: restart it once the other writer is gone; check the store's availability"
    )]
    Fenced {
        /// The writer's name.
        writer: String,
    },
    /// Another process of the same writer committed the epoch: two servers run one pipeline.
    #[error(
        "epoch {epoch} was committed by another instance of pipeline {pipeline}; two servers are running the same pipeline on this table"
    )]
    Conflict {
        /// The epoch.
        epoch: u64,
        /// The pipeline.
        pipeline: String,
    },
    /// A file the transaction removes was removed by a commit made since it read the log.
    #[error("{path} was removed by another commit while {job}; nothing was changed\nhelp: run it again")]
    RemovedConcurrently {
        /// The table-relative path.
        path: String,
        /// What was being done (`compacting`, `reconciling`).
        job: String,
    },
    /// A committed file is neither in place nor staged.
    #[error("commit log at {entry}: file {file} is committed but neither it nor its staged copy exists")]
    MissingFile {
        /// The entry naming it.
        entry: String,
        /// The table-relative path.
        file: String,
    },
}
