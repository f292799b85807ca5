//! Delivery guarantees (docs/specs/delivery.md), proven the Kafka / Flink way: state the
//! guarantee as a set equation, crash the real server at chosen and random points, and check the
//! equation with an independent reader.
//!
//! The equation, for every test here:
//!   output ids have no duplicates,
//!   output ⊆ sent ∩ passes-filter ∩ well-formed,
//!   acknowledged ∩ passes-filter ∩ well-formed ⊆ output,
//!   dead letters (no duplicates) ⊆ sent ∩ malformed, and acknowledged ∩ malformed ⊆ dead letters.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};

use crate::harness::{
    Rng, Server, committed_output, dead_letters, drop_file, free_port, log_entries, peak_rss, read_hive, wait_until,
};

pub(crate) fn passes(id: i64) -> bool {
    id % 10 != 3
}

pub(crate) fn malformed(id: i64) -> bool {
    id % 97 == 5
}

pub(crate) fn line(id: i64) -> String {
    if malformed(id) {
        format!("{{\"id\": {id}, \"v\": \"bad\"}}")
    } else {
        format!("{{\"id\": {id}, \"v\": {}}}", id * 7)
    }
}

pub(crate) fn http_pipeline(dir: &Path, options: &str) -> std::path::PathBuf {
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v BIGINT) STORED AS HTTP
             LOCATION '/v1/sources/ev'
             OPTIONS ({options});
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION '{}';
             INSERT INTO out SELECT id, v, id % 4 AS part FROM ev WHERE id % 10 <> 3;",
            dir.join("lake/out").display()
        ),
    )
    .unwrap();
    sql
}

/// Posts the events `ids` to the `ev` source with `X-Request-Id: id` and expects 200.
pub(crate) fn post_events(server: &Server, id: &str, ids: std::ops::Range<i64>) {
    let body = ids.map(line).collect::<Vec<_>>().join("\n");
    let rt = crate::harness::runtime();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/sources/ev"))
            .header("x-request-id", id)
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    assert_eq!(status, 200, "request {id}");
}

/// Requests of `per` events each, ids 0..n.
pub(crate) fn requests(n: i64, per: i64) -> Vec<(String, String, Vec<i64>)> {
    (0..(n + per - 1) / per)
        .map(|r| {
            let ids: Vec<i64> = (r * per..((r + 1) * per).min(n)).collect();
            (
                format!("load-{r}"),
                ids.iter().map(|i| line(*i)).collect::<Vec<_>>().join("\n"),
                ids,
            )
        })
        .collect()
}

/// A producer that retries every request (same `X-Request-Id`) until it gets a 2xx.
pub(crate) struct Load {
    acked: Arc<Mutex<Vec<bool>>>,
    acked_count: Arc<AtomicUsize>,
    pub(crate) total: usize,
}

impl Load {
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        port: u16,
        reqs: Vec<(String, String, Vec<i64>)>,
        workers: usize,
    ) -> Load {
        let total = reqs.len();
        let acked = Arc::new(Mutex::new(vec![false; total]));
        let acked_count = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let reqs = Arc::new(reqs);
        for _ in 0..workers {
            let (acked, acked_count, next, reqs) = (acked.clone(), acked_count.clone(), next.clone(), reqs.clone());
            rt.spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let url = format!("http://127.0.0.1:{port}/v1/sources/ev");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, body, _)) = reqs.get(i) else { return };
                    loop {
                        let r = http
                            .post(&url)
                            .header("x-request-id", id)
                            .body(body.clone())
                            .send()
                            .await;
                        if r.as_ref().is_ok_and(|r| r.status().is_success()) {
                            acked.lock().unwrap()[i] = true;
                            acked_count.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // Client back-off before retrying (the server is down or pushing back).
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        Load {
            acked,
            acked_count,
            total,
        }
    }

    pub(crate) fn acked(&self) -> usize {
        self.acked_count.load(Ordering::Relaxed)
    }

    pub(crate) fn acked_ids(&self, reqs: &[(String, String, Vec<i64>)]) -> HashSet<i64> {
        let a = self.acked.lock().unwrap();
        reqs.iter()
            .zip(a.iter())
            .filter(|(_, ok)| **ok)
            .flat_map(|((_, _, ids), _)| ids.iter().copied())
            .collect()
    }
}

