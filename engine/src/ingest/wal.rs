//! The ingest log: an append-only, checksummed, segmented log on local disk that makes an
//! acknowledgement mean "durable" for sources that cannot replay by themselves (HTTP).
//!
//! ```text
//!  producers ──append──► [queue] ──► writer thread: write frames of the whole group
//!                                        │  fsync once (group commit)
//!                                        ▼
//!                         callbacks in sequence order (forward to pipelines, then ack)
//!
//!  segment file <first_seq:020>.wal = frame*
//!  frame = len:u32le | crc32c(seq ‖ payload):u32le | seq:u64le | payload[len]
//! ```
//!
//! Invariants:
//! 1. Sequence numbers increase across frames and segments (contiguous unless damage repair
//!    dropped some); a segment's first frame has at least the sequence in its name.
//! 2. A callback sees `Ok(seq)` only after the frame is fsynced (unless `fsync` is off, which
//!    exists only to measure what durability costs).
//! 3. Callbacks run in sequence order, so whatever they forward arrives in log order.
//! 4. On open, every frame whose checksum holds is kept. A torn tail (invalid bytes with no
//!    valid frame after them, in the newest segment) is truncated: it was never acknowledged.
//!    Any other damage — a bad frame with valid frames after it (a bit flip, or pages written
//!    back out of order before a power cut), a bad tail in an older segment — is repaired: the
//!    original is kept as `*.quarantined` for inspection (hard-linked first, so a crash during
//!    the repair leaves it in place), and the segment is rewritten with its valid frames only.
//!    The sequence numbers lost are logged and counted, never silently skipped, and never
//!    reused.
//! 5. After a failed write or fsync, nothing more is written to that segment: the next group
//!    starts a new one (the failed one's state on disk is unknown).
//! 6. [`IngestLog::delete_before`] removes only segments whose every frame is below the given
//!    sequence (covered by commits).

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;

use crate::durability;
use crate::error::{EngineError, Result};

/// Default size at which a segment is closed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Most appends covered by one fsync.
pub const MAX_GROUP: usize = 4096;
/// The file in a log's directory that holds its identity ([`IngestLog::id`]).
pub const ID_FILE: &str = "log.id";
/// Largest payload accepted in one frame.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
const HEADER: usize = 16;
const SEGMENT_SUFFIX: &str = ".wal";
const QUARANTINE_SUFFIX: &str = ".quarantined";

/// Called once an append is durable (`Ok(seq)`) or failed.
pub type OnDurable = Box<dyn FnOnce(std::result::Result<u64, String>) + Send>;

struct Append {
    /// The record is the concatenation of these (a header and a body the caller already holds
    /// are logged without being copied together).
    parts: Vec<Bytes>,
    done: OnDurable,
}

impl Append {
    fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }
}

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Damaged segments repaired (rewritten with their valid frames): the originals, kept as
    /// `*.quarantined`.
    pub quarantined: Vec<PathBuf>,
    /// Records lost to damage (not torn tails): inclusive sequence ranges.
    pub lost: Vec<(u64, u64)>,
    /// The sequence the next append gets.
    pub next_seq: u64,
}

/// The ingest log of one source.
pub struct IngestLog {
    dir: PathBuf,
    id: String,
    /// The exclusive lock on the directory, held until the log is closed.
    lock: Mutex<Option<File>>,
    tx: Mutex<Option<mpsc::Sender<Append>>>,
    /// Every seq below this is durable.
    durable: Arc<AtomicU64>,
    /// First sequence of each live segment, ascending.
    segments: Arc<Mutex<Vec<u64>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tests: the writer's count of groups left to fail at their fsync.
    #[cfg(test)]
    fail_syncs: Arc<AtomicU64>,
}

impl std::fmt::Debug for IngestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestLog").field("dir", &self.dir).finish()
    }
}

/// What scanning a segment found.
struct Scan {
    /// Valid frames, in order: (seq, payload offset, payload len).
    frames: Vec<(u64, u64, usize)>,
    /// Byte ranges of the segment holding no valid frame.
    damage: Vec<(u64, u64)>,
}

impl Scan {
    /// Where the valid data ends (the start of a damaged tail, or the end).
    fn valid_end(&self, len: u64) -> u64 {
        match self.damage.last() {
            Some((from, to)) if *to == len => *from,
            _ => len,
        }
    }

