//! Sink tables on S3, against a real S3-compatible server (moto) on loopback: the HTTP →
//! Parquet pipeline under kill -9, a crash in the middle of a multipart upload, two writers
//! racing for one commit entry, a faulty store in front of S3, single-writer mode, and
//! `sluice query` / `validate` on an s3:// location. Every check reads the bucket with an
//! independent client (object_store's S3 client and the parquet crate).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sluice_engine::log::commit::{CommitEntry, CommitLog, Counts, FileAction, LOG_VERSION, TableSchema};
use sluice_engine::store::TableStore;
use sluice_engine::server::runtime::{ServerConfig, start};
use sluice_sql::PipelineText;

use crate::delivery::{Load, kill9_under_load, malformed, passes, requests};
use crate::harness::{Rng, Server, bin, drop_file, free_port, wait_until};
use crate::moto::{Moto, S3Table, SECRET};

const BUCKET: &str = "lake";

/// The HTTP pipeline of the delivery tests, writing to `s3://lake/<table>/`.
fn http_pipeline(dir: &Path, moto: &Moto, table: &str, source_options: &str, sink_options: &str) -> std::path::PathBuf {
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v BIGINT) STORED AS HTTP
             LOCATION '/v1/sources/ev'
             OPTIONS ({source_options});
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part)
             LOCATION 's3://{BUCKET}/{table}/'
             OPTIONS ({}, 'lease.ttl' '2s' {sink_options});
             INSERT INTO out SELECT id, v, id % 4 AS part FROM ev WHERE id % 10 <> 3;",
            moto.options()
        ),
    )
    .unwrap();
    sql
}

fn table(moto: &Moto, name: &str) -> S3Table {
    S3Table {
        store: moto.client(BUCKET),
        root: name.to_string(),
    }
}

/// A directory-source pipeline from `dir/in` (`ev (COLUMNS)`, extra source options) into
/// `s3://lake/<table>/` (`out`, optionally partitioned, moto's settings then `sink_options`),
/// `INSERT INTO out SELECT <select> FROM ev`; returns the pipeline file and `dir/in`.
fn dir_pipeline_on_s3(dir: &Path, moto: &Moto, table: &str, p: DirPipeline<'_>) -> (std::path::PathBuf, std::path::PathBuf) {
    let incoming = dir.join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev ({}) STORED AS NDJSON LOCATION '{}'
             OPTIONS ('poll_interval' '20ms', {});
             CREATE EXTERNAL TABLE out STORED AS PARQUET {} LOCATION 's3://{BUCKET}/{table}/'
             OPTIONS ({}, {});
             INSERT INTO out SELECT {} FROM ev;",
            p.columns,
            incoming.display(),
            p.source_options,
            p.partitioned,
            moto.options(),
            p.sink_options,
            p.select
        ),
    )
    .unwrap();
    (sql, incoming)
}

/// The parts of a [`dir_pipeline_on_s3`] pipeline that differ between tests.
struct DirPipeline<'a> {
    columns: &'a str,
    source_options: &'a str,
    partitioned: &'a str,
    sink_options: &'a str,
    select: &'a str,
}

