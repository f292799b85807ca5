//! End to end over HTTP: the real binary, a pipeline with a filter, a computed column, a join with
//! a static CSV table and a derived partition column; good and malformed events; the committed
//! Parquet read back by plain DataFusion and compared row by row with the transform computed here.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use serde_json::{Value, json};

use crate::harness::{Server, committed_output, dead_letters, read_hive, wait_until};

const FX: &[(&str, f64)] = &[("USD", 1.0), ("EUR", 1.08), ("GBP", 1.27), ("JPY", 0.0067)];
const CURRENCIES: &[&str] = &["USD", "EUR", "GBP", "JPY", "XXX"];
const STATUSES: &[&str] = &["new", "paid", "test", "shipped"];
/// 2026-11-20T00:00:00Z in epoch milliseconds.
const BASE_MS: i64 = 1_795_132_800_000;

#[derive(Debug, Clone, PartialEq)]
struct Row {
    order_id: i64,
    customer_id: Option<i64>,
    amount_usd: f64,
    status: String,
    ts_ns: i64,
    order_date: String,
}

fn pipeline_sql(dir: &Path) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (
           order_id BIGINT NOT NULL, customer_id BIGINT, amount DOUBLE,
           currency VARCHAR, status VARCHAR, ts TIMESTAMP NOT NULL)
         STORED AS HTTP LOCATION '/v1/sources/orders'
         OPTIONS ('batch.interval' '200ms', 'batch.max_rows' '700', 'max_body_bytes' '64KB');
         CREATE EXTERNAL TABLE fx STORED AS CSV LOCATION '{fx}' OPTIONS ('format.has_header' 'true');
         CREATE EXTERNAL TABLE orders_usd STORED AS PARQUET PARTITIONED BY (order_date)
         LOCATION '{sink}';
         INSERT INTO orders_usd
         SELECT o.order_id, o.customer_id, o.amount * fx.rate AS amount_usd, upper(o.status) AS status,
                o.ts, CAST(o.ts AS DATE) AS order_date
         FROM orders o JOIN fx ON o.currency = fx.currency
         WHERE o.status <> 'test';",
        fx = dir.join("fx.csv").display(),
        sink = dir.join("lake/orders_usd").display()
    )
}

/// Event `i`: a JSON line, and the row it must produce (None when filtered out), or a reason it
/// must be dead-lettered.
enum Event {
    Good(String, Option<Row>),
    Bad(String, &'static str),
}

fn event(i: i64) -> Event {
    if i % 53 == 7 {
        return match (i / 53) % 4 {
            0 => Event::Bad(format!("{{\"order_id\": {i}, \"amount\": oops"), "Encountered"),
            1 => Event::Bad(
                format!("{{\"order_id\": {i}, \"amount\": \"abc\", \"currency\": \"USD\", \"ts\": 0}}"),
                "amount",
            ),
            2 => Event::Bad(
                format!("{{\"customer_id\": {i}, \"amount\": 1, \"currency\": \"USD\", \"ts\": 0}}"),
                "order_id",
            ),
            _ => Event::Bad(
                format!("{{\"order_id\": {i}, \"amount\": 1, \"currency\": \"USD\", \"ts\": \"yesterday\"}}"),
                "timestamp",
            ),
        };
    }
    let customer = if i % 7 == 0 { Value::Null } else { json!(i % 100) };
    let amount = ((i * 37) % 1000) as f64 / 10.0;
    let currency = CURRENCIES[(i % 5) as usize];
    let status = STATUSES[((i / 5) % 4) as usize];
    let ms = BASE_MS + i * 97_000;
    let ts = if i % 2 == 0 {
        json!(ms)
    } else {
        json!(chrono_like_rfc3339(ms))
    };
    let line = json!({"order_id": i, "customer_id": customer, "amount": amount, "currency": currency, "status": status, "ts": ts, "extra": "ignored"}).to_string();
    let rate = FX.iter().find(|(c, _)| *c == currency).map(|(_, r)| *r);
    let row = match rate {
        Some(rate) if status != "test" => Some(Row {
            order_id: i,
            customer_id: customer.as_i64(),
            amount_usd: amount * rate,
            status: status.to_uppercase(),
            ts_ns: ms * 1_000_000,
            order_date: date_of(ms),
        }),
        _ => None,
    };
    Event::Good(line, row)
}

/// RFC 3339 text for epoch milliseconds (UTC), computed without a date library.
fn chrono_like_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (d, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        civil(d),
        s / 3600,
        (s / 60) % 60,
        s % 60,
        ms.rem_euclid(1000)
    )
}

