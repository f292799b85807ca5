//! Decoding raw records (NDJSON lines, JSON array elements, CSV rows) into Arrow record batches
//! with a declared schema. JSON goes first through the schema-specialised fast path
//! ([`crate::decode::fast`]: a flat-object scanner, then sonic-rs, filling Arrow builders), which
//! hands anything unusual to arrow-json; arrow-json and arrow-csv are the reference and decide every rejection. This module
//! adds what a pipeline needs on top:
//!
//! - **row-level dead letters**: a batch is decoded in one pass; when that fails, each record
//!   is decoded alone to find the bad ones, which are reported with their error while the good
//!   ones are decoded together — one bad line never sinks its neighbours;
//! - **timestamps** accept RFC 3339 strings and epoch milliseconds (JSON numbers or digit
//!   strings), whatever the declared unit;
//! - **lenient strings**: a JSON number or boolean in a VARCHAR column is kept as its text.
//!
//! Every record handed in comes out exactly once: as a row of the batch or as a [`Rejected`].

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, PrimitiveArray, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::error::{EngineError, Result};
use fast::FastJson;
pub use timestamp::{nanos_per, parse_timestamp_nanos};

pub mod fast;
mod flat_scan;
pub mod timestamp;

/// Records decoded per arrow decoder call: small enough that a bad record costs little
/// re-decoding, large enough that per-call overhead does not show.
pub const DECODE_BLOCK: usize = 4096;

/// The text formats a source can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per record.
    Json,
    /// Delimited text; the header (when present) is handled by the caller.
    Csv {
        /// Field delimiter.
        delimiter: u8,
    },
}

/// A record that could not be decoded: its index in the input and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the record in the slice given to [`RecordDecoder::decode`].
    pub index: usize,
    /// The decoder's message.
    pub error: String,
    /// True when the record is not syntactically valid (not JSON at all, broken CSV quoting).
    pub syntax: bool,
}

/// The outcome of decoding a set of records.
#[derive(Debug)]
pub struct Decoded {
    /// The good records as rows, in input order, with the declared schema.
    pub batch: RecordBatch,
    /// The bad records.
    pub rejected: Vec<Rejected>,
}

/// Decodes records of one format into batches of one declared schema.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    format: Format,
    /// The declared schema (what comes out).
    schema: SchemaRef,
    /// The schema handed to arrow: timestamp columns read as text, converted afterwards.
    raw_schema: SchemaRef,
    /// The schema-specialised JSON path, when the format is JSON and the schema allows it.
    fast: Option<FastJson>,
    /// Nanoseconds per unit of a numeric timestamp (`timestamp.unit`; milliseconds by default).
    epoch_nanos: i64,
    /// Longest record accepted (longer ones are rejected before any parser sees them).
    max_record_bytes: usize,
}

/// Default longest record a decoder accepts: 16 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 16 << 20;

