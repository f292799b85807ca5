//! Options of the Kafka source (`STORED AS KAFKA`): LOCATION `kafka://HOST:PORT[,HOST:PORT]/TOPIC`,
//! the record format, where a partition with no recorded position starts, and `kafka.*` keys
//! passed through to librdkafka.

use std::collections::BTreeMap;

use sluice_sql::{OptionError, OptionSpec, Options, option_choice};

/// librdkafka settings Sluice owns: a `kafka.*` key naming one is refused, with where the
/// setting comes from instead.
const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "the brokers are the LOCATION's hosts"),
    ("metadata.broker.list", "the brokers are the LOCATION's hosts"),
    ("group.id", "use the 'group.id' option"),
    (
        "enable.auto.commit",
        "offsets are committed by Sluice, after each commit of its own log",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed by Sluice, after each commit of its own log",
    ),
    ("auto.offset.reset", "use the 'start' option"),
    ("enable.partition.eof", "Sluice reads partition ends itself"),
    (
        "partition.assignment.strategy",
        "Sluice uses the eager protocol (range, roundrobin): it commits what it read from a partition before the partition is released",
    ),
    (
        "group.protocol",
        "Sluice uses the classic group protocol with eager rebalancing: it commits what it read from a partition before the partition is released",
    ),
];

/// The least `kafka.max.poll.interval.ms` accepted: a revoked partition's in-flight data may
/// take up to a minute to commit, and the consumer must stay in the group meanwhile.
pub const MIN_MAX_POLL_INTERVAL_MS: u64 = 120_000;

/// Whether a client setting holds a secret (its value is never printed, whatever its length).
fn is_secret(key: &str) -> bool {
    ["password", "secret", "token", "key", "jaas", "credential"]
        .iter()
        .any(|w| key.contains(w))
}

/// Where a partition with no position in the sink's log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest message the broker keeps.
    Earliest,
    /// Messages produced after the source started.
    Latest,
}

/// What a message's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageFormat {
    /// One JSON object.
    Json,
    /// One delimited-text record (no header).
    Csv {
        /// Field delimiter.
        delimiter: u8,
    },
}

/// The accepted OPTIONS keys.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "group.id",
            doc: "the consumer group: servers with the same group.id split the topic's partitions (default 'sluice-<pipeline>')",
        },
        OptionSpec {
            key: "format",
            doc: "what a message's value holds: 'json' (one object, default) or 'csv' (one record, no header)",
        },
        OptionSpec {
            key: "format.delimiter",
            doc: "csv: the field delimiter, one character (default ',')",
        },
        OptionSpec {
            key: "start",
            doc: "where a partition with no position in the sink's log starts: 'earliest' (default) or 'latest'",
        },
        OptionSpec {
            key: "kafka.*",
            doc: "any librdkafka setting, e.g. 'kafka.security.protocol', 'kafka.sasl.password' '${KAFKA_PASSWORD}' (values are never printed)",
        },
    ]
}

