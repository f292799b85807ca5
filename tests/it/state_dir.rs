//! The ingest log is bound to the sink: a server started with another state directory (or from
//! another working directory) never answers 200 to requests it would not deliver.
//!
//! Reproducer for #12 (item 2): with a fresh state directory the new log started at sequence 0
//! while the sink had committed records up to N; every new request was acknowledged and
//! silently never delivered.

use std::collections::HashSet;

use crate::delivery::{check, http_pipeline, post_events};
use crate::harness::{Server, run_to_exit};

#[test]
fn a_fresh_state_dir_is_refused_unless_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '50ms'");
    let sink = dir.path().join("lake/out");

    // Started from the pipeline's directory: state in <dir>/.sluice.
    let server = Server::start(&[&sql], dir.path());
    post_events(&server, "r0", 0..100);
    server.stop();
    assert!(dir.path().join(".sluice/ingest/ev").is_dir());

    // Started from elsewhere: the default state directory is beside the pipeline file, so the
    // same log is found.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let server = Server::start(&[&sql], &elsewhere);
    post_events(&server, "r1", 100..200);
    server.stop();
    assert!(
        !elsewhere.join(".sluice").exists(),
        "no state next to the working directory"
    );

    // A fresh state directory: refused at start, saying what to do.
    let fresh = dir.path().join("fresh");
    let (code, err) = run_to_exit(
        &[
            "run",
            sql.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            fresh.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_ne!(code, 0, "refused: {err}");
    assert!(
        err.contains("is not the one") || err.contains("not the log"),
        "the error says the log does not match: {err}"
    );
    assert!(err.contains("--adopt-ingest-log"), "and what to do: {err}");

    // Adopted: the new log is read from its beginning and its records are delivered.
    let server = Server::start_full(
        &[&sql],
        dir.path(),
        0,
        &[],
        &["--state-dir", fresh.to_str().unwrap(), "--adopt-ingest-log"],
    );
    post_events(&server, "r2", 200..300);
    server.stop();
    // And once adopted, the log is bound: a restart needs no flag.
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &["--state-dir", fresh.to_str().unwrap()]);
    post_events(&server, "r3", 300..400);
    server.stop();

    let sent: HashSet<i64> = (0..400).collect();
    let rt = crate::harness::runtime();
    rt.block_on(check(&sink, &sent, &sent));
}
