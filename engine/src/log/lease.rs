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
//! (`lease.ttl`, default 30 s) with `If-Match` on its last ETag. A lease not renewed for a TTL
//! (its holder died) is taken over with `If-Match` on the stale ETag, so of two contenders one
//! wins. A holder whose renewal is refused (someone took it over) or that could not renew for
//! a whole TTL has lost the lease: its [`Fence`] then fails the next commit. Staleness is judged
//! both by the object's Last-Modified against this machine's clock and by watching its ETag not
//! change for a TTL on a monotonic clock, so a skewed clock delays a takeover but never makes a
//! live lease look dead for longer than the skew. Single-writer mode has no lease (it has no
//! atomic create to build one on).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::durability;
use crate::error::{EngineError, Result};
use crate::log::store::TableStore;

/// Set when a writer lost its lease; commits check it first.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<AtomicBool>);

impl Fence {
    /// Fails when the lease this fence belongs to was lost.
    pub fn check(&self, writer: &str) -> Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(EngineError::config(
                format!(
                    "writer {writer} lost its lease on the table (another process took it over, or renewals failed for a whole lease.ttl); it stops before committing"
                ),
                Some("restart it once the other writer is gone; check the store's availability".to_string()),
            ));
        }
        Ok(())
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
    renewer: tokio::task::JoinHandle<()>,
    holder: String,
    table: TableStore,
    path: Path,
}

impl WriterLease {
    /// Takes the lease of `writer` on `table`. On an object store a lease that is held but
    /// may belong to a dead process is waited for, up to one `lease.ttl`; a live holder's
    /// lease is an error naming it.
    pub async fn acquire(table: &TableStore, writer: &str) -> Result<Self> {
        Self::take(table, writer, true).await
    }

    /// Takes the lease of `writer` on `table` only if it is free now (a maintenance job asking
    /// whether a writer runs).
    pub async fn acquire_now(table: &TableStore, writer: &str) -> Result<Self> {
        Self::take(table, writer, false).await
    }

    /// The fence that fails commits once this lease is lost.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    async fn take(table: &TableStore, writer: &str, wait: bool) -> Result<Self> {
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
        let (path, etag) = take_remote(table, writer, &holder, wait).await?;
        let fence = Fence::default();
        let renewer = tokio::spawn(renew(
            table.clone(),
            path.clone(),
            holder.clone(),
            Some(etag),
            fence.clone(),
        ));
        Ok(WriterLease {
            _file: None,
            remote: Some(RemoteLease {
                renewer,
                holder,
                table: table.clone(),
                path,
            }),
            fence,
        })
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

