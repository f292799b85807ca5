//! Checking a table against its commit log (`sluice check`): every file the log names exists
//! with the size the log recorded, and no data file outside `_sluice/` is there without a
//! commit (plain hive readers would read it).

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::log::commit::{CommitLog, live_files};
use crate::store::TableStore;

/// What is wrong with one file or entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A commit entry cannot be read; nothing after it can be checked.
    DamagedEntry,
    /// A committed file does not exist.
    Missing,
    /// A committed file's size is not the one its entry recorded.
    WrongSize,
    /// A file in the table's data area that no commit names (visible to plain readers).
    NotCommitted,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// The table-relative path (of the file, or of the entry).
    pub path: String,
    /// Details, for people.
    pub detail: String,
}

/// What [`check_table`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Commit entries read.
    pub entries: usize,
    /// Live data files checked.
    pub files: usize,
    /// Dead-letter files checked.
    pub dead_letter_files: usize,
    /// Bytes in the live data files, as the log records them.
    pub bytes: u64,
    /// Everything wrong, in path order.
    pub problems: Vec<Problem>,
}

/// Checks `table`'s files against its commit log. Store errors are errors; what is wrong with
/// the table is in the report.
pub async fn check_table(table: &TableStore) -> Result<CheckReport> {
    let log = CommitLog::new(table.clone(), "sluice-check");
    let mut report = CheckReport::default();
    let mut entries = Vec::new();
    for epoch in log.epochs().await? {
        match log.read(epoch).await {
            Ok(e) => entries.push(e),
            // Deleted by vacuum's log retention since the listing.
            Err(EngineError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {}
            Err(EngineError::CommitLog { path, message }) => {
                report.problems.push(Problem {
                    kind: ProblemKind::DamagedEntry,
                    path: table.relative(&object_store::path::Path::from(path)),
                    detail: message,
                });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    report.entries = entries.len();
    // The live files as the newest checkpoint and the entries after it say (entries older
    // than the log retention are gone); from the entries read when one is damaged.
    let live = if report.problems.is_empty() {
        log.snapshot().await?.folded().files.into_iter().map(|(f, _)| f).collect()
    } else {
        live_files(&entries)
    };
    // Dead-letter and profile files are never removed, and their sizes are not recorded.
    let dead_letters: Vec<&str> = entries
        .iter()
        .flat_map(|e| e.dead_letters.iter().map(|d| d.path.as_str()))
        .collect();
    let profiles: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.quality.as_ref())
        .flat_map(|q| q.profile.iter().chain(q.anomaly_file.iter()).map(String::as_str))
        .collect();
    report.files = live.len();
    report.dead_letter_files = dead_letters.len();
    report.bytes = live.iter().map(|f| f.bytes).sum();
    let expected = live
        .iter()
        .map(|f| (f.path.as_str(), Some(f.bytes)))
        .chain(dead_letters.iter().map(|p| (*p, None)))
        .chain(profiles.iter().map(|p| (*p, None)));
    for (path, bytes) in expected {
        match table.store.head(&table.path(path)).await {
            Ok(meta) if bytes.is_some_and(|b| b != meta.size) => report.problems.push(Problem {
                kind: ProblemKind::WrongSize,
                path: path.to_string(),
                detail: format!(
                    "{} bytes on the store, {} in the log",
                    meta.size,
                    bytes.unwrap_or_default()
                ),
            }),
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => report.problems.push(Problem {
                kind: ProblemKind::Missing,
                path: path.to_string(),
                detail: "named by the log, not on the store".into(),
            }),
            Err(e) => return Err(EngineError::store(format!("checking {path}"))(e)),
        }
    }
    let all: Vec<_> = table
        .store
        .list(Some(&table.root))
        .try_collect()
        .await
        .map_err(EngineError::store(format!("listing {}", table.location)))?;
    for meta in all {
        let path = table.relative(&meta.location);
        if path.starts_with("_sluice/") || live.iter().any(|f| f.path == path) {
            continue;
        }
        report.problems.push(Problem {
            kind: ProblemKind::NotCommitted,
            path,
            detail: format!("{} bytes no commit names; plain hive readers read it", meta.size),
        });
    }
    report.problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}
