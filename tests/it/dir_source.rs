//! The directory sources: files added while running are read once, in name order; progress
//! survives a clean restart and a kill -9; no file is read twice and none is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};

use crate::harness::{Server, committed_output, dead_letters, drop_file, log_entries, read_hive, wait_until};

fn ndjson_pipeline(dir: &Path) -> String {
    ndjson_pipeline_with(
        dir,
        "'batch.interval' '100ms', 'batch.max_rows' '20000'",
        "id, id * 2 AS doubled, kind FROM events WHERE kind IS NOT NULL",
    )
}

/// The events pipeline over `dir/incoming` into `dir/lake/events_out`, with extra source
/// options and the SELECT list and FROM clause given.
fn ndjson_pipeline_with(dir: &Path, options: &str, select: &str) -> String {
    format!(
        "CREATE UNBOUNDED EXTERNAL TABLE events (id BIGINT NOT NULL, kind VARCHAR, ts TIMESTAMP)
         STORED AS NDJSON LOCATION '{incoming}'
         OPTIONS ('poll_interval' '50ms', {options});
         CREATE EXTERNAL TABLE events_out STORED AS PARQUET PARTITIONED BY (kind) LOCATION '{sink}';
         INSERT INTO events_out SELECT {select};",
        incoming = dir.join("incoming").display(),
        sink = dir.join("lake/events_out").display()
    )
}

/// A temporary directory with `incoming/` created and `pipeline` (given the directory) written
/// to `p.sql`; returns the directory, `incoming/`, `p.sql` and the sink path.
fn workspace(pipeline: impl FnOnce(&Path) -> String) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline(dir.path())).unwrap();
    let sink = dir.path().join("lake/events_out");
    (dir, incoming, sql, sink)
}

fn lines(ids: std::ops::Range<i64>) -> String {
    ids.map(|i| {
        format!(
            "{{\"id\": {i}, \"kind\": \"k{}\", \"ts\": {}}}\n",
            i % 3,
            1_700_000_000_000i64 + i
        )
    })
    .collect()
}

/// Count of each id in the sink, read by plain DataFusion.
async fn id_counts(sink: &Path) -> BTreeMap<i64, usize> {
    let batches = read_hive(sink, &[("kind", DataType::Utf8)], "SELECT id, doubled FROM t").await;
    let mut counts = BTreeMap::new();
    for b in batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let dbl = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            assert_eq!(dbl.value(i), ids.value(i) * 2);
            *counts.entry(ids.value(i)).or_insert(0) += 1;
        }
    }
    counts
}

fn assert_exactly_once(counts: &BTreeMap<i64, usize>, ids: std::ops::Range<i64>) {
    let dupes: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "ids written more than once: {dupes:?}");
    let missing: Vec<i64> = ids.clone().filter(|i| !counts.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "ids missing: {} (first {:?})",
        missing.len(),
        missing.first()
    );
    assert_eq!(counts.len(), ids.count(), "unexpected ids present");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_read_once_across_restarts_and_kills() {
    let (dir, incoming, sql, sink) = workspace(ndjson_pipeline);

    // A file present before start, one added while running, with a bad line and a blank line.
    drop_file(&incoming, "0001.ndjson", &lines(0..500));
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "first file committed", || {
        (committed_output(&sink) >= 500).then_some(())
    });
    let mut second = lines(500..1000);
    second.push_str("{\"id\": \"not a number\", \"kind\": \"k0\"}\n\n");
    drop_file(&incoming, "0002.ndjson", &second);
    wait_until(Duration::from_secs(60), "second file committed", || {
        (committed_output(&sink) >= 1000).then_some(())
    });
    server.stop();

    // Added while stopped, then a clean restart.
    drop_file(&incoming, "0003.ndjson", &lines(1000..1500));
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "third file committed", || {
        (committed_output(&sink) >= 1500).then_some(())
    });

    // A large file (several read chunks, several epochs), and kill -9 once part of it is
    // committed.
    drop_file(&incoming, "0004.ndjson", &lines(1500..200_000));
    wait_until(Duration::from_secs(60), "part of the large file committed", || {
        (committed_output(&sink) > 1500).then_some(())
    });
    server.kill9();
    drop_file(&incoming, "0005.ndjson", &lines(200_000..201_000));
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(120), "everything committed after the kill", || {
        let last = log_entries(&sink).last().cloned()?;
        let pos = &last["sources"]["events"];
        (pos["file"] == "0005.ndjson" && pos["complete"] == true).then_some(())
    });
    server.stop();

    assert_exactly_once(&id_counts(&sink).await, 0..201_000);
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["position"]["file"], "0002.ndjson");
    assert!(letters[0]["raw"].as_str().unwrap().contains("not a number"));
    // Counts in the log add up: every record is output or dead-lettered.
    let entries = log_entries(&sink);
    let received: u64 = entries.iter().map(|e| e["counts"]["received"].as_u64().unwrap()).sum();
    let dead: u64 = entries
        .iter()
        .map(|e| e["counts"]["dead_lettered"].as_u64().unwrap())
        .sum();
    let output: u64 = entries.iter().map(|e| e["counts"]["output"].as_u64().unwrap()).sum();
    assert_eq!(output, 201_000);
    assert_eq!(
        received,
        output + dead,
        "received = output + dead letters (no row is filtered here)"
    );
    let epochs: Vec<u64> = entries.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(
        epochs,
        (1..=epochs.len() as u64).collect::<Vec<_>>(),
        "epochs are contiguous from 1"
    );
}

