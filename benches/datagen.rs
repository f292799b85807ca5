//! The deterministic event generator: an order stream of about 200 bytes per event, fixed by
//! seed (same seed, same bytes), with an optional fraction of malformed lines.

use std::io::Write;
use std::path::Path;

/// Currencies (USD..CHF have rates; XXX does not, so the join drops it).
pub const CURRENCIES: [&str; 6] = ["USD", "EUR", "GBP", "JPY", "CHF", "XXX"];
const STATUSES: [&str; 5] = ["new", "paid", "shipped", "cancelled", "test"];
const COUNTRIES: [&str; 8] = ["US", "DE", "FR", "GB", "JP", "CH", "NL", "SE"];
const CHANNELS: [&str; 4] = ["web", "app", "store", "partner"];
/// 2026-11-20T00:00:00Z.
const BASE_SECS: i64 = 1_795_132_800;

/// xorshift64*.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn rfc3339(secs: i64, millis: i64) -> String {
    let (d, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Writes one order (without newline) into `out`.
pub fn order(rng: &mut Rng, id: u64, malformed_per_million: u64, out: &mut Vec<u8>) {
    if malformed_per_million > 0 && rng.below(1_000_000) < malformed_per_million {
        let _ = write!(out, "{{\"order_id\": {id}, \"amount\": \"n/a\", \"ts\": \"later\"");
        return;
    }
    let customer = if rng.below(20) == 0 {
        "null".to_string()
    } else {
        rng.below(100_000).to_string()
    };
    let secs = BASE_SECS + (id as i64) / 20 + rng.below(60) as i64;
    let _ = write!(
        out,
        "{{\"order_id\":{id},\"customer_id\":{customer},\"amount\":{}.{:02},\"currency\":\"{}\",\"status\":\"{}\",\"ts\":\"{}\",\"country\":\"{}\",\"channel\":\"{}\",\"sku\":\"SKU-{:06}\",\"quantity\":{}}}",
        rng.below(500),
        rng.below(100),
        CURRENCIES[rng.below(6) as usize],
        STATUSES[rng.below(5) as usize],
        rfc3339(secs, rng.below(1000) as i64),
        COUNTRIES[rng.below(8) as usize],
        CHANNELS[rng.below(4) as usize],
        rng.below(1_000_000),
        1 + rng.below(5),
    );
}

/// Writes `events` orders as NDJSON files of `per_file` events under `dir`; returns total bytes.
pub fn write_orders(
    dir: &Path,
    seed: u64,
    events: u64,
    per_file: u64,
    malformed_per_million: u64,
) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(seed);
    let mut total = 0;
    let mut id = 0;
    let mut file = 0;
    while id < events {
        let mut buf = Vec::with_capacity((per_file * 220) as usize);
        let end = (id + per_file).min(events);
        while id < end {
            order(&mut rng, id, malformed_per_million, &mut buf);
            buf.push(b'\n');
            id += 1;
        }
        total += buf.len() as u64;
        std::fs::write(dir.join(format!("orders-{file:05}.ndjson")), &buf)?;
        file += 1;
    }
    Ok(total)
}

/// The exchange-rate table joined by the reference transform.
pub const FX_CSV: &str = "currency,rate\nUSD,1.0\nEUR,1.08\nGBP,1.27\nJPY,0.0067\nCHF,1.13\n";

const CHANNELS_NEXMARK: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// Writes `events` Nexmark-style bids (auction, bidder, price, channel, url, date_time, extra)
/// as NDJSON files of `per_file` events under `dir`; returns total bytes. Same shape as the
/// Nexmark benchmark's bid stream (hot auctions and bidders, 1 bid per millisecond of event time).
pub fn write_bids(dir: &Path, seed: u64, events: u64, per_file: u64) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(seed ^ 0xB1D5);
    let (mut total, mut id, mut file) = (0, 0, 0);
    while id < events {
        let mut buf = Vec::with_capacity((per_file * 220) as usize);
        let end = (id + per_file).min(events);
        while id < end {
            let hot = rng.below(100) < 90;
            let auction = if hot {
                1000 + rng.below(100)
            } else {
                1000 + rng.below(100_000)
            };
            let bidder = if hot {
                1000 + rng.below(1000)
            } else {
                1000 + rng.below(1_000_000)
            };
            let channel = CHANNELS_NEXMARK[rng.below(4) as usize];
            let secs = BASE_SECS + (id / 1000) as i64;
            let extra: String = (0..(20 + rng.below(20)))
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect();
            let _ = writeln!(
                buf,
                "{{\"auction\":{auction},\"bidder\":{bidder},\"price\":{},\"channel\":\"{channel}\",\"url\":\"https://www.nexmark.com/{channel}/item.htm?query=1&channel_id={}\",\"date_time\":\"{}\",\"extra\":\"{extra}\"}}",
                100 + rng.below(10_000_000),
                rng.below(1 << 20),
                rfc3339(secs, (id % 1000) as i64),
            );
            id += 1;
        }
        total += buf.len() as u64;
        std::fs::write(dir.join(format!("bids-{file:05}.ndjson")), &buf)?;
        file += 1;
    }
    Ok(total)
}