    /// True when the only damage is a tail with no valid frame after it.
    fn only_torn_tail(&self, len: u64) -> bool {
        self.damage.len() == 1 && self.damage[0].1 == len
    }
}

fn seg_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

/// Largest step in sequence numbers a frame may take over the previous one (damage repair
/// drops some; anything further is not a frame of this log). Checked before the checksum, so
/// resynchronising over damaged bytes does not checksum at every offset.
const MAX_SEQ_STEP: u64 = 1 << 32;

/// The frame at `at`, if its sequence is in `min..min + step` and its checksum holds.
fn parse_frame(buf: &[u8], at: usize, min: u64, step: u64) -> Option<(u64, usize)> {
    let h = buf.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(h[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
    if len > MAX_FRAME_BYTES || seq < min || seq - min >= step {
        return None;
    }
    let body = buf.get(at + 8..at + HEADER + len)?;
    (crc32c::crc32c(body) == crc).then_some((seq, len))
}

/// Reads every frame of a segment whose checksum holds and whose sequence follows the previous
/// one's (the first at least `first`). With `resync`, damaged bytes are skipped byte by byte
/// to the next valid frame; without, the scan stops at the first bad frame (a reader of the
/// live log stops where the writer is).
fn scan(buf: &[u8], first: u64, resync: bool) -> Scan {
    let mut frames = Vec::new();
    let mut damage: Vec<(u64, u64)> = Vec::new();
    let mut at = 0usize;
    let mut bad_from: Option<usize> = None;
    while at < buf.len() {
        let min = frames.last().map_or(first, |(s, _, _): &(u64, u64, usize)| s + 1);
        // Past damage, a frame may skip at most as many sequences as frames could have fit in
        // the damaged bytes: bytes inside a payload (a producer's, perhaps crafted) rarely pass
        // for the next frame.
        let step = match bad_from {
            Some(b) => (at - b) as u64 / HEADER as u64 + 1,
            None => MAX_SEQ_STEP,
        };
        match parse_frame(buf, at, min, step) {
            Some((seq, len)) => {
                if let Some(b) = bad_from.take() {
                    damage.push((b as u64, at as u64));
                }
                frames.push((seq, (at + HEADER) as u64, len));
                at += HEADER + len;
            }
            None if !resync => {
                bad_from = Some(at);
                break;
            }
            None => {
                bad_from.get_or_insert(at);
                at += 1;
            }
        }
    }
    if let Some(b) = bad_from {
        damage.push((b as u64, buf.len() as u64));
    }
    Scan { frames, damage }
}

fn io(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    EngineError::io(ctx)
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut segs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(first) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
            segs.push((first, e.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

/// Rewrites a damaged segment with its valid frames only, keeping the original as
/// `*.quarantined`. Crash-safe: the original is hard-linked to its quarantine name first, then
/// the rewritten segment replaces it atomically.
fn repair(path: &Path, buf: &[u8], s: &Scan) -> Result<PathBuf> {
    let q = PathBuf::from(format!("{}{QUARANTINE_SUFFIX}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    match std::fs::hard_link(path, &q) {
        Ok(()) => {}
        // A repair interrupted earlier: the original is already kept.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("quarantining {}", path.display()))(e)),
    }
    durability::sync_dir(dir).map_err(io(format!("quarantining {}", path.display())))?;
    let mut kept = Vec::with_capacity(buf.len());
    for (_, off, len) in &s.frames {
        let start = *off as usize - HEADER;
        kept.extend_from_slice(&buf[start..*off as usize + len]);
    }
    durability::write_atomic(path, &kept).map_err(io(format!("rewriting {}", path.display())))?;
    metrics::counter!("sluice_ingest_log_quarantined_segments_total").increment(1);
    Ok(q)
}

/// Sequence ranges missing between `first` (or the previous frame) and each valid frame, and
/// up to `next` (the next segment's first sequence, for older segments).
fn gaps(first: u64, frames: &[(u64, u64, usize)], next: Option<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut expect = first;
    for (seq, _, _) in frames {
        if *seq > expect {
            out.push((expect, seq - 1));
        }
        expect = seq + 1;
    }
    if let Some(n) = next.filter(|n| *n > expect) {
        out.push((expect, n - 1));
    }
    out
}

/// Takes the exclusive lock of a log directory (one process writes a log; a second would
/// truncate or repair the first one's in-flight tail).
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    durability::lock_file(&path)
        .map_err(io(format!("locking {}", path.display())))?
        .ok_or_else(|| {
            EngineError::config(
                format!("the ingest log at {} is in use by another process", dir.display()),
                Some(
                    "give each server its own --state-dir (the default is .sluice beside the first pipeline file)"
                        .to_string(),
                ),
            )
        })
}

/// A new random identity (128 bits from the standard library's randomly seeded hasher).
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

/// Reads the log's identity, creating it (durably) for a new log or one written before logs
/// had identities.
fn read_or_create_id(dir: &Path) -> Result<String> {
    let path = dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            // Written by a process that may have died before syncing it.
            let f = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
            durability::sync_file(&f, &path).map_err(io(format!("syncing {}", path.display())))?;
            return Ok(text.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    }
    let id = new_id();
    durability::write_atomic(&path, id.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
    Ok(id)
}

impl IngestLog {
    /// Opens (or creates) the log in `dir`, repairing a torn tail and quarantining corrupt
    /// segments, and starts the writer thread.
    pub fn open(dir: &Path, segment_bytes: u64, fsync: bool) -> Result<(Self, OpenReport)> {
        durability::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let lock = lock_dir(dir)?;
        let mut report = OpenReport::default();
        let id = read_or_create_id(dir)?;
        let segs = list_segments(dir)?;
        let mut live: Vec<u64> = Vec::new();
        let mut next_seq = 0u64;
        let mut max_seen = None::<u64>;
        for (i, (first, path)) in segs.iter().enumerate() {
            let buf = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
            let mut s = scan(&buf, *first, true);
            // Frames at or past the next segment's first sequence are left over from a write
            // that failed before that segment started (its sequences were given out again).
            if let Some((next, _)) = segs.get(i + 1)
                && let Some(cut) = s.frames.iter().position(|(seq, _, _)| seq >= next)
            {
                let from = s.frames[cut].1 - HEADER as u64;
                s.frames.truncate(cut);
                s.damage.retain(|(a, _)| *a < from);
                s.damage.push((from, buf.len() as u64));
            }
            if let Some((last, _, _)) = s.frames.last() {
                max_seen = Some(max_seen.map_or(*last, |m: u64| m.max(*last)));
            }
            let newest = i + 1 == segs.len();
            let len = buf.len() as u64;
            if s.damage.is_empty() {
                // What a killed process wrote may still be only in the page cache: everything
                // kept (and replayed, and remembered as logged) is made durable before use.
                let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
                durability::sync_file(&f, path).map_err(io(format!("syncing {}", path.display())))?;
            } else if newest && s.only_torn_tail(len) {
                let at = s.valid_end(len);
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(format!("opening {}", path.display())))?;
                f.set_len(at).map_err(io(format!("truncating {}", path.display())))?;
                durability::sync_file(&f, path).map_err(io(format!("syncing {}", path.display())))?;
                report.truncated_bytes += len - at;
                tracing::warn!(segment = %path.display(), cut = len - at, "truncated a torn tail of the ingest log");
            } else {
                let q = repair(path, &buf, &s)?;
                // A damaged tail of the newest segment was never acknowledged when nothing valid
                // follows it (a torn write); anything else may have been.
                let next = segs.get(i + 1).map(|(n, _)| *n);
                let lost = gaps(*first, &s.frames, next);
                let count: u64 = lost.iter().map(|(a, b)| b - a + 1).sum();
                metrics::counter!("sluice_ingest_log_lost_records_total").increment(count);
                tracing::error!(segment = %path.display(), damaged = ?s.damage, lost_records = ?lost, original = %q.display(),
                    "ingest log segment damaged; rewritten with its valid frames, the original kept");
                report.lost.extend(lost);
                report.quarantined.push(q);
            }
            // (Truncated and repaired segments were synced by their repair.)
            live.push(*first);
            next_seq = s.frames.last().map_or(*first, |(seq, _, _)| seq + 1);
        }
        durability::sync_dir(dir).map_err(io(format!("syncing {}", dir.display())))?;
        if let Some(m) = max_seen {
            next_seq = next_seq.max(m + 1);
        }
        report.next_seq = next_seq;
        let durable = Arc::new(AtomicU64::new(next_seq));
        let segments = Arc::new(Mutex::new(live));
        let (tx, rx) = mpsc::channel::<Append>();
        #[cfg(test)]
        let fail_syncs = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.to_path_buf(),
            segment_bytes,
            fsync,
            next_seq,
            file: None,
            path: PathBuf::new(),
            failed: false,
            file_len: 0,
            durable: durable.clone(),
            segments: segments.clone(),
            #[cfg(test)]
            fail_syncs: fail_syncs.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("sluice-ingest-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io("starting the ingest log writer"))?;
        Ok((
            IngestLog {
                dir: dir.to_path_buf(),
                id,
                lock: Mutex::new(Some(lock)),
                tx: Mutex::new(Some(tx)),
                durable,
                segments,
                writer: Mutex::new(Some(handle)),
                #[cfg(test)]
                fail_syncs,
            },
            report,
        ))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's identity: random, created with the log and kept in its directory
    /// ([`ID_FILE`]). Positions that name records of this log carry it, so records of another
    /// log (a fresh state directory, another machine's) are never taken for these.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every sequence below this is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Queues one record, the concatenation of `parts`; `done` runs on the writer thread once
    /// it is durable (or failed).
    pub fn append(&self, parts: Vec<Bytes>, done: OnDurable) {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(a)) = tx.send(Append { parts, done }) {
                    (a.done)(Err("the ingest log is closed".into()));
                }
            }
            None => done(Err("the ingest log is closed".into())),
        }
    }

    /// Appends and waits until durable; returns the sequence number.
    pub async fn append_wait(&self, payload: Vec<u8>) -> Result<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.append(
            vec![Bytes::from(payload)],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(EngineError::Io {
                context: "appending to the ingest log".into(),
                source: std::io::Error::other(e),
            }),
            Err(_) => Err(EngineError::Internal("ingest log writer stopped".into())),
        }
    }

    /// Calls `f(seq, payload)` for every durable record with `seq >= from`, in order.
    pub fn read_from(&self, from: u64, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let durable = self.durable_seq();
        let firsts = self.segments.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (i, first) in firsts.iter().enumerate() {
            if firsts.get(i + 1).is_some_and(|next| *next <= from) {
                continue;
            }
            let path = self.dir.join(seg_name(*first));
            let mut buf = Vec::new();
            File::open(&path)
                .and_then(|mut fh| fh.read_to_end(&mut buf))
                .map_err(io(format!("reading {}", path.display())))?;
            let s = scan(&buf, *first, false);
            for (seq, off, len) in s.frames {
                if seq >= durable {
                    return Ok(());
                }
                if seq >= from {
                    f(seq, &buf[off as usize..off as usize + len])?;
                }
            }
        }
        Ok(())
    }

    /// True when [`IngestLog::delete_before`]`(seq)` would delete a segment.
    pub fn deletable_before(&self, seq: u64) -> bool {
        let segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        segs.len() > 1 && segs[1] <= seq
    }

    /// Deletes segments all of whose records are below `seq` (the newest segment is kept).
    /// Returns how many were deleted.
    pub fn delete_before(&self, seq: u64) -> Result<usize> {
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while segs.len() > 1 && segs[1] <= seq {
            crate::crash::point("before_segment_delete");
            let path = self.dir.join(seg_name(segs[0]));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("deleting {}", path.display()))(e)),
            }
            segs.remove(0);
            n += 1;
        }
        if n > 0 {
            durability::sync_dir(&self.dir).map_err(io(format!("syncing {}", self.dir.display())))?;
        }
        Ok(n)
    }

    /// Stops the writer after it has handled every queued append, and releases the
    /// directory's lock.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Drop for IngestLog {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: bool,
    next_seq: u64,
    file: Option<File>,
    /// The open segment's path.
    path: PathBuf,
    /// A write or sync failed: the next group starts a new segment (the failed one's state on
    /// disk is unknown after a failed fsync, so nothing more is written to it).
    failed: bool,
    file_len: u64,
    durable: Arc<AtomicU64>,
    segments: Arc<Mutex<Vec<u64>>>,
    /// Tests: how many of the next groups fail at their fsync (after their bytes reached the
    /// file, as a real failed fsync leaves them).
    #[cfg(test)]
    fail_syncs: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Append>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(a) => group.push(a),
                    Err(_) => break,
                }
            }
            let start = self.next_seq;
            match self.write_group(&group) {
                Ok(()) => {
                    self.durable.store(self.next_seq, Ordering::Release);
                    metrics::histogram!("sluice_ingest_log_group_size").record(group.len() as f64);
                    crate::crash::point("after_wal_append");
                    for (i, a) in group.into_iter().enumerate() {
                        (a.done)(Ok(start + i as u64));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "ingest log append failed");
                    metrics::counter!("sluice_ingest_log_errors_total").increment(1);
                    let msg = e.to_string();
                    for a in group {
                        (a.done)(Err(msg.clone()));
                    }
                }
            }
        }
        if let Some(f) = &self.file {
            let _ = durability::sync_file(f, &self.path);
        }
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        let segs = self.segments.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(first) = segs.last().copied() else {
            return self.roll();
        };
        let path = self.dir.join(seg_name(first));
        let mut f = OpenOptions::new().append(true).read(true).open(&path)?;
        let len = f.seek(SeekFrom::End(0))?;
        self.file = Some(f);
        self.path = path;
        self.file_len = len;
        if len >= self.segment_bytes {
            // The newest segment is full: start a new one.
            return self.roll();
        }
        Ok(())
    }

    /// Closes the open segment (synced) and starts a new one at the next sequence.
    fn roll(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            durability::sync_file(&f, &self.path)?;
        }
        let first = self.next_seq;
        let path = self.dir.join(seg_name(first));
        let mut segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        if segs.last() == Some(&first) {
            // The newest segment holds no frame (its first write failed): started again below.
            segs.pop();
        }
        // A file of this name holds no frame (its first write failed, or it was created by a
        // roll whose directory sync failed): start it again.
        let f = OpenOptions::new().create(true).append(true).read(true).open(&path)?;
        f.set_len(0)?;
        durability::sync_dir(&self.dir)?;
        segs.push(first);
        drop(segs);
        self.file = Some(f);
        self.path = path;
        self.file_len = 0;
        Ok(())
    }

    fn write_group(&mut self, group: &[Append]) -> std::io::Result<()> {
        if self.failed {
            // Never write after a failed write or fsync into the same segment.
            self.file = None;
            self.roll()?;
            self.failed = false;
        } else if self.file.is_none() {
            self.open_segment()?;
        } else if self.file_len >= self.segment_bytes {
            self.roll()?;
        }
        // Frame headers first, then one vectored write of headers and payload parts: the
        // payloads are not copied into a group buffer.
        let mut headers = Vec::with_capacity(group.len());
        let mut seq = self.next_seq;
        for a in group {
            let len = a.len();
            if len > MAX_FRAME_BYTES {
                return Err(std::io::Error::other(format!(
                    "record of {len} bytes exceeds {MAX_FRAME_BYTES}"
                )));
            }
            let crc = a.parts.iter().fold(crc32c::crc32c(&seq.to_le_bytes()), |crc, p| {
                crc32c::crc32c_append(crc, p)
            });
            let mut h = [0u8; HEADER];
            h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
            h[4..8].copy_from_slice(&crc.to_le_bytes());
            h[8..16].copy_from_slice(&seq.to_le_bytes());
            headers.push(h);
            seq += 1;
        }
        let mut slices = Vec::with_capacity(group.len() * 3);
        for (a, h) in group.iter().zip(&headers) {
            slices.push(IoSlice::new(h));
            slices.extend(a.parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)));
        }
        let written: usize = slices.iter().map(|s| s.len()).sum();
        let before = self.file_len;
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no open segment"))?;
        let path = &self.path;
        #[cfg(test)]
        let injected = self
            .fail_syncs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let injected = false;
        let res = write_all_vectored(f, &mut slices).and_then(|_| {
            if injected {
                Err(std::io::Error::other("injected fsync failure"))
            } else if self.fsync {
                durability::sync_file(f, path)
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            // Cut back whatever part of the group reached the file: none of it is acknowledged.
            // Its state on disk is unknown after a failed fsync, so the next group goes to a
            // new segment.
            let _ = f.set_len(before);
            self.failed = true;
            return Err(e);
        }
        self.file_len += written as u64;
        self.next_seq = seq;
        Ok(())
    }
}

