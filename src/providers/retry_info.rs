//! Every way providers say "come back at …", in one place (contract §6, providers.md §10).
//!
//! All functions are pure: they take the time "now" and return an absolute instant, so the
//! real examples from the reference are unit-tested here without a clock or a network.
//!
//! Every number here comes from a provider, so none of it is trusted: a value that is negative,
//! not finite, or too large for a `Duration` or a `SystemTime` (`retry-after: 1e300`, an epoch
//! near `u64::MAX` milliseconds) yields `None`, never a panic; the chain then falls back to its
//! default cooldown. A value that is merely absurd but representable (a wait of a thousand
//! years) is returned as is: the chain clamps every cooldown to [1 s, 24 h].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;

/// Go's duration units in nanoseconds, longest spelling first so `ms` is not read as `m`
/// followed by `s`.
const GO_UNITS: &[(&str, u128)] = &[
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ns", 1),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
];

/// Go-style durations as Groq and OpenAI send them: `2m59.56s`, `7.66s`, `185ms`, `1h25m3.847s`.
/// Rounded up to the millisecond so we never come back early. Read in integer nanoseconds, so
/// `9242h4694m1592s549ms` is exactly that (a float sum is off by a millisecond there), and a
/// value too large for a `Duration` is `None`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at_checked(number_len)?;
        let (unit_nanos, after_unit) =
            GO_UNITS.iter().find_map(|(unit, nanos)| Some((*nanos, tail.strip_prefix(unit)?)))?;
        total_nanos = total_nanos.checked_add(decimal_times(number, unit_nanos)?)?;
        rest = after_unit;
    }
    let millis = total_nanos.div_ceil(1_000_000);
    Some(Duration::from_millis(u64::try_from(millis).ok()?))
}

/// `number` (digits with at most one `.`) times `unit` nanoseconds, rounded up to a whole
/// nanosecond; `None` when it is no number or overflows.
fn decimal_times(number: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    // 18 digits keep `fraction × unit` inside u128 (10^18 × 3.6·10^12 < 2^128); a non-zero digit
    // beyond them only rounds the result up by a nanosecond.
    let (kept, dropped) = fraction.split_at_checked(fraction.len().min(18))?;
    let scale = 10u128.checked_pow(u32::try_from(kept.len()).ok()?)?;
    let kept: u128 = if kept.is_empty() { 0 } else { kept.parse().ok()? };
    let mut part = kept.checked_mul(unit)?.div_ceil(scale);
    if dropped.bytes().any(|b| b != b'0') {
        part = part.checked_add(1)?;
    }
    whole.checked_mul(unit)?.checked_add(part)
}

/// Plain seconds, integer or float (`retry-after: 2`, `11.75`, Cerebras `33011.382867097855`).
pub fn parse_seconds(text: &str) -> Option<Duration> {
    ceil_ms(text.trim().parse().ok()?)
}

/// Protobuf `Duration` as Gemini's `RetryInfo.retryDelay` carries it: `"58s"`, `"38.2s"`.
pub fn parse_protobuf_duration(text: &str) -> Option<Duration> {
    parse_seconds(text.trim().strip_suffix('s')?)
}

/// An epoch timestamp: above 1e12 it is milliseconds (OpenRouter), above 1e9 seconds.
pub fn parse_epoch(text: &str) -> Option<SystemTime> {
    let value: f64 = text.trim().parse().ok()?;
    let since_epoch = if value > 1e12 {
        millis(value)?
    } else if value > 1e9 {
        ceil_ms(value)?
    } else {
        return None;
    };
    UNIX_EPOCH.checked_add(since_epoch)
}

/// RFC 3339 instants (Anthropic's `anthropic-ratelimit-*-reset`).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim().trim_end_matches('Z').trim_end_matches("+00:00")).ok()
}

/// `retry-after`: seconds (float tolerated) or an HTTP-date.
pub fn parse_retry_after(text: &str, now: SystemTime) -> Option<SystemTime> {
    if let Some(wait) = parse_seconds(text) {
        return now.checked_add(wait);
    }
    httpdate::parse_http_date(text.trim()).ok()
}

/// A `x-ratelimit-reset-*` value in whichever form the provider uses: an epoch (SambaNova,
/// OpenRouter), float seconds (Cerebras) or a Go duration (Groq, OpenAI).
pub fn parse_reset(text: &str, now: SystemTime) -> Option<SystemTime> {
    parse_epoch(text)
        .or_else(|| parse_seconds(text).and_then(|d| now.checked_add(d)))
        .or_else(|| parse_go_duration(text).and_then(|d| now.checked_add(d)))
        .or_else(|| parse_rfc3339(text))
}

