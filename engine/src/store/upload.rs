//! Large staged files as multipart uploads whose id is recorded, so a crash mid-upload leaves
//! nothing behind that recovery does not clean.
//!
//! ```text
//!   create upload ─► put marker ─────────────► upload parts ─► complete ─► delete marker
//!   (an id)          _sluice/staging/W/_uploads/                (the staged
//!                    <target>.json: path + id                    object appears)
//! ```
//!
//! An unfinished upload is invisible (S3 lists no object for it) but holds its parts' storage.
//! [`abort_recorded`], run by the writer's recovery before it clears its staging directory,
//! aborts every upload a marker names. The gap is an upload no marker names: a crash between
//! creating it and writing its marker, or a create whose answer was lost and that the client
//! retried (S3 then holds two uploads, one unnamed). The bucket's lifecycle rule
//! `AbortIncompleteMultipartUpload` (README) is the backstop for those.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::{Multipart, TableStore};
use crate::retry::RetryPolicy;

/// What a marker records.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    path: String,
    upload_id: String,
}

fn marker_dir(table: &TableStore, writer: &str) -> Path {
    table.path(&format!("_sluice/staging/{writer}/_uploads"))
}

/// Uploads `bytes` to `path` in parts of the table's part size, under a marker naming the
/// upload (see the module header). On an error the upload is aborted before returning.
pub async fn put_recorded(
    table: &TableStore,
    multipart: &Multipart,
    writer: &str,
    target: &str,
    path: &Path,
    bytes: Vec<u8>,
    retry: &RetryPolicy,
) -> Result<()> {
    let mp = &multipart.0;
    let id = retry
        .run("starting a multipart upload", || async {
            mp.create_multipart(path)
                .await
                .map_err(EngineError::store(format!("starting an upload of {path}")))
        })
        .await?;
    // One marker per upload: an earlier upload of the same target whose abort failed keeps
    // its own.
    let marker = table.path(&format!(
        "_sluice/staging/{writer}/_uploads/{target}.{:08x}.json",
        crc32c::crc32c(id.as_bytes())
    ));
    let body = serde_json::to_vec(&Marker {
        path: path.to_string(),
        upload_id: id.clone(),
    })
    .map_err(|e| EngineError::Internal(format!("encoding an upload marker: {e}")))?;
    let body = PutPayload::from(body);
    let recorded = retry
        .run("recording a multipart upload", || async {
            table
                .store
                .put(&marker, body.clone())
                .await
                .map_err(EngineError::store(format!("writing {marker}")))
        })
        .await;
    if let Err(e) = recorded {
        // Unrecorded: abort it now, or nothing will.
        let _ = mp.abort_multipart(path, &id).await;
        return Err(e);
    }
    let result = upload_parts(table, multipart, &id, path, Bytes::from(bytes), retry).await;
    if result.is_err() {
        // Best effort: recovery aborts it anyway while the marker stays.
        if mp.abort_multipart(path, &id).await.is_ok() {
            let _ = table.store.delete(&marker).await;
        }
        return result;
    }
    retry
        .run("removing an upload marker", || async {
            match table.store.delete(&marker).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(EngineError::store(format!("removing {marker}"))(e)),
            }
        })
        .await
}

async fn upload_parts(
    table: &TableStore,
    multipart: &Multipart,
    id: &str,
    path: &Path,
    bytes: Bytes,
    retry: &RetryPolicy,
) -> Result<()> {
    let mp = &multipart.0;
    let size = table.settings.part_size.max(1);
    let mut parts = Vec::new();
    for (i, start) in (0..bytes.len()).step_by(size).enumerate() {
        let part = bytes.slice(start..(start + size).min(bytes.len()));
        let id_part = retry
            .run("uploading a part", || async {
                mp.put_part(path, &id.to_string(), i, PutPayload::from(part.clone()))
                    .await
                    .map_err(EngineError::store(format!("uploading part {i} of {path}")))
            })
            .await?;
        parts.push(id_part);
        crate::crash::point("mid_upload");
    }
    retry
        .run("completing a multipart upload", || async {
            match mp.complete_multipart(path, &id.to_string(), parts.clone()).await {
                Ok(_) => Ok(()),
                // Completed by an earlier attempt whose answer was lost.
                Err(object_store::Error::NotFound { .. }) if table.store.head(path).await.is_ok() => Ok(()),
                Err(e) => Err(EngineError::store(format!("completing the upload of {path}"))(e)),
            }
        })
        .await
}

