//! A table that has lived for a year: 100,010 commits (a stream commit every 315 s, a
//! compaction a day) on local disk, written by a generator that puts real entries, real Parquet
//! files for the live data and a real checkpoint through the library. Then the binary works
//! with it as a user would: a server starts on it (recovery), `sluice query` counts its rows,
//! `compact` merges the last day, `vacuum` expires the log older than 30 days, and `check`
//! finds nothing wrong; before and after the expiry. The figures (debug build) are printed for
//! BENCHMARKS.md ("A year's log"); the objects a snapshot reads are counted by
//! `log::checkpoint::tests::a_year_of_commits_is_read_in_about_a_hundred_objects`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use sluice_engine::log::commit::{CommitEntry, CommitLog, Counts, FileAction, LOG_VERSION, Origin, TableSchema};
use sluice_engine::store::TableStore;

use crate::harness::{Server, run_to_exit};

const DAYS: u64 = 365;
/// Epochs a day: 273 stream commits and one compaction (the last day is not compacted).
const PER_DAY: u64 = 274;
const ROWS: u64 = 10;
const EVERY_SECS: i64 = 315;

/// A Parquet file of `ids` (the table's only stored column; `day` is the partition).
fn parquet(path: &Path, ids: std::ops::Range<i64>) -> u64 {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from_iter_values(ids))]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// Writes the year's table at `sink`; returns its row count.
fn generate(sink: &Path) -> u64 {
    let log_dir = sink.join("_sluice/log");
    std::fs::create_dir_all(&log_dir).unwrap();
    let schema = TableSchema {
        columns: vec![sluice_engine::log::commit::ColumnSpec {
            name: "id".into(),
            data_type: "Int64".into(),
            nullable: false,
        }],
        partition_by: vec!["day".into()],
    };
    // The year ends an hour ago: the newest 30 days are inside the log retention.
    let start = chrono::Utc::now() - chrono::Duration::seconds(EVERY_SECS * (DAYS * PER_DAY) as i64 + 3600);
    let entry = |epoch: u64, pipeline: &str, add: Vec<FileAction>, remove: Vec<String>| CommitEntry {
        version: LOG_VERSION,
        epoch,
        pipeline: pipeline.into(),
        instance: None,
        committed_at: (start + chrono::Duration::seconds(EVERY_SECS * epoch as i64)).to_rfc3339(),
        add,
        remove,
        dead_letters: vec![],
        sources: BTreeMap::new(),
        counts: Counts::default(),
        schema: schema.clone(),
        quality: None,
        archive: None,
        state: None,
    };
    let mut epoch = 0u64;
    let mut rows = 0u64;
    for day in 0..DAYS {
        let partition = vec![("day".to_string(), Some(day.to_string()))];
        let first_id = (day * PER_DAY * ROWS) as i64;
        let mut small = Vec::new();
        let streamed = if day + 1 == DAYS { PER_DAY } else { PER_DAY - 1 };
        for i in 0..streamed {
            epoch += 1;
            let path = format!("day={day}/part-out-{epoch}-0.parquet");
            let ids = first_id + (i * ROWS) as i64..first_id + ((i + 1) * ROWS) as i64;
            // Only the last day's small files are live; earlier ones were compacted away.
            let bytes = if day + 1 == DAYS { parquet(&sink.join(&path), ids) } else { 400 };
            let mut e = entry(epoch, "out", vec![FileAction { path: path.clone(), rows: ROWS, bytes, partition: partition.clone(), covers: None }], vec![]);
            e.counts = Counts { received: ROWS, decoded: ROWS, output: ROWS, ..Counts::default() };
            std::fs::write(log_dir.join(format!("{epoch:020}.json")), serde_json::to_vec_pretty(&e).unwrap()).unwrap();
            small.push(path);
            rows += ROWS;
        }
        if day + 1 < DAYS {
            epoch += 1;
            let path = format!("day={day}/part-maintenance-{epoch}-0.parquet");
            let bytes = parquet(&sink.join(&path), first_id..first_id + (streamed * ROWS) as i64);
            let covers = Some(Origin { pipeline: "out".into(), epochs: [epoch - streamed, epoch - 1] });
            let add = vec![FileAction { path, rows: streamed * ROWS, bytes, partition, covers }];
            let e = entry(epoch, "maintenance", add, small);
            std::fs::write(log_dir.join(format!("{epoch:020}.json")), serde_json::to_vec_pretty(&e).unwrap()).unwrap();
        }
    }
    assert_eq!(epoch, DAYS * PER_DAY);
    // The newest checkpoint through the library (it folds every entry once), then the older
    // checkpoints a year of commits leaves, as objects a full listing would return.
    let rt = crate::harness::runtime();
    let table = TableStore::open(sink.to_str().unwrap()).unwrap();
    let newest = epoch / 100 * 100;
    rt.block_on(CommitLog::new(table, "generator").write_checkpoint(newest)).unwrap();
    for cp in (100..newest).step_by(100) {
        std::fs::write(sink.join(format!("_sluice/checkpoints/{cp:020}.json")), b"{}").unwrap();
    }
    rows
}