// The HTTP → Parquet pipeline on S3 under kill -9: every acknowledged event is committed
// exactly once, the hive view (every Parquet object outside `_sluice/`) equals the files the
// log names, malformed records are dead letters once each, `sluice query` and `validate` work
// on the s3:// location, and the secret key is never printed.
#[test]
fn http_to_s3_is_exactly_once_under_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let sql = http_pipeline(
        dir.path(),
        &moto,
        "orders",
        "'batch.max_rows' '2000', 'batch.interval' '50ms'",
        "",
    );
    let port = free_port();
    let rt = crate::harness::runtime();
    let n = 30_000;
    let reqs = requests(n, 250);
    let server = Server::start_with(&[&sql], dir.path(), port, &[]);
    let load = Load::start(&rt, port, reqs.clone(), 4);
    let kills = 4;
    // Each killed writer's lease stays behind: its successor takes it over (lease.ttl 2s).
    let server = kill9_under_load(server, &load, &sql, port, Rng(0x53_c0ff_ee), kills, (4, 20));
    let t = table(&moto, "orders");
    let expected: Vec<i64> = (0..n).filter(|i| passes(*i) && !malformed(*i)).collect();
    wait_until(Duration::from_secs(300), "every acknowledged record committed", || {
        (rt.block_on(t.committed_output()) >= expected.len() as u64).then_some(())
    });
    server.stop();
    let acked = load.acked_ids(&reqs);
    assert_eq!(acked.len() as i64, n, "every request was acknowledged in the end");
    assert_eq!(
        rt.block_on(t.logged_ids()),
        expected,
        "the files the log names hold each id once"
    );
    assert_eq!(
        rt.block_on(t.hive_ids()),
        expected,
        "the hive view equals the committed table"
    );
    let dead = rt.block_on(t.dead_letter_ids());
    assert!(dead.values().all(|c| *c == 1), "dead letters once each");
    let want_dead: BTreeSet<i64> = (0..n).filter(|i| malformed(*i)).collect();
    assert_eq!(dead.keys().copied().collect::<BTreeSet<_>>(), want_dead);
    let keys = rt.block_on(t.keys());
    assert!(
        !keys.iter().any(|k| k.starts_with("_sluice/staging/")),
        "nothing left in staging: {:?}",
        keys.iter()
            .filter(|k| k.contains("staging"))
            .take(5)
            .collect::<Vec<_>>()
    );
    let lock = rt.block_on(async {
        let p = object_store::path::Path::from("orders/_sluice/lock/out.json");
        t.store
            .get(&p)
            .await
            .expect("the lease object")
            .bytes()
            .await
            .expect("lease body")
    });
    let lock: serde_json::Value = serde_json::from_slice(&lock).unwrap();
    assert_eq!(lock["released"], true, "a stopped server releases its lease: {lock}");

    // `sluice query` over the s3:// location, credentials from the AWS_* environment.
    let env = moto.env();
    let out = std::process::Command::new(bin())
        .args([
            "query",
            "SELECT count(*) AS n, count(DISTINCT id) AS d FROM out",
            "--table",
            &format!("out=s3://{BUCKET}/orders/"),
            "--format",
            "csv",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "query: {}", String::from_utf8_lossy(&out.stderr));
    let m = expected.len();
    assert!(text.contains(&format!("{m},{m}")), "query output: {text}");
    // `sluice validate` on the file with an s3:// sink.
    let v = std::process::Command::new(bin())
        .args(["validate", sql.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(v.status.success(), "validate: {}", String::from_utf8_lossy(&v.stderr));
    assert!(String::from_utf8_lossy(&v.stdout).contains("s3://lake/orders/"));
    // The secret never reaches a log.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("sluice-stderr") {
            let log = std::fs::read_to_string(&p).unwrap();
            assert!(!log.contains(SECRET), "{} prints the secret key", p.display());
        }
    }
    eprintln!(
        "s3 kill -9 loop: {n} sent, {m} committed, {} dead letters, {kills} kills",
        dead.len()
    );
}

/// `n` NDJSON lines with a 200-character pseudo-random text each (hardly compressible, so the
/// Parquet file is larger than one upload part).
fn big_rows(n: i64) -> String {
    let mut rng = Rng(0xb16_f11e);
    let mut out = String::with_capacity(n as usize * 230);
    for id in 0..n {
        let text: String = (0..25)
            .map(|_| format!("{:08x}", rng.range(0, u64::from(u32::MAX))))
            .collect();
        out.push_str(&format!("{{\"id\": {id}, \"text\": \"{text}\"}}\n"));
    }
    out
}