/// A Kafka source's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSourceConfig {
    /// `host:port,host:port`.
    pub brokers: String,
    /// The topic read.
    pub topic: String,
    /// The consumer group (`None`: `sluice-<pipeline>`).
    pub group_id: Option<String>,
    /// What a message's value holds.
    pub format: MessageFormat,
    /// Where a partition with no recorded position starts.
    pub start: Start,
    /// `kafka.*` options, prefix removed: passed to librdkafka as they are.
    pub client: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSourceConfig {
    // The client settings may hold secrets: only their keys are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("format", &self.format)
            .field("start", &self.start)
            .field("client", &self.client.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn location_error(location: &str, why: &str) -> OptionError {
    OptionError {
        key: "LOCATION".into(),
        message: format!(
            "{why} in '{location}': a Kafka source's LOCATION is 'kafka://HOST:PORT[,HOST:PORT...]/TOPIC'"
        ),
    }
}

/// Splits `kafka://h:p,h:p/topic` into brokers and topic.
pub fn parse_location(location: &str) -> Result<(String, String), OptionError> {
    let rest = location
        .strip_prefix("kafka://")
        .ok_or_else(|| location_error(location, "no kafka:// scheme"))?;
    let (hosts, topic) = rest
        .split_once('/')
        .ok_or_else(|| location_error(location, "no topic"))?;
    let valid_topic = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid_topic {
        return Err(location_error(
            location,
            &format!("'{topic}' is not a topic name (letters, digits, '.', '_', '-')"),
        ));
    }
    let mut brokers = Vec::new();
    for host in hosts.split(',') {
        let port_ok = host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(location_error(location, &format!("'{host}' is not HOST:PORT")));
        }
        brokers.push(host);
    }
    Ok((brokers.join(","), topic.to_string()))
}

impl KafkaSourceConfig {
    /// Reads LOCATION and OPTIONS.
    pub fn new(options: &Options, location: &str) -> Result<Self, OptionError> {
        let (brokers, topic) = parse_location(location)?;
        let format = match option_choice(options, "format", 0, &[("json", 0), ("csv", 1)])? {
            0 => MessageFormat::Json,
            _ => MessageFormat::Csv {
                delimiter: sluice_sql::option_delimiter(options, "format.delimiter", b',')?,
            },
        };
        if format == MessageFormat::Json && options.contains_key("format.delimiter") {
            return Err(OptionError {
                key: "format.delimiter".into(),
                message: "format.delimiter applies to 'format' 'csv' only".into(),
            });
        }
        let start = option_choice(
            options,
            "start",
            Start::Earliest,
            &[("earliest", Start::Earliest), ("latest", Start::Latest)],
        )?;
        let group_id = match options.get("group.id") {
            Some(g) if g.trim().is_empty() => {
                return Err(OptionError {
                    key: "group.id".into(),
                    message: "group.id must not be empty".into(),
                });
            }
            g => g.cloned(),
        };
        let mut client = BTreeMap::new();
        for (key, value) in options {
            let Some(setting) = key.strip_prefix("kafka.") else {
                continue;
            };
            if let Some((_, instead)) = OWNED.iter().find(|(k, _)| *k == setting) {
                return Err(OptionError {
                    key: key.clone(),
                    message: format!("'{key}' is set by Sluice: {instead}"),
                });
            }
            if setting == "max.poll.interval.ms"
                && value
                    .trim()
                    .parse::<u64>()
                    .is_ok_and(|ms| ms < MIN_MAX_POLL_INTERVAL_MS)
            {
                return Err(OptionError {
                    key: key.clone(),
                    message: format!(
                        "'{key}' must be at least {MIN_MAX_POLL_INTERVAL_MS}: committing a revoked partition's data may take a minute"
                    ),
                });
            }
            client.insert(setting.to_string(), value.clone());
        }
        Ok(KafkaSourceConfig {
            brokers,
            topic,
            group_id,
            format,
            start,
            client,
        })
    }

    /// A message with the value of every secret client setting (passwords, keys, tokens, JAAS
    /// configurations) replaced by `***`, so librdkafka's own messages, which may quote a
    /// value, never print one.
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_string();
        for (_, value) in self.client.iter().filter(|(k, v)| is_secret(k) && !v.is_empty()) {
            out = out.replace(value.as_str(), "***");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Options {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn location_forms() {
        assert_eq!(
            parse_location("kafka://127.0.0.1:9092/orders").unwrap(),
            ("127.0.0.1:9092".into(), "orders".into())
        );
        assert_eq!(
            parse_location("kafka://a:1,b:2/t.x-y_z").unwrap(),
            ("a:1,b:2".into(), "t.x-y_z".into())
        );
        for bad in [
            "kafka://a:1",
            "kafka://a/t",
            "kafka://a:0/t",
            "kafka://a:1/",
            "kafka://a:1/t/u",
            "http://a:1/t",
            "kafka://:1/t",
        ] {
            let e = parse_location(bad).unwrap_err();
            assert_eq!(e.key, "LOCATION", "{bad}");
        }
    }

    #[test]
    fn options_are_read_and_owned_settings_refused() {
        let c = KafkaSourceConfig::new(
            &opts(&[
                ("group.id", "g"),
                ("start", "latest"),
                ("format", "csv"),
                ("format.delimiter", ";"),
                ("kafka.sasl.password", "hunter2"),
            ]),
            "kafka://h:1/t",
        )
        .unwrap();
        assert_eq!(c.group_id.as_deref(), Some("g"));
        assert_eq!(c.start, Start::Latest);
        assert_eq!(c.format, MessageFormat::Csv { delimiter: b';' });
        assert_eq!(c.client.get("sasl.password").map(String::as_str), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.redact("bad value \"hunter2\""), "bad value \"***\"");

        let e = KafkaSourceConfig::new(&opts(&[("kafka.group.id", "x")]), "kafka://h:1/t").unwrap_err();
        assert!(e.message.contains("group.id"), "{}", e.message);
        let e = KafkaSourceConfig::new(&opts(&[("kafka.enable.auto.commit", "true")]), "kafka://h:1/t").unwrap_err();
        assert_eq!(e.key, "kafka.enable.auto.commit");
        for owned in [
            "kafka.partition.assignment.strategy",
            "kafka.group.protocol",
            "kafka.auto.offset.reset",
        ] {
            let e = KafkaSourceConfig::new(&opts(&[(owned, "x")]), "kafka://h:1/t").unwrap_err();
            assert_eq!(e.key, owned);
        }
        let e = KafkaSourceConfig::new(&opts(&[("kafka.max.poll.interval.ms", "30000")]), "kafka://h:1/t").unwrap_err();
        assert_eq!(e.key, "kafka.max.poll.interval.ms");
        KafkaSourceConfig::new(&opts(&[("kafka.max.poll.interval.ms", "300000")]), "kafka://h:1/t").unwrap();
        // Only secrets are redacted, at any length; other values stay readable.
        let c = KafkaSourceConfig::new(
            &opts(&[("kafka.sasl.password", "pw"), ("kafka.security.protocol", "SSL")]),
            "kafka://h:1/t",
        )
        .unwrap();
        assert_eq!(c.redact("pw over SSL"), "*** over SSL");
        let e = KafkaSourceConfig::new(&opts(&[("start", "middle")]), "kafka://h:1/t").unwrap_err();
        assert_eq!(e.key, "start");
        let e = KafkaSourceConfig::new(&opts(&[("format.delimiter", ";")]), "kafka://h:1/t").unwrap_err();
        assert_eq!(e.key, "format.delimiter");
    }
}
