//! The retry policy for transient failures (object store and local I/O): exponential back-off
//! with jitter, capped. Bad data, validation errors and conflicts are never retried.

use std::future::Future;
use std::time::Duration;

use crate::error::{EngineError, Result};

/// First delay.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay.
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// Attempts before giving up (the first try included).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 6;

/// Exponential, jittered, capped back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Cap on any delay.
    pub max_delay: Duration,
    /// Attempts in all.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: DEFAULT_RETRY_INITIAL,
            max_delay: DEFAULT_RETRY_MAX_DELAY,
            max_attempts: DEFAULT_RETRY_ATTEMPTS,
        }
    }
}

/// True for errors worth another try: I/O and object-store failures other than "not found",
/// "already exists" and precondition failures (those are answers, not accidents).
pub fn is_transient(e: &EngineError) -> bool {
    match e {
        EngineError::Io { .. } | EngineError::Environment(_) => true,
        EngineError::Store { source, .. } => !matches!(
            source,
            object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::InvalidPath { .. }
        ),
        _ => false,
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1), with full jitter in
    /// [delay/2, delay].
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.max_delay);
        let half = d / 2;
        half + Duration::from_nanos(jitter_nanos() % (half.as_nanos() as u64 + 1))
    }

    /// Runs `f` until it succeeds, fails with a non-transient error, or attempts run out.
    pub async fn run<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && attempt < self.max_attempts => {
                    tracing::warn!(what, attempt, error = %e, "transient failure; retrying");
                    metrics::counter!("sluice_retries_total").increment(1);
                    // Back-off between attempts (not test synchronisation).
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn jitter_nanos() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    // xorshift over a shared state, seeded by the clock on first use.
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0x9E37_79B9_7F4A_7C15 {
        x ^= std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            max_attempts: 5,
        };
        for a in 1..10 {
            let d = p.delay(a);
            let cap = (Duration::from_millis(100) * (1 << (a - 1).min(10))).min(Duration::from_millis(400));
            assert!(d >= cap / 2 && d <= cap, "attempt {a}: {d:?} vs {cap:?}");
        }
    }

    #[tokio::test]
    async fn retries_only_transient_errors() {
        let p = RetryPolicy {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_attempts: 4,
        };
        let n = AtomicU32::new(0);
        let r: Result<()> = p
            .run("io", || async {
                n.fetch_add(1, Ordering::Relaxed);
                Err(EngineError::io("x")(std::io::Error::other("boom")))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::Relaxed), 4);
        n.store(0, Ordering::Relaxed);
        let r: Result<()> = p
            .run("bad", || async {
                n.fetch_add(1, Ordering::Relaxed);
                Err(EngineError::BadInput("no".into()))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::Relaxed), 1);
    }
}
