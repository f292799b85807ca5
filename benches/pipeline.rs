//! Sluice's benchmark harness (`cargo bench --bench pipeline`, or `benches/run.sh`).
//!
//! One run, one machine, one data set (seeded): the reference transform (filter, projection,
//! arithmetic, join with a static table, derived date column → zstd Parquet partitioned by date)
//! measured as
//! - `sluice` with the directory source,
//! - `sluice` with HTTP ingest and durable acks (a loopback load generator, 8 connections; with
//!   4, each waiting for its fsync'd ack, the run measured fsync latency, not the server),
//! - DuckDB (2 threads) running the same SQL over the same files,
//! - the floor: decode only (NDJSON → Arrow, the engine's decoder) plus encode only
//!   (those batches → zstd Parquet), single-threaded, on the same data.
//!
//! - `sluice` with the Kafka source (tansu on loopback, the same events produced into a
//!   4-partition topic before the timed run), when tansu is installed (`--no-kafka` skips);
//! - `sluice` with the directory source writing to S3 (moto on loopback, `--no-s3` skips);
//! - Nexmark q0 (pass-through), q1 (projection + arithmetic), q2 (filter), q10 (log to files
//!   partitioned by date and minute) over a generated bid stream, directory source;
//! - windowed aggregation: a tumbling 1-minute count and sum per key (`price / 10`, ~865k
//!   distinct keys) over the same bid stream, with the peak state bytes, next to DuckDB
//!   computing the same aggregate in batch (`--no-window` skips);
//! - freshness under fixed-rate HTTP load (10k and 100k events/s): event sent → visible in a
//!   committed entry, and acknowledgement latency.
//!
//! It prints a table and rewrites `BENCHMARKS.md`. Arguments: `--events N` (default 2,000,000),
//! `--out PATH` (default BENCHMARKS.md), `--no-duckdb`, `--no-http`, `--no-kafka`, `--no-s3`, `--no-nexmark`, `--no-window`, `--freshness-secs N`
//! (default 30; 0 skips), `--rounds N` (directory source, HTTP and DuckDB in turn, medians
//! reported; default 3).

mod broker;
mod datagen;
mod moto;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use sluice_connectors::parquet::config::ParquetSinkConfig;
use sluice_engine::batch::archive;
use sluice_engine::decode::{Format, RecordDecoder, lines};

const PER_FILE: u64 = 200_000;
const MALFORMED_PER_MILLION: u64 = 100;
const HTTP_BODY_LINES: usize = 2_000;
const HTTP_CONNECTIONS: usize = 8;

/// One measured row of the report.
struct Row {
    name: String,
    events: u64,
    bytes: u64,
    wall: f64,
    cpu: f64,
    rss: u64,
    rows_out: Option<u64>,
}

/// The line after which BENCHMARKS.md holds figures measured by tests (kept on a rewrite).
const KEPT_MARKER: &str = "<!-- kept by the harness: figures measured by tests -->";

fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn self_cpu() -> f64 {
    cpu_of(std::process::id())
}

fn schema() -> Arc<Schema> {
    let s = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    Arc::new(Schema::new(vec![
        s("order_id", DataType::Int64, false),
        s("customer_id", DataType::Int64, true),
        s("amount", DataType::Float64, true),
        s("currency", DataType::Utf8View, true),
        s("status", DataType::Utf8View, true),
        s("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        s("country", DataType::Utf8View, true),
        s("channel", DataType::Utf8View, true),
        s("sku", DataType::Utf8View, true),
        s("quantity", DataType::Int64, true),
    ]))
}

const COLUMNS: &str = "order_id BIGINT NOT NULL, customer_id BIGINT, amount DOUBLE, currency VARCHAR, status VARCHAR,
  ts TIMESTAMP NOT NULL, country VARCHAR, channel VARCHAR, sku VARCHAR, quantity BIGINT";
const SELECT: &str =
    "SELECT o.order_id, o.customer_id, o.amount * fx.rate AS amount_usd, o.quantity, upper(o.status) AS status,
       o.country, o.channel, o.sku, o.ts, CAST(o.ts AS DATE) AS order_date
FROM orders o JOIN fx ON o.currency = fx.currency
WHERE o.status <> 'test'";

fn pipeline_sql(source: &str, sink: &str) -> String {
    pipeline_sql_with(source, sink, "", "")
}

/// The reference pipeline with sink OPTIONS (`sink_options`, e.g. `OPTIONS (...)`) and extra
/// statements (expectations) appended.
fn pipeline_sql_with(source: &str, sink: &str, sink_options: &str, extra: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders ({COLUMNS}) {source};
CREATE EXTERNAL TABLE fx STORED AS CSV LOCATION 'fx.csv' OPTIONS ('format.has_header' 'true');
CREATE EXTERNAL TABLE orders_usd STORED AS PARQUET PARTITIONED BY (order_date) LOCATION '{sink}' {sink_options};
INSERT INTO orders_usd {SELECT};
{extra}"
    )
}

/// The quality row's expectations: two row-level (one on the source, one on the sink) and one
/// batch-level.
const EXPECTATIONS: &str = "CREATE EXPECTATION positive_amount ON orders CHECK (amount > 0) ON VIOLATION DEAD_LETTER;
CREATE EXPECTATION known_status ON orders_usd CHECK (status IN ('NEW', 'PAID', 'SHIPPED', 'CANCELLED', 'REFUNDED')) ON VIOLATION WARN;
CREATE EXPECTATION enough_rows ON orders_usd CHECK (count(*) >= 10 AND avg(amount_usd) BETWEEN 1 AND 500) ON VIOLATION WARN;";

/// The tuned directory run with quality work off (`quality.profile` off, no expectations), or
/// with profiles and [`EXPECTATIONS`].
fn run_directory_quality(work: &Path, events: u64, bytes: u64, files: u64, on: bool) -> Row {
    let (tag, name, opts, extra) = if on {
        ("dir-quality", "sluice: directory source, profiles + 3 expectations", "", EXPECTATIONS)
    } else {
        ("dir-noquality", "sluice: directory source, quality.profile off", "OPTIONS ('quality.profile' 'off')", "")
    };
    let sink = work.join(format!("lake/sluice-{tag}"));
    let sql = pipeline_sql_with(
        &format!("STORED AS NDJSON LOCATION 'in' {DIR_OPTIONS}"),
        sink.to_str().unwrap_or_default(),
        opts,
        extra,
    );
    let last = format!("orders-{:05}.ndjson", files - 1);
    run_dir_sql(work, name, tag, &sql, &sink, "orders", &last, events, bytes)
}

fn log_totals(sink: &Path) -> (u64, u64, Option<serde_json::Value>) {
    let mut received = 0;
    let mut output = 0;
    let mut last = None;
    let Ok(rd) = std::fs::read_dir(sink.join("_sluice/log")) else {
        return (0, 0, None);
    };
    let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    for p in names {
        if let Some(v) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            received += v["counts"]["received"].as_u64().unwrap_or(0);
            output += v["counts"]["output"].as_u64().unwrap_or(0);
            last = Some(v);
        }
    }
    (received, output, last)
}

