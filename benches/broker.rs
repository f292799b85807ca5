//! The Kafka row's broker: tansu (installed by `scripts/setup.sh --test`) on a free loopback
//! port with in-memory storage, a topic, and the generated events produced into it before the
//! timed run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// The tansu binary, when installed.
pub fn tansu() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SLUICE_TANSU") {
        return Some(PathBuf::from(p));
    }
    let tools = std::env::var("SLUICE_TOOLS")
        .unwrap_or_else(|_| format!("{}/.cache/sluice-tools", std::env::var("HOME").unwrap_or_default()));
    let p = PathBuf::from(tools).join("tansu/bin/tansu");
    p.exists().then_some(p)
}

/// A running broker, killed when dropped.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(addr: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr);
    c
}

/// Starts tansu and waits until it answers.
pub fn start(bin: &Path) -> Broker {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(bin)
        .args(["broker", "--storage-engine", "memory://tansu/"])
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let addr = format!("127.0.0.1:{port}");
    let probe: BaseProducer = client(&addr).create().expect("client");
    let end = Instant::now() + Duration::from_secs(60);
    while probe.client().fetch_metadata(None, Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < end, "tansu did not answer");
    }
    Broker { child, addr }
}

/// Creates `topic` and produces every line of `files` into it, round-robin over `partitions`;
/// returns the messages produced.
pub fn load(broker: &Broker, topic: &str, partitions: i32, files: &[PathBuf]) -> u64 {
    let admin: AdminClient<DefaultClientContext> = client(&broker.addr).create().expect("admin");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in futures::executor::block_on(admin.create_topics(&[new], &AdminOptions::new())).expect("create topic") {
        r.expect("topic created");
    }
    let producer: BaseProducer = client(&broker.addr)
        .set("linger.ms", "20")
        .set("compression.type", "none")
        .create()
        .expect("producer");
    let mut n: u64 = 0;
    for f in files {
        let text = std::fs::read(f).expect("input file");
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let partition = (n % partitions as u64) as i32;
            let mut record = BaseRecord::<(), [u8]>::to(topic).payload(line).partition(partition);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        producer.poll(Duration::from_millis(20));
                        record = r;
                    }
                    Err((e, _)) => panic!("producing: {e}"),
                }
            }
            n += 1;
        }
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    n
}

/// The broker's own ceiling: a bare librdkafka consumer (the same client library and fetch
/// settings as the source, nothing decoded or written) reading all `messages` of `topic` from
/// the start. Returns the wall seconds and the consumer's CPU seconds.
pub fn consume_all(broker: &Broker, topic: &str, partitions: i32, messages: u64) -> (f64, f64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client(&broker.addr)
        .set("group.id", "bench-floor")
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "32768")
        .set("fetch.max.bytes", "33554432")
        .set("max.partition.fetch.bytes", "16777216")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    consumer.assign(&tpl).expect("assign");
    let mut n = 0u64;
    let mut bytes = 0usize;
    while n < messages {
        assert!(t0.elapsed() < Duration::from_secs(600), "floor consumer timed out");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    std::hint::black_box(bytes);
    (t0.elapsed().as_secs_f64(), thread_cpu() - cpu0)
}

/// CPU seconds used by this process so far.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}
