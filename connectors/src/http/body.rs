//! Request bodies: splitting NDJSON or a JSON array into records, decoding them with dead
//! letters for the bad ones (at most [`BadRecords`] of them per request), and the ingest-log
//! record of a request.

use std::ops::Range;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::json;
use sluice_engine::dead_letter::{DeadLetter, Stage};
use arrow::record_batch::RecordBatch;
use sluice_engine::decode::{Decoded, RecordDecoder, Rejected};

/// Default [`BadRecords::records`].
pub const DEFAULT_MAX_BAD_RECORDS: usize = 10_000;
/// Default [`BadRecords::bytes`].
pub const DEFAULT_MAX_BAD_BYTES: usize = 4 << 20;
/// Records decoded at a time when bad ones are bounded: decoding stops soon after the bound.
const DECODE_STEP: usize = 4096;

/// The most dead letters one request may make: past either bound the whole request is refused
/// (400) and nothing of it is logged, so garbage cannot cost more than this in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRecords {
    /// Records.
    pub records: usize,
    /// Bytes of the records' text.
    pub bytes: usize,
}

impl Default for BadRecords {
    fn default() -> Self {
        BadRecords {
            records: DEFAULT_MAX_BAD_RECORDS,
            bytes: DEFAULT_MAX_BAD_BYTES,
        }
    }
}

/// Why a body was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    /// The `reason` label of `sluice_http_refused_total`.
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Refusal {
    fn bad(reason: &'static str, message: String) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
            message,
        }
    }
}

/// A decoded body: the good records, and a dead letter per bad one.
pub(super) struct Body {
    pub(super) decoded: Decoded,
    pub(super) dead_letters: Vec<DeadLetter>,
    /// Bytes of the bad records' text (what the dead letters hold).
    pub(super) dead_bytes: usize,
}

/// Bytes a dead letter costs in memory beside its record's text and error: its strings and its
/// JSON position (a map node alone is over 600 bytes), rounded up.
const DEAD_LETTER_OVERHEAD: usize = 1024;
/// Bytes of dead letters charged to the budget at a time.
const CHARGE_STEP: u64 = 64 << 10;
/// Rejected records kept with their error for the answer (the rest are only dead letters).
pub(super) const REJECTED_KEPT: usize = 10;

/// Decodes a body's records a step of [`DECODE_STEP`] at a time, so that neither the records'
/// ranges nor the dead letters of a hostile body are ever held whole: a body past the limit is
/// refused as soon as a step shows it.
struct Steps<'a, 'c> {
    decoder: &'a RecordDecoder,
    source: &'a str,
    request_id: &'a str,
    principal: Option<&'a str>,
    limit: Option<BadRecords>,
    /// Takes the memory of the dead letters from a budget as they are made; false when full.
    charge: Option<&'c mut dyn FnMut(u64) -> bool>,
    parts: Vec<RecordBatch>,
    rejected: Vec<Rejected>,
    dead_letters: Vec<DeadLetter>,
    dead_bytes: usize,
    /// Records decoded so far (the index of the next one).
    seen: usize,
    /// Records rejected so far.
    bad: usize,
    /// Whether every rejected record so far is not JSON at all.
    all_syntax: bool,
}