/// Kills `server` with SIGKILL `kills` times, each after `lo..hi` (random) more requests of
/// `load` were acknowledged, restarting it on `sql` and `port` each time; returns the last
/// server once every request is acknowledged.
pub(crate) fn kill9_under_load(
    mut server: Server,
    load: &Load,
    sql: &Path,
    port: u16,
    mut rng: Rng,
    kills: usize,
    (lo, hi): (u64, u64),
) -> Server {
    let dir = sql.parent().expect("the pipeline file's directory");
    for _ in 0..kills {
        let target = (load.acked() + rng.range(lo, hi) as usize).min(load.total);
        wait_until(
            Duration::from_secs(120),
            "more acknowledgements before the next kill",
            || (load.acked() >= target).then_some(()),
        );
        server.kill9();
        server = Server::start_with(&[sql], dir, port, &[]);
    }
    wait_until(Duration::from_secs(300), "every request acknowledged", || {
        (load.acked() == load.total).then_some(())
    });
    server
}

/// Checks the equation; returns (output rows, dead letters).
pub(crate) async fn check(sink: &Path, sent: &HashSet<i64>, acked: &HashSet<i64>) -> (usize, usize) {
    let batches = read_hive(sink, &[("part", DataType::Int64)], "SELECT id, v, part FROM t").await;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for b in &batches {
        let (id, v, part) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int64Type>(),
            b.column(2).as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            assert_eq!(v.value(i), id.value(i) * 7, "value of {}", id.value(i));
            assert_eq!(part.value(i), id.value(i) % 4, "partition of {}", id.value(i));
            *counts.entry(id.value(i)).or_default() += 1;
        }
    }
    let dupes: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "duplicates in output: {dupes:?}");
    for id in counts.keys() {
        assert!(sent.contains(id), "{id} was never sent");
        assert!(passes(*id) && !malformed(*id), "{id} should not be in the output");
    }
    let missing: Vec<_> = acked
        .iter()
        .filter(|i| passes(**i) && !malformed(**i) && !counts.contains_key(i))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged ids missing from the output: {missing:?}"
    );
    let mut dead: BTreeMap<i64, usize> = BTreeMap::new();
    for l in dead_letters(sink) {
        let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap()).unwrap();
        *dead.entry(raw["id"].as_i64().unwrap()).or_default() += 1;
    }
    assert!(dead.values().all(|n| *n == 1), "duplicate dead letters");
    for id in dead.keys() {
        assert!(
            sent.contains(id) && malformed(*id),
            "{id} is not a malformed record that was sent"
        );
    }
    let lost: Vec<_> = acked
        .iter()
        .filter(|i| malformed(**i) && !dead.contains_key(i))
        .take(5)
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged malformed records without a dead letter: {lost:?}"
    );
    (counts.len(), dead.len())
}

// The kill -9 loop over HTTP: ≥ 200,000 events, ≥ 20 SIGKILLs at random moments. The budget is
// small and `when_full` is `spill`, so pipelines also fall behind and catch up from the log.
#[test]
fn http_kill9_loop_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(
        dir.path(),
        "'batch.max_rows' '5000', 'batch.interval' '50ms', 'log.segment_bytes' '1MB', 'when_full' 'spill', 'buffer.max_bytes' '256KB'",
    );
    let sink = dir.path().join("lake/out");
    let port = free_port();
    let rt = crate::harness::runtime();
    let n = 200_000;
    let reqs = requests(n, 500);
    let server = Server::start_with(&[&sql], dir.path(), port, &[]);
    let load = Load::start(&rt, port, reqs.clone(), 4);
    let kills = 20;
    let server = kill9_under_load(server, &load, &sql, port, Rng(0x5eed_1234_abcd), kills, (2, 14));
    // Acknowledged is durable, not yet committed: a pipeline that fell behind is still catching
    // up from the log (a graceful stop would leave the rest there for the next start).
    let expected = (0..n).filter(|i| passes(*i) && !malformed(*i)).count() as u64;
    wait_until(Duration::from_secs(300), "every acknowledged record committed", || {
        (committed_output(&sink) >= expected).then_some(())
    });
    server.stop();
    let sent: HashSet<i64> = (0..n).collect();
    let acked = load.acked_ids(&reqs);
    let (out, dead) = rt.block_on(check(&sink, &sent, &acked));
    let filtered = sent.iter().filter(|i| !passes(**i) && !malformed(**i)).count();
    assert_eq!(
        out + dead + filtered,
        n as usize,
        "every record is output, dead-lettered or filtered"
    );
    eprintln!(
        "http kill -9 loop: sent {n}, acknowledged {}, output {out}, dead letters {dead}, filtered {filtered}, kills {kills}",
        acked.len()
    );
}

