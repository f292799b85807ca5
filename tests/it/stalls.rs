//! No silent stalls, and environment failures are not bad data.
//!
//! Reproducers for #12: (item 8) a failed catch-up from the ingest log was only logged; the
//! pipeline stayed behind forever while producers kept getting 200. (item 6) a missing static
//! table made the plan fail, the batch was bisected and every row dead-lettered.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::delivery::{check, http_pipeline, line};
use crate::harness::{Server, committed_output, dead_letters, wait_until};

async fn post(http: &reqwest::Client, url: &str, id: &str, body: String) -> (u16, String) {
    match http.post(url).header("x-request-id", id).body(body).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn a_failed_catch_up_stops_intake_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(
        dir.path(),
        "'when_full' 'spill', 'buffer.max_bytes' '1KB', 'batch.interval' '2s'",
    );
    let sink = dir.path().join("lake/out");
    let server = Server::start_with(&[&sql], dir.path(), 0, &[("SLUICE_FAIL_AT", "catch_up")]);
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let mut acked = HashSet::new();
    let mut refused = None;
    for r in 0..200i64 {
        let ids = r * 10..(r + 1) * 10;
        let body = ids.clone().map(line).collect::<Vec<_>>().join("\n");
        let (status, text) = rt.block_on(post(&http, &url, &format!("r{r}"), body));
        match status {
            200 => acked.extend(ids),
            503 => {
                refused = Some(text);
                break;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let refused = refused.expect("intake stopped once the catch-up failed");
    assert!(refused.contains("catching up from the ingest log failed"), "{refused}");
    let ready = rt.block_on(async { http.get(server.url("/readyz")).send().await.unwrap() });
    assert_eq!(ready.status(), 503);
    let status: Value = rt.block_on(async {
        http.get(server.url("/v1/pipelines"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(
        status[0]["intake_error"]
            .as_str()
            .unwrap_or_default()
            .contains("catching up"),
        "{status}"
    );
    server.stop();
    // Every acknowledged request is in the log: a restart delivers them all.
    let server = Server::start(&[&sql], dir.path());
    let want = acked
        .iter()
        .filter(|i| crate::delivery::passes(**i) && !crate::delivery::malformed(**i))
        .count() as u64;
    wait_until(Duration::from_secs(60), "the acknowledged records committed", || {
        (committed_output(&sink) >= want).then_some(())
    });
    server.stop();
    rt.block_on(check(&sink, &acked, &acked));
}

#[test]
fn a_missing_static_table_is_retried_not_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx.csv");
    let fx_text = "currency,rate\nUSD,1.0\nEUR,2.0\n";
    std::fs::write(&fx, fx_text).unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, cur VARCHAR) STORED AS HTTP
             LOCATION '/v1/sources/ev' OPTIONS ('batch.interval' '50ms');
             CREATE EXTERNAL TABLE fx STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}';
             INSERT INTO out SELECT ev.id, fx.rate FROM ev JOIN fx ON ev.cur = fx.currency;",
            fx.display(),
            dir.path().join("lake/out").display()
        ),
    )
    .unwrap();
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let body = |ids: std::ops::Range<i64>| {
        ids.map(|i| {
            format!(
                "{{\"id\": {i}, \"cur\": \"{}\"}}",
                if i % 2 == 0 { "USD" } else { "EUR" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert_eq!(rt.block_on(post(&http, &url, "a", body(0..100))).0, 200);
    wait_until(Duration::from_secs(30), "the first commit", || {
        (committed_output(&sink) >= 100).then_some(())
    });
    // The table disappears (an operator replacing it, a lost volume): the plan fails for every
    // row alike. That is not bad data.
    std::fs::remove_file(&fx).unwrap();
    assert_eq!(rt.block_on(post(&http, &url, "b", body(100..200))).0, 200);
    let pipelines = server.url("/v1/pipelines");
    wait_until(Duration::from_secs(30), "the pipeline to report the failure", || {
        let s: Value = rt.block_on(async { http.get(&pipelines).send().await.ok()?.json().await.ok() })?;
        s[0]["last_error"].as_str()?.contains("not a data error").then_some(())
    });
    // Once the retries run out the pipeline is failed: not ready, intake closed with why.
    wait_until(Duration::from_secs(60), "the pipeline to be failed", || {
        let s: Value = rt.block_on(async { http.get(&pipelines).send().await.ok()?.json().await.ok() })?;
        (s[0]["state"] == "failed").then_some(())
    });
    let ready = rt.block_on(async { http.get(server.url("/readyz")).send().await.unwrap().status() });
    assert_eq!(ready, 503);
    let (status, text) = rt.block_on(post(&http, &url, "c", body(200..210)));
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("cannot commit"), "{text}");
    // Back in place: the same rows commit, none dead-lettered.
    std::fs::write(&fx, fx_text).unwrap();
    wait_until(Duration::from_secs(60), "the retried batch committed", || {
        (committed_output(&sink) >= 200).then_some(())
    });
    server.stop();
    assert!(dead_letters(&sink).is_empty(), "{:?}", dead_letters(&sink));
    assert_eq!(committed_output(&sink), 200);
}

/// `when_full` = `block` holds a request while the budget is full, but not forever: after
/// `block.timeout` it is refused with 429 and `Retry-After`, never logged, so the output is
/// exactly the accepted request.
#[test]
fn a_blocked_request_is_refused_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sql = http_pipeline(
        dir.path(),
        "'when_full' 'block', 'block.timeout' '300ms', 'buffer.max_bytes' '1KB', 'batch.interval' '1h', 'batch.max_rows' '1000000'",
    );
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");
    let body = |ids: std::ops::Range<i64>| ids.map(line).collect::<Vec<_>>().join("\n");
    // Larger than the whole budget: admitted because the pipeline holds nothing, and held in
    // the open batch (no size or time closes it) so the budget stays full.
    let first = body(0..100);
    assert!(first.len() > 1024);
    assert_eq!(rt.block_on(post(&http, &url, "r0", first)).0, 200);
    let (code, text) = rt.block_on(async {
        let r = http.post(&url).header("x-request-id", "r1").body(body(100..110)).send().await.unwrap();
        assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(code, 429, "{text}");
    assert!(text.contains("block.timeout"), "{text}");
    server.stop();
    let accepted: HashSet<i64> = (0..100).collect();
    let (out, _) = rt.block_on(check(&sink, &accepted, &accepted));
    assert_eq!(out as u64, committed_output(&sink));
}