// A crash in the middle of a multipart upload leaves an unfinished upload behind; the writer's
// recovery aborts it (nothing visible, nothing left in the bucket's upload list), and the
// restarted pipeline commits every row once.
#[cfg(feature = "fault-injection")]
#[test]
fn a_crash_mid_upload_is_aborted_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let incoming = dir.path().join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let n = 80_000;
    drop_file(&incoming, "000.ndjson", &big_rows(n));
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, text VARCHAR) STORED AS NDJSON
             LOCATION '{}'
             OPTIONS ('poll_interval' '50ms', 'batch.max_rows' '100000', 'batch.max_bytes' '64MB',
                      'batch.interval' '2s', 'buffer.max_bytes' '256MB');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION 's3://{BUCKET}/big/'
             OPTIONS ({}, 'lease.ttl' '2s', 'upload.part_size' '5MB', 'dictionary_page_limit' '0');
             INSERT INTO out SELECT id, text FROM ev;",
            incoming.display(),
            moto.options()
        ),
    )
    .unwrap();
    let crashing = Server::start_with(&[&sql], dir.path(), 0, &[("SLUICE_CRASH_AT", "mid_upload")]);
    let status = crashing.wait_exit(Duration::from_secs(120));
    assert!(!status.success(), "the server aborted at the crash point");
    assert!(moto.open_uploads(BUCKET) >= 1, "the crash left an unfinished upload");
    let t = table(&moto, "big");
    let rt = crate::harness::runtime();
    assert_eq!(
        rt.block_on(t.committed_output()),
        0,
        "nothing committed before the crash"
    );

    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(180), "the rows committed after restart", || {
        (rt.block_on(t.committed_output()) >= n as u64).then_some(())
    });
    server.stop();
    assert_eq!(moto.open_uploads(BUCKET), 0, "recovery aborted the unfinished upload");
    let all: Vec<i64> = (0..n).collect();
    assert_eq!(rt.block_on(t.logged_ids()), all);
    assert_eq!(rt.block_on(t.hive_ids()), all);
    let entries = rt.block_on(t.entries());
    let biggest = entries
        .iter()
        .flat_map(|e| e["add"].as_array().cloned().unwrap_or_default())
        .map(|a| a["bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        biggest > 5 * 1024 * 1024,
        "a file went up in several parts ({biggest} bytes)"
    );
}

fn entry(writer: &str, epoch: u64, file: &str) -> CommitEntry {
    CommitEntry {
        version: LOG_VERSION,
        epoch,
        pipeline: writer.into(),
        instance: None,
        committed_at: String::new(),
        add: vec![FileAction {
            path: file.into(),
            rows: 1,
            bytes: 1,
            partition: vec![],
            covers: None,
        }],
        remove: vec![],
        dead_letters: vec![],
        sources: BTreeMap::from([(writer.to_string(), serde_json::json!({ "epoch": epoch }))]),
        counts: Counts::default(),
        schema: TableSchema::default(),
        quality: None,
        archive: None,
        state: None,
    }
}

// Two writers racing for the same commit entry on S3: exactly one wins each epoch, the loser
// moves to the next, and the log stays contiguous with every commit in it once. Below that,
// eight concurrent conditional PUTs of one new object: exactly one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_for_one_entry_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let opts: BTreeMap<String, String> = moto.settings().into_iter().collect();
    let store = TableStore::open_for(&format!("s3://{BUCKET}/race/"), &opts).unwrap();

    let path = store.path("_sluice/contended");
    let puts = (0..8).map(|i| {
        let s = store.store.clone();
        let p = path.clone();
        tokio::spawn(async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            s.put_opts(&p, PutPayload::from(format!("{i}")), opts).await
        })
    });
    let results = futures::future::join_all(puts).await;
    let won = results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
    assert_eq!(won, 1, "exactly one conditional PUT wins: {results:?}");
    for r in &results {
        if let Err(e) = r.as_ref().unwrap() {
            assert!(
                matches!(e, object_store::Error::AlreadyExists { .. }),
                "loser's error: {e}"
            );
        }
    }

    let rounds = 8u64;
    for round in 0..rounds {
        let (a, b) = (CommitLog::new(store.clone(), "a"), CommitLog::new(store.clone(), "b"));
        let (fa, fb) = (format!("a-{round}.parquet"), format!("b-{round}.parquet"));
        a.stage(&fa, b"a".to_vec()).await.unwrap();
        b.stage(&fb, b"b".to_vec()).await.unwrap();
        let mut ea = entry("a", round * 2 + 1, &fa);
        let mut eb = entry("b", round * 2 + 1, &fb);
        let (ra, rb) = tokio::join!(a.commit(&mut ea), b.commit(&mut eb));
        ra.unwrap();
        rb.unwrap();
        let mut got = [ea.epoch, eb.epoch];
        got.sort_unstable();
        assert_eq!(
            got,
            [round * 2 + 1, round * 2 + 2],
            "one wins the epoch, the other takes the next"
        );
    }
    let log = CommitLog::new(store.clone(), "reader");
    let entries = log.entries().await.unwrap();
    let epochs: Vec<u64> = entries.iter().map(|e| e.epoch).collect();
    assert_eq!(epochs, (1..=rounds * 2).collect::<Vec<_>>(), "a contiguous log");
    let files: HashSet<String> = entries
        .iter()
        .flat_map(|e| e.add.iter().map(|f| f.path.clone()))
        .collect();
    assert_eq!(files.len() as u64, rounds * 2, "every commit once");
    for f in &files {
        store
            .store
            .head(&store.path(f))
            .await
            .unwrap_or_else(|e| panic!("{f} in place: {e}"));
    }
}