impl RecordDecoder {
    /// A decoder producing `schema`.
    pub fn new(format: Format, schema: SchemaRef) -> Self {
        let raw_fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, _) => Field::new(f.name(), DataType::Utf8, f.is_nullable()),
                _ => f.as_ref().clone(),
            })
            .collect();
        let raw_schema = Arc::new(Schema::new(raw_fields));
        let epoch_nanos = nanos_per(timestamp::DEFAULT_EPOCH_UNIT);
        let fast = match format {
            Format::Json => FastJson::new(&schema, epoch_nanos),
            Format::Csv { .. } => None,
        };
        RecordDecoder {
            format,
            schema,
            raw_schema,
            fast,
            epoch_nanos,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }

    /// Rejects records longer than `bytes` before decoding them.
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// Why a record is refused before any parser sees it: too long, nested too deep, too many
    /// fields (bounds that keep a hostile record from costing more than its length).
    fn refuse(&self, text: &[u8]) -> Option<String> {
        if text.len() > self.max_record_bytes {
            return Some(format!(
                "record of {} bytes is longer than the limit of {} bytes",
                text.len(),
                self.max_record_bytes
            ));
        }
        if !matches!(self.format, Format::Json) {
            return None;
        }
        if nested_too_deep(text) {
            return Some(format!(
                "record is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
            ));
        }
        too_many_fields(text).then(|| format!("record has more than {MAX_JSON_FIELDS} fields"))
    }

    /// Reads numeric timestamps (integers since the epoch) in `unit` instead of milliseconds.
    pub fn with_epoch_unit(mut self, unit: TimeUnit) -> Self {
        self.epoch_nanos = nanos_per(unit);
        if self.fast.is_some() {
            self.fast = FastJson::new(&self.schema, self.epoch_nanos);
        }
        self
    }

    /// The same decoder with arrow-json doing all the work (the reference the fast path is
    /// tested and measured against).
    pub fn arrow_only(mut self) -> Self {
        self.fast = None;
        self
    }

    /// True when JSON records go through the schema-specialised path first.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The schema of the batches produced.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes the records `records` (byte ranges of `buf`), each to exactly one row or one
    /// [`Rejected`]: rows are matched to records one by one, never by count.
    ///
    /// Records are decoded in blocks of [`DECODE_BLOCK`]; a block that fails is bisected until
    /// each bad record stands alone, so good records are decoded about once whatever the mix.
    ///
    /// A record longer than the decoder's limit, or a JSON record nested deeper than
    /// [`MAX_JSON_DEPTH`] or with more than [`MAX_JSON_FIELDS`] fields, is rejected before any
    /// parser sees it (some recurse, and a line of brackets must not overflow the stack).
    pub fn decode(&self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let refused: Vec<(usize, String)> = (0..records.len())
            .filter_map(|i| self.refuse(&buf[records[i].clone()]).map(|why| (i, why)))
            .collect();
        if refused.is_empty() {
            return self.decode_records(buf, records);
        }
        let keep: Vec<usize> = (0..records.len())
            .filter(|i| refused.binary_search_by_key(i, |(j, _)| *j).is_err())
            .collect();
        let kept: Vec<Range<usize>> = keep.iter().map(|&i| records[i].clone()).collect();
        let mut out = self.decode_records(buf, &kept)?;
        for r in &mut out.rejected {
            r.index = keep[r.index];
        }
        out.rejected.extend(refused.into_iter().map(|(index, error)| Rejected {
            index,
            error,
            syntax: false,
        }));
        out.rejected.sort_by_key(|r| r.index);
        Ok(out)
    }

    fn decode_records(&self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        match &self.fast {
            Some(fast) => self.decode_fast(fast, buf, records),
            None => self.decode_arrow(buf, records),
        }
    }

    /// The fast path first; the records it defers go to arrow-json, which decides whether they
    /// are bad. Rows of both are merged back into input order.
    fn decode_fast(&self, fast: &FastJson, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let out = fast.decode(buf, records)?;
        if out.deferred.is_empty() {
            return Ok(Decoded {
                batch: out.batch,
                rejected: Vec::new(),
            });
        }
        let slow_records: Vec<Range<usize>> = out.deferred.iter().map(|&i| records[i].clone()).collect();
        let slow = self.decode_arrow(buf, &slow_records)?;
        let rejected: Vec<Rejected> = slow
            .rejected
            .into_iter()
            .map(|r| Rejected {
                index: out.deferred[r.index],
                ..r
            })
            .collect();
        if slow.batch.num_rows() == 0 {
            return Ok(Decoded {
                batch: out.batch,
                rejected,
            });
        }
        // Rows arrow-json accepted among the deferred (`rejected` is in input order), then both
        // row sets in input order.
        let slow_rows = out
            .deferred
            .iter()
            .filter(|i| rejected.binary_search_by_key(*i, |r| r.index).is_err());
        let mut by_input: Vec<(usize, (usize, usize))> = out
            .rows
            .iter()
            .enumerate()
            .map(|(k, &i)| (i, (0, k)))
            .chain(slow_rows.enumerate().map(|(k, &i)| (i, (1, k))))
            .collect();
        by_input.sort_unstable_by_key(|(i, _)| *i);
        let order: Vec<(usize, usize)> = by_input.into_iter().map(|(_, o)| o).collect();
        let batch = arrow::compute::interleave_record_batch(&[&out.batch, &slow.batch], &order)?;
        Ok(Decoded { batch, rejected })
    }

    /// arrow-json or arrow-csv over all records, in blocks with bisection.
    fn decode_arrow(&self, buf: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let mut parts: Vec<(usize, usize, RecordBatch)> = Vec::new();
        let mut rejected = Vec::new();
        let mut stack: Vec<(usize, usize)> = (0..records.len())
            .step_by(DECODE_BLOCK)
            .map(|lo| (lo, (lo + DECODE_BLOCK).min(records.len())))
            .rev()
            .collect();
        while let Some((lo, hi)) = stack.pop() {
            let n = hi - lo;
            match self.decode_raw(buf, &records[lo..hi]) {
                Ok(b) => parts.push((lo, hi, b)),
                Err(e) if n == 1 => rejected.push(Rejected {
                    index: lo,
                    syntax: e.syntax(),
                    error: e.to_string(),
                }),
                Err(_) => {
                    let mid = lo + n / 2;
                    stack.push((mid, hi));
                    stack.push((lo, mid));
                }
            }
        }
        // Blocks come off the stack in record order.
        let index: Vec<usize> = parts.iter().flat_map(|(lo, hi, _)| *lo..*hi).collect();
        let raw = arrow::compute::concat_batches(&self.raw_schema, parts.iter().map(|p| &p.2))?;
        let (batch, bad) = self.finish(raw)?;
        rejected.extend(bad.into_iter().map(|(j, error)| Rejected {
            index: index[j],
            error,
            syntax: false,
        }));
        rejected.sort_by_key(|r| r.index);
        Ok(Decoded { batch, rejected })
    }

    /// Runs arrow's decoder over `records`, one row per record: each record is fed alone
    /// (followed by a newline, so its error does not depend on where it sat in the input) and
    /// must complete exactly one row. Counting rows at the end is not enough: a record holding
    /// two values next to one split over two records decodes to the right number of rows.
    fn decode_raw(&self, buf: &[u8], records: &[Range<usize>]) -> Result<RecordBatch, RawError> {
        let batch_size = records.len() + 1;
        let mut out = Vec::new();
        match &self.format {
            Format::Json => {
                let mut d = arrow::json::ReaderBuilder::new(self.raw_schema.clone())
                    .with_coerce_primitive(true)
                    .with_batch_size(batch_size)
                    .build_decoder()?;
                for (i, r) in records.iter().enumerate() {
                    feed(&buf[r.clone()], |b| d.decode(b))?;
                    if d.has_partial_record() {
                        return Err(RawError::Values(0));
                    }
                    if d.len() != i + 1 {
                        return Err(RawError::Values(d.len().saturating_sub(i)));
                    }
                }
                out.extend(d.flush()?);
            }
            Format::Csv { delimiter } => {
                let mut d = arrow::csv::ReaderBuilder::new(self.raw_schema.clone())
                    .with_header(false)
                    .with_delimiter(*delimiter)
                    .with_batch_size(batch_size)
                    .build_decoder();
                for (i, r) in records.iter().enumerate() {
                    feed(&buf[r.clone()], |b| d.decode(b))?;
                    let rows = batch_size - d.capacity();
                    if rows != i + 1 {
                        return Err(RawError::Values(rows.saturating_sub(i)));
                    }
                }
                out.extend(d.flush()?);
            }
        }
        Ok(arrow::compute::concat_batches(&self.raw_schema, &out)?)
    }

    /// Converts text timestamps to the declared types. Returns the batch without the rows whose
    /// timestamps do not parse, and those rows' indexes (into `raw`) with the reason.
    fn finish(&self, raw: RecordBatch) -> Result<(RecordBatch, Vec<(usize, String)>)> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(raw.num_columns());
        let mut bad: Vec<(usize, String)> = Vec::new();
        for (field, col) in self.schema.fields().iter().zip(raw.columns()) {
            match field.data_type() {
                DataType::Timestamp(unit, tz) => {
                    let text = col
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .ok_or_else(|| EngineError::Internal("timestamp column not decoded as text".into()))?;
                    columns.push(parse_timestamps(
                        text,
                        *unit,
                        tz.clone(),
                        field.name(),
                        self.epoch_nanos,
                        &mut bad,
                    ));
                }
                _ => columns.push(col.clone()),
            }
        }
        if bad.is_empty() {
            return Ok((RecordBatch::try_new(self.schema.clone(), columns)?, bad));
        }
        // Bad timestamps became nulls, possibly in NOT NULL columns: build with a nullable
        // schema, drop the bad rows, then restore the declared schema.
        let loose = RecordBatch::try_new(nullable(&self.schema), columns)?;
        bad.sort_by_key(|(i, _)| *i);
        bad.dedup_by_key(|(i, _)| *i);
        let keep: BooleanArray = (0..loose.num_rows())
            .map(|i| Some(bad.binary_search_by_key(&i, |(j, _)| *j).is_err()))
            .collect();
        let kept = filter_record_batch(&loose, &keep)?;
        Ok((RecordBatch::try_new(self.schema.clone(), kept.columns().to_vec())?, bad))
    }
}

fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// Deepest nesting of arrays and objects a JSON record may have.
pub const MAX_JSON_DEPTH: usize = 32;

/// True when the JSON text nests arrays and objects deeper than [`MAX_JSON_DEPTH`]. A record
/// with no more opening brackets than that cannot, so most records cost one vectorised count.
pub fn nested_too_deep(text: &[u8]) -> bool {
    if memchr::memchr2_iter(b'[', b'{', text).take(MAX_JSON_DEPTH + 1).count() <= MAX_JSON_DEPTH {
        return false;
    }
    let mut depth = 0usize;
    any_outside_strings(text, |b| match b {
        b'[' | b'{' => {
            depth += 1;
            depth > MAX_JSON_DEPTH
        }
        b']' | b'}' => {
            depth = depth.saturating_sub(1);
            false
        }
        _ => false,
    })
}

/// True when `f` returns true for a byte of the JSON text outside its string literals (it is
/// called on each such byte, in order, until then).
fn any_outside_strings(text: &[u8], mut f: impl FnMut(u8) -> bool) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if f(b) {
            return true;
        }
    }
    false
}

/// Most fields (object members, at any depth) a JSON record may have.
pub const MAX_JSON_FIELDS: usize = 10_000;

/// True when the JSON text has more than [`MAX_JSON_FIELDS`] members (colons outside strings).
/// A record with no more colons than that cannot, so most records cost one vectorised count.
pub fn too_many_fields(text: &[u8]) -> bool {
    if memchr::memchr_iter(b':', text).take(MAX_JSON_FIELDS + 1).count() <= MAX_JSON_FIELDS {
        return false;
    }
    let mut fields = 0usize;
    any_outside_strings(text, |b| {
        fields += usize::from(b == b':');
        fields > MAX_JSON_FIELDS
    })
}