/// A CSV directory source `rows` (with `columns`) under `dir/in`, written as `dir/lake/rows_out`
/// with `select`; returns the pipeline file and the directory to drop files in.
fn csv_pipeline(dir: &Path, columns: &str, select: &str) -> (PathBuf, PathBuf) {
    let incoming = dir.join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE rows ({columns})
             STORED AS CSV LOCATION '{}' OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
             CREATE EXTERNAL TABLE rows_out STORED AS PARQUET LOCATION '{}';
             INSERT INTO rows_out SELECT {select} FROM rows;",
            incoming.display(),
            dir.join("lake/rows_out").display()
        ),
    )
    .unwrap();
    (sql, incoming)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_directory_source_with_header() {
    let dir = tempfile::tempdir().unwrap();
    let (sql, incoming) = csv_pipeline(dir.path(), "id BIGINT NOT NULL, name VARCHAR, ts TIMESTAMP", "id, name, ts");
    drop_file(
        &incoming,
        "a.csv",
        "id,name,ts\n1,\"x, with comma\",2026-11-22T10:00:00Z\n2,\"multi\nline\",1763805600000\nbad,z,2026-11-22T10:00:00Z\n",
    );
    let sink = dir.path().join("lake/rows_out");
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "csv committed", || {
        (committed_output(&sink) >= 2).then_some(())
    });
    server.stop();
    let batches = read_hive(&sink, &[], "SELECT id, arrow_cast(name, 'Utf8') FROM t ORDER BY id").await;
    let names: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let s = b.column(1).as_string::<i32>();
            (0..b.num_rows()).map(|i| s.value(i).to_string()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(names, vec!["x, with comma".to_string(), "multi\nline".to_string()]);
    let letters = dead_letters(&sink);
    assert_eq!(letters.len(), 1);
    assert!(letters[0]["raw"].as_str().unwrap().starts_with("bad,z"));
}

// Reproducer for #26 (item 2): a CSV file that grew after it was read was read again from its
// start, so its first rows were written twice (10 rows, 5 appended: 25 in the sink). The CSV
// reader now starts at the recorded offset, like NDJSON (#25 reads CSV in pieces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_file_that_grows_is_read_on_from_its_offset() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (sql, incoming) = csv_pipeline(dir.path(), "id BIGINT NOT NULL, name VARCHAR", "id, name");
    let rows = |ids: std::ops::Range<i64>| ids.map(|i| format!("{i},\"n{i}\"\n")).collect::<String>();
    drop_file(&incoming, "a.csv", &format!("id,name\n{}", rows(0..10)));
    let sink = dir.path().join("lake/rows_out");
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "the first 10 rows committed", || {
        (committed_output(&sink) >= 10).then_some(())
    });
    // A producer breaking the contract: 5 rows appended in place.
    let mut f = std::fs::OpenOptions::new().append(true).open(incoming.join("a.csv")).unwrap();
    f.write_all(rows(10..15).as_bytes()).unwrap();
    drop(f);
    wait_until(Duration::from_secs(60), "the appended rows committed", || {
        (committed_output(&sink) >= 15).then_some(())
    });
    server.stop();
    let batches = read_hive(&sink, &[], "SELECT id FROM t ORDER BY id").await;
    let ids: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            let a = b.column(0).as_primitive::<Int64Type>();
            (0..b.num_rows()).map(|i| a.value(i)).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, (0..15).collect::<Vec<_>>(), "every row once");
}

/// Rows the plan fails on (integer division by zero) are isolated across the several chunks of
/// an epoch: each becomes a `transform` dead letter with its row, every other row is written
/// once, in one epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_failures_are_isolated_across_chunks() {
    let (dir, incoming, sql, sink) = workspace(|dir| {
        ndjson_pipeline_with(
            dir,
            "'batch.interval' '5s', 'batch.max_rows' '1000'",
            "id, id * 2 AS doubled, 1000 / (id % 97) AS q, kind FROM events",
        )
    });
    // Four files, four chunks, one epoch of 1000 rows; ids 0, 97, 194, ... fail.
    for f in 0..4 {
        drop_file(&incoming, &format!("{f:04}.ndjson"), &lines(f * 250..(f + 1) * 250));
    }
    let bad: Vec<i64> = (0..1000).filter(|i| i % 97 == 0).collect();
    let server = Server::start(&[&sql], dir.path());
    wait_until(Duration::from_secs(60), "the epoch committed", || {
        (committed_output(&sink) >= 1000 - bad.len() as u64).then_some(())
    });
    server.stop();
    let entries = log_entries(&sink);
    assert_eq!(entries.len(), 1, "one epoch: {entries:?}");
    let counts = id_counts(&sink).await;
    let good: Vec<i64> = (0..1000).filter(|i| i % 97 != 0).collect();
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), good);
    assert!(counts.values().all(|n| *n == 1));
    let letters = dead_letters(&sink);
    let mut failed: Vec<i64> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["stage"], "transform", "{l}");
            assert!(
                l["error"].as_str().unwrap_or_default().contains("Divide by zero"),
                "{l}"
            );
            let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap_or_default()).unwrap();
            raw["id"].as_i64().unwrap()
        })
        .collect();
    failed.sort();
    assert_eq!(failed, bad);
}