// The kill -9 loop over the directory source.
#[test]
fn directory_kill9_loop_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v BIGINT) STORED AS NDJSON LOCATION '{}'
             OPTIONS ('poll_interval' '20ms', 'batch.interval' '50ms', 'batch.max_rows' '3000');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION '{}';
             INSERT INTO out SELECT id, v, id % 4 AS part FROM ev WHERE id % 10 <> 3;",
            incoming.display(),
            dir.path().join("lake/out").display()
        ),
    )
    .unwrap();
    let sink = dir.path().join("lake/out");
    let (files, per) = (200i64, 1000i64);
    let mut rng = Rng(0xd1_5ec7);
    let mut server = Server::start(&[&sql], dir.path());
    let kills = 20;
    let mut dropped = 0;
    for k in 0..kills {
        let before = committed_output(&sink);
        for _ in 0..(files / kills) {
            let f = dropped;
            drop_file(
                &incoming,
                &format!("{f:05}.ndjson"),
                &((f * per)..((f + 1) * per)).map(line).collect::<Vec<_>>().join("\n"),
            );
            dropped += 1;
        }
        // Never more than the files dropped so far can produce (the server may be quick).
        let reachable = (0..dropped * per).filter(|i| passes(*i) && !malformed(*i)).count() as u64;
        let target = (before + rng.range(200, 4000)).min(reachable);
        wait_until(Duration::from_secs(120), &format!("progress before kill {k}"), || {
            (committed_output(&sink) >= target).then_some(())
        });
        server.kill9();
        server = Server::start(&[&sql], dir.path());
    }
    let last = format!("{:05}.ndjson", files - 1);
    wait_until(Duration::from_secs(300), "every file committed", || {
        let e = log_entries(&sink).pop()?;
        (e["sources"]["ev"]["file"] == last.as_str() && e["sources"]["ev"]["complete"] == true).then_some(())
    });
    server.stop();
    let sent: HashSet<i64> = (0..files * per).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (out, dead) = rt.block_on(check(&sink, &sent, &sent));
    eprintln!(
        "directory kill -9 loop: sent {}, output {out}, dead letters {dead}, kills {kills}",
        sent.len()
    );
}

// Crash at each step of the commit protocol, restart, and check.
#[cfg(feature = "fault-injection")]
#[test]
fn crash_points_recover_exactly_once() {
    let points = [
        "after_wal_append",
        "after_stage",
        "after_log_put",
        "after_move",
        "after_commit",
        "before_segment_delete",
    ];
    for point in points {
        let dir = tempfile::tempdir().unwrap();
        let sql = http_pipeline(
            dir.path(),
            "'batch.max_rows' '300', 'batch.interval' '50ms', 'log.segment_bytes' '8KB'",
        );
        let sink = dir.path().join("lake/out");
        let port = free_port();
        let rt = crate::harness::runtime();
        let n = 6_000;
        let reqs = requests(n, 100);
        let crash_at = format!("{point}:3");
        let server = Server::start_with(&[&sql], dir.path(), port, &[("SLUICE_CRASH_AT", &crash_at)]);
        let load = Load::start(&rt, port, reqs.clone(), 3);
        let status = server.wait_exit(Duration::from_secs(120));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "{point}: the process aborted at the crash point ({status:?})"
        );
        let server = Server::start_with(&[&sql], dir.path(), port, &[]);
        wait_until(Duration::from_secs(120), "every request acknowledged", || {
            (load.acked() == load.total).then_some(())
        });
        server.stop();
        let sent: HashSet<i64> = (0..n).collect();
        let acked = load.acked_ids(&reqs);
        assert_eq!(acked.len(), n as usize);
        let (out, dead) = rt.block_on(check(&sink, &sent, &acked));
        eprintln!("crash at {point}: output {out}, dead letters {dead}");
        if point == "before_segment_delete" {
            // Segments covered by commits are deleted once the server runs on.
            let segs = std::fs::read_dir(dir.path().join(".sluice/ingest/ev")).unwrap().count();
            assert!(segs < 20, "{segs} ingest log segments left");
        }
    }
}