/// Hands `record` and then a newline to an arrow decoder that takes what it can per call.
fn feed(record: &[u8], mut decode: impl FnMut(&[u8]) -> Result<usize, ArrowError>) -> Result<(), ArrowError> {
    for mut part in [record, b"\n".as_slice()] {
        while !part.is_empty() {
            let n = decode(part)?;
            if n == 0 {
                return Err(ArrowError::ParseError("decoder stopped before the end of a record".into()));
            }
            part = &part[n..];
        }
    }
    Ok(())
}

/// Why a block of records did not decode one row per record.
#[derive(Debug)]
enum RawError {
    /// arrow-json or arrow-csv refused the input.
    Arrow(ArrowError),
    /// A record completed this many values instead of one.
    Values(usize),
}

impl From<ArrowError> for RawError {
    fn from(e: ArrowError) -> Self {
        RawError::Arrow(e)
    }
}

impl RawError {
    /// True when the record is not syntactically valid, as opposed to a value the schema refuses.
    fn syntax(&self) -> bool {
        let RawError::Arrow(e) = self else {
            return true;
        };
        let m = e.to_string();
        m.contains("Json error: Encountered unexpected")
            || m.contains("Json error: expected")
            || m.contains("Json error: Encountered truncated")
            || m.contains("Json error: Invalid")
            || m.contains("Json error: Unterminated")
            || m.contains("Csv error: incorrect number of fields")
    }
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Values(0) => f.write_str("record ends inside a value"),
            RawError::Values(n) => write!(f, "record holds {n} values, expected one"),
            RawError::Arrow(e) => {
                let m = e.to_string();
                let m = m
                    .strip_prefix("Json error: ")
                    .or_else(|| m.strip_prefix("Csv error: "))
                    .or_else(|| m.strip_prefix("Parser error: "))
                    .unwrap_or(&m);
                f.write_str(m)
            }
        }
    }
}

/// Parses timestamp text (RFC 3339 or epoch milliseconds) into `unit`; unparseable values are
/// reported in `bad` and become null.
fn parse_timestamps(
    text: &StringArray,
    unit: TimeUnit,
    tz: Option<Arc<str>>,
    column: &str,
    epoch_nanos: i64,
    bad: &mut Vec<(usize, String)>,
) -> ArrayRef {
    let nanos_per_unit = nanos_per(unit);
    let values = text.iter().enumerate().map(|(i, v)| {
        let v = v?;
        match timestamp::parse_timestamp_nanos_in(v, epoch_nanos) {
            Some(ns) => Some(ns.div_euclid(nanos_per_unit)),
            None => {
                bad.push((i, format!("column \"{column}\": cannot parse '{v}' as a timestamp (expected RFC 3339 or epoch milliseconds)")));
                None
            }
        }
    });
    match unit {
        TimeUnit::Second => Arc::new(PrimitiveArray::<TimestampSecondType>::from_iter(values).with_timezone_opt(tz)),
        TimeUnit::Millisecond => {
            Arc::new(PrimitiveArray::<TimestampMillisecondType>::from_iter(values).with_timezone_opt(tz))
        }
        TimeUnit::Microsecond => {
            Arc::new(PrimitiveArray::<TimestampMicrosecondType>::from_iter(values).with_timezone_opt(tz))
        }
        TimeUnit::Nanosecond => {
            Arc::new(PrimitiveArray::<TimestampNanosecondType>::from_iter(values).with_timezone_opt(tz))
        }
    }
}

/// Splits `buf` into its non-blank lines (without the newline, without a trailing `\r`).
pub fn lines(buf: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(buf.len() / 128);
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', buf) {
        push_line(buf, start, nl, &mut out);
        start = nl + 1;
    }
    push_line(buf, start, buf.len(), &mut out);
    out
}

fn push_line(buf: &[u8], start: usize, mut end: usize, out: &mut Vec<Range<usize>>) {
    if end > start && buf[end - 1] == b'\r' {
        end -= 1;
    }
    if buf[start..end].iter().any(|b| !b.is_ascii_whitespace()) {
        out.push(start..end);
    }
}

