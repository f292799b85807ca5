//! Where a table lives: an object store and the table's root inside it, plus the fixed layout
//! of DESIGN §4 (`_sluice/log`, `_sluice/staging`, `_sluice/dead_letter`), and what writing
//! to it safely takes: local disk with durable writes ([`local`]), S3 (`s3`), single-writer
//! mode for stores without conditional PUT ([`TableStore::create`]), large files as recorded
//! multipart uploads ([`upload`]) and the one-writer lease ([`lease`]).
//!
//! A LOCATION is a local path, a `file://` URL (local disk, [`DurableLocalStore`]) or an
//! `s3://bucket/prefix/` URL (S3 and S3-compatible stores, `store::s3`). The store options of
//! a sink (`s3.*`, `lease.ttl`, `upload.part_size`) are read here.
//!
//! The commit log needs an atomic create-if-absent. Local disk has one (a hard link); an object
//! store has it when it honours a conditional PUT (`If-None-Match: *`), which
//! [`TableStore::check_atomic_create`] probes once before the first commit. A store without it
//! is refused with a clear error unless the sink opts into single-writer mode
//! (`'s3.conditional_put' 'disabled'`), where create-if-absent is a HEAD then a PUT
//! ([`TableStore::create`]): not atomic, so exactly one process may write the table, which the
//! user guarantees (no lease can be built without an atomic create either).

pub mod lease;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
pub mod upload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::multipart::MultipartStore;
use object_store::path::Path;
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult};
use sluice_sql::{OptionError, OptionSpec, Options};

use crate::error::{EngineError, Result};
use local::DurableLocalStore;

/// Default writer-lease time to live on object stores (`lease.ttl`).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default part size of multipart uploads (`upload.part_size`).
pub const DEFAULT_PART_SIZE: usize = 16 * 1024 * 1024;
/// The smallest part S3 accepts (all but the last part).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// The OPTIONS keys of a table's store, accepted by every sink.
pub fn option_specs() -> Vec<OptionSpec> {
    vec![
        OptionSpec {
            key: "s3.*",
            doc: "an S3 client setting for an s3:// LOCATION (object_store's AmazonS3ConfigKey names: s3.endpoint, s3.region, s3.access_key_id, s3.secret_access_key, s3.session_token, s3.allow_http, s3.conditional_put, ...); the AWS_* environment variables are read first; values may use ${ENV} and are never printed",
        },
        OptionSpec {
            key: "lease.ttl",
            doc: "on an object store: how long a writer's lease lives without renewal (renewed every third of it; a restarted writer waits at most this long for a dead holder's lease; default 30s)",
        },
        OptionSpec {
            key: "upload.part_size",
            doc: "on an object store: files larger than this go up as multipart uploads in parts of this size (default 16MB, at least 5MB)",
        },
    ]
}

/// Settings of a table's store beyond its location (its `Debug` shows no `s3.*` value).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `s3.*` client settings, keys without the `s3.` prefix.
    pub s3: BTreeMap<String, String>,
    /// Writer-lease time to live (object stores).
    pub lease_ttl: Duration,
    /// Multipart part size (object stores).
    pub part_size: usize,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("s3", &self.s3.keys().collect::<Vec<_>>())
            .field("lease_ttl", &self.lease_ttl)
            .field("part_size", &self.part_size)
            .finish()
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            s3: BTreeMap::new(),
            lease_ttl: DEFAULT_LEASE_TTL,
            part_size: DEFAULT_PART_SIZE,
        }
    }
}

impl StoreSettings {
    /// The store settings among a sink's OPTIONS (other keys are ignored).
    pub fn from_options(options: &Options) -> Result<Self, OptionError> {
        let mut s = StoreSettings::default();
        for (k, v) in options {
            if let Some(key) = k.strip_prefix("s3.") {
                s.s3.insert(key.to_string(), v.clone());
            }
        }
        let ttl = sluice_sql::option_duration(options, "lease.ttl", DEFAULT_LEASE_TTL)?;
        if ttl < Duration::from_secs(1) {
            return Err(OptionError {
                key: "lease.ttl".into(),
                message: format!("{ttl:?} is too short: a lease lives at least 1s"),
            });
        }
        s.lease_ttl = ttl;
        let part = sluice_sql::option_bytes(options, "upload.part_size", DEFAULT_PART_SIZE as u64)?;
        if part < MIN_PART_SIZE as u64 {
            return Err(OptionError {
                key: "upload.part_size".into(),
                message: format!("{part} bytes is below S3's smallest part (5MB)"),
            });
        }
        s.part_size = usize::try_from(part).unwrap_or(usize::MAX);
        #[cfg(feature = "s3")]
        s3::check_keys(&s.s3)?;
        Ok(s)
    }