fn timed(what: &str, figures: &mut Vec<(String, Duration)>, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    figures.push((what.to_string(), t.elapsed()));
}

fn count(sink: &Path, cwd: &Path) -> u64 {
    let (code, out) = run_to_exit(
        &["query", "SELECT count(*) AS n FROM t", "--table", &format!("t={}", sink.display()), "--format", "csv"],
        cwd,
    );
    assert_eq!(code, 0, "{out}");
    out.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("query output: {out}"))
}

#[test]
fn a_year_of_commits_runs_queries_compacts_vacuums_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("lake/out");
    let generated = Instant::now();
    let rows = generate(&sink);
    let generated = generated.elapsed();
    let incoming = dir.path().join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, day BIGINT) STORED AS NDJSON LOCATION '{}'
             OPTIONS ('poll_interval' '50ms');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (day) LOCATION '{}';
             INSERT INTO out SELECT id, day FROM ev;",
            incoming.display(),
            sink.display()
        ),
    )
    .unwrap();
    let sink_arg = sink.to_str().unwrap();
    let mut figures = Vec::new();
    for round in ["before the expiry", "after the expiry"] {
        timed(&format!("server start (recovery), {round}"), &mut figures, || {
            Server::start(&[&sql], dir.path()).stop();
        });
        timed(&format!("sluice query count(*), {round}"), &mut figures, || {
            assert_eq!(count(&sink, dir.path()), rows, "every row, once");
        });
        timed(&format!("sluice check, {round}"), &mut figures, || {
            let (code, out) = run_to_exit(&["check", sink_arg], dir.path());
            assert_eq!(code, 0, "{out}");
        });
        if round == "before the expiry" {
            timed("sluice compact (the last day's 274 files)", &mut figures, || {
                let (code, out) = run_to_exit(&["compact", sink_arg], dir.path());
                assert_eq!(code, 0, "{out}");
                assert!(out.contains("compacted 1 partition(s)"), "{out}");
            });
            timed("sluice vacuum (log retention 30 days)", &mut figures, || {
                let (code, out) = run_to_exit(&["vacuum", sink_arg], dir.path());
                assert_eq!(code, 0, "{out}");
                let expired: u64 = out
                    .split(", ")
                    .find_map(|p| p.strip_suffix(" expired log entries")?.parse().ok())
                    .unwrap_or_else(|| panic!("vacuum output: {out}"));
                // Entries older than 30 days (about 91,800) and than the newest checkpoint.
                assert!(expired > 90_000 && expired < 100_000, "{out}");
            });
        }
    }
    // The quality report over everything says where the log now starts.
    let (code, out) = run_to_exit(&["quality", "report", sink_arg], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("past the log retention"), "{out}");
    let left = std::fs::read_dir(sink.join("_sluice/log")).unwrap().count();
    assert!(left < 10_000, "{left} entries left after the expiry");
    eprintln!("a year's log: {} commits generated in {generated:.1?}; {left} entries left after vacuum", DAYS * PER_DAY);
    for (what, took) in figures {
        eprintln!("| {what} | {:.2} s |", took.as_secs_f64());
    }
}
