//! A real S3-compatible server for the tests: moto's S3 server (from PyPI, installed by
//! `scripts/setup.sh --test` into the tools virtualenv; `$SLUICE_MOTO_PYTHON` names another
//! Python with moto), run by `scripts/moto_server.py` on a random loopback port and killed when
//! dropped; plus an independent reader of Sluice tables on it
//! (object_store's S3 client and the parquet crate, not Sluice's reader).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::harness::{free_port, tools_dir, wait_until};

/// The access key the tests use (moto accepts any).
pub const KEY_ID: &str = "sluice-test-key";
/// The secret the tests use; it must never appear in Sluice's output.
pub const SECRET: &str = "s3cr3t-never-printed-8f2d";

/// The Python that has moto, and the launcher that runs its S3 server with atomic requests
/// (`scripts/moto_server.py`: moto's own server checks a conditional PUT and then writes,
/// unlocked, so racing writers could both win).
pub fn moto_server() -> (PathBuf, PathBuf) {
    let python = std::env::var("SLUICE_MOTO_PYTHON").map_or_else(|_| tools_dir().join("venv/bin/python"), PathBuf::from);
    assert!(
        python.exists(),
        "no Python with moto at {}: run scripts/setup.sh --test",
        python.display()
    );
    (python, crate::harness::repo_root().join("scripts/moto_server.py"))
}

/// A moto S3 server on a random loopback port, killed when dropped.
pub struct Moto {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl Moto {
    /// Starts moto, logging under `dir`, waits until it answers, and creates `bucket`.
    pub fn start(dir: &Path, bucket: &str) -> Moto {
        let port = free_port();
        let log = dir.join(format!("moto-{port}.log"));
        let out = std::fs::File::create(&log).expect("moto log");
        let (python, launcher) = moto_server();
        let child = Command::new(python)
            .arg(launcher)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(out.try_clone().expect("moto log"))
            .stderr(out)
            .spawn()
            .expect("spawn moto_server");
        let mut m = Moto {
            child: Some(child),
            port,
            log,
        };
        wait_until(Duration::from_secs(60), "moto to answer", || {
            if let Some(c) = m.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "moto_server exited with {status}: {}",
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            m.http("GET", "/").ok()
        });
        let (status, body) = m.http("PUT", &format!("/{bucket}")).expect("create bucket");
        assert_eq!(status, 200, "creating bucket {bucket}: {body}");
        m
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request without a body (moto takes unsigned bucket-level calls).
    fn http(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad response: {resp}")))?;
        Ok((status, resp))
    }

    /// The multipart uploads begun and neither completed nor aborted in `bucket`.
    pub fn open_uploads(&self, bucket: &str) -> usize {
        let (status, body) = self.http("GET", &format!("/{bucket}?uploads")).expect("list uploads");
        assert_eq!(status, 200, "{body}");
        body.matches("<Upload>").count()
    }

    /// The sink options that point a table at this server (credentials included).
    pub fn settings(&self) -> Vec<(String, String)> {
        [
            ("s3.endpoint", self.endpoint()),
            ("s3.allow_http", "true".into()),
            ("s3.region", "us-east-1".into()),
            ("s3.access_key_id", KEY_ID.into()),
            ("s3.secret_access_key", SECRET.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// [`Moto::settings`] as the inside of an OPTIONS clause.
    pub fn options(&self) -> String {
        self.settings()
            .iter()
            .map(|(k, v)| format!("'{k}' '{v}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The same settings as `AWS_*` environment variables (for `sluice query` and friends).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ]
    }

    /// An S3 client of `bucket`, independent of Sluice's.
    pub fn client(&self, bucket: &str) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(KEY_ID)
                .with_secret_access_key(SECRET)
                .with_bucket_name(bucket)
                .build()
                .expect("S3 client"),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a table on S3 with object_store and the parquet crate.
pub struct S3Table {
    /// The bucket's client.
    pub store: Arc<AmazonS3>,
    /// The table's prefix in the bucket.
    pub root: String,
}

impl S3Table {
    /// Every object key under the table (relative to it).
    pub async fn keys(&self) -> Vec<String> {
        let prefix = ObjectPath::from(self.root.as_str());
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await.expect("list");
        metas
            .into_iter()
            .map(|m| {
                m.location
                    .as_ref()
                    .strip_prefix(&format!("{}/", self.root))
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    async fn bytes(&self, rel: &str) -> bytes::Bytes {
        let path = ObjectPath::from(format!("{}/{rel}", self.root));
        self.store.get(&path).await.expect(rel).bytes().await.expect(rel)
    }

    /// The commit entries, in epoch order.
    pub async fn entries(&self) -> Vec<serde_json::Value> {
        let mut keys: Vec<String> = self
            .keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with("_sluice/log/") && k.ends_with(".json"))
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            out.push(serde_json::from_slice(&self.bytes(&k).await).expect("entry json"));
        }
        out
    }

    /// Rows committed by the log (sum of `counts.output`).
    pub async fn committed_output(&self) -> u64 {
        self.entries()
            .await
            .iter()
            .map(|e| e["counts"]["output"].as_u64().unwrap_or(0))
            .sum()
    }

    async fn ids_of(&self, files: impl IntoIterator<Item = String>) -> Vec<i64> {
        let mut ids = Vec::new();
        for f in files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(self.bytes(&f).await)
                .unwrap_or_else(|e| panic!("{f}: {e}"))
                .build()
                .unwrap();
            for b in reader {
                let b = b.unwrap();
                ids.extend(
                    b.column_by_name("id")
                        .expect("id")
                        .as_primitive::<Int64Type>()
                        .values()
                        .iter()
                        .copied(),
                );
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Ids in the files the log names (added and not removed), sorted.
    pub async fn logged_ids(&self) -> Vec<i64> {
        let mut live = BTreeSet::new();
        for e in self.entries().await {
            for a in e["add"].as_array().cloned().unwrap_or_default() {
                live.insert(a["path"].as_str().unwrap().to_string());
            }
            for r in e["remove"].as_array().cloned().unwrap_or_default() {
                live.remove(r.as_str().unwrap());
            }
        }
        self.ids_of(live).await
    }

    /// Ids in every Parquet object outside `_sluice/` (what a hive reader lists), sorted.
    pub async fn hive_ids(&self) -> Vec<i64> {
        let files: Vec<String> = self
            .keys()
            .await
            .into_iter()
            .filter(|k| !k.starts_with("_sluice/") && k.ends_with(".parquet"))
            .collect();
        self.ids_of(files).await
    }

    /// The dead-letter records' `raw` ids, with how often each appears.
    pub async fn dead_letter_ids(&self) -> BTreeMap<i64, usize> {
        let mut out = BTreeMap::new();
        for k in self
            .keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with("_sluice/dead_letter/"))
        {
            for line in String::from_utf8_lossy(&self.bytes(&k).await).lines() {
                let l: serde_json::Value = serde_json::from_str(line).expect("dead letter json");
                let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().unwrap()).unwrap();
                *out.entry(raw["id"].as_i64().unwrap()).or_default() += 1;
            }
        }
        out
    }
}
