//! Bounded randomized fuzzing of the two input paths, against the real server: the HTTP ingest
//! endpoint and the directory decoder get mutated NDJSON (bit flips, random bytes, cuts,
//! repeats, deep nesting, invalid UTF-8, odd escapes and numbers). The server must keep
//! serving, and every record it accepted must end as an output row or a dead letter, counted
//! by an independent reader (the committed Parquet and dead-letter files on disk).
//!
//! Seeded and deterministic; `SLUICE_FUZZ_ROUNDS` sets the number of inputs (default 5000
//! requests and 1000 files, about 20 s here).

use std::time::Duration;

use crate::harness::{Rng, Server, committed_output, dead_letters, drop_file, log_entries, wait_until};

const SNIPPETS: &[&str] = &[
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{\"a\":{\"a\":{\"a\":{\"a\":",
    "1e999999",
    "-0.0e-400",
    "18446744073709551616",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\uZZZZ\"",
    "\\",
    "\"",
    "null",
    "true",
    ",",
    "}",
    "]",
    "\r\n",
    "\n",
    "\u{feff}",
    "\"ts\": \"2026-02-30T25:61:61Z\"",
    "\"id\": 9223372036854775808",
];

fn base_line(rng: &mut Rng, id: u64) -> Vec<u8> {
    match rng.range(0, 4) {
        0 => format!("{{\"id\": {id}, \"v\": {}}}", rng.range(0, 1000)).into_bytes(),
        1 => format!(
            "{{\"v\": {}, \"id\": {id}, \"extra\": [1, {{\"x\": \"y\"}}]}}",
            rng.range(0, 9)
        )
        .into_bytes(),
        2 => format!("{{\"id\": \"{id}\", \"v\": \"{}\"}}", rng.range(0, 9)).into_bytes(),
        _ => format!("{{\"id\": {id}, \"v\": null, \"s\": \"caf\\u00e9 \\n\"}}").into_bytes(),
    }
}

fn mutate(rng: &mut Rng, line: &mut Vec<u8>) {
    for _ in 0..rng.range(0, 4) {
        let len = line.len().max(1) as u64;
        let at = rng.range(0, len) as usize;
        match rng.range(0, 7) {
            0 if !line.is_empty() => {
                let i = at.min(line.len() - 1);
                line[i] ^= 1 << rng.range(0, 8);
            }
            1 => line.insert(at.min(line.len()), rng.range(0, 256) as u8),
            2 if !line.is_empty() => {
                let end = (at + rng.range(1, 8) as usize).min(line.len());
                line.drain(at.min(end)..end);
            }
            3 => {
                let s = SNIPPETS[rng.range(0, SNIPPETS.len() as u64) as usize].as_bytes();
                let at = at.min(line.len());
                line.splice(at..at, s.iter().copied());
            }
            4 if line.len() > 2 => {
                let end = (at + rng.range(1, 16) as usize).min(line.len());
                let piece = line[at.min(end)..end].to_vec();
                line.extend_from_slice(&piece);
            }
            5 => {
                let n = rng.range(1, 3000) as usize;
                let mut deep = vec![b'['; n];
                deep.extend(std::iter::repeat_n(b']', n));
                line.splice(at.min(line.len())..at.min(line.len()), deep);
            }
            _ => line.extend_from_slice(&[0xff, 0xfe, 0xc3]),
        }
    }
}

fn body(rng: &mut Rng, next_id: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.range(1, 12) {
        let mut l = base_line(rng, *next_id);
        *next_id += 1;
        if rng.range(0, 3) > 0 {
            mutate(rng, &mut l);
        }
        out.extend_from_slice(&l);
        out.push(b'\n');
    }
    out
}

fn rounds(default: u64) -> u64 {
    std::env::var("SLUICE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pipeline(dir: &std::path::Path, source: &str) -> std::path::PathBuf {
    let sql = dir.join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL, v BIGINT, s VARCHAR, ts TIMESTAMP) {source}
             OPTIONS ('batch.interval' '50ms', 'poll_interval' '20ms');
             CREATE EXTERNAL TABLE out STORED AS PARQUET LOCATION '{}';
             INSERT INTO out SELECT id, v, s, ts FROM ev;",
            dir.join("lake/out").display()
        )
        .replace(
            "'poll_interval' '20ms'",
            if source.contains("HTTP") {
                "'max_body_bytes' '1MB'"
            } else {
                "'poll_interval' '20ms'"
            },
        ),
    )
    .unwrap();
    sql
}

