//! A Kafka source's position in the sink's commit log: per partition of its topic, the next
//! offset to read. Each writer records every partition it knows of (the ones it read, and the
//! ones it learnt from the log when handed a partition), so its knowledge only grows, and the
//! true position of a partition is the highest offset any writer's newest entry records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_engine::{EngineError, Result};

/// `{"topic": T, "offsets": {"0": 1234, ...}}`: the next offset to read, by partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaPosition {
    /// The topic.
    pub topic: String,
    /// Next offset to read, by partition.
    pub offsets: BTreeMap<i32, i64>,
}

impl KafkaPosition {
    /// Reads a recorded position.
    pub fn from_value(v: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(v.clone()).map_err(|e| EngineError::CommitLog {
            path: "_sluice/log".into(),
            message: format!("recorded position {v} is not a Kafka position: {e}"),
        })
    }

    /// The position as recorded.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// The offsets of a committed position (none when there is no position, or it is not a Kafka
/// one: then nothing counts as committed).
pub fn committed_offsets(position: Option<&serde_json::Value>) -> BTreeMap<i32, i64> {
    position
        .and_then(|v| KafkaPosition::from_value(v).ok())
        .map(|p| p.offsets)
        .unwrap_or_default()
}

/// The highest offset per partition of `topic` among `positions` (every writer's newest),
/// merged into `known`. Positions of another topic are skipped.
pub fn merge(known: &mut BTreeMap<i32, i64>, topic: &str, positions: &[serde_json::Value]) -> Result<()> {
    for v in positions {
        let p = KafkaPosition::from_value(v)?;
        if p.topic != topic {
            continue;
        }
        for (part, off) in p.offsets {
            let e = known.entry(part).or_insert(off);
            *e = (*e).max(off);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_takes_the_highest_offset_per_partition_of_the_topic() {
        let a = KafkaPosition {
            topic: "t".into(),
            offsets: [(0, 100), (1, 5)].into(),
        };
        let b = KafkaPosition {
            topic: "t".into(),
            offsets: [(0, 200), (2, 7)].into(),
        };
        let other = KafkaPosition {
            topic: "u".into(),
            offsets: [(0, 999)].into(),
        };
        let mut known = BTreeMap::from([(1, 9)]);
        merge(&mut known, "t", &[a.to_value(), b.to_value(), other.to_value()]).unwrap();
        assert_eq!(known, BTreeMap::from([(0, 200), (1, 9), (2, 7)]));
        // Partition keys are strings in JSON and come back as numbers.
        let json = a.to_value().to_string();
        assert!(json.contains(r#""0":100"#), "{json}");
        assert_eq!(
            KafkaPosition::from_value(&serde_json::from_str(&json).unwrap()).unwrap(),
            a
        );
        assert!(merge(&mut known, "t", &[serde_json::json!({"file": "x"})]).is_err());
    }
}
