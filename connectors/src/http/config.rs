//! Options of the HTTP source.

use sluice_engine::connector::auth::{TokenHash, hash_token};
use sluice_sql::{OptionError, OptionSpec, Options, option_bytes, option_choice};

/// Default `log.segment_bytes`: ingest log segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// The path prefix every HTTP source's LOCATION starts with.
pub const PATH_PREFIX: &str = "/v1/sources/";
/// Default `max_body_bytes`: the largest request body accepted.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;
/// The largest `max_body_bytes` accepted: a body and its request id are one ingest-log record.
pub const MAX_BODY_BYTES: u64 = sluice_engine::ingest::wal::MAX_FRAME_BYTES as u64 - 4096;

/// The accepted OPTIONS keys.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "format",
            doc: "body format: 'json' (NDJSON or a JSON array; the only one)",
        },
        OptionSpec {
            key: "max_body_bytes",
            doc: "largest request body, e.g. '16MB' (default 16MB, at most 256MB less 4KB: one ingest-log record); larger gets 413",
        },
        OptionSpec {
            key: "log.segment_bytes",
            doc: "ingest log segment size, e.g. '64MB' (default 64MB)",
        },
        OptionSpec {
            key: "auth.token",
            doc: "a bearer token producers must send to this source (at least 16 characters; use '${ENV_VAR}' so it is not in the file); its requests are recorded as 'auth.token@<source>'",
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
    /// The source's own bearer token, hashed (the token itself is not kept).
    pub token: Option<TokenHash>,
}

/// Shortest `auth.token` accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

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
        option_choice(options, "format", (), &[("json", ())])?;
        let max_body_bytes = option_bytes(options, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)?;
        if max_body_bytes > MAX_BODY_BYTES {
            return Err(OptionError {
                key: "max_body_bytes".into(),
                message: format!(
                    "at most {MAX_BODY_BYTES} bytes: a request is one ingest-log record, and a record is at most {} bytes",
                    sluice_engine::ingest::wal::MAX_FRAME_BYTES
                ),
            });
        }
        Ok(HttpSourceConfig {
            endpoint,
            max_body_bytes,
            durable_ack: option_choice(options, "ack", true, &[("durable", true), ("written", false)])?,
            segment_bytes: option_bytes(options, "log.segment_bytes", DEFAULT_SEGMENT_BYTES)?,
            token: match options.get("auth.token") {
                None => None,
                Some(t) if t.chars().count() >= MIN_TOKEN_CHARS && !t.chars().any(char::is_whitespace) => Some(hash_token(t)),
                Some(_) => {
                    return Err(OptionError {
                        key: "auth.token".into(),
                        message: format!(
                            "a token must be at least {MIN_TOKEN_CHARS} characters without spaces (the value is not shown)"
                        ),
                    });
                }
            },
        })
    }
}
