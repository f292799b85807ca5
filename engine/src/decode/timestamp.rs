//! Timestamps in input text: [`parse_timestamp_nanos`] (RFC 3339 or epoch milliseconds) and a
//! fast reader for the one timestamp shape nearly every producer writes,
//! `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`. Anything else — another shape, an out-of-range
//! field, a year outside 1700..=2200 — is left to arrow's general parser, which stays the
//! reference: the tests below check both agree wherever this one answers.

/// Nanoseconds since the Unix epoch (UTC) for text of the common RFC 3339 shape, or `None`
/// when the text has any other shape (which says nothing about whether it is valid).
pub fn rfc3339_nanos(s: &[u8]) -> Option<i64> {
    let digit = |i: usize| -> Option<i64> {
        let c = s.get(i)?.wrapping_sub(b'0');
        (c < 10).then_some(i64::from(c))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let at = |i: usize| s.get(i).copied();
    if at(4) != Some(b'-') || at(7) != Some(b'-') || at(10) != Some(b'T') || at(13) != Some(b':') {
        return None;
    }
    if at(16) != Some(b':') {
        return None;
    }
    let year = two(0)? * 100 + two(2)?;
    let (month, day) = (two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let valid = (1700..=2200).contains(&year)
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0;
    if at(i) == Some(b'.') {
        i += 1;
        let start = i;
        while let Some(d) = digit(i) {
            nanos = nanos * 10 + d;
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return None;
        }
        nanos *= 10_i64.pow(9 - n as u32);
    }
    let offset = match s.get(i..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (two(i + 1)?, two(i + 4)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs * 1_000_000_000 + nanos)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Nanoseconds since the epoch for RFC 3339 text or an integer count of epoch milliseconds.
pub fn parse_timestamp_nanos(v: &str) -> Option<i64> {
    parse_timestamp_nanos_in(v, DEFAULT_EPOCH_NANOS)
}

/// The unit of numeric timestamps unless a source says otherwise (`timestamp.unit`).
pub const DEFAULT_EPOCH_UNIT: arrow::datatypes::TimeUnit = arrow::datatypes::TimeUnit::Millisecond;
const DEFAULT_EPOCH_NANOS: i64 = 1_000_000;

/// The OPTIONS key every source accepts for numeric timestamps.
pub fn option_specs() -> Vec<sluice_sql::OptionSpec> {
    vec![sluice_sql::OptionSpec {
        key: "timestamp.unit",
        doc: "the unit of numeric timestamps (integers since the epoch): 's', 'ms' (default), 'us' or 'ns'; text is RFC 3339 whatever the unit",
    }]
}

/// Reads `timestamp.unit`.
pub fn epoch_unit_from_options(
    options: &sluice_sql::Options,
) -> Result<arrow::datatypes::TimeUnit, sluice_sql::OptionError> {
    use arrow::datatypes::TimeUnit;
    sluice_sql::option_choice(
        options,
        "timestamp.unit",
        DEFAULT_EPOCH_UNIT,
        &[
            ("s", TimeUnit::Second),
            ("ms", TimeUnit::Millisecond),
            ("us", TimeUnit::Microsecond),
            ("ns", TimeUnit::Nanosecond),
        ],
    )
}

/// Nanoseconds since the epoch for RFC 3339 text or an integer count of epoch units of
/// `epoch_nanos` nanoseconds each.
pub fn parse_timestamp_nanos_in(v: &str, epoch_nanos: i64) -> Option<i64> {
    let t = v.trim();
    if let Some(nanos) = rfc3339_nanos(t.as_bytes()) {
        return Some(nanos);
    }
    let digits = t.strip_prefix('-').unwrap_or(t);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<i64>().ok()?.checked_mul(epoch_nanos);
    }
    arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(t).ok()
}

/// Nanoseconds in one `unit` (what a nanosecond count is divided by to get that unit).
pub fn nanos_per(unit: arrow::datatypes::TimeUnit) -> i64 {
    use arrow::datatypes::TimeUnit;
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;

    fn reference(s: &str) -> Option<i64> {
        string_to_timestamp_nanos(s).ok()
    }

    #[test]
    fn reads_the_common_shapes() {
        assert_eq!(rfc3339_nanos(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_nanos(b"1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(rfc3339_nanos(b"1970-01-01T02:00:00+02:00"), Some(0));
        assert_eq!(rfc3339_nanos(b"1969-12-31T23:59:59.999999999Z"), Some(-1));
        for other in [
            "1970-01-01 00:00:00Z",
            "1970-01-01T00:00:00",
            "1970-01-01T00:00:00z",
            "1970-01-01T00:00:00.Z",
            "1970-01-01T00:00:00.1234567890Z",
            "1970-01-01T00:00:60Z",
            "1970-02-29T00:00:00Z",
            "1970-01-01T00:00:00+0200",
            "1970-01-01T00:00:00+24:00",
            "1970-1-01T00:00:00Z",
            "2262-01-01T00:00:00Z",
        ] {
            assert_eq!(rfc3339_nanos(other.as_bytes()), None, "{other}");
        }
    }

    /// Random texts on and around the shape: wherever the fast reader answers, arrow's parser
    /// gives the same instant; on well-formed input it always answers.
    #[test]
    fn agrees_with_arrow() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut answered = 0;
        for _ in 0..200_000 {
            let year = 1690 + next(600);
            let fraction = match next(4) {
                0 => String::new(),
                _ => format!(".{}", &format!("{:09}", next(1_000_000_000))[..1 + next(9) as usize]),
            };
            let zone = match next(4) {
                0 => "Z".to_string(),
                1 => format!("{}{:02}:{:02}", ["+", "-"][next(2) as usize], next(26), next(62)),
                2 => ["", "z", "+0200", "+02", " UTC", "Z "][next(6) as usize].to_string(),
                _ => "Z".to_string(),
            };
            let (month, day, hour, minute, second) = (next(14), next(33), next(25), next(61), next(61));
            let mut text =
                format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}").into_bytes();
            let mutated = next(10) == 0;
            if mutated {
                let i = next(text.len() as u64) as usize;
                text[i] = b"0123456789-:T. Z+x"[next(18) as usize];
            }
            let text = String::from_utf8(text).unwrap_or_default();
            match rfc3339_nanos(text.as_bytes()) {
                Some(v) => {
                    answered += 1;
                    assert_eq!(reference(&text), Some(v), "{text}");
                }
                None => {
                    let well_formed = !mutated
                        && zone == "Z"
                        && (1700..=2200).contains(&year)
                        && (1..=12).contains(&month)
                        && (1..=days_in_month(year as i64, month as i64)).contains(&(day as i64))
                        && hour < 24
                        && minute < 60
                        && second < 60;
                    assert!(!well_formed, "{text} should be read here");
                }
            }
        }
        assert!(answered > 50_000, "only {answered} answered");
    }
}
