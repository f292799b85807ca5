//! The Kafka source against a real Kafka-protocol broker (tansu) on loopback: exactly once
//! under kill -9, two servers in one consumer group, dead letters with partition and offset,
//! metadata columns, group offsets and lag.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int32Type, Int64Type};

use crate::harness::{Rng, Server, committed_output, dead_letters, log_entries, read_hive, wait_until};
use crate::services::Broker;

/// The pipeline: `events` from `topic` into `<dir>/lake/out`, partitioned by `kind`.
fn pipeline(dir: &Path, broker: &Broker, topic: &str, options: &str) -> PathBuf {
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE events (
               id BIGINT NOT NULL, kind VARCHAR, _kafka_partition INT, _kafka_offset BIGINT,
               _kafka_key VARCHAR, _kafka_timestamp TIMESTAMP)
             STORED AS KAFKA LOCATION 'kafka://{}/{topic}'
             OPTIONS ('group.id' 'sluice-test', 'batch.interval' '100ms', 'batch.max_rows' '5000' {options});
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (kind) LOCATION '{}';
             INSERT INTO out SELECT id, kind, _kafka_partition AS part, _kafka_offset AS off,
                                    _kafka_key AS k, _kafka_timestamp AS kts FROM events;",
            broker.bootstrap(),
            dir.join("lake/out").display()
        ),
    )
    .unwrap();
    sql
}

fn message(id: i64) -> String {
    format!("{{\"id\": {id}, \"kind\": \"k{}\"}}", id % 3)
}

/// Rows of the sink as `(id, partition, offset)`, read by plain DataFusion over the hive layout.
async fn rows(sink: &Path) -> Vec<(i64, i32, i64)> {
    let batches = read_hive(sink, &[("kind", DataType::Utf8)], "SELECT id, part, off FROM t").await;
    let mut out = Vec::new();
    for b in batches {
        let (id, part, off) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int32Type>(),
            b.column(2).as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            out.push((id.value(i), part.value(i), off.value(i)));
        }
    }
    out
}

/// Ids in the files the commit log names (added and not removed), read with the parquet crate.
fn ids_in_logged_files(sink: &Path) -> Vec<i64> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut live = BTreeSet::new();
    for e in log_entries(sink) {
        for a in e["add"].as_array().cloned().unwrap_or_default() {
            live.insert(a["path"].as_str().unwrap().to_string());
        }
        for r in e["remove"].as_array().cloned().unwrap_or_default() {
            live.remove(r.as_str().unwrap());
        }
    }
    let mut ids = Vec::new();
    for path in live {
        let f = std::fs::File::open(sink.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let reader = ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
        for b in reader {
            let b = b.unwrap();
            let col = b.column_by_name("id").expect("id column");
            ids.extend(col.as_primitive::<Int64Type>().values().iter().copied());
        }
    }
    ids
}

/// `count(*)`, `count(DISTINCT id)`, `min(id)`, `max(id)` of the partition directories as
/// DuckDB reads them.
fn duckdb_summary(sink: &Path) -> [i64; 4] {
    let script = format!(
        "import duckdb\nr = duckdb.sql(\"SELECT count(*), count(DISTINCT id), min(id), max(id) FROM read_parquet('{}/*/*.parquet', hive_partitioning=true)\").fetchall()[0]\nprint(','.join(str(x) for x in r))",
        sink.display()
    );
    let out = std::process::Command::new(crate::readers::python())
        .args(["-c", &script])
        .output()
        .expect("python with duckdb (scripts/setup.sh --test)");
    assert!(out.status.success(), "duckdb: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<i64> = text.trim().split(',').map(|x| x.parse().expect("number")).collect();
    [v[0], v[1], v[2], v[3]]
}

/// Asserts every id in `0..n` is in the sink exactly once, by three readers.
async fn assert_exactly_once(sink: &Path, n: i64) {
    let rows = rows(sink).await;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    let mut seen_offsets = BTreeSet::new();
    for (id, part, off) in &rows {
        *counts.entry(*id).or_default() += 1;
        assert!(seen_offsets.insert((*part, *off)), "offset {part}/{off} written twice");
    }
    let dupes: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dupes.is_empty(), "ids written more than once: {dupes:?}");
    let missing: Vec<i64> = (0..n).filter(|i| !counts.contains_key(i)).take(5).collect();
    assert!(missing.is_empty(), "ids missing: {missing:?}");
    assert_eq!(counts.len() as i64, n, "ids that were never sent");

    let mut logged = ids_in_logged_files(sink);
    logged.sort_unstable();
    assert_eq!(
        logged,
        (0..n).collect::<Vec<_>>(),
        "the files the log names hold each id once"
    );
    assert_eq!(
        duckdb_summary(sink),
        [n, n, 0, n - 1],
        "DuckDB over the partition directories"
    );
}

