//! Options of the Parquet sink.

use std::str::FromStr;

use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sluice_sql::{OptionError, OptionSpec, Options, option_choice};

/// Default zstd level for `compression` = `zstd` (fast, and much smaller than snappy).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// The default codec: zstd at [`DEFAULT_ZSTD_LEVEL`].
pub fn default_compression() -> Compression {
    Compression::ZSTD(ZstdLevel::try_new(DEFAULT_ZSTD_LEVEL).unwrap_or_default())
}

/// Default cap on a column chunk's dictionary, in bytes. Past it the column falls back to plain
/// encoding for the rest of the chunk. arrow-rs's own default (1 MiB) makes a column of unique
/// ids or timestamps intern ~130k values before giving up; a small cap keeps dictionaries for
/// the columns they help (codes, countries, statuses) and measured 25–35% faster encoding and
/// 25% smaller files on the order stream (BENCHMARKS.md, "encode only").
pub const DEFAULT_DICTIONARY_PAGE_LIMIT: usize = 16 * 1024;

/// The accepted OPTIONS keys.
pub fn option_specs() -> Vec<OptionSpec> {
    let mut specs = sluice_engine::connector::options::archive_option_specs();
    specs.extend(sluice_engine::store::option_specs());
    specs.extend([
        OptionSpec {
            key: "compression",
            doc: "Parquet codec: zstd, zstd(N), snappy, lz4, uncompressed (default zstd, level 1)",
        },
        OptionSpec {
            key: "timestamp_precision",
            doc: "how timestamps are stored: 'micros' (default: every reader reads them, Spark included) or 'nanos' (exact, but Spark and older readers refuse INT64 TIMESTAMP(NANOS))",
        },
        OptionSpec {
            key: "quality.profile",
            doc: "'on' (default): profile every epoch into _sluice/quality/profiles/, the sink's columns fully and the source's exact figures (rows, nulls, min, max, lengths); 'full': the source's columns fully too; 'off': no profiles (expectations still run)",
        },
        OptionSpec {
            key: "quality.window",
            doc: "how far back the drift baseline reaches (default 1h; at most 1000 batches)",
        },
        OptionSpec {
            key: "quality.threshold",
            doc: "robust score (scaled MADs from the baseline's median) above which a batch's metric is an anomaly (default 4)",
        },
        OptionSpec {
            key: "quality.min_batches",
            doc: "batches of baseline before anomalies are flagged (default 10)",
        },
        OptionSpec {
            key: "key",
            doc: "the column(s), comma-separated, that identify a row: `sluice reconcile` then reports exactly which keys are missing, extra or changed",
        },
        OptionSpec {
            key: "dictionary_page_limit",
            doc: "bytes a column's dictionary may reach before the column is written plain (default 16384; 0 = no dictionaries)",
        },
    ]);
    specs
}

/// The Parquet sink's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetSinkConfig {
    /// The codec for every column.
    pub compression: Compression,
    /// Bytes a column chunk's dictionary may reach before the column is written plain; 0
    /// turns dictionaries off.
    pub dictionary_page_limit: usize,
    /// Whether nanosecond timestamps are stored as they are (else as microseconds).
    pub nanosecond_timestamps: bool,
}

impl Default for ParquetSinkConfig {
    fn default() -> Self {
        ParquetSinkConfig {
            compression: default_compression(),
            dictionary_page_limit: DEFAULT_DICTIONARY_PAGE_LIMIT,
            nanosecond_timestamps: false,
        }
    }
}

