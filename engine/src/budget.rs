//! Memory budgets: bytes a pipeline may hold between intake and commit, and the server-wide
//! budget that decides, by source priority, who is refused first.
//!
//! A source acquires a chunk's bytes before handing it over and the pipeline releases them once
//! the chunk is committed, so `used` bounds everything buffered (channel, open batch, the batch
//! being committed). A low-priority source is refused once the server is half full, a normal one
//! at 80%, a high one only when the server budget itself is exhausted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_sql::{OptionError, OptionSpec, Options, option_bytes, option_choice, option_duration};
use tokio::sync::Notify;

/// Default longest wait of a held request (`block.timeout`).
pub const DEFAULT_BLOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default per-pipeline budget (`buffer.max_bytes`).
pub const DEFAULT_PIPELINE_BUDGET: u64 = 64 << 20;
/// Default server-wide budget (`sluice run --max-buffer-bytes`).
pub const DEFAULT_SERVER_BUDGET: u64 = 256 << 20;

/// What a source does when its pipeline's budget is full (`when_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse the input (HTTP answers 429 with `Retry-After`). The default.
    Reject,
    /// Hold the input until room frees.
    Block,
    /// Accept the input into the source's durable log without holding it in memory; the
    /// pipeline re-reads it from the log when room frees. Sources without a log (directories)
    /// behave as `Block`: their input is already on disk.
    Spill,
}

/// Who is refused first when the server is short of memory (`priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Refused once the server budget is 50% used.
    Low,
    /// Refused once it is 80% used. The default.
    Normal,
    /// Refused only when it is full.
    High,
}

impl Priority {
    fn share(self) -> (u64, u64) {
        match self {
            Priority::Low => (1, 2),
            Priority::Normal => (4, 5),
            Priority::High => (1, 1),
        }
    }
}

/// The buffering options of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPolicy {
    /// The pipeline's budget in bytes.
    pub max_bytes: u64,
    /// Reject or block when full.
    pub when_full: WhenFull,
    /// Priority against other sources of the server.
    pub priority: Priority,
    /// With `block`: longest a request is held waiting for room before it is refused (429).
    pub block_timeout: std::time::Duration,
}

impl Default for BufferPolicy {
    fn default() -> Self {
        BufferPolicy {
            max_bytes: DEFAULT_PIPELINE_BUDGET,
            when_full: WhenFull::Reject,
            priority: Priority::Normal,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
        }
    }
}

impl BufferPolicy {
    /// The OPTIONS keys every source accepts for buffering.
    pub fn option_specs() -> Vec<OptionSpec> {
        vec![
            OptionSpec {
                key: "buffer.max_bytes",
                doc: "bytes the pipeline may buffer before pushing back, e.g. '64MB' (default 64MB)",
            },
            OptionSpec {
                key: "when_full",
                doc: "'reject' (HTTP 429, default), 'block' (hold the request until room frees) or 'spill' (accept into the durable log, re-read it when room frees)",
            },
            OptionSpec {
                key: "block.timeout",
                doc: "with 'block': longest a request is held waiting for room before it is refused with 429, e.g. '5s' (default 30s)",
            },
            OptionSpec {
                key: "priority",
                doc: "'low', 'normal' (default) or 'high': who is refused first when the server is short of memory",
            },
        ]
    }

    /// Reads the buffering options.
    pub fn from_options(options: &Options) -> Result<Self, OptionError> {
        Ok(BufferPolicy {
            max_bytes: option_bytes(options, "buffer.max_bytes", DEFAULT_PIPELINE_BUDGET)?,
            when_full: option_choice(
                options,
                "when_full",
                WhenFull::Reject,
                &[
                    ("reject", WhenFull::Reject),
                    ("block", WhenFull::Block),
                    ("spill", WhenFull::Spill),
                ],
            )?,
            priority: option_choice(
                options,
                "priority",
                Priority::Normal,
                &[
                    ("low", Priority::Low),
                    ("normal", Priority::Normal),
                    ("high", Priority::High),
                ],
            )?,
            block_timeout: option_duration(options, "block.timeout", DEFAULT_BLOCK_TIMEOUT)?,
        })
    }
}

/// The server-wide budget shared by every pipeline.
#[derive(Debug)]
pub struct ServerBudget {
    max: u64,
    used: AtomicU64,
    /// Woken whenever any pipeline gives bytes back (a waiter may be short of the server's
    /// share, not its own).
    freed: Notify,
    /// Held while a reservation checks and adds (see [`Budget::try_acquire`]).
    reserve: std::sync::Mutex<()>,
}

impl ServerBudget {
    /// A server budget of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(ServerBudget {
            max,
            used: AtomicU64::new(0),
            freed: Notify::new(),
            reserve: std::sync::Mutex::new(()),
        })
    }

    /// Bytes in use across the server.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Counts `bytes` held outside any pipeline's budget (an HTTP source's idempotency window)
    /// against the server's room for buffered input. Never refused: the holder bounds itself.
    pub fn hold(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives back bytes counted by [`ServerBudget::hold`].
    pub fn unhold(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(bytes)));
        self.freed.notify_waiters();
    }
}

