//! A source's event-time OPTIONS (DESIGN §3): which column carries event time, how far the
//! watermark trails the newest event, what happens to late rows, and deduplication. Parsed and
//! checked against the declared columns here, so `sluice validate` reports a wrong option with
//! its place in the file; the engine runs what [`EventTimeDef`] says.

use std::time::Duration;

use arrow::datatypes::{DataType, Schema};

use crate::catalog::{OptionError, OptionSpec, Options, option_choice, parse_duration};

/// What a late row (event time below the watermark) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePolicy {
    /// Dropped and counted (`'late' 'drop'`, the default).
    Drop,
    /// Sent to the dead letters with the watermark it missed (`'late' 'dead_letter'`).
    DeadLetter,
}

/// Deduplication by key within a time-to-live measured in event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupDef {
    /// The key columns (`'dedup.key' 'a, b'`).
    pub key: Vec<String>,
    /// A repeat whose event time is within this of the kept row's is dropped (`'dedup.ttl'`).
    pub ttl: Duration,
}

/// A source's event-time settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTimeDef {
    /// The declared TIMESTAMP column carrying event time (`'event_time'`).
    pub column: String,
    /// The watermark is the newest event time seen minus this (`'watermark.delay'`, default 0).
    pub delay: Duration,
    /// What late rows become (`'late'`).
    pub late: LatePolicy,
    /// The column whose values are the source's partitions (`'watermark.partition'`, e.g.
    /// `_kafka_partition`): the watermark is then the minimum over partitions.
    pub partition: Option<String>,
    /// A partition silent this long (wall clock) stops holding the watermark back
    /// (`'watermark.idle_timeout'`).
    pub idle_timeout: Option<Duration>,
    /// A row whose event time is further than this ahead of the clock is late instead of
    /// moving the watermark (`'watermark.max_ahead'`, default 1 day): one bad timestamp cannot
    /// close every window.
    pub max_ahead: Duration,
    /// Deduplication, when `'dedup.key'` is given.
    pub dedup: Option<DedupDef>,
}

/// The event-time OPTIONS keys every source accepts.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "event_time",
            doc: "the TIMESTAMP column carrying event time: enables watermarks, windows (GROUP BY date_bin) and dedup",
        },
        OptionSpec {
            key: "watermark.delay",
            doc: "how far the watermark trails the newest event time seen, e.g. '10s' (default 0s)",
        },
        OptionSpec {
            key: "watermark.partition",
            doc: "a column whose values are the source's partitions (e.g. _kafka_partition): the watermark is the minimum over partitions of each one's newest event time, minus the delay",
        },
        OptionSpec {
            key: "watermark.idle_timeout",
            doc: "with 'watermark.partition': a partition silent this long (wall clock) stops holding the watermark back, e.g. '30s' (default: never)",
        },
        OptionSpec {
            key: "watermark.max_ahead",
            doc: "a row whose event time is further than this ahead of the clock is treated as late and never moves the watermark, e.g. '1h' (default 1d)",
        },
        OptionSpec {
            key: "late",
            doc: "rows older than the watermark: 'drop' (default, counted) or 'dead_letter'",
        },
        OptionSpec {
            key: "dedup.key",
            doc: "comma-separated key columns: a repeat of a key within 'dedup.ttl' of event time is dropped and counted",
        },
        OptionSpec {
            key: "dedup.ttl",
            doc: "with 'dedup.key': how long (in event time) a key is remembered, e.g. '1h' (default 1h)",
        },
    ]
}

fn duration(options: &Options, key: &str, default: Duration, zero_ok: bool) -> Result<Duration, OptionError> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => parse_duration(v)
            .filter(|d| zero_ok || !d.is_zero())
            .ok_or_else(|| OptionError {
                key: key.into(),
                message: format!("{key} must be a duration such as '10s' or '1h', got '{v}'"),
            }),
    }
}

