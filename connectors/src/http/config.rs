//! Options of the HTTP source.

use sluice_sql::{OptionError, OptionSpec, Options, parse_bytes};

/// Default `log.segment_bytes`: ingest log segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Request ids remembered for de-duplicating retried requests.
pub const DEDUP_WINDOW: usize = 1_000_000;

/// The path prefix every HTTP source's LOCATION starts with.
pub const PATH_PREFIX: &str = "/v1/sources/";
/// Default `max_body_bytes`: the largest request body accepted.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;

/// The accepted OPTIONS keys.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "format",
            doc: "body format: 'json' (NDJSON or a JSON array; the only one)",
        },
        OptionSpec {
            key: "max_body_bytes",
            doc: "largest request body, e.g. '16MB' (default 16MB); larger gets 413",
        },
        OptionSpec {
            key: "log.segment_bytes",
            doc: "ingest log segment size, e.g. '64MB' (default 64MB)",
        },
        OptionSpec {
            key: "ack",
            doc: "'durable' (default): answer 200 once the ingest log is fsynced; 'written': once written, before fsync (faster; a power loss can lose acknowledged events)",
        },
    ]
}

/// The HTTP source's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSourceConfig {
    /// The `{name}` of `POST /v1/sources/{name}`.
    pub endpoint: String,
    /// Largest body accepted.
    pub max_body_bytes: u64,
    /// Whether acknowledgements wait for fsync.
    pub durable_ack: bool,
    /// Ingest log segment size.
    pub segment_bytes: u64,
}

impl HttpSourceConfig {
    /// Reads LOCATION and OPTIONS.
    pub fn new(options: &Options, location: &str) -> Result<Self, OptionError> {
        let endpoint = location
            .strip_prefix(PATH_PREFIX)
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| OptionError {
                key: "LOCATION".into(),
                message: format!("an HTTP source's LOCATION is '{PATH_PREFIX}<name>', got '{location}'"),
            })?
            .to_string();
        if let Some(f) = options.get("format")
            && !f.eq_ignore_ascii_case("json")
        {
            return Err(OptionError {
                key: "format".into(),
                message: format!("unsupported format '{f}'; the HTTP source takes 'json'"),
            });
        }
        let max_body_bytes = match options.get("max_body_bytes") {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(v) => parse_bytes(v).filter(|n| *n > 0).ok_or_else(|| OptionError {
                key: "max_body_bytes".into(),
                message: format!("max_body_bytes must be a size such as '16MB', got '{v}'"),
            })?,
        };
        let durable_ack = match options.get("ack").map(|s| s.to_ascii_lowercase()) {
            None => true,
            Some(v) if v == "durable" => true,
            Some(v) if v == "written" => false,
            Some(v) => {
                return Err(OptionError {
                    key: "ack".into(),
                    message: format!("ack is 'durable' or 'written', got '{v}'"),
                });
            }
        };
        let segment_bytes = match options.get("log.segment_bytes") {
            None => DEFAULT_SEGMENT_BYTES,
            Some(v) => parse_bytes(v).filter(|n| *n > 0).ok_or_else(|| OptionError {
                key: "log.segment_bytes".into(),
                message: format!("log.segment_bytes must be a size such as '64MB', got '{v}'"),
            })?,
        };
        Ok(HttpSourceConfig {
            endpoint,
            max_body_bytes,
            durable_ack,
            segment_bytes,
        })
    }
}