/// The newest committed offset per partition, over every writer's newest entry.
fn log_offsets(sink: &Path) -> BTreeMap<i64, i64> {
    let mut out = BTreeMap::new();
    for e in log_entries(sink) {
        if let Some(offs) = e["sources"]["events"]["offsets"].as_object() {
            for (p, o) in offs {
                let (p, o) = (p.parse::<i64>().unwrap(), o.as_i64().unwrap());
                let v = out.entry(p).or_insert(o);
                *v = (*v).max(o);
            }
        }
    }
    out
}

/// A broker with topic `events` of 4 partitions and the pipeline over it, with short group
/// sessions: a killed member leaves the group (and a restarted one rejoins) after 6 s, not
/// librdkafka's default 45 s. Returns the directory, broker, pipeline file and sink.
fn four_partitions_short_sessions() -> (tempfile::TempDir, Broker, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    broker.create_topic("events", 4);
    let sql = pipeline(
        dir.path(),
        &broker,
        "events",
        ", 'kafka.session.timeout.ms' '6000', 'kafka.heartbeat.interval.ms' '500'",
    );
    let sink = dir.path().join("lake/out");
    (dir, broker, sql, sink)
}

#[test]
fn kafka_source_is_exactly_once_under_kill9() {
    let (dir, broker, sql, sink) = four_partitions_short_sessions();
    let n: i64 = 200_000;
    // Produced in the background while the server is killed and restarted.
    let producer = broker.producer();
    let producing = std::thread::spawn(move || {
        for id in 0..n {
            producer.send(
                "events",
                Some((id % 4) as i32),
                Some(&format!("key{id}")),
                message(id).as_bytes(),
            );
        }
        producer.flush();
    });
    let mut rng = Rng(0x006b_6166_6b61);
    let mut server = Server::start(&[&sql], dir.path());
    let kills = 10;
    for k in 0..kills {
        let target = committed_output(&dir.path().join("lake/out")) + rng.range(1_000, 15_000);
        wait_until(Duration::from_secs(120), &format!("progress before kill {k}"), || {
            (committed_output(&sink) >= target.min(n as u64)).then_some(())
        });
        server.kill9();
        server = Server::start(&[&sql], dir.path());
    }
    producing.join().expect("producer");
    wait_until(Duration::from_secs(300), "every message committed", || {
        (log_offsets(&sink).values().sum::<i64>() >= n).then_some(())
    });
    // The lag shown per partition (log end minus committed) comes down to 0.
    let rt = crate::harness::runtime();
    let url = server.url("/v1/pipelines");
    wait_until(Duration::from_secs(60), "lag 0 on every partition", || {
        let body: serde_json::Value = rt.block_on(async { reqwest::get(&url).await.ok()?.json().await.ok() })?;
        let lag = body[0]["source_lag"].as_object()?.clone();
        (lag.len() == 4 && lag.values().all(|v| v.as_u64() == Some(0))).then_some(())
    });
    server.stop();
    rt.block_on(assert_exactly_once(&sink, n));
    // Offsets are contiguous per partition from 0: nothing skipped, nothing twice.
    let rows = rt.block_on(rows(&sink));
    let mut per: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (id, part, off) in rows {
        assert_eq!(part as i64, id % 4, "id {id} came from partition {part}");
        per.entry(part).or_default().push(off);
    }
    for (p, mut offs) in per {
        offs.sort_unstable();
        assert_eq!(
            offs,
            (0..offs.len() as i64).collect::<Vec<_>>(),
            "offsets of partition {p}"
        );
    }
    let entries = log_entries(&sink);
    let epochs: Vec<u64> = entries.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(
        epochs,
        (1..=epochs.len() as u64).collect::<Vec<_>>(),
        "epochs contiguous"
    );
    eprintln!(
        "kafka kill -9 loop: {n} messages, {kills} kills, {} commits",
        epochs.len()
    );
}