/// Reads the event-time options of a source declaring `schema`; `None` when it has none.
/// Names in `dedup.key` and `event_time` must be declared columns; `event_time` a TIMESTAMP.
pub fn from_options(options: &Options, schema: &Schema) -> Result<Option<EventTimeDef>, OptionError> {
    let Some(column) = options.get("event_time").map(|c| c.trim().to_string()) else {
        if let Some(key) = [
            "watermark.delay",
            "watermark.partition",
            "watermark.idle_timeout",
            "watermark.max_ahead",
            "late",
            "dedup.key",
            "dedup.ttl",
        ]
            .into_iter()
            .find(|k| options.contains_key(*k))
        {
            return Err(OptionError {
                key: key.into(),
                message: format!("{key} needs an event-time column"),
            });
        }
        return Ok(None);
    };
    let field = schema.field_with_name(&column).map_err(|_| OptionError {
        key: "event_time".into(),
        message: format!(
            "event_time names \"{column}\", which is not a declared column (columns: {})",
            names(schema)
        ),
    })?;
    if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
        return Err(OptionError {
            key: "event_time".into(),
            message: format!(
                "event_time column \"{column}\" is {}, not a TIMESTAMP",
                field.data_type()
            ),
        });
    }
    let delay = duration(options, "watermark.delay", Duration::ZERO, true)?;
    let late = option_choice(
        options,
        "late",
        LatePolicy::Drop,
        &[("drop", LatePolicy::Drop), ("dead_letter", LatePolicy::DeadLetter)],
    )?;
    let partition = options.get("watermark.partition").map(|c| c.trim().to_string());
    if let Some(p) = &partition
        && schema.field_with_name(p).is_err()
    {
        return Err(OptionError {
            key: "watermark.partition".into(),
            message: format!(
                "watermark.partition names \"{p}\", which is not a declared column (columns: {})",
                names(schema)
            ),
        });
    }
    let idle_timeout = match options.get("watermark.idle_timeout") {
        None => None,
        Some(_) if partition.is_none() => {
            return Err(OptionError {
                key: "watermark.idle_timeout".into(),
                message: "watermark.idle_timeout needs watermark.partition (a source without partitions is never partly idle)".into(),
            });
        }
        Some(_) => Some(duration(options, "watermark.idle_timeout", Duration::ZERO, false)?),
    };
    let max_ahead = duration(options, "watermark.max_ahead", Duration::from_secs(86_400), false)?;
    let dedup = match options.get("dedup.key") {
        None if options.contains_key("dedup.ttl") => {
            return Err(OptionError {
                key: "dedup.ttl".into(),
                message: "dedup.ttl needs dedup.key (the columns that identify a repeat)".into(),
            });
        }
        None => None,
        Some(v) => {
            let key: Vec<String> = v
                .split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect();
            if key.is_empty() {
                return Err(OptionError {
                    key: "dedup.key".into(),
                    message: "dedup.key names no column".into(),
                });
            }
            if let Some(bad) = key.iter().find(|k| schema.field_with_name(k).is_err()) {
                return Err(OptionError {
                    key: "dedup.key".into(),
                    message: format!(
                        "dedup.key names \"{bad}\", which is not a declared column (columns: {})",
                        names(schema)
                    ),
                });
            }
            let ttl = duration(options, "dedup.ttl", Duration::from_secs(3600), false)?;
            Some(DedupDef { key, ttl })
        }
    };
    Ok(Some(EventTimeDef {
        column,
        delay,
        late,
        partition,
        idle_timeout,
        max_ahead,
        dedup,
    }))
}

fn names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, TimeUnit};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        ])
    }

    fn opts(pairs: &[(&str, &str)]) -> Options {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_every_option() {
        let def = from_options(
            &opts(&[
                ("event_time", "ts"),
                ("watermark.delay", "10s"),
                ("late", "dead_letter"),
                ("dedup.key", "id"),
                ("dedup.ttl", "5m"),
            ]),
            &schema(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(def.delay, Duration::from_secs(10));
        assert_eq!(def.late, LatePolicy::DeadLetter);
        assert_eq!(def.dedup.unwrap().ttl, Duration::from_secs(300));
        assert_eq!(from_options(&opts(&[]), &schema()).unwrap(), None);
    }

    #[test]
    fn refuses_what_cannot_work() {
        let err = |pairs: &[(&str, &str)]| from_options(&opts(pairs), &schema()).unwrap_err();
        assert_eq!(err(&[("watermark.delay", "1s")]).key, "watermark.delay");
        assert!(err(&[("event_time", "tz")]).message.contains("columns: id, ts"));
        assert!(err(&[("event_time", "id")]).message.contains("not a TIMESTAMP"));
        assert_eq!(err(&[("event_time", "ts"), ("late", "keep")]).key, "late");
        assert!(err(&[("event_time", "ts"), ("dedup.key", "id, nope")]).message.contains("\"nope\""));
        assert_eq!(err(&[("event_time", "ts"), ("dedup.ttl", "1h")]).key, "dedup.ttl");
        assert_eq!(err(&[("event_time", "ts"), ("watermark.partition", "p")]).key, "watermark.partition");
        assert_eq!(err(&[("event_time", "ts"), ("watermark.idle_timeout", "5s")]).key, "watermark.idle_timeout");
        assert_eq!(err(&[("event_time", "ts"), ("dedup.key", "id"), ("dedup.ttl", "0s")]).key, "dedup.ttl");
    }
}