/// A directory-source pipeline into `s3://lake/<name>/`, run in process with `registry`.
async fn run_dir_pipeline(
    dir: &Path,
    moto: &Moto,
    name: &str,
    sink_options: &str,
    registry: &sluice_engine::connector::registry::Registry,
    rows: i64,
) {
    let incoming = dir.join(format!("in-{name}"));
    std::fs::create_dir_all(&incoming).unwrap();
    for f in 0..3 {
        let body: Vec<String> = (f * rows / 3..(f + 1) * rows / 3)
            .map(|i| format!("{{\"id\": {i}}}"))
            .collect();
        drop_file(&incoming, &format!("{f:03}.ndjson"), &body.join("\n"));
    }
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL) STORED AS NDJSON LOCATION '{}'
         OPTIONS ('poll_interval' '20ms', 'batch.interval' '20ms', 'batch.max_rows' '300');
         CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION 's3://{BUCKET}/{name}/'
         OPTIONS ({}, 'lease.ttl' '2s' {sink_options});
         INSERT INTO out SELECT id, id % 4 AS part FROM ev;",
        incoming.display(),
        moto.options()
    );
    let text = PipelineText::new("s3.sql", sql).unwrap();
    let server = start(&[text], registry, ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap_or_else(|e| panic!("{name}: start failed: {e}"));
    let t = table(moto, name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while t.committed_output().await < rows as u64 {
        assert!(tokio::time::Instant::now() < deadline, "{name}: timed out");
        // Polling interval of a condition wait with a deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown_trigger().trigger();
    server.wait().await.unwrap_or_else(|e| panic!("{name}: {e}"));
    let all: Vec<i64> = (0..rows).collect();
    assert_eq!(t.logged_ids().await, all, "{name}: the log's files hold every id once");
    assert_eq!(t.hive_ids().await, all, "{name}: the hive view holds every id once");
}

// A faulty store in front of S3 (calls fail before or after taking effect, or stall): over
// several seeds, every record is committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_store_in_front_of_s3_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 1..=6u64 {
        let injected = Arc::new(Mutex::new(BTreeMap::new()));
        let mut registry = sluice_connectors::registry_with_state(&dir.path().join(format!(".sluice-{seed}")));
        registry.add_sink(Arc::new(crate::faults::FaultySinkFactory {
            seed,
            injected: injected.clone(),
        }));
        run_dir_pipeline(dir.path(), &moto, &format!("faulty-{seed}"), "", &registry, 900).await;
        for (k, v) in injected.lock().unwrap().iter() {
            *totals.entry(k).or_default() += v;
        }
    }
    assert!(totals.values().sum::<u64>() > 6, "faults were injected: {totals:?}");
    eprintln!("faulty store over S3: injected faults by call: {totals:?}");
}