fn date_of(ms: i64) -> String {
    civil(ms.div_euclid(86_400_000))
}

/// Days since 1970-01-01 to `YYYY-MM-DD` (Howard Hinnant's algorithm).
fn civil(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

async fn read_rows(sink: &Path) -> Vec<Row> {
    let batches = read_hive(
        sink,
        &[("order_date", DataType::Utf8)],
        "SELECT order_id, customer_id, amount_usd, arrow_cast(status, 'Utf8') AS status,
                arrow_cast(arrow_cast(ts, 'Timestamp(Nanosecond, None)'), 'Int64') AS ts,
                arrow_cast(order_date, 'Utf8') AS d
         FROM t ORDER BY order_id",
    )
    .await;
    let mut rows = Vec::new();
    for b in batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let cust = b.column(1).as_primitive::<Int64Type>();
        let amt = b.column(2).as_primitive::<Float64Type>();
        let st = b.column(3).as_string::<i32>();
        let ts = b.column(4).as_primitive::<Int64Type>();
        let d = b.column(5).as_string::<i32>();
        for i in 0..b.num_rows() {
            rows.push(Row {
                order_id: id.value(i),
                customer_id: (!cust.is_null(i)).then(|| cust.value(i)),
                amount_usd: amt.value(i),
                status: st.value(i).to_string(),
                ts_ns: ts.value(i),
                order_date: d.value(i).to_string(),
            });
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_events_become_partitioned_parquet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fx.csv"),
        "currency,rate\nUSD,1.0\nEUR,1.08\nGBP,1.27\nJPY,0.0067\n",
    )
    .unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline_sql(dir.path())).unwrap();
    let sink = dir.path().join("lake/orders_usd");
    let server = Server::start(&[&sql], dir.path());
    let http = reqwest::Client::new();
    let ingest = server.url("/v1/sources/orders");

    let n = 2_000i64;
    let mut expected = Vec::new();
    let mut bad: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut lines = Vec::new();
    for i in 0..n {
        match event(i) {
            Event::Good(l, row) => {
                expected.extend(row);
                lines.push(l);
            }
            Event::Bad(l, why) => {
                bad.insert(l.clone(), why);
                lines.push(l);
            }
        }
    }
    // NDJSON bodies of 100 lines (all the malformed ones among them), then 100 good events as
    // one JSON array.
    let mut accepted = 0u64;
    let mut rejected = 0u64;
    let mut goods: Vec<&String> = lines.iter().filter(|l| !bad.contains_key(*l)).collect();
    let array: Vec<&String> = goods.split_off(goods.len() - 100);
    let ndjson: Vec<&String> = lines.iter().filter(|l| !array.contains(l)).collect();
    for part in ndjson.chunks(100) {
        let body = part.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n");
        let r = http.post(&ingest).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        accepted += v["accepted"].as_u64().unwrap();
        rejected += v["rejected"].as_u64().unwrap();
    }
    let body = format!("[{}]", array.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","));
    let r = http
        .post(&ingest)
        .header("x-request-id", "array-1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["request_id"], "array-1");
    assert_eq!(v["rejected"], 0);
    accepted += v["accepted"].as_u64().unwrap();
    assert_eq!(accepted + rejected, n as u64);
    assert_eq!(rejected, bad.len() as u64);

    // Bodies that are refused as a whole.
    // Not JSON at all (every record broken): 400, and nothing is kept or dead-lettered.
    for body in ["this is not json", "{\"order_id\": 1, \"amount\": oops", "[1, 2"] {
        let r = http.post(&ingest).body(body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    let r = http.post(&ingest).body("this is not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
    let r = http
        .post(server.url("/v1/sources/nope"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http.post(&ingest).body(vec![b' '; 70 * 1024]).send().await.unwrap();
    assert_eq!(r.status(), 413);

    // Wait for the commits, by the log, with a deadline.
    let want = expected.len() as u64;
    wait_until(Duration::from_secs(60), "all rows committed", || {
        (committed_output(&sink) >= want).then_some(())
    });
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sluice_events_received_total"), "{metrics}");
    assert_eq!(http.get(server.url("/readyz")).send().await.unwrap().status(), 200);
    let status: Value = http
        .get(server.url("/v1/pipelines"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status[0]["name"], "orders_usd");
    assert_eq!(status[0]["events_received"], n);

    let exit = server.terminate();
    assert!(exit.success(), "SIGTERM drains and exits 0: {exit:?}");

    // Row by row.
    let got = read_rows(&sink).await;
    assert_eq!(got.len(), expected.len(), "row count");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.order_id, e.order_id);
        assert_eq!(g.customer_id, e.customer_id, "customer of {}", e.order_id);
        assert!(
            (g.amount_usd - e.amount_usd).abs() < 1e-9,
            "amount of {}: {} vs {}",
            e.order_id,
            g.amount_usd,
            e.amount_usd
        );
        assert_eq!(g.status, e.status);
        assert_eq!(g.ts_ns, e.ts_ns, "ts of {}", e.order_id);
        assert_eq!(g.order_date, e.order_date, "partition of {}", e.order_id);
    }

    // Every bad record is a dead letter with its reason and raw text.
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), bad.len());
    for l in &letters {
        let raw = l["raw"].as_str().unwrap();
        let why = bad.get(raw).unwrap_or_else(|| panic!("unexpected dead letter {l}"));
        assert_eq!(l["stage"], "decode");
        assert_eq!(l["source"], "orders");
        assert!(
            l["error"].as_str().unwrap().contains(why),
            "reason for {raw}: {}",
            l["error"]
        );
        assert!(l["position"]["request_id"].is_string());
    }
    // Nothing is left staged once drained.
    assert_eq!(
        crate::harness::files_under(&sink.join("_sluice/staging")),
        Vec::<String>::new()
    );
}

#[test]
fn rfc3339_helper_matches_known_dates() {
    assert_eq!(chrono_like_rfc3339(BASE_MS), "2026-11-20T00:00:00.000Z");
    assert_eq!(date_of(0), "1970-01-01");
    assert_eq!(civil(20_000), "2024-10-04");
}

// Reproducer: requests without X-Request-Id got ids minted from a per-process counter; after a
// restart the new ids collided with ones rebuilt from the ingest log and were answered
// `duplicate` without being logged. Such requests must never be deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_an_id_are_never_deduplicated_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL) STORED AS HTTP LOCATION '/v1/sources/ev'
             OPTIONS ('batch.interval' '50ms');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}';
             INSERT INTO out SELECT id FROM ev;",
            dir.path().join("lake/out").display()
        ),
    )
    .unwrap();
    let sink = dir.path().join("lake/out");
    let http = reqwest::Client::new();
    for round in 0..2i64 {
        let server = Server::start(&[&sql], dir.path());
        for i in 0..3i64 {
            let r = http
                .post(server.url("/v1/sources/ev"))
                .body(format!("{{\"id\": {}}}", round * 10 + i))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["accepted"], 1, "round {round}: {v}");
            assert!(v.get("duplicate").is_none(), "round {round}: {v}");
        }
        let want = (round as u64 + 1) * 3;
        wait_until(Duration::from_secs(60), "committed", || {
            (committed_output(&sink) >= want).then_some(())
        });
        server.stop();
    }
    assert_eq!(committed_output(&sink), 6);
}