    /// Releases the lease now (an object-store lease is deleted when still ours).
    pub async fn release(mut self) {
        if let Some(r) = self.remote.take() {
            r.renewer.abort();
            if !self.fence.0.load(Ordering::SeqCst) {
                delete_if_ours(&r.table, &r.path, &r.holder).await;
            }
        }
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        if let Some(r) = self.remote.take() {
            r.renewer.abort();
            if !self.fence.0.load(Ordering::SeqCst)
                && let Ok(handle) = tokio::runtime::Handle::try_current()
            {
                handle.spawn(async move { delete_if_ours(&r.table, &r.path, &r.holder).await });
            }
        }
    }
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

fn body(holder: &str, ttl: Duration) -> PutPayload {
    let v = serde_json::json!({ "holder": holder, "ttl_ms": ttl.as_millis() as u64 });
    PutPayload::from(v.to_string())
}

/// The lease object's holder and metadata, if it exists.
async fn read_lease(table: &TableStore, path: &Path) -> object_store::Result<Option<(String, ObjectMeta)>> {
    match table.store.get(path).await {
        Ok(r) => {
            let meta = r.meta.clone();
            let body = r.bytes().await?;
            let holder = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["holder"].as_str().map(str::to_string))
                .unwrap_or_default();
            Ok(Some((holder, meta)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates or takes over the lease object; returns its path and our ETag. A lost answer
/// (the write happened, its reply did not arrive) is recognised by the holder id in the body.
async fn take_remote(table: &TableStore, writer: &str, holder: &str, wait: bool) -> Result<(Path, String)> {
    let path = table.path(&format!("_sluice/lock/{writer}.json"));
    let ttl = table.settings.lease_ttl;
    let deadline = Instant::now() + ttl + ttl / 3;
    let pause = (ttl / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // The ETag last seen on the lease, and since when (monotonic).
    let mut seen: Option<(Option<String>, Instant)> = None;
    let mut failures = 0u32;
    loop {
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let created = table.store.put_opts(&path, body(holder, ttl), create).await;
        match created {
            Ok(r) => return Ok((path, r.e_tag.unwrap_or_default())),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
            Err(e) => {
                failures += 1;
                if failures >= crate::retry::DEFAULT_RETRY_ATTEMPTS || Instant::now() >= deadline {
                    return Err(EngineError::store(format!("creating the lease {path}"))(e));
                }
                tracing::warn!(lease = %path, error = %e, "could not write the writer lease; retrying");
                // Back-off before retrying a failed write to the store.
                tokio::time::sleep(pause).await;
            }
        }
        let (current, meta) = match read_lease(table, &path).await {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                failures += 1;
                if failures >= crate::retry::DEFAULT_RETRY_ATTEMPTS {
                    return Err(EngineError::store(format!("reading the lease {path}"))(e));
                }
                // Back-off before retrying a failed read of the store.
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if current == holder {
            // Our own write got through; its answer was lost.
            return Ok((path, meta.e_tag.unwrap_or_default()));
        }
        let since = match &seen {
            Some((e, t)) if *e == meta.e_tag => *t,
            _ => {
                seen = Some((meta.e_tag.clone(), Instant::now()));
                Instant::now()
            }
        };
        let age = chrono::Utc::now()
            .signed_duration_since(meta.last_modified)
            .to_std()
            .unwrap_or_default();
        if age > ttl || since.elapsed() > ttl {
            let update = PutOptions {
                mode: PutMode::Update(UpdateVersion {
                    e_tag: meta.e_tag.clone(),
                    version: meta.version.clone(),
                }),
                ..Default::default()
            };
            match table.store.put_opts(&path, body(holder, ttl), update).await {
                Ok(r) => {
                    tracing::warn!(lease = %path, age_s = age.as_secs(), "took over a writer lease its holder stopped renewing");
                    return Ok((path, r.e_tag.unwrap_or_default()));
                }
                // Lost the race, or our own takeover's answer was lost: the next read tells.
                Err(_) => continue,
            }
        }
        if !wait || Instant::now() >= deadline {
            let who = format!("{path}, renewed {}s ago, lease.ttl {}s", age.as_secs(), ttl.as_secs());
            return Err(already_running(table, writer, &who));
        }
        // Waiting out a lease whose holder may be dead (bounded by the deadline above).
        tokio::time::sleep(pause).await;
    }
}

/// Renews the lease every third of its TTL until aborted; marks the fence on loss.
async fn renew(table: TableStore, path: Path, holder: String, mut etag: Option<String>, fence: Fence) {
    let ttl = table.settings.lease_ttl;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let update = PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: etag.clone(),
                version: None,
            }),
            ..Default::default()
        };
        let result = match table.store.put_opts(&path, body(&holder, ttl), update).await {
            Ok(r) => Ok(r.e_tag),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {
                // Ours still, when an earlier renewal got through with its answer lost.
                match read_lease(&table, &path).await {
                    Ok(Some((h, meta))) if h == holder => Ok(meta.e_tag),
                    Ok(_) => {
                        tracing::error!(lease = %path, "writer lease lost: another process took it over");
                        fence.0.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(tag) => {
                etag = tag;
                renewed = Instant::now();
            }
            Err(e) => {
                tracing::warn!(lease = %path, error = %e, "could not renew the writer lease; retrying");
                if renewed.elapsed() >= ttl {
                    tracing::error!(lease = %path, "writer lease lost: not renewed for a whole lease.ttl");
                    fence.0.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

async fn delete_if_ours(table: &TableStore, path: &Path, holder: &str) {
    if let Ok(Some((current, _))) = read_lease(table, path).await
        && current == holder
    {
        let _ = table.store.delete(path).await;
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::log::store::StoreSettings;

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

    #[tokio::test]
    async fn object_store_lease_is_exclusive_renewed_and_released() {
        let table = object_table(300);
        let lease = WriterLease::acquire_now(&table, "p").await.unwrap();
        let err = WriterLease::acquire_now(&table, "p").await.unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        // A live holder renews: a waiting contender gives up after one TTL and change.
        let err = WriterLease::acquire(&table, "p").await.unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        lease.fence().check("p").unwrap();
        lease.release().await;
        WriterLease::acquire_now(&table, "p").await.unwrap().release().await;
    }

    #[tokio::test]
    async fn a_dead_holders_lease_is_taken_over_and_fences_it() {
        let table = object_table(300);
        let first = WriterLease::acquire_now(&table, "p").await.unwrap();
        // The holder stops renewing (its process froze): the lease goes stale.
        first.remote.as_ref().unwrap().renewer.abort();
        let second = WriterLease::acquire(&table, "p").await.unwrap();
        // The frozen holder wakes up: its next renewal is refused and its fence fails.
        let fence = first.fence();
        let r = first.remote.as_ref().unwrap();
        let renewer = tokio::spawn(renew(
            r.table.clone(),
            r.path.clone(),
            r.holder.clone(),
            // Its last ETag is stale since the takeover, whatever it was.
            None,
            fence.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(5), renewer)
            .await
            .unwrap()
            .unwrap();
        assert!(fence.check("p").is_err());
        second.fence().check("p").unwrap();
    }
}