// Single-writer mode (`'s3.conditional_put' 'disabled'`) for stores without conditional PUT:
// the pipeline runs, commits exactly once, and takes no lease object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_writer_mode_runs_without_conditional_put() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let registry = sluice_connectors::registry_with_state(&dir.path().join(".sluice"));
    run_dir_pipeline(
        dir.path(),
        &moto,
        "single",
        ", 's3.conditional_put' 'disabled'",
        &registry,
        600,
    )
    .await;
    let keys = table(&moto, "single").keys().await;
    assert!(
        !keys.iter().any(|k| k.starts_with("_sluice/lock/")),
        "no lease in single-writer mode"
    );
    // The CLI's maintenance takes single-writer mode from the environment: no lease either.
    let vacuum = |single: bool| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["vacuum", &format!("s3://{BUCKET}/single/")])
            .envs(moto.env().iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir.path());
        if single {
            cmd.env("AWS_CONDITIONAL_PUT", "disabled");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "vacuum: {}", String::from_utf8_lossy(&out.stderr));
    };
    vacuum(true);
    let keys = table(&moto, "single").keys().await;
    assert!(
        !keys.iter().any(|k| k.starts_with("_sluice/lock/")),
        "vacuum took no lease: {keys:?}"
    );
    // Without it the same vacuum runs under a lease (the store has conditional PUT).
    vacuum(false);
    let keys = table(&moto, "single").keys().await;
    assert!(
        keys.iter().any(|k| k.starts_with("_sluice/lock/")),
        "a leased vacuum: {keys:?}"
    );
}

// A second server of the same pipeline on the same S3 sink, while the first runs: it watches
// the first's lease for a TTL and a half, sees it renewed, and exits with an error before
// touching anything; the first keeps committing, every row once.
#[test]
fn a_second_server_on_the_same_s3_sink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let (sql, incoming) = dir_pipeline_on_s3(
        dir.path(),
        &moto,
        "two",
        DirPipeline {
            columns: "id BIGINT NOT NULL",
            source_options: "'batch.interval' '20ms', 'batch.max_rows' '300'",
            partitioned: "",
            sink_options: "'lease.ttl' '2s'",
            select: "id",
        },
    );
    let lines = |r: std::ops::Range<i64>| r.map(|i| format!("{{\"id\": {i}}}")).collect::<Vec<_>>().join("\n");
    drop_file(&incoming, "000.ndjson", &lines(0..1000));
    let t = table(&moto, "two");
    let rt = crate::harness::runtime();
    let first = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "the first server's commits", || {
        (rt.block_on(t.committed_output()) >= 1000).then_some(())
    });
    let state = dir.path().join("state-b");
    let (code, out) = crate::harness::run_to_exit(
        &[
            "run",
            sql.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_ne!(code, 0, "the second server must not run: {out}");
    assert!(out.contains("already running"), "{out}");
    // The first one was not disturbed: it takes more input and commits it once.
    drop_file(&incoming, "001.ndjson", &lines(1000..2000));
    wait_until(Duration::from_secs(60), "the first server's later commits", || {
        (rt.block_on(t.committed_output()) >= 2000).then_some(())
    });
    first.stop();
    let all: Vec<i64> = (0..2000).collect();
    assert_eq!(rt.block_on(t.logged_ids()), all);
    assert_eq!(rt.block_on(t.hive_ids()), all);
}

// A server with five pipelines on S3, killed with -9 and restarted at once: its listener
// answers `/healthz` within 2 s while every pipeline waits for the dead holder's lease
// (`/readyz` 503 naming each, `/v1/pipelines` showing `waiting_for_lease`); the five leases are
// taken together, so it is ready within 3 × lease.ttl (one after another it took up to
// 5 × 2.5 × lease.ttl, with no listener meanwhile: a supervisor's liveness probe killed it
// again); nothing is lost or doubled.
#[test]
fn a_restarted_server_answers_at_once_and_takes_its_leases_together() {
    const PIPELINES: usize = 5;
    const TTL_SECS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let mut text = String::new();
    for p in 0..PIPELINES {
        let incoming = dir.path().join(format!("in{p}"));
        std::fs::create_dir_all(&incoming).unwrap();
        text += &format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev{p} (id BIGINT NOT NULL) STORED AS NDJSON LOCATION '{}'
             OPTIONS ('poll_interval' '20ms', 'batch.interval' '50ms');
             CREATE EXTERNAL TABLE out{p} STORED AS PARQUET LOCATION 's3://{BUCKET}/t{p}/'
             OPTIONS ({}, 'lease.ttl' '{TTL_SECS}s');
             INSERT INTO out{p} SELECT id FROM ev{p};\n",
            incoming.display(),
            moto.options()
        );
    }
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, text).unwrap();
    let lines = |r: std::ops::Range<i64>| r.map(|i| format!("{{\"id\": {i}}}")).collect::<Vec<_>>().join("\n");
    let drop_all = |name: &str, ids: std::ops::Range<i64>| {
        for p in 0..PIPELINES {
            drop_file(&dir.path().join(format!("in{p}")), name, &lines(ids.clone()));
        }
    };
    let tables: Vec<S3Table> = (0..PIPELINES).map(|p| table(&moto, &format!("t{p}"))).collect();
    let rt = crate::harness::runtime();
    let committed = |n: u64| {
        tables
            .iter()
            .all(|t| rt.block_on(t.committed_output()) >= n)
            .then_some(())
    };
    drop_all("000.ndjson", 0..500);
    let port = free_port();
    let server = Server::start_with(&[&sql], dir.path(), port, &[]);
    wait_until(Duration::from_secs(60), "every pipeline's first commits", || committed(500));
    server.kill9();

    let restarted = std::time::Instant::now();
    let server = Server::spawn_on(&[&sql], dir.path(), port, &[]);
    drop_all("001.ndjson", 500..1000);
    let http = reqwest::Client::new();
    let get = |path: &str| {
        rt.block_on(async {
            let r = http.get(server.url(path)).send().await.ok()?;
            let status = r.status().as_u16();
            Some((r.text().await.ok()?, status))
        })
    };
    let healthy = wait_until(Duration::from_secs(30), "/healthz", || {
        get("/healthz").filter(|(_, s)| *s == 200).map(|_| restarted.elapsed())
    });
    assert!(healthy < Duration::from_secs(2), "/healthz answered after {healthy:?}");
    let (why, status) = get("/readyz").expect("/readyz answers");
    assert_eq!(status, 503, "not ready while the leases are held: {why}");
    for p in 0..PIPELINES {
        assert!(why.contains(&format!("out{p} (waiting for its lease")), "{why}");
    }
    let (listing, _) = get("/v1/pipelines").expect("/v1/pipelines answers");
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let states: Vec<&str> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, vec!["waiting_for_lease"; PIPELINES], "{listing}");
    let ready = wait_until(Duration::from_secs(120), "/readyz 200", || {
        get("/readyz").filter(|(_, s)| *s == 200).map(|_| restarted.elapsed())
    });
    assert!(
        ready < Duration::from_secs(3 * TTL_SECS),
        "ready after {ready:?}: the leases were not taken together (lease.ttl {TTL_SECS}s)"
    );
    wait_until(Duration::from_secs(60), "every pipeline's later commits", || committed(1000));
    server.stop();
    let all: Vec<i64> = (0..1000).collect();
    for t in &tables {
        assert_eq!(rt.block_on(t.logged_ids()), all, "{}: each id once", t.root);
        assert_eq!(rt.block_on(t.hive_ids()), all, "{}: the hive view", t.root);
    }
    eprintln!("restart with {PIPELINES} pipelines on S3: /healthz after {healthy:?}, ready after {ready:?} (lease.ttl {TTL_SECS}s)");
}