/// Splits CSV text into records (byte ranges, quoted newlines respected), skipping blank lines.
pub fn csv_records(buf: &[u8], delimiter: u8) -> Vec<Range<usize>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(buf);
    let mut rec = csv::ByteRecord::new();
    let mut out = Vec::new();
    let mut start = 0usize;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {
                let end = rdr.position().byte() as usize;
                let mut e = end.min(buf.len());
                while e > start && matches!(buf[e - 1], b'\n' | b'\r') {
                    e -= 1;
                }
                if buf[start..e].iter().any(|b| !b.is_ascii_whitespace()) {
                    out.push(start..e);
                }
                start = end;
            }
            Ok(false) => break,
            Err(_) => {
                // Unterminated quote: the rest is one (bad) record.
                if start < buf.len() {
                    out.push(start..buf.len());
                }
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampNanosecondArray};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
        ]))
    }

    // Reproducer for #12 (item 9): ~100k nested brackets overflowed the stack of a recursive
    // parser and aborted the process. Run on a thread with the stack tokio gives its workers and blocking
    // threads (2 MiB), through every tier and arrow alone, at the top level and inside an object.
    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let deep = |open: &str, close: &str, n: usize| format!("{}{}", open.repeat(n), close.repeat(n));
        let lines = [
            deep("[", "]", 100_000),
            format!("{{\"id\": 1, \"name\": {}}}", deep("[", "]", 100_000)),
            format!("{{\"id\": 1, \"x\": {}}}", deep("{\"a\":", "}", 50_000)),
            format!("{{\"id\": 2, \"x\": {}}}", deep("[", "]", MAX_JSON_DEPTH - 1)),
        ];
        let text = lines.join("\n");
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let buf = text.as_bytes();
                let recs = super::lines(buf);
                for decoder in [
                    RecordDecoder::new(Format::Json, schema()),
                    RecordDecoder::new(Format::Json, schema()).arrow_only(),
                ] {
                    let out = decoder.decode(buf, &recs).unwrap();
                    let errs: Vec<&str> = out.rejected.iter().map(|r| r.error.as_str()).collect();
                    assert_eq!(out.rejected.len(), 3, "{errs:?}");
                    assert!(errs.iter().all(|e| e.contains("nested deeper")), "{errs:?}");
                    // The line within the limit is decided by the decoder as usual.
                    assert_eq!(out.batch.num_rows(), 1);
                }
            })
            .unwrap();
        handle.join().expect("no stack overflow");
    }

    // Reproducer for #25: fields per object and record length were unbounded.
    #[test]
    fn too_many_fields_and_too_long_records_are_rejected_before_parsing() {
        let wide: String = (0..MAX_JSON_FIELDS + 1).map(|i| format!("\"f{i}\":1,")).collect();
        let colons_in_strings = format!("{{\"id\": 3, \"s\": \"{}\"}}", ":".repeat(MAX_JSON_FIELDS * 2));
        let lines = [
            format!("{{{wide}\"id\": 1}}"),
            format!("{{\"id\": 2, \"name\": \"{}\"}}", "y".repeat(300)),
            colons_in_strings,
        ];
        let text = lines.join("\n");
        let buf = text.as_bytes();
        let recs = super::lines(buf);
        let decoder = RecordDecoder::new(Format::Json, schema()).with_max_record_bytes(200_000);
        let out = decoder.decode(buf, &recs).unwrap();
        let errs: Vec<(usize, &str)> = out.rejected.iter().map(|r| (r.index, r.error.as_str())).collect();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].1.contains("more than 10000 fields"), "{errs:?}");
        assert_eq!(out.batch.num_rows(), 2, "colons inside strings are not fields");
        let short = RecordDecoder::new(Format::Json, schema()).with_max_record_bytes(100);
        let out = short.decode(buf, &recs).unwrap();
        assert_eq!(out.rejected.len(), 3);
        assert!(out.rejected[1].error.contains("longer than the limit of 100 bytes"), "{:?}", out.rejected);
    }

    // Reproducer for #12 (item 12): a numeric timestamp was always read as epoch milliseconds.
    #[test]
    fn numeric_timestamps_take_the_source_unit() {
        let buf = b"{\"id\": 1, \"ts\": 1700000000}\n{\"id\": 2, \"ts\": \"1700000001\"}\n{\"id\": 3, \"ts\": \"2023-11-14T22:13:20Z\"}\n";
        let recs = lines(buf);
        for (unit, per) in [
            (None, 1_000_000i64),
            (Some(TimeUnit::Second), 1_000_000_000),
            (Some(TimeUnit::Microsecond), 1_000),
        ] {
            for fast in [true, false] {
                let mut d = RecordDecoder::new(Format::Json, schema());
                if let Some(u) = unit {
                    d = d.with_epoch_unit(u);
                }
                if !fast {
                    d = d.arrow_only();
                }
                let out = d.decode(buf, &recs).unwrap();
                assert!(out.rejected.is_empty(), "{:?}", out.rejected);
                let ts = out
                    .batch
                    .column(2)
                    .as_any()
                    .downcast_ref::<TimestampNanosecondArray>()
                    .unwrap();
                assert_eq!(ts.value(0), 1_700_000_000 * per, "{unit:?} fast={fast}");
                assert_eq!(ts.value(1), 1_700_000_001 * per, "{unit:?} fast={fast}");
                assert_eq!(
                    ts.value(2),
                    1_700_000_000 * 1_000_000_000,
                    "text is RFC 3339 whatever the unit"
                );
            }
        }
    }

    #[test]
    fn good_json_takes_the_fast_path() {
        let buf = b"{\"id\":1,\"name\":\"a\",\"ts\":\"2025-11-22T10:00:00Z\"}\n\n{\"id\":2,\"name\":7,\"ts\":1763805600000}\n";
        let d = RecordDecoder::new(Format::Json, schema());
        let out = d.decode(buf, &lines(buf)).unwrap();
        assert!(out.rejected.is_empty());
        assert_eq!(out.batch.num_rows(), 2);
        let ts = out
            .batch
            .column(2)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .unwrap();
        assert_eq!(ts.value(0), 1_763_805_600_000_000_000);
        assert_eq!(ts.value(1), 1_763_805_600_000_000_000);
        let names = out.batch.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(names.value(1), "7");
    }

    #[test]
    fn bad_records_are_isolated() {
        let buf =
            b"{\"id\":1}\nnot json\n{\"id\":\"x\"}\n{\"name\":\"no id\"}\n{\"id\":5,\"ts\":\"yesterday\"}\n{\"id\":6}";
        let d = RecordDecoder::new(Format::Json, schema());
        let out = d.decode(buf, &lines(buf)).unwrap();
        let ids = out.batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(ids.values().to_vec(), vec![1, 6]);
        let idx: Vec<usize> = out.rejected.iter().map(|r| r.index).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert!(out.rejected[0].syntax, "{:?}", out.rejected[0]);
        assert!(!out.rejected[1].syntax);
        assert!(out.rejected[3].error.contains("yesterday"));
    }

    // Rows are matched to records one by one, not by count: a line holding two objects next to
    // a value split over two lines decodes to as many rows as records, yet every one is bad.
    #[test]
    fn rows_are_aligned_with_records_not_counted() {
        let buf = b"{\"id\":1} {\"id\":2}\n{\"id\":\n3}\n{\"id\":4}\n";
        for d in [
            RecordDecoder::new(Format::Json, schema()),
            RecordDecoder::new(Format::Json, schema()).arrow_only(),
        ] {
            let out = d.decode(buf, &lines(buf)).unwrap();
            let ids = out.batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            assert_eq!(ids.values().to_vec(), vec![4], "{:?}", out.rejected);
            let idx: Vec<usize> = out.rejected.iter().map(|r| r.index).collect();
            assert_eq!(idx, vec![0, 1, 2]);
            assert!(out.rejected[0].error.contains("holds 2 values"), "{:?}", out.rejected[0]);
            assert!(out.rejected.iter().all(|r| r.syntax), "{:?}", out.rejected);
        }
    }

    #[test]
    fn csv_records_respect_quotes() {
        let buf = b"1,\"a\nb\",2026-01-01T00:00:00Z\n\n2,c,0\n3,d,bad\n";
        let recs = csv_records(buf, b',');
        assert_eq!(recs.len(), 3);
        let d = RecordDecoder::new(Format::Csv { delimiter: b',' }, schema());
        let out = d.decode(buf, &recs).unwrap();
        assert_eq!(out.batch.num_rows(), 2);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].index, 2);
    }

    // Randomised check of block decoding + bisection against the known answer.
    #[test]
    fn bisection_finds_exactly_the_bad_records() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut buf = Vec::new();
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for i in 0..10_000i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let line = match x % 300 {
                0 => "{\"id\": oops".to_string(),
                1 => format!("{{\"id\": {i}, \"ts\": \"not a time\"}}"),
                2 => format!("{{\"name\": \"no id {i}\"}}"),
                _ => format!("{{\"id\": {i}, \"name\": \"n{i}\", \"ts\": {i}}}"),
            };
            if x % 300 < 3 {
                bad.push(i as usize)
            } else {
                good.push(i)
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        let out = RecordDecoder::new(Format::Json, schema())
            .decode(&buf, &lines(&buf))
            .unwrap();
        assert_eq!(out.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), bad);
        let ids = out.batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(ids.values().to_vec(), good);
        assert!(bad.len() > 50);
    }
}