/// The wait a provider writes into its message: Groq's "Please try again in 1.984999999s",
/// Gemini's "Please retry in 58.217843437s."
pub fn wait_from_message(message: &str) -> Option<Duration> {
    ["try again in ", "retry in "].iter().find_map(|marker| {
        let (_, tail) = message.split_once(marker)?;
        let token = tail.split(|c: char| c.is_whitespace() || c == ',').next()?;
        parse_go_duration(token.trim_end_matches('.'))
    })
}

/// The retry instant from the standard headers, most precise first: `retry-after-ms`,
/// `retry-after`, then the reset of whichever `x-ratelimit-*` budget is exhausted.
pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Option<SystemTime> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let after_ms = get("retry-after-ms").and_then(|v| v.trim().parse().ok()).and_then(millis);
    if let Some(at) = after_ms.and_then(|wait| now.checked_add(wait)) {
        return Some(at);
    }
    if let Some(at) = get("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(at);
    }
    exhausted_reset(headers, now)
}

/// The latest reset among the budgets whose `remaining` header says 0 (`x-ratelimit-remaining-X`
/// paired with `x-ratelimit-reset-X`; Anthropic's `anthropic-ratelimit-X-remaining`/`-reset`;
/// OpenRouter's single `X-RateLimit-Reset`).
pub fn exhausted_reset(headers: &HeaderMap, now: SystemTime) -> Option<SystemTime> {
    let mut latest: Option<SystemTime> = None;
    for (name, value) in headers {
        let name = name.as_str();
        let reset_name = if let Some(suffix) = name.strip_prefix("x-ratelimit-remaining") {
            format!("x-ratelimit-reset{suffix}")
        } else if let Some(middle) =
            name.strip_prefix("anthropic-ratelimit-").and_then(|n| n.strip_suffix("-remaining"))
        {
            format!("anthropic-ratelimit-{middle}-reset")
        } else {
            continue;
        };
        if value.to_str().ok().and_then(|v| v.trim().parse::<f64>().ok()) != Some(0.0) {
            continue;
        }
        let reset = headers.get(reset_name.as_str()).and_then(|v| v.to_str().ok()).and_then(|v| parse_reset(v, now));
        if let Some(reset) = reset {
            latest = Some(latest.map_or(reset, |l| l.max(reset)));
        }
    }
    latest
}

const DAY: i64 = 86_400;

/// The next midnight in UTC (OpenRouter's daily free quota, and our guess for daily quotas whose
/// provider gives no reset). `None` only for a `now` at the very end of what `SystemTime` holds.
pub fn next_utc_midnight(now: SystemTime) -> Option<SystemTime> {
    let day = DAY.unsigned_abs();
    let midnight = (unix_secs(now) / day).checked_add(1)?.checked_mul(day)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(midnight))
}

/// The next midnight in America/Los_Angeles (Gemini's per-day quotas), with US daylight-saving
/// rules: PDT (UTC−7) from the second Sunday of March, 02:00, to the first Sunday of November.
/// `None` only for a `now` so far in the future that the calendar arithmetic would overflow.
pub fn next_pacific_midnight(now: SystemTime) -> Option<SystemTime> {
    let secs = i64::try_from(unix_secs(now)).ok()?;
    let offset = pacific_offset_secs(secs)?;
    let local_day = secs.checked_add(offset)?.div_euclid(DAY);
    let midnight_local = local_day.checked_add(1)?.checked_mul(DAY)?;
    // Midnight is before the 02:00 switch, so the offset in force at midnight is that of the
    // hour before it.
    let offset_at_midnight = pacific_offset_secs(midnight_local.checked_sub(offset)?.checked_sub(3600)?)?;
    let midnight_utc = u64::try_from(midnight_local.checked_sub(offset_at_midnight)?).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(midnight_utc))
}

fn pacific_offset_secs(unix: i64) -> Option<i64> {
    let (year, _, _) = civil_from_days(unix.div_euclid(DAY));
    let instant = |month, n, hour_utc: i64| {
        days_from_civil(year, month, nth_sunday(year, month, n)).checked_mul(DAY)?.checked_add(hour_utc * 3600)
    };
    let dst_start = instant(3, 2, 10)?; // 02:00 PST
    let dst_end = instant(11, 1, 9)?; // 02:00 PDT
    Some(if (dst_start..dst_end).contains(&unix) { -7 * 3600 } else { -8 * 3600 })
}