// Maintenance on S3 while the server writes the same table: report-only reconciles run
// again and again while a compaction commits (each exits 0: a file the compaction moved to
// `_sluice/removed/` after a report's snapshot is read from there, never a false "missing"),
// then vacuum with no retention, then a repair of a lost file, all while new files stream in;
// every id is committed once, the hive view equals the log, and `sluice check` is clean.
#[test]
fn compaction_vacuum_and_a_repair_on_s3_while_the_server_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let (sql, incoming) = dir_pipeline_on_s3(
        dir.path(),
        &moto,
        "m",
        DirPipeline {
            columns: "id BIGINT NOT NULL, day BIGINT",
            source_options: "'batch.interval' '50ms'",
            partitioned: "PARTITIONED BY (day)",
            sink_options: "'lease.ttl' '2s', 'key' 'id'",
            select: "id, day",
        },
    );
    let env = moto.env();
    let sluice = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    };
    let lines = |r: std::ops::Range<i64>| {
        r.map(|i| format!("{{\"id\": {i}, \"day\": {}}}", i % 4))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let t = table(&moto, "m");
    let rt = crate::harness::runtime();
    let per = 50i64;
    let server = Server::start(&[&sql], dir.path());
    // A dozen commits first: small files in every partition.
    for f in 0..12 {
        drop_file(&incoming, &format!("{f:04}.ndjson"), &lines(f * per..(f + 1) * per));
        wait_until(Duration::from_secs(60), "the file committed", || {
            (rt.block_on(t.committed_output()) >= ((f + 1) * per) as u64).then_some(())
        });
    }
    let rest = std::thread::spawn({
        let incoming = incoming.clone();
        move || {
            for f in 12..24 {
                drop_file(&incoming, &format!("{f:04}.ndjson"), &lines(f * per..(f + 1) * per));
            }
        }
    });
    let location = format!("s3://{BUCKET}/m/");
    let done = std::sync::atomic::AtomicBool::new(false);
    let reports = std::thread::scope(|s| {
        let reports = s.spawn(|| {
            let mut runs = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Acquire) || runs.is_empty() {
                runs.push(sluice(&["reconcile", sql.to_str().unwrap(), "--pipeline", "out"]));
            }
            runs
        });
        let (code, out) = sluice(&["compact", &location, "--target-file-size", "1MB"]);
        done.store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(code, 0, "compact: {out}");
        assert!(out.contains("compacted 4 partition(s)"), "{out}");
        reports.join().unwrap()
    });
    for (code, out) in &reports {
        assert_eq!(*code, 0, "a report-only reconcile during the compaction: {out}");
    }
    let (code, out) = sluice(&["vacuum", &location, "--retention", "0"]);
    assert_eq!(code, 0, "vacuum: {out}");
    // A lost file (deleted behind Sluice's back) is found and restored by a repair, while the
    // stream goes on.
    let lost = rt.block_on(async {
        // The newest live file (the stream's or the compaction's) of an entry that is not its
        // writer's newest (recovery of a writer checks that its newest entry's files exist).
        let entries = t.entries().await;
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        for e in &entries {
            newest.insert(e["pipeline"].as_str().unwrap().to_string(), e["epoch"].as_u64().unwrap());
        }
        let removed: BTreeSet<String> = entries
            .iter()
            .flat_map(|e| e["remove"].as_array().cloned().unwrap_or_default())
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        let path = entries
            .iter()
            .filter(|e| newest[e["pipeline"].as_str().unwrap()] != e["epoch"].as_u64().unwrap())
            .flat_map(|e| e["add"].as_array().cloned().unwrap_or_default())
            .map(|a| a["path"].as_str().unwrap().to_string())
            .filter(|p| !removed.contains(p))
            .last()
            .expect("a live file");
        t.store
            .delete(&object_store::path::Path::from(format!("m/{path}")))
            .await
            .unwrap();
        path
    });
    let (code, out) = sluice(&["reconcile", sql.to_str().unwrap(), "--pipeline", "out", "--repair"]);
    assert_eq!(code, 1, "the repair reports the difference it fixed: {out}");
    assert!(out.contains(&lost) || out.contains("missing"), "{out}");
    rest.join().unwrap();
    let n = 24 * per;
    wait_until(Duration::from_secs(60), "every file committed", || {
        (rt.block_on(t.committed_output()) >= n as u64).then_some(())
    });
    server.stop();
    let all: Vec<i64> = (0..n).collect();
    assert_eq!(rt.block_on(t.logged_ids()), all, "each id once in the files the log names");
    assert_eq!(rt.block_on(t.hive_ids()), all, "the hive view equals the log");
    let (code, out) = sluice(&["check", &location]);
    assert_eq!(code, 0, "check: {out}");
    let (code, out) = sluice(&["reconcile", sql.to_str().unwrap(), "--pipeline", "out"]);
    assert_eq!(code, 0, "equal after the repair: {out}");
    eprintln!("maintenance on S3 while writing: {} report-only reconciles during the compaction", reports.len());
}

