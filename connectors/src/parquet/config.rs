//! Options of the Parquet sink.

use std::str::FromStr;

use parquet::basic::{Compression, ZstdLevel};
use sluice_sql::{OptionError, OptionSpec, Options};

/// Default zstd level for `compression` = `zstd` (fast, and much smaller than snappy).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// The default codec: zstd at [`DEFAULT_ZSTD_LEVEL`].
pub fn default_compression() -> Compression {
    Compression::ZSTD(ZstdLevel::try_new(DEFAULT_ZSTD_LEVEL).unwrap_or_default())
}

/// The accepted OPTIONS keys.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![OptionSpec {
        key: "compression",
        doc: "Parquet codec: zstd, zstd(N), snappy, lz4, uncompressed (default zstd, level 1)",
    }]
}

/// The Parquet sink's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetSinkConfig {
    /// The codec for every column.
    pub compression: Compression,
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
        Ok(ParquetSinkConfig { compression })
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
}