/// Day of the month of the `n`th Sunday of `month`.
fn nth_sunday(year: i64, month: u32, n: u32) -> u32 {
    let first = days_from_civil(year, month, 1);
    let weekday = (first + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday; 0 = Sunday
    1 + (7 - weekday) % 7 + 7 * (n - 1)
}

// Howard Hinnant's civil-calendar algorithms. Their inputs come from `SystemTime` (at most
// ±2^63 s, so ±1.1e14 days and ±2.9e11 years): every intermediate value stays far inside i64.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the epoch; an instant before it counts as the epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A wait of `seconds`, rounded up to the millisecond (the `- 1e-6` absorbs float noise such
/// as `1.984999999` × 1000); `None` when negative, not finite or beyond `Duration`.
fn ceil_ms(seconds: f64) -> Option<Duration> {
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    millis((seconds * 1000.0 - 1e-6).max(0.0))
}

/// `ms` milliseconds, rounded up; `None` when negative, not finite or over `u64::MAX` ms.
fn millis(ms: f64) -> Option<Duration> {
    // 2^64 is exactly representable; every f64 below it converts to u64 without saturating.
    const LIMIT: f64 = 18_446_744_073_709_551_616.0;
    let ms = ms.ceil();
    (ms.is_finite() && (0.0..LIMIT).contains(&ms)).then(|| Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn go_durations_from_the_reference() {
        let ms = |text| parse_go_duration(text).unwrap().as_millis();
        assert_eq!(ms("2m59.56s"), 179_560);
        assert_eq!(ms("7.66s"), 7_660);
        assert_eq!(ms("185ms"), 185);
        assert_eq!(ms("1m26.4s"), 86_400);
        assert_eq!(ms("1.984999999s"), 1_985); // rounded up
        assert_eq!(ms("9m38.016s"), 578_016);
        assert_eq!(ms("1h25m3.847s"), 5_103_847);
        assert_eq!(ms("6m0s"), 360_000);
        assert_eq!(ms("12ms"), 12);
        assert_eq!(ms("1m47.5854s"), 107_586);
        // Found by the property suite: a float sum read this one 1 ms long.
        assert_eq!(ms("9242h4694m1592s549ms"), 33_554_432_549);
        assert_eq!(ms(".5s"), 500);
        assert_eq!(ms("1.0000000000000000000001s"), 1_001); // any excess rounds up
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("."), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5"), None);
    }

    #[test]
    fn seconds_epochs_and_dates() {
        let now = at("2026-10-03T12:00:00Z");
        assert_eq!(parse_seconds("33011.382867097855").unwrap().as_millis(), 33_011_383);
        assert_eq!(parse_retry_after("2", now), Some(now + Duration::from_secs(2)));
        assert_eq!(parse_retry_after("11.75", now), Some(now + Duration::from_millis(11_750)));
        assert_eq!(parse_retry_after("Sat, 03 Oct 2026 12:01:00 GMT", now), Some(at("2026-10-03T12:01:00Z")));
        assert_eq!(parse_epoch("1791072000000"), Some(at("2026-10-04T00:00:00Z")));
        assert_eq!(parse_epoch("1791072000"), Some(at("2026-10-04T00:00:00Z")));
        assert_eq!(parse_rfc3339("2026-04-21T14:32:15Z"), Some(at("2026-04-21T14:32:15Z")));
        assert_eq!(parse_protobuf_duration("58s"), Some(Duration::from_secs(58)));
        assert_eq!(parse_protobuf_duration("38.2s"), Some(Duration::from_millis(38_200)));
        assert_eq!(parse_protobuf_duration("45.837906927s").unwrap().as_millis(), 45_838);
        assert_eq!(parse_protobuf_duration("58"), None);
    }

    #[test]
    fn waits_written_in_messages() {
        let groq = "Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 12000, Used 2542, Requested 9855. Please try again in 1.984999999s. Need more tokens?";
        assert_eq!(wait_from_message(groq), Some(Duration::from_millis(1_985)));
        let groq_day = "… on tokens per day (TPD): Limit 100000, Used 97050, Requested 3619. Please try again in 9m38.016s. Need more tokens?";
        assert_eq!(wait_from_message(groq_day), Some(Duration::from_millis(578_016)));
        let gemini = "Quota exceeded for metric: x, limit: 5, model: gemini-3-flash\nPlease retry in 58.217843437s.";
        assert_eq!(wait_from_message(gemini), Some(Duration::from_millis(58_218)));
        assert_eq!(wait_from_message("Please try again later."), None);
    }

    #[test]
    fn header_precedence_and_exhausted_budgets() {
        let now = at("2026-10-03T12:00:00Z");
        let both = headers(&[("retry-after", "4"), ("retry-after-ms", "3890")]);
        assert_eq!(from_headers(&both, now), Some(now + Duration::from_millis(3_890)));
        // Groq 429 without retry-after: the exhausted token budget's reset.
        let groq = headers(&[
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "4.77s"),
        ]);
        assert_eq!(from_headers(&groq, now), Some(now + Duration::from_millis(4_770)));
        // Cerebras: float seconds per window.
        let cerebras =
            headers(&[("x-ratelimit-remaining-requests-minute", "0"), ("x-ratelimit-reset-requests-minute", "42.1")]);
        assert_eq!(from_headers(&cerebras, now), Some(now + Duration::from_millis(42_100)));
        // OpenRouter: epoch milliseconds.
        let openrouter = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1791072000000")]);
        assert_eq!(from_headers(&openrouter, now), Some(at("2026-10-04T00:00:00Z")));
        // Anthropic: RFC 3339.
        let anthropic = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2026-10-03T12:00:15Z"),
        ]);
        assert_eq!(from_headers(&anthropic, now), Some(at("2026-10-03T12:00:15Z")));
        assert_eq!(from_headers(&headers(&[("x-ratelimit-remaining-tokens", "5")]), now), None);
    }

    #[test]
    fn midnights() {
        assert_eq!(next_utc_midnight(at("2026-10-03T23:59:59Z")), Some(at("2026-10-04T00:00:00Z")));
        // Summer: PDT, midnight is 07:00 UTC.
        assert_eq!(next_pacific_midnight(at("2026-07-01T12:00:00Z")), Some(at("2026-07-02T07:00:00Z")));
        assert_eq!(next_pacific_midnight(at("2026-07-02T06:59:00Z")), Some(at("2026-07-02T07:00:00Z")));
        // Winter: PST, midnight is 08:00 UTC.
        assert_eq!(next_pacific_midnight(at("2026-12-01T12:00:00Z")), Some(at("2026-12-02T08:00:00Z")));
        // 2026 DST starts Sunday March 8 and ends Sunday November 1.
        assert_eq!(next_pacific_midnight(at("2026-03-07T12:00:00Z")), Some(at("2026-03-08T08:00:00Z")));
        assert_eq!(next_pacific_midnight(at("2026-03-08T12:00:00Z")), Some(at("2026-03-09T07:00:00Z")));
        assert_eq!(next_pacific_midnight(at("2026-10-31T12:00:00Z")), Some(at("2026-11-01T07:00:00Z")));
        assert_eq!(next_pacific_midnight(at("2026-11-01T12:00:00Z")), Some(at("2026-11-02T08:00:00Z")));
    }

    #[test]
    fn absurd_values_yield_none_instead_of_panicking() {
        let now = at("2026-10-03T12:00:00Z");
        for text in ["1e300", "99999999999999999999", "inf", "NaN", "-infinity", "-5", "-0.5"] {
            assert_eq!(parse_retry_after(text, now), None, "retry-after: {text}");
            assert_eq!(parse_reset(text, now), None, "reset: {text}");
        }
        assert_eq!(parse_retry_after("1e19", now), None, "more milliseconds than a u64 holds");
        assert_eq!(parse_go_duration(&format!("{}h", "9".repeat(400))), None);
        assert_eq!(parse_go_duration("1.2.3s"), None);
        assert_eq!(parse_protobuf_duration("1e300s"), None);
        assert_eq!(parse_epoch("1e300"), None);
        assert_eq!(parse_epoch("NaN"), None);
        // An epoch of u64::MAX milliseconds is past what a Duration of milliseconds holds; one
        // of 1e18 ms is still an instant (31 million years away) that the chain clamps to 24 h.
        assert_eq!(parse_epoch("18446744073709551615"), None);
        assert!(parse_epoch("1e18").is_some_and(|t| t > now));
        let huge_ms = headers(&[("retry-after-ms", "1e30"), ("retry-after", "7")]);
        assert_eq!(from_headers(&huge_ms, now), Some(now + Duration::from_secs(7)), "falls back to retry-after");
        let only_huge = headers(&[("retry-after-ms", "1e30")]);
        assert_eq!(from_headers(&only_huge, now), None);
        assert_eq!(wait_from_message("Please try again in 1e300s."), None);
    }

    #[test]
    fn waits_from_the_end_of_time_do_not_overflow() {
        let last = UNIX_EPOCH + Duration::new(i64::MAX.unsigned_abs(), 999_999_999);
        assert_eq!(parse_retry_after("2", last), None);
        assert_eq!(parse_reset("2m59.56s", last), None);
        assert_eq!(from_headers(&headers(&[("retry-after-ms", "5")]), last), None);
        assert_eq!(next_utc_midnight(last), None);
        assert_eq!(next_pacific_midnight(last), None);
        // Before the epoch counts as the epoch: the next midnight is 1970-01-02.
        let before = UNIX_EPOCH - Duration::from_secs(86_400 * 365);
        assert_eq!(next_utc_midnight(before), Some(at("1970-01-02T00:00:00Z")));
        assert_eq!(next_pacific_midnight(before), Some(at("1970-01-01T08:00:00Z")));
    }
}
