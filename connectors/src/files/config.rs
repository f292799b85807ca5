//! Options of the directory sources (`STORED AS NDJSON`, `STORED AS CSV`).

use std::path::PathBuf;
use std::time::Duration;

use sluice_sql::{OptionError, OptionSpec, Options, option_choice, option_duration};

/// Default `poll_interval`: how often the directory is listed when idle.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Bytes of an NDJSON file read (and decoded) at a time.
pub const READ_CHUNK_BYTES: usize = 4 << 20;

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
    let mut v = vec![OptionSpec {
        key: "poll_interval",
        doc: "how often to look for new files when idle, e.g. '500ms' (default 500ms)",
    }];
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
        })
    }
}