#[test]
fn malformed_messages_are_dead_lettered_with_partition_offset_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    broker.create_topic("events", 2);
    let sql = pipeline(dir.path(), &broker, "events", ", 'start' 'earliest'");
    let sink = dir.path().join("lake/out");
    let producer = broker.producer();
    for id in 0..100i64 {
        let value = if id % 10 == 7 {
            format!("{{\"id\": \"seven-{id}\"}}")
        } else {
            message(id)
        };
        producer.send(
            "events",
            Some((id % 2) as i32),
            Some(&format!("key{id}")),
            value.as_bytes(),
        );
    }
    producer.send("events", Some(1), None, b"not json at all");
    producer.flush();
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "every message committed", || {
        (log_offsets(&sink).values().sum::<i64>() >= 101).then_some(())
    });
    server.stop();
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 11, "{letters:?}");
    for l in &letters {
        let pos = &l["position"];
        assert_eq!(pos["topic"], "events");
        let (p, o) = (pos["partition"].as_i64().unwrap(), pos["offset"].as_i64().unwrap());
        assert!((0..2).contains(&p) && o >= 0, "{l}");
        assert_eq!(l["stage"], "decode");
        assert!(!l["error"].as_str().unwrap().is_empty());
        if l["raw"] == "not json at all" {
            assert_eq!(pos["partition"], 1);
            assert!(pos["key"].is_null());
        } else {
            let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap()).unwrap();
            let id: i64 = raw["id"]
                .as_str()
                .unwrap()
                .trim_start_matches("seven-")
                .parse()
                .unwrap();
            assert_eq!(id % 10, 7);
            assert_eq!(pos["key"], format!("key{id}").as_str());
            assert_eq!(p, id % 2);
        }
    }
    let rt = crate::harness::runtime();
    let batches = rt.block_on(read_hive(
        &sink,
        &[("kind", DataType::Utf8)],
        "SELECT id, arrow_cast(k, 'Utf8') AS k, part FROM t ORDER BY id",
    ));
    let mut n = 0;
    for b in &batches {
        let (id, k, part) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_string::<i32>(),
            b.column(2).as_primitive::<Int32Type>(),
        );
        for i in 0..b.num_rows() {
            assert_ne!(id.value(i) % 10, 7);
            assert_eq!(k.value(i), format!("key{}", id.value(i)), "the key column");
            assert_eq!(part.value(i) as i64, id.value(i) % 2, "the partition column");
            n += 1;
        }
    }
    assert_eq!(n, 90);
}