impl Steps<'_, '_> {
    /// Decodes the records `ranges` of `buf` (the next ones of the body).
    fn step(&mut self, buf: &[u8], ranges: &[Range<usize>]) -> Result<(), Refusal> {
        if ranges.is_empty() {
            return Ok(());
        }
        let part = self.decoder.decode(buf, ranges).map_err(|e| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            reason: "internal",
            message: format!("decoding failed: {e}"),
        })?;
        let mut uncharged = 0u64;
        for r in part.rejected {
            let text = &buf[ranges[r.index].clone()];
            let index = self.seen + r.index;
            let cost = text.len() + r.error.len() + DEAD_LETTER_OVERHEAD;
            self.dead_bytes += cost;
            self.bad += 1;
            self.all_syntax &= r.syntax;
            // Checked per record: a refused body makes no more dead letters than the limit.
            if let Some(limit) = self.limit {
                if self.bad > limit.records || self.dead_bytes > limit.bytes {
                    return Err(self.too_many(&r.error));
                }
            }
            uncharged += cost as u64;
            if uncharged >= CHARGE_STEP {
                self.take(std::mem::take(&mut uncharged))?;
            }
            let raw = DeadLetter::raw_fields(text);
            self.dead_letters.push(DeadLetter {
                source: self.source.to_string(),
                position: json!({ "request_id": self.request_id, "record": index }),
                stage: Stage::Decode,
                error: r.error.clone(),
                raw: raw.0,
                raw_base64: raw.1,
                principal: self.principal.map(str::to_string),
            });
            if self.rejected.len() < REJECTED_KEPT {
                self.rejected.push(Rejected { index, ..r });
            }
        }
        // The decoded rows' memory is held too (a body of empty objects decodes to far more
        // than its own size).
        self.take(uncharged + part.batch.get_array_memory_size() as u64)?;
        self.seen += ranges.len();
        if part.batch.num_rows() > 0 {
            self.parts.push(part.batch);
        }
        Ok(())
    }

    /// Charges `bytes` of dead letters to the budget (when there is one).
    fn take(&mut self, bytes: u64) -> Result<(), Refusal> {
        let taken = match &mut self.charge {
            Some(charge) if bytes > 0 => charge(bytes),
            _ => true,
        };
        if taken {
            return Ok(());
        }
        Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: "bodies_in_flight",
            message: "too many request bodies (and their bad records) in flight; retry later".into(),
        })
    }

    fn too_many(&self, first: &str) -> Refusal {
        let limit = self.limit.unwrap_or_default();
        Refusal::bad(
            "too_many_bad_records",
            format!(
                "more than {} bad records or {} bytes of them in one request (the first: {}); nothing of it was accepted",
                limit.records,
                limit.bytes,
                self.rejected.first().map_or(first, |r| r.error.as_str())
            ),
        )
    }
}

/// Feeds the non-blank lines of NDJSON to `steps`, [`DECODE_STEP`] at a time.
fn ndjson_steps(body: &[u8], steps: &mut Steps<'_, '_>) -> Result<(), Refusal> {
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(DECODE_STEP);
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    for nl in ends {
        let mut end = nl;
        if end > start && body[end - 1] == b'\r' {
            end -= 1;
        }
        if body[start..end].iter().any(|b| !b.is_ascii_whitespace()) {
            ranges.push(start..end);
        }
        start = (nl + 1).min(body.len());
        if ranges.len() == DECODE_STEP {
            steps.step(body, &ranges)?;
            ranges.clear();
        }
    }
    steps.step(body, &ranges)
}

/// Feeds the elements of a JSON array to `steps`, [`DECODE_STEP`] at a time (each copied out,
/// one per line, into a buffer of the step only).
fn array_steps(body: &[u8], steps: &mut Steps<'_, '_>) -> Result<(), Refusal> {
    use serde::de::{DeserializeSeed, Error, SeqAccess, Visitor};

    struct Elements<'s, 'a, 'c> {
        steps: &'s mut Steps<'a, 'c>,
        refused: &'s mut Option<Refusal>,
    }
    impl<'de> Visitor<'de> for Elements<'_, '_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let (mut buf, mut ranges) = (Vec::new(), Vec::with_capacity(DECODE_STEP));
            while let Some(e) = seq.next_element::<&serde_json::value::RawValue>()? {
                let start = buf.len();
                buf.extend_from_slice(e.get().as_bytes());
                ranges.push(start..buf.len());
                buf.push(b'\n');
                if ranges.len() == DECODE_STEP {
                    if let Err(r) = self.steps.step(&buf, &ranges) {
                        *self.refused = Some(r);
                        return Err(A::Error::custom("refused"));
                    }
                    buf.clear();
                    ranges.clear();
                }
            }
            if let Err(r) = self.steps.step(&buf, &ranges) {
                *self.refused = Some(r);
                return Err(A::Error::custom("refused"));
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Elements<'_, '_, '_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    let mut refused = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Elements {
        steps,
        refused: &mut refused,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (refused, parsed) {
        (Some(r), _) => Err(r),
        (None, Err(e)) => Err(Refusal::bad("not_json", format!("body is not valid JSON: {e}"))),
        (None, Ok(())) => Ok(()),
    }
}