    /// True in single-writer mode: `'s3.conditional_put' 'disabled'`, or, when the option is
    /// absent, `AWS_CONDITIONAL_PUT=disabled` (which the S3 client reads too; the CLI's
    /// maintenance commands take their settings from the environment).
    pub fn single_writer(&self) -> bool {
        let mode = match self.s3.get("conditional_put") {
            Some(v) => Some(v.clone()),
            None => std::env::var("AWS_CONDITIONAL_PUT").ok(),
        };
        mode.is_some_and(|v| v.trim() == "disabled")
    }
}

/// Checks a sink's LOCATION and store options (for `sluice validate` and start-up).
pub fn check(location: &str, options: &Options) -> Result<(), OptionError> {
    let settings = StoreSettings::from_options(options)?;
    match scheme(location) {
        None | Some("file") => {
            if let Some(k) = options.keys().find(|k| k.starts_with("s3.")) {
                return Err(OptionError {
                    key: k.clone(),
                    message: format!("s3.* options apply to s3:// locations, and '{location}' is local disk"),
                });
            }
            Ok(())
        }
        Some("s3") if cfg!(feature = "s3") => {
            let _ = settings;
            Ok(())
        }
        Some(other) => Err(OptionError {
            key: "LOCATION".into(),
            message: format!("unsupported location '{location}' (scheme {other}://): {}", supported()),
        }),
    }
}

fn scheme(location: &str) -> Option<&str> {
    location.split_once("://").map(|(s, _)| s)
}

fn supported() -> &'static str {
    if cfg!(feature = "s3") {
        "use a local path, a file:// URL or an s3://bucket/prefix/ URL"
    } else {
        "use a local path or a file:// URL (this build has no S3 support: build with the s3 feature)"
    }
}

/// The raw multipart API of a table's store (S3's create / upload part / complete / abort),
/// for uploads whose id is recorded so that recovery can abort them.
#[derive(Clone)]
pub struct Multipart(pub Arc<dyn MultipartStore>);

impl std::fmt::Debug for Multipart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Multipart")
    }
}

/// A table's object store and root path.
#[derive(Debug, Clone)]
pub struct TableStore {
    /// The store holding the table.
    pub store: Arc<dyn ObjectStore>,
    /// The table's root inside the store (empty for a store rooted at the table).
    pub root: Path,
    /// The LOCATION the table was opened from, for messages.
    pub location: String,
    /// The table's directory when it is on local disk (writer leases are OS locks there).
    pub local_dir: Option<std::path::PathBuf>,
    /// The store's multipart API, when large files go up as recorded multipart uploads.
    pub multipart: Option<Multipart>,
    /// Lease, upload and client settings.
    pub settings: StoreSettings,
    probed: Arc<tokio::sync::OnceCell<()>>,
}

impl TableStore {
    /// Opens the table at `location` with default store settings (the `AWS_*` environment
    /// only, for an s3:// location). See [`TableStore::open_with`].
    pub fn open(location: &str) -> Result<Self> {
        Self::open_with(location, &StoreSettings::default())
    }

    /// Opens the table at `location` with a sink's OPTIONS (their store keys).
    pub fn open_for(location: &str, options: &Options) -> Result<Self> {
        let settings = StoreSettings::from_options(options)
            .map_err(|e| EngineError::config(format!("option '{}': {}", e.key, e.message), None::<String>))?;
        Self::open_with(location, &settings)
    }

    /// Opens the table at `location`: a local path (absolute or relative to the working
    /// directory) or a `file://` URL, whose directory is created when missing and whose writes
    /// are durable when they return ([`DurableLocalStore`]); or an `s3://bucket/prefix/` URL.
    pub fn open_with(location: &str, settings: &StoreSettings) -> Result<Self> {
        match scheme(location) {
            None | Some("file") => Self::open_local(location),
            #[cfg(feature = "s3")]
            Some("s3") => {
                let (s3, root) = s3::open(location, &settings.s3)?;
                Ok(TableStore {
                    store: s3.clone(),
                    root,
                    location: location.to_string(),
                    local_dir: None,
                    multipart: Some(Multipart(s3)),
                    settings: settings.clone(),
                    probed: Default::default(),
                })
            }
            Some(other) => Err(EngineError::config(
                format!("unsupported location scheme \"{other}://\" in '{location}'"),
                Some(supported().to_string()),
            )),
        }
    }

    fn open_local(location: &str) -> Result<Self> {
        let local = location.strip_prefix("file://").unwrap_or(location).to_string();
        crate::durability::create_dir_all(std::path::Path::new(&local))
            .map_err(EngineError::io(format!("creating table directory {local}")))?;
        let store = DurableLocalStore::new(std::path::Path::new(&local))
            .map_err(EngineError::store(format!("opening {local}")))?;
        Ok(TableStore {
            store: Arc::new(store),
            root: Path::default(),
            location: location.to_string(),
            local_dir: Some(std::path::PathBuf::from(local)),
            multipart: None,
            settings: StoreSettings::default(),
            probed: Default::default(),
        })
    }