/// Aborts every upload recorded under `writer`'s staging directory and removes the markers;
/// returns how many it aborted. Uploads that completed or were aborted already are skipped.
pub async fn abort_recorded(table: &TableStore, writer: &str, retry: &RetryPolicy) -> Result<usize> {
    let Some(multipart) = &table.multipart else {
        return Ok(0);
    };
    let dir = marker_dir(table, writer);
    let markers: Vec<_> = retry
        .run("listing upload markers", || async {
            table
                .store
                .list(Some(&dir))
                .try_collect::<Vec<_>>()
                .await
                .map_err(EngineError::store("listing upload markers"))
        })
        .await?;
    let mut aborted = 0;
    for meta in markers {
        let Some(body) = table.get_if_exists(&meta.location).await? else {
            continue;
        };
        // A marker cut short cannot exist (puts are whole); an unreadable one is not ours.
        let Ok(marker) = serde_json::from_slice::<Marker>(&body) else {
            tracing::warn!(marker = %meta.location, "unreadable upload marker; left in place");
            continue;
        };
        let path = Path::from(marker.path.as_str());
        retry
            .run("aborting an unfinished upload", || async {
                match multipart.0.abort_multipart(&path, &marker.upload_id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(EngineError::store(format!("aborting the upload of {path}"))(e)),
                }
            })
            .await?;
        match table.store.delete(&meta.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(EngineError::store(format!("removing {}", meta.location))(e)),
        }
        aborted += 1;
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::multipart::MultipartStore;

    use super::*;
    use crate::store::StoreSettings;

    fn table() -> (TableStore, Arc<InMemory>) {
        let mem = Arc::new(InMemory::new());
        let t = TableStore::from_store(mem.clone(), Path::from("t"), "memory")
            .with_multipart(mem.clone())
            .with_settings(StoreSettings {
                part_size: 10,
                ..Default::default()
            });
        (t, mem)
    }

    #[tokio::test]
    async fn parts_make_the_whole_file_and_leave_no_marker() {
        let (t, _) = table();
        let path = t.path("_sluice/staging/w/a.parquet");
        let data: Vec<u8> = (0..95u8).collect();
        let mp = t.multipart.clone().unwrap();
        put_recorded(&t, &mp, "w", "a.parquet", &path, data.clone(), &RetryPolicy::default())
            .await
            .unwrap();
        assert_eq!(t.store.get(&path).await.unwrap().bytes().await.unwrap().to_vec(), data);
        let left: Vec<_> = t.store.list(Some(&marker_dir(&t, "w"))).try_collect().await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn recovery_aborts_a_recorded_upload() {
        let (t, mem) = table();
        let path = t.path("_sluice/staging/w/b.parquet");
        let id = mem.create_multipart(&path).await.unwrap();
        mem.put_part(&path, &id, 0, PutPayload::from_static(b"0123456789"))
            .await
            .unwrap();
        let marker = t.path("_sluice/staging/w/_uploads/b.parquet.0.json");
        let body = serde_json::to_vec(&Marker {
            path: path.to_string(),
            upload_id: id.clone(),
        })
        .unwrap();
        t.store.put(&marker, PutPayload::from(body)).await.unwrap();
        assert_eq!(abort_recorded(&t, "w", &RetryPolicy::default()).await.unwrap(), 1);
        // The upload is gone: completing it now fails, and nothing is visible at its path.
        assert!(mem.complete_multipart(&path, &id, vec![]).await.is_err());
        assert!(t.store.head(&path).await.is_err());
        assert!(t.store.head(&marker).await.is_err());
        // Another writer's markers are not touched.
        assert_eq!(abort_recorded(&t, "v", &RetryPolicy::default()).await.unwrap(), 0);
    }
}
