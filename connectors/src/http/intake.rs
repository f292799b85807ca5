//! Reading a request body off the wire within the server's limits: its bytes are charged to the
//! [`BodyBudget`] as they arrive (never a declared length), each piece must come within the read
//! timeout and the whole at the minimum rate, the size is capped, and a gzip body is inflated
//! with its inflated size capped the same way. Whatever is held is given back when the request
//! ends, however it ends (the [`BodyCharge`] is dropped with it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt;

use super::body::Refusal;

/// Default [`BodyLimits::read_timeout`].
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`BodyLimits::min_rate`]: 1 KiB/s.
pub const DEFAULT_MIN_BODY_RATE: u64 = 1024;
/// Most bytes of a refused over-long body read and dropped before the connection is closed.
const DRAIN_BYTES: u64 = 64 << 20;
/// Inflated bytes produced per step (and charged to the budget before the next).
const INFLATE_STEP: usize = 64 << 10;

/// How a body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Longest wait for the next piece of a body; also the grace before the rate applies.
    pub read_timeout: Duration,
    /// Bytes per second a body must average once the grace is over.
    pub min_rate: u64,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            min_rate: DEFAULT_MIN_BODY_RATE,
        }
    }
}

/// The bytes of request bodies held at once, across every HTTP source: each body is charged
/// as its bytes arrive (and as it inflates), so slow or many clients cannot pin more than the
/// budget, and a client that declares a large length but sends nothing holds nothing.
#[derive(Debug)]
pub struct BodyBudget {
    max: u64,
    used: AtomicU64,
}

impl BodyBudget {
    /// At most `max` bytes of bodies at once (one body alone may always grow to its limit).
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(BodyBudget {
            max,
            used: AtomicU64::new(0),
        })
    }

    /// A charge of nothing yet, grown as bytes arrive.
    pub fn charge(self: &Arc<Self>) -> BodyCharge {
        BodyCharge(self.clone(), 0)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes of one body held, given back when dropped (the request done or its client gone).
#[derive(Debug)]
pub struct BodyCharge(Arc<BodyBudget>, u64);

impl BodyCharge {
    /// Takes `n` more bytes; false when the budget cannot hold them (unless this body is the
    /// only one held: one body may always reach its own limit).
    pub fn grow(&mut self, n: u64) -> bool {
        let mine = self.1;
        let budget = &self.0;
        let ok = budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u == mine || u + n <= budget.max).then_some(u + n)
            })
            .map(|u| metrics::gauge!("sluice_http_body_bytes_in_flight").set((u + n) as f64))
            .is_ok();
        if ok {
            self.1 += n;
        }
        ok
    }
}

impl BodyCharge {
    /// Moves this charge's bytes into a new charge (this one then holds nothing).
    fn take(&mut self) -> BodyCharge {
        let bytes = std::mem::take(&mut self.1);
        BodyCharge(self.0.clone(), bytes)
    }

    /// Takes back the bytes of a charge made by [`BodyCharge::take`].
    fn absorb(&mut self, mut other: BodyCharge) {
        self.1 += std::mem::take(&mut other.1);
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        let before = self.0.used.fetch_sub(self.1, Ordering::AcqRel);
        metrics::gauge!("sluice_http_body_bytes_in_flight").set(before.saturating_sub(self.1) as f64);
    }
}

fn refusal(status: StatusCode, reason: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        reason,
        message,
    }
}

fn too_large(max: u64, what: &str) -> Refusal {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("{what} exceeds max_body_bytes = {max}"),
    )
}

fn over_budget(budget: &BodyBudget) -> Refusal {
    refusal(
        StatusCode::TOO_MANY_REQUESTS,
        "bodies_in_flight",
        format!(
            "too many request bodies in flight (over {} bytes); retry later",
            budget.max
        ),
    )
}