    /// A store already built (tests, custom stores), rooted at `root`.
    pub fn from_store(store: Arc<dyn ObjectStore>, root: Path, location: impl Into<String>) -> Self {
        TableStore {
            store,
            root,
            location: location.into(),
            local_dir: None,
            multipart: None,
            settings: StoreSettings::default(),
            probed: Default::default(),
        }
    }

    /// The same table seen through another store (a wrapper of this one's, in tests): keeps
    /// the local directory (writer leases still apply) and the multipart API.
    pub fn wrapped(&self, store: Arc<dyn ObjectStore>) -> Self {
        TableStore {
            store,
            probed: Default::default(),
            ..self.clone()
        }
    }

    /// Uses `multipart` for large staged files.
    pub fn with_multipart(mut self, multipart: Arc<dyn MultipartStore>) -> Self {
        self.multipart = Some(Multipart(multipart));
        self
    }

    /// Uses `settings` (lease TTL, part size).
    pub fn with_settings(mut self, settings: StoreSettings) -> Self {
        self.settings = settings;
        self
    }

    /// True when the table is on an object store with no atomic create (single-writer mode).
    pub fn single_writer(&self) -> bool {
        self.local_dir.is_none() && self.settings.single_writer()
    }

    /// Makes sure the store's create-if-absent is atomic, once per opened table: local disk
    /// and single-writer mode pass; an object store must refuse a second conditional PUT of
    /// the same new object. A store that accepts it would let two writers commit the same
    /// epoch, so the table is refused with a clear error.
    pub async fn check_atomic_create(&self) -> Result<()> {
        if self.local_dir.is_some() || self.single_writer() {
            return Ok(());
        }
        self.probed.get_or_try_init(|| self.probe_atomic_create()).await?;
        Ok(())
    }