/// Writes every slice, in order (`write_vectored` may write part of them, or fewer slices
/// than given: the platform caps a call at `IOV_MAX`).
fn write_all_vectored(f: &mut File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match f.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(log: &IngestLog, from: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        log.read_from(from, |s, p| {
            out.push((s, p.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    /// A failed fsync leaves the group's bytes in the file; nothing of it is acknowledged, the
    /// bytes are cut back, and the next group goes to a new segment (or, when the failed group
    /// was the segment's first, to a fresh file of the same name). Reopening finds every
    /// acknowledged record, no damage and no gap.
    #[tokio::test]
    async fn a_failed_fsync_rolls_to_a_new_segment_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        // The very first group fails: its segment holds no frame and is started again.
        log.fail_syncs.store(1, Ordering::Release);
        assert!(log.append_wait(b"lost-0".to_vec()).await.is_err());
        assert_eq!(log.append_wait(b"a".to_vec()).await.unwrap(), 0);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        // A later group fails: the segment is cut back to its last acknowledged frame and never
        // written again; the next record starts segment 1.
        log.fail_syncs.store(1, Ordering::Release);
        assert!(log.append_wait(b"lost-1".to_vec()).await.is_err());
        assert_eq!(log.append_wait(b"b".to_vec()).await.unwrap(), 1);
        assert_eq!(log.append_wait(b"c".to_vec()).await.unwrap(), 2);
        let segs = list_segments(dir.path()).unwrap();
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(std::fs::metadata(&segs[0].1).unwrap().len(), (HEADER + 1) as u64, "cut back to frame 0");
        // Two failures in a row: each group fails alone, the log goes on after them.
        log.fail_syncs.store(2, Ordering::Release);
        assert!(log.append_wait(b"lost-2".to_vec()).await.is_err());
        assert!(log.append_wait(b"lost-3".to_vec()).await.is_err());
        assert_eq!(log.append_wait(b"d".to_vec()).await.unwrap(), 3);
        log.close();
        let (log, rep) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!((rep.next_seq, rep.truncated_bytes), (4, 0));
        assert!(rep.lost.is_empty() && rep.quarantined.is_empty(), "{rep:?}");
        let got: Vec<(u64, Vec<u8>)> = records(&log, 0);
        let want: Vec<(u64, Vec<u8>)> = [b"a", b"b", b"c", b"d"].iter().enumerate().map(|(i, r)| (i as u64, r.to_vec())).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn append_read_roll_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (log, rep) = IngestLog::open(dir.path(), 64, true).unwrap();
        assert_eq!(rep.next_seq, 0);
        for i in 0..10u8 {
            assert_eq!(log.append_wait(vec![i; 40]).await.unwrap(), i as u64);
        }
        assert!(list_segments(dir.path()).unwrap().len() > 2, "small segments roll");
        assert_eq!(records(&log, 7).iter().map(|r| r.0).collect::<Vec<_>>(), vec![7, 8, 9]);
        let deleted = log.delete_before(5).unwrap();
        assert!(deleted > 0);
        assert_eq!(records(&log, 5).len(), 5, "records at and after 5 stay");
        log.close();
        let (log, rep) = IngestLog::open(dir.path(), 64, true).unwrap();
        assert_eq!(rep.next_seq, 10);
        assert_eq!(log.append_wait(b"x".to_vec()).await.unwrap(), 10);
    }

    #[test]
    fn records_of_several_parts_in_groups_larger_than_one_writev() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = IngestLog::open(dir.path(), 1 << 30, true).unwrap();
        let (tx, rx) = mpsc::channel();
        // Queued without waiting, so the writer groups them: 3 slices a record, far more than
        // IOV_MAX (1024) in a group, which one writev cannot take.
        let n = 2000u64;
        for i in 0..n {
            let tx = tx.clone();
            let parts = vec![
                Bytes::from(format!("id-{i}\n")),
                Bytes::new(),
                Bytes::from(vec![b'a' + (i % 26) as u8; (i % 7) as usize * 100]),
            ];
            log.append(parts, Box::new(move |r| tx.send(r).unwrap()));
        }
        let mut seqs: Vec<u64> = (0..n).map(|_| rx.recv().unwrap().unwrap()).collect();
        seqs.sort();
        assert_eq!(seqs, (0..n).collect::<Vec<_>>());
        log.close();
        let (log, rep) = IngestLog::open(dir.path(), 1 << 30, true).unwrap();
        assert_eq!(
            (rep.next_seq, rep.truncated_bytes),
            (n, 0),
            "every frame checks out on reopen"
        );
        let got = records(&log, 0);
        assert_eq!(got.len(), n as usize);
        for (seq, payload) in got {
            let mut want = format!("id-{seq}\n").into_bytes();
            want.extend(vec![b'a' + (seq % 26) as u8; (seq % 7) as usize * 100]);
            assert_eq!(payload, want, "record {seq}");
        }
    }

    #[test]
    fn write_all_vectored_writes_past_iov_max() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| i.to_le_bytes().repeat(1 + (i % 5) as usize))
            .collect();
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        write_all_vectored(&mut f, &mut slices).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), chunks.concat());
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_corruption_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
            for i in 0..5u8 {
                log.append_wait(vec![i; 100]).await.unwrap();
            }
        }
        let seg = list_segments(dir.path()).unwrap()[0].1.clone();
        // Torn: cut the last frame in half.
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 50)
            .unwrap();
        let (log, rep) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(rep.truncated_bytes, (HEADER + 100 - 50) as u64);
        assert_eq!(rep.next_seq, 4);
        assert_eq!(records(&log, 0).len(), 4);
        log.close();
        drop(log);
        // Corrupt: flip a payload bit of the second frame (valid frames follow it). Every
        // other frame is kept; the lost one is reported; the original is kept aside.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[HEADER + 100 + HEADER + 3] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let (log, rep) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(rep.quarantined.len(), 1);
        assert!(rep.quarantined[0].display().to_string().ends_with(".quarantined"));
        assert_eq!(
            std::fs::read(&rep.quarantined[0]).unwrap(),
            bytes,
            "the original is kept"
        );
        assert_eq!(rep.lost, vec![(1, 1)]);
        assert_eq!(rep.next_seq, 4, "sequence numbers are never reused");
        let seqs: Vec<u64> = records(&log, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![0, 2, 3]);
        // Appends go on after the repaired segment, and a reopen finds it clean.
        log.append_wait(vec![9; 10]).await.unwrap();
        log.close();
        drop(log);
        let (log, rep) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        assert!(
            rep.quarantined.is_empty() && rep.lost.is_empty() && rep.truncated_bytes == 0,
            "{rep:?}"
        );
        let seqs: Vec<u64> = records(&log, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![0, 2, 3, 4]);
    }

    // Reproducer for #12 (item 7): pages written back out of order before a power cut leave
    // a bad frame followed by valid ones at the tail of the newest segment. That was classed
    // as corruption and the whole segment quarantined (nothing replayed); every frame whose
    // checksum holds is now kept.
    #[tokio::test]
    async fn out_of_order_writeback_keeps_every_valid_frame() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
            for i in 0..5u8 {
                log.append_wait(vec![i; 100]).await.unwrap();
            }
        }
        let seg = list_segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&seg).unwrap();
        let frame = HEADER + 100;
        // Frame 2 never reached the disk (zeros); frames 3 and 4 did.
        bytes[2 * frame..3 * frame].fill(0);
        std::fs::write(&seg, &bytes).unwrap();
        let (log, rep) = IngestLog::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(rep.lost, vec![(2, 2)]);
        assert_eq!(rep.next_seq, 5);
        let got = records(&log, 0);
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        assert!(got.iter().all(|(s, p)| p == &vec![*s as u8; 100]), "payloads intact");
    }

    // A bad tail in an older segment (it was synced before the next one started, so this is
    // damage, not a torn write): its valid frames are kept, the lost ones reported up to the
    // next segment's first sequence.
    #[tokio::test]
    async fn a_damaged_older_segment_keeps_its_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = IngestLog::open(dir.path(), 300, true).unwrap();
            for i in 0..9u8 {
                log.append_wait(vec![i; 100]).await.unwrap();
            }
        }
        let segs = list_segments(dir.path()).unwrap();
        assert!(segs.len() >= 3, "{segs:?}");
        let (first, seg) = segs[0].clone();
        let next_first = segs[1].0;
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        let (log, rep) = IngestLog::open(dir.path(), 300, true).unwrap();
        assert_eq!(rep.truncated_bytes, 0);
        assert_eq!(rep.lost, vec![(next_first - 1, next_first - 1)]);
        let seqs: Vec<u64> = records(&log, first).iter().map(|(s, _)| *s).collect();
        let want: Vec<u64> = (0..9).filter(|s| *s != next_first - 1).collect();
        assert_eq!(seqs, want);
    }
}