/// The state letter of a process (`T` when stopped), from /proc.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until `child` is stopped; fails with its output if it exits instead.
fn frozen(mut child: std::process::Child, what: &str) -> std::process::Child {
    wait_until(Duration::from_secs(60), what, || {
        if let Ok(Some(_)) = child.try_wait() {
            return Some(false);
        }
        (proc_state(child.id()) == Some('T')).then_some(true)
    })
    .then_some(())
    .unwrap_or_else(|| {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("{what}: it exited instead: {err}")
    });
    child
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

// Two maintenance processes and a lease taken over between them, on S3: A is frozen (SIGSTOP)
// in its recovery just before deleting a staged file it listed (an orphan of a compaction that
// crashed); B takes A's lease over, removes that orphan itself, stages its own merged file
// under the same name and is frozen before its commit entry. A, resumed, must not delete
// B's file (the delete is fenced: A's lease has expired) and exits with an error; B, resumed,
// commits; nothing is lost or doubled and `sluice check` is clean.
#[test]
fn a_frozen_maintenance_process_deletes_nothing_after_its_lease_was_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path(), BUCKET);
    let (sql, incoming) = dir_pipeline_on_s3(
        dir.path(),
        &moto,
        "frozen",
        DirPipeline {
            columns: "id BIGINT NOT NULL",
            source_options: "'batch.interval' '50ms'",
            partitioned: "",
            sink_options: "'lease.ttl' '3s'",
            select: "id",
        },
    );
    let t = table(&moto, "frozen");
    let rt = crate::harness::runtime();
    let server = Server::start(&[&sql], dir.path());
    for f in 0..6i64 {
        let lines: Vec<String> = (f * 100..(f + 1) * 100).map(|i| format!("{{\"id\": {i}}}")).collect();
        drop_file(&incoming, &format!("{f:03}.ndjson"), &lines.join("\n"));
        wait_until(Duration::from_secs(60), "the file committed", || {
            (rt.block_on(t.committed_output()) >= ((f + 1) * 100) as u64).then_some(())
        });
    }
    server.stop();
    let location = format!("s3://{BUCKET}/frozen/");
    let compact = |env: &[(&str, &str)]| {
        std::process::Command::new(bin())
            .args(["compact", &location])
            .envs(moto.env().iter().map(|(k, v)| (*k, v.clone())))
            .env("SLUICE_LEASE_TTL", "3s")
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A compaction killed after staging its merged file: an orphan, and a lease left behind.
    let crashed = compact(&[("SLUICE_CRASH_AT", "after_stage")]).wait_with_output().unwrap();
    assert!(!crashed.status.success());
    let staged = rt.block_on(t.keys());
    let orphan: Vec<&String> = staged.iter().filter(|k| k.starts_with("_sluice/staging/maintenance/")).collect();
    assert_eq!(orphan.len(), 1, "{staged:?}");
    // A takes the lease over and is frozen before it deletes the orphan.
    let a = compact(&[("SLUICE_STOP_AT", "before_orphan_delete")]);
    let a = frozen(a, "A frozen in its recovery");
    // B takes A's lease over, deletes the orphan, stages the same name and is frozen.
    let b = compact(&[("SLUICE_STOP_AT", "after_stage")]);
    let b = frozen(b, "B frozen before its commit entry");
    let keys = rt.block_on(t.keys());
    assert!(keys.contains(orphan[0]), "B staged the same name: {keys:?}");
    signal(&a, "-CONT");
    let a = a.wait_with_output().unwrap();
    let a_err = String::from_utf8_lossy(&a.stderr);
    assert!(!a.status.success(), "A must stop: {a_err}");
    assert!(a_err.contains("no longer holds its lease"), "{a_err}");
    let keys = rt.block_on(t.keys());
    assert!(keys.contains(orphan[0]), "A deleted B's staged file: {keys:?}");
    signal(&b, "-CONT");
    let b = b.wait_with_output().unwrap();
    assert!(b.status.success(), "B: {}", String::from_utf8_lossy(&b.stderr));
    let all: Vec<i64> = (0..600).collect();
    assert_eq!(rt.block_on(t.logged_ids()), all, "each id once in the files the log names");
    assert_eq!(rt.block_on(t.hive_ids()), all, "the hive view equals the log");
    let check = std::process::Command::new(bin())
        .args(["check", &location])
        .envs(moto.env().iter().map(|(k, v)| (*k, v.clone())))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(check.status.success(), "check: {}", String::from_utf8_lossy(&check.stdout));
}