    async fn probe_atomic_create(&self) -> Result<()> {
        let refused = |what: &str| {
            EngineError::config(
                format!(
                    "the store at '{}' {what}: it has no atomic create-if-absent (conditional PUT, If-None-Match: *), so two writers could both commit the same epoch",
                    self.location
                ),
                Some(
                    "use a store with conditional writes (AWS S3, MinIO, Ceph RGW, Cloudflare R2 all have them), or run one writer only with OPTIONS ('s3.conditional_put' 'disabled') (single-writer mode, see the README)"
                        .to_string(),
                ),
            )
        };
        let attempt = std::sync::atomic::AtomicU32::new(0);
        crate::retry::RetryPolicy::default()
            .run("checking the store's conditional PUT", || async {
                // A fresh object per attempt: a failed attempt may have created its own.
                let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let path = self.path(&format!("_sluice/probe/{}-{nanos}-{n}", std::process::id()));
                let result = self.probe_once(&path).await;
                let _ = self.store.delete(&path).await;
                match result {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(refused(
                        "overwrote an existing object on a conditional PUT (If-None-Match or If-Match ignored)",
                    )),
                    Err(object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }) => {
                        Err(refused("does not support conditional PUT"))
                    }
                    Err(e) => Err(EngineError::store(format!("probing {path}"))(e)),
                }
            })
            .await
    }

    /// Creates `path`, creates it again, and updates it with a wrong ETag: true when both the
    /// second create and the update are refused (the lease needs `If-Match` as the log needs
    /// `If-None-Match`).
    async fn probe_once(&self, path: &Path) -> object_store::Result<bool> {
        let put = |mode| PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from_static(b"1"), put(PutMode::Create))
            .await
        {
            Ok(_) => {}
            // The path is new: this is our own create whose answer was lost. Try another.
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(object_store::Error::Generic {
                    store: "probe",
                    source: "the probe object already existed".into(),
                });
            }
            Err(e) => return Err(e),
        }
        match self
            .store
            .put_opts(path, PutPayload::from_static(b"2"), put(PutMode::Create))
            .await
        {
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
            Ok(_) => return Ok(false),
            Err(e) => return Err(e),
        }
        let wrong = PutMode::Update(object_store::UpdateVersion {
            e_tag: Some("\"sluice-probe-wrong-etag\"".into()),
            version: None,
        });
        match self
            .store
            .put_opts(path, PutPayload::from_static(b"3"), put(wrong))
            .await
        {
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The absolute path of a table-relative path (`a/b/c`).
    pub fn path(&self, relative: &str) -> Path {
        relative
            .split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    /// The table-relative form of an absolute path.
    pub fn relative(&self, path: &Path) -> String {
        match path.prefix_match(&self.root) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => path.to_string(),
        }
    }

    /// `_sluice/log/`.
    pub fn log_dir(&self) -> Path {
        self.path("_sluice/log")
    }

    /// `_sluice/checkpoints/`.
    pub fn checkpoint_dir(&self) -> Path {
        self.path("_sluice/checkpoints")
    }

    /// The bytes of the object at `path`, or `None` when there is none.
    pub async fn get_if_exists(&self, path: &Path) -> Result<Option<Bytes>> {
        match self.store.get(path).await {
            Ok(g) => Ok(Some(g.bytes().await.map_err(EngineError::store(format!("reading {path}")))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(EngineError::store(format!("reading {path}"))(e)),
        }
    }

    /// Creates the object at `path` only if there is none (the commit log's create-if-absent):
    /// a conditional PUT, or in single-writer mode a HEAD then a PUT (see the module header).
    pub async fn create(&self, path: &Path, payload: PutPayload) -> object_store::Result<PutResult> {
        if self.single_writer() {
            match self.store.head(path).await {
                Ok(_) => {
                    return Err(object_store::Error::AlreadyExists {
                        path: path.to_string(),
                        source: "exists (single-writer mode checked with HEAD)".into(),
                    });
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            return self.store.put(path, payload).await;
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store.put_opts(path, payload, opts).await
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use bytes::Bytes;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutResult,
        RenameOptions,
    };

    use super::*;

    /// A store that ignores If-None-Match (as some S3-compatible stores do): Create overwrites.
    #[derive(Debug)]
    struct IgnoresCreate(InMemory);

    impl std::fmt::Display for IgnoresCreate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("IgnoresCreate")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for IgnoresCreate {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            mut opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            opts.mode = PutMode::Overwrite;
            self.0.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
            self.0.get_opts(location, options).await
        }
        async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
            self.0.get_ranges(location, ranges).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.0.delete_stream(locations)
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
        async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
            self.0.rename_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_store_without_atomic_create_is_refused_unless_single_writer() {
        let t = TableStore::from_store(Arc::new(IgnoresCreate(InMemory::new())), Path::from("t"), "s3://b/t/");
        let e = t.check_atomic_create().await.unwrap_err().to_string();
        assert!(e.contains("no atomic create-if-absent"), "{e}");
        assert!(e.contains("s3.conditional_put"), "the hint names the opt-in: {e}");
        // The probe object is gone either way.
        let left: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(t.store.list(None))
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
        let mut s = StoreSettings::default();
        s.s3.insert("conditional_put".into(), "disabled".into());
        t.clone().with_settings(s).check_atomic_create().await.unwrap();
        // A store with conditional PUT passes (and is probed once).
        let good = TableStore::from_store(Arc::new(InMemory::new()), Path::from("t"), "memory");
        good.check_atomic_create().await.unwrap();
        good.check_atomic_create().await.unwrap();
    }

    #[tokio::test]
    async fn single_writer_create_is_refused_when_present() {
        let mut settings = StoreSettings::default();
        settings.s3.insert("conditional_put".into(), "disabled".into());
        let t = TableStore::from_store(Arc::new(InMemory::new()), Path::from("t"), "s3://b/t/").with_settings(settings);
        assert!(t.single_writer());
        let p = t.path("a");
        t.create(&p, PutPayload::from_static(b"1")).await.unwrap();
        let e = t.create(&p, PutPayload::from_static(b"2")).await.unwrap_err();
        assert!(matches!(e, object_store::Error::AlreadyExists { .. }), "{e}");
        assert_eq!(t.get_if_exists(&p).await.unwrap().unwrap().as_ref(), b"1");
        assert!(t.get_if_exists(&t.path("b")).await.unwrap().is_none());
    }

    #[test]
    fn options_are_checked() {
        let opts =
            |kv: &[(&str, &str)]| -> Options { kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        assert!(check("/tmp/x", &opts(&[("s3.region", "x")])).is_err());
        assert!(
            check("gs://b/x", &opts(&[]))
                .unwrap_err()
                .message
                .contains("unsupported")
        );
        assert!(check("/tmp/x", &opts(&[("upload.part_size", "1MB")])).is_err());
        assert!(check("/tmp/x", &opts(&[("lease.ttl", "10ms")])).is_err());
        let s = StoreSettings::from_options(&opts(&[("lease.ttl", "5s"), ("upload.part_size", "8MB")])).unwrap();
        assert_eq!((s.lease_ttl, s.part_size), (Duration::from_secs(5), 8 * 1024 * 1024));
        let s = StoreSettings::from_options(&opts(&[("s3.secret_access_key", "hunter2")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    }
}