fn start_server(work: &Path, sql: &str, name: &str) -> (Child, String) {
    let file = work.join(format!("{name}.sql"));
    std::fs::write(&file, sql).expect("write pipeline");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "run",
            file.to_str().unwrap_or_default(),
            "--listen",
            "127.0.0.1:0",
            "--max-buffer-bytes",
            "536870912",
        ])
        .arg("--state-dir")
        .arg(work.join(format!("state-{name}")))
        .current_dir(work)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sluice");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut out, &mut line).expect("read listen line");
    let base = line
        .trim()
        .strip_prefix("sluice listening on ")
        .expect("listen line")
        .to_string();
    // `benches/profile.sh` finds each server's samples by this line.
    eprintln!("server {name}: pid {}", child.id());
    (child, base)
}

fn stop_child(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// Polls until `done` (deadline 10 minutes).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(600);
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `sql` (a pipeline over a directory source named `source`) until its commit log covers
/// `last_file` completely.
#[allow(clippy::too_many_arguments)]
fn run_dir_sql(
    work: &Path,
    name: &str,
    tag: &str,
    sql: &str,
    sink: &Path,
    source: &str,
    last_file: &str,
    events: u64,
    bytes: u64,
) -> Row {
    run_until(work, name, tag, sql, sink, events, bytes, |e| {
        e["sources"][source]["file"] == last_file && e["sources"][source]["complete"] == true
    })
}

/// Starts a server on `sql` and measures it until its newest commit entry satisfies `done`.
#[allow(clippy::too_many_arguments)]
fn run_until(
    work: &Path,
    name: &str,
    tag: &str,
    sql: &str,
    sink: &Path,
    events: u64,
    bytes: u64,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> Row {
    let t0 = Instant::now();
    let (child, _) = start_server(work, sql, tag);
    wait_for(name, || log_totals(sink).2.is_some_and(|e| done(&e)));
    let wall = t0.elapsed().as_secs_f64();
    let (cpu, rss) = (cpu_of(child.id()), peak_rss(child.id()));
    stop_child(child);
    let (_, out, _) = log_totals(sink);
    Row {
        name: name.into(),
        events,
        bytes,
        wall,
        cpu,
        rss,
        rows_out: Some(out),
    }
}

const DIR_OPTIONS: &str = "OPTIONS ('poll_interval' '20ms', 'batch.max_rows' '250000', 'batch.max_bytes' '64MB', 'batch.interval' '2s', 'buffer.max_bytes' '128MB')";

fn run_directory(work: &Path, events: u64, bytes: u64, files: u64) -> Row {
    let sink = work.join("lake/sluice-dir");
    let sql = pipeline_sql(
        &format!("STORED AS NDJSON LOCATION 'in' {DIR_OPTIONS}"),
        sink.to_str().unwrap_or_default(),
    );
    let last = format!("orders-{:05}.ndjson", files - 1);
    run_dir_sql(
        work,
        "sluice: directory source",
        "dir",
        &sql,
        &sink,
        "orders",
        &last,
        events,
        bytes,
    )
}

/// The tuned directory run with the raw archive off (the main directory row archives: the
/// default).
fn run_directory_noarchive(work: &Path, events: u64, bytes: u64, files: u64) -> Row {
    let sink = work.join("lake/sluice-dir-noarchive");
    let sql = pipeline_sql_with(
        &format!("STORED AS NDJSON LOCATION 'in' {DIR_OPTIONS}"),
        sink.to_str().unwrap_or_default(),
        "OPTIONS ('archive' 'off')",
        "",
    );
    let last = format!("orders-{:05}.ndjson", files - 1);
    let name = "sluice: directory source, archive off";
    run_dir_sql(work, name, "dir-noarchive", &sql, &sink, "orders", &last, events, bytes)
}

/// The Kafka source over the same events (already in `topic`), the same SQL and tuning as the
/// directory run; done when the log's offsets cover every message.
fn run_kafka(work: &Path, broker: &broker::Broker, messages: u64, events: u64, bytes: u64, round: usize) -> Row {
    let sink = work.join("lake/sluice-kafka");
    let _ = std::fs::remove_dir_all(&sink);
    let sql = pipeline_sql(
        &format!(
            "STORED AS KAFKA LOCATION 'kafka://{}/orders' OPTIONS ('group.id' 'bench-{round}', 'batch.max_rows' '250000', 'batch.max_bytes' '64MB', 'batch.interval' '2s', 'buffer.max_bytes' '128MB')",
            broker.addr
        ),
        sink.to_str().unwrap_or_default(),
    );
    let name = "sluice: Kafka source (tansu on loopback)";
    run_until(work, name, "kafka", &sql, &sink, events, bytes, |e| {
        e["sources"]["orders"]["offsets"]
            .as_object()
            .is_some_and(|offs| offs.values().filter_map(|v| v.as_u64()).sum::<u64>() >= messages)
    })
}

/// The directory run with its sink on S3 (moto on loopback, table `dir-<round>` in bucket
/// `bench`); done when the log covers the last input file.
fn run_s3(work: &Path, moto: &moto::Moto, events: u64, bytes: u64, files: u64, round: usize) -> Row {
    let prefix = format!("dir-{round}");
    let sql = pipeline_sql_with(
        &format!("STORED AS NDJSON LOCATION 'in' {DIR_OPTIONS}"),
        &format!("s3://bench/{prefix}/"),
        &format!("OPTIONS ({})", moto.options()),
        "",
    );
    let last = format!("orders-{:05}.ndjson", files - 1);
    let t0 = Instant::now();
    let (child, _) = start_server(work, &sql, &format!("s3-{round}"));
    wait_for("the S3 run", || {
        moto.log_totals(&prefix)
            .1
            .is_some_and(|e| e["sources"]["orders"]["file"] == last.as_str() && e["sources"]["orders"]["complete"] == true)
    });
    let wall = t0.elapsed().as_secs_f64();
    let (cpu, rss) = (cpu_of(child.id()), peak_rss(child.id()));
    stop_child(child);
    Row {
        name: "sluice: directory source, sink on S3 (moto on loopback)".into(),
        events,
        bytes,
        wall,
        cpu,
        rss,
        rows_out: Some(moto.log_totals(&prefix).0),
    }
}

/// Runs `argv` in `work` under Python's `resource` module: wall, CPU and peak RSS of the
/// child, and its exit code and output.
fn timed_child(work: &Path, argv: &[&str]) -> Option<(f64, f64, u64, String)> {
    let script = r#"
import resource, subprocess, sys, time, json
t0 = time.monotonic()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024, "code": p.returncode, "out": p.stdout + p.stderr}))
"#;
    let out = Command::new("python3").arg("-c").arg(script).args(argv).current_dir(work).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["wall"].as_f64()?,
        v["cpu"].as_f64()?,
        v["rss"].as_u64()?,
        format!("code {} {}", v["code"], v["out"].as_str()?),
    ))
}

/// `sluice reconcile` of the main directory run's sink: recompute all its events from the raw
/// archive and compare with the committed output.
fn run_reconcile(work: &Path, events: u64, bytes: u64) -> Option<Row> {
    let bin = env!("CARGO_BIN_EXE_sluice");
    let (wall, cpu, rss, out) = timed_child(work, &[bin, "reconcile", "dir.sql", "--pipeline", "orders_usd"])?;
    if !out.starts_with("code 0") {
        eprintln!("reconcile did not find the sink equal: {out}");
        return None;
    }
    Some(Row {
        name: "sluice reconcile: recompute + compare (in process)".into(),
        events,
        bytes,
        wall,
        cpu,
        rss,
        rows_out: None,
    })
}

