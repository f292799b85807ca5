//! Event time end to end: the golden pipelines of `tests/golden/` (windows, late rows, dedup)
//! run straight through and through kill -9 at random moments, and their sorted output must equal
//! the golden files exactly; bounded disorder gives the sorted input's output; state stays flat
//! over a long run with a steady set of keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::harness::{Rng, Server, dead_letters, drop_file, log_entries, read_hive, repo_root, wait_until};

/// Lines per input file: the directory source reads many small files, so epochs cut the
/// input at many places.
const LINES_PER_FILE: usize = 6;

struct Run {
    _dir: tempfile::TempDir,
    incoming: PathBuf,
    sink: PathBuf,
    sql: PathBuf,
    cwd: PathBuf,
}

impl Run {
    fn new(case: &str) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming");
        std::fs::create_dir_all(&incoming).unwrap();
        let sql = golden(case).join("pipeline.sql");
        Run {
            incoming,
            sink: dir.path().join("lake/out"),
            sql,
            cwd: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GOLDEN_INCOMING", format!("{}/", self.incoming.display())),
            ("GOLDEN_SINK", format!("{}/", self.sink.display())),
        ]
    }

    fn start_with(&self, extra: &[(&'static str, &str)]) -> Server {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start_with(&[self.sql.as_path()], &self.cwd, 0, &env)
    }

    /// Drops `lines` as numbered files of [`LINES_PER_FILE`] lines each, files `from..to`.
    fn feed(&self, lines: &[String], files: std::ops::Range<usize>) {
        for (n, chunk) in lines.chunks(LINES_PER_FILE).enumerate().skip(files.start).take(files.len()) {
            drop_file(&self.incoming, &format!("part-{n:05}.ndjson"), &(chunk.join("\n") + "\n"));
        }
    }

    /// Records committed so far.
    fn received(&self) -> u64 {
        log_entries(&self.sink)
            .iter()
            .map(|e| e["counts"]["received"].as_u64().unwrap_or(0))
            .sum()
    }

    fn wait_all(&self, total: u64) {
        wait_until(Duration::from_secs(60), "every input record committed", || {
            (self.received() >= total).then_some(())
        });
        assert_eq!(self.received(), total, "records committed more than once");
    }

    /// The sink's rows (data columns, as plain Parquet readers see them) as sorted CSV lines
    /// under a header.
    fn output(&self) -> Vec<String> {
        let batches = crate::harness::runtime().block_on(read_hive(&self.sink, &[], "SELECT * FROM t"));
        let Some(first) = batches.first() else { return vec![] };
        let header = first
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect::<Vec<_>>()
            .join(",");
        let opts = FormatOptions::default();
        let mut rows = Vec::new();
        for b in &batches {
            let cols: Vec<ArrayFormatter> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                rows.push(cols.iter().map(|c| c.value(i).to_string()).collect::<Vec<_>>().join(","));
            }
        }
        rows.sort();
        std::iter::once(header).chain(rows).collect()
    }

    /// Sum of an event-time count (`late`, `duplicates`) over the commit entries.
    fn state_sum(&self, key: &str) -> u64 {
        log_entries(&self.sink)
            .iter()
            .map(|e| e["state"][key].as_u64().unwrap_or(0))
            .sum()
    }
}

fn golden(case: &str) -> PathBuf {
    repo_root().join("tests/golden").join(case)
}

