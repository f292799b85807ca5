//! The fast NDJSON path: a decoder specialised to one declared schema, filling Arrow builders
//! directly (no tape, no per-batch field-name maps). A line goes first through the flat-object
//! scanner (`flat_scan`: one pass, no escapes, scalars only — what producers write);
//! a line it gives up on goes through the SIMD parser sonic-rs (escapes, nested values under
//! unknown keys, odd spacing).
//!
//! It is deliberately *partial*: it handles the common shapes exactly as arrow-json does and
//! hands everything else back. A record is either accepted here — and then its row is the one
//! arrow-json would produce — or **deferred**, and the caller decodes it with arrow-json, which
//! alone decides whether a record is bad and why. So dead-letter decisions and messages are
//! arrow-json's by construction; the differential tests in `decode.rs` check the rows.
//!
//! Rules that keep the two paths identical:
//! - numbers use the same parsers as arrow-json (`lexical-core`), on the number's own text;
//!   anything but a plain literal of the column's type (a string in a numeric column, `1.0` in
//!   an integer column) is deferred;
//! - a number or boolean in a text column is kept as its text (arrow-json's `coerce_primitive`);
//! - timestamps go through [`super::timestamp::parse_timestamp_nanos`] like the text path;
//! - the last of duplicate keys wins, unknown keys are skipped, a missing key is null;
//! - a missing or null value in a NOT NULL column, any nested value, anything after the
//!   object, invalid UTF-8, and every syntax error are deferred.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Builder, Int64Builder,
    LargeStringBuilder, PrimitiveArray, PrimitiveBuilder, StringBuilder, StringViewBuilder, UInt8Builder,
    UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{
    DataType, Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use sonic_rs::{JsonValueTrait, LazyValue};

use crate::decode::flat_scan::{Members, NotFlat, Token, scan_members};
use crate::decode::timestamp::{nanos_per, parse_timestamp_nanos_in};

/// What the fast path made of a set of records.
#[derive(Debug)]
pub struct FastDecoded {
    /// The accepted records as rows, with the declared schema.
    pub batch: RecordBatch,
    /// Input index of each row of `batch`, ascending.
    pub rows: Vec<usize>,
    /// Input indexes of the records left to arrow-json, ascending.
    pub deferred: Vec<usize>,
}

/// A decoder of JSON objects into one schema; built only for schemas it fully supports.
#[derive(Debug, Clone)]
pub struct FastJson {
    schema: SchemaRef,
    columns: Vec<Column>,
}

#[derive(Debug, Clone)]
struct Column {
    name: Box<str>,
    /// The name as the scanner may take it on sight (`None` when it needs escaping in JSON).
    plain: Option<Box<[u8]>>,
    kind: Kind,
    nullable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int(IntWidth),
    F32,
    F64,
    Text,
    /// Declared unit, and nanoseconds per unit of numeric input.
    Ts(TimeUnit, i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntWidth {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
}

/// One converted value, ready to append.
#[derive(Debug, Clone, Copy)]
enum Cell<'v> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    F64(f64),
    Text(&'v str),
    Ts(i64),
}

/// Why a value was handed back (the reason itself is arrow-json's to give).
struct Defer;

impl FastJson {
    /// A fast decoder for `schema`, or `None` when a column type is one it does not handle
    /// (the caller then uses arrow-json for everything).
    pub fn new(schema: &SchemaRef, epoch_nanos: i64) -> Option<FastJson> {
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let kind = match f.data_type() {
                    DataType::Boolean => Kind::Bool,
                    DataType::Int8 => Kind::Int(IntWidth::I8),
                    DataType::Int16 => Kind::Int(IntWidth::I16),
                    DataType::Int32 => Kind::Int(IntWidth::I32),
                    DataType::Int64 => Kind::Int(IntWidth::I64),
                    DataType::UInt8 => Kind::Int(IntWidth::U8),
                    DataType::UInt16 => Kind::Int(IntWidth::U16),
                    DataType::UInt32 => Kind::Int(IntWidth::U32),
                    DataType::UInt64 => Kind::Int(IntWidth::U64),
                    DataType::Float32 => Kind::F32,
                    DataType::Float64 => Kind::F64,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::Text,
                    DataType::Timestamp(unit, _) => Kind::Ts(*unit, epoch_nanos),
                    _ => return None,
                };
                let name = f.name().as_str();
                let plain = !name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
                Some(Column {
                    name: name.into(),
                    plain: plain.then(|| name.as_bytes().into()),
                    kind,
                    nullable: f.is_nullable(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FastJson {
            schema: schema.clone(),
            columns,
        })
    }

    /// Decodes the records `records` (byte ranges of `buf`, one JSON object each).
    pub fn decode(&self, buf: &[u8], records: &[Range<usize>]) -> Result<FastDecoded, ArrowError> {
        let whole = std::str::from_utf8(buf).ok();
        let mut builders: Vec<Builder> = self
            .schema
            .fields()
            .iter()
            .map(|f| Builder::new(f.data_type(), records.len()))
            .collect();
        let mut tokens: Vec<Option<Token<'_>>> = vec![None; self.columns.len()];
        let mut cells: Vec<Cell<'_>> = Vec::with_capacity(self.columns.len());
        let mut rows = Vec::with_capacity(records.len());
        let mut deferred = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let line = match whole {
                Some(s) => s.get(r.clone()),
                None => std::str::from_utf8(&buf[r.clone()]).ok(),
            };
            let ok = line.is_some_and(|line| {
                tokens.fill(None);
                cells.clear();
                // The scanner itself gives up on any escape, so no separate search for `\\`.
                if self.scan_flat(line, &mut tokens).is_ok() {
                    // The general parser would see the same values: no second try.
                    self.convert(&tokens, &mut cells).is_ok() && {
                        append(&mut builders, &cells);
                        true
                    }
                } else {
                    self.general_row(line, &mut builders).is_ok()
                }
            });
            if ok {
                rows.push(i);
            } else {
                deferred.push(i);
            }
        }
        let columns: Vec<ArrayRef> = builders
            .into_iter()
            .zip(self.schema.fields())
            .map(|(b, f)| b.finish(f.data_type()))
            .collect();
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok(FastDecoded { batch, rows, deferred })
    }

    /// The flat-object scanner's pass over one line: each known column's value in its slot.
    fn scan_flat<'a>(&self, line: &'a str, tokens: &mut [Option<Token<'a>>]) -> Result<(), NotFlat> {
        scan_members(
            line,
            &mut Slots {
                json: self,
                tokens,
                guess: 0,
            },
        )
    }

    /// A line the flat scanner gave up on (escapes, nested values, odd syntax), through sonic-rs.
    fn general_row(&self, line: &str, builders: &mut [Builder]) -> Result<(), Defer> {
        let mut slots: Vec<Option<LazyValue<'_>>> = vec![None; self.columns.len()];
        self.scan(line, &mut slots)?;
        let tokens = slots
            .iter()
            .map(|s| s.as_ref().map(token).transpose())
            .collect::<Result<Vec<_>, Defer>>()?;
        let mut cells = Vec::with_capacity(self.columns.len());
        self.convert(&tokens, &mut cells)?;
        append(builders, &cells);
        Ok(())
    }

    /// Parses one object with sonic-rs, leaving each known column's value in its slot.
    fn scan<'a>(&self, line: &'a str, slots: &mut [Option<LazyValue<'a>>]) -> Result<(), Defer> {
        if has_surrogate_escape(line.as_bytes()) {
            return Err(Defer);
        }
        let base = line.as_ptr() as usize;
        let mut end = None;
        let mut guess = 0usize;
        for item in sonic_rs::to_object_iter(line) {
            let (key, value) = item.map_err(|_| Defer)?;
            let raw = value.as_raw_str();
            let start = (raw.as_ptr() as usize).checked_sub(base).ok_or(Defer)?;
            end = Some(start + raw.len());
            if let Some(c) = self.column_of(&key, guess) {
                guess = c + 1;
                slots[c] = Some(value);
            }
        }
        // The iterator stops at the object's closing brace; nothing but blanks may follow.
        // (JSON whitespace only: `str::trim` would also take e.g. a vertical tab.)
        let blank = [' ', '\t', '\r', '\n'];
        let rest = match end {
            Some(e) => line.get(e..).ok_or(Defer)?,
            None => line.trim_start_matches(blank).strip_prefix('{').ok_or(Defer)?,
        };
        match rest.trim_matches(blank).strip_prefix('}') {
            Some("") => Ok(()),
            _ => Err(Defer),
        }
    }

    /// The column named `key`; producers write keys in a fixed order, so `guess` (the column
    /// after the last one found) is tried first.
    fn column_of(&self, key: &str, guess: usize) -> Option<usize> {
        match self.columns.get(guess) {
            Some(c) if *c.name == *key => Some(guess),
            _ => self.columns.iter().position(|c| *c.name == *key),
        }
    }

    /// Converts the values of one row into cells, or defers the whole row.
    fn convert<'v>(&self, tokens: &[Option<Token<'v>>], cells: &mut Vec<Cell<'v>>) -> Result<(), Defer> {
        for (col, token) in self.columns.iter().zip(tokens) {
            let cell = match token {
                None => Cell::Null,
                Some(t) => convert(col.kind, *t)?,
            };
            if matches!(cell, Cell::Null) && !col.nullable {
                return Err(Defer);
            }
            cells.push(cell);
        }
        Ok(())
    }
}

/// Where the flat scanner leaves one line's values. Producers write keys in a fixed order, so
/// the column after the last one found is the key expected next.
struct Slots<'j, 't, 'a> {
    json: &'j FastJson,
    tokens: &'t mut [Option<Token<'a>>],
    guess: usize,
}

