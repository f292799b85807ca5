//! Crash points for testing the commit protocol: `SLUICE_CRASH_AT=<point>[:<n>]` aborts the
//! process (like kill -9: no destructors, no flush) the n-th time (default first) execution
//! reaches `<point>`. Crash points exist only in builds with the `fault-injection` feature (the
//! test suite's); elsewhere [`point`] is empty and the variable is ignored.
//!
//! `SLUICE_FAIL_AT=<name>[,<name>...]` makes [`fails`] return true at those names, for faults
//! that are errors rather than crashes (`catch_up`: the HTTP source's catch-up reader fails), and
//! [`fails_alternately`] true every other time (`after_state`: an epoch fails once after its
//! event-time state changed, then succeeds when tried again).
//!
//! `SLUICE_HOLD_AT=<name>:<path>` makes [`held`] return true at `name` while the file `path`
//! exists: a fault a test switches off by removing the file (`commit`: every commit fails with
//! a transient error, as against a store that is down, so the sink falls behind).
//!
//! `SLUICE_STOP_AT=<point>` stops the process with SIGSTOP the first time it reaches `<point>`
//! (a process frozen mid-commit — a GC pause, a suspended VM — that a test resumes with
//! SIGCONT after another took its lease over).
//!
//! Points: `after_wal_append` (durable, not yet acknowledged), `after_stage` (files staged, no
//! log entry), `after_log_put` (entry written, files not moved), `after_move` (some files moved),
//! `after_commit` (commit done, not yet reported to the source), `before_segment_delete`,
//! `before_orphan_delete` (recovery listed the staged files no entry names, about to delete one).

#[cfg(feature = "fault-injection")]
use std::sync::OnceLock;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "fault-injection")]
static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
#[cfg(feature = "fault-injection")]
static HITS: AtomicU64 = AtomicU64::new(0);

/// Aborts the process here if `SLUICE_CRASH_AT` names this point (and its count is reached).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Aborts the process here if `SLUICE_CRASH_AT` names this point (and its count is reached).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("SLUICE_CRASH_AT").ok()?;
        let (p, n) = match v.split_once(':') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((p, n))
    });
    if let Some((p, n)) = target
        && p == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 >= *n
    {
        eprintln!("SLUICE_CRASH_AT={name}: aborting");
        std::process::abort();
    }
    static STOPPED: AtomicU64 = AtomicU64::new(0);
    if std::env::var("SLUICE_STOP_AT").is_ok_and(|v| v == name) && STOPPED.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("SLUICE_STOP_AT={name}: stopping (SIGSTOP)");
        // SAFETY: raise() only sends a signal to this process.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}

/// True when `SLUICE_FAIL_AT` names `name` (an injected error, in fault-injection builds).
#[cfg(feature = "fault-injection")]
pub fn fails(name: &str) -> bool {
    std::env::var("SLUICE_FAIL_AT").is_ok_and(|v| v.split(',').any(|n| n == name))
}

/// True when `SLUICE_FAIL_AT` names `name` (never, outside fault-injection builds).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}

/// True the 1st, 3rd, 5th... time execution reaches `name` while `SLUICE_FAIL_AT` names it.
#[cfg(feature = "fault-injection")]
pub fn fails_alternately(name: &str) -> bool {
    static ALTERNATE: AtomicU64 = AtomicU64::new(0);
    fails(name) && ALTERNATE.fetch_add(1, Ordering::Relaxed) % 2 == 0
}

/// True every other time `SLUICE_FAIL_AT` names `name` (never, outside fault-injection builds).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fails_alternately(_name: &str) -> bool {
    false
}

/// True while `SLUICE_HOLD_AT` names `name` and its file exists (in fault-injection builds).
#[cfg(feature = "fault-injection")]
pub fn held(name: &str) -> bool {
    std::env::var("SLUICE_HOLD_AT").is_ok_and(|v| {
        v.split_once(':')
            .is_some_and(|(n, path)| n == name && std::path::Path::new(path).exists())
    })
}

/// True while `SLUICE_HOLD_AT` names `name` (never, outside fault-injection builds).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn held(_name: &str) -> bool {
    false
}
