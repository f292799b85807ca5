//! The idempotency window of an HTTP source: the `X-Request-Id`s of logged requests (with
//! their ingest-log sequence) and of requests being written, so a retried request is never
//! appended twice.
//!
//! Bounded by count ([`DEDUP_WINDOW`]) and by bytes ([`DEDUP_WINDOW_BYTES`]) of the ids it
//! remembers; the oldest ids go first, in O(1). A forgotten id (a request refused with 429/503
//! and never logged) gives its count and bytes back at once: it no longer pushes a logged id
//! out. Its queue slot is dropped at once when it is the newest (a claim then a refusal, the
//! usual case), else it is left stale and skipped when it reaches the front; stale slots are
//! swept in one pass when they hold more than half of the remembered bytes (plus 1 MiB), so
//! they never hold more than that. One allocation per id, shared by the map and the queue.
//!
//! What it holds across restarts: the ids of every request still in the ingest log, and the ids
//! of deleted segments as of their deletion — before segments are deleted, the window is
//! written to `dedup.snapshot` in the log's directory (atomically, synced), and it is loaded on
//! start before the log is read. A retry of a request older than the window is appended again.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use sluice_engine::durability;
use sluice_engine::{EngineError, Result};

/// Most request ids remembered.
pub const DEDUP_WINDOW: usize = 1_000_000;
/// Most bytes the window may take (ids plus per-id bookkeeping, estimated).
pub const DEDUP_WINDOW_BYTES: usize = 128 << 20;
/// Estimated bytes of bookkeeping per id besides its text (map and queue slots, the shared
/// allocation's counters).
const PER_ID_OVERHEAD: usize = 96;
/// The snapshot's file name in the ingest log's directory.
pub const SNAPSHOT_FILE: &str = "dedup.snapshot";

/// The window's key of a request: its `X-Request-Id`, scoped by its sender when there is one
/// (a unit separator, which no header value holds, between them), so that one producer cannot
/// make another's request look like a duplicate. Anonymous requests keep the bare id (the keys
/// windows held before senders were recorded).
pub fn dedup_key(principal: Option<&str>, request_id: &str) -> String {
    match principal {
        None => request_id.to_string(),
        Some(p) => format!("{p}\u{1f}{request_id}"),
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// `Some(seq)` once logged, `None` while being written.
    seq: Option<u64>,
    /// Which queue slot owns this entry.
    slot: u64,
}

/// Request ids, oldest first, bounded.
#[derive(Debug, Default)]
pub struct DedupWindow {
    map: HashMap<Arc<str>, Seen>,
    queue: VecDeque<(Arc<str>, u64)>,
    next_slot: u64,
    /// Bytes of the remembered ids.
    bytes: usize,
    /// Bytes of stale queue slots (ids forgotten since they were queued).
    stale_bytes: usize,
}

/// Bytes one remembered id is charged.
fn cost(id: &str) -> usize {
    id.len() + PER_ID_OVERHEAD
}

impl DedupWindow {
    /// `Some(Some(seq))` when `id` is logged, `Some(None)` while it is being written.
    pub fn get(&self, id: &str) -> Option<Option<u64>> {
        self.map.get(id).map(|s| s.seq)
    }

    /// Records `id` as logged at `seq` (or as being written, `None`).
    pub fn remember(&mut self, id: &str, seq: Option<u64>) {
        if let Some(s) = self.map.get_mut(id) {
            s.seq = seq;
            return;
        }
        let id: Arc<str> = Arc::from(id);
        let slot = self.next_slot;
        self.next_slot += 1;
        self.bytes += cost(&id);
        self.map.insert(id.clone(), Seen { seq, slot });
        self.queue.push_back((id, slot));
        while self.map.len() > DEDUP_WINDOW || self.bytes > DEDUP_WINDOW_BYTES {
            let Some((old, slot)) = self.queue.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|s| s.slot == slot) {
                self.map.remove(&old);
                self.bytes -= cost(&old);
            } else {
                self.stale_bytes -= cost(&old);
            }
        }
    }

    /// Forgets `id` (a request that was not logged): its count and bytes are free at once.
    pub fn forget(&mut self, id: &str) {
        let Some(seen) = self.map.remove(id) else {
            return;
        };
        self.bytes -= cost(id);
        if self.queue.back().is_some_and(|(_, slot)| *slot == seen.slot) {
            self.queue.pop_back();
            return;
        }
        self.stale_bytes += cost(id);
        if self.stale_bytes > self.bytes / 2 + (1 << 20) {
            let map = &self.map;
            self.queue
                .retain(|(id, slot)| map.get(id).is_some_and(|s| s.slot == *slot));
            self.stale_bytes = 0;
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes the window takes (estimated): remembered ids and stale queue slots.
    pub fn bytes(&self) -> usize {
        self.bytes + self.stale_bytes
    }

    /// Queue slots held (remembered ids and stale slots).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.queue.len()
    }

    /// The logged ids, oldest first, as snapshot text (`seq<TAB>id` lines).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes / 2);
        for (id, slot) in &self.queue {
            if let Some(Seen {
                seq: Some(seq),
                slot: s,
            }) = self.map.get(id)
                && s == slot
            {
                out.extend_from_slice(format!("{seq}\t{id}\n").as_bytes());
            }
        }
        out
    }

    /// Loads the snapshot in `dir`, if any (ids requests were logged with, oldest first).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(SNAPSHOT_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(EngineError::io(format!("reading {}", path.display()))(e)),
        };
        for line in text.split(|b| *b == b'\n') {
            let Some(tab) = line.iter().position(|b| *b == b'\t') else {
                continue;
            };
            let seq = std::str::from_utf8(&line[..tab]).ok().and_then(|s| s.parse().ok());
            if let (Some(seq), Ok(id)) = (seq, std::str::from_utf8(&line[tab + 1..])) {
                self.remember(id, Some(seq));
            }
        }
        Ok(())
    }
}

