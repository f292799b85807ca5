//! Dead letters: records that could not become output, kept with where they came from, the
//! stage that refused them and why, so they can be inspected and replayed.

use serde::{Deserialize, Serialize};

/// The stage of the pipeline that refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The record is not valid JSON / CSV, or does not fit the declared types.
    Decode,
    /// The pipeline's SELECT failed on the record (a cast, a division, a function error).
    Transform,
    /// The record (or its batch) failed an expectation whose action sends it here.
    Expectation,
    /// The record's event time was below the watermark (or missing), and the source's `late`
    /// option sends late rows here.
    Late,
}

impl Stage {
    /// The stage's name as used in metrics labels and files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Transform => "transform",
            Stage::Expectation => "expectation",
            Stage::Late => "late",
        }
    }
}

/// One refused record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The source table it came from.
    pub source: String,
    /// Where in the source (file and line, request and index, ...).
    pub position: serde_json::Value,
    /// Which stage refused it.
    pub stage: Stage,
    /// Why.
    pub error: String,
    /// The record as received, when it is valid UTF-8; otherwise a lossy copy (invalid bytes
    /// replaced) and the exact bytes are in `raw_base64`.
    pub raw: String,
    /// The record's exact bytes, base64 (standard alphabet), when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
    /// Who sent it, when the source knows (an HTTP request's token name or certificate subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

impl DeadLetter {
    /// The `raw` and `raw_base64` fields for a record's bytes: the text itself when it is
    /// UTF-8, else a lossy copy and the exact bytes in base64.
    pub fn raw_fields(bytes: &[u8]) -> (String, Option<String>) {
        use base64::Engine;
        match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_string(), None),
            Err(_) => (
                String::from_utf8_lossy(bytes).into_owned(),
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        }
    }
}

/// Encodes dead letters as NDJSON.
pub fn to_ndjson(letters: &[DeadLetter]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in letters {
        // Serializing plain strings and JSON values cannot fail.
        if let Ok(line) = serde_json::to_vec(l) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    out
}