/// The sum of metric `name` over the series with the label `label` on the server's `/metrics`
/// (0 when absent).
fn metric(rt: &tokio::runtime::Runtime, server: &Server, name: &str, label: &str) -> u64 {
    let url = server.url("/metrics");
    let text = rt
        .block_on(async { reqwest::get(&url).await.ok()?.text().await.ok() })
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn two_servers_in_one_group_split_the_partitions_exactly() {
    let (dir, broker, sql, sink) = four_partitions_short_sessions();
    let producer = broker.producer();
    let produce = |ids: std::ops::Range<i64>| {
        for id in ids {
            producer.send("events", Some((id % 4) as i32), None, message(id).as_bytes());
        }
        producer.flush();
    };
    let all_committed = |n: i64, what: &str| {
        wait_until(Duration::from_secs(180), what, || {
            (log_offsets(&sink).values().sum::<i64>() >= n).then_some(())
        })
    };
    let start = |name: &str| {
        let state = dir.path().join(format!("state-{name}"));
        Server::start_full(
            &[&sql],
            dir.path(),
            0,
            &[],
            &["--instance", name, "--state-dir", state.to_str().unwrap()],
        )
    };
    let rt = crate::harness::runtime();
    let assignments = |s: &Server| metric(&rt, s, "sluice_kafka_rebalances_total", "kind=\"assign\"");

    produce(0..10_000);
    let a = start("a");
    all_committed(10_000, "a reads everything alone");
    let b = start("b");
    // b joining is a rebalance: both are handed partitions (observed on their metrics).
    wait_until(Duration::from_secs(120), "b is handed partitions", || {
        (assignments(&b) >= 1).then_some(())
    });
    wait_until(Duration::from_secs(120), "a is handed partitions again", || {
        (assignments(&a) >= 2).then_some(())
    });
    produce(10_000..30_000);
    all_committed(30_000, "both read the new messages");
    let since_b: BTreeSet<String> = log_entries(&sink)
        .iter()
        .filter(|e| e["counts"]["output"].as_u64().unwrap_or(0) > 0)
        .filter_map(|e| e["instance"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        since_b,
        BTreeSet::from(["a".to_string(), "b".to_string()]),
        "both instances commit output"
    );

    // b is killed mid-run. (tansu 0.6 keeps a dead member's partitions assigned to it until
    // it rejoins, where a Kafka broker would hand them to a after `session.timeout.ms`; so a
    // goes on with its own partitions and b's wait for b.)
    let a_before = assignments(&a);
    let url = a.url("/v1/pipelines");
    let mine: Vec<i64> = wait_until(Duration::from_secs(60), "a's partitions in its status", || {
        let body: serde_json::Value = rt.block_on(async { reqwest::get(&url).await.ok()?.json().await.ok() })?;
        let parts: Vec<i64> = body[0]["source_lag"]
            .as_object()?
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect();
        (parts.len() == 2).then_some(parts)
    });
    b.kill9();
    produce(30_000..45_000);
    wait_until(Duration::from_secs(180), "a goes on with its partitions", || {
        let offs = log_offsets(&sink);
        (mine.iter().map(|p| offs.get(p).copied().unwrap_or(0)).sum::<i64>() >= 22_500).then_some(())
    });
    // The group drops the dead b once its session times out: a rebalance a takes part in. (A
    // new b joining before that would share the partitions with the dead one.)
    wait_until(Duration::from_secs(120), "the dead b leaves the group", || {
        (assignments(&a) > a_before).then_some(())
    });
    let a_before = assignments(&a);
    // b comes back: the group rebalances again and b resumes from the log's offsets.
    let b = start("b");
    wait_until(Duration::from_secs(120), "a is handed partitions again", || {
        (assignments(&a) > a_before).then_some(())
    });
    produce(45_000..60_000);
    all_committed(60_000, "every message committed");
    a.stop();
    b.stop();
    rt.block_on(assert_exactly_once(&sink, 60_000));
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_full_budget_pauses_consumption_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    broker.create_topic("events", 2);
    let budget: u64 = 512 * 1024;
    let sql = pipeline(dir.path(), &broker, "events", ", 'buffer.max_bytes' '512KB'");
    let sink = dir.path().join("lake/out");
    let n: i64 = 40_000;
    let producer = broker.producer();
    for id in 0..n {
        producer.send("events", Some((id % 2) as i32), None, message(id).as_bytes());
    }
    producer.flush();
    // The sink cannot commit (a store that is down) until the file goes away.
    let hold = dir.path().join("hold-commits");
    std::fs::write(&hold, b"").unwrap();
    let server = Server::start_with(
        &[&sql],
        dir.path(),
        0,
        &[("SLUICE_HOLD_AT", &format!("commit:{}", hold.display()))],
    );
    let rt = crate::harness::runtime();
    let mut samples = Vec::new();
    wait_until(Duration::from_secs(60), "the partitions paused", || {
        samples.push(metric(&rt, &server, "sluice_buffer_bytes", "pipeline=\"out\""));
        (metric(&rt, &server, "sluice_kafka_pauses_total", "kind=\"pause\"") >= 1).then_some(())
    });
    // Paused for a while: the buffer stays within the budget, nothing is committed.
    for _ in 0..20 {
        samples.push(metric(&rt, &server, "sluice_buffer_bytes", "pipeline=\"out\""));
    }
    assert!(samples.iter().any(|b| *b > 0), "the buffer never filled: {samples:?}");
    assert!(
        samples.iter().all(|b| *b <= budget),
        "buffer over the budget: {samples:?}"
    );
    assert_eq!(committed_output(&sink), 0);
    std::fs::remove_file(&hold).unwrap();
    wait_until(Duration::from_secs(120), "every message committed", || {
        (log_offsets(&sink).values().sum::<i64>() >= n).then_some(())
    });
    assert!(
        metric(&rt, &server, "sluice_kafka_pauses_total", "kind=\"resume\"") >= 1,
        "never resumed"
    );
    server.stop();
    rt.block_on(assert_exactly_once(&sink, n));
}

#[test]
fn csv_messages_are_decoded_one_record_each() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    broker.create_topic("lines", 1);
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE lines (id BIGINT NOT NULL, kind VARCHAR, _kafka_offset BIGINT)
             STORED AS KAFKA LOCATION 'kafka://{}/lines'
             OPTIONS ('format' 'csv', 'format.delimiter' ';', 'batch.interval' '100ms');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (kind) LOCATION '{}';
             INSERT INTO out SELECT id, kind, _kafka_offset AS off FROM lines;",
            broker.bootstrap(),
            dir.path().join("lake/out").display()
        ),
    )
    .unwrap();
    let sink = dir.path().join("lake/out");
    let producer = broker.producer();
    for value in ["1;a", "2;b\n", "three;c", "4;\"a;b\""] {
        producer.send("lines", Some(0), None, value.as_bytes());
    }
    producer.flush();
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "every message committed", || {
        let e = log_entries(&sink).pop()?;
        (e["sources"]["lines"]["offsets"]["0"].as_i64()? >= 4).then_some(())
    });
    server.stop();
    let rt = crate::harness::runtime();
    let batches = rt.block_on(read_hive(
        &sink,
        &[("kind", DataType::Utf8)],
        "SELECT id, kind, off FROM t ORDER BY id",
    ));
    let got: Vec<(i64, String, i64)> = batches
        .iter()
        .flat_map(|b| {
            let (id, kind, off) = (
                b.column(0).as_primitive::<Int64Type>().clone(),
                arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap(),
                b.column(2).as_primitive::<Int64Type>().clone(),
            );
            (0..b.num_rows())
                .map(|i| (id.value(i), kind.as_string::<i32>().value(i).to_string(), off.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "a".to_string(), 0),
            (2, "b".to_string(), 1),
            (4, "a;b".to_string(), 3)
        ]
    );
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["position"]["offset"], 2);
}