// Reproducer for #12 (item 9): hostile bodies. A line of 100,000 nested brackets (well under
// the body limit) aborted the process; a body over the listener's limit got a plain-text 413;
// a record that is not UTF-8 was kept only as a lossy copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_json_answers_and_exact_dead_letters() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let sql = crate::delivery::http_pipeline(dir.path(), "'batch.interval' '50ms'");
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let http = reqwest::Client::new();
    let url = server.url("/v1/sources/ev");

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = http
        .post(&url)
        .body(format!("{{\"id\": 1, \"v\": 7}}\n{deep}\n{{\"id\": 2, \"v\": {deep}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(1), Some(2)),
        "{answer}"
    );

    let mut not_utf8 = b"{\"id\": 3, \"v\": \"".to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe, b'x']);
    not_utf8.extend_from_slice(b"\"}");
    let r = http.post(&url).body(not_utf8.clone()).send().await.unwrap();
    assert!(r.status() == 200 || r.status() == 400, "{}", r.status());

    // Over the listener's limit (the largest max_body_bytes, 16MB by default): JSON 413.
    let r = http.post(&url).body(vec![b' '; 17 << 20]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let answer: Value = r.json().await.expect("a JSON error body");
    assert!(answer["error"].is_string(), "{answer}");

    // (A fresh connection: the server closes the one whose body it refused unread.)
    let fresh = reqwest::Client::new();
    assert_eq!(fresh.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    wait_until(Duration::from_secs(30), "the good record committed", || {
        (committed_output(&sink) >= 1).then_some(())
    });
    server.stop();
    let dead = dead_letters(&sink);
    let nested = dead
        .iter()
        .filter(|d| d["error"].as_str().unwrap_or_default().contains("nested deeper"))
        .count();
    assert_eq!(nested, 2, "{dead:?}");
    if let Some(d) = dead.iter().find(|d| d["raw_base64"].is_string()) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d["raw_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes, not_utf8, "the exact bytes are kept");
    } else {
        panic!("the non-UTF-8 record is a dead letter with its exact bytes: {dead:?}");
    }
}

// SIGTERM drains: what is buffered (the batch interval is an hour, so nothing was committed on
// its own) is committed before the process exits 0.
#[test]
fn sigterm_commits_what_is_buffered_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let sql = crate::delivery::http_pipeline(dir.path(), "'batch.interval' '1h', 'batch.max_rows' '1000000'");
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let body = (0..500).map(crate::delivery::line).collect::<Vec<_>>().join("\n");
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/sources/ev"))
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    assert_eq!(committed_output(&sink), 0, "nothing committed before the signal");
    server.stop(); // fails unless the exit status is 0
    let sent: std::collections::HashSet<i64> = (0..500).collect();
    rt.block_on(crate::delivery::check(&sink, &sent, &sent));
}