// Reproducers for #12 (item 11): the producer contract's violations were silent. A file that
// grew after it was read lost its tail; a file replaced under the same name was read at the
// old offset; a late file sorting before the position was skipped without a word; a source
// error ended the server with exit 0.
#[test]
fn contract_violations_are_never_silent() {
    contract_violations(Format::Ndjson);
}

// The same for CSV files (a header line first; appended rows have none).
#[test]
fn contract_violations_are_never_silent_for_csv() {
    contract_violations(Format::Csv);
}

/// The two file formats of the directory source the contract test runs for.
#[derive(Clone, Copy)]
enum Format {
    Ndjson,
    Csv,
}

impl Format {
    /// The file named `stem` in this format.
    fn name(self, stem: &str) -> String {
        match self {
            Format::Ndjson => format!("{stem}.ndjson"),
            Format::Csv => format!("{stem}.csv"),
        }
    }

    /// A whole file of `ids` (CSV: with its header).
    fn file(self, ids: std::ops::Range<i64>) -> String {
        match self {
            Format::Ndjson => lines(ids),
            Format::Csv => format!("id,kind\n{}", self.appended(ids)),
        }
    }

    /// Records of `ids` appended to a file (CSV: no header).
    fn appended(self, ids: std::ops::Range<i64>) -> String {
        match self {
            Format::Ndjson => lines(ids),
            Format::Csv => ids.map(|i| format!("{i},k{}\n", i % 3)).collect(),
        }
    }

    /// The pipeline file of the events pipeline in this format.
    fn pipeline(self, dir: &Path) -> String {
        match self {
            Format::Ndjson => ndjson_pipeline(dir),
            Format::Csv => format!(
                "CREATE UNBOUNDED EXTERNAL TABLE events (id BIGINT NOT NULL, kind VARCHAR)
                 STORED AS CSV LOCATION '{incoming}'
                 OPTIONS ('poll_interval' '50ms', 'batch.interval' '100ms');
                 CREATE EXTERNAL TABLE events_out STORED AS PARQUET PARTITIONED BY (kind) LOCATION '{sink}';
                 INSERT INTO events_out SELECT id, id * 2 AS doubled, kind FROM events WHERE kind IS NOT NULL;",
                incoming = dir.join("incoming").display(),
                sink = dir.join("lake/events_out").display()
            ),
        }
    }
}

fn contract_violations(format: Format) {
    let (dir, incoming, sql, sink) = workspace(|d| format.pipeline(d));
    let server = Server::start(&[&sql], dir.path());
    drop_file(&incoming, &format.name("005"), &format.file(0..10));
    wait_until(Duration::from_secs(30), "the first file committed", || {
        (committed_output(&sink) >= 10).then_some(())
    });
    // Appended in place after it was read to its end: the new lines are read, and reported.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(incoming.join(format.name("005")))
            .unwrap();
        f.write_all(format.appended(10..15).as_bytes()).unwrap();
    }
    wait_until(Duration::from_secs(30), "the appended lines committed", || {
        (committed_output(&sink) >= 15).then_some(())
    });
    // A late file (sorts before the position): not read, but reported.
    drop_file(&incoming, &format.name("003"), &format.file(100..110));
    let rt = crate::harness::runtime();
    let metrics_url = server.url("/metrics");
    wait_until(Duration::from_secs(30), "the late file reported", || {
        let m = rt.block_on(async { reqwest::get(&metrics_url).await.ok()?.text().await.ok() })?;
        m.lines()
            .any(|l| l.starts_with("sluice_files_skipped_total") && l.contains("reason=\"late\""))
            .then_some(())
    });
    server.stop();
    let counts = rt.block_on(id_counts(&sink));
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), (0..15).collect::<Vec<_>>());
    assert!(counts.values().all(|n| *n == 1));

    // Replaced under the same name while stopped: the next start stops with an error (exit
    // code not 0) instead of reading the new file at the old offset.
    std::fs::remove_file(incoming.join(format.name("003"))).unwrap();
    drop_file(&incoming, &format.name("005"), &format.file(200..230));
    let (code, err) =
        crate::harness::run_to_exit(&["run", sql.to_str().unwrap(), "--listen", "127.0.0.1:0"], dir.path());
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("was replaced"), "{err}");
    assert_eq!(committed_output(&sink), 15, "nothing of the replaced file was read");
}
