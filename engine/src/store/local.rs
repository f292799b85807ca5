//! A local-disk object store whose writes are durable when they return.
//!
//! object_store's `LocalFileSystem` never syncs: after a power cut a file it wrote (a staged
//! Parquet file, a commit entry) can come back empty or vanish, and a rename can be undone.
//! [`DurableLocalStore`] reads and lists through `LocalFileSystem` and replaces every write:
//!
//! - `put`: write a temporary file beside the target, sync it, then rename (overwrite) or
//!   hard-link (create-if-absent) it into place, sync the directory. A target is never seen
//!   with partial content, so a commit entry is whole or absent after any cut.
//! - `rename`: rename, then sync the target's directory and the source's.
//! - `delete`: remove, then sync the directory.
//!
//! Missing parent directories are created with [`durability::create_dir_all`], which syncs
//! each new directory's parent.

use std::fmt;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, RenameTargetMode, Result,
};

use crate::durability;

const STORE: &str = "DurableLocalStore";

/// Local disk, rooted at a directory, with durable writes.
#[derive(Debug)]
pub struct DurableLocalStore {
    inner: Arc<LocalFileSystem>,
    next_tmp: AtomicU64,
}

impl fmt::Display for DurableLocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DurableLocalStore({})", self.inner)
    }
}

fn generic(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

fn parent(p: &FsPath) -> &FsPath {
    p.parent().unwrap_or(FsPath::new("/"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| object_store::Error::Generic {
            store: STORE,
            source: Box::new(e),
        })?
}

impl DurableLocalStore {
    /// A store rooted at `root` (which must exist).
    pub fn new(root: &FsPath) -> Result<Self> {
        Ok(DurableLocalStore {
            inner: Arc::new(LocalFileSystem::new_with_prefix(root)?),
            next_tmp: AtomicU64::new(0),
        })
    }

    fn fs_path(&self, location: &Path) -> Result<PathBuf> {
        self.inner.path_to_filesystem(location)
    }

    /// A temporary name beside `target` that listings skip (`name#<digits>`, as object_store's
    /// own staged uploads).
    fn tmp_path(&self, target: &FsPath) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let mut name = target.file_name().unwrap_or_default().to_os_string();
        name.push(format!("#{:010}{n:010}", std::process::id()));
        target.with_file_name(name)
    }
}

/// Writes `payload` to `tmp`, syncs it and puts it at `target` (`create`: only if absent).
fn put_durably(tmp: &FsPath, target: &FsPath, payload: &PutPayload, create: bool) -> Result<()> {
    use std::io::Write;
    durability::create_dir_all(parent(target)).map_err(generic)?;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(tmp)?;
        for part in payload.iter() {
            f.write_all(part)?;
        }
        durability::sync_file(&f, tmp)?;
        drop(f);
        if create {
            std::fs::hard_link(tmp, target)?;
            std::fs::remove_file(tmp)
        } else {
            std::fs::rename(tmp, target)
        }
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(tmp);
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(generic(e));
        }
        // The existing object may be the work of a process killed before it synced the
        // directory: make it durable before anyone acts on "it exists".
        durability::sync_dir(parent(target)).map_err(generic)?;
        return Err(object_store::Error::AlreadyExists {
            path: target.display().to_string(),
            source: Box::new(e),
        });
    }
    durability::sync_dir(parent(target)).map_err(generic)
}

#[async_trait::async_trait]
impl ObjectStore for DurableLocalStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let create = match opts.mode {
            PutMode::Overwrite => false,
            PutMode::Create => true,
            PutMode::Update(_) => {
                return Err(object_store::Error::NotImplemented {
                    operation: "put with PutMode::Update".into(),
                    implementer: STORE.into(),
                });
            }
        };
        let target = self.fs_path(location)?;
        let tmp = self.tmp_path(&target);
        blocking(move || put_durably(&tmp, &target, &payload, create)).await?;
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        // Not used by Sluice's commit protocol (files are staged with put); not durable.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let inner = self.inner.clone();
        locations
            .then(move |location| {
                let inner = inner.clone();
                async move {
                    let location = location?;
                    let path = inner.path_to_filesystem(&location)?;
                    blocking(move || {
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                return Err(object_store::Error::NotFound {
                                    path: path.display().to_string(),
                                    source: Box::new(e),
                                });
                            }
                            Err(e) => return Err(generic(e)),
                        }
                        durability::sync_dir(parent(&path)).map_err(generic)?;
                        Ok(location)
                    })
                    .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let bytes = self.inner.get(from).await?.bytes().await?;
        let opts = PutOptions {
            mode: match options.mode {
                CopyMode::Overwrite => PutMode::Overwrite,
                CopyMode::Create => PutMode::Create,
            },
            ..Default::default()
        };
        self.put_opts(to, PutPayload::from(bytes), opts).await.map(|_| ())
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        if matches!(options.target_mode, RenameTargetMode::Create) {
            self.copy_opts(
                from,
                to,
                CopyOptions {
                    mode: CopyMode::Create,
                    ..Default::default()
                },
            )
            .await?;
            return self.delete(from).await;
        }
        let (from, to) = (self.fs_path(from)?, self.fs_path(to)?);
        blocking(move || {
            if let Err(e) = std::fs::symlink_metadata(&from) {
                // Perhaps moved already by a process killed before it synced the move: make
                // whatever is there durable before the caller takes "moved" for done.
                if to.exists() {
                    durability::sync_dir(parent(&to)).map_err(generic)?;
                    // The source's directory may be gone too (nothing left staged).
                    match durability::sync_dir(parent(&from)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(generic(e)),
                        _ => {}
                    }
                }
                return Err(object_store::Error::NotFound {
                    path: from.display().to_string(),
                    source: Box::new(e),
                });
            }
            durability::create_dir_all(parent(&to)).map_err(generic)?;
            std::fs::rename(&from, &to).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => object_store::Error::NotFound {
                    path: from.display().to_string(),
                    source: Box::new(e),
                },
                _ => generic(e),
            })?;
            durability::sync_dir(parent(&to)).map_err(generic)?;
            if parent(&from) != parent(&to) {
                durability::sync_dir(parent(&from)).map_err(generic)?;
            }
            Ok(())
        })
        .await
    }
}
