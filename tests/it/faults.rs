//! A faulty object store under the sink: by seeded chance each call fails, stalls, or is
//! performed and then reports an error. Over many seeds the pipeline still commits every record
//! exactly once (checked with an independent reader on the real files).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use sluice_connectors::parquet::ParquetSinkFactory;
use sluice_engine::store::TableStore;
use sluice_engine::connector::registry::SinkFactory;
use sluice_engine::server::runtime::{ServerConfig, start};
use sluice_engine::connector::sink::Sink;
use sluice_sql::{ConnectorSpec, PipelineText, SinkDef};

use crate::harness::{committed_output, drop_file, read_hive};

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    FailBefore,
    FailAfter,
    Stall,
}

/// An object store that injects faults by seeded chance.
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: AtomicU64,
    /// Percent of calls that get a fault.
    percent: u64,
    injected: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore")
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

fn injected(op: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault in {op}").into(),
    }
}

impl FaultyStore {
    fn roll(&self, op: &'static str) -> Fault {
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        let r = x % 100;
        let f = if r >= self.percent {
            Fault::None
        } else {
            match x / 100 % 3 {
                0 => Fault::FailBefore,
                1 => Fault::FailAfter,
                _ => Fault::Stall,
            }
        };
        if f != Fault::None {
            *self.injected.lock().unwrap().entry(op).or_default() += 1;
        }
        f
    }

    /// Runs a mutating call under a fault.
    async fn mutate<T>(&self, op: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
        match self.roll(op) {
            Fault::FailBefore => Err(injected(op)),
            Fault::FailAfter => {
                call.await?;
                Err(injected(op))
            }
            Fault::Stall => {
                // A slow store, injected on purpose.
                tokio::time::sleep(Duration::from_millis(30)).await;
                call.await
            }
            Fault::None => call.await,
        }
    }

