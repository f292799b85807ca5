//! Tables on S3 and S3-compatible stores: builds object_store's `AmazonS3` client for an
//! `s3://bucket/prefix/` LOCATION from the `AWS_*` environment, then the sink's `s3.*` OPTIONS
//! (object_store's `AmazonS3ConfigKey` names without the `aws_` prefix: `endpoint`, `region`,
//! `access_key_id`, `secret_access_key`, `session_token`, `allow_http`, `conditional_put`, ...).
//! Conditional PUT (`If-None-Match: *`) is object_store's default; the probe that checks the
//! store honours it is [`super::store::TableStore::check_atomic_create`].
//!
//! Secrets: values are handed to the client and never formatted into a message; an unknown
//! key is reported by its name only. The client is wrapped in [`Redacting`], which scrubs the
//! secret key and session token out of every error it returns (S3 quotes the signed request,
//! session token included, in a `SignatureDoesNotMatch` answer, and object_store puts answers
//! into its errors).

use std::collections::BTreeMap;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use sluice_sql::OptionError;

use crate::error::{EngineError, Result};

/// Checks that every `s3.*` key (given without its prefix) is a client setting.
pub fn check_keys(keys: &BTreeMap<String, String>) -> Result<(), OptionError> {
    for (k, v) in keys {
        if AmazonS3ConfigKey::from_str(k).is_err() {
            return Err(OptionError {
                key: format!("s3.{k}"),
                message: format!(
                    "'s3.{k}' is not an S3 client setting (e.g. s3.endpoint, s3.region, s3.access_key_id, s3.secret_access_key, s3.session_token, s3.allow_http, s3.conditional_put)"
                ),
            });
        }
        if k == "conditional_put" && !matches!(v.trim(), "etag" | "disabled") {
            return Err(OptionError {
                key: "s3.conditional_put".into(),
                message: format!(
                    "s3.conditional_put is 'etag' (default: atomic commits, any number of writers) or 'disabled' (single-writer mode), got '{v}'"
                ),
            });
        }
    }
    Ok(())
}

/// The client (wrapped in [`Redacting`]) and the table's root path for `location`
/// (`s3://bucket[/prefix]`).
pub fn open(location: &str, settings: &BTreeMap<String, String>) -> Result<(Arc<Redacting>, Path)> {
    let bad = |why: &str| {
        EngineError::config(
            format!("bad S3 location '{location}': {why}"),
            Some("write it as s3://bucket/prefix/".to_string()),
        )
    };
    let url = url::Url::parse(location).map_err(|e| bad(&e.to_string()))?;
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket"))?;
    let root = Path::parse(url.path().trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (k, v) in settings {
        let key = AmazonS3ConfigKey::from_str(k).map_err(|_| {
            EngineError::config(
                format!("'s3.{k}' is not an S3 client setting"),
                Some("see object_store's AmazonS3ConfigKey for the names".to_string()),
            )
        })?;
        builder = builder.with_config(key, v.clone());
    }
    let store = builder.build().map_err(|e| {
        EngineError::config(
            format!("cannot open {location}: {e}"),
            Some("set the s3.* OPTIONS or the AWS_* environment variables (endpoint, region, credentials)".to_string()),
        )
    })?;
    let store = Arc::new(store);
    Ok((Arc::new(Redacting::new(store.clone(), store, secrets(settings))), root))
}

/// The secret values among `settings` and the `AWS_*` environment.
fn secrets(settings: &BTreeMap<String, String>) -> Vec<String> {
    const KEYS: [&str; 6] = [
        "secret_access_key",
        "aws_secret_access_key",
        "session_token",
        "aws_session_token",
        "token",
        "aws_token",
    ];
    let env = ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_TOKEN"]
        .iter()
        .filter_map(|k| std::env::var(k).ok());
    KEYS.iter()
        .filter_map(|k| settings.get(*k).cloned())
        .chain(env)
        .filter(|v| v.len() >= 4)
        .collect()
}

/// An S3 client whose errors never carry its secrets (see the module header).
pub struct Redacting {
    inner: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redacting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redacting({})", self.inner)
    }
}

impl std::fmt::Display for Redacting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.inner)
    }
}

impl Redacting {
    /// Wraps a store and its multipart API, scrubbing `secrets` from their errors.
    pub fn new(inner: Arc<dyn ObjectStore>, multipart: Arc<dyn MultipartStore>, secrets: Vec<String>) -> Self {
        Redacting {
            inner,
            multipart,
            secrets,
        }
    }

    fn clean(&self, text: &str) -> String {
        self.secrets
            .iter()
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
    }

    /// The same error, its text scrubbed when it holds a secret (the kind is kept where the
    /// engine acts on it).
    fn scrub(&self, e: object_store::Error) -> object_store::Error {
        use object_store::Error as E;
        let text = e.to_string();
        if !self.secrets.iter().any(|s| text.contains(s.as_str())) {
            return e;
        }
        let source: Box<dyn std::error::Error + Send + Sync> = self.clean(&text).into();
        match e {
            E::NotFound { path, .. } => E::NotFound {
                path: self.clean(&path),
                source,
            },
            E::AlreadyExists { path, .. } => E::AlreadyExists {
                path: self.clean(&path),
                source,
            },
            E::Precondition { path, .. } => E::Precondition {
                path: self.clean(&path),
                source,
            },
            E::NotModified { path, .. } => E::NotModified {
                path: self.clean(&path),
                source,
            },
            E::PermissionDenied { path, .. } => E::PermissionDenied {
                path: self.clean(&path),
                source,
            },
            E::Unauthenticated { path, .. } => E::Unauthenticated {
                path: self.clean(&path),
                source,
            },
            _ => E::Generic { store: "S3", source },
        }
    }
}

