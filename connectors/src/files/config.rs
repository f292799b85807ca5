//! Options of the directory sources (`STORED AS NDJSON`, `STORED AS CSV`).

use std::path::PathBuf;
use std::time::Duration;

use sluice_sql::{OptionError, OptionSpec, Options, parse_duration};

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
        let poll_interval = match options.get("poll_interval") {
            None => DEFAULT_POLL_INTERVAL,
            Some(v) => parse_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| OptionError {
                key: "poll_interval".into(),
                message: format!("poll_interval must be a duration such as '500ms', got '{v}'"),
            })?,
        };
        let has_header = match options.get("format.has_header").map(|s| s.to_ascii_lowercase()) {
            None => true,
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            Some(v) => {
                return Err(OptionError {
                    key: "format.has_header".into(),
                    message: format!("format.has_header is true or false, got '{v}'"),
                });
            }
        };
        let delimiter = match options.get("format.delimiter") {
            None => b',',
            Some(v) if v.len() == 1 => v.as_bytes()[0],
            Some(v) if v == "\\t" => b'\t',
            Some(v) => {
                return Err(OptionError {
                    key: "format.delimiter".into(),
                    message: format!("format.delimiter is one character, got '{v}'"),
                });
            }
        };
        Ok(DirSourceConfig {
            dir: PathBuf::from(path),
            poll_interval,
            has_header,
            delimiter,
        })
    }
}
