//! Request bodies: splitting NDJSON or a JSON array into records, decoding them with dead
//! letters for the bad ones, and the ingest-log record of a request.

use std::borrow::Cow;
use std::ops::Range;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::json;
use sluice_engine::dead_letter::{DeadLetter, Stage};
use sluice_engine::decode::{Decoded, RecordDecoder, lines};

/// The records of a body: a buffer and the byte range of each record in it.
type Split<'a> = (Cow<'a, [u8]>, Vec<Range<usize>>);

/// Records of a body: the elements of a JSON array (copied out, one per line) or the non-blank
/// lines of NDJSON (the body itself).
pub(super) fn split_body(body: &[u8]) -> Result<Split<'_>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let elems: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
        let mut buf = Vec::with_capacity(body.len());
        let mut ranges = Vec::with_capacity(elems.len());
        for e in elems {
            let start = buf.len();
            buf.extend_from_slice(e.get().as_bytes());
            ranges.push(start..buf.len());
            buf.push(b'\n');
        }
        Ok((Cow::Owned(buf), ranges))
    } else {
        Ok((Cow::Borrowed(body), lines(body)))
    }
}

/// Decodes a body; `Err` when it is not JSON at all.
pub(super) fn decode_body(
    decoder: &RecordDecoder,
    source: &str,
    request_id: &str,
    body: &[u8],
) -> Result<(Decoded, Vec<DeadLetter>), (StatusCode, String)> {
    let (buf, ranges) = split_body(body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let decoded = decoder
        .decode(&buf, &ranges)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")))?;
    if decoded.batch.num_rows() == 0 && !decoded.rejected.is_empty() && decoded.rejected.iter().all(|r| r.syntax) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("body is not JSON: {}", decoded.rejected[0].error),
        ));
    }
    let dead = decoded
        .rejected
        .iter()
        .map(|r| (r, DeadLetter::raw_fields(&buf[ranges[r.index].clone()])))
        .map(|(r, raw)| DeadLetter {
            source: source.to_string(),
            position: json!({ "request_id": request_id, "record": r.index }),
            stage: Stage::Decode,
            error: r.error.clone(),
            raw: raw.0,
            raw_base64: raw.1,
        })
        .collect();
    Ok((decoded, dead))
}

/// The ingest-log record of a request, `request_id \n body`, as parts (the body is not copied).
pub(super) fn log_record(request_id: &str, body: &Bytes) -> Vec<Bytes> {
    vec![Bytes::from(format!("{request_id}\n")), body.clone()]
}
