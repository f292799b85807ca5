//! Power loss, not only kill -9: the server runs with `SLUICE_SYNC_JOURNAL`, which records
//! every file and directory sync (engine `durability`); after the process dies at a crash point
//! or by SIGKILL, [`power_cut`] rewrites the state directory and the sink to what a power cut
//! would leave — only synced bytes and synced directory entries, everything else discarded.
//! Then the server restarts and the delivery equation is checked: nothing acknowledged lost,
//! nothing twice, recovery never wedges.
//!
//! Reproducer for #12 (item 1): before the sink synced its files and directories, the cut
//! removed committed entries and files while the ingest-log segments they covered were gone.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use sluice_engine::durability::power_cut;

use crate::delivery::{Load, check, http_pipeline, requests};
use crate::harness::{Rng, Server, free_port, wait_until};

/// Starts the server with the sync journal (and `extra` environment).
fn start(sql: &Path, dir: &Path, port: u16, journal: &Path, extra: &[(&str, &str)]) -> Server {
    let journal = journal.display().to_string();
    let mut env = vec![("SLUICE_SYNC_JOURNAL", journal.as_str())];
    env.extend_from_slice(extra);
    Server::start_with(&[sql], dir, port, &env)
}

/// The roots a power cut rewrites: the state directory and the sink (created up front, as an
/// operator's directories would already exist and be durable).
fn roots(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (state, sink) = (dir.join(".sluice"), dir.join("lake/out"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&sink).unwrap();
    (state, sink)
}

// A crash at each step of the commit protocol, then a power cut, then recovery.
#[test]
fn power_cut_at_each_step_loses_nothing_acknowledged() {
    let points = [
        "after_wal_append:3",
        "after_stage:3",
        "after_log_put:3",
        "after_move:4",
        "after_commit:3",
        "before_segment_delete:2",
        "after_commit:6",
    ];
    for point in points {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = roots(dir.path());
        let journal = dir.path().join("journal");
        let sql = http_pipeline(
            dir.path(),
            // A small budget caps how far batches grow while behind (half of it), so the run
            // has enough epochs to reach every point.
            "'batch.max_rows' '300', 'batch.interval' '50ms', 'log.segment_bytes' '8KB', 'buffer.max_bytes' '64KB'",
        );
        let port = free_port();
        let rt = crate::harness::runtime();
        let n = 12_000;
        let reqs = requests(n, 100);
        let server = start(&sql, dir.path(), port, &journal, &[("SLUICE_CRASH_AT", point)]);
        let load = Load::start(&rt, port, reqs.clone(), 3);
        let status = server.wait_exit(Duration::from_secs(120));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "{point}: aborted at the crash point ({status:?})"
        );
        let acked_before_cut = load.acked_ids(&reqs);
        power_cut(&journal, &[&state, &sink]).unwrap();
        let server = start(&sql, dir.path(), port, &journal, &[]);
        wait_until(Duration::from_secs(120), "every request acknowledged", || {
            (load.acked() == load.total).then_some(())
        });
        server.stop();
        let sent: HashSet<i64> = (0..n).collect();
        let acked = load.acked_ids(&reqs);
        assert!(acked_before_cut.is_subset(&acked));
        let (out, dead) = rt.block_on(check(&sink, &sent, &acked));
        eprintln!(
            "power cut at {point}: acknowledged before the cut {}, output {out}, dead letters {dead}",
            acked_before_cut.len()
        );
    }
}

// SIGKILL at random moments, most followed by a power cut, under load.
#[test]
fn power_cuts_at_random_moments_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = roots(dir.path());
    let journal = dir.path().join("journal");
    let sql = http_pipeline(
        dir.path(),
        "'batch.max_rows' '2000', 'batch.interval' '30ms', 'log.segment_bytes' '32KB'",
    );
    let port = free_port();
    let rt = crate::harness::runtime();
    let n = 30_000;
    let reqs = requests(n, 100);
    let mut server = start(&sql, dir.path(), port, &journal, &[]);
    let load = Load::start(&rt, port, reqs.clone(), 3);
    let mut rng = Rng(0x90_7e12_c075);
    // Kills alone alternate (at random) with kills followed by a power cut: a server that
    // restarts after a kill must not trust what the killed one wrote but never synced.
    let rounds = 12;
    let mut cuts = 0;
    let mut acked_before = HashSet::new();
    for _ in 0..rounds {
        let target = (load.acked() + rng.range(3, 25) as usize).min(load.total);
        wait_until(Duration::from_secs(120), "acknowledgements before the kill", || {
            (load.acked() >= target).then_some(())
        });
        server.kill9();
        if rng.range(0, 3) > 0 {
            acked_before = load.acked_ids(&reqs);
            power_cut(&journal, &[&state, &sink]).unwrap();
            cuts += 1;
        }
        server = start(&sql, dir.path(), port, &journal, &[]);
    }
    wait_until(Duration::from_secs(300), "every request acknowledged", || {
        (load.acked() == load.total).then_some(())
    });
    server.stop();
    let sent: HashSet<i64> = (0..n).collect();
    let acked = load.acked_ids(&reqs);
    assert!(acked_before.is_subset(&acked));
    let (out, dead) = rt.block_on(check(&sink, &sent, &acked));
    assert!(cuts >= 4, "{cuts} cuts");
    eprintln!(
        "power cuts at random moments: {rounds} kills, {cuts} followed by a cut, output {out}, dead letters {dead}"
    );
}