/// DuckDB doing the same recompute-and-compare: the pipeline's SELECT over the raw archive,
/// per-partition counts and per-column hash sums of both sides, joined.
fn run_duckdb_reconcile(work: &Path, events: u64, bytes: u64) -> Option<Row> {
    let script = r#"
import duckdb, resource, time, json
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_progress_bar=false")
cols = ["order_id", "customer_id", "amount_usd", "quantity", "status", "country", "channel", "sku", "ts"]
digest = ", ".join(["count(*) AS n"] + [f"sum(hash({c})) AS h_{c}" for c in cols] + [f"sum(hash({', '.join(cols)})) AS h_row"])
differs = " OR ".join(["bd.n IS DISTINCT FROM sd.n"] + [f"bd.h_{c} IS DISTINCT FROM sd.h_{c}" for c in cols + ["row"]])
q = f"""
WITH b AS (SELECT o.order_id, o.customer_id, o.amount * fx.rate AS amount_usd, o.quantity, upper(o.status) AS status,
       o.country, o.channel, o.sku, CAST(o.ts AS TIMESTAMP) AS ts, CAST(o.ts AS DATE) AS order_date
  FROM read_parquet('lake/sluice-dir/_sluice/raw/*/*.parquet') o
  JOIN read_csv('fx.csv', header=true) fx ON o.currency = fx.currency WHERE o.status <> 'test'),
s AS (SELECT * FROM read_parquet('lake/sluice-dir/*/*.parquet', hive_partitioning=true)),
bd AS (SELECT order_date, {digest} FROM b GROUP BY order_date),
sd AS (SELECT order_date, {digest} FROM s GROUP BY order_date)
SELECT count(*) FROM bd FULL JOIN sd USING (order_date) WHERE {differs}
"""
t0 = time.monotonic()
differing = con.execute(q).fetchone()[0]
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024, "rows": differing}))
"#;
    let out = Command::new("python3").arg("-c").arg(script).current_dir(work).output().ok()?;
    if !out.status.success() {
        eprintln!("duckdb reconcile failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).ok()?;
    Some(Row {
        name: "DuckDB (2 threads): recompute + compare".into(),
        events,
        bytes,
        wall: v["wall"].as_f64()?,
        cpu: v["cpu"].as_f64()?,
        rss: v["rss"].as_u64()?,
        rows_out: v["rows"].as_u64(),
    })
}

/// The source options a user gets without tuning (only the poll interval is shortened, so the
/// run does not wait for the first poll).
const DIR_DEFAULT_OPTIONS: &str = "OPTIONS ('poll_interval' '20ms')";

/// The directory source with the default options, over the input files (`in/`) or over the
/// same data as one large file (`in-one/`).
fn run_directory_defaults(work: &Path, events: u64, bytes: u64, files: u64, one_file: bool) -> Row {
    let (dir, last, name, tag) = if one_file {
        (
            "in-one",
            "orders.ndjson".to_string(),
            "sluice: directory source, default options, one file",
            "dir-one",
        )
    } else {
        (
            "in",
            format!("orders-{:05}.ndjson", files - 1),
            "sluice: directory source, default options",
            "dir-defaults",
        )
    };
    let sink = work.join(format!("lake/sluice-{tag}"));
    let sql = pipeline_sql(
        &format!("STORED AS NDJSON LOCATION '{dir}' {DIR_DEFAULT_OPTIONS}"),
        sink.to_str().unwrap_or_default(),
    );
    run_dir_sql(work, name, tag, &sql, &sink, "orders", &last, events, bytes)
}

/// Concatenates the input files into `in-one/orders.ndjson`.
fn write_one_file(work: &Path) {
    let one = work.join("in-one");
    std::fs::create_dir_all(&one).expect("in-one");
    let mut names: Vec<PathBuf> = std::fs::read_dir(work.join("in"))
        .expect("list input")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut out = std::fs::File::create(one.join(".orders.tmp")).expect("create one file");
    for n in names {
        let mut f = std::fs::File::open(n).expect("open input");
        std::io::copy(&mut f, &mut out).expect("copy input");
    }
    drop(out);
    std::fs::rename(one.join(".orders.tmp"), one.join("orders.ndjson")).expect("rename one file");
}

/// Nexmark q0 (pass-through), q1 (projection with arithmetic), q2 (filter) and q10 (log to
/// files partitioned by date and minute) over a bid stream, through the directory source.
fn run_nexmark(work: &Path, events: u64, with_duckdb: bool) -> Vec<(Row, Option<Row>)> {
    let bytes = datagen::write_bids(&work.join("bids"), 7, events, PER_FILE).expect("generate bids");
    let last = format!("bids-{:05}.ndjson", events.div_ceil(PER_FILE) - 1);
    let columns =
        "auction BIGINT NOT NULL, bidder BIGINT NOT NULL, price BIGINT NOT NULL, channel VARCHAR, url VARCHAR,
      date_time TIMESTAMP NOT NULL, extra VARCHAR";
    // DuckDB's spelling of `to_char` is `strftime`; everything else is the same text.
    let queries = [
        (
            "q0",
            "SELECT auction, bidder, price, channel, url, date_time, extra FROM bids",
            "",
        ),
        (
            "q1",
            "SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bids",
            "",
        ),
        ("q2", "SELECT auction, price FROM bids WHERE auction % 123 = 0", ""),
        (
            "q10",
            "SELECT auction, bidder, price, date_time, extra, to_char(date_time, '%Y-%m-%d') AS dt, to_char(date_time, '%H:%M') AS hm FROM bids",
            "PARTITIONED BY (dt, hm)",
        ),
    ];
    let duck_columns = "auction:'BIGINT', bidder:'BIGINT', price:'BIGINT', channel:'VARCHAR', url:'VARCHAR', date_time:'TIMESTAMP', extra:'VARCHAR'";
    let mut rows = Vec::new();
    for (q, select, partition) in queries {
        let duck = with_duckdb
            .then(|| {
                let from = format!("FROM read_ndjson('bids/*.ndjson', columns={{{duck_columns}}})");
                let select = select.replace("to_char(", "strftime(").replace("FROM bids", &from);
                let (to, written) = match partition {
                    "" => (
                        format!("'lake/duckdb-{q}.parquet' (FORMAT PARQUET, COMPRESSION ZSTD)"),
                        format!("lake/duckdb-{q}.parquet"),
                    ),
                    _ => (
                        format!("'lake/duckdb-{q}' (FORMAT PARQUET, PARTITION_BY (dt, hm), COMPRESSION ZSTD)"),
                        format!("lake/duckdb-{q}/*/*/*.parquet"),
                    ),
                };
                let copy = format!("COPY ({select}) TO {to}");
                duckdb_copy(work, &format!("DuckDB: Nexmark {q}"), &copy, &written, events, bytes)
            })
            .flatten();
        let sink = work.join(format!("lake/nexmark-{q}"));
        let sql = format!(
            "CREATE UNBOUNDED EXTERNAL TABLE bids ({columns}) STORED AS NDJSON LOCATION 'bids' {DIR_OPTIONS};
CREATE EXTERNAL TABLE nexmark_{q} STORED AS PARQUET {partition} LOCATION '{}';
INSERT INTO nexmark_{q} {select};",
            sink.display()
        );
        let ours = run_dir_sql(
            work,
            &format!("sluice: Nexmark {q}"),
            &format!("nexmark-{q}"),
            &sql,
            &sink,
            "bids",
            &last,
            events,
            bytes,
        );
        rows.push((ours, duck));
        eprintln!("nexmark {q} measured");
    }
    rows
}

/// The windowed aggregation rows: Sluice keeping per-window state over the bid stream (the
/// last window stays open: the input ends) with the default sink options and with the raw
/// archive and profiles off (the work DuckDB does), and DuckDB computing every window in batch.
/// Returns the rows (default, lean, DuckDB) and Sluice's peak state bytes.
fn run_window(work: &Path, events: u64, with_duckdb: bool) -> (Row, Row, Option<Row>, u64) {
    let bids = work.join("bids");
    let bytes = if bids.exists() {
        input_bytes(&bids)
    } else {
        datagen::write_bids(&bids, 7, events, PER_FILE).expect("generate bids")
    };
    let last = format!("bids-{:05}.ndjson", events.div_ceil(PER_FILE) - 1);
    let columns = "auction BIGINT NOT NULL, bidder BIGINT NOT NULL, price BIGINT NOT NULL, channel VARCHAR, url VARCHAR,
      date_time TIMESTAMP NOT NULL, extra VARCHAR";
    let select = "SELECT date_bin(INTERVAL '1 minute', date_time) AS window_start, price / 10 AS k, count(*) AS n, sum(price) AS total
FROM bids GROUP BY date_bin(INTERVAL '1 minute', date_time), price / 10";
    let duck = with_duckdb
        .then(|| {
            let cols = "auction:'BIGINT', bidder:'BIGINT', price:'BIGINT', channel:'VARCHAR', url:'VARCHAR', date_time:'TIMESTAMP', extra:'VARCHAR'";
            let copy = format!(
                "COPY (SELECT time_bucket(INTERVAL '1 minute', date_time) AS window_start, price // 10 AS k, count(*) AS n, sum(price) AS total
FROM read_ndjson('bids/*.ndjson', columns={{{cols}}}) GROUP BY ALL) TO 'lake/duckdb-window.parquet' (FORMAT PARQUET, COMPRESSION ZSTD)"
            );
            duckdb_copy(
                work,
                "DuckDB: tumbling 1-minute count + sum per key (batch)",
                &copy,
                "lake/duckdb-window.parquet",
                events,
                bytes,
            )
        })
        .flatten();
    let options = DIR_OPTIONS.replace(
        "OPTIONS (",
        "OPTIONS ('event_time' 'date_time', 'watermark.delay' '5s', ",
    );
    let run = |tag: &str, name: &str, sink_options: &str| {
        let sink = work.join(format!("lake/{tag}"));
        let sql = format!(
            "CREATE UNBOUNDED EXTERNAL TABLE bids ({columns}) STORED AS NDJSON LOCATION 'bids' {options};
CREATE EXTERNAL TABLE window_counts STORED AS PARQUET LOCATION '{}' {sink_options};
INSERT INTO window_counts {select};",
            sink.display()
        );
        let row = run_dir_sql(work, name, tag, &sql, &sink, "bids", &last, events, bytes);
        let peak = entries(&sink)
            .iter()
            .filter_map(|e| e["state"]["state_bytes"].as_u64())
            .max()
            .unwrap_or(0);
        (row, peak)
    };
    let (ours, peak) = run(
        "window",
        "sluice: tumbling 1-minute count + sum per key (stream)",
        "",
    );
    let (lean, _) = run(
        "window-lean",
        "sluice: the same, archive and profiles off",
        "OPTIONS ('archive' 'off', 'quality.profile' 'off')",
    );
    (ours, lean, duck, peak)
}