fn input(case: &str) -> Vec<String> {
    std::fs::read_to_string(golden(case).join("input.ndjson"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn expected(case: &str) -> Vec<String> {
    std::fs::read_to_string(golden(case).join("expected.csv"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn expected_late(case: &Path) -> Vec<i64> {
    std::fs::read_to_string(case.join("expected_late.txt"))
        .map(|t| t.lines().map(|l| l.parse().unwrap()).collect())
        .unwrap_or_default()
}

/// Runs `case` over `lines`, straight through or, with `kills`, fed a few files at a time
/// with kill -9 at random moments (while files are being read, or once they are committed)
/// and a restart after each.
fn run(case: &str, lines: &[String], kills: Option<&mut Rng>) -> Run {
    run_cutting(case, lines, kills, false)
}

/// [`run`], and with `power_cuts` about half the kills are followed by a power cut of the
/// sink (everything the killed server wrote but did not sync is discarded: engine
/// `durability::power_cut` over the `SLUICE_SYNC_JOURNAL` it kept).
fn run_cutting(case: &str, lines: &[String], kills: Option<&mut Rng>, power_cuts: bool) -> Run {
    let r = Run::new(case);
    std::fs::create_dir_all(&r.sink).unwrap();
    let journal = r.cwd.join("journal").display().to_string();
    let env: Vec<(&'static str, &str)> = if power_cuts {
        vec![("SLUICE_SYNC_JOURNAL", journal.as_str())]
    } else {
        vec![]
    };
    let files = lines.len().div_ceil(LINES_PER_FILE);
    let total = lines.len() as u64;
    let mut server = r.start_with(&env);
    match kills {
        None => r.feed(lines, 0..files),
        Some(rng) => {
            let (mut fed, mut crashes) = (0, 0);
            while fed < files {
                let next = (fed + rng.range(1, 5) as usize).min(files);
                r.feed(lines, fed..next);
                fed = next;
                let fed_lines = (fed * LINES_PER_FILE).min(lines.len()) as u64;
                if rng.range(0, 2) == 1 {
                    wait_until(Duration::from_secs(60), "the files fed so far committed", || {
                        (r.received() >= fed_lines).then_some(())
                    });
                }
                server.kill9();
                crashes += 1;
                if power_cuts && rng.range(0, 2) == 1 {
                    cut(&journal, &r.sink);
                }
                server = r.start_with(&env);
            }
            assert!(crashes >= 2, "the run should have been killed a few times, was {crashes}");
        }
    }
    r.wait_all(total);
    server.stop();
    r
}

#[cfg(feature = "fault-injection")]
fn cut(journal: &str, sink: &Path) {
    sluice_engine::durability::power_cut(Path::new(journal), &[sink]).unwrap();
}

#[cfg(not(feature = "fault-injection"))]
fn cut(_journal: &str, _sink: &Path) {
    unreachable!("power cuts need the fault-injection build");
}

fn check_golden(case: &str, r: &Run) {
    assert_eq!(r.output(), expected(case), "output of golden case {case}");
    let late = expected_late(&golden(case));
    assert_eq!(r.state_sum("late"), late.len() as u64, "late rows counted");
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill -9 schedule seed: {s}");
    s
}

#[test]
fn golden_tumbling_window_straight_and_through_kill9() {
    let lines = input("tumbling");
    check_golden("tumbling", &run("tumbling", &lines, None));
    check_golden("tumbling", &run("tumbling", &lines, Some(&mut Rng(seed()))));
}

/// Every epoch fails once after it changed the state in memory (and is tried again): the state
/// is reloaded from the last commit first, so nothing is counted twice.
#[cfg(feature = "fault-injection")]
#[test]
fn an_epoch_failing_after_its_state_changed_counts_nothing_twice() {
    for case in ["tumbling", "dedup"] {
        let lines = input(case);
        let r = Run::new(case);
        let server = r.start_with(&[("SLUICE_FAIL_AT", "after_state")]);
        r.feed(&lines, 0..lines.len().div_ceil(LINES_PER_FILE));
        r.wait_all(lines.len() as u64);
        server.stop();
        check_golden(case, &r);
    }
}

/// Kill -9 at random moments, about half followed by a power cut: state files are synced
/// before the entry that names them, so a window is never lost or written twice.
#[cfg(feature = "fault-injection")]
#[test]
fn golden_windows_and_dedup_survive_power_cuts() {
    for case in ["tumbling", "dedup", "late_dead_letter"] {
        let lines = input(case);
        let r = run_cutting(case, &lines, Some(&mut Rng(seed())), true);
        check_golden(case, &r);
        // The servers recorded their syncs (state files among them) for the cuts to honour.
        let journal = std::fs::read_to_string(r.cwd.join("journal/journal.ndjson")).unwrap();
        assert!(journal.contains("_sluice/state/"), "state files are synced");
    }
}

#[test]
fn bounded_disorder_gives_the_sorted_inputs_output() {
    let mut lines = input("tumbling");
    let ts = |l: &String| serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"].as_str().unwrap().to_string();
    lines.sort_by_key(ts);
    let sorted = run("tumbling", &lines, None);
    assert_eq!(sorted.output(), expected("tumbling"));
}

#[test]
fn golden_late_rows_dropped_straight_and_through_kill9() {
    let lines = input("late_drop");
    for kills in [None, Some(Rng(seed()))] {
        let mut kills = kills;
        let r = run("late_drop", &lines, kills.as_mut());
        check_golden("late_drop", &r);
        assert!(dead_letters(&r.sink).is_empty(), "dropped late rows are not dead letters");
    }
}

#[test]
fn golden_late_rows_dead_lettered_and_their_partitions_dirty() {
    let case = "late_dead_letter";
    let lines = input(case);
    for kills in [None, Some(Rng(seed()))] {
        let mut kills = kills;
        let r = run(case, &lines, kills.as_mut());
        check_golden(case, &r);
        let mut ids: Vec<i64> = dead_letters(&r.sink)
            .iter()
            .map(|d| {
                assert_eq!(d["stage"], "late", "{d}");
                assert!(d["error"].as_str().unwrap().contains("is below the watermark 2026-01-01T"), "{d}");
                serde_json::from_str::<serde_json::Value>(d["raw"].as_str().unwrap()).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, expected_late(&golden(case)));
        let dirty: Vec<String> = log_entries(&r.sink)
            .iter()
            .flat_map(|e| e["state"]["dirty"].as_array().cloned().unwrap_or_default())
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        assert!(!dirty.is_empty() && dirty.iter().all(|d| d == "day=2026-01-01/"), "dirty: {dirty:?}");
    }
}

#[test]
fn golden_dedup_within_ttl_straight_and_through_kill9() {
    let lines = input("dedup");
    let repeats = lines.len() as u64 - (expected("dedup").len() as u64 - 1);
    for kills in [None, Some(Rng(seed()))] {
        let mut kills = kills;
        let r = run("dedup", &lines, kills.as_mut());
        check_golden("dedup", &r);
        assert_eq!(r.state_sum("duplicates"), repeats, "repeats counted");
    }
}

#[test]
fn golden_hopping_window_straight_and_through_kill9() {
    let lines = input("hopping");
    check_golden("hopping", &run("hopping", &lines, None));
    check_golden("hopping", &run("hopping", &lines, Some(&mut Rng(seed()))));
}

/// GET a JSON document from the server.
fn get_json(server: &Server, path: &str) -> serde_json::Value {
    crate::harness::runtime().block_on(async {
        reqwest::get(server.url(path)).await.unwrap().json().await.unwrap()
    })
}

fn get_text(server: &Server, path: &str) -> String {
    crate::harness::runtime().block_on(async { reqwest::get(server.url(path)).await.unwrap().text().await.unwrap() })
}

fn ndjson(rows: impl Iterator<Item = serde_json::Value>) -> String {
    rows.map(|r| r.to_string() + "\n").collect()
}

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// A pipeline written for one test: `source` (the text after `CREATE UNBOUNDED EXTERNAL TABLE`,
/// up to STORED AS) read from `incoming/` with `options`, and `rest` (the INSERT into the sink
/// `out`), with its server started.
pub(crate) struct Adhoc {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) incoming: PathBuf,
    pub(crate) sink: PathBuf,
    pub(crate) sql: PathBuf,
    pub(crate) server: Server,
}

impl Adhoc {
    fn start(source: &str, options: &str, rest: &str) -> Adhoc {
        Adhoc::start_partitioned(source, options, "", rest)
    }

    /// [`Adhoc::start`] with the sink `out` declared with `partitioned` (e.g. `PARTITIONED BY (day)`).
    pub(crate) fn start_partitioned(source: &str, options: &str, partitioned: &str, rest: &str) -> Adhoc {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming");
        std::fs::create_dir_all(&incoming).unwrap();
        let sink = dir.path().join("lake/out");
        let sql = dir.path().join("p.sql");
        std::fs::write(
            &sql,
            format!(
                "CREATE UNBOUNDED EXTERNAL TABLE {source} STORED AS NDJSON LOCATION '{}/'
                 OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', {options});
                 CREATE EXTERNAL TABLE out STORED AS PARQUET {partitioned} LOCATION '{}/';
                 {rest}",
                incoming.display(),
                sink.display()
            ),
        )
        .unwrap();
        let server = Server::start(&[sql.as_path()], dir.path());
        Adhoc {
            dir,
            incoming,
            sink,
            sql,
            server,
        }
    }

    /// Records committed so far.
    fn received(&self) -> u64 {
        log_entries(&self.sink)
            .iter()
            .map(|e| e["counts"]["received"].as_u64().unwrap_or(0))
            .sum()
    }

    pub(crate) fn wait_received(&self, n: u64, what: &str) {
        wait_until(Duration::from_secs(60), what, || (self.received() >= n).then_some(()));
    }
}

fn at(secs: i64) -> String {
    chrono::DateTime::from_timestamp(T0 + secs, 0).unwrap().to_rfc3339()
}

#[test]
fn state_stays_flat_over_a_long_run_with_steady_keys() {
    let t = Adhoc::start(
        "readings (id BIGINT NOT NULL, sensor VARCHAR NOT NULL, v BIGINT, ts TIMESTAMP NOT NULL)",
        "'batch.max_rows' '200', 'event_time' 'ts', 'watermark.delay' '5s', 'dedup.key' 'id', 'dedup.ttl' '2m'",
        "INSERT INTO out SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, sensor, count(*) AS n, sum(v) AS total
         FROM readings GROUP BY date_bin(INTERVAL '1 minute', ts), sensor;",
    );
    // 90 minutes of event time, 20 sensors, one reading per sensor every 6 s: 18,000 rows fed a
    // minute at a time (one commit or more each), a steady 20 keys per window and 2 minutes of
    // ids to remember.
    let (minutes, sensors) = (90i64, 20i64);
    let mut id = 0;
    for m in 0..minutes {
        let rows = (0..10).flat_map(|step| (0..sensors).map(move |s| (s, m * 60 + step * 6)));
        let text = ndjson(rows.map(|(s, t)| {
            id += 1;
            serde_json::json!({"id": id, "sensor": format!("s{s}"), "v": s, "ts": at(t)})
        }));
        drop_file(&t.incoming, &format!("m-{m:04}.ndjson"), &text);
        t.wait_received(((m + 1) * sensors * 10) as u64, "the minute committed");
    }
    let status = wait_until(Duration::from_secs(30), "the status to show the last commit", || {
        let s = get_json(&t.server, "/v1/pipelines");
        s[0]["watermark"].as_str().is_some_and(|w| w.starts_with("2026-01-01T01:29:")).then_some(s)
    });
    assert!(status[0]["state_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(get_text(&t.server, "/metrics").contains("sluice_state_bytes"));
    let sink = t.sink.clone();
    t.server.stop();

    let entries = log_entries(&sink);
    let bytes: Vec<u64> = entries.iter().map(|e| e["state"]["state_bytes"].as_u64().unwrap()).collect();
    let emitted: u64 = entries.iter().map(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0)).sum();
    assert_eq!(emitted, minutes as u64 - 1, "every window but the last one closed");
    let third = bytes.len() / 3;
    assert!(third >= 5, "enough commits to compare: {}", bytes.len());
    let early = *bytes[..third].iter().max().unwrap();
    let late = *bytes[2 * third..].iter().max().unwrap();
    assert!(early > 0 && late <= early * 3 / 2, "state grew from {early} to {late} bytes: {bytes:?}");
    // Open windows stay at one or two; dedup files stay within the two-minute TTL.
    let last = &entries.last().unwrap()["state"];
    assert!(last["windows"].as_array().unwrap().len() <= 2, "{last}");
    assert!(last["dedup"].as_array().unwrap().len() < entries.len() / 2, "{last}");
}

#[test]
fn an_idle_partition_stops_holding_the_watermark_back() {
    let t = Adhoc::start(
        "readings (part VARCHAR NOT NULL, v BIGINT, ts TIMESTAMP NOT NULL)",
        "'event_time' 'ts', 'watermark.delay' '5s', 'watermark.partition' 'part', 'watermark.idle_timeout' '1s'",
        "INSERT INTO out SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, part, count(*) AS n
         FROM readings GROUP BY date_bin(INTERVAL '1 minute', ts), part;",
    );
    // Both partitions for the first 50 s; then only "a".
    let first = ndjson((0..10).flat_map(|i| {
        ["a", "b"].map(|p| serde_json::json!({"part": p, "v": i, "ts": at(i * 5)}))
    }));
    drop_file(&t.incoming, "f-0000.ndjson", &first);
    t.wait_received(20, "both partitions committed");
    let b_last = log_entries(&t.sink).last().unwrap()["committed_at"].as_str().unwrap().to_string();
    let mut fed = 20u64;
    let mut n = 1;
    // "a" goes on alone: "b" holds the watermark at 45 s until it has been idle for 1 s.
    wait_until(Duration::from_secs(30), "the first window to close", || {
        drop_file(
            &t.incoming,
            &format!("f-{n:04}.ndjson"),
            &ndjson(std::iter::once(serde_json::json!({"part": "a", "v": n, "ts": at(60 + n * 5)}))),
        );
        n += 1;
        fed += 1;
        let emitted = log_entries(&t.sink)
            .iter()
            .any(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0) > 0);
        emitted.then_some(())
    });
    t.wait_received(fed, "every row committed");
    let sink = t.sink.clone();
    t.server.stop();
    let entries = log_entries(&sink);
    let closing = entries
        .iter()
        .find(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0) > 0)
        .unwrap();
    let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    let waited = t(closing["committed_at"].as_str().unwrap()) - t(&b_last);
    assert!(waited >= chrono::TimeDelta::seconds(1), "the window closed {waited} after b's last row");
    // Before that, the watermark never passed b's newest event time minus the delay.
    let b_newest = (T0 + 45) * 1_000_000_000;
    for e in entries.iter().take_while(|e| e["state"]["windows_emitted"].as_u64().unwrap_or(0) == 0) {
        assert!(e["state"]["watermark_ns"].as_i64().unwrap_or(i64::MIN) <= b_newest - 5_000_000_000, "{e}");
    }
    assert_eq!(closing["state"]["partitions"]["b"].as_i64(), Some(b_newest));
    let rows = crate::harness::runtime().block_on(read_hive(&sink, &[], "SELECT part, n FROM t ORDER BY part"));
    let text = arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
    assert!(text.contains("| a    | 10 |") && text.contains("| b    | 10 |"), "{text}");
}

/// A row the GROUP BY fails on, and a closed window the SELECT above the aggregate fails on,
/// are dead-lettered; every other window is written, and the pipeline goes on.
#[test]
fn a_bad_row_or_window_is_dead_lettered_not_retried_forever() {
    let t = Adhoc::start(
        "ev (k BIGINT NOT NULL, d BIGINT NOT NULL, ts TIMESTAMP NOT NULL)",
        "'event_time' 'ts'",
        "INSERT INTO out SELECT date_bin(INTERVAL '1 minute', ts) AS w, 100 / d AS bucket,
                count(*) AS n, 60 / (count(*) - 1) AS spread
         FROM ev GROUP BY date_bin(INTERVAL '1 minute', ts), 100 / d;",
    );
    // Minute 0: three rows of bucket 1 and one with d = 0 (the GROUP BY fails on it);
    // minute 1: one row alone in its group (count(*) - 1 = 0: the window's SELECT fails);
    // minute 2: two rows; minute 5 closes them all.
    let rows = [(1, 100, 0), (2, 100, 10), (3, 0, 20), (4, 100, 30), (5, 100, 70), (6, 50, 130), (7, 50, 140), (8, 1, 300)];
    drop_file(
        &t.incoming,
        "a.ndjson",
        &ndjson(rows.iter().map(|(k, d, ts)| serde_json::json!({"k": k, "d": d, "ts": at(*ts)}))),
    );
    t.wait_received(rows.len() as u64, "every row committed");
    let sink = t.sink.clone();
    t.server.stop();
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l["stage"] == "transform"), "{letters:?}");
    assert!(letters.iter().any(|l| l["raw"].as_str().unwrap().contains("\"d\":0")), "{letters:?}");
    assert!(letters.iter().any(|l| l["position"]["window_row"].is_number()), "{letters:?}");
    let out = crate::harness::runtime().block_on(read_hive(&sink, &[], "SELECT bucket, n, spread FROM t ORDER BY w"));
    let text = arrow::util::pretty::pretty_format_batches(&out).unwrap().to_string();
    assert!(text.contains("| 1      | 3 | 30     |") && text.contains("| 2      | 2 | 60     |"), "{text}");
    assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 2, "{text}");
}

#[test]
fn golden_select_distinct_per_window_straight_and_through_kill9() {
    let lines = input("distinct");
    check_golden("distinct", &run("distinct", &lines, None));
    check_golden("distinct", &run("distinct", &lines, Some(&mut Rng(seed()))));
}
