//! The quickstart example runs as documented: its pipeline file, its static table, a few posted
//! orders, and `sluice query` over the result.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Server, bin, committed_output, repo_root, wait_until};

#[test]
fn quickstart_pipeline_runs_and_is_queryable() {
    // Run in a scratch directory laid out like the repository (the example uses relative paths).
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("examples/quickstart");
    std::fs::create_dir_all(qs.join("data")).unwrap();
    for f in ["pipeline.sql", "data/fx.csv"] {
        std::fs::copy(repo_root().join("examples/quickstart").join(f), qs.join(f)).unwrap();
    }
    let server = Server::start(&[std::path::Path::new("examples/quickstart/pipeline.sql")], dir.path());
    let body = [
        r#"{"order_id":1,"customer_id":7,"amount":100,"currency":"EUR","status":"new","ts":"2026-11-22T10:00:00Z"}"#,
        r#"{"order_id":2,"amount":5,"currency":"USD","status":"test","ts":1763805600000}"#,
        r#"{"order_id":3,"amount":10,"currency":"GBP","status":"paid","ts":"2026-11-21T08:00:00Z"}"#,
        r#"{"order_id":4,"amount":"oops","currency":"GBP","status":"paid","ts":"2026-11-21T08:00:00Z"}"#,
    ]
    .join("\n");
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import urllib.request,sys; r=urllib.request.urlopen(urllib.request.Request('{}', data=sys.stdin.buffer.read(), method='POST')); print(r.read().decode())",
            server.url("/v1/sources/orders")
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"accepted\":3"),
        "{:?}",
        out
    );
    let sink = qs.join("lake/orders_usd");
    wait_until(Duration::from_secs(60), "quickstart commit", || {
        (committed_output(&sink) >= 2).then_some(())
    });
    server.stop();
    let q = Command::new(bin())
        .args([
            "query",
            "SELECT order_id, status, amount_usd, order_date FROM orders_usd ORDER BY order_id",
            "--format",
            "csv",
            "--table",
        ])
        .arg("orders_usd=examples/quickstart/lake/orders_usd/")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let csv = String::from_utf8_lossy(&q.stdout);
    assert_eq!(
        csv.trim(),
        "order_id,status,amount_usd,order_date\n1,NEW,108.0,2026-11-22\n3,PAID,12.7,2026-11-21"
    );
    // The quality report the quickstart prints, with its expectations.
    let (code, out) = crate::harness::run_to_exit(
        &["quality", "report", "examples/quickstart/lake/orders_usd/", "--html", "examples/quickstart/lake/quality-report.html"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("positive_amount") && out.contains("known_status"), "{out}");
    assert!(out.contains("report: examples/quickstart/lake/quality-report.html"), "{out}");
}