/// Total bytes of the files under `dir`.
fn input_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Every commit entry of a sink, in epoch order.
fn entries(sink: &Path) -> Vec<serde_json::Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(sink.join("_sluice/log"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

fn run_http(work: &Path, events: u64, bytes: u64) -> Row {
    let sink = work.join("lake/sluice-http");
    let sql = pipeline_sql(
        "STORED AS HTTP LOCATION '/v1/sources/orders' OPTIONS ('batch.max_rows' '400000', 'batch.max_bytes' '96MB', 'batch.interval' '1s', 'buffer.max_bytes' '256MB')",
        sink.to_str().unwrap_or_default(),
    );
    // Bodies prepared before the clock starts, shared by every retry and never copied again
    // (`Bytes`), as a real producer holds its buffer.
    let mut bodies: Vec<bytes::Bytes> = Vec::new();
    let names = input_files(work);
    for n in names {
        let text = std::fs::read_to_string(n).expect("read");
        let ls: Vec<&str> = text.lines().collect();
        for c in ls.chunks(HTTP_BODY_LINES) {
            bodies.push(c.join("\n").into());
        }
    }
    let (child, base) = start_server(work, &sql, "http");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let load_cpu0 = self_cpu();
    let t0 = Instant::now();
    rt.block_on(async {
        let bodies = Arc::new(bodies);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..HTTP_CONNECTIONS {
            let (bodies, next, url) = (bodies.clone(), next.clone(), format!("{base}/v1/sources/orders"));
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { return };
                    loop {
                        let r = http
                            .post(&url)
                            .header("x-request-id", format!("b{i}"))
                            .body(body.clone())
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().is_success()) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    wait_for("the HTTP pipeline", || log_totals(&sink).0 >= events);
    let wall = t0.elapsed().as_secs_f64();
    let load_cpu = self_cpu() - load_cpu0;
    let (cpu, rss) = (cpu_of(child.id()), peak_rss(child.id()));
    stop_child(child);
    let (_, out, _) = log_totals(&sink);
    eprintln!("(HTTP load generator used {load_cpu:.1} CPU-s of the same 2 cores)");
    Row {
        name: "sluice: HTTP, durable acks".into(),
        events,
        bytes,
        wall,
        cpu,
        rss,
        rows_out: Some(out),
    }
}

fn run_duckdb(work: &Path, events: u64, bytes: u64) -> Option<Row> {
    let copy = r#"COPY (SELECT o.order_id, o.customer_id, o.amount * fx.rate AS amount_usd, o.quantity, upper(o.status) AS status,
       o.country, o.channel, o.sku, o.ts, CAST(o.ts AS DATE) AS order_date
  FROM read_ndjson('in/*.ndjson', columns={order_id:'BIGINT', customer_id:'BIGINT', amount:'DOUBLE', currency:'VARCHAR',
       status:'VARCHAR', ts:'TIMESTAMP', country:'VARCHAR', channel:'VARCHAR', sku:'VARCHAR', quantity:'BIGINT'},
       ignore_errors=true) o
  JOIN read_csv('fx.csv', header=true) fx ON o.currency = fx.currency
  WHERE o.status <> 'test')
  TO 'lake/duckdb' (FORMAT PARQUET, PARTITION_BY (order_date), COMPRESSION ZSTD)"#;
    duckdb_copy(
        work,
        "DuckDB (2 threads)",
        copy,
        "lake/duckdb/*/*.parquet",
        events,
        bytes,
    )
}

/// Runs one DuckDB `COPY ... TO` statement (2 threads) in `work`, then counts the rows of the
/// Parquet files matching `written`.
fn duckdb_copy(work: &Path, name: &str, copy: &str, written: &str, events: u64, bytes: u64) -> Option<Row> {
    let script = format!(
        r#"
import duckdb, resource, time, json
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_progress_bar=false")
t0 = time.monotonic()
con.execute("""{copy}""")
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
rows = con.execute("SELECT count(*) FROM read_parquet('{written}')").fetchone()[0]
print(json.dumps({{"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024, "rows": rows}}))
"#
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(work)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("duckdb run failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    // The figures are the last line (anything DuckDB printed comes before).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
    let row = (|| {
        Some(Row {
            name: name.into(),
            events,
            bytes,
            wall: v["wall"].as_f64()?,
            cpu: v["cpu"].as_f64()?,
            rss: v["rss"].as_u64()?,
            rows_out: v["rows"].as_u64(),
        })
    })();
    if row.is_none() {
        eprintln!(
            "duckdb run gave no figures: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    row
}

/// The generated input files, in name order.
fn input_files(work: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(work.join("in"))
        .expect("in")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    names.sort();
    names
}

/// Decodes every input file with `decoder`, in the 4 MiB line-aligned chunks the directory
/// source uses; returns the batches and the (wall, CPU) seconds it took.
fn decode_all(decoder: &RecordDecoder, files: &[Vec<u8>]) -> (Vec<RecordBatch>, f64, f64) {
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut batches = Vec::new();
    for f in files {
        let mut start = 0;
        while start < f.len() {
            let mut end = (start + (4 << 20)).min(f.len());
            if end < f.len() {
                end = f[..end].iter().rposition(|b| *b == b'\n').map_or(f.len(), |p| p + 1);
            }
            let chunk = &f[start..end];
            batches.push(decoder.decode(chunk, &lines(chunk)).expect("decode").batch);
            start = end;
        }
    }
    (batches, t0.elapsed().as_secs_f64(), self_cpu() - cpu0)
}

/// Decode only (the engine's decoder, then arrow-json alone for comparison), then encode only,
/// then the raw archive's encode only, single-threaded, in this process.
fn run_floor(work: &Path, events: u64, bytes: u64) -> (Row, Row, Row, Row) {
    let decoder = RecordDecoder::new(Format::Json, schema());
    let names = input_files(work);
    let files: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(n).expect("read")).collect();
    let (arrow_batches, wall, cpu) = decode_all(&decoder.clone().arrow_only(), &files);
    let arrow = Row {
        name: "floor: decode only, arrow-json alone (1 thread)".into(),
        events,
        bytes,
        wall,
        cpu,
        rss: 0,
        rows_out: Some(arrow_batches.iter().map(|b| b.num_rows() as u64).sum()),
    };
    drop(arrow_batches);
    let (batches, wall, cpu) = decode_all(&decoder, &files);
    let decode = Row {
        name: "floor: decode only (1 thread)".into(),
        events,
        bytes,
        wall,
        cpu,
        rss: 0,
        rows_out: Some(batches.iter().map(|b| b.num_rows() as u64).sum()),
    };
    // Each encoder alone over the same batches, one file per batch: the sink's, then the raw
    // archive's (what `archive` on adds to a run).
    let timed = |name: &str, encode: &dyn Fn(&RecordBatch) -> usize| {
        let cpu0 = self_cpu();
        let t0 = Instant::now();
        let total: usize = batches.iter().map(encode).sum();
        eprintln!("{name}: {total} bytes");
        Row {
            name: name.into(),
            events,
            bytes,
            wall: t0.elapsed().as_secs_f64(),
            cpu: self_cpu() - cpu0,
            rss: 0,
            rows_out: None,
        }
    };
    let props = ParquetSinkConfig::default().writer_properties();
    let encode = timed("floor: encode only (1 thread)", &|b| {
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, b.schema(), Some(props.clone())).expect("writer");
        w.write(b).expect("encode");
        w.close().expect("close");
        buf.len()
    });
    let schema = schema();
    let archive = timed("floor: raw archive encode only (1 thread)", &|b| {
        archive::encode(std::slice::from_ref(b), &schema, 1, Some("{\"files\":{}}"), 0, 1)
            .expect("archive")
            .len()
    });
    (decode, arrow, encode, archive)
}

/// Percentile (0..=100) of sorted milliseconds.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// Freshness under fixed-rate HTTP load: every 10 ms a body of `rate / 100` events is posted
/// (each in its own task, so a slow answer never delays the schedule); a poller watches the
/// commit log. An event is visible when an entry covering its ingest-log sequence exists.
/// Returns (rate, sent, ack p50, ack p99, fresh p50, fresh p99, fresh max) in ms.
fn run_freshness(work: &Path, rate: u64, secs: u64, lines: &[String]) -> (u64, u64, f64, f64, f64, f64, f64) {
    // Earlier runs leave gigabytes of dirty pages; their writeback would stall this run's fsyncs.
    let _ = Command::new("sync").status();
    let sink = work.join(format!("lake/fresh-{rate}"));
    let sql = pipeline_sql(
        "STORED AS HTTP LOCATION '/v1/sources/orders' OPTIONS ('batch.interval' '100ms', 'batch.max_rows' '1000000', 'batch.max_bytes' '128MB', 'buffer.max_bytes' '256MB')",
        sink.to_str().unwrap_or_default(),
    );
    let (child, base) = start_server(work, &sql, &format!("fresh-{rate}"));
    let per_tick = (rate / 100).max(1) as usize;
    let ticks = secs * 100;
    let seen: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (seen, stop, sink) = (seen.clone(), stop.clone(), sink.clone());
        std::thread::spawn(move || {
            let mut known = std::collections::HashSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rd) = std::fs::read_dir(sink.join("_sluice/log")) {
                    for e in rd.flatten() {
                        let p = e.path();
                        if known.contains(&p) {
                            continue;
                        }
                        let now = Instant::now();
                        if let Some(v) = std::fs::read(&p)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        {
                            if let Some(seq) = v["sources"]["orders"]["seq"].as_u64() {
                                seen.lock().unwrap_or_else(|p| p.into_inner()).push((seq, now));
                            }
                            known.insert(p);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let results: Vec<(Instant, Instant, u64)> = rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("{base}/v1/sources/orders");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut tasks = Vec::new();
        for t in 0..ticks as usize {
            tick.tick().await;
            let body: String = (0..per_tick)
                .map(|i| lines[(t * per_tick + i) % lines.len()].as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let (http, url) = (http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let r = http
                    .post(&url)
                    .header("x-request-id", format!("f{t}"))
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                let acked = Instant::now();
                let v: serde_json::Value = r.json().await.ok()?;
                Some((sent, acked, v["seq"].as_u64()?))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(Some(r)) = t.await {
                out.push(r);
            }
        }
        out
    });
    let max_seq = results.iter().map(|r| r.2).max().unwrap_or(0);
    wait_for("the last fixed-rate request to be committed", || {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(s, _)| *s >= max_seq)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    stop_child(child);
    let mut commits = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    commits.sort_by_key(|c| c.0);
    let mut acks: Vec<f64> = results.iter().map(|(s, a, _)| (*a - *s).as_secs_f64() * 1e3).collect();
    let mut fresh: Vec<f64> = results
        .iter()
        .filter_map(|(s, _, seq)| {
            let visible = commits.iter().filter(|(cs, _)| cs >= seq).map(|(_, t)| *t).min()?;
            Some(visible.saturating_duration_since(*s).as_secs_f64() * 1e3)
        })
        .collect();
    acks.sort_by(f64::total_cmp);
    fresh.sort_by(f64::total_cmp);
    let sent = results.len() as u64 * per_tick as u64;
    (
        rate,
        sent,
        pct(&acks, 50.0),
        pct(&acks, 99.0),
        pct(&fresh, 50.0),
        pct(&fresh, 99.0),
        fresh.last().copied().unwrap_or(f64::NAN),
    )
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The issue's targets against this run's figures (a target without its runs is left out).
fn targets(
    dir: f64,
    http: Option<f64>,
    duck: Option<f64>,
    floor: f64,
    fresh_p99_100k: Option<f64>,
    peak_rss: Option<u64>,
) -> String {
    let mut out = String::from("\n**Targets** (same run):\n\n| target | measured | met |\n|---|---:|:---:|\n");
    let mut row = |what: &str, measured: String, met: bool| {
        out.push_str(&format!(
            "| {what} | {measured} | {} |\n",
            if met { "yes" } else { "no" }
        ));
    };
    if let Some(d) = duck {
        row(
            "directory source throughput ≥ 1.0× DuckDB's",
            format!("{:.2}×", d / dir),
            d / dir >= 1.0,
        );
    }
    if let Some(h) = http {
        row(
            "HTTP with durable acks ≥ 70% of the directory source",
            format!("{:.0}%", 100.0 * dir / h),
            dir / h >= 0.7,
        );
    }
    row(
        "whole pipeline ≥ 60% of the floor (decode + encode)",
        format!("{:.0}%", 100.0 * floor / dir),
        floor / dir >= 0.6,
    );
    if let Some(f) = fresh_p99_100k {
        row(
            "p99 freshness at 100k events/s ≤ 200 ms (2 × batch.interval)",
            format!("{f:.0} ms"),
            f <= 200.0,
        );
    }
    if let Some(r) = peak_rss {
        row(
            "peak RSS of every sluice throughput run ≤ 512 MiB",
            format!("{} MiB", r >> 20),
            r <= 512 << 20,
        );
    }
    out
}

/// The row with the median wall time.
/// A paired-rounds cost line: `what` costs the median of `costs` more CPU time than `against`,
/// with every round's figure and whether `target` is met (empty when nothing was measured).
fn paired_cost(title: &str, what: &str, against: &str, costs: &[f64], target: f64) -> String {
    if costs.is_empty() {
        return String::new();
    }
    let mut sorted = costs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let med = sorted[sorted.len() / 2];
    format!(
        "\n**{title}** (same run): {what} {:.1}% more CPU time than {against} (median of the paired rounds: {}). Target ≤ {:.0}%: {}.\n",
        100.0 * med,
        costs.iter().map(|c| format!("{:+.1}%", 100.0 * c)).collect::<Vec<_>>().join(", "),
        100.0 * target,
        if med <= target { "met" } else { "NOT met" }
    )
}

fn median(mut rows: Vec<Row>) -> Option<Row> {
    rows.sort_by(|a, b| a.wall.total_cmp(&b.wall));
    let mid = rows.len() / 2;
    rows.into_iter().nth(mid)
}

fn main() {
    // reqwest's clients need a rustls provider; the project builds rustls with ring only.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let events: u64 = arg(&args, "--events").and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    let out_path =
        PathBuf::from(arg(&args, "--out").unwrap_or_else(|| format!("{}/BENCHMARKS.md", env!("CARGO_MANIFEST_DIR"))));
    let work = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::write(work.join("fx.csv"), datagen::FX_CSV).expect("fx");
    eprintln!("generating {events} events (seed 42) in {}", work.display());
    let bytes = datagen::write_orders(&work.join("in"), 42, events, PER_FILE, MALFORMED_PER_MILLION).expect("generate");
    let files = events.div_ceil(PER_FILE);

    let (decode, arrow_decode, encode, archive_encode) = run_floor(&work, events, bytes);
    eprintln!("floor measured");
    if args.iter().any(|a| a == "--floor-only") {
        // For profiling the decoder and encoder (`perf record` on this process); no report.
        for r in [&decode, &arrow_decode, &encode, &archive_encode] {
            eprintln!("{}: {:.2} s wall, {:.2} CPU-s", r.name, r.wall, r.cpu);
        }
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    // The machine is noisy over seconds: the directory source, HTTP ingest and DuckDB run in
    // turn, and each one's median round is reported.
    let rounds: usize = arg(&args, "--rounds").and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let with_duckdb = !args.iter().any(|a| a == "--no-duckdb");
    let with_http = !args.iter().any(|a| a == "--no-http");
    let with_defaults = !args.iter().any(|a| a == "--no-defaults");
    if with_defaults {
        write_one_file(&work);
    }
    let (mut dirs, mut https, mut ducks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut defaults, mut ones) = (Vec::new(), Vec::new());
    let with_quality = !args.iter().any(|a| a == "--no-quality");
    let with_archive = !args.iter().any(|a| a == "--no-archive");
    let (mut archive_off, mut archive_on) = (Vec::new(), Vec::new());
    let (mut reconciles, mut duck_reconciles) = (Vec::new(), Vec::new());
    let (mut quality_off, mut quality_on) = (Vec::new(), Vec::new());
    // The Kafka row: the broker and its topic are set up once, outside the timed runs.
    let mut kafka_floor: Option<Row> = None;
    let kafka = match broker::tansu().filter(|_| !args.iter().any(|a| a == "--no-kafka")) {
        Some(bin) => {
            let b = broker::start(&bin);
            let n = broker::load(&b, "orders", 4, &input_files(&work));
            eprintln!("{n} messages produced into the Kafka topic");
            let (wall, cpu) = broker::consume_all(&b, "orders", 4, n);
            eprintln!("bare consumer: {wall:.2} s, {cpu:.2} CPU-s");
            kafka_floor = Some(Row {
                name: "floor: bare librdkafka consumer, same topic (nothing decoded or written)".into(),
                events,
                bytes,
                wall,
                cpu,
                rss: 0,
                rows_out: None,
            });
            Some((b, n))
        }
        None => {
            eprintln!("no tansu (scripts/setup.sh --test installs it): the Kafka row is skipped");
            None
        }
    };
    let mut kafkas = Vec::new();
    let s3 = moto::moto_server()
        .filter(|_| !args.iter().any(|a| a == "--no-s3"))
        .map(|m| moto::start(&m));
    if s3.is_none() {
        eprintln!("no moto (scripts/setup.sh --test installs it): the S3 row is skipped");
    }
    let mut s3s = Vec::new();
    for round in 1..=rounds {
        for old in [
            "lake/sluice-dir",
            "state-dir",
            "lake/sluice-http",
            "state-http",
            "lake/duckdb",
            "lake/sluice-dir-defaults",
            "state-dir-defaults",
            "lake/sluice-dir-one",
            "state-dir-one",
            "lake/sluice-dir-quality",
            "state-dir-quality",
            "lake/sluice-dir-noquality",
            "state-dir-noquality",
            "lake/sluice-dir-noarchive",
            "state-dir-noarchive",
        ] {
            let _ = std::fs::remove_dir_all(work.join(old));
        }
        dirs.push(run_directory(&work, events, bytes, files));
        if let Some((b, n)) = &kafka {
            kafkas.push(run_kafka(&work, b, *n, events, bytes, round));
        }
        if let Some(m) = &s3 {
            s3s.push(run_s3(&work, m, events, bytes, files, round));
        }
        if with_archive {
            archive_off.push(run_directory_noarchive(&work, events, bytes, files));
            archive_on.push(dirs.last().map(|d| d.cpu).unwrap_or_default());
            reconciles.extend(run_reconcile(&work, events, bytes));
            if with_duckdb {
                duck_reconciles.extend(run_duckdb_reconcile(&work, events, bytes));
            }
        }
        if with_quality {
            quality_off.push(run_directory_quality(&work, events, bytes, files, false));
            quality_on.push(run_directory_quality(&work, events, bytes, files, true));
        }
        if with_defaults {
            defaults.push(run_directory_defaults(&work, events, bytes, files, false));
            ones.push(run_directory_defaults(&work, events, bytes, files, true));
        }
        if with_http {
            https.push(run_http(&work, events, bytes));
        }
        if with_duckdb {
            ducks.extend(run_duckdb(&work, events, bytes));
        }
        eprintln!("round {round} of {rounds} measured");
    }
    let walls = |rows: &[Row]| {
        rows.iter()
            .map(|r| format!("{:.2}", r.wall))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rounds_note = format!(
        "- rounds: the directory source, Kafka, HTTP ingest and DuckDB ran in turn {rounds} times; each row is its median round (walls s: directory {}; Kafka {}; HTTP {}; DuckDB {})\n",
        walls(&dirs),
        walls(&kafkas),
        walls(&https),
        walls(&ducks)
    );
    // Kafka against the directory source, rounds paired (each round runs both back to back).
    let kafka_share: Vec<f64> = kafkas.iter().zip(&dirs).map(|(k, d)| d.wall / k.wall).collect();
    let kafka_row = median(kafkas);
    drop(kafka);
    let s3_share: Vec<f64> = s3s.iter().zip(&dirs).map(|(k, d)| d.wall / k.wall).collect();
    let s3_walls = walls(&s3s);
    let s3_row = median(s3s);
    drop(s3);
    let defaults_note = if with_defaults {
        format!(
            "- default options: the directory source with no tuning (`batch.max_rows` 100000, `batch.max_bytes` 32MB, `buffer.max_bytes` 64MB), over the same files and over all of them as one file (walls s: files {}; one file {})\n",
            walls(&defaults),
            walls(&ones)
        )
    } else {
        String::new()
    };
    let quality_note = if with_quality {
        format!(
            "- quality: the tuned directory run with `quality.profile` off and no expectations, and with profiles on plus two row-level and one batch-level expectation (walls s: off {}; on {}); the main directory row profiles too (the default)\n",
            walls(&quality_off),
            walls(&quality_on)
        )
    } else {
        String::new()
    };
    // The archive cost: the main directory row (archive on) against archive off, paired.
    let archive_cost: Vec<f64> = archive_on.iter().zip(&archive_off).map(|(on, off)| on / off.cpu - 1.0).collect();
    let archive_off_row = median(archive_off);
    let reconcile_row = median(reconciles);
    let duck_reconcile_row = median(duck_reconciles);
    let reconcile_ratio = match (&reconcile_row, &duck_reconcile_row) {
        (Some(r), Some(d)) => Some(d.wall / r.wall),
        _ => None,
    };
    // The quality cost compares CPU time, rounds paired (each round runs both back to back).
    let quality_cost: Vec<f64> = quality_on.iter().zip(&quality_off).map(|(a, b)| a.cpu / b.cpu - 1.0).collect();
    let dir = median(dirs).expect("at least one round");
    let quality_off_row = median(quality_off);
    let quality_on_row = median(quality_on);
    let default_row = median(defaults);
    let one_row = median(ones);
    let http = median(https);
    let duck = median(ducks);
    let nexmark = if args.iter().any(|a| a == "--no-nexmark") {
        Vec::new()
    } else {
        run_nexmark(&work, events, with_duckdb)
    };
    let window = (!args.iter().any(|a| a == "--no-window")).then(|| run_window(&work, events, with_duckdb));
    let fresh_secs: u64 = arg(&args, "--freshness-secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut freshness = Vec::new();
    if fresh_secs > 0 {
        let text = std::fs::read_to_string(work.join("in/orders-00000.ndjson")).expect("sample");
        let sample: Vec<String> = text.lines().map(str::to_string).collect();
        for rate in [10_000, 100_000] {
            freshness.push(run_freshness(&work, rate, fresh_secs, &sample));
            eprintln!("freshness at {rate} events/s measured");
        }
    }
    if args.iter().any(|a| a == "--keep") {
        // For profiling a run by hand (e.g. `sluice reconcile dir.sql` in it).
        eprintln!("kept {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }

    let floor_wall = decode.wall + encode.wall;
    let (dir_wall, http_wall) = (dir.wall, http.as_ref().map(|h| h.wall));
    let (default_wall, one_wall) = (default_row.as_ref().map(|r| r.wall), one_row.as_ref().map(|r| r.wall));
    let kafka_floor_wall = kafka_floor.as_ref().map(|f| f.wall);
    let kafka_wall = kafka_row.as_ref().map(|k| k.wall);
    let mut rows = vec![dir];
    rows.extend(kafka_row);
    rows.extend(kafka_floor);
    rows.extend(s3_row);
    rows.extend(default_row);
    rows.extend(one_row);
    rows.extend(archive_off_row);
    rows.extend(quality_off_row);
    rows.extend(quality_on_row);
    rows.extend(http);
    let duck_wall = duck.as_ref().map(|d| d.wall);
    rows.extend(duck);
    rows.push(decode);
    rows.push(arrow_decode);
    rows.push(encode);
    rows.push(archive_encode);
    // Each row's DuckDB reference: the order-stream DuckDB run, or the same Nexmark query's.
    let mut reference: Vec<Option<f64>> = rows
        .iter()
        .map(|r| (!r.name.starts_with("floor")).then_some(duck_wall).flatten())
        .collect();
    // The reconcile rows compare with DuckDB's recompute-and-compare.
    let recon_wall = duck_reconcile_row.as_ref().map(|d| d.wall);
    for r in [reconcile_row, duck_reconcile_row].into_iter().flatten() {
        rows.push(r);
        reference.push(recon_wall);
    }
    let nexmark_from = rows.len();
    for (ours, duck) in nexmark {
        let wall = duck.as_ref().map(|d| d.wall);
        rows.push(ours);
        reference.push(wall);
        if let Some(d) = duck {
            rows.push(d);
            reference.push(wall);
        }
    }

    let window_from = rows.len();
    let mut window_note = String::new();
    if let Some((ours, lean, duck, peak)) = window {
        let wall = duck.as_ref().map(|d| d.wall);
        if let Some(d) = wall {
            window_note = format!(
                "\n**Windows** (same run): a tumbling 1-minute count + sum per key over {events} bids (~865k keys of `price / 10`), state kept per open window and checkpointed with every commit. With the archive and profiles off (the work DuckDB does: decode, aggregate, write), DuckDB wall / sluice wall = {:.2} (target ≥ 1.0: {}); with the default sink options (the raw archive, a second Parquet encode of every input row, and profiles on) {:.2}. Peak state {:.1} MiB (the entries' `state.state_bytes`).\n",
                d / lean.wall,
                if d / lean.wall >= 1.0 { "met" } else { "NOT met" },
                d / ours.wall,
                peak as f64 / 1048576.0
            );
        }
        rows.push(ours);
        reference.push(wall);
        rows.push(lean);
        reference.push(wall);
        if let Some(d) = duck {
            rows.push(d);
            reference.push(wall);
        }
    }

    let mut table = String::new();
    table.push_str("| run | events | wall s | events/s | input MB/s | CPU-s | CPU-s per M events | events per CPU-s | peak RSS MiB | rows out | DuckDB wall / this wall | floor / this wall |\n");
    table.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, r) in rows.iter().enumerate() {
        if i == nexmark_from && nexmark_from < window_from {
            table.push_str("| *Nexmark (bids, directory source)* | | | | | | | | | | | |\n");
        }
        if i == window_from {
            table.push_str("| *Windows (bids, directory source)* | | | | | | | | | | | |\n");
        }
        let vs_duck = reference[i].map_or("–".to_string(), |d| format!("{:.2}", d / r.wall));
        // The floor ratio compares runs over the order stream only.
        let is_floor = r.name.starts_with("floor") || r.name.contains("recompute") || i >= nexmark_from;
        table.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {} | {} | {} | {} |\n",
            r.name,
            r.events,
            r.wall,
            r.events as f64 / r.wall,
            r.bytes as f64 / 1e6 / r.wall,
            r.cpu,
            r.cpu / (r.events as f64 / 1e6),
            r.events as f64 / r.cpu.max(1e-9),
            if r.rss > 0 {
                format!("{}", r.rss >> 20)
            } else {
                "–".into()
            },
            r.rows_out.map_or("–".to_string(), |n| n.to_string()),
            vs_duck,
            if is_floor {
                "–".into()
            } else {
                format!("{:.2}", floor_wall / r.wall)
            },
        ));
    }
    if let (Some(d), Some(o)) = (default_wall, one_wall) {
        table.push_str(&format!(
            "\n**Default options** (same run): files {:.0}% and one file {:.0}% of the tuned directory run's throughput.\n",
            100.0 * dir_wall / d,
            100.0 * dir_wall / o
        ));
    }
    table.push_str(&paired_cost(
        "Quality cost",
        "profiles + 3 expectations cost",
        "`quality.profile` off",
        &quality_cost,
        0.10,
    ));
    table.push_str(&paired_cost(
        "Archive cost",
        "the raw archive (on by default, in the main directory row) costs",
        "`archive` off",
        &archive_cost,
        0.25,
    ));
    if !kafka_share.is_empty() {
        let mut sorted = kafka_share.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted[sorted.len() / 2];
        table.push_str(&format!(
            "\n**Kafka** (same run): the Kafka source's throughput is {:.0}% of the directory source's (paired rounds: {}; the broker, tansu, runs on the same 2 cores). Target ≥ 70%: {}.\n",
            100.0 * mid,
            kafka_share.iter().map(|r| format!("{:.0}%", 100.0 * r)).collect::<Vec<_>>().join(", "),
            if mid >= 0.70 { "met" } else { "NOT met" }
        ));
        if let (Some(f), Some(k)) = (kafka_floor_wall, kafka_wall) {
            table.push_str(&format!(
                "A bare librdkafka consumer reading the same topic from the same broker (nothing decoded or written) takes {f:.2} s: the Kafka row runs at {:.0}% of what this broker serves.\n",
                100.0 * f / k
            ));
        }
    }
    if !s3_share.is_empty() {
        let mut sorted = s3_share.clone();
        sorted.sort_by(f64::total_cmp);
        table.push_str(&format!(
            "\n**S3** (same run): the directory source writing its sink to S3 (moto, an in-memory Python S3 server on the same 2 cores; every commit also copies each staged object into place, S3 having no rename) runs at {:.0}% of its speed on local disk (paired rounds: {}; walls s: {s3_walls}).\n",
            100.0 * sorted[sorted.len() / 2],
            s3_share.iter().map(|r| format!("{:.0}%", 100.0 * r)).collect::<Vec<_>>().join(", "),
        ));
    }
    table.push_str(&window_note);
    if let Some(r) = reconcile_ratio {
        table.push_str(&format!(
            "\n**Reconcile** (same run): recomputing all {events} events of the directory run from the raw archive and comparing with its output, DuckDB wall / sluice wall = {r:.2}. Target ≥ 1.0: {}.\n",
            if r >= 1.0 { "met" } else { "NOT met" }
        ));
    }
    table.push_str(&targets(
        dir_wall,
        http_wall,
        duck_wall,
        floor_wall,
        freshness.iter().find(|f| f.0 == 100_000).map(|f| f.5),
        rows.iter()
            .filter(|r| r.name.starts_with("sluice"))
            .map(|r| r.rss)
            .max(),
    ));
    if !freshness.is_empty() {
        table.push_str(&format!(
            "\n**Freshness** (HTTP, durable acks, `batch.interval` = 100 ms, fixed rate for {fresh_secs} s; visible = a committed log entry covers the request):\n\n"
        ));
        table.push_str("| offered events/s | events sent | ack p50 ms | ack p99 ms | freshness p50 ms | freshness p99 ms | freshness max ms |\n|---:|---:|---:|---:|---:|---:|---:|\n");
        for (rate, sent, a50, a99, f50, f99, fmax) in &freshness {
            table.push_str(&format!(
                "| {rate} | {sent} | {a50:.1} | {a99:.1} | {f50:.0} | {f99:.0} | {fmax:.0} |\n"
            ));
        }
    }
    println!("{table}");
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string()))
            .unwrap_or_default()
    );
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let doc = format!(
        "# Benchmarks\n\nRegenerated by the harness — do not edit by hand.\n\n\
- command: `benches/run.sh --events {events}` (= `cargo bench --bench pipeline -- --events {events}`)\n\
- machine: {machine}\n- date: {date}\n\
- data: {events} orders, {:.0} MB of NDJSON ({:.0} bytes/event, 10 columns, seed 42, {MALFORMED_PER_MILLION} malformed per million), {files} files\n\
- transform: filter, projection, arithmetic, join with a 5-row CSV table, derived date column → zstd Parquet partitioned by date\n\
- DuckDB: the same SQL over the same files, `threads=2`, `COPY ... (FORMAT PARQUET, PARTITION_BY (order_date), COMPRESSION ZSTD)`; Nexmark likewise (`to_char` spelled `strftime`; q0–q2 to one file, q10 partitioned by `(dt, hm)`)\n\
- floor: the engine's decoder alone (schema-specialised: a one-pass flat-object scanner, sonic-rs for lines it gives up on, arrow-json for what both defer), then the Parquet encoder alone with the sink's default settings (zstd level 1, 16 KiB dictionary limit), one thread each; \"floor / this wall\" = (decode + encode wall) / the run's wall; the arrow-json row is the same decode with the fast path off\n\
{rounds_note}{defaults_note}{quality_note}- the HTTP run's load generator ({HTTP_CONNECTIONS} connections, {HTTP_BODY_LINES} lines per request) runs in the harness process on the same 2 cores\n\n{table}\n",
        bytes as f64 / 1e6,
        bytes as f64 / events as f64,
    );
    // Figures measured by tests rather than this harness sit after KEPT_MARKER and are kept.
    let kept = std::fs::read_to_string(&out_path)
        .ok()
        .and_then(|old| old.find(KEPT_MARKER).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    let doc = if kept.is_empty() { doc } else { format!("{doc}\n{kept}") };
    let mut f = std::fs::File::create(&out_path).expect("write BENCHMARKS.md");
    f.write_all(doc.as_bytes()).expect("write");
    eprintln!("wrote {}", out_path.display());
}