// The broker is killed mid-run and restarted (its storage on an S3 server, so the topic
// survives): the server's consumer reconnects by itself (librdkafka's back-off), goes on from
// its committed offsets, and every message is written exactly once, those produced while the
// broker was down-and-up included.
#[cfg(feature = "s3")]
#[test]
fn a_broker_restart_mid_run_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let moto = crate::moto::Moto::start(dir.path(), "tansu");
    let mut env = moto.env();
    env.push(("AWS_DEFAULT_REGION", "us-east-1".into()));
    let mut broker = Broker::start_on_s3(dir.path(), "tansu", env);
    broker.create_topic("events", 2);
    let sql = pipeline(dir.path(), &broker, "events", ", 'start' 'earliest'");
    let sink = dir.path().join("lake/out");
    // Small: every message is a record batch of its own, and tansu writes each to S3.
    let (first, n) = (600i64, 1_000i64);
    let producer = broker.producer();
    for id in 0..first {
        producer.send("events", Some((id % 2) as i32), None, message(id).as_bytes());
    }
    producer.flush();
    drop(producer);
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(120), "a first commit", || {
        (committed_output(&sink) > 0).then_some(())
    });
    broker.kill();
    let rt = crate::harness::runtime();
    wait_until(
        Duration::from_secs(60),
        "the consumer to notice the broker is gone",
        || (metric(&rt, &server, "sluice_kafka_errors_total", "") > 0).then_some(()),
    );
    broker.restart();
    let producer = broker.producer();
    for id in first..n {
        producer.send("events", Some((id % 2) as i32), None, message(id).as_bytes());
    }
    producer.flush();
    wait_until(
        Duration::from_secs(180),
        "every message committed after the restart",
        || (log_offsets(&sink).values().sum::<i64>() >= n).then_some(()),
    );
    server.stop();
    rt.block_on(assert_exactly_once(&sink, n));
}