impl ParquetSinkConfig {
    /// Reads the options (keys are already checked by the front end).
    pub fn from_options(options: &Options) -> Result<Self, OptionError> {
        let compression = match options.get("compression") {
            None => default_compression(),
            Some(v) => parse_compression(v).ok_or_else(|| OptionError {
                key: "compression".into(),
                message: format!("unknown compression '{v}'; expected zstd, zstd(1..22), snappy, lz4 or uncompressed"),
            })?,
        };
        let dictionary_page_limit = match options.get("dictionary_page_limit") {
            None => DEFAULT_DICTIONARY_PAGE_LIMIT,
            Some(v) => v.trim().parse().map_err(|_| OptionError {
                key: "dictionary_page_limit".into(),
                message: format!("expected a number of bytes, got '{v}'"),
            })?,
        };
        // Read by the engine; checked here so `sluice validate` reports a bad value.
        option_choice(options, "quality.profile", 0, &[("on", 0), ("full", 1), ("off", 2)])?;
        option_choice(options, "archive", 0, &[("on", 0), ("off", 1)])?;
        sluice_sql::option_duration(options, "archive.retention", std::time::Duration::from_secs(1))?;
        sluice_sql::option_duration(options, "quality.window", std::time::Duration::from_secs(3600))?;
        sluice_sql::option_count(options, "quality.min_batches", 10)?;
        if let Some(v) = options.get("quality.threshold")
            && !v.trim().parse::<f64>().is_ok_and(|t| t.is_finite() && t > 0.0)
        {
            return Err(OptionError {
                key: "quality.threshold".into(),
                message: format!("quality.threshold must be a positive number of MADs, got '{v}'"),
            });
        }
        let nanosecond_timestamps = option_choice(
            options,
            "timestamp_precision",
            false,
            &[("micros", false), ("nanos", true)],
        )?;
        Ok(ParquetSinkConfig {
            compression,
            dictionary_page_limit,
            nanosecond_timestamps,
        })
    }

    /// The Parquet writer settings for these options.
    pub fn writer_properties(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(self.compression)
            .set_dictionary_enabled(self.dictionary_page_limit > 0)
            .set_dictionary_page_size_limit(self.dictionary_page_limit.max(1))
            .build()
    }
}

fn parse_compression(v: &str) -> Option<Compression> {
    let lower = v.trim().to_ascii_lowercase();
    match lower.as_str() {
        "zstd" => Some(default_compression()),
        "snappy" => Some(Compression::SNAPPY),
        "lz4" | "lz4_raw" => Some(Compression::LZ4_RAW),
        "none" | "uncompressed" => Some(Compression::UNCOMPRESSED),
        _ if lower.starts_with("zstd(") => Compression::from_str(&lower.to_ascii_uppercase()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_values() {
        let mut o = Options::new();
        assert_eq!(
            ParquetSinkConfig::from_options(&o).unwrap().compression,
            default_compression()
        );
        o.insert("compression".into(), "zstd(3)".into());
        assert_eq!(
            ParquetSinkConfig::from_options(&o).unwrap().compression,
            Compression::ZSTD(ZstdLevel::try_new(3).unwrap())
        );
        o.insert("compression".into(), "brotli-ish".into());
        assert_eq!(ParquetSinkConfig::from_options(&o).unwrap_err().key, "compression");
    }

    #[test]
    fn dictionary_limit_values() {
        let mut o = Options::new();
        let limit = |o: &Options| ParquetSinkConfig::from_options(o).map(|c| c.dictionary_page_limit);
        assert_eq!(limit(&o).unwrap(), DEFAULT_DICTIONARY_PAGE_LIMIT);
        o.insert("dictionary_page_limit".into(), " 1048576".into());
        assert_eq!(limit(&o).unwrap(), 1 << 20);
        let props = ParquetSinkConfig::from_options(&o).unwrap().writer_properties();
        assert_eq!(props.dictionary_page_size_limit(), 1 << 20);
        o.insert("dictionary_page_limit".into(), "0".into());
        let props = ParquetSinkConfig::from_options(&o).unwrap().writer_properties();
        assert!(!props.dictionary_enabled(&parquet::schema::types::ColumnPath::from("x")));
        o.insert("dictionary_page_limit".into(), "16k".into());
        assert_eq!(limit(&o).unwrap_err().key, "dictionary_page_limit");
    }
}