    /// Runs a reading call under a fault (performed-then-failed is just a failure for reads).
    async fn read<T>(&self, op: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
        match self.roll(op) {
            Fault::FailBefore | Fault::FailAfter => Err(injected(op)),
            Fault::Stall => {
                tokio::time::sleep(Duration::from_millis(30)).await;
                call.await
            }
            Fault::None => call.await,
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.mutate("put", self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.read("put_multipart", self.inner.put_multipart_opts(location, opts))
            .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.read("get", self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.read("get_ranges", self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        match self.roll("delete") {
            Fault::FailBefore => stream::once(async { Err(injected("delete")) }).boxed(),
            _ => self.inner.delete_stream(locations),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.roll("list") {
            Fault::FailBefore | Fault::FailAfter => stream::once(async { Err(injected("list")) }).boxed(),
            _ => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.read("list_with_delimiter", self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.mutate("copy", self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.mutate("rename", self.inner.rename_opts(from, to, options)).await
    }
}

/// The Parquet sink, over a faulty store (any LOCATION the sink takes, local or S3).
pub(crate) struct FaultySinkFactory {
    /// Seeds the faults.
    pub(crate) seed: u64,
    /// Faults injected, by call.
    pub(crate) injected: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

impl SinkFactory for FaultySinkFactory {
    fn spec(&self) -> ConnectorSpec {
        ParquetSinkFactory.spec()
    }

    fn create(&self, def: &SinkDef) -> sluice_engine::Result<Arc<dyn Sink>> {
        let table = TableStore::open_for(&def.location, &def.options)?;
        let faulty = Arc::new(FaultyStore {
            inner: table.store.clone(),
            state: AtomicU64::new(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            percent: 10,
            injected: self.injected.clone(),
        });
        let table = table.wrapped(faulty);
        sluice_connectors::parquet::sink_on(table, def)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_object_store_over_many_seeds() {
    let seeds = 50u64;
    let (files, per) = (3i64, 400i64);
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 1..=seeds {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("in");
        std::fs::create_dir_all(&incoming).unwrap();
        let sink = dir.path().join("lake/out");
        for f in 0..files {
            let body: Vec<String> = (f * per..(f + 1) * per).map(|i| format!("{{\"id\": {i}}}")).collect();
            drop_file(&incoming, &format!("{f:03}.ndjson"), &body.join("\n"));
        }
        let sql = format!(
            "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL) STORED AS NDJSON LOCATION '{}'
             OPTIONS ('poll_interval' '20ms', 'batch.interval' '20ms', 'batch.max_rows' '400');
             CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION '{}';
             INSERT INTO out SELECT id, id % 4 AS part FROM ev;",
            incoming.display(),
            sink.display()
        );
        let injected = Arc::new(Mutex::new(BTreeMap::new()));
        let mut registry = sluice_connectors::registry_with_state(&dir.path().join(".sluice"));
        registry.add_sink(Arc::new(FaultySinkFactory {
            seed,
            injected: injected.clone(),
        }));
        let text = PipelineText::new("faulty.sql", sql).unwrap();
        let server = start(&[text], &registry, ServerConfig::new("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: start failed: {e}"));
        let want = (files * per) as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while committed_output(&sink) < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "seed {seed}: timed out; injected {:?}",
                injected.lock().unwrap()
            );
            // Polling interval of a condition wait with a deadline.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.shutdown_trigger().trigger();
        server.wait().await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let batches = read_hive(&sink, &[("part", DataType::Int64)], "SELECT id FROM t").await;
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            (0..files * per).collect::<Vec<_>>(),
            "seed {seed}: every id exactly once"
        );
        for (k, v) in injected.lock().unwrap().iter() {
            *totals.entry(k).or_default() += v;
        }
    }
    let total: u64 = totals.values().sum();
    assert!(total > seeds, "faults were injected: {totals:?}");
    eprintln!("faulty store: {seeds} seeds, injected faults by call: {totals:?}");
}

/// A store that performs the first commit-entry put and then reports it failed (its answer
/// lost), fails the next ones until the commit log's own retries give up, and remembers the
/// bytes first staged under each path.
struct LostAnswerStore {
    inner: Arc<dyn ObjectStore>,
    log_puts: AtomicU64,
    first_staged: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl fmt::Debug for LostAnswerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LostAnswerStore")
    }
}

impl fmt::Display for LostAnswerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LostAnswerStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for LostAnswerStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let path = location.to_string();
        if path.contains("_sluice/staging/") {
            let bytes: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
            self.first_staged
                .lock()
                .unwrap()
                .entry(path.replace("_sluice/staging/out/", ""))
                .or_insert_with(|| Bytes::from(bytes));
        }
        if path.contains("_sluice/log/") {
            let n = self.log_puts.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                self.inner.put_opts(location, payload, opts).await?;
                return Err(injected("put (performed, answer lost)"));
            }
            if n < u64::from(sluice_engine::retry::DEFAULT_RETRY_ATTEMPTS) {
                return Err(injected("put"));
            }
        }
        self.inner.put_opts(location, payload, opts).await
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

struct LostAnswerSinkFactory {
    first_staged: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl SinkFactory for LostAnswerSinkFactory {
    fn spec(&self) -> ConnectorSpec {
        ParquetSinkFactory.spec()
    }

    fn create(&self, def: &SinkDef) -> sluice_engine::Result<Arc<dyn Sink>> {
        let table = TableStore::open(&def.location)?;
        let store = Arc::new(LostAnswerStore {
            inner: table.store.clone(),
            log_puts: AtomicU64::new(0),
            first_staged: self.first_staged.clone(),
        });
        sluice_connectors::parquet::sink_on(table.wrapped(store), def)
    }
}

// Reproducer for #12 (item 4): the commit entry reached the log but its answer was lost. The
// retry must re-commit exactly what was staged — not transform and stage again (`random()`
// and the order of DataFusion's partitions make a second run differ), which made the entries
// differ (a false "two servers" stop) or the committed files differ from what the entry says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_commit_recommits_what_was_staged() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("in");
    std::fs::create_dir_all(&incoming).unwrap();
    let sink = dir.path().join("lake/out");
    let body: Vec<String> = (0..2000).map(|i| format!("{{\"id\": {i}}}")).collect();
    drop_file(&incoming, "000.ndjson", &body.join("\n"));
    let sql = format!(
        "CREATE UNBOUNDED EXTERNAL TABLE ev (id BIGINT NOT NULL) STORED AS NDJSON LOCATION '{}'
         OPTIONS ('poll_interval' '20ms', 'batch.interval' '20ms');
         CREATE EXTERNAL TABLE out STORED AS PARQUET PARTITIONED BY (part) LOCATION '{}';
         INSERT INTO out SELECT id, random() AS r, id % 3 AS part FROM ev;",
        incoming.display(),
        sink.display()
    );
    let first_staged = Arc::new(Mutex::new(BTreeMap::new()));
    let mut registry = sluice_connectors::registry_with_state(&dir.path().join(".sluice"));
    registry.add_sink(Arc::new(LostAnswerSinkFactory {
        first_staged: first_staged.clone(),
    }));
    let text = PipelineText::new("lost.sql", sql).unwrap();
    let server = start(&[text], &registry, ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    // 70 s: the commit log's own back-off comes first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(70);
    while committed_output(&sink) < 2000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the commit"
        );
        // Polling interval of a condition wait with a deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown_trigger().trigger();
    server
        .wait()
        .await
        .expect("the pipeline stops cleanly (no false 'two servers' error)");
    let staged = first_staged.lock().unwrap();
    let entries = crate::harness::log_entries(&sink);
    let mut files = 0;
    for e in &entries {
        for f in e["add"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            let on_disk = std::fs::read(sink.join(path)).unwrap();
            assert_eq!(
                on_disk.len() as u64,
                f["bytes"].as_u64().unwrap(),
                "{path}: size in the entry"
            );
            assert_eq!(
                Some(on_disk.as_slice()),
                staged.get(path).map(|b| b.as_ref()),
                "{path}: the committed file is the one first staged"
            );
            files += 1;
        }
    }
    assert!(files >= 3, "{files} files committed");
}
