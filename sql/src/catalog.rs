//! What the front end knows about connectors: their `STORED AS` names, their role (source or
//! sink), the OPTIONS keys each accepts and a check of the values. The connectors crate fills
//! it; this crate knows no concrete connector.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The OPTIONS of a table, keys as written, values after `${NAME}` substitution.
pub type Options = BTreeMap<String, String>;

/// Whether a connector reads events (source) or writes results (sink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `CREATE UNBOUNDED EXTERNAL TABLE ... STORED AS <name>`.
    Source,
    /// `CREATE EXTERNAL TABLE ... STORED AS <name>` named by an `INSERT INTO`.
    Sink,
}

/// One accepted OPTIONS key with its documentation.
#[derive(Debug, Clone)]
pub struct OptionSpec {
    /// The key as written in OPTIONS.
    pub key: &'static str,
    /// One line saying what the key does and its default.
    pub doc: &'static str,
}

impl OptionSpec {
    /// Whether `key` is this option: the same key, or, for a spec ending in `.*` (a family of
    /// keys passed through to a client library, e.g. `kafka.*`), any key under that prefix.
    pub fn accepts(&self, key: &str) -> bool {
        match self.key.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('.') => key.len() > prefix.len() && key.starts_with(prefix),
            _ => self.key == key,
        }
    }
}

/// A rejected option value: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// The OPTIONS key whose value is wrong.
    pub key: String,
    /// What is wrong with it, including what is expected.
    pub message: String,
}

/// Checks a table's option values (keys are already known to be accepted).
pub type OptionCheck = Arc<dyn Fn(&Options, &str) -> Result<(), OptionError> + Send + Sync>;

/// A connector as the front end sees it.
#[derive(Clone)]
pub struct ConnectorSpec {
    /// The `STORED AS` name, upper case (`HTTP`, `NDJSON`, `PARQUET`).
    pub name: String,
    /// Source or sink.
    pub role: Role,
    /// The accepted OPTIONS keys.
    pub options: Vec<OptionSpec>,
    /// Checks the values of the options and the LOCATION (second argument).
    pub check: Option<OptionCheck>,
}

impl std::fmt::Debug for ConnectorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorSpec")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish()
    }
}

/// The connectors known to a build of Sluice, by role and `STORED AS` name.
#[derive(Debug, Clone, Default)]
pub struct ConnectorCatalog {
    specs: BTreeMap<(Role, String), ConnectorSpec>,
}

impl ConnectorCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a connector.
    pub fn register(&mut self, spec: ConnectorSpec) {
        self.specs.insert((spec.role, spec.name.to_uppercase()), spec);
    }

    /// The connector for a role and `STORED AS` name (case-insensitive).
    pub fn get(&self, role: Role, name: &str) -> Option<&ConnectorSpec> {
        self.specs.get(&(role, name.to_uppercase()))
    }

    /// The names of the connectors for a role, sorted.
    pub fn names(&self, role: Role) -> Vec<&str> {
        self.specs
            .keys()
            .filter(|(r, _)| *r == role)
            .map(|(_, n)| n.as_str())
            .collect()
    }
}

/// Parses a byte size such as `64MB`, `512KiB`, `1048576` (units: B, KB/KiB, MB/MiB, GB/GiB;
/// decimal and binary units are both taken as powers of 1024, as most data tools do).
pub fn parse_bytes(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses a duration such as `250ms`, `2s`, `1m`, `1h`.
pub fn parse_duration(value: &str) -> Option<std::time::Duration> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" | "" => n.checked_mul(1000)?,
        "m" | "min" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// Reads a size option such as `'64MB'` (must be positive); `default` when absent.
pub fn option_bytes(options: &Options, key: &str, default: u64) -> Result<u64, OptionError> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => parse_bytes(v).filter(|n| *n > 0).ok_or_else(|| OptionError {
            key: key.into(),
            message: format!("{key} must be a size such as '64MB', got '{v}'"),
        }),
    }
}

/// Reads a duration option such as `'500ms'` or `'2s'` (must be positive); `default` when absent.
pub fn option_duration(
    options: &Options,
    key: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration, OptionError> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => parse_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| OptionError {
            key: key.into(),
            message: format!("{key} must be a duration such as '500ms' or '2s', got '{v}'"),
        }),
    }
}

/// Reads a positive integer option; `default` when absent.
pub fn option_count(options: &Options, key: &str, default: usize) -> Result<usize, OptionError> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => v.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| OptionError {
            key: key.into(),
            message: format!("{key} must be a positive integer, got '{v}'"),
        }),
    }
}

/// Reads an option that takes one of `choices` (case-insensitive); `default` when absent.
pub fn option_choice<T: Copy>(
    options: &Options,
    key: &str,
    default: T,
    choices: &[(&str, T)],
) -> Result<T, OptionError> {
    let Some(v) = options.get(key) else { return Ok(default) };
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("'{n}'")).collect();
            OptionError {
                key: key.into(),
                message: format!("{key} is one of {}, got '{v}'", names.join(", ")),
            }
        })
}

/// Reads a one-character field delimiter (`\t` for a tab), or `default` when `key` is absent.
pub fn option_delimiter(options: &Options, key: &str, default: u8) -> Result<u8, OptionError> {
    match options.get(key).map(String::as_str) {
        None => Ok(default),
        Some("\\t") => Ok(b'\t'),
        Some(v) if v.len() == 1 => Ok(v.as_bytes()[0]),
        Some(v) => Err(OptionError {
            key: key.into(),
            message: format!("{key} is one character, got '{v}'"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_option_readers() {
        let mut o = Options::new();
        o.insert("n".into(), "0".into());
        o.insert("c".into(), "Block".into());
        assert_eq!(option_count(&o, "n", 5).unwrap_err().key, "n");
        assert_eq!(option_count(&o, "missing", 5).unwrap(), 5);
        assert_eq!(option_choice(&o, "c", 0, &[("reject", 1), ("block", 2)]).unwrap(), 2);
        assert!(
            option_choice(&o, "c", 0, &[("reject", 1)])
                .unwrap_err()
                .message
                .contains("'reject'")
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("64MB"), Some(64 << 20));
        assert_eq!(parse_bytes("10"), Some(10));
        assert_eq!(parse_bytes("1TB"), None);
        assert_eq!(parse_duration("250ms"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(std::time::Duration::from_secs(2)));
        assert_eq!(parse_duration("30d"), Some(std::time::Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("fast"), None);
    }
}
