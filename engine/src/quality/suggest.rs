//! Suggested checks: `CREATE EXPECTATION` statements that a table's data so far satisfies,
//! read off its merged profile (never the data): completeness for columns that were never null,
//! ranges for numeric columns (the exact min and max, widened by a tenth of the span; the
//! profile's quantiles are shown beside them), allowed values for low-cardinality text (when
//! the frequent-values summary is exact), and a volume floor per batch. Every suggestion is
//! `ON VIOLATION WARN`: tighten the action once the check has proven itself.

use std::fmt::Write;

use crate::quality::report::{ColumnSummary, TableProfile};

/// Most distinct values an allowed-values check lists.
pub const MAX_ALLOWED_VALUES: usize = 20;

/// The suggestions for the sink side of `profile`, as pipeline-file text.
pub fn suggest(profile: &TableProfile) -> String {
    let mut out = String::new();
    let sink: Vec<&ColumnSummary> = profile.columns.iter().filter(|c| c.side == "sink").collect();
    let Some(table) = sink.first().map(|c| c.table.clone()) else {
        return "-- no committed profiles yet: run the pipeline first\n".to_string();
    };
    let _ = writeln!(out, "-- Suggested from {} committed epochs of \"{table}\"; each holds for the data so far.", profile.epochs);
    for c in &sink {
        let col = ident(&c.column);
        if c.rows > 0 && c.nulls == 0 {
            statement(&mut out, &table, &format!("{}_not_null", c.column), &format!("{col} IS NOT NULL"));
        }
        if let Some(range) = range(c) {
            let _ = writeln!(
                out,
                "-- {}: min {}, max {}, p50 {}, p99 {}",
                c.column,
                c.min.as_deref().unwrap_or("?"),
                c.max.as_deref().unwrap_or("?"),
                c.p50.map_or("?".into(), |v| format!("{v}")),
                c.p99.map_or("?".into(), |v| format!("{v}"))
            );
            statement(&mut out, &table, &format!("{}_range", c.column), &format!("{col} BETWEEN {range}"));
        }
        if let Some(values) = allowed(c) {
            statement(&mut out, &table, &format!("{}_values", c.column), &format!("{col} IN ({values})"));
        }
    }
    if let Some(min) = profile.min_batch_rows.filter(|n| *n > 0) {
        let floor = (min / 2).max(1);
        let _ = writeln!(out, "-- the smallest batch so far had {min} rows");
        statement(&mut out, &table, &format!("{table}_volume"), &format!("count(*) >= {floor}"));
    }
    out
}

fn statement(out: &mut String, table: &str, name: &str, check: &str) {
    let _ = writeln!(
        out,
        "CREATE EXPECTATION {} ON {} CHECK ({check}) ON VIOLATION WARN;",
        ident(&sanitize(name)),
        ident(table)
    );
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_ascii_lowercase() } else { '_' }).collect()
}

/// A name as an SQL identifier: bare when it is a plain lower-case word, else double-quoted.
fn ident(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { name.to_string() } else { format!("\"{}\"", name.replace('"', "\"\"")) }
}

/// `lo AND hi` for integer and float columns (not dates or timestamps).
fn range(c: &ColumnSummary) -> Option<String> {
    let t = c.data_type.as_str();
    let integer = matches!(t, "Int8" | "Int16" | "Int32" | "Int64" | "UInt8" | "UInt16" | "UInt32" | "UInt64");
    let float = matches!(t, "Float16" | "Float32" | "Float64") || t.starts_with("Decimal");
    if !(integer || float) || c.nan + c.infinite > 0 {
        return None;
    }
    let (lo, hi): (f64, f64) = (c.min.as_deref()?.parse().ok()?, c.max.as_deref()?.parse().ok()?);
    let margin = match hi - lo {
        span if span > 0.0 => span / 10.0,
        _ => (lo.abs() / 10.0).max(1.0),
    };
    let (lo, hi) = (lo - margin, hi + margin);
    Some(if integer {
        format!("{} AND {}", lo.floor() as i64, hi.ceil() as i64)
    } else {
        format!("{lo} AND {hi}")
    })
}

/// The quoted list of every value of a low-cardinality text column, when the frequent-values
/// summary holds all of them (as many values as the distinct count).
fn allowed(c: &ColumnSummary) -> Option<String> {
    let text = matches!(c.data_type.as_str(), "Utf8" | "LargeUtf8" | "Utf8View");
    if !text
        || c.top_values.is_empty()
        || c.top_values.len() > MAX_ALLOWED_VALUES
        || c.distinct != c.top_values.len() as u64
        || c.top_values.iter().any(|(v, _)| v.ends_with('…'))
    {
        return None;
    }
    if c.rows - c.nulls < 20 * c.top_values.len() as u64 {
        return None; // too few rows to call the set closed
    }
    let mut values: Vec<&str> = c.top_values.iter().map(|(v, _)| v.as_str()).collect();
    values.sort_unstable();
    Some(values.iter().map(|v| format!("'{}'", v.replace('\'', "''"))).collect::<Vec<_>>().join(", "))
}