/// Reads a body of at most `max` bytes (after inflating), charging `charge` as it arrives.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: u64,
    limits: BodyLimits,
    charge: &mut BodyCharge,
    decoders: &Arc<tokio::sync::Semaphore>,
) -> Result<Bytes, Refusal> {
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase()) {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" || e == "x-gzip" => true,
        Some(e) => {
            return Err(refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                format!("Content-Encoding '{e}' is not supported: send gzip or identity"),
            ));
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        // Read and drop what the client is still sending (up to a bound, within the read
        // timeout), holding none of it: a client that sent the whole body then reads the 413
        // instead of a reset connection.
        drain(body, limits, DRAIN_BYTES).await;
        return Err(too_large(max, &format!("body of {} bytes", declared.unwrap_or(0))));
    }
    // The declared length sizes the buffer (pages never written are never resident; a failed
    // reservation is an answer, not an abort); the budget is charged as bytes arrive.
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(declared.unwrap_or(0).min(max) as usize).map_err(|_| {
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "out_of_memory",
            "cannot reserve memory for the body; retry later".to_string(),
        )
    })?;
    let mut stream = body.into_data_stream();
    // The rate is checked over windows of `read_timeout`: a body that came fast and then
    // trickles is cut as soon as one window is too slow, not after its average decays.
    let (mut window_start, mut window_bytes) = (Instant::now(), 0u64);
    loop {
        let piece = match tokio::time::timeout(limits.read_timeout, stream.next()).await {
            Err(_) => {
                return Err(refusal(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "no body bytes for {} ms; the request is dropped",
                        limits.read_timeout.as_millis()
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "body_error",
                    format!("reading the body failed: {e}"),
                ));
            }
            Ok(Some(Ok(piece))) => piece,
        };
        if out.len() as u64 + piece.len() as u64 > max {
            return Err(too_large(max, "body"));
        }
        if !charge.grow(piece.len() as u64) {
            return Err(over_budget(&charge.0));
        }
        out.extend_from_slice(&piece);
        window_bytes += piece.len() as u64;
        let elapsed = window_start.elapsed();
        if elapsed >= limits.read_timeout {
            if (window_bytes as f64) < elapsed.as_secs_f64() * limits.min_rate as f64 {
                return Err(refusal(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_too_slow",
                    format!(
                        "the body arrives slower than {} bytes/s; the request is dropped",
                        limits.min_rate
                    ),
                ));
            }
            (window_start, window_bytes) = (Instant::now(), 0);
        }
    }
    if !gzip {
        return Ok(Bytes::from(out));
    }
    // Inflating is CPU work: on a blocking thread, in one of the decoding slots (so a flood of
    // small bombs cannot take more cores than decoding may), with the charge lent to it.
    let Ok(slot) = decoders.clone().acquire_owned().await else {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down".to_string(),
        ));
    };
    let mut lent = charge.take();
    let (result, lent) = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let r = inflate(&out, max, &mut lent);
        (r, lent)
    })
    .await
    .map_err(|e| {
        refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("inflating failed: {e}"),
        )
    })?;
    charge.absorb(lent);
    result
}

/// Reads and drops up to `bound` bytes of a body, stopping at the first read timeout.
async fn drain(body: Body, limits: BodyLimits, bound: u64) {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    while seen < bound {
        match tokio::time::timeout(limits.read_timeout, stream.next()).await {
            Ok(Some(Ok(piece))) => seen += piece.len() as u64,
            _ => return,
        }
    }
}

/// Inflates a gzip body, charging the budget per step and stopping as soon as it passes `max`
/// (a gzip bomb costs at most `max` inflated bytes).
fn inflate(compressed: &[u8], max: u64, charge: &mut BodyCharge) -> Result<Bytes, Refusal> {
    use std::io::Read;
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let len = out.len();
        out.resize(len + INFLATE_STEP, 0);
        let n = decoder.read(&mut out[len..]).map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad_gzip",
                format!("the gzip body does not inflate: {e}"),
            )
        })?;
        out.truncate(len + n);
        if n == 0 {
            break;
        }
        if out.len() as u64 > max {
            return Err(refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "inflated_too_large",
                format!("the gzip body inflates past max_body_bytes = {max}; nothing was accepted"),
            ));
        }
        if !charge.grow(n as u64) {
            return Err(over_budget(&charge.0));
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit_and_the_budget_is_given_back() {
        let bomb = gzip(&vec![b' '; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        let budget = BodyBudget::new(1 << 30);
        let mut charge = budget.charge();
        let e = inflate(&bomb, 1 << 20, &mut charge).err().unwrap();
        assert_eq!((e.status, e.reason), (StatusCode::PAYLOAD_TOO_LARGE, "inflated_too_large"));
        assert!(budget.used() <= (1 << 20) + INFLATE_STEP as u64);
        drop(charge);
        assert_eq!(budget.used(), 0);
        let mut charge = budget.charge();
        let small = inflate(&gzip(b"{\"a\":1}\n"), 1 << 20, &mut charge).unwrap();
        assert_eq!(&small[..], b"{\"a\":1}\n");
    }

    #[test]
    fn the_budget_holds_bytes_received_and_one_body_may_always_grow() {
        let budget = BodyBudget::new(100);
        let mut a = budget.charge();
        assert!(a.grow(150), "alone, a body may pass the budget");
        let mut b = budget.charge();
        assert!(!b.grow(1));
        drop(a);
        assert!(b.grow(60));
        let mut c = budget.charge();
        assert!(c.grow(40));
        assert!(!c.grow(1));
        assert_eq!(budget.used(), 100);
    }
}
