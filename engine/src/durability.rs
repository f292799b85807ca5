//! Every durability step Sluice takes on local disk goes through this module, so the order of
//! the steps is explicit and can be checked under a simulated power cut.
//!
//! A write reaches the disk only when it is synced: [`sync_file`] makes a file's data and size
//! durable, [`sync_dir`] makes a directory's entries durable (files and directories created,
//! renamed or removed in it). A protocol step that others build on (an acknowledgement, a
//! commit entry, the deletion of input) happens only after the steps it depends on were synced:
//!
//! ```text
//!   write data ─► sync_file ─► link/rename into place ─► sync_dir(parent) ─► next step
//! ```
//!
//! [`create_dir_all`] creates missing directories and syncs each new one's parent, so a file
//! synced into a new directory cannot vanish with its directory.
//!
//! With the `fault-injection` feature and `SLUICE_SYNC_JOURNAL=<dir>` set, every sync is also
//! recorded (a copy of the file's bytes, or the directory's entries) in that journal after it
//! returns. `power_cut` then rewrites a tree to what a power cut would have left: only what
//! was synced, every other write and directory entry discarded. Tests use it after killing the
//! process at any step.

use std::fs::File;
use std::io;
use std::path::Path;

/// Makes `file`'s data (and size) durable. `path` names it for the power-loss journal.
pub fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    file.sync_data()?;
    #[cfg(feature = "fault-injection")]
    journal::file_synced(path);
    #[cfg(not(feature = "fault-injection"))]
    let _ = path;
    Ok(())
}

/// Makes the entries of directory `dir` durable (creations, renames and removals in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    #[cfg(feature = "fault-injection")]
    journal::dir_synced(dir);
    Ok(())
}

/// Directories this process has made durable (created and synced into their parent, or found
/// and synced into their parent once).
static DURABLE_DIRS: std::sync::Mutex<Option<std::collections::HashSet<std::path::PathBuf>>> =
    std::sync::Mutex::new(None);

/// Creates `dir` and its missing parents, and makes sure each one's entry in its parent is
/// durable: the parent of every directory created is synced, and so is the parent of a
/// directory found already there the first time this process meets it (a process killed
/// between creating it and syncing its parent left it in the page cache only).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let key = std::path::absolute(dir)?;
    {
        let known = DURABLE_DIRS.lock().unwrap_or_else(|p| p.into_inner());
        if known.as_ref().is_some_and(|k| k.contains(&key)) {
            return Ok(());
        }
    }
    let parent = key.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_all(parent)?;
    }
    match std::fs::create_dir(&key) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && key.is_dir() => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = parent {
        sync_dir(parent)?;
    }
    DURABLE_DIRS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Default::default)
        .insert(key);
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same directory is
/// written and synced, renamed over `path`, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    sync_file(&f, &tmp)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Takes an exclusive OS lock (`flock`) on `path`, creating the file if needed. `None` when
/// another process holds it. The kernel releases it when the file is dropped or the process
/// exits in any way (kill -9 included).
pub fn lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(feature = "fault-injection")]
pub use journal::power_cut;

#[cfg(feature = "fault-injection")]
mod journal {
    //! The power-loss journal: `journal.ndjson` (one line per sync, in order) and `blobs/`
    //! (the bytes of each synced file at its sync).

    use std::collections::HashMap;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde::{Deserialize, Serialize};

    static LOCK: Mutex<()> = Mutex::new(());
    static NEXT_BLOB: AtomicU64 = AtomicU64::new(0);

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Line {
        /// File `key` (an inode identity) was synced; its bytes are in `blob`.
        File { key: String, blob: String },
        /// Directory `path` was synced with these entries: (name, is_dir, key of a file).
        Dir {
            path: PathBuf,
            entries: Vec<(String, bool, String)>,
        },
    }

    fn dir() -> Option<PathBuf> {
        std::env::var_os("SLUICE_SYNC_JOURNAL").map(PathBuf::from)
    }

    /// An identity for the file behind `path` that survives renames and is not reused when a
    /// deleted file's inode is (inode number and birth time).
    fn key(meta: &std::fs::Metadata) -> String {
        use std::os::unix::fs::MetadataExt;
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or_else(|| "nobirth".to_string(), |d| d.as_nanos().to_string());
        format!("{}-{}-{born}", meta.dev(), meta.ino())
    }

