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

    fn start(&self) -> Server {
        let env = self.env();
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
    let r = Run::new(case);
    let files = lines.len().div_ceil(LINES_PER_FILE);
    let total = lines.len() as u64;
    let mut server = r.start();
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
                server = r.start();
            }
            assert!(crashes >= 2, "the run should have been killed a few times, was {crashes}");
        }
    }
    r.wait_all(total);
    server.stop();
    r
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