// Reproducer for #12 (item 10): the dedup window was rebuilt from the ingest log alone, so
// after its segment was deleted (committed) and the server restarted, a retried request was
// appended again and its events written twice.
#[test]
fn a_retry_after_its_segment_was_deleted_and_a_restart_is_still_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let sql = crate::delivery::http_pipeline(dir.path(), "'batch.interval' '20ms', 'log.segment_bytes' '2KB'");
    let sink = dir.path().join("lake/out");
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let post = |server: &Server, id: &str, ids: std::ops::Range<i64>| -> Value {
        let body = ids.map(crate::delivery::line).collect::<Vec<_>>().join("\n");
        rt.block_on(async {
            let r = http
                .post(server.url("/v1/sources/ev"))
                .header("x-request-id", id)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json().await.unwrap()
        })
    };
    let server = Server::start(&[&sql], dir.path());
    let first = post(&server, "x", 0..20);
    assert_eq!(first["seq"], 0);
    let log_dir = dir.path().join(".sluice/ingest/ev");
    let mut next = 20;
    wait_until(Duration::from_secs(60), "the segment holding request x deleted", || {
        post(&server, &format!("more-{next}"), next..next + 20);
        next += 20;
        (!log_dir.join(format!("{:020}.wal", 0)).exists()).then_some(())
    });
    server.stop();
    let server = Server::start(&[&sql], dir.path());
    let again = post(&server, "x", 0..20);
    assert_eq!(again["duplicate"], true, "{again}");
    server.stop();
    let sent: std::collections::HashSet<i64> = (0..next).collect();
    rt.block_on(crate::delivery::check(&sink, &sent, &sent));
}