async fn burst(port: u16, requests: usize, workers: usize, size: usize) -> (Vec<u16>, Vec<(usize, Vec<i64>)>) {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, next) = (http.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= requests {
                    return out;
                }
                let ids: Vec<i64> = ((r * size) as i64..((r + 1) * size) as i64).collect();
                let body = ids.iter().map(|i| line(*i)).collect::<Vec<_>>().join("\n");
                let res = http
                    .post(format!("http://127.0.0.1:{port}/v1/sources/ev"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                out.push((res.status().as_u16(), r, ids));
            }
        }));
    }
    let mut statuses = Vec::new();
    let mut acked = Vec::new();
    for t in tasks {
        for (s, r, ids) in t.await.unwrap() {
            statuses.push(s);
            if s == 200 {
                acked.push((r, ids));
            }
        }
    }
    (statuses, acked)
}

fn buffer_gauge(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with("sluice_buffer_bytes{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// A burst against a small budget: 429s, nothing acknowledged is lost, the buffer stays within
// the budget, memory stays bounded. With 'block', the same burst is held, not refused; with
// 'spill' it is accepted into the log and the pipeline catches up from there.
#[test]
fn back_pressure_rejects_or_blocks_within_budget() {
    for mode in ["reject", "block", "spill"] {
        let dir = tempfile::tempdir().unwrap();
        let budget = 32 * 1024;
        let sql = http_pipeline(
            dir.path(),
            &format!(
                "'batch.max_rows' '5000', 'buffer.max_bytes' '{budget}', 'when_full' '{mode}', 'batch.interval' '300ms'"
            ),
        );
        let sink = dir.path().join("lake/out");
        let port = free_port();
        let server = Server::start_with(&[&sql], dir.path(), port, &[]);
        let rt = crate::harness::runtime();
        let peak = Arc::new(Mutex::new(0f64));
        let stop = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (peak, stop) = (peak.clone(), stop.clone());
            rt.spawn(async move {
                let http = reqwest::Client::new();
                while stop.load(Ordering::Relaxed) == 0 {
                    if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await
                        && let Some(v) = buffer_gauge(&r.text().await.unwrap_or_default())
                    {
                        let mut p = peak.lock().unwrap();
                        *p = p.max(v);
                    }
                }
            })
        };
        let (statuses, acked) = rt.block_on(burst(port, 300, 16, 100));
        stop.store(1, Ordering::Relaxed);
        rt.block_on(watcher).unwrap();
        let ok = statuses.iter().filter(|s| **s == 200).count();
        let refused = statuses.iter().filter(|s| **s == 429).count();
        assert_eq!(ok + refused, statuses.len(), "only 200 or 429: {statuses:?}");
        if mode == "reject" {
            assert!(refused > 0, "a burst against a 32KB budget is pushed back");
        } else {
            assert_eq!(refused, 0, "'{mode}' accepts instead of refusing");
        }
        assert!(ok > 0);
        let acked_ids: HashSet<i64> = acked.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
        let want = acked_ids.iter().filter(|i| passes(**i) && !malformed(**i)).count() as u64;
        wait_until(Duration::from_secs(60), "acknowledged events committed", || {
            (committed_output(&sink) >= want).then_some(())
        });
        let rss = peak_rss(server.pid()).unwrap_or(0);
        if mode == "spill" {
            let metrics = rt.block_on(async {
                reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            });
            assert!(
                metrics.contains("sluice_http_spill_caught_up_total"),
                "the pipeline fell behind and caught up from the log"
            );
        }
        server.stop();
        // Refused requests were never logged: the output is exactly the acknowledged ones.
        let (out, _) = rt.block_on(check(&sink, &acked_ids, &acked_ids));
        assert_eq!(out as u64, want);
        let peak = *peak.lock().unwrap();
        assert!(
            peak <= budget as f64,
            "buffered bytes {peak} exceeded the budget {budget}"
        );
        assert!(rss < 512 << 20, "peak RSS {rss} bytes");
        eprintln!(
            "back-pressure ({mode}): {ok} accepted, {refused} refused, peak buffer {peak} B of {budget}, peak RSS {} MiB",
            rss >> 20
        );
    }
}
