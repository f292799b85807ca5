//! Writer leases: one writer per pipeline and sink. A second instance of a pipeline must not
//! run recovery on a table another instance writes (it would delete the staged files of the
//! running writer, and both would commit the same source positions).
//!
//! On local disk the lease is an exclusive OS lock (`flock`) on
//! `<sink>/_sluice/lock/<writer>.lock`, taken before recovery touches anything and held for
//! the life of the pipeline. The kernel releases it when the holder exits in any way (kill -9
//! included), so there is no expiry to tune and no stale lease to clean up. Not valid on
//! network filesystems without working `flock` (NFS before v4).
//!
//! On an object store the lease is the object `_sluice/lock/<writer>.json`, created with a
//! conditional PUT (`If-None-Match: *`) and renewed every third of its time to live
//! (`lease.ttl`, default 30 s) with `If-Match` on its last ETag. Every write of it carries the
//! holder's id and a renewal counter, so its ETag changes on each renewal (S3's ETag is the
//! MD5 of the body). A contender judges a lease stale only by watching it not change for a
//! whole TTL on its own monotonic clock (the larger of its TTL and the one the lease records),
//! never by comparing clocks; it then takes the lease over with `If-Match` on the stale ETag,
//! so of two contenders one wins. A holder's [`Fence`] is valid until one TTL after it *sent*
//! its last successful renewal (minus a tenth): a holder that cannot renew (or whose renewal is
//! refused because the lease was taken over) stops committing before anyone can take over.
//! Released leases are overwritten with `"released": true` (with `If-Match`, so never someone
//! else's) and are free to take at once. Single-writer mode has no lease (it has no atomic
//! create to build one on): there, maintenance never treats another writer as stopped.
//!
//! A commit-entry or staging write is abandoned (no further attempt, no client retry) when its
//! writer's fence expires, and a holder that took over a lease its previous holder stopped
//! renewing waits one more TTL, renewing, before it returns (and so before recovery removes
//! staged files no entry names, and before it stages anything): an entry the previous holder
//! sent in time has landed by then, and recovery sees it and moves its files into place.
//! Maintenance jobs that take a dead writer's lease wait the same. Residual risk: a request
//! sent before the fence expired that the store applies more than about a TTL later; keep
//! `lease.ttl` well above the store's request timeouts.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::durability;
use crate::error::{EngineError, Result};
use crate::store::TableStore;

#[derive(Debug, Default)]
struct FenceState {
    lost: AtomicBool,
    /// None: no deadline (an OS lock, or no lease at all).
    valid_until: Mutex<Option<Instant>>,
}

/// Whether a writer still holds its lease; commits check it first.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<FenceState>);

impl Fence {
    fn until(t: Instant) -> Fence {
        let f = Fence::default();
        f.extend(t);
        f
    }

    fn extend(&self, t: Instant) {
        if let Ok(mut v) = self.0.valid_until.lock() {
            *v = Some(v.map_or(t, |old| old.max(t)));
        }
    }

    fn lose(&self) {
        self.0.lost.store(true, Ordering::SeqCst);
    }

    fn expired(&self) -> bool {
        self.remaining().is_some_and(|left| left.is_zero())
    }

    /// How long the fence stays valid without another renewal (`None`: no deadline; zero once
    /// lost or expired).
    pub fn remaining(&self) -> Option<Duration> {
        if self.0.lost.load(Ordering::SeqCst) {
            return Some(Duration::ZERO);
        }
        match self.0.valid_until.lock() {
            Ok(v) => v.map(|t| t.saturating_duration_since(Instant::now())),
            Err(_) => Some(Duration::ZERO),
        }
    }

