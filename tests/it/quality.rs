//! Expectations and profiles end to end: each action does exactly what it says (counts in the
//! commit entry, reasons in dead letters), FAIL stops before the commit and a fix loses and
//! duplicates nothing, QUARANTINE sends a whole batch to dead letters, and `sluice quality
//! profile` merges the committed profiles.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;

use crate::harness::{Server, dead_letters, drop_file, log_entries, read_hive, run_to_exit, wait_until};

fn pipeline(dir: &Path, expectations: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE orders (id BIGINT NOT NULL, amount DOUBLE, currency VARCHAR)
         STORED AS NDJSON LOCATION '{incoming}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
         CREATE EXTERNAL TABLE orders_out STORED AS PARQUET LOCATION '{sink}';
         INSERT INTO orders_out SELECT id, amount * 2 AS doubled, currency FROM orders;
         {expectations}",
        incoming = dir.join("incoming").display(),
        sink = dir.join("lake/orders_out").display()
    )
}

fn setup(expectations: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("incoming")).unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline(dir.path(), expectations)).unwrap();
    (dir, sql)
}

/// A scratch directory with `incoming/`, a pipeline file written by `text(incoming, sink)`
/// (the sink at `lake/<sink_name>`): the directory, `incoming/`, the sink and the file.
fn scratch(
    sink_name: &str,
    text: impl FnOnce(&Path, &Path) -> String,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let sink = dir.path().join("lake").join(sink_name);
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, text(&incoming, &sink)).unwrap();
    (dir, incoming, sink, sql)
}

/// Records accounted for by the commit log: output + dead letters + dropped.
fn accounted(sink: &Path) -> u64 {
    log_entries(sink)
        .iter()
        .map(|e| {
            let c = &e["counts"];
            c["output"].as_u64().unwrap_or(0) + c["dead_lettered"].as_u64().unwrap_or(0) + c["dropped"].as_u64().unwrap_or(0)
        })
        .sum()
}

fn violations(sink: &Path, name: &str) -> u64 {
    log_entries(sink)
        .iter()
        .map(|e| e["quality"]["expectations"][name]["violations"].as_u64().unwrap_or(0))
        .sum()
}