type StoreResult<T> = object_store::Result<T>;

#[async_trait::async_trait]
impl ObjectStore for Redacting {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> StoreResult<PutResult> {
        self.inner
            .put_opts(location, payload, opts)
            .await
            .map_err(|e| self.scrub(e))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> StoreResult<Box<dyn MultipartUpload>> {
        self.inner
            .put_multipart_opts(location, opts)
            .await
            .map_err(|e| self.scrub(e))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> StoreResult<GetResult> {
        self.inner.get_opts(location, options).await.map_err(|e| self.scrub(e))
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> StoreResult<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await.map_err(|e| self.scrub(e))
    }

    fn delete_stream(&self, locations: BoxStream<'static, StoreResult<Path>>) -> BoxStream<'static, StoreResult<Path>> {
        let secrets = self.secrets.clone();
        let me = Redacting::new(self.inner.clone(), self.multipart.clone(), secrets);
        self.inner
            .delete_stream(locations)
            .map(move |r| r.map_err(|e| me.scrub(e)))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, StoreResult<ObjectMeta>> {
        let me = Redacting::new(self.inner.clone(), self.multipart.clone(), self.secrets.clone());
        self.inner.list(prefix).map(move |r| r.map_err(|e| me.scrub(e))).boxed()
    }

    /// S3's `start-after`: only the keys after `offset` are listed (the commit log's entries
    /// after a checkpoint).
    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, StoreResult<ObjectMeta>> {
        let me = Redacting::new(self.inner.clone(), self.multipart.clone(), self.secrets.clone());
        self.inner
            .list_with_offset(prefix, offset)
            .map(move |r| r.map_err(|e| me.scrub(e)))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> StoreResult<ListResult> {
        self.inner.list_with_delimiter(prefix).await.map_err(|e| self.scrub(e))
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> StoreResult<()> {
        self.inner.copy_opts(from, to, options).await.map_err(|e| self.scrub(e))
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> StoreResult<()> {
        self.inner
            .rename_opts(from, to, options)
            .await
            .map_err(|e| self.scrub(e))
    }
}

#[async_trait::async_trait]
impl MultipartStore for Redacting {
    async fn create_multipart(&self, path: &Path) -> StoreResult<MultipartId> {
        self.multipart.create_multipart(path).await.map_err(|e| self.scrub(e))
    }

    async fn put_part(&self, path: &Path, id: &MultipartId, part_idx: usize, data: PutPayload) -> StoreResult<PartId> {
        self.multipart
            .put_part(path, id, part_idx, data)
            .await
            .map_err(|e| self.scrub(e))
    }

    async fn complete_multipart(&self, path: &Path, id: &MultipartId, parts: Vec<PartId>) -> StoreResult<PutResult> {
        self.multipart
            .complete_multipart(path, id, parts)
            .await
            .map_err(|e| self.scrub(e))
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> StoreResult<()> {
        self.multipart
            .abort_multipart(path, id)
            .await
            .map_err(|e| self.scrub(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_name_without_printing_values() {
        let mut k = BTreeMap::new();
        k.insert("endpoint".to_string(), "http://127.0.0.1:9".to_string());
        k.insert("secret_access_key".to_string(), "hunter2".to_string());
        check_keys(&k).unwrap();
        k.insert("secret_acess_key".to_string(), "hunter2".to_string());
        let e = check_keys(&k).unwrap_err();
        assert_eq!(e.key, "s3.secret_acess_key");
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        let mut k = BTreeMap::new();
        k.insert("conditional_put".to_string(), "maybe".to_string());
        assert!(check_keys(&k).unwrap_err().message.contains("single-writer"));
    }

    #[tokio::test]
    async fn errors_never_carry_a_secret() {
        use object_store::ObjectStoreExt;
        let mem = Arc::new(object_store::memory::InMemory::new());
        let s = Redacting::new(mem.clone(), mem, vec!["hunter2".into()]);
        let e = s.get(&Path::from("a/hunter2/b")).await.unwrap_err();
        assert!(
            matches!(e, object_store::Error::NotFound { .. }),
            "the kind is kept: {e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = s.get(&Path::from("a/other")).await.unwrap_err();
        assert!(
            e.to_string().contains("a/other"),
            "errors without secrets pass as they are: {e}"
        );
    }

    #[test]
    fn location_gives_bucket_and_root() {
        let mut k = BTreeMap::new();
        k.insert("endpoint".to_string(), "http://127.0.0.1:9".to_string());
        k.insert("allow_http".to_string(), "true".to_string());
        k.insert("region".to_string(), "us-east-1".to_string());
        let (_, root) = open("s3://lake/tables/orders/", &k).unwrap();
        assert_eq!(root.as_ref(), "tables/orders");
        let (_, root) = open("s3://lake", &k).unwrap();
        assert_eq!(root.as_ref(), "");
        assert!(open("s3:///x", &k).unwrap_err().to_string().contains("no bucket"));
    }
}