    /// Fails when the lease this fence belongs to was lost or could not be renewed in time.
    pub fn check(&self, writer: &str) -> Result<()> {
        if self.expired() {
            return Err(crate::error::CommitError::Fenced {
                writer: writer.to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// Runs `write` (a put, a move, a delete) only while the fence holds: it is checked first,
    /// and the write is abandoned (not retried) if the fence expires before it answers, so a
    /// stalled process never changes the table after another took its lease over.
    pub async fn guard<T>(&self, writer: &str, write: impl Future<Output = Result<T>>) -> Result<T> {
        let mut write = std::pin::pin!(write);
        loop {
            self.check(writer)?;
            let Some(left) = self.remaining() else { return write.await };
            if let Ok(r) = tokio::time::timeout(left, &mut write).await {
                return r;
            }
        }
    }
}

/// A held writer lease; dropping it releases it.
#[derive(Debug)]
pub struct WriterLease {
    _file: Option<File>,
    remote: Option<RemoteLease>,
    fence: Fence,
}

#[derive(Debug)]
struct RemoteLease {
    renewer: tokio::task::JoinHandle<Loss>,
    holder: String,
    table: TableStore,
    path: Path,
}

/// How a contender treats a lease another holder has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Wait (up to one and a half TTL) to see whether it is renewed.
    Yes,
    /// Wait only when it looks dead (not written for two TTLs by the store's clock).
    IfLooksDead,
}

/// Why a renewer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Another holder wrote the lease.
    TakenOver,
    /// No renewal succeeded before the fence's deadline.
    Expired,
}

/// The body of a lease object.
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    holder: String,
    /// Counts the holder's writes, so each changes the ETag.
    renewal: u64,
    ttl_ms: u64,
    #[serde(default)]
    released: bool,
}

impl WriterLease {
    /// Takes the lease of `writer` on `table`. On an object store a lease that another process
    /// holds is watched for up to one and a half `lease.ttl`: taken over if it was not renewed
    /// for a whole TTL (its holder died), else an error naming it.
    pub async fn acquire(table: &TableStore, writer: &str) -> Result<Self> {
        Self::take(table, writer, Wait::Yes).await
    }

    /// Takes the lease of `writer` on `table` when no live process holds it (a maintenance
    /// job asking whether a writer runs): a held lease is watched only when it looks dead. In
    /// single-writer mode (no leases) a writer always counts as running.
    pub async fn acquire_if_stopped(table: &TableStore, writer: &str) -> Result<Self> {
        if table.local_dir.is_none() && table.single_writer() {
            return Err(EngineError::config(
                format!(
                    "single-writer mode: writer {writer} on {} may be running",
                    table.location
                ),
                None::<String>,
            ));
        }
        Self::take(table, writer, Wait::IfLooksDead).await
    }

    /// The fence that fails commits once this lease is lost.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    async fn take(table: &TableStore, writer: &str, wait: Wait) -> Result<Self> {
        if let Some(dir) = &table.local_dir {
            return Self::take_local(table, dir, writer);
        }
        if table.single_writer() {
            return Ok(WriterLease {
                _file: None,
                remote: None,
                fence: Fence::default(),
            });
        }
        table.check_atomic_create().await?;
        let holder = holder_id();
        let ttl = table.settings.lease_ttl;
        let (path, etag, sent, took_over) = take_remote(table, writer, &holder, wait).await?;
        let fence = Fence::until(valid_until(sent, ttl));
        let renewer = tokio::spawn(renew(table.clone(), path.clone(), holder.clone(), etag, fence.clone()));
        let lease = WriterLease {
            _file: None,
            remote: Some(RemoteLease {
                renewer,
                holder,
                table: table.clone(),
                path,
            }),
            fence,
        };
        if took_over {
            // The previous holder's last commit-entry or staging write may still be in flight:
            // it was sent before its fence expired and is abandoned when the fence does (see
            // `CommitLog::fenced`), so after one more TTL it has landed or never will.
            // Recovery (which removes staged files no entry names) waits for that, renewing.
            tokio::time::sleep(ttl).await;
            lease.fence.check(writer)?;
        }
        Ok(lease)
    }

    fn take_local(table: &TableStore, dir: &std::path::Path, writer: &str) -> Result<Self> {
        let lock_dir = dir.join("_sluice").join("lock");
        durability::create_dir_all(&lock_dir).map_err(EngineError::io(format!("creating {}", lock_dir.display())))?;
        let path = lock_dir.join(format!("{writer}.lock"));
        match durability::lock_file(&path).map_err(EngineError::io(format!("locking {}", path.display())))? {
            Some(file) => Ok(WriterLease {
                _file: Some(file),
                remote: None,
                fence: Fence::default(),
            }),
            None => Err(already_running(table, writer, &path.display().to_string())),
        }
    }

    /// Releases the lease now (an object-store lease is marked released when still ours).
    pub async fn release(mut self) {
        // Whatever still holds the fence (a task that outlived its owner) writes no more.
        self.fence.lose();
        if let Some(r) = self.remote.take() {
            r.renewer.abort();
            release_if_ours(&r.table, &r.path, &r.holder).await;
        }
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        self.fence.lose();
        if let Some(r) = self.remote.take() {
            r.renewer.abort();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { release_if_ours(&r.table, &r.path, &r.holder).await });
            }
        }
    }
}