/// Writes a [`DedupWindow::snapshot`] to `dir` durably (before ingest-log segments are
/// deleted).
pub fn write_snapshot(dir: &Path, snapshot: &[u8]) -> Result<()> {
    let path = dir.join(SNAPSHOT_FILE);
    durability::write_atomic(&path, snapshot).map_err(EngineError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_first_and_forgetting_is_cheap() {
        let mut w = DedupWindow::default();
        for i in 0..(DEDUP_WINDOW + 10) {
            w.remember(&format!("r{i}"), Some(i as u64));
        }
        assert_eq!(w.len(), DEDUP_WINDOW);
        assert_eq!(w.get("r0"), None, "the oldest went first");
        assert_eq!(
            w.get(&format!("r{}", DEDUP_WINDOW + 9)),
            Some(Some((DEDUP_WINDOW + 9) as u64))
        );
        // Forgetting is O(1); the stale slot does not evict a later entry of the same id.
        w.forget("r20");
        w.remember("r20", None);
        assert_eq!(w.get("r20"), Some(None));
        for i in 0..30 {
            w.remember(&format!("s{i}"), Some(0));
        }
        assert_eq!(
            w.get("r20"),
            Some(None),
            "the new r20 stays while the stale slot is evicted"
        );
    }

    /// A million requests refused after their claim (429/503 through an overload), interleaved
    /// with logged ones, push no logged id out: every logged id is kept, and the stale slots
    /// the refusals leave stay bounded.
    #[test]
    fn forgotten_ids_give_back_their_slot_and_bytes() {
        let mut w = DedupWindow::default();
        let logged = 1000u64;
        for i in 0..logged {
            w.remember(&format!("logged-{i}"), Some(i));
        }
        for i in 0..1_000_000u64 {
            // Two requests in flight at once: the older one is refused while the newer one is
            // still being written, so its slot is not the newest (a stale slot).
            let (a, b) = (format!("retry-{i}-a"), format!("retry-{i}-b"));
            w.remember(&a, None);
            w.remember(&b, None);
            w.forget(&a);
            w.forget(&b);
        }
        assert_eq!(w.len(), logged as usize, "only the logged ids are remembered");
        for i in 0..logged {
            assert_eq!(w.get(&format!("logged-{i}")), Some(Some(i)), "logged-{i} was pushed out");
        }
        assert!(
            w.bytes() < 2 * (1 << 20) + 2 * logged as usize * 128,
            "stale slots are swept: {} bytes",
            w.bytes()
        );
        assert!(w.slots() < 30_000, "stale slots are swept: {} slots", w.slots());
        // Forgetting the newest slot drops it at once.
        let before = w.slots();
        w.remember("x", None);
        w.forget("x");
        assert_eq!(w.slots(), before);
    }

    #[test]
    fn bounded_by_bytes() {
        let mut w = DedupWindow::default();
        let big = "x".repeat(1 << 20);
        for i in 0..200 {
            w.remember(&format!("{i}{big}"), Some(i));
        }
        assert!(w.bytes() <= DEDUP_WINDOW_BYTES);
        assert!(w.len() < 200);
    }

    #[test]
    fn snapshot_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DedupWindow::default();
        w.remember("a", Some(1));
        w.remember("b\twith tab", Some(2));
        w.remember("pending", None);
        write_snapshot(dir.path(), &w.snapshot()).unwrap();
        let mut r = DedupWindow::default();
        r.load(dir.path()).unwrap();
        assert_eq!(r.get("a"), Some(Some(1)));
        assert_eq!(r.get("b\twith tab"), Some(Some(2)));
        assert_eq!(r.get("pending"), None, "requests not logged are not persisted");
    }
}
