//! The options every connector accepts besides its own: batching (`batch.*`, read by the
//! engine's batcher for every source) and the raw archive (`archive`, `archive.retention`, for
//! sinks that archive).

use std::time::Duration;

use sluice_sql::{OptionError, OptionSpec, Options, option_bytes, option_count, option_duration};

/// Default `batch.max_rows`.
pub const DEFAULT_BATCH_MAX_ROWS: usize = 100_000;
/// Default `batch.max_bytes` (raw input bytes).
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 32 << 20;
/// Default `batch.interval`.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most a batch may grow over the configured sizes while the pipeline is behind.
pub const MAX_GROWTH: u64 = 64;

/// When a micro-batch closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Close once this many records are buffered.
    pub max_rows: usize,
    /// Close once this many raw bytes are buffered.
    pub max_bytes: u64,
    /// Close this long after the batch's first chunk arrived.
    pub interval: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_rows: DEFAULT_BATCH_MAX_ROWS,
            max_bytes: DEFAULT_BATCH_MAX_BYTES,
            interval: DEFAULT_BATCH_INTERVAL,
        }
    }
}

impl BatchPolicy {
    /// The OPTIONS keys every source accepts for batching.
    pub fn option_specs() -> Vec<OptionSpec> {
        vec![
            OptionSpec {
                key: "batch.max_rows",
                doc: "close a micro-batch at this many records (default 100000)",
            },
            OptionSpec {
                key: "batch.max_bytes",
                doc: "close a micro-batch at this many raw bytes, e.g. '32MB' (default 32MB)",
            },
            OptionSpec {
                key: "batch.interval",
                doc: "close a micro-batch this long after its first record, e.g. '500ms' (default 1s)",
            },
        ]
    }

    /// Reads the batching options of a source.
    pub fn from_options(options: &Options) -> Result<Self, OptionError> {
        Ok(BatchPolicy {
            max_rows: option_count(options, "batch.max_rows", DEFAULT_BATCH_MAX_ROWS)?,
            max_bytes: option_bytes(options, "batch.max_bytes", DEFAULT_BATCH_MAX_BYTES)?,
            interval: option_duration(options, "batch.interval", DEFAULT_BATCH_INTERVAL)?,
        })
    }
}

/// The sink options of the raw archive (`archive`, `archive.retention`), which every sink
/// that archives accepts.
pub fn archive_option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "archive",
            doc: "'on' (default): every accepted event is archived as Parquet under _sluice/raw/ by the commit that covers it, for `sluice reconcile`; 'off'",
        },
        OptionSpec {
            key: "archive.retention",
            doc: "how long `sluice vacuum` keeps archive files, e.g. '30d' (default: kept)",
        },
    ]
}