    fn append(journal: &Path, line: &Line) {
        let Ok(mut text) = serde_json::to_vec(line) else { return };
        text.push(b'\n');
        let written = std::fs::create_dir_all(journal)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(journal.join("journal.ndjson"))
            })
            .and_then(|mut f| f.write_all(&text));
        if let Err(e) = written {
            eprintln!("sync journal: cannot append: {e}");
        }
    }

    pub(super) fn file_synced(path: &Path) {
        let Some(journal) = dir() else { return };
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let (Ok(meta), Ok(bytes)) = (std::fs::metadata(path), std::fs::read(path)) else {
            return;
        };
        let blob = format!("{}-{}", std::process::id(), NEXT_BLOB.fetch_add(1, Ordering::Relaxed));
        let blobs = journal.join("blobs");
        if std::fs::create_dir_all(&blobs)
            .and_then(|()| std::fs::write(blobs.join(&blob), &bytes))
            .is_err()
        {
            return;
        }
        append(&journal, &Line::File { key: key(&meta), blob });
    }

    pub(super) fn dir_synced(path: &Path) {
        let Some(journal) = dir() else { return };
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(line) = snapshot_dir(path) {
            append(&journal, &line);
        }
    }

    fn snapshot_dir(path: &Path) -> Option<Line> {
        let path = std::fs::canonicalize(path).ok()?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&path).ok()? {
            let e = e.ok()?;
            let meta = std::fs::symlink_metadata(e.path()).ok()?;
            entries.push((e.file_name().to_string_lossy().into_owned(), meta.is_dir(), key(&meta)));
        }
        Some(Line::Dir { path, entries })
    }

    /// Rewrites each tree under `roots` to what a power cut at this instant would leave:
    /// directories hold only the entries they held at their last sync (none if never synced),
    /// and each file holds the bytes of its last sync (empty if never synced). The roots
    /// themselves are taken to be durable. The journal is then reset to describe the rewritten
    /// trees as fully synced, so later cuts start from here.
    ///
    /// Call it only while no process writes under `roots`.
    pub fn power_cut(journal: &Path, roots: &[&Path]) -> std::io::Result<()> {
        let text = std::fs::read_to_string(journal.join("journal.ndjson")).unwrap_or_default();
        let mut files: HashMap<String, String> = HashMap::new();
        let mut dirs: HashMap<PathBuf, Vec<(String, bool, String)>> = HashMap::new();
        // A line cut short by the kill is not a completed sync.
        for line in text.lines().filter_map(|l| serde_json::from_str::<Line>(l).ok()) {
            match line {
                Line::File { key, blob } => {
                    files.insert(key, blob);
                }
                Line::Dir { path, entries } => {
                    dirs.insert(path, entries);
                }
            }
        }
        if files.keys().any(|k| k.ends_with("nobirth")) {
            return Err(std::io::Error::other(
                "this filesystem gives no birth times: the power-cut model cannot tell a reused inode from the file it replaced",
            ));
        }
        let roots: Vec<PathBuf> = roots
            .iter()
            .map(|r| std::fs::canonicalize(r))
            .collect::<std::io::Result<_>>()?;
        for root in &roots {
            let mut contents = Vec::new();
            collect(root, &dirs, &files, journal, &mut contents)?;
            for e in std::fs::read_dir(root)? {
                let p = e?.path();
                if std::fs::symlink_metadata(&p)?.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            for (path, bytes) in contents {
                match bytes {
                    None => std::fs::create_dir_all(&path)?,
                    Some(b) => std::fs::write(&path, b)?,
                }
            }
        }
        // Start a new journal in which the rewritten trees are the durable state.
        let _ = std::fs::remove_dir_all(journal);
        std::fs::create_dir_all(journal)?;
        for root in &roots {
            record_tree(root, journal)?;
        }
        Ok(())
    }

    /// The durable contents under `dir`: (path, None) for a directory, (path, Some(bytes)) for
    /// a file, parents before children.
    fn collect(
        dir: &Path,
        dirs: &HashMap<PathBuf, Vec<(String, bool, String)>>,
        files: &HashMap<String, String>,
        journal: &Path,
        out: &mut Vec<(PathBuf, Option<Vec<u8>>)>,
    ) -> std::io::Result<()> {
        let Some(entries) = dirs.get(dir) else { return Ok(()) };
        for (name, is_dir, key) in entries {
            let path = dir.join(name);
            if *is_dir {
                out.push((path.clone(), None));
                collect(&path, dirs, files, journal, out)?;
            } else {
                let bytes = match files.get(key) {
                    Some(blob) => std::fs::read(journal.join("blobs").join(blob))?,
                    None => Vec::new(),
                };
                out.push((path, Some(bytes)));
            }
        }
        Ok(())
    }

    fn record_tree(dir: &Path, journal: &Path) -> std::io::Result<()> {
        if let Some(line) = snapshot_dir(dir) {
            append(journal, &line);
        }
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if std::fs::symlink_metadata(&p)?.is_dir() {
                record_tree(&p, journal)?;
            } else {
                let bytes = std::fs::read(&p)?;
                let meta = std::fs::metadata(&p)?;
                let blob = format!("cut-{}", NEXT_BLOB.fetch_add(1, Ordering::Relaxed));
                std::fs::create_dir_all(journal.join("blobs"))?;
                std::fs::write(journal.join("blobs").join(&blob), bytes)?;
                append(journal, &Line::File { key: key(&meta), blob });
            }
        }
        Ok(())
    }
}