// Reproducer for #12 (item 9): request bodies were buffered whole before any budget was
// asked, so slow or many clients could pin unbounded memory. Reproducer for #25: the budget was
// then charged for a declared Content-Length before the body was read, so ~16 clients that sent
// headers and nothing held it all. Bodies are now charged for the bytes actually held, as they
// arrive (`--max-buffer-bytes`): past the budget a request is refused (JSON 429), a declared
// length costs nothing, and room comes back when a body is done.
#[test]
fn bodies_in_flight_are_bounded_by_the_server_budget() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sql = crate::delivery::http_pipeline(dir.path(), "'batch.interval' '50ms'");
    let server = Server::start_full(&[&sql], dir.path(), 0, &[], &["--max-buffer-bytes", "1000000"]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let head = |len: usize| {
        format!(
            "POST /v1/sources/ev HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let answer = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let in_flight = |rt: &tokio::runtime::Runtime| -> f64 {
        let url = server.url("/metrics");
        let m = rt
            .block_on(async { reqwest::get(&url).await.ok()?.text().await.ok() })
            .unwrap_or_default();
        m.lines()
            .filter(|l| l.starts_with("sluice_http_body_bytes_in_flight"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .next()
            .unwrap_or(0.0)
    };
    let rt = crate::harness::runtime();
    // Twenty clients declare 16 MB bodies and send nothing: they hold nothing.
    let mut idle: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(head(16_000_000).as_bytes()).unwrap();
            s
        })
        .collect();
    // A: 600 kB declared, 599 kB of it sent so far (a slow client): 599 kB held.
    let body = (0..30_000).map(crate::delivery::line).collect::<Vec<_>>().join("\n");
    let body = &body.as_bytes()[..600_000];
    let mut a = std::net::TcpStream::connect(&addr).unwrap();
    a.write_all(head(body.len()).as_bytes()).unwrap();
    a.write_all(&body[..599_000]).unwrap();
    wait_until(Duration::from_secs(10), "A's received bytes charged", || {
        (in_flight(&rt) >= 599_000.0).then_some(())
    });
    assert!(in_flight(&rt) < 700_000.0, "declared lengths are not charged");
    // B: another 600 kB does not fit beside A: refused once its bytes pass the budget.
    let mut b = std::net::TcpStream::connect(&addr).unwrap();
    b.write_all(head(600_000).as_bytes()).unwrap();
    let _ = b.write_all(body);
    // The 429 is sent before B's body is all read: the server's close may reset the connection
    // before the answer is read here, so the refusal is checked by its counter too.
    let refused = answer(&mut b);
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 429"),
        "{refused}"
    );
    let metrics_url = server.url("/metrics");
    wait_until(Duration::from_secs(10), "B counted as refused", || {
        let m = rt.block_on(async { reqwest::get(&metrics_url).await.ok()?.text().await.ok() })?;
        m.contains("sluice_http_refused_total{reason=\"bodies_in_flight\"} 1").then_some(())
    });
    // A finishes and is answered; then there is room again.
    a.write_all(&body[599_000..]).unwrap();
    let done = answer(&mut a);
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    // (C may first meet the pipeline's own budget, still holding A until it commits: 429 is
    // back-pressure, and C retries like a producer.)
    let small = crate::delivery::line(1);
    wait_until(Duration::from_secs(30), "C accepted", || {
        let mut c = std::net::TcpStream::connect(&addr).ok()?;
        c.write_all(head(small.len()).as_bytes()).ok()?;
        c.write_all(small.as_bytes()).ok()?;
        let ok = answer(&mut c);
        assert!(
            ok.starts_with("HTTP/1.1 200") || ok.contains("at its memory budget"),
            "{ok}"
        );
        ok.starts_with("HTTP/1.1 200").then_some(())
    });
    idle.clear();
    server.stop();
}