/// The fast JSON path against arrow-json alone: for any input, the same rows, the same
/// rejected records and the same reasons.
#[cfg(test)]
mod differential {
    use super::*;

    /// Values as JSON text: plain ones of every type, and the edge cases where two JSON
    /// readers are likely to disagree.
    const VALUES: &[&str] = &[
        "0",
        "-0",
        "1",
        "-1",
        "42",
        "01",
        "1.0",
        "1.5",
        "-2.25",
        "1e2",
        "1E400",
        "-1e-400",
        "127",
        "128",
        "255",
        "256",
        "-129",
        "32768",
        "2147483648",
        "4294967296",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "true",
        "false",
        "null",
        "\"x\"",
        "\"\"",
        "\"1\"",
        "\"1.5\"",
        "\"true\"",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
        "\"é\"",
        "\"\\ud83d\\ude00\"",
        "\"\\ud800\"",
        "\"\\udc00x\"",
        "\"\\ud800\\u0041\"",
        "\"tab\\there\"",
        "\"a\tb\"",
        "\"\\x\"",
        "\"\\/\"",
        "[1]",
        "[]",
        "{\"a\":1}",
        "{}",
        "\"2025-11-22T10:00:00Z\"",
        "\"2025-11-22T10:00:00.123456789+02:00\"",
        "\"2025-11-22 10:00:00\"",
        "\"2025-11-22\"",
        "\"1763805600000\"",
        "1763805600000",
        "-5",
        "\"yesterday\"",
        "NaN",
        "Infinity",
        ".5",
        "+1",
        "1.",
        "-",
        "\" 12 \"",
        "\"-17\"",
        "1763805600000.5",
        "tru",
        "nul",
        "1e+2",
        "1E-2",
        "-0.0",
        "0e0",
        "00",
        "-01",
        "1.e1",
        "\"a\u{1}b\"",
        "\"a\u{7f}b\"",
        "\"\\u0000\"",
        "\"2025-11-22T10:00:00.1234567891Z\"",
        "\"2025-02-29T10:00:00Z\"",
        "\"2024-02-29T23:59:60Z\"",
        "\"2025-11-22T10:00:00-23:59\"",
        "\"2025-11-22T10:00:00+24:00\"",
        "\"2025-11-22T10:00:00.5+01:30\"",
        "\"1600-01-01T00:00:00Z\"",
        "\"2262-04-12T00:00:00Z\"",
        "\" 2025-11-22T10:00:00Z \"",
    ];

