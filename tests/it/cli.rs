//! The CLI: `validate` on every example and on broken files, `query` read-only.

use std::process::Command;

use crate::harness::{bin, repo_root};

#[test]
fn every_example_validates_and_prints_its_plan() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "sql") {
                let out = Command::new(bin())
                    .arg("validate")
                    .arg(&f)
                    // Variables examples/kafka_s3 reads from the environment (validate
                    // touches neither the broker nor the store).
                    .env("KAFKA_BROKERS", "127.0.0.1:9092")
                    .env("S3_ENDPOINT", "http://127.0.0.1:9000")
                    .current_dir(repo_root())
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "{}: {}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(stdout.contains("pipeline ") && stdout.contains("TableScan"), "{stdout}");
                if f.ends_with("examples/windows/pipeline.sql") {
                    assert!(stdout.contains("  window: tumbling 1m,"), "{stdout}");
                    assert!(stdout.contains("  window: hopping 5m every 1m,"), "{stdout}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no example pipelines found");
}

#[test]
fn validate_rejects_a_broken_file_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("broken.sql");
    std::fs::write(
        &f,
        "CREATE UNBOUNDED EXTERNAL TABLE t (a BIGINT) STORED AS HTTP LOCATION '/v1/sources/t';\n\
         CREATE EXTERNAL TABLE o STORED AS PARQUET LOCATION '/tmp/o';\n\
         INSERT INTO o SELECT b FROM t;\n",
    )
    .unwrap();
    let out = Command::new(bin()).arg("validate").arg(&f).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.sql:3:22: error: column 'b' not found"), "{err}");
    assert!(
        err.contains("INSERT INTO o SELECT b FROM t;") && err.contains("^"),
        "{err}"
    );
}

#[test]
fn query_refuses_writes_and_unknown_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["query", "SELECT 1", "--table"])
        .arg(format!("t={}", dir.path().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no committed data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
