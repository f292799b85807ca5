//! Single-writer mode for object stores without conditional PUT (`'s3.conditional_put'
//! 'disabled'`): create-if-absent becomes a HEAD then a PUT. That is not atomic: two writers
//! of one table could both "create" the same commit entry, so the mode is only correct with
//! exactly one writing process per table, which the user guarantees (no lease can be taken
//! without an atomic create either). Every other call goes to the inner store unchanged.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// A store whose create-if-absent is emulated (see the module header).
#[derive(Debug)]
pub struct SingleWriterStore {
    inner: Arc<dyn ObjectStore>,
}

impl SingleWriterStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        SingleWriterStore { inner }
    }
}

impl fmt::Display for SingleWriterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SingleWriter({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for SingleWriterStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        match opts.mode {
            PutMode::Create => {
                match self.inner.head(location).await {
                    Ok(_) => {
                        return Err(object_store::Error::AlreadyExists {
                            path: location.to_string(),
                            source: "exists (single-writer mode checked with HEAD)".into(),
                        });
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                opts.mode = PutMode::Overwrite;
                self.inner.put_opts(location, payload, opts).await
            }
            PutMode::Update(_) => Err(object_store::Error::NotImplemented {
                operation: "conditional update in single-writer mode".into(),
                implementer: "SingleWriterStore".into(),
            }),
            PutMode::Overwrite => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn create_is_refused_when_present() {
        let s = SingleWriterStore::new(Arc::new(InMemory::new()));
        let p = Path::from("a");
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        s.put_opts(&p, PutPayload::from_static(b"1"), create()).await.unwrap();
        let e = s
            .put_opts(&p, PutPayload::from_static(b"2"), create())
            .await
            .unwrap_err();
        assert!(matches!(e, object_store::Error::AlreadyExists { .. }), "{e}");
        assert_eq!(s.get(&p).await.unwrap().bytes().await.unwrap().as_ref(), b"1");
    }
}