/// Event time over Kafka: a per-partition watermark (`'watermark.partition'
/// '_kafka_partition'`). While both partitions send, a window closes only once both have passed
/// it; when partition 1 falls silent, windows close again once it has been idle for
/// `watermark.idle_timeout`, and each window holds both partitions' rows exactly once.
#[test]
fn a_silent_kafka_partition_stops_holding_windows_back_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    broker.create_topic("readings", 2);
    let sink = dir.path().join("lake/out");
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE readings (v BIGINT, ts TIMESTAMP NOT NULL, _kafka_partition INT)
             STORED AS KAFKA LOCATION 'kafka://{}/readings'
             OPTIONS ('group.id' 'sluice-windows', 'batch.interval' '50ms', 'event_time' 'ts',
                      'watermark.delay' '5s', 'watermark.partition' '_kafka_partition',
                      'watermark.idle_timeout' '1s');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}';
             INSERT INTO out SELECT date_bin(INTERVAL '1 minute', ts) AS w, _kafka_partition AS p,
                                    count(*) AS n, sum(v) AS total
             FROM readings GROUP BY date_bin(INTERVAL '1 minute', ts), _kafka_partition;",
            broker.bootstrap(),
            sink.display()
        ),
    )
    .unwrap();
    let at = |s: i64| chrono::DateTime::from_timestamp(1_767_225_600 + s, 0).unwrap().to_rfc3339();
    let producer = broker.producer();
    // Both partitions, one reading every 5 s for the first minute.
    for i in 0..12 {
        for p in 0..2 {
            let m = serde_json::json!({"v": i, "ts": at(i * 5)}).to_string();
            producer.send("readings", Some(p), None, m.as_bytes());
        }
    }
    producer.flush();
    let server = Server::start(&[&sql], dir.path());
    let received = || -> u64 {
        log_entries(&sink).iter().map(|e| e["counts"]["received"].as_u64().unwrap_or(0)).sum()
    };
    wait_until(Duration::from_secs(60), "the first minute committed", || (received() >= 24).then_some(()));
    // Partition 0 alone goes on: the first window closes only once partition 1 has been idle.
    let mut sent = 24;
    let mut i = 12;
    wait_until(Duration::from_secs(60), "the first window to close", || {
        let m = serde_json::json!({"v": i, "ts": at(i * 5)}).to_string();
        producer.send("readings", Some(0), None, m.as_bytes());
        producer.flush();
        i += 1;
        sent += 1;
        log_entries(&sink)
            .iter()
            .any(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0) > 0)
            .then_some(())
    });
    wait_until(Duration::from_secs(60), "every message committed", || (received() >= sent).then_some(()));
    server.stop();
    let entries = log_entries(&sink);
    let first = entries
        .iter()
        .position(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0) > 0)
        .unwrap();
    // Before the first window closed, the watermark stayed behind partition 1's newest row.
    for e in &entries[..first] {
        assert!(e["state"]["watermark_ns"].as_i64().unwrap_or(0) <= (1_767_225_600 + 55 - 5) * 1_000_000_000, "{e}");
    }
    let rt = crate::harness::runtime();
    let batches = rt.block_on(read_hive(&sink, &[], "SELECT p, n, total FROM t WHERE w = TIMESTAMP '2026-01-01T00:00:00' ORDER BY p"));
    let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
    assert!(text.contains("| 0 | 12 | 66    |") && text.contains("| 1 | 12 | 66    |"), "{text}");
}