/// Decodes a body (NDJSON, or a JSON array of records); `Err` when it is not JSON at all, or
/// (with `limit`) has more bad records than the limit allows, found as soon as a step shows it,
/// or (with `charge`) when the budget cannot hold its dead letters. Records from the ingest log
/// are decoded without either (they were admitted already). `decoded.rejected` keeps the
/// first [`REJECTED_KEPT`] rejections; every one is in the dead letters.
pub(super) fn decode_body(
    decoder: &RecordDecoder,
    source: &str,
    request_id: &str,
    principal: Option<&str>,
    body: &[u8],
    limit: Option<BadRecords>,
    charge: Option<&mut dyn FnMut(u64) -> bool>,
) -> Result<Body, Refusal> {
    let mut steps = Steps {
        decoder,
        source,
        request_id,
        principal,
        limit,
        charge,
        parts: Vec::new(),
        rejected: Vec::new(),
        dead_letters: Vec::new(),
        dead_bytes: 0,
        seen: 0,
        bad: 0,
        all_syntax: true,
    };
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => array_steps(body, &mut steps)?,
        _ => ndjson_steps(body, &mut steps)?,
    }
    if steps.parts.is_empty() && !steps.rejected.is_empty() && steps.all_syntax {
        return Err(Refusal::bad(
            "not_json",
            format!("body is not JSON: {}", steps.rejected[0].error),
        ));
    }
    let batch = match steps.parts.len() {
        0 => RecordBatch::new_empty(decoder.schema().clone()),
        1 => steps.parts.swap_remove(0),
        _ => arrow::compute::concat_batches(decoder.schema(), &steps.parts).map_err(|e| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            reason: "internal",
            message: format!("decoding failed: {e}"),
        })?,
    };
    Ok(Body {
        decoded: Decoded {
            batch,
            rejected: steps.rejected,
        },
        dead_letters: steps.dead_letters,
        dead_bytes: steps.dead_bytes,
    })
}

/// The first byte of an ingest-log record written with a header: a request id is an HTTP
/// header value, which never holds a NUL, so records of the older form (`request_id \n body`)
/// are told apart.
const HEADER_MARK: u8 = 0;

/// The ingest-log record of a request, `NUL {"id":..,"principal":..} \n body`, as parts (the
/// body is not copied).
pub(super) fn log_record(request_id: &str, principal: Option<&str>, body: &Bytes) -> Vec<Bytes> {
    let mut head = vec![HEADER_MARK];
    // Serializing two strings cannot fail; JSON escapes any newline in them.
    let _ = serde_json::to_writer(&mut head, &json!({ "id": request_id, "principal": principal }));
    head.push(b'\n');
    vec![Bytes::from(head), body.clone()]
}

/// A record of the ingest log, read back.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct LogRecord<'a> {
    pub(super) request_id: String,
    pub(super) principal: Option<String>,
    pub(super) body: &'a [u8],
}

