//! Real services for the tests, started on random loopback ports and stopped when dropped: a
//! Kafka-protocol broker (tansu, with in-memory storage, or on an S3 server to survive restarts). Installed by `scripts/setup.sh --test`
//! under `~/.cache/sluice-tools/` (or `$SLUICE_TOOLS`); `$SLUICE_TANSU` names another binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};

use crate::harness::{free_port, tools_dir, wait_until};

/// The tansu binary.
pub fn tansu() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_TANSU") {
        return PathBuf::from(p);
    }
    let cached = tools_dir().join("tansu/bin/tansu");
    assert!(
        cached.exists(),
        "no Kafka-protocol broker at {}: run scripts/setup.sh --test",
        cached.display()
    );
    cached
}

/// A tansu broker on a random loopback port, killed when dropped.
pub struct Broker {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    /// `--storage-engine`.
    storage: String,
    /// Environment of the broker process (the S3 client's, for S3 storage).
    env: Vec<(&'static str, String)>,
}

impl Broker {
    /// Starts a broker with in-memory storage, logging under `dir`, and waits until it answers
    /// metadata requests.
    pub fn start(dir: &Path) -> Broker {
        Self::start_with(dir, "memory://tansu/", Vec::new())
    }

    /// Starts a broker whose storage is bucket `bucket` of an S3 server (`env`: its `AWS_*`
    /// settings), so that its topics survive a restart ([`Broker::restart`]).
    pub fn start_on_s3(dir: &Path, bucket: &str, env: Vec<(&'static str, String)>) -> Broker {
        Self::start_with(dir, &format!("s3://{bucket}/"), env)
    }

    fn start_with(dir: &Path, storage: &str, env: Vec<(&'static str, String)>) -> Broker {
        let port = free_port();
        let log = dir.join(format!("tansu-{port}.log"));
        let mut b = Broker {
            child: None,
            port,
            log,
            storage: storage.into(),
            env,
        };
        b.spawn();
        b
    }

    /// Starts the killed broker again on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the broker first");
        self.spawn();
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log");
        let child = Command::new(tansu())
            .args(["broker", "--storage-engine", &self.storage])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(err.try_clone().expect("broker log"))
            .stderr(err)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let client: BaseProducer = self.config().create().expect("metadata client");
        wait_until(Duration::from_secs(60), "the broker to answer", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "tansu exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            client.client().fetch_metadata(None, Duration::from_millis(500)).ok()
        });
    }

    /// `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A client configuration for this broker.
    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        c
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().expect("admin client");
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = futures::executor::block_on(admin.create_topics(&[new], &opts)).expect("create topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }

    /// A producer that counts failed deliveries. Each message is a record batch of its own:
    /// tansu 0.6's fetch (dynostore) returns the batches that *start* at or after the offset
    /// asked for, so a consumer resuming in the middle of a batch would never get that batch's
    /// remaining records (a real Kafka broker returns the batch containing the offset).
    pub fn producer(&self) -> TestProducer {
        let failed = Arc::new(AtomicU64::new(0));
        let producer: BaseProducer<Counting> = self
            .config()
            .set("batch.num.messages", "1")
            .create_with_context(Counting(failed.clone()))
            .expect("producer");
        TestProducer { producer, failed }
    }

    /// Kills the broker.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counts failed deliveries.
pub struct Counting(Arc<AtomicU64>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A producer to the test broker.
pub struct TestProducer {
    producer: BaseProducer<Counting>,
    failed: Arc<AtomicU64>,
}

impl TestProducer {
    /// Sends one message (to `partition`, or by key), waiting for queue room.
    pub fn send(&self, topic: &str, partition: Option<i32>, key: Option<&str>, value: &[u8]) {
        let mut record = BaseRecord::to(topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Serves delivery reports until the queue has room (a bounded wait).
                    self.producer.poll(Duration::from_millis(50));
                    record = r;
                }
                Err((e, _)) => panic!("producing to {topic}: {e}"),
            }
        }
    }

    /// Waits until everything sent is delivered, and asserts none failed.
    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(120)).expect("flush");
        assert_eq!(self.failed.load(Ordering::Relaxed), 0, "failed deliveries");
    }
}