/// One pipeline's budget.
#[derive(Debug)]
pub struct Budget {
    pipeline: String,
    policy: BufferPolicy,
    used: AtomicU64,
    server: Arc<ServerBudget>,
    freed: Notify,
}

impl Budget {
    /// A pipeline budget drawing on `server`.
    pub fn new(pipeline: &str, policy: BufferPolicy, server: Arc<ServerBudget>) -> Arc<Self> {
        Arc::new(Budget {
            pipeline: pipeline.to_string(),
            policy,
            used: AtomicU64::new(0),
            server,
            freed: Notify::new(),
        })
    }

    /// The server-wide budget this one draws on.
    pub fn server(&self) -> &Arc<ServerBudget> {
        &self.server
    }

    /// The policy.
    pub fn policy(&self) -> BufferPolicy {
        self.policy
    }

    /// Bytes held by the pipeline.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` if both the pipeline and (by priority) the server have room. A chunk larger
    /// than the whole budget is admitted when the pipeline holds nothing, so it cannot starve.
    pub fn try_acquire(&self, bytes: u64) -> bool {
        let (num, den) = self.policy.priority.share();
        let server_cap = self.server.max / den * num;
        // Check and add both counters under one lock, so concurrent producers never overshoot
        // the budget and no reservation is ever taken back (an undo would have to wake
        // waiters, and would wake the reserver itself). Reads and releases stay lock-free.
        let _reserving = self.server.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let mine = self.used.load(Ordering::Acquire);
        let server = self.server.used.load(Ordering::Acquire);
        let fits_mine = mine + bytes <= self.policy.max_bytes || mine == 0;
        let fits_server = server + bytes <= server_cap || (server == 0 && mine == 0);
        if !(fits_mine && fits_server) {
            return false;
        }
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.server.used.fetch_add(bytes, Ordering::AcqRel);
        self.gauge();
        true
    }

    /// Takes `bytes`, waiting for room; returns false if `stop` fires first.
    pub async fn acquire(&self, bytes: u64, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        loop {
            let notified = self.freed.notified();
            let server_freed = self.server.freed.notified();
            if self.try_acquire(bytes) {
                return true;
            }
            if *stop.borrow() {
                return false;
            }
            tokio::select! {
                _ = notified => {}
                _ = server_freed => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Returns `bytes` (after a commit).
    pub fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(bytes)));
        let _ = self
            .server
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(bytes)));
        self.gauge();
        self.freed.notify_waiters();
        self.server.freed.notify_waiters();
    }

    fn gauge(&self) {
        metrics::gauge!("sluice_buffer_bytes", "pipeline" => self.pipeline.clone()).set(self.used() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_and_priority_limits() {
        let server = ServerBudget::new(1000);
        let low = Budget::new(
            "low",
            BufferPolicy {
                max_bytes: 800,
                when_full: WhenFull::Reject,
                priority: Priority::Low,
                ..Default::default()
            },
            server.clone(),
        );
        let high = Budget::new(
            "high",
            BufferPolicy {
                max_bytes: 800,
                when_full: WhenFull::Reject,
                priority: Priority::High,
                ..Default::default()
            },
            server.clone(),
        );
        assert!(low.try_acquire(400));
        assert!(!low.try_acquire(200), "low is refused past 50% of the server");
        assert!(high.try_acquire(500));
        assert!(!high.try_acquire(200), "the server is full");
        low.release(400);
        assert!(high.try_acquire(200));
        assert!(!high.try_acquire(200), "high's own budget is 800");
        assert_eq!(server.used(), 700);
    }

    #[tokio::test]
    async fn block_waits_for_release() {
        let server = ServerBudget::new(1 << 20);
        let b = Budget::new(
            "p",
            BufferPolicy {
                max_bytes: 100,
                ..Default::default()
            },
            server,
        );
        assert!(b.try_acquire(100));
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(50, &mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        b.release(100);
        assert!(waiter.await.unwrap());
        assert_eq!(b.used(), 50);
    }

    // A waiter short of the server's share (not its own) wakes when another pipeline frees
    // bytes; it used to wait for its own pipeline's release, which never came.
    #[tokio::test]
    async fn a_waiter_short_of_the_server_share_wakes_when_another_pipeline_frees() {
        let server = ServerBudget::new(1000);
        let policy = BufferPolicy {
            max_bytes: 1000,
            priority: Priority::High,
            ..Default::default()
        };
        let (a, b) = (
            Budget::new("a", policy, server.clone()),
            Budget::new("b", policy, server),
        );
        assert!(a.try_acquire(1000));
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(500, &mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.release(1000);
        let woke = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
        assert!(woke.expect("woken by the other pipeline's release").unwrap());
        assert_eq!(b.used(), 500);
    }
}