/// Reads a record written by [`log_record`] (or by versions before it, without a principal).
pub(super) fn parse_log_record(payload: &[u8]) -> LogRecord<'_> {
    let split = payload.iter().position(|b| *b == b'\n').unwrap_or(payload.len());
    let body = payload.get(split + 1..).unwrap_or_default();
    let head = &payload[..split];
    if head.first() == Some(&HEADER_MARK) {
        #[derive(serde::Deserialize)]
        struct Head {
            id: String,
            principal: Option<String>,
        }
        if let Ok(h) = serde_json::from_slice::<Head>(&head[1..]) {
            return LogRecord {
                request_id: h.id,
                principal: h.principal,
                body,
            };
        }
    }
    LogRecord {
        request_id: String::from_utf8_lossy(head).into_owned(),
        principal: None,
        body,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use sluice_engine::decode::Format;

    use super::*;

    #[test]
    fn log_records_carry_the_principal_and_old_ones_still_read() {
        let body = Bytes::from_static(b"{\"a\":1}\n{\"a\":2}");
        let rec: Vec<u8> = log_record("r-1\u{2028}", Some("orders\nevil"), &body).concat();
        let back = parse_log_record(&rec);
        assert_eq!(back.request_id, "r-1\u{2028}");
        assert_eq!(back.principal.as_deref(), Some("orders\nevil"));
        assert_eq!(back.body, &body[..]);
        let old = b"r-2\n{\"a\":1}";
        let back = parse_log_record(old);
        assert_eq!((back.request_id.as_str(), back.principal, back.body), ("r-2", None, &old[4..]));
    }

    #[test]
    fn bad_records_past_the_limit_refuse_the_request() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let decoder = RecordDecoder::new(Format::Json, schema);
        let limit = BadRecords { records: 100, bytes: 1 << 20 };
        let body = |bad: usize| {
            let mut b = String::from("{\"a\":1}\n");
            for _ in 0..bad {
                b.push_str("x\n");
            }
            b
        };
        let ok = decode_body(&decoder, "s", "r", Some("p"), body(100).as_bytes(), Some(limit), None).unwrap();
        assert_eq!((ok.decoded.batch.num_rows(), ok.dead_letters.len()), (1, 100));
        assert_eq!(ok.dead_letters[0].principal.as_deref(), Some("p"));
        assert_eq!(ok.dead_letters[99].position["record"], 100);
        assert!(ok.dead_bytes >= 100 * DEAD_LETTER_OVERHEAD);
        let refused = decode_body(&decoder, "s", "r", None, body(100_000).as_bytes(), Some(limit), None)
            .err()
            .unwrap();
        assert_eq!((refused.status, refused.reason), (StatusCode::BAD_REQUEST, "too_many_bad_records"));
        let bytes = BadRecords { records: 1000, bytes: 10 * DEAD_LETTER_OVERHEAD };
        // A full budget refuses with 429 as the dead letters are made.
        let mut room = 5 * DEAD_LETTER_OVERHEAD as u64;
        let mut charge = |n: u64| {
            let ok = n <= room;
            room = room.saturating_sub(n);
            ok
        };
        let e = decode_body(&decoder, "s", "r", None, body(100).as_bytes(), Some(limit), Some(&mut charge)).err().unwrap();
        assert_eq!((e.status, e.reason), (StatusCode::TOO_MANY_REQUESTS, "bodies_in_flight"));
        let e = decode_body(&decoder, "s", "r", None, body(11).as_bytes(), Some(bytes), None).err().unwrap();
        assert_eq!(e.reason, "too_many_bad_records");
        // A JSON array the same: its elements are records, refused at the limit too.
        let array = format!("[{{\"a\":1}}{}]", ",[]".repeat(100_000));
        let e = decode_body(&decoder, "s", "r", None, array.as_bytes(), Some(limit), None).err().unwrap();
        assert_eq!(e.reason, "too_many_bad_records");
        let array = format!("[{{\"a\":1}},{{\"a\":2}}{}]", ",{\"a\":\"x\"}".repeat(20_000));
        let all = decode_body(&decoder, "s", "r", None, array.as_bytes(), None, None).unwrap();
        assert_eq!((all.decoded.batch.num_rows(), all.dead_letters.len()), (2, 20_000));
        assert_eq!(all.dead_letters[0].position["record"], 2);
        assert!(decode_body(&decoder, "s", "r", None, b"[1, 2", None, None).is_err());
        // Without a limit (records from the log), everything decodes.
        let all = decode_body(&decoder, "s", "r", None, body(100_000).as_bytes(), None, None).unwrap();
        assert_eq!(all.dead_letters.len(), 100_000);
    }
}