async fn output_ids(sink: &Path) -> Vec<i64> {
    let batches = read_hive(sink, &[], "SELECT id FROM t ORDER BY id").await;
    batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn row_expectations_do_exactly_what_their_action_says() {
    let (dir, sql) = setup(
        "CREATE EXPECTATION positive ON orders CHECK (amount > 0) ON VIOLATION DEAD_LETTER;
         CREATE EXPECTATION not_13 ON orders CHECK (abs(amount) <> 13) ON VIOLATION DROP;
         CREATE EXPECTATION known_currency ON orders_out CHECK (currency IN ('USD', 'EUR')) ON VIOLATION WARN;
         CREATE EXPECTATION enough ON orders_out CHECK (count(*) >= 1) ON VIOLATION WARN;",
    );
    let sink = dir.path().join("lake/orders_out");
    let n = 500i64;
    let amount = |i: i64| match i {
        2 => -13.0, // fails positive (DEAD_LETTER) and not_13 (DROP): counted twice, routed once
        _ if i % 10 == 0 => -(i as f64),
        _ if i % 10 == 1 => 13.0,
        _ if i == 7 => f64::NAN, // written as null: NULL passes a CHECK, as in SQL
        _ => i as f64 + 0.5,
    };
    let currency = |i: i64| if i % 7 == 0 { "GBP" } else { "USD" };
    let body: String = (0..n)
        .map(|i| {
            let a = amount(i);
            let a = if a.is_nan() { "null".to_string() } else { a.to_string() };
            format!("{{\"id\": {i}, \"amount\": {a}, \"currency\": \"{}\"}}\n", currency(i))
        })
        .collect();
    drop_file(&dir.path().join("incoming"), "a.ndjson", &body);
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "every record accounted for", || {
        (accounted(&sink) == n as u64).then_some(())
    });
    server.stop();

    // amount null (id 7 is written as null: NULL passes a CHECK) stays.
    let dead_ids: BTreeSet<i64> = (0..n).filter(|&i| i == 2 || (i % 10 == 0)).collect();
    let dropped_ids: BTreeSet<i64> = (0..n).filter(|&i| i % 10 == 1).collect();
    let kept: Vec<i64> = (0..n).filter(|i| !dead_ids.contains(i) && !dropped_ids.contains(i)).collect();
    assert_eq!(output_ids(&sink).await, kept);
    let letters = dead_letters(&sink);
    let letter_ids: BTreeSet<i64> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["stage"], "expectation", "{l}");
            assert!(l["error"].as_str().unwrap().contains("positive: CHECK (amount > 0)"), "{l}");
            let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap()).unwrap();
            raw["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(letter_ids, dead_ids);
    assert_eq!(violations(&sink, "positive"), dead_ids.len() as u64);
    assert_eq!(violations(&sink, "not_13"), dropped_ids.len() as u64 + 1, "id 2 fails both");
    let gbp_kept = kept.iter().filter(|&&i| currency(i) == "GBP").count() as u64;
    assert_eq!(violations(&sink, "known_currency"), gbp_kept, "WARN counts and keeps");
    assert_eq!(violations(&sink, "enough"), 0);
    let dropped: u64 = log_entries(&sink).iter().map(|e| e["counts"]["dropped"].as_u64().unwrap()).sum();
    assert_eq!(dropped, dropped_ids.len() as u64);

    // The profiles merge to the committed table: rows, nulls and the distinct currencies.
    let (code, out) = run_to_exit(&["quality", "profile", sink.to_str().unwrap(), "--json"], dir.path());
    assert_eq!(code, 0, "{out}");
    let profile: serde_json::Value = serde_json::from_str(&out).expect("JSON profile");
    let col = |side: &str, name: &str| {
        profile["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["side"] == side && c["column"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {side} column {name} in {profile}"))
    };
    assert_eq!(col("sink", "id")["rows"].as_u64(), Some(kept.len() as u64));
    assert_eq!(col("source", "id")["rows"].as_u64(), Some(n as u64));
    assert_eq!(col("source", "amount")["nulls"].as_u64(), Some(1));
    assert_eq!(col("sink", "currency")["distinct"].as_u64(), Some(2));
    assert_eq!(col("sink", "id")["min"].as_str(), Some(kept[0].to_string().as_str()));
    let (code, out) = run_to_exit(&["quality", "profile", sink.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("currency") && out.contains("null %"), "{out}");

    // Suggested checks: pasted into the pipeline file, they pass validate.
    let (code, suggested) = run_to_exit(&["quality", "suggest", sink.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{suggested}");
    for want in [
        "CREATE EXPECTATION id_not_null ON orders_out CHECK (id IS NOT NULL) ON VIOLATION WARN;",
        "CREATE EXPECTATION currency_values ON orders_out CHECK (currency IN ('GBP', 'USD')) ON VIOLATION WARN;",
        "CREATE EXPECTATION id_range ON orders_out CHECK (id BETWEEN",
        "CREATE EXPECTATION orders_out_volume ON orders_out CHECK (count(*) >=",
    ] {
        assert!(suggested.contains(want), "{want} missing from:\n{suggested}");
    }
    assert!(!suggested.contains("doubled_not_null"), "doubled has a null: {suggested}");
    let mut text = std::fs::read_to_string(&sql).unwrap();
    text.push_str(&suggested);
    std::fs::write(&sql, text).unwrap();
    let (code, out) = run_to_exit(&["validate", sql.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_batch_check_stops_before_the_commit_and_a_fix_loses_nothing() {
    let (dir, sql) = setup("CREATE EXPECTATION all_positive ON orders CHECK (min(amount) > 0) ON VIOLATION FAIL;");
    let sink = dir.path().join("lake/orders_out");
    let body: String = (0..200)
        .map(|i| format!("{{\"id\": {i}, \"amount\": {}, \"currency\": \"USD\"}}\n", if i == 150 { -1 } else { i + 1 }))
        .collect();
    drop_file(&dir.path().join("incoming"), "a.ndjson", &body);
    let (code, out) = run_to_exit(&["run", sql.to_str().unwrap(), "--listen", "127.0.0.1:0"], dir.path());
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("expectation all_positive failed"), "{out}");
    assert!(log_entries(&sink).is_empty(), "nothing of the failing batch is committed");

    // The fix: relax the check; the batch is read again from the source and committed once.
    std::fs::write(
        &sql,
        pipeline(dir.path(), "CREATE EXPECTATION all_positive ON orders CHECK (min(amount) > -10) ON VIOLATION FAIL;"),
    )
    .unwrap();
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "the batch committed after the fix", || {
        (accounted(&sink) == 200).then_some(())
    });
    server.stop();
    assert_eq!(output_ids(&sink).await, (0..200).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_sends_the_whole_batch_to_dead_letters_and_moves_on() {
    let (dir, sql) = setup(
        "CREATE EXPECTATION unique_ids ON orders CHECK (count(DISTINCT id) = count(id)) ON VIOLATION QUARANTINE;",
    );
    let sink = dir.path().join("lake/orders_out");
    let incoming = dir.path().join("incoming");
    let lines = |ids: &[i64]| -> String {
        ids.iter().map(|i| format!("{{\"id\": {i}, \"amount\": 1, \"currency\": \"USD\"}}\n")).collect()
    };
    let server = Server::start(&[&sql], dir.path());
    drop_file(&incoming, "a.ndjson", &lines(&[1, 2, 3]));
    wait_until(Duration::from_secs(60), "the first file committed", || (accounted(&sink) == 3).then_some(()));
    drop_file(&incoming, "b.ndjson", &lines(&[4, 5, 5, 6]));
    wait_until(Duration::from_secs(60), "the second file accounted for", || (accounted(&sink) == 7).then_some(()));
    drop_file(&incoming, "c.ndjson", &lines(&[7, 8]));
    wait_until(Duration::from_secs(60), "the third file committed", || (accounted(&sink) == 9).then_some(()));
    server.stop();
    assert_eq!(output_ids(&sink).await, vec![1, 2, 3, 7, 8]);
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 4, "{letters:?}");
    for l in &letters {
        assert_eq!(l["stage"], "expectation");
        assert!(l["error"].as_str().unwrap().contains("quarantined by expectation unique_ids"), "{l}");
        assert!(l["position"]["quarantined_row"].is_u64(), "{l}");
    }
    assert_eq!(violations(&sink, "unique_ids"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_null_fraction_jump_is_one_anomaly_episode_across_a_restart() {
    let (dir, incoming, sink, sql) = scratch("m", |incoming, sink| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v DOUBLE, kind VARCHAR, x BIGINT)
             STORED AS NDJSON LOCATION '{}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
             CREATE EXTERNAL TABLE m STORED AS PARQUET LOCATION '{}' OPTIONS ('quality.min_batches' '5');
             INSERT INTO m SELECT v, kind, x FROM ev;",
            incoming.display(),
            sink.display()
        )
    });
    // Every file has the same shape but for v's nulls: 1% normally, 30% during the excursion.
    let file = |k: usize, null_pct: usize| -> String {
        (0..200)
            .map(|i| {
                let v = if i * 100 / 200 < null_pct { "null".to_string() } else { "7.0".to_string() };
                format!("{{\"id\": {}, \"v\": {v}, \"kind\": \"k{}\", \"x\": {}}}\n", k * 1000 + i, i % 4, i % 100)
            })
            .collect()
    };
    let plan: Vec<usize> = [vec![1; 12], vec![30; 5], vec![1; 5]].concat();
    let mut server = Some(Server::start(&[&sql], dir.path()));
    for (k, pct) in plan.iter().enumerate() {
        if k == 14 {
            // A restart in the middle of the excursion: the baseline and the open episode survive.
            server.take().unwrap().stop();
            server = Some(Server::start(&[&sql], dir.path()));
        }
        drop_file(&incoming, &format!("f{k:03}.ndjson"), &file(k, *pct));
        let want = 200 * (k as u64 + 1);
        wait_until(Duration::from_secs(60), "the file committed", || (accounted(&sink) == want).then_some(()));
    }
    server.take().unwrap().stop();
    let events: Vec<serde_json::Value> = log_entries(&sink)
        .iter()
        .flat_map(|e| e["quality"]["anomalies"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(events.len(), 2, "one start and one end: {events:?}");
    assert_eq!((events[0]["event"].as_str(), events[1]["event"].as_str()), (Some("start"), Some("end")));
    for e in &events {
        assert_eq!((e["column"].as_str(), e["metric"].as_str()), (Some("v"), Some("null_fraction")), "{e}");
        assert!((e["baseline"].as_f64().unwrap() - 0.01).abs() < 1e-9, "the baseline is the normal 1%: {e}");
    }
    assert_eq!(events[0]["value"].as_f64(), Some(0.30));
    assert_eq!(events[0]["started"], events[1]["started"]);
    // The anomaly files hold the same two events.
    let files: Vec<String> = crate::harness::files_under(&sink.join("_sluice/quality/anomalies"));
    assert_eq!(files.len(), 2, "{files:?}");
}

/// The HTML report of a sink with an anomaly episode, opened in headless Chromium: no console
/// errors, the charts are there, and the screenshot has real content.
#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_renders_in_a_browser() {
    let (dir, incoming, sink, sql) = scratch("m", |incoming, sink| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (v DOUBLE, kind VARCHAR)
             STORED AS NDJSON LOCATION '{}' OPTIONS ('poll_interval' '50ms');
             CREATE EXTERNAL TABLE m STORED AS PARQUET LOCATION '{}' OPTIONS ('quality.min_batches' '3');
             INSERT INTO m SELECT v, kind FROM ev;
             CREATE EXPECTATION v_small ON m CHECK (v < 150) ON VIOLATION WARN;",
            incoming.display(),
            sink.display()
        )
    });
    let server = Server::start(&[&sql], dir.path());
    for k in 0..10u64 {
        let nulls = if (5..7).contains(&k) { 40 } else { 1 };
        let body: String = (0..100)
            .map(|i| {
                let v = if i < nulls { "null".to_string() } else { format!("{}", (i * 7 + k) % 200) };
                format!("{{\"v\": {v}, \"kind\": \"k{}\"}}\n", i % 3)
            })
            .collect();
        drop_file(&incoming, &format!("f{k:02}.ndjson"), &body);
        wait_until(Duration::from_secs(60), "the file committed", || {
            (accounted(&sink) == 100 * (k + 1)).then_some(())
        });
    }
    server.stop();
    let html = dir.path().join("report.html");
    let (code, out) = run_to_exit(
        &["quality", "report", sink.to_str().unwrap(), "--html", html.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("v.null_fraction: ended from epoch 6"), "{out}");
    assert!(out.contains("v_small") && out.contains(&format!("report: {}", html.display())), "{out}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.matches("<svg").count() >= 6, "charts missing");
    assert!(page.contains("class=\"anomaly\""), "the episode is marked on a chart");
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("<script"), "self-contained");

    let chromium = std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let shot = dir.path().join("shot.png");
    let log = std::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1240,1400",
        ])
        .arg(format!("--user-data-dir={}", dir.path().join("chromium").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {chromium} (scripts/setup.sh --test installs it): {e}"));
    let stderr = String::from_utf8_lossy(&log.stderr);
    assert!(log.status.success(), "{stderr}");
    assert!(!stderr.contains("CONSOLE"), "console messages: {stderr}");
    // Non-trivial content: many colours, and a good share of the page not background white.
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).expect("screenshot written")));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let px = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    let colours: std::collections::HashSet<&[u8]> = pixels.iter().map(|p| &p[..3.min(px)]).collect();
    let inked = pixels.iter().filter(|p| p[..3.min(px)].iter().any(|c| *c < 235)).count();
    assert!(colours.len() > 50, "{} colours", colours.len());
    assert!(inked * 100 / pixels.len() > 3, "{inked} of {} pixels inked", pixels.len());
    let _ = std::fs::copy(&shot, std::env::temp_dir().join("sluice-quality-report.png"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_profile_comes_from_its_footers() {
    let (dir, incoming, sink, sql) = scratch("p", |incoming, sink| {
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, amount DOUBLE, currency VARCHAR)
             STORED AS NDJSON LOCATION '{}' OPTIONS ('poll_interval' '50ms');
             CREATE EXTERNAL TABLE p STORED AS PARQUET PARTITIONED BY (currency) LOCATION '{}';
             INSERT INTO p SELECT id, amount, currency FROM ev;",
            incoming.display(),
            sink.display()
        )
    });
    let server = Server::start(&[&sql], dir.path());
    for k in 0..2i64 {
        let body: String = (0..100)
            .map(|i| {
                let id = k * 100 + i;
                let amount = if id % 10 == 0 { "null".to_string() } else { format!("{}", id * 3) };
                let cur = if id % 4 == 0 { "EUR" } else { "USD" };
                format!("{{\"id\": {id}, \"amount\": {amount}, \"currency\": \"{cur}\"}}\n")
            })
            .collect();
        drop_file(&incoming, &format!("f{k}.ndjson"), &body);
        wait_until(Duration::from_secs(60), "the file committed", || {
            (accounted(&sink) == 100 * (k as u64 + 1)).then_some(())
        });
    }
    server.stop();
    let (code, out) = run_to_exit(
        &["quality", "profile", sink.to_str().unwrap(), "--partition", "currency=EUR", "--json"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    let p: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let eur: Vec<i64> = (0..200).filter(|id| id % 4 == 0).collect();
    let col = |name: &str| p["columns"].as_array().unwrap().iter().find(|c| c["column"] == name).cloned().unwrap();
    assert_eq!(col("id")["rows"].as_u64(), Some(eur.len() as u64));
    assert_eq!(col("id")["min"], "0");
    assert_eq!(col("id")["max"], eur.last().unwrap().to_string());
    assert_eq!(col("amount")["nulls"].as_u64(), Some(eur.iter().filter(|id| *id % 10 == 0).count() as u64));
    let max: f64 = col("amount")["max"].as_str().unwrap().parse().unwrap();
    assert_eq!(max, (eur.iter().filter(|id| *id % 10 != 0).max().unwrap() * 3) as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_that_cannot_be_computed_on_a_row_dead_letters_that_row_only() {
    let (dir, sql) = setup("CREATE EXPECTATION numeric_currency ON orders CHECK (CAST(currency AS INT) >= 0) ON VIOLATION WARN;");
    let sink = dir.path().join("lake/orders_out");
    let body: String = (0..50)
        .map(|i| {
            let cur = if i == 17 { "abc".to_string() } else { i.to_string() };
            format!("{{\"id\": {i}, \"amount\": 1, \"currency\": \"{cur}\"}}\n")
        })
        .collect();
    drop_file(&dir.path().join("incoming"), "a.ndjson", &body);
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "every record accounted for", || (accounted(&sink) == 50).then_some(()));
    server.stop();
    assert_eq!(output_ids(&sink).await, (0..50).filter(|i| *i != 17).collect::<Vec<i64>>());
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0]["error"].as_str().unwrap().contains("could not be evaluated"), "{}", letters[0]);
    assert_eq!(violations(&sink, "numeric_currency"), 1);
}

/// A FAIL stops its own pipeline only: the server keeps serving the others, `/readyz` answers
/// 503 naming the failed pipeline and the expectation, and `/v1/pipelines` shows the error,
/// the violations of the pipeline that runs on, and its profile's size.
#[test]
fn a_failed_pipeline_is_reported_while_the_others_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("in_a"), dir.path().join("in_b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let sink_b = dir.path().join("lake/b_out");
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE a (id BIGINT NOT NULL, amount DOUBLE)
             STORED AS NDJSON LOCATION '{a}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
             CREATE UNBOUNDED EXTERNAL TABLE b (id BIGINT NOT NULL, amount DOUBLE)
             STORED AS NDJSON LOCATION '{b}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
             CREATE EXTERNAL TABLE a_out STORED AS PARQUET LOCATION '{sa}';
             CREATE EXTERNAL TABLE b_out STORED AS PARQUET LOCATION '{sb}';
             INSERT INTO a_out SELECT id, amount FROM a;
             INSERT INTO b_out SELECT id, amount FROM b;
             CREATE EXPECTATION a_positive ON a CHECK (min(amount) > 0) ON VIOLATION FAIL;
             CREATE EXPECTATION b_small ON b_out CHECK (amount < 100) ON VIOLATION WARN;",
            a = a.display(),
            b = b.display(),
            sa = dir.path().join("lake/a_out").display(),
            sb = sink_b.display()
        ),
    )
    .unwrap();
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let http = reqwest::Client::new();
    let get = |path: &str| {
        rt.block_on(async {
            let r = http.get(server.url(path)).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    drop_file(&a, "a.ndjson", "{\"id\": 1, \"amount\": -5}\n");
    let why = wait_until(Duration::from_secs(60), "/readyz reports the failed pipeline", || {
        let (code, text) = get("/readyz");
        (code == 503).then_some(text)
    });
    assert!(why.contains("a_out") && why.contains("expectation a_positive failed"), "{why}");

    // The other pipeline keeps committing, and /v1/pipelines counts its violations.
    let body: String = (0..10).map(|i| format!("{{\"id\": {i}, \"amount\": {}}}\n", i * 20)).collect();
    drop_file(&b, "b.ndjson", &body);
    wait_until(Duration::from_secs(60), "b committed", || (accounted(&sink_b) == 10).then_some(()));
    let find = |all: &serde_json::Value, name: &str| all.as_array().unwrap().iter().find(|p| p["name"] == name).cloned().unwrap();
    // The status follows the commit.
    let all = wait_until(Duration::from_secs(60), "/v1/pipelines shows b's commit", || {
        let (code, text) = get("/v1/pipelines");
        assert_eq!(code, 200, "{text}");
        let all: serde_json::Value = serde_json::from_str(&text).unwrap();
        (find(&all, "b_out")["events_written"] == 10).then_some(all)
    });
    let (pa, pb) = (find(&all, "a_out"), find(&all, "b_out"));
    assert_eq!(pa["state"], "failed", "{pa}");
    assert!(pa["last_error"].as_str().unwrap().contains("expectation a_positive failed"), "{pa}");
    assert_eq!(pb["state"], "running", "{pb}");
    assert_eq!(pb["expectation_violations"]["b_small"], 5, "{pb}");
    assert!(pb["last_profile_bytes"].as_u64().unwrap() > 0, "{pb}");
    assert!(log_entries(&dir.path().join("lake/a_out")).is_empty(), "nothing of the failing batch");
    assert!(!server.terminate().success(), "a failed pipeline makes the exit non-zero");
}
