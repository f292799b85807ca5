//! The S3 row's server: moto (installed by `scripts/setup.sh --test` into the tools
//! virtualenv, served by `scripts/moto_server.py`) on a random loopback port, one bucket, and a client that reads the commit
//! log of a table in it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

/// The Python that has moto (when installed) and the launcher that serves it with atomic
/// requests (`scripts/moto_server.py`).
pub fn moto_server() -> Option<(PathBuf, PathBuf)> {
    let tools = std::env::var("SLUICE_TOOLS")
        .unwrap_or_else(|_| format!("{}/.cache/sluice-tools", std::env::var("HOME").unwrap_or_default()));
    let python = PathBuf::from(tools).join("venv/bin/python");
    let launcher = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/moto_server.py");
    (PathBuf::from(&python).with_file_name("moto_server").exists()).then_some((python, launcher))
}

/// A running moto with bucket `bench`, killed when dropped.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    client: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Starts moto and creates the bucket `bench`.
pub fn start((python, launcher): &(PathBuf, PathBuf)) -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let child = Command::new(python)
        .arg(launcher)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto");
    let end = Instant::now() + Duration::from_secs(60);
    while request(port, "GET", "/").is_err() {
        assert!(Instant::now() < end, "moto did not answer");
        // Polling interval of a condition wait with a deadline.
        std::thread::sleep(Duration::from_millis(50));
    }
    let created = request(port, "PUT", "/bench").expect("create bucket");
    assert!(created.starts_with("HTTP/1.1 200") || created.starts_with("HTTP/1.0 200"), "{created}");
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("bench")
            .with_secret_access_key("bench")
            .with_bucket_name("bench")
            .build()
            .expect("S3 client"),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    Moto {
        child,
        endpoint,
        client,
        rt,
    }
}

impl Moto {
    /// The sink OPTIONS for a table in the bucket.
    pub fn options(&self) -> String {
        format!(
            "'s3.endpoint' '{}', 's3.allow_http' 'true', 's3.region' 'us-east-1', 's3.access_key_id' 'bench', 's3.secret_access_key' 'bench'",
            self.endpoint
        )
    }

    /// Rows output by every entry of the table under `prefix`, and its newest entry.
    pub fn log_totals(&self, prefix: &str) -> (u64, Option<serde_json::Value>) {
        self.rt.block_on(async {
            let dir = Path::from(format!("{prefix}/_sluice/log"));
            let Ok(metas) = self.client.list(Some(&dir)).try_collect::<Vec<_>>().await else {
                return (0, None);
            };
            let mut names: Vec<Path> = metas.into_iter().map(|m| m.location).collect();
            names.sort();
            let (mut output, mut last) = (0, None);
            for p in names {
                let Ok(r) = self.client.get(&p).await else { continue };
                let Ok(b) = r.bytes().await else { continue };
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                    output += v["counts"]["output"].as_u64().unwrap_or(0);
                    last = Some(v);
                }
            }
            (output, last)
        })
    }
}
