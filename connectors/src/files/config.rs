//! Options of the directory sources (`STORED AS NDJSON`, `STORED AS CSV`).

use std::path::PathBuf;
use std::time::Duration;

use sluice_sql::{OptionError, OptionSpec, Options, option_choice, option_duration};

/// Default `poll_interval`: how often the directory is listed when idle.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Bytes of a file read (and decoded) at a time.
pub const READ_CHUNK_BYTES: usize = 4 << 20;
/// Default `max_line_bytes`: the longest line (CSV: record) read; a longer one is dead-lettered
/// by its position, and its bytes are skipped without being held.
pub const DEFAULT_MAX_LINE_BYTES: u64 = 16 << 20;

/// Which text format the files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirFormat {
    /// One JSON object per line.
    Ndjson,
    /// Delimited text.
    Csv,
}

/// The accepted OPTIONS keys for a format.
pub fn option_specs(format: DirFormat) -> Vec<OptionSpec> {
    let mut v = vec![
        OptionSpec {
            key: "poll_interval",
            doc: "how often to look for new files when idle, e.g. '500ms' (default 500ms)",
        },
        OptionSpec {
            key: "max_line_bytes",
            doc: "the longest line (CSV: record) read, e.g. '16MB' (default 16MB); a longer one is a dead letter naming its file and offset, and is skipped without being held",
        },
    ];
    if format == DirFormat::Csv {
        v.push(OptionSpec {
            key: "format.has_header",
            doc: "whether each file starts with a header line (default true)",
        });
        v.push(OptionSpec {
            key: "format.delimiter",
            doc: "the field delimiter, one character (default ',')",
        });
    }
    v
}

/// A directory source's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSourceConfig {
    /// The directory watched.
    pub dir: PathBuf,
    /// Listing period when idle.
    pub poll_interval: Duration,
    /// CSV: skip the first record of each file.
    pub has_header: bool,
    /// CSV: field delimiter.
    pub delimiter: u8,
    /// The longest line (CSV: record) read.
    pub max_line_bytes: u64,
}

impl DirSourceConfig {
    /// Reads LOCATION and OPTIONS.
    pub fn new(options: &Options, location: &str) -> Result<Self, OptionError> {
        let path = location.strip_prefix("file://").unwrap_or(location);
        if path.contains("://") || path.is_empty() {
            return Err(OptionError {
                key: "LOCATION".into(),
                message: format!("a directory source's LOCATION is a local directory, got '{location}'"),
            });
        }
        let delimiter = sluice_sql::option_delimiter(options, "format.delimiter", b',')?;
        Ok(DirSourceConfig {
            dir: PathBuf::from(path),
            poll_interval: option_duration(options, "poll_interval", DEFAULT_POLL_INTERVAL)?,
            has_header: option_choice(options, "format.has_header", true, &[("true", true), ("false", false)])?,
            delimiter,
            max_line_bytes: sluice_sql::option_bytes(options, "max_line_bytes", DEFAULT_MAX_LINE_BYTES)?.max(1),
        })
    }
}
