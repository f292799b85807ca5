//! The sink's Parquet is read by what users run: Apache Spark, DuckDB, Polars and pyarrow each
//! read a sink directory as plain hive-partitioned Parquet and must agree with what was sent,
//! row by row (tests/readers/read_sink.py; the readers are installed by
//! `scripts/setup.sh --test`).
//!
//! Reproducer for #12 (item 13): timestamps were written as INT64 TIMESTAMP(NANOS), which
//! Spark refuses ("Illegal Parquet type: INT64 (TIMESTAMP(NANOS,false))").

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Server, committed_output, repo_root, wait_until};

/// 2026-11-20T00:00:00Z in epoch microseconds.
const BASE_US: i64 = 1_795_132_800_000_000;

pub(crate) fn python() -> String {
    crate::harness::tools_dir().join("venv/bin/python").display().to_string()
}

#[test]
fn spark_duckdb_polars_and_pyarrow_read_the_sink_alike() {
    let py = python();
    assert!(
        std::path::Path::new(&py).exists(),
        "{py} is missing: run scripts/setup.sh --test"
    );
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    let sink = dir.path().join("lake/out");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v DOUBLE, name VARCHAR, ts TIMESTAMP NOT NULL)
             STORED AS HTTP LOCATION '/v1/sources/ev' OPTIONS ('batch.interval' '50ms', 'batch.max_rows' '40');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION '{}';
             INSERT INTO out SELECT id, v, name, ts, id % 3 AS part FROM ev;",
            sink.display()
        ),
    )
    .unwrap();
    let n = 120i64;
    // Microsecond-exact instants (with sub-millisecond digits), nulls, non-ASCII text.
    let rows: Vec<(i64, Option<f64>, Option<String>, i64)> = (0..n)
        .map(|i| {
            let v = (i % 5 != 0).then(|| i as f64 * 1.25);
            let name = (i % 7 != 0).then(|| format!("näme-{i}"));
            (i, v, name, BASE_US + i * 3_600_000_123)
        })
        .collect();
    let body: Vec<String> = rows
        .iter()
        .map(|(i, v, name, us)| {
            let secs = us.div_euclid(1_000_000);
            let frac = us.rem_euclid(1_000_000);
            let ts = chrono_free_rfc3339(secs, frac);
            serde_json::json!({ "id": i, "v": v, "name": name, "ts": ts }).to_string()
        })
        .collect();
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/sources/ev"))
            .body(body.join("\n"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    wait_until(Duration::from_secs(30), "the rows committed", || {
        (committed_output(&sink) >= n as u64).then_some(())
    });
    server.stop();

    let out = Command::new(&py)
        .arg(repo_root().join("tests/readers/read_sink.py"))
        .arg(&sink)
        .env("SPARK_LOCAL_IP", "127.0.0.1")
        .output()
        .expect("run the readers");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "readers failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<Value> = rows
        .iter()
        .map(|(i, v, name, us)| serde_json::json!([i, v, name, us, i % 3]))
        .collect();
    let mut readers = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let r: Value = serde_json::from_str(line).unwrap();
        let name = r["reader"].as_str().unwrap().to_string();
        let got = r["rows"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: row count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{name}: row");
        }
        readers.push(name);
    }
    assert_eq!(readers, ["pyarrow", "duckdb", "polars", "spark"], "{stdout}");
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for epoch seconds and microseconds (civil-from-days).
fn chrono_free_rfc3339(secs: i64, micros: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}