impl<'a> Members<'a> for Slots<'_, '_, 'a> {
    fn hint(&self) -> Option<&[u8]> {
        self.json.columns.get(self.guess)?.plain.as_deref()
    }

    fn hinted(&mut self, value: Token<'a>) {
        self.tokens[self.guess] = Some(value);
        self.guess += 1;
    }

    fn member(&mut self, key: &'a str, value: Token<'a>) {
        if let Some(c) = self.json.column_of(key, self.guess) {
            self.guess = c + 1;
            self.tokens[c] = Some(value);
        }
    }
}

/// One row of cells onto the builders.
fn append(builders: &mut [Builder], cells: &[Cell<'_>]) {
    for (b, c) in builders.iter_mut().zip(cells) {
        b.append(*c);
    }
}

/// A sonic-rs value as a scalar token; nested values are deferred.
fn token<'v>(v: &'v LazyValue<'_>) -> Result<Token<'v>, Defer> {
    let raw = v.as_raw_str();
    match raw.as_bytes().first() {
        Some(b'n') => Ok(Token::Null),
        Some(b't' | b'f') => v.as_bool().map(Token::Bool).ok_or(Defer),
        Some(b'"') => v.as_str().map(Token::Str).ok_or(Defer),
        Some(b'-' | b'0'..=b'9') => Ok(Token::Num(raw)),
        _ => Err(Defer),
    }
}

/// True when the text holds a `\uD800`–`\uDFFF` escape anywhere: arrow-json checks that
/// surrogates pair up even in keys it skips, which the lazy parser does not look into.
fn has_surrogate_escape(line: &[u8]) -> bool {
    memchr::memchr_iter(b'\\', line)
        .any(|at| line.get(at + 1) == Some(&b'u') && matches!(line.get(at + 2), Some(b'd' | b'D')))
}

/// One value to one cell of `kind`, as arrow-json would read it.
fn convert(kind: Kind, t: Token<'_>) -> Result<Cell<'_>, Defer> {
    Ok(match (kind, t) {
        (_, Token::Null) => Cell::Null,
        (Kind::Bool, Token::Bool(b)) => Cell::Bool(b),
        (Kind::Int(w), Token::Num(n)) => int_cell(w, n.as_bytes())?,
        (Kind::F64, Token::Num(n)) => Cell::F64(lexical_core::parse::<f64>(n.as_bytes()).map_err(|_| Defer)?),
        (Kind::F32, Token::Num(n)) => Cell::F32(lexical_core::parse::<f32>(n.as_bytes()).map_err(|_| Defer)?),
        (Kind::Text, Token::Str(s) | Token::Num(s)) => Cell::Text(s),
        (Kind::Text, Token::Bool(b)) => Cell::Text(if b { "true" } else { "false" }),
        (Kind::Ts(unit, epoch), Token::Str(s) | Token::Num(s)) => Cell::Ts(
            parse_timestamp_nanos_in(s, epoch)
                .ok_or(Defer)?
                .div_euclid(nanos_per(unit)),
        ),
        _ => return Err(Defer),
    })
}

fn int_cell(w: IntWidth, s: &[u8]) -> Result<Cell<'static>, Defer> {
    let signed = |min: i64, max: i64| match lexical_core::parse::<i64>(s) {
        Ok(v) if (min..=max).contains(&v) => Ok(Cell::Int(v)),
        _ => Err(Defer),
    };
    let unsigned = |max: u64| match lexical_core::parse::<u64>(s) {
        Ok(v) if v <= max => Ok(Cell::UInt(v)),
        _ => Err(Defer),
    };
    match w {
        IntWidth::I8 => signed(i8::MIN.into(), i8::MAX.into()),
        IntWidth::I16 => signed(i16::MIN.into(), i16::MAX.into()),
        IntWidth::I32 => signed(i32::MIN.into(), i32::MAX.into()),
        IntWidth::I64 => signed(i64::MIN, i64::MAX),
        IntWidth::U8 => unsigned(u8::MAX.into()),
        IntWidth::U16 => unsigned(u16::MAX.into()),
        IntWidth::U32 => unsigned(u32::MAX.into()),
        IntWidth::U64 => unsigned(u64::MAX),
    }
}

/// An Arrow builder per supported column type.
enum Builder {
    Bool(BooleanBuilder),
    I8(Int8Builder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    U8(UInt8Builder),
    U16(UInt16Builder),
    U32(UInt32Builder),
    U64(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    LargeUtf8(LargeStringBuilder),
    View(StringViewBuilder),
    /// Timestamps are built as plain i64 and given their unit and zone at the end.
    Ts(Int64Builder),
}

impl Builder {
    fn new(t: &DataType, n: usize) -> Builder {
        match t {
            DataType::Boolean => Builder::Bool(BooleanBuilder::with_capacity(n)),
            DataType::Int8 => Builder::I8(PrimitiveBuilder::with_capacity(n)),
            DataType::Int16 => Builder::I16(PrimitiveBuilder::with_capacity(n)),
            DataType::Int32 => Builder::I32(PrimitiveBuilder::with_capacity(n)),
            DataType::UInt8 => Builder::U8(PrimitiveBuilder::with_capacity(n)),
            DataType::UInt16 => Builder::U16(PrimitiveBuilder::with_capacity(n)),
            DataType::UInt32 => Builder::U32(PrimitiveBuilder::with_capacity(n)),
            DataType::UInt64 => Builder::U64(PrimitiveBuilder::with_capacity(n)),
            DataType::Float32 => Builder::F32(PrimitiveBuilder::with_capacity(n)),
            DataType::Float64 => Builder::F64(PrimitiveBuilder::with_capacity(n)),
            DataType::Utf8 => Builder::Utf8(StringBuilder::with_capacity(n, n * 16)),
            DataType::LargeUtf8 => Builder::LargeUtf8(LargeStringBuilder::with_capacity(n, n * 16)),
            DataType::Utf8View => Builder::View(StringViewBuilder::with_capacity(n)),
            DataType::Timestamp(_, _) => Builder::Ts(PrimitiveBuilder::with_capacity(n)),
            // FastJson::new admits only the types above.
            _ => Builder::I64(PrimitiveBuilder::with_capacity(n)),
        }
    }

    /// Appends a cell; the cell's variant always matches the builder (both come from the
    /// column's type), and integer cells are range-checked when converted.
    fn append(&mut self, c: Cell<'_>) {
        macro_rules! int {
            ($b:expr, $t:ty) => {
                match c {
                    Cell::Int(v) => $b.append_option(<$t>::try_from(v).ok()),
                    Cell::UInt(v) => $b.append_option(<$t>::try_from(v).ok()),
                    _ => $b.append_null(),
                }
            };
        }
        match self {
            Builder::Bool(b) => b.append_option(if let Cell::Bool(v) = c { Some(v) } else { None }),
            Builder::I8(b) => int!(b, i8),
            Builder::I16(b) => int!(b, i16),
            Builder::I32(b) => int!(b, i32),
            Builder::I64(b) => int!(b, i64),
            Builder::U8(b) => int!(b, u8),
            Builder::U16(b) => int!(b, u16),
            Builder::U32(b) => int!(b, u32),
            Builder::U64(b) => int!(b, u64),
            Builder::F32(b) => b.append_option(if let Cell::F32(v) = c { Some(v) } else { None }),
            Builder::F64(b) => b.append_option(if let Cell::F64(v) = c { Some(v) } else { None }),
            Builder::Utf8(b) => b.append_option(if let Cell::Text(v) = c { Some(v) } else { None }),
            Builder::LargeUtf8(b) => b.append_option(if let Cell::Text(v) = c { Some(v) } else { None }),
            Builder::View(b) => b.append_option(if let Cell::Text(v) = c { Some(v) } else { None }),
            Builder::Ts(b) => b.append_option(if let Cell::Ts(v) = c { Some(v) } else { None }),
        }
    }

    fn finish(self, t: &DataType) -> ArrayRef {
        match self {
            Builder::Bool(mut b) => Arc::new(b.finish()),
            Builder::I8(mut b) => Arc::new(b.finish()),
            Builder::I16(mut b) => Arc::new(b.finish()),
            Builder::I32(mut b) => Arc::new(b.finish()),
            Builder::I64(mut b) => Arc::new(b.finish()),
            Builder::U8(mut b) => Arc::new(b.finish()),
            Builder::U16(mut b) => Arc::new(b.finish()),
            Builder::U32(mut b) => Arc::new(b.finish()),
            Builder::U64(mut b) => Arc::new(b.finish()),
            Builder::F32(mut b) => Arc::new(b.finish()),
            Builder::F64(mut b) => Arc::new(b.finish()),
            Builder::Utf8(mut b) => Arc::new(b.finish()),
            Builder::LargeUtf8(mut b) => Arc::new(b.finish()),
            Builder::View(mut b) => Arc::new(b.finish()),
            Builder::Ts(mut b) => {
                let (_, values, nulls) = b.finish().into_parts();
                let DataType::Timestamp(unit, tz) = t else {
                    return Arc::new(PrimitiveArray::<Int64Type>::new(values, nulls));
                };
                let tz = tz.clone();
                match unit {
                    TimeUnit::Second => {
                        Arc::new(PrimitiveArray::<TimestampSecondType>::new(values, nulls).with_timezone_opt(tz))
                    }
                    TimeUnit::Millisecond => {
                        Arc::new(PrimitiveArray::<TimestampMillisecondType>::new(values, nulls).with_timezone_opt(tz))
                    }
                    TimeUnit::Microsecond => {
                        Arc::new(PrimitiveArray::<TimestampMicrosecondType>::new(values, nulls).with_timezone_opt(tz))
                    }
                    TimeUnit::Nanosecond => {
                        Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(values, nulls).with_timezone_opt(tz))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{Field, Schema};

    /// Names longer than 16 bytes that share their first 16, names that are prefixes of each
    /// other, and keys at the very end of a line all find their own column.
    #[test]
    fn keys_find_their_columns() {
        let names = [
            "a",
            "ab",
            "abcdefgh",
            "abcdefghi",
            "sixteen_bytes_xx",
            "a_long_column_name_1",
            "a_long_column_name_2",
        ];
        let schema = Arc::new(Schema::new(
            names
                .iter()
                .map(|n| Field::new(*n, DataType::Int64, true))
                .collect::<Vec<_>>(),
        ));
        let fast = FastJson::new(&schema, 1_000_000).unwrap();
        let mut lines = Vec::new();
        for order in [names.to_vec(), names.iter().rev().copied().collect()] {
            let members: Vec<String> = order
                .iter()
                .map(|n| format!("\"{n}\":{}", names.iter().position(|m| m == n).unwrap_or(99)))
                .collect();
            lines.push(format!("{{{}}}", members.join(",")));
        }
        lines.push("{\"zz\":1,\"a\":0}".into());
        let buf = lines.join("\n");
        let records = crate::decode::lines(buf.as_bytes());
        let out = fast.decode(buf.as_bytes(), &records).unwrap();
        assert!(out.deferred.is_empty());
        for (i, _) in names.iter().enumerate() {
            let col: &Int64Array = out.batch.column(i).as_primitive();
            assert_eq!(col.value(0), i as i64);
            assert_eq!(col.value(1), i as i64);
        }
        assert_eq!(out.batch.column(0).as_primitive::<Int64Type>().value(2), 0);
        assert!(out.batch.column(1).is_null(2));
    }
}
