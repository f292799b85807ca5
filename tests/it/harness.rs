//! Test harness: starts the real `sluice` binary on a random loopback port, waits on conditions
//! with deadlines, and reads sink tables independently of Sluice (DataFusion over the hive
//! layout, not through Sluice's own reader).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::prelude::SessionContext;

/// The `sluice` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// The repository root (examples use paths relative to it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the project's setup script caches the tools the tests use (`$SLUICE_TOOLS`, default
/// `~/.cache/sluice-tools`): the readers' virtualenv, the Kafka-protocol broker.
pub fn tools_dir() -> PathBuf {
    std::env::var("SLUICE_TOOLS").map_or_else(
        |_| PathBuf::from(format!("{}/.cache/sluice-tools", std::env::var("HOME").unwrap_or_default())),
        PathBuf::from,
    )
}

/// Polls `f` until it returns `Some`, failing the test after `deadline`.
pub fn wait_until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        // Polling interval of a condition wait with a deadline, not a synchronisation sleep.
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A running `sluice run` process.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stderr: PathBuf,
}

impl Server {
    /// Starts `sluice run FILES --listen 127.0.0.1:0` in `cwd` and waits for it to listen.
    pub fn start(files: &[&Path], cwd: &Path) -> Server {
        Server::start_with(files, cwd, 0, &[])
    }

    /// Starts `sluice run FILES --listen 127.0.0.1:PORT` (0 = any) in `cwd` with extra
    /// environment variables, and waits for it to listen.
    pub fn start_with(files: &[&Path], cwd: &Path, port: u16, env: &[(&str, &str)]) -> Server {
        Server::start_full(files, cwd, port, env, &[])
    }

    /// Starts `sluice run FILES --listen 127.0.0.1:PORT ARGS...` in `cwd` with extra
    /// environment variables, and waits for it to listen.
    pub fn start_full(files: &[&Path], cwd: &Path, port: u16, env: &[(&str, &str)], args: &[&str]) -> Server {
        let (mut child, rx, stderr) = Server::spawn(files, cwd, port, env, args);
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sluice did not start: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        let base = line
            .strip_prefix("sluice listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Server {
            child: Some(child),
            base,
            stderr,
        }
    }

    /// Starts `sluice run FILES --listen 127.0.0.1:PORT` (a port chosen by the caller) and
    /// returns at once, before it says it listens (a server whose pipelines wait for leases
    /// answers `/healthz` before that).
    pub fn spawn_on(files: &[&Path], cwd: &Path, port: u16, env: &[(&str, &str)]) -> Server {
        assert_ne!(port, 0, "spawn_on needs a known port");
        let (child, _rx, stderr) = Server::spawn(files, cwd, port, env, &[]);
        Server {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            stderr,
        }
    }

    /// Spawns `sluice run`; its stdout lines arrive on the receiver (read until the pipe
    /// closes, so the server never blocks on a full pipe).
    fn spawn(
        files: &[&Path],
        cwd: &Path,
        port: u16,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> (Child, mpsc::Receiver<String>, PathBuf) {
        install_crypto();
        let stderr = cwd.join(format!(
            "sluice-stderr-{}.log",
            std::process::id() as u64 * 1000 + next_id()
        ));
        let err_file = std::fs::File::create(&stderr).expect("create stderr log");
        let mut child = Command::new(bin())
            .arg("run")
            .args(files)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (child, rx, stderr)
    }

    /// The file the server's stderr (its log) goes to.
    pub fn stderr_path(&self) -> PathBuf {
        self.stderr.clone()
    }

    /// A URL on the server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM, waits (with a deadline) for the exit, and fails the test with the
    /// server's log unless it exited 0.
    pub fn stop(self) {
        let log = self.stderr.clone();
        let status = self.terminate();
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "sluice exited with {status:?} after SIGTERM; last log lines:\n{}",
                tail.join("\n")
            );
        }
    }

    /// Sends SIGTERM and waits (with a deadline) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        wait_until(Duration::from_secs(60), "sluice to exit after SIGTERM", || {
            child.try_wait().ok().flatten()
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Waits (with a deadline) for the process to exit by itself (e.g. at a crash point).
    pub fn wait_exit(mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let end = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("timed out after {deadline:?} waiting for sluice to exit by itself");
            }
            // Polling interval of a condition wait with a deadline.
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills with SIGKILL (no chance to flush).
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Reads a hive-partitioned Parquet directory with plain DataFusion (no Sluice code), the way
/// any external reader would, and runs `sql` over it as table `t`.
pub async fn read_hive(dir: &Path, partitions: &[(&str, DataType)], sql: &str) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    let opts = ListingOptions::new(std::sync::Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(partitions.iter().map(|(n, t)| (n.to_string(), t.clone())).collect());
    let url = format!("file://{}/", dir.canonicalize().expect("sink dir exists").display());
    ctx.register_listing_table("t", &url, opts, None, None)
        .await
        .expect("register listing table");
    ctx.sql(sql).await.expect("plan").collect().await.expect("query")
}

/// Sum of `counts.output` over every commit entry of a sink (0 when there is none).
pub fn committed_output(sink: &Path) -> u64 {
    log_entries(sink)
        .iter()
        .map(|e| e["counts"]["output"].as_u64().unwrap_or(0))
        .sum()
}

/// Every commit entry of a sink, parsed, in epoch order.
pub fn log_entries(sink: &Path) -> Vec<serde_json::Value> {
    let dir = sink.join("_sluice/log");
    let mut names: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => return vec![],
    };
    names.sort();
    names
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// Every dead letter of a sink, parsed.
pub fn dead_letters(sink: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in log_entries(sink) {
        for f in e["dead_letters"].as_array().cloned().unwrap_or_default() {
            let path = sink.join(f["path"].as_str().expect("path"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("dead-letter file {} missing", path.display()));
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("dead letter is JSON")),
            );
        }
    }
    out
}

/// Writes `content` to `dir/name` atomically (write a dot-file, then rename), as the directory
/// source's producer contract asks.
pub fn drop_file(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

/// Every file (not directory) under `dir`, recursively, as paths relative to it.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Runs `sluice ARGS` in `cwd` until it exits by itself (deadline 60 s); returns its exit code
/// and its stdout followed by its stderr (through files, so a chatty process cannot block on a
/// full pipe).
pub fn run_to_exit(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = tempfile::NamedTempFile::new().expect("stdout file");
    let err = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .stdout(out.reopen().expect("stdout"))
        .stderr(err.reopen().expect("stderr"))
        .spawn()
        .expect("spawn sluice");
    // A deadline for a hang, not a speed check: a reconcile on the embedded Ballista cluster
    // took over 60 s once under the full suite's load on 2 cores.
    let status = wait_until(Duration::from_secs(180), "sluice to exit by itself", || {
        child.try_wait().ok().flatten()
    });
    let mut text = std::fs::read_to_string(out.path()).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(err.path()).unwrap_or_default());
    (status.code().unwrap_or(-1), text)
}

/// A free loopback port (bound and released; the server binds it again right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A small deterministic generator (xorshift), for chaos timing and data.
pub struct Rng(pub u64);

impl Rng {
    /// The next value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo).max(1)
    }
}

/// Peak resident memory (VmHWM) of a process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Installs rustls's ring provider for the process (reqwest's clients need one; the project
/// builds rustls with ring only).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A two-worker tokio runtime for a test's clients (the server under test is another process).
pub fn runtime() -> tokio::runtime::Runtime {
    install_crypto();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