    /// Whole lines that are not (only) one object.
    const LINES: &[&str] = &[
        "not json",
        "{",
        "}",
        "{}",
        "{}}",
        "{} {}",
        "{\"id\":1} {\"id\":2}",
        "{\"id\":1},",
        "[{\"id\":1}]",
        "1",
        "\"s\"",
        "null",
        "{\"id\":1,}",
        "{\"id\" 1}",
        "{id:1}",
        "{\"id\":1",
        "\u{feff}{\"id\":1}",
        "  {\"id\":3}  ",
        "{\"i\\u0064\":4}",
        "{\"id\":5}x",
        "{\"id\":6}\t",
        "{\"id\":7,\"id\":8}",
        "{\"id\":null,\"id\":9}",
        "{ }",
        "{\"id\":10 }",
        "{\"id\" : 11 , \"ts\" : 0 }",
        "{\"id\":12,\"ts\":0,\"x\":\"\\\\\"}",
        "{\"id\":13,\"ts\":0}\u{b}",
        "\u{b}{\"id\":13,\"ts\":0}",
        "{\"id\":13,\u{c}\"ts\":0}",
        "{\"id\":13,\"ts\":0}\u{a0}",
        "{\"id\":14,\"ts\":0,\"s\":truefalse}",
        "{\"id\":15,\"ts\":0,\"s\":nullx}",
        "{\"id\":16,\"ts\":0,\"f64\":1e5x}",
    ];

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("i32", DataType::Int32, true),
            Field::new("u8", DataType::UInt8, true),
            Field::new("u64", DataType::UInt64, true),
            Field::new("f64", DataType::Float64, true),
            Field::new("f32", DataType::Float32, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("v", DataType::Utf8View, true),
            Field::new("l", DataType::LargeUtf8, true),
            Field::new(
                "tms",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        ]))
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len())]
        }
    }

    /// A plausible value for a column, or (sometimes) any value at all.
    fn value(rng: &mut Rng, t: &DataType, i: usize) -> String {
        if rng.below(40) == 0 {
            return rng.pick(VALUES).to_string();
        }
        match t {
            DataType::Boolean => ["true", "false"][rng.below(2)].to_string(),
            DataType::Float64 | DataType::Float32 => format!("{}.{}", i % 1000, rng.below(100)),
            DataType::Timestamp(_, _) if rng.below(2) == 0 => format!("{}", 1_763_805_600_000u64 + i as u64),
            DataType::Timestamp(_, _) => format!("\"2025-11-{:02}T10:{:02}:00Z\"", 1 + i % 28, i % 60),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => format!("\"text-{i}-{}\"", rng.below(1000)),
            DataType::UInt8 => format!("{}", i % 256),
            DataType::UInt64 => format!("{}", i),
            _ => format!("{}", i as i64 - 500),
        }
    }

    fn line(rng: &mut Rng, schema: &Schema, i: usize) -> Vec<u8> {
        match rng.below(40) {
            0 => return rng.pick(LINES).as_bytes().to_vec(),
            1 => return b"{\"id\":1,\"s\":\"\xff\xfe\",\"ts\":0}".to_vec(),
            _ => {}
        }
        let mut fields: Vec<String> = Vec::new();
        for f in schema.fields() {
            match rng.below(60) {
                0 => continue,
                1 => fields.push(format!("\"{}\":{}", f.name(), rng.pick(VALUES))),
                _ => fields.push(format!("\"{}\":{}", f.name(), value(rng, f.data_type(), i))),
            }
        }
        match rng.below(12) {
            0 => fields.push(format!("\"extra\":{}", rng.pick(VALUES))),
            1 => fields.push("\"nested\":{\"a\":[1,{\"b\":null}],\"c\":\"}\"}".into()),
            2 if !fields.is_empty() => {
                let dup = fields[rng.below(fields.len())].clone();
                fields.push(dup.split(':').next().unwrap_or("\"id\"").to_string() + ":" + rng.pick(VALUES));
            }
            3 => fields.reverse(),
            _ => {}
        }
        let sep = [",", ", ", " ,\t"][rng.below(3)];
        let mut out = format!("{{{}}}", fields.join(sep));
        if rng.below(20) == 0 {
            out = format!(" {out} ");
        }
        out.into_bytes()
    }

    /// Asserts both decoders rejected the same records with the same errors, naming the first
    /// record where they differ.
    fn same_rejects(buf: &[u8], records: &[Range<usize>], a: &Decoded, b: &Decoded) {
        let text = |i: usize| String::from_utf8_lossy(&buf[records[i].clone()]).into_owned();
        for k in 0..a.rejected.len().max(b.rejected.len()) {
            let (r, s) = (a.rejected.get(k), b.rejected.get(k));
            if r != s {
                let at = r.into_iter().chain(s).map(|x| x.index).min().unwrap_or(0);
                panic!(
                    "rejects differ at record {at} `{}`:\n fast:  {r:?}\n arrow: {s:?}",
                    text(at)
                );
            }
        }
    }

    /// Asserts both batches are equal, naming the first row that differs.
    fn same_rows(a: &Decoded, b: &Decoded) {
        assert_eq!(a.batch.schema(), b.batch.schema());
        for row in 0..a.batch.num_rows().min(b.batch.num_rows()) {
            let (x, y) = (a.batch.slice(row, 1), b.batch.slice(row, 1));
            if x != y {
                panic!(
                    "row {row} differs:\n fast:  {}\n arrow: {}",
                    arrow::util::pretty::pretty_format_batches(&[x])
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    arrow::util::pretty::pretty_format_batches(&[y])
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                );
            }
        }
        assert_eq!(a.batch.num_rows(), b.batch.num_rows());
    }

    #[test]
    fn fast_path_matches_arrow_json() {
        let schema = schema();
        let fast = RecordDecoder::new(Format::Json, schema.clone());
        assert!(fast.has_fast_path());
        let slow = fast.clone().arrow_only();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for round in 0..12 {
            let mut buf = Vec::new();
            for i in 0..2_000 {
                buf.extend(line(&mut rng, &schema, round * 10_000 + i));
                buf.push(b'\n');
            }
            let records = lines(&buf);
            let a = fast.decode(&buf, &records).unwrap();
            let b = slow.decode(&buf, &records).unwrap();
            same_rejects(&buf, &records, &a, &b);
            same_rows(&a, &b);
            let direct = fast
                .fast
                .as_ref()
                .map(|f| f.decode(&buf, &records).unwrap().rows.len())
                .unwrap_or(0);
            assert!(
                direct > 1_000,
                "round {round}: most good records take the fast path, {direct} did"
            );
            assert!(
                a.batch.num_rows() > 1_000,
                "round {round}: the mix must be mostly good records, {} of 2000",
                a.batch.num_rows()
            );
            assert!(b.rejected.len() > 100, "round {round}: and have bad ones");
            compared += records.len();
        }
        assert_eq!(compared, 24_000);
    }

    #[test]
    fn every_edge_value_in_every_column_matches() {
        let schema = schema();
        let fast = RecordDecoder::new(Format::Json, schema.clone());
        let slow = fast.clone().arrow_only();
        let mut buf = Vec::new();
        for f in schema.fields() {
            for v in VALUES {
                buf.extend(format!("{{\"id\":1,\"ts\":0,\"{}\":{v}}}\n", f.name()).into_bytes());
            }
        }
        for l in LINES {
            buf.extend(l.as_bytes());
            buf.push(b'\n');
        }
        let records = lines(&buf);
        let (a, b) = (
            fast.decode(&buf, &records).unwrap(),
            slow.decode(&buf, &records).unwrap(),
        );
        same_rejects(&buf, &records, &a, &b);
        same_rows(&a, &b);
    }
}