#[test]
fn fuzzed_http_bodies_never_break_the_server_or_lose_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let sql = pipeline(dir.path(), "STORED AS HTTP LOCATION '/v1/sources/ev'");
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let rt = crate::harness::runtime();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = server.url("/v1/sources/ev");
    let mut rng = Rng(0xf022_5eed);
    let (mut next_id, mut accepted, mut rejected, mut whole_refusals) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..rounds(5000) {
        let b = body(&mut rng, &mut next_id);
        let (status, reply) = rt.block_on(async {
            let r = http
                .post(&url)
                .header("x-request-id", format!("f{i}"))
                .body(b.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i} failed: {e} (body {:?})", String::from_utf8_lossy(&b)));
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        });
        match status {
            200 => {
                accepted += reply["accepted"].as_u64().unwrap();
                rejected += reply["rejected"].as_u64().unwrap();
            }
            // Not JSON at all: refused whole, nothing kept.
            400 => whole_refusals += 1,
            other => panic!("request {i}: {other} {reply} for {:?}", String::from_utf8_lossy(&b)),
        }
    }
    let health = rt.block_on(async { http.get(server.url("/healthz")).send().await.unwrap().status() });
    assert_eq!(health, 200);
    wait_until(Duration::from_secs(60), "everything accepted committed", || {
        (committed_output(&sink) >= accepted).then_some(())
    });
    server.stop();
    let rows: u64 = crate::harness::runtime().block_on(async {
        crate::harness::read_hive(&sink, &[], "SELECT count(*) FROM t")
            .await
            .iter()
            .map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap()
                    .value(0) as u64
            })
            .sum()
    });
    assert_eq!(rows, accepted, "every accepted record is an output row");
    assert_eq!(
        dead_letters(&sink).len() as u64,
        rejected,
        "every rejected record is a dead letter"
    );
    eprintln!(
        "fuzz over HTTP: {next_id} records, {accepted} output, {rejected} dead letters, {whole_refusals} bodies refused whole"
    );
}

#[test]
fn fuzzed_files_never_break_the_directory_source_or_lose_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sql = pipeline(
        dir.path(),
        &format!("STORED AS NDJSON LOCATION '{}'", incoming.display()),
    );
    let sink = dir.path().join("lake/out");
    let server = Server::start(&[&sql], dir.path());
    let mut rng = Rng(0xd12_f022);
    let (mut next_id, mut records) = (0u64, 0u64);
    let files = rounds(5000) / 5;
    for f in 0..files {
        let mut content = Vec::new();
        for _ in 0..rng.range(1, 6) {
            content.extend(body(&mut rng, &mut next_id));
        }
        records += sluice_engine::decode::lines(&content).len() as u64;
        // drop_file takes text; write bytes the same way (a dot-file renamed into place).
        let tmp = incoming.join(format!(".{f:05}.tmp"));
        std::fs::write(&tmp, &content).unwrap();
        std::fs::rename(&tmp, incoming.join(format!("{f:05}.ndjson"))).unwrap();
    }
    drop_file(&incoming, "zzzzz.ndjson", "{\"id\": -1}\n");
    records += 1;
    wait_until(Duration::from_secs(120), "every file committed", || {
        let received: u64 = log_entries(&sink)
            .iter()
            .map(|e| e["counts"]["received"].as_u64().unwrap_or(0))
            .sum();
        (received >= records).then_some(())
    });
    server.stop();
    let entries = log_entries(&sink);
    let received: u64 = entries.iter().map(|e| e["counts"]["received"].as_u64().unwrap()).sum();
    let output: u64 = entries.iter().map(|e| e["counts"]["output"].as_u64().unwrap()).sum();
    let dead = dead_letters(&sink).len() as u64;
    assert_eq!(received, records, "every record received once");
    assert_eq!(output + dead, records, "every record is output or a dead letter");
    eprintln!("fuzz over files: {records} records in {files} files, {output} output, {dead} dead letters");
}
