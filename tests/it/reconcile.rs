//! `sluice reconcile` end to end: a corrected enrichment table is found partition by partition
//! and column by column, repaired in one commit, and equal afterwards (DuckDB reading the
//! partition directories sees exactly the batch result); lost and hand-duplicated files are
//! flagged with exact row counts; a declared key names exactly the missing, extra and changed
//! keys; a repair while the server keeps writing the same sink loses and doubles nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use serde_json::Value;

use crate::harness::{Server, drop_file, log_entries, read_hive, run_to_exit, wait_until};

const DAYS: i64 = 4;

/// Order `i`: amount, currency, day (the partition).
fn order(i: i64) -> (f64, &'static str, i64) {
    let currency = match i % 10 {
        0..=5 => "USD",
        6 | 7 => "GBP",
        _ => "EUR",
    };
    // EUR orders only on days 1 and 3: days 0 and 2 must compare equal after a EUR fix.
    let day = if currency == "EUR" { 1 + 2 * (i % 2) } else { i % DAYS };
    ((i % 97) as f64 + 0.25, currency, day)
}

struct Lake {
    dir: tempfile::TempDir,
    incoming: PathBuf,
    sink: PathBuf,
    sql: PathBuf,
    fx: PathBuf,
}

fn write_fx(path: &Path, eur: f64) {
    std::fs::write(path, format!("currency,rate\nUSD,1.0\nEUR,{eur}\nGBP,1.25\n")).unwrap();
}

fn lake(options: &str) -> Lake {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let sink = dir.path().join("lake/out");
    let fx = dir.path().join("fx.csv");
    write_fx(&fx, 1.1);
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE orders (id BIGINT NOT NULL, amount DOUBLE, currency VARCHAR, day BIGINT)
             STORED AS NDJSON LOCATION '{incoming}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
             CREATE EXTERNAL TABLE fx STORED AS CSV LOCATION '{fx}' OPTIONS ('format.has_header' 'true');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (day) LOCATION '{sink}' OPTIONS ({options});
             INSERT INTO out SELECT o.id, o.amount * fx.rate AS usd, o.currency, o.day
             FROM orders o JOIN fx ON o.currency = fx.currency;
             CREATE EXPECTATION no_negative ON orders CHECK (amount >= 0) ON VIOLATION DEAD_LETTER;",
            incoming = incoming.display(),
            fx = fx.display(),
            sink = sink.display()
        ),
    )
    .unwrap();
    Lake { dir, incoming, sink, sql, fx }
}

fn body(ids: std::ops::Range<i64>) -> String {
    ids.map(|i| {
        let (amount, currency, day) = order(i);
        // Every 50th order is negative: dead-lettered by the expectation, in the stream and in
        // the batch alike.
        let amount = if i % 50 == 49 { -amount } else { amount };
        format!("{{\"id\": {i}, \"amount\": {amount}, \"currency\": \"{currency}\", \"day\": {day}}}\n")
    })
    .collect()
}

fn accounted(sink: &Path) -> u64 {
    log_entries(sink)
        .iter()
        .filter(|e| e["pipeline"] == "out")
        .map(|e| e["counts"]["received"].as_u64().unwrap_or(0))
        .sum()
}

/// Streams orders `0..n` in `files` files, then stops the server.
fn stream(l: &Lake, n: i64, files: i64) {
    let server = Server::start(&[&l.sql], l.dir.path());
    for f in 0..files {
        let (a, b) = (n * f / files, n * (f + 1) / files);
        drop_file(&l.incoming, &format!("{f:04}.ndjson"), &body(a..b));
    }
    wait_until(Duration::from_secs(60), "every order committed", || {
        (accounted(&l.sink) == n as u64).then_some(())
    });
    server.stop();
}

/// Runs `sluice reconcile` over everything; exit code, output and the JSON report.
fn reconcile(l: &Lake, extra: &[&str]) -> (i32, String, Value) {
    let report = l.dir.path().join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut args = vec![
        "reconcile",
        l.sql.to_str().unwrap(),
        "--pipeline",
        "out",
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, out) = run_to_exit(&args, l.dir.path());
    let json = std::fs::read(&report).map(|b| serde_json::from_slice(&b).unwrap()).unwrap_or(Value::Null);
    (code, out, json)
}

