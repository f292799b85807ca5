//! One writer per pipeline and sink, and `sluice check`.
//!
//! Reproducer for #12 (item 5): a second instance of a running pipeline ran recovery on the
//! sink and deleted the staged files of the running writer.

use std::collections::HashSet;
use std::time::Duration;

use crate::delivery::{check, http_pipeline, post_events};
use crate::harness::{Server, committed_output, log_entries, run_to_exit, wait_until};

#[test]
fn a_second_instance_is_refused_and_check_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '50ms'");
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    post_events(&server, "r0", 0..200);
    wait_until(Duration::from_secs(30), "a commit", || {
        (committed_output(&sink) > 0).then_some(())
    });

    // A second instance (another listener, another state dir) is refused before it touches
    // the sink.
    let other = dir.path().join("other-state");
    let (code, text) = run_to_exit(
        &[
            "run",
            "p.sql",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            other.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("already running"), "{text}");
    // The first one is unharmed.
    post_events(&server, "r1", 200..400);
    server.stop();
    let sent: HashSet<i64> = (0..400).collect();
    crate::harness::runtime().block_on(check(&sink, &sent, &sent));

    let (code, text) = run_to_exit(&["check", "lake/out"], dir.path());
    assert_eq!(code, 0, "{text}");
    assert!(text.trim_end().ends_with("ok"), "{text}");

    // Damage: a committed file truncated, another removed, a stray file where readers look.
    let files: Vec<String> = log_entries(&sink)
        .iter()
        .flat_map(|e| e["add"].as_array().unwrap().clone())
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    let truncated = sink.join(&files[0]);
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(sink.join(&files[1])).unwrap();
    std::fs::write(sink.join("part=0/stray.parquet"), b"not committed").unwrap();
    let (code, text) = run_to_exit(&["check", "lake/out"], dir.path());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("WrongSize: {}", files[0])), "{text}");
    assert!(text.contains(&format!("Missing: {}", files[1])), "{text}");
    assert!(text.contains("NotCommitted: part=0/stray.parquet"), "{text}");
    assert!(text.contains("3 problem(s)"), "{text}");
    let (code, text) = run_to_exit(&["check", "lake/out", "--json"], dir.path());
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["problems"].as_array().unwrap().len(), 3, "{report}");
}

// `--instance` names one of several servers sharing a source (Kafka consumer groups). Under a
// new instance name an HTTP or directory pipeline would be a new writer with no position and
// read its input again, so `run` refuses it, says why, and writes nothing.
#[test]
fn instance_is_refused_for_a_source_one_server_owns() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(dir.path(), "'batch.interval' '50ms'");
    let sink = dir.path().join("lake/out");
    let (code, text) = run_to_exit(
        &["run", sql.to_str().unwrap(), "--listen", "127.0.0.1:0", "--instance", "b"],
        dir.path(),
    );
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("--instance b: pipeline out reads HTTP source ev, which one server owns"),
        "{text}"
    );
    assert!(text.contains("Kafka consumer groups"), "{text}");
    assert!(!sink.join("_sluice").exists(), "nothing written to the sink");
    // The same through the environment.
    let out = std::process::Command::new(crate::harness::bin())
        .args(["run", sql.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("SLUICE_INSTANCE", "c")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--instance c:"));
}