/// Until when a lease renewed by a write sent at `sent` is surely still ours: a contender
/// takes over only after seeing it unchanged for a whole TTL, which starts no earlier.
fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 10
}

fn already_running(table: &TableStore, writer: &str, holder: &str) -> EngineError {
    EngineError::config(
        format!(
            "pipeline {writer} on {} is already running in another process (it holds {holder})",
            table.location
        ),
        Some(
            "stop the other instance first; two writers of one pipeline would damage each other's commits".to_string(),
        ),
    )
}

fn holder_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    format!("{host}/{}/{nanos}", std::process::id())
}

fn body(holder: &str, renewal: u64, ttl: Duration, released: bool) -> PutPayload {
    let b = Body {
        holder: holder.to_string(),
        renewal,
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        released,
    };
    PutPayload::from(serde_json::to_vec(&b).unwrap_or_default())
}

fn update(etag: Option<String>) -> PutOptions {
    PutOptions {
        mode: PutMode::Update(UpdateVersion {
            e_tag: etag,
            version: None,
        }),
        ..Default::default()
    }
}

/// The lease object's body and metadata, if it exists (an unreadable body counts as a live
/// lease of an unknown holder).
async fn read_lease(table: &TableStore, path: &Path) -> object_store::Result<Option<(Body, ObjectMeta)>> {
    match table.store.get(path).await {
        Ok(r) => {
            let meta = r.meta.clone();
            let bytes = r.bytes().await?;
            let body = serde_json::from_slice::<Body>(&bytes).unwrap_or(Body {
                holder: String::new(),
                renewal: 0,
                ttl_ms: 0,
                released: false,
            });
            Ok(Some((body, meta)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates or takes over the lease object; returns its path, our ETag, when the winning
/// write was sent, and whether it took over a lease another holder stopped renewing. A lost
/// answer (the write happened, its reply did not arrive) is recognised by the holder id in the
/// body.
async fn take_remote(
    table: &TableStore,
    writer: &str,
    holder: &str,
    wait: Wait,
) -> Result<(Path, Option<String>, Instant, bool)> {
    let path = table.path(&format!("_sluice/lock/{writer}.json"));
    let ttl = table.settings.lease_ttl;
    let pause = (ttl / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // The ETag last seen on the lease, and since when (monotonic); the watch's deadline.
    let mut seen: Option<(Option<String>, Instant)> = None;
    let mut deadline: Option<Instant> = None;
    let mut failures = 0u32;
    let mut fail = |e: object_store::Error, what: &str| -> Result<()> {
        failures += 1;
        if failures >= crate::retry::DEFAULT_RETRY_ATTEMPTS {
            return Err(EngineError::store(format!("{what} {path}"))(e));
        }
        tracing::warn!(lease = %path, error = %e, "{what}: retrying");
        Ok(())
    };
    // When our earliest write that may have landed was sent (reset on seeing another holder's
    // body: then none of them did). A lost answer's lease dates from then, conservatively.
    let mut first_write: Option<Instant> = None;
    // Whether we tried to take over a lease another holder stopped renewing.
    let mut took_over = false;
    loop {
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let sent = Instant::now();
        first_write.get_or_insert(sent);
        match table.store.put_opts(&path, body(holder, 0, ttl, false), create).await {
            Ok(r) => return Ok((path, r.e_tag, sent, false)),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
            Err(e) => {
                fail(e, "creating the writer lease")?;
                // Back-off before retrying a failed write to the store.
                tokio::time::sleep(pause).await;
            }
        }
        let (current, meta) = match read_lease(table, &path).await {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                fail(e, "reading the writer lease")?;
                // Back-off before retrying a failed read of the store.
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if current.holder == holder {
            // Our own write got through; its answer was lost (a takeover's, when it replaced
            // another holder's body: waiting out the grace then is the safe side).
            return Ok((path, meta.e_tag, first_write.unwrap_or_else(Instant::now), took_over));
        }
        first_write = None;
        let ttl_eff = ttl.max(Duration::from_millis(current.ttl_ms));
        let since = match &seen {
            Some((e, t)) if *e == meta.e_tag => *t,
            _ => {
                let now = Instant::now();
                if seen.is_none() && wait == Wait::IfLooksDead && !current.released {
                    // Only a lease not written for two TTLs by the store's clock is worth
                    // watching; the takeover itself never trusts clocks.
                    let age = chrono::Utc::now()
                        .signed_duration_since(meta.last_modified)
                        .to_std()
                        .unwrap_or_default();
                    if age < 2 * ttl_eff {
                        return Err(already_running(table, writer, &path.to_string()));
                    }
                }
                seen = Some((meta.e_tag.clone(), now));
                now
            }
        };
        let end = *deadline.get_or_insert(since + ttl_eff + ttl_eff / 2);
        if current.released || since.elapsed() > ttl_eff {
            let sent = Instant::now();
            first_write.get_or_insert(sent);
            took_over |= !current.released;
            match table
                .store
                .put_opts(&path, body(holder, 0, ttl, false), update(meta.e_tag.clone()))
                .await
            {
                Ok(r) => {
                    if !current.released {
                        tracing::warn!(lease = %path, "took over a writer lease its holder stopped renewing");
                    }
                    return Ok((path, r.e_tag, sent, took_over));
                }
                // Lost the race, or our own takeover's answer was lost: the next read tells.
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::NotFound { .. },
                ) => continue,
                Err(e) => {
                    fail(e, "taking over the writer lease")?;
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
        }
        if Instant::now() >= end {
            let who = format!("{path}, renewed within lease.ttl {}s", ttl_eff.as_secs());
            return Err(already_running(table, writer, &who));
        }
        // Watching a lease whose holder may be dead (bounded by the deadline above).
        tokio::time::sleep(pause).await;
    }
}

/// Renews the lease every third of its TTL until aborted; extends the fence on each success
/// and marks it lost when the lease was taken over or could not be renewed in time.
async fn renew(table: TableStore, path: Path, holder: String, mut etag: Option<String>, fence: Fence) -> Loss {
    let ttl = table.settings.lease_ttl;
    let mut renewal = 0u64;
    loop {
        tokio::time::sleep(ttl / 3).await;
        renewal += 1;
        let sent = Instant::now();
        let result = match table
            .store
            .put_opts(&path, body(&holder, renewal, ttl, false), update(etag.clone()))
            .await
        {
            Ok(r) => Ok(r.e_tag),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {
                // Ours still, when an earlier renewal got through with its answer lost.
                match read_lease(&table, &path).await {
                    Ok(Some((b, meta))) if b.holder == holder && !b.released => {
                        etag = meta.e_tag;
                        if b.renewal == renewal {
                            fence.extend(valid_until(sent, ttl));
                        }
                        continue;
                    }
                    Ok(_) => {
                        tracing::error!(lease = %path, "writer lease lost: another process took it over");
                        fence.lose();
                        return Loss::TakenOver;
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(tag) => {
                etag = tag;
                fence.extend(valid_until(sent, ttl));
            }
            Err(e) => {
                tracing::warn!(lease = %path, error = %e, "could not renew the writer lease; retrying");
                if fence.expired() {
                    tracing::error!(lease = %path, "writer lease lost: not renewed within lease.ttl");
                    fence.lose();
                    return Loss::Expired;
                }
            }
        }
    }
}

/// Marks the lease released, with `If-Match` on its current version when it is still ours
/// (never someone else's).
async fn release_if_ours(table: &TableStore, path: &Path, holder: &str) {
    if let Ok(Some((b, meta))) = read_lease(table, path).await
        && b.holder == holder
        && !b.released
    {
        let _ = table
            .store
            .put_opts(
                path,
                body(holder, b.renewal + 1, table.settings.lease_ttl, true),
                update(meta.e_tag),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::store::StoreSettings;

    #[tokio::test]
    async fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableStore::open(dir.path().to_str().unwrap()).unwrap();
        let lease = WriterLease::acquire(&table, "p").await.unwrap();
        let err = WriterLease::acquire(&table, "p").await.unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        // Another pipeline on the same table is another writer.
        let _other = WriterLease::acquire(&table, "q").await.unwrap();
        drop(lease);
        WriterLease::acquire(&table, "p").await.unwrap();
    }

    fn object_table(ttl_ms: u64) -> TableStore {
        TableStore::from_store(Arc::new(InMemory::new()), Path::from("t"), "memory://t").with_settings(StoreSettings {
            lease_ttl: Duration::from_millis(ttl_ms),
            ..Default::default()
        })
    }

    async fn body_of(table: &TableStore, writer: &str) -> Body {
        read_lease(table, &table.path(&format!("_sluice/lock/{writer}.json")))
            .await
            .unwrap()
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn object_store_lease_is_exclusive_renewed_and_released() {
        let table = object_table(400);
        let lease = WriterLease::acquire(&table, "p").await.unwrap();
        // A maintenance job asking whether the writer runs: it does (renewed just now).
        let err = WriterLease::acquire_if_stopped(&table, "p")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("already running"), "{err}");
        // A live holder renews (the body, hence the ETag, changes every time): a contender
        // watching it gives up after one and a half TTL.
        let err = WriterLease::acquire(&table, "p").await.unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        assert!(body_of(&table, "p").await.renewal > 0, "renewed");
        lease.fence().check("p").unwrap();
        lease.release().await;
        assert!(body_of(&table, "p").await.released);
        // A released lease is free at once.
        WriterLease::acquire_if_stopped(&table, "p")
            .await
            .unwrap()
            .release()
            .await;
    }

    #[tokio::test]
    async fn a_dead_holders_lease_is_taken_over_and_fences_it() {
        let table = object_table(400);
        let ttl = table.settings.lease_ttl;
        // A holder that froze right after taking the lease: nothing renews it.
        let (path, etag, sent, _) = take_remote(&table, "p", "frozen", Wait::Yes).await.unwrap();
        let frozen = Fence::until(valid_until(sent, ttl));
        frozen.check("p").unwrap();
        let second = WriterLease::acquire(&table, "p").await.unwrap();
        // By the time anyone could take over, the frozen holder's fence had expired.
        assert!(
            frozen.check("p").is_err(),
            "the old holder's fence expires before a takeover"
        );
        // It wakes up: its renewal is refused and it learns the lease was taken over.
        let loss = tokio::time::timeout(
            Duration::from_secs(5),
            renew(table.clone(), path, "frozen".into(), etag, frozen.clone()),
        )
        .await
        .unwrap();
        assert_eq!(loss, Loss::TakenOver);
        second.fence().check("p").unwrap();
        assert_ne!(body_of(&table, "p").await.holder, "frozen");
    }

    #[tokio::test]
    async fn single_writer_mode_never_counts_a_writer_stopped() {
        let mut s = StoreSettings::default();
        s.s3.insert("conditional_put".into(), "disabled".into());
        let table = object_table(400).with_settings(s);
        WriterLease::acquire(&table, "p").await.unwrap();
        assert!(WriterLease::acquire_if_stopped(&table, "p").await.is_err());
    }

    /// A holder frozen after staging an epoch: its commit entry, sent before its fence
    /// expired, lands after another process took the lease over. The new holder returns from
    /// the takeover only a TTL later, so the recovery that follows sees the entry and moves its
    /// file into place instead of removing it as an orphan.
    #[tokio::test]
    async fn a_late_entry_of_the_previous_holder_is_recovered_not_orphaned() {
        use crate::log::commit::{CommitEntry, CommitLog};
        let table = object_table(400);
        let (path, _, sent, _) = take_remote(&table, "p", "frozen", Wait::Yes).await.unwrap();
        let frozen = Fence::until(valid_until(sent, table.settings.lease_ttl));
        let old = CommitLog::new(table.clone(), "p").with_fence(frozen);
        old.stage("d/f-1.parquet", b"x".to_vec()).await.unwrap();
        // It freezes: nothing renews its lease. Another process takes the lease over and
        // recovers, as a server start does.
        let next = tokio::spawn({
            let table = table.clone();
            async move {
                let lease = WriterLease::acquire(&table, "p").await?;
                CommitLog::new(table.clone(), "p").with_fence(lease.fence()).recover().await?;
                Ok::<_, EngineError>(lease)
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_lease(&table, &path).await.unwrap().is_some_and(|(b, _)| b.holder == "frozen") {
            assert!(Instant::now() < deadline, "no takeover");
            // Polling a condition, with the deadline above.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The frozen holder's entry arrives now.
        let entry = CommitEntry::adding(1, "p", &["d/f-1.parquet"]);
        let at = table.log_dir().join(format!("{:020}.json", 1));
        table.store.put(&at, serde_json::to_vec(&entry).unwrap().into()).await.unwrap();
        let _lease = next.await.unwrap().unwrap();
        assert!(
            table.store.head(&table.path("d/f-1.parquet")).await.is_ok(),
            "the committed file is in place, not removed as an orphan"
        );
    }
}