fn differing(report: &Value) -> BTreeMap<String, Value> {
    report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["verdict"] == "differs")
        .map(|p| (p["partition"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// (id, usd) of every row plain hive readers see, read by DuckDB from the directories.
fn duckdb_rows(sink: &Path) -> BTreeMap<i64, f64> {
    let py = crate::readers::python();
    let script = "import duckdb, sys, json\n\
        rows = duckdb.sql(f\"SELECT id, usd FROM read_parquet('{sys.argv[1]}/*/*.parquet', hive_partitioning=true)\").fetchall()\n\
        print(json.dumps(rows))\n";
    let out = Command::new(&py).args(["-c", script, sink.to_str().unwrap()]).output().expect("run python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<(i64, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    let mut map = BTreeMap::new();
    for (id, usd) in rows {
        assert!(map.insert(id, usd).is_none(), "id {id} twice in the directories");
    }
    map
}

fn rate(currency: &str, eur: f64) -> f64 {
    match currency {
        "EUR" => eur,
        "GBP" => 1.25,
        _ => 1.0,
    }
}

/// The rows the batch view must hold: every order but the dead-lettered ones, at `eur`.
fn expected(n: i64, eur: f64) -> BTreeMap<i64, f64> {
    (0..n)
        .filter(|i| i % 50 != 49)
        .map(|i| {
            let (amount, currency, _) = order(i);
            (i, amount * rate(currency, eur))
        })
        .collect()
}

#[test]
fn a_corrected_enrichment_table_is_found_repaired_and_then_equal() {
    let l = lake("'key' 'id'");
    let n = 2000;
    stream(&l, n, 4);
    let archived: u64 = log_entries(&l.sink).iter().map(|e| e["archive"]["rows"].as_u64().unwrap_or(0)).sum();
    assert_eq!(archived, n as u64 - n as u64 / 50, "every accepted event is archived, dead letters are not");

    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "nothing changed yet: {out}");

    // The EUR rate is corrected after streaming.
    write_fx(&l.fx, 1.2);
    let (code, out, report) = reconcile(&l, &[]);
    assert_eq!(code, 1, "{out}");
    let diff = differing(&report);
    assert_eq!(diff.keys().cloned().collect::<Vec<_>>(), vec!["day=1/", "day=3/"], "{out}");
    for (part, p) in &diff {
        assert_eq!(strings(&p["columns"]), vec!["usd"], "{part}: {p}");
        assert_eq!(p["stream_rows"], p["batch_rows"]);
        let day: i64 = part[4..5].parse().unwrap();
        // Keys are listed in numeric order.
        let eur_ids: Vec<String> = (0..n)
            .filter(|i| i % 50 != 49 && order(*i).1 == "EUR" && order(*i).2 == day)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(strings(&p["keys"]["changed"]), eur_ids, "{part}");
        assert!(strings(&p["keys"]["missing"]).is_empty() && strings(&p["keys"]["extra"]).is_empty());
    }
    assert!(out.contains("DIFFERS") && out.contains("day=1"), "{out}");

    let (code, out, report) = reconcile(&l, &["--repair"]);
    assert_eq!(code, 1, "differences found and repaired: {out}");
    let removed = strings(&report["repair"]["removed"]);
    assert!(!removed.is_empty() && removed.iter().all(|p| p.starts_with("day=1/") || p.starts_with("day=3/")));
    for p in &removed {
        assert!(!l.sink.join(p).exists(), "{p} left the partition directory");
    }
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "equal after the repair: {out}");
    let (code, out, report) = reconcile(&l, &["--repair"]);
    assert_eq!((code, report.get("repair").is_none()), (0, true), "a second repair changes nothing: {out}");

    // Plain readers see exactly the batch result.
    let seen = duckdb_rows(&l.sink);
    let want = expected(n, 1.2);
    assert_eq!(seen.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (id, usd) in &want {
        assert!((seen[id] - usd).abs() < 1e-9, "id {id}: {} != {usd}", seen[id]);
    }
    let (code, out) = run_to_exit(&["check", l.sink.to_str().unwrap()], l.dir.path());
    assert_eq!(code, 0, "{out}");

    // The stream starts again over the repaired table (its last commit's files were removed
    // by the repair) and goes on; the whole range is still equal.
    let server = Server::start(&[&l.sql], l.dir.path());
    drop_file(&l.incoming, "more.ndjson", &body(n..n + 100));
    wait_until(Duration::from_secs(60), "the new orders committed", || {
        (accounted(&l.sink) == n as u64 + 100).then_some(())
    });
    server.stop();
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(duckdb_rows(&l.sink).len(), expected(n + 100, 1.2).len());
}

/// Writes one row of a committed file of `partition`, its id changed to `id`, under a name no
/// commit knows.
fn stray_row(sink: &Path, partition: &str, id: i64) {
    let dir = sink.join(partition);
    let file = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "parquet")).unwrap();
    let bytes = bytes::Bytes::from(std::fs::read(&file).unwrap());
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
    let batch = reader.into_iter().next().unwrap().unwrap().slice(0, 1);
    let mut cols = batch.columns().to_vec();
    cols[0] = std::sync::Arc::new(Int64Array::from(vec![id]));
    let row = RecordBatch::try_new(batch.schema(), cols).unwrap();
    let out = std::fs::File::create(dir.join("stray-by-hand.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(out, row.schema(), None).unwrap();
    w.write(&row).unwrap();
    w.close().unwrap();
}

/// Ids in a Parquet file, in numeric order, as text.
fn ids_in(path: &Path) -> Vec<String> {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
    let mut ids: Vec<i64> = reader
        .flat_map(|b| b.unwrap().column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    ids.sort();
    ids.iter().map(|i| i.to_string()).collect()
}

#[test]
fn lost_duplicated_and_stray_files_are_flagged_exactly_and_repaired() {
    let l = lake("'key' 'id'");
    let n = 1200;
    stream(&l, n, 3);
    let committed = |part: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(l.sink.join(part)).unwrap().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    };
    // day=0: one committed file deleted; day=2: one duplicated by hand; day=1: a stray row.
    let lost = committed("day=0")[0].clone();
    let lost_ids = ids_in(&lost);
    std::fs::remove_file(&lost).unwrap();
    let dup = committed("day=2")[0].clone();
    let dup_ids = ids_in(&dup);
    std::fs::copy(&dup, l.sink.join("day=2/copy-by-hand.parquet")).unwrap();
    stray_row(&l.sink, "day=1", 999_999);

    let (code, out, report) = reconcile(&l, &[]);
    assert_eq!(code, 1, "{out}");
    let diff = differing(&report);
    assert_eq!(diff.keys().cloned().collect::<Vec<_>>(), vec!["day=0/", "day=1/", "day=2/"], "{out}");
    let rows = |p: &Value| (p["stream_rows"].as_u64().unwrap(), p["batch_rows"].as_u64().unwrap());
    let (s0, b0) = rows(&diff["day=0/"]);
    assert_eq!(b0 - s0, lost_ids.len() as u64);
    assert_eq!(strings(&diff["day=0/"]["keys"]["missing"]), lost_ids);
    assert_eq!(strings(&diff["day=0/"]["missing_files"]).len(), 1);
    let (s2, b2) = rows(&diff["day=2/"]);
    assert_eq!(s2 - b2, dup_ids.len() as u64);
    assert_eq!(strings(&diff["day=2/"]["keys"]["changed"]), dup_ids, "duplicated keys are changed keys");
    assert_eq!(strings(&diff["day=2/"]["stray_files"]), vec!["day=2/copy-by-hand.parquet"]);
    let (s1, b1) = rows(&diff["day=1/"]);
    assert_eq!(s1 - b1, 1);
    assert_eq!(strings(&diff["day=1/"]["keys"]["extra"]), vec!["999999"]);
    assert!(strings(&diff["day=1/"]["keys"]["missing"]).is_empty() && strings(&diff["day=1/"]["keys"]["changed"]).is_empty());
    assert!(out.contains("committed file missing") && out.contains("file no commit names"), "{out}");

    let (code, out, _) = reconcile(&l, &["--repair"]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "{out}");
    let seen = duckdb_rows(&l.sink);
    assert_eq!(seen.len(), expected(n, 1.1).len());
    let (code, out) = run_to_exit(&["check", l.sink.to_str().unwrap()], l.dir.path());
    assert_eq!(code, 0, "nothing stray is left where readers read: {out}");
}

#[test]
fn a_range_covers_exactly_the_commits_staged_in_it() {
    let l = lake("'key' 'id'");
    // Two commits at least: the second file is dropped once the first is committed.
    let server = Server::start(&[&l.sql], l.dir.path());
    drop_file(&l.incoming, "0000.ndjson", &body(0..300));
    wait_until(Duration::from_secs(60), "the first file committed", || (accounted(&l.sink) == 300).then_some(()));
    drop_file(&l.incoming, "0001.ndjson", &body(300..600));
    wait_until(Duration::from_secs(60), "the second file committed", || (accounted(&l.sink) == 600).then_some(()));
    server.stop();
    let entries = log_entries(&l.sink);
    let times: Vec<String> = entries.iter().map(|e| e["committed_at"].as_str().unwrap().to_string()).collect();
    // From just after the first commit: its events are out of the range.
    assert!(entries.len() >= 2);
    let first = chrono::DateTime::parse_from_rfc3339(&times[0]).unwrap() + chrono::Duration::microseconds(1);
    let first_events = entries[0]["archive"]["rows"].as_u64().unwrap();
    let total: u64 = entries.iter().map(|e| e["archive"]["rows"].as_u64().unwrap_or(0)).sum();
    let (code, out, report) = reconcile(&l, &["--from", &first.to_rfc3339()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["archive_events"].as_u64().unwrap(), total - first_events, "{report}");
    assert_eq!(report["epochs"][0].as_u64().unwrap(), entries[1]["epoch"].as_u64().unwrap());
    // A range before everything covers nothing and is equal.
    let (code, out, report) = reconcile(&l, &["--to", "2000-01-01"]);
    assert_eq!(code, 0, "{out}");
    assert!(report["epochs"].is_null() && report["partitions"].as_array().unwrap().is_empty(), "{report}");
    // Errors exit 2.
    let (code, out, _) = reconcile(&l, &["--from", "yesterday"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("neither a date nor an RFC 3339 instant"), "{out}");
}

#[test]
fn a_repair_while_the_server_writes_loses_and_doubles_nothing() {
    let l = lake("'key' 'id'");
    let server = Server::start(&[&l.sql], l.dir.path());
    let n = 3000i64;
    let files = 30i64;
    let mut sent = 0;
    for f in 0..files / 2 {
        drop_file(&l.incoming, &format!("{f:04}.ndjson"), &body(n * f / files..n * (f + 1) / files));
        sent = n * (f + 1) / files;
    }
    wait_until(Duration::from_secs(60), "the first half committed", || {
        (accounted(&l.sink) == sent as u64).then_some(())
    });
    write_fx(&l.fx, 1.2);
    // The repair runs while the second half streams in.
    let rest = std::thread::spawn({
        let incoming = l.incoming.clone();
        move || {
            for f in files / 2..files {
                drop_file(&incoming, &format!("{f:04}.ndjson"), &body(n * f / files..n * (f + 1) / files));
            }
        }
    });
    let (code, out, report) = reconcile(&l, &["--repair"]);
    assert_eq!(code, 1, "{out}");
    assert!(report["repair"]["epoch"].as_u64().is_some(), "{report}");
    rest.join().unwrap();
    wait_until(Duration::from_secs(60), "every order committed", || {
        (accounted(&l.sink) == n as u64).then_some(())
    });
    server.stop();
    // Every order once, at the corrected rate (the stream read the corrected table too once
    // it changed; the repair fixed what it had written before).
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "{out}");
    let rt = crate::harness::runtime();
    let batches = rt.block_on(read_hive(&l.sink, &[("day", DataType::Int64)], "SELECT id, usd FROM t"));
    let mut seen = BTreeMap::new();
    for b in &batches {
        let (id, usd) = (b.column(0).as_primitive::<Int64Type>(), b.column(1).as_primitive::<Float64Type>());
        for i in 0..b.num_rows() {
            assert!(seen.insert(id.value(i), usd.value(i)).is_none(), "id {} twice", id.value(i));
        }
    }
    let want = expected(n, 1.2);
    assert_eq!(seen.len(), want.len(), "nothing lost");
    for (id, usd) in &want {
        assert!((seen[id] - usd).abs() < 1e-9, "id {id}");
    }
}

/// Parquet files directly in the sink's partition directories.
fn data_files(sink: &Path) -> usize {
    (0..DAYS)
        .map(|d| {
            std::fs::read_dir(sink.join(format!("day={d}")))
                .map(|rd| rd.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "parquet")).count())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn compaction_and_vacuum_while_the_server_writes_lose_nothing() {
    let l = lake("'key' 'id'");
    let server = Server::start(&[&l.sql], l.dir.path());
    let (per, files) = (50i64, 24i64);
    // Twelve commits first: a dozen small files in every partition.
    for f in 0..files / 2 {
        drop_file(&l.incoming, &format!("{f:04}.ndjson"), &body(f * per..(f + 1) * per));
        wait_until(Duration::from_secs(60), "the file committed", || {
            (accounted(&l.sink) == ((f + 1) * per) as u64).then_some(())
        });
    }
    let before = data_files(&l.sink);
    assert!(before >= 4 * (files / 2) as usize - 4, "{before} files");
    // The other half streams in while compaction and vacuum run.
    let rest = std::thread::spawn({
        let incoming = l.incoming.clone();
        move || {
            for f in files / 2..files {
                drop_file(&incoming, &format!("{f:04}.ndjson"), &body(f * per..(f + 1) * per));
            }
        }
    });
    let sink = l.sink.to_str().unwrap();
    let (code, out) = run_to_exit(&["compact", sink, "--target-file-size", "1MB"], l.dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("compacted 4 partition(s)"), "{out}");
    let (code, out) = run_to_exit(&["vacuum", sink, "--retention", "0"], l.dir.path());
    assert_eq!(code, 0, "{out}");
    rest.join().unwrap();
    let n = per * files;
    wait_until(Duration::from_secs(60), "every order committed", || {
        (accounted(&l.sink) == n as u64).then_some(())
    });
    server.stop();
    assert!(!l.sink.join("_sluice/removed").exists() || crate::harness::files_under(&l.sink.join("_sluice/removed")).is_empty());

    // Every order once, as plain readers and as reconcile see it; fewer files than commits.
    let seen = duckdb_rows(&l.sink);
    let want = expected(n, 1.1);
    assert_eq!(seen.len(), want.len(), "nothing lost or doubled");
    for (id, usd) in &want {
        assert!((seen[id] - usd).abs() < 1e-9, "id {id}");
    }
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "compacted files still cover their epochs: {out}");
    let (code, out) = run_to_exit(&["check", sink], l.dir.path());
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_to_exit(&["compact", sink, "--target-file-size", "1MB"], l.dir.path());
    assert_eq!(code, 0, "{out}");
    let after = data_files(&l.sink);
    assert_eq!(after, 4, "one file per partition left of {} commits' worth", files);
    assert_eq!(duckdb_rows(&l.sink).len(), want.len(), "a second compaction keeps every row");
}

/// A child process killed when the test ends, however it ends.
#[cfg(feature = "cluster")]
struct Child(std::process::Child);

#[cfg(feature = "cluster")]
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Ballista scheduler and executor, each its own `sluice` process on loopback ports, logging
/// under `dir`; the guards stop them. Returns the cluster's `df://` URL.
fn start_cluster(dir: &Path) -> (Child, Child, String) {
    use crate::harness::{bin, free_port};
    let (sched, flight, grpc) = (free_port(), free_port(), free_port());
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let scheduler = Child(
        Command::new(bin())
            .args(["scheduler", "--bind", &format!("127.0.0.1:{sched}")])
            .stdout(log("scheduler.log"))
            .stderr(log("scheduler.err"))
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(60), "the scheduler listens", || {
        std::net::TcpStream::connect(("127.0.0.1", sched)).ok()
    });
    let executor = Child(
        Command::new(bin())
            .args([
                "executor",
                "--scheduler",
                &format!("127.0.0.1:{sched}"),
                "--bind",
                &format!("127.0.0.1:{flight}"),
                "--grpc-port",
                &grpc.to_string(),
                "--work-dir",
                dir.join("executor").to_str().unwrap(),
            ])
            .stdout(log("executor.log"))
            .stderr(log("executor.err"))
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(60), "the executor listens", || {
        std::net::TcpStream::connect(("127.0.0.1", flight)).ok()
    });
    (scheduler, executor, format!("df://127.0.0.1:{sched}"))
}

/// `--cluster`: the same reconciliation through an Apache Ballista scheduler and executor,
/// each a separate `sluice` process on loopback ports, reports exactly what the in-process run
/// reports, and its repair makes the table equal.
#[cfg(feature = "cluster")]
#[test]
fn ballista_gives_the_same_report_as_in_process() {
    let l = lake("'key' 'id'");
    let n = 1200;
    stream(&l, n, 3);
    write_fx(&l.fx, 1.2);
    let (_scheduler, _executor, url) = start_cluster(l.dir.path());
    let (local_code, local_out, local) = reconcile(&l, &[]);
    let (code, out, remote) = reconcile(&l, &["--cluster", &url]);
    let logs = || std::fs::read_to_string(l.dir.path().join("executor.err")).unwrap_or_default();
    assert_eq!((code, local_code), (1, 1), "{out}\n{local_out}\n{}", logs());
    assert_eq!(remote["partitions"], local["partitions"], "{out}\n{local_out}");
    assert_eq!(remote["archive_events"], local["archive_events"]);
    assert!(!differing(&remote).is_empty());
    let (code, out, _) = reconcile(&l, &["--cluster", &url, "--repair"]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = reconcile(&l, &["--cluster", &url]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(duckdb_rows(&l.sink).len(), expected(n, 1.2).len());
}

/// A repair killed at each step of its commit (files staged; entry written; some files moved)
/// never leaves readers a doubled or half-repaired partition for good: the next server start
/// discards a repair whose entry was never written and finishes one whose entry was.
#[cfg(feature = "fault-injection")]
#[test]
fn a_repair_killed_at_any_step_is_finished_or_discarded() {
    use crate::harness::bin;
    for (point, committed) in [("after_stage", false), ("after_log_put", true), ("after_move", true)] {
        let l = lake("'key' 'id'");
        let n = 600;
        stream(&l, n, 2);
        write_fx(&l.fx, 1.2);
        let out = Command::new(bin())
            .args(["reconcile", l.sql.to_str().unwrap(), "--pipeline", "out", "--repair"])
            .env("SLUICE_CRASH_AT", point)
            .current_dir(l.dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: the repair was killed");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("SLUICE_CRASH_AT={point}")), "{point}");

        // The server starts over the table and streams on.
        let server = Server::start(&[&l.sql], l.dir.path());
        drop_file(&l.incoming, "more.ndjson", &body(n..n + 100));
        wait_until(Duration::from_secs(60), "the new orders committed", || {
            (accounted(&l.sink) == n as u64 + 100).then_some(())
        });
        server.stop();
        // The server start alone made the table whole: every committed file in place, no id
        // twice where plain readers read (before any reconcile, which would also finish it).
        let (code, out) = run_to_exit(&["check", l.sink.to_str().unwrap()], l.dir.path());
        assert_eq!(code, 0, "{point}: {out}");
        assert_eq!(duckdb_rows(&l.sink).len(), expected(n + 100, 1.2).len(), "{point}");
        let (code, out, _) = reconcile(&l, &[]);
        assert_eq!(code, if committed { 0 } else { 1 }, "{point}: repaired only if its entry was written: {out}");
        if !committed {
            let (code, out, _) = reconcile(&l, &["--repair"]);
            assert_eq!(code, 1, "{point}: {out}");
        }
        // Every order once (duckdb_rows fails on a doubled id), at the corrected rate.
        let seen = duckdb_rows(&l.sink);
        let want = expected(n + 100, 1.2);
        assert_eq!(seen.len(), want.len(), "{point}");
        for (id, usd) in &want {
            assert!((seen[id] - usd).abs() < 1e-9, "{point}: id {id}");
        }
    }
}

/// Late rows: the stream leaves them out (and marks the partitions they would have written
/// dirty); reconcile recomputes from the raw archive, which keeps them, finds exactly those
/// partitions different, names them as the late rows' partitions, and a repair brings the late
/// rows into the table.
#[test]
fn reconcile_brings_late_rows_into_the_batch_view() {
    let t = crate::event_time::Adhoc::start_partitioned(
        "ev (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL)",
        "'event_time' 'ts', 'watermark.delay' '1h'",
        "PARTITIONED BY (day)",
        "INSERT INTO out SELECT id, ts, CAST(ts AS DATE) AS day FROM ev;",
    );
    // Days 1..=4, one event an hour; then ids 1000.. arrive for day 2, two days behind: late.
    let at = |h: i64| chrono::DateTime::from_timestamp(1_767_225_600 + 86_400 + h * 3600, 0).unwrap().to_rfc3339();
    let on_time: String = (0..96).map(|i| format!("{{\"id\": {i}, \"ts\": \"{}\"}}\n", at(i))).collect();
    let late: String = (0..5).map(|i| format!("{{\"id\": {}, \"ts\": \"{}\"}}\n", 1000 + i, at(30 + i))).collect();
    drop_file(&t.incoming, "a.ndjson", &on_time);
    drop_file(&t.incoming, "b.ndjson", &late);
    t.wait_received(101, "every event committed");
    t.server.stop();
    let sink = t.sink.clone();
    let late_counted: u64 = log_entries(&sink).iter().map(|e| e["state"]["late"].as_u64().unwrap_or(0)).sum();
    assert_eq!(late_counted, 5);

    let l = Lake {
        dir: t.dir,
        incoming: t.incoming,
        sink: t.sink,
        sql: t.sql,
        fx: PathBuf::new(),
    };
    let (code, out, report) = reconcile(&l, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(strings(&report["late_partitions"]), vec!["day=2026-01-03/".to_string()], "{out}");
    assert_eq!(differing(&report).keys().cloned().collect::<Vec<_>>(), vec!["day=2026-01-03/".to_string()], "{out}");
    assert!(out.contains("late rows (left out by the stream, in the batch result) fell in: day=2026-01-03/"), "{out}");
    let (code, out, _) = reconcile(&l, &["--repair"]);
    assert!(code == 1 && out.contains("repaired 1 partition(s)"), "{out}");
    let rt = crate::harness::runtime();
    let ids = rt.block_on(read_hive(&sink, &[("day", DataType::Date32)], "SELECT count(*) AS n FROM t WHERE id >= 1000"));
    assert_eq!(ids[0].column(0).as_primitive::<Int64Type>().value(0), 5, "the late rows are in the table");
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "{out}");
}

/// A windowed pipeline emits each window once, when the watermark passes its end, and leaves
/// out rows that arrive for an emitted window. Reconcile recomputes the windows the range's
/// epochs emitted from the whole raw archive (late rows included) with the stream's own window
/// state: equal while no row was late; after late rows, exactly their window's partition
/// differs, and a repair brings them into that window's row.
#[test]
fn reconcile_recomputes_windows_with_their_late_rows() {
    let t = crate::event_time::Adhoc::start_partitioned(
        "ev (id BIGINT NOT NULL, k VARCHAR NOT NULL, ts TIMESTAMP NOT NULL)",
        "'event_time' 'ts'",
        "PARTITIONED BY (day)",
        "INSERT INTO out SELECT date_bin(INTERVAL '1 hour', ts) AS window_start, k, count(*) AS n, sum(id) AS ids,
                CAST(date_bin(INTERVAL '1 hour', ts) AS DATE) AS day
         FROM ev GROUP BY date_bin(INTERVAL '1 hour', ts), k;",
    );
    // Days 1..=4, two keys, an event every 20 minutes: windows close as event time passes.
    let at = |m: i64| chrono::DateTime::from_timestamp(1_767_225_600 + 86_400 + m * 60, 0).unwrap().to_rfc3339();
    let on_time: String = (0..288)
        .map(|i| format!("{{\"id\": {i}, \"k\": \"{}\", \"ts\": \"{}\"}}\n", ["a", "b"][i as usize % 2], at(i * 20)))
        .collect();
    drop_file(&t.incoming, "a.ndjson", &on_time);
    t.wait_received(288, "the on-time events committed");
    let l = Lake {
        dir: tempfile::tempdir().unwrap(),
        incoming: t.incoming.clone(),
        sink: t.sink.clone(),
        sql: t.sql.clone(),
        fx: PathBuf::new(),
    };
    let (code, out, report) = reconcile(&l, &[]);
    assert_eq!(code, 0, "no late rows: the windows agree\n{out}");
    let rows: u64 = report["partitions"].as_array().unwrap().iter().map(|p| p["batch_rows"].as_u64().unwrap()).sum();
    assert!(rows > 100, "the windows were compared, not two empty sides\n{out}");

    // Late: ids 1000.. for day 2, 10:xx (an emitted window), key a.
    let late: String = (0..3).map(|i| format!("{{\"id\": {}, \"k\": \"a\", \"ts\": \"{}\"}}\n", 1000 + i, at(24 * 60 + 600 + i))).collect();
    drop_file(&t.incoming, "b.ndjson", &late);
    t.wait_received(291, "the late events committed");
    t.server.stop();
    let late_counted: u64 = log_entries(&t.sink).iter().map(|e| e["state"]["late"].as_u64().unwrap_or(0)).sum();
    assert_eq!(late_counted, 3);
    // A range of only the late rows' epoch: it emitted no window (late rows do not move the
    // watermark), so there is nothing to compare, and its late rows' partition is named.
    let entries = log_entries(&t.sink);
    let late_epoch = entries.iter().find(|e| e["state"]["late"].as_u64() == Some(3)).expect("the late epoch");
    let from = late_epoch["committed_at"].as_str().unwrap();
    let (code, out, report) = reconcile(&l, &["--from", from]);
    assert_eq!(code, 0, "{out}");
    assert!(report["partitions"].as_array().unwrap().is_empty(), "{out}");
    assert_eq!(strings(&report["late_partitions"]), vec!["day=2026-01-03/".to_string()], "{out}");
    // The whole range: the late rows' window differs; the same through a Ballista cluster
    // (the part below the aggregate runs there, the windows in process).
    let (code, out, report) = reconcile(&l, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(differing(&report).keys().cloned().collect::<Vec<_>>(), vec!["day=2026-01-03/".to_string()], "{out}");
    let (_scheduler, _executor, url) = start_cluster(l.dir.path());
    let (code, remote_out, remote) = reconcile(&l, &["--cluster", &url]);
    assert_eq!(code, 1, "{remote_out}");
    assert_eq!(remote["partitions"], report["partitions"], "{remote_out}\n{out}");
    let (code, out, _) = reconcile(&l, &["--repair"]);
    assert!(code == 1 && out.contains("repaired 1 partition(s)"), "{out}");
    let rt = crate::harness::runtime();
    let got = rt.block_on(read_hive(
        &t.sink,
        &[("day", DataType::Date32)],
        "SELECT n FROM t WHERE k = 'a' AND window_start = TIMESTAMP '2026-01-03 10:00:00'",
    ));
    let on_time = (0..288).filter(|i| i % 2 == 0 && i * 20 / 60 == (24 * 60 + 600) / 60).count() as i64;
    assert_eq!(got[0].column(0).as_primitive::<Int64Type>().value(0), on_time + 3, "the late rows are in their window");
    let (code, out, _) = reconcile(&l, &[]);
    assert_eq!(code, 0, "{out}");
}
