//! What a provider's rate-limit headers say of each of its budgets on an answer (contract §6:
//! they correct the shared view both ways), read into [`QuotaObservation`]s. The header sets of
//! providers.md:
//! - `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (OpenAI, Groq, SambaNova: §1.2,
//!   §5, §8), whose window the names do not say (Groq's `-requests` count a day, OpenAI's a
//!   minute), so `window` stays `None`;
//! - the same with a `-minute` / `-hour` / `-day` suffix (Cerebras §2.2, SambaNova's `-day`),
//!   which fills `window`;
//! - OpenRouter's bare `X-RateLimit-{Limit,Remaining,Reset}` (§3.3), which count requests;
//! - Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (§7).
//!   Its `input-tokens` and `output-tokens` sets are left out: they count one side of a call,
//!   while a `tokens` limit counts prompt and completion together, so reading them as that
//!   limit's would mislead (their `remaining: 0` still cools the provider through
//!   [`retry_info::exhausted_reset`]).
//!
//! Gemini sends none of these (§4.1, §11.4); its dialect reads the same sets in case it ever
//! does. Every value is hostile: one that is not a plain non-negative integer (or a reset in a
//! known form), that is not UTF-8, or that a duplicate header contradicts is ignored, and a
//! budget with no usable `remaining`, or a `remaining` above its own `limit`, gives no
//! observation. Nothing here panics or overflows; the store holds what it learns to the
//! configured limits.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use super::retry_info;
use crate::routing::{QuotaMeasure, QuotaObservation};

/// The window suffixes a header may carry, and the window each names.
const WINDOWS: [(&str, Option<Duration>); 4] = [
    ("", None),
    ("-minute", Some(Duration::from_secs(60))),
    ("-hour", Some(Duration::from_secs(3600))),
    ("-day", Some(Duration::from_secs(86_400))),
];
const MEASURES: [QuotaMeasure; 2] = [QuotaMeasure::Requests, QuotaMeasure::Tokens];

/// Every budget's observation, in a fixed order (requests before tokens, the unnamed window
/// first). Empty, without allocating, when the answer carries no such header.
pub fn observe(headers: &HeaderMap, now: SystemTime) -> Vec<QuotaObservation> {
    let mut budgets = [Budget::default(); MEASURES.len() * WINDOWS.len()];
    for (name, value) in headers {
        let Some(key) = Key::parse(name.as_str()) else { continue };
        let Some(budget) = budgets.get_mut(key.slot) else { continue };
        let text = value.to_str().ok();
        match key.field {
            Field::Limit => budget.limit.take(text.and_then(count)),
            Field::Remaining => budget.remaining.take(text.and_then(count)),
            Field::Reset => budget.reset.take(text.and_then(|t| retry_info::parse_reset(t, now))),
        }
    }
    let observed = |(slot, budget): (usize, &Budget)| budget.observation(slot);
    let count = budgets.iter().enumerate().filter_map(observed).count();
    if count == 0 {
        return Vec::new();
    }
    let mut seen = Vec::with_capacity(count);
    seen.extend(budgets.iter().enumerate().filter_map(observed));
    seen
}

/// A count as providers write it: a non-negative integer that fits a `u64`.
fn count(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Limit,
    Remaining,
    Reset,
}

/// Which budget (an index into the fixed slots) and which of its fields a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    slot: usize,
    field: Field,
}

impl Key {
    /// `name` is lower-case, as `HeaderMap` keeps every name.
    fn parse(name: &str) -> Option<Key> {
        if let Some(rest) = name.strip_prefix("x-ratelimit-") {
            let (field, rest) = Self::field_prefix(rest)?;
            // OpenRouter's bare `x-ratelimit-remaining` counts requests in an unnamed window.
            if rest.is_empty() {
                return Some(Key { slot: 0, field });
            }
            let rest = rest.strip_prefix('-')?;
            let (measure, suffix) = MEASURES.iter().enumerate().find_map(|(i, m)| {
                let word = match m {
                    QuotaMeasure::Requests => "requests",
                    QuotaMeasure::Tokens => "tokens",
                };
                Some((i, rest.strip_prefix(word)?))
            })?;
            let window = WINDOWS.iter().position(|(w, _)| *w == suffix)?;
            return Some(Key { slot: measure * WINDOWS.len() + window, field });
        }
        let rest = name.strip_prefix("anthropic-ratelimit-")?;
        let (measure, field) = if let Some(field) = rest.strip_prefix("requests-") {
            (0, field)
        } else {
            (1, rest.strip_prefix("tokens-")?)
        };
        let (field, tail) = Self::field_prefix(field)?;
        tail.is_empty().then_some(Key { slot: measure * WINDOWS.len(), field })
    }

    fn field_prefix(text: &str) -> Option<(Field, &str)> {
        [("limit", Field::Limit), ("remaining", Field::Remaining), ("reset", Field::Reset)]
            .into_iter()
            .find_map(|(word, field)| Some((field, text.strip_prefix(word)?)))
    }
}

/// One header's value as read so far: none yet, one, or unusable (garbage, or two headers
/// that disagree: a provider contradicting itself is believed in neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Reading<T> {
    #[default]
    Absent,
    Seen(T),
    Spoilt,
}

impl<T: PartialEq + Copy> Reading<T> {
    fn take(&mut self, value: Option<T>) {
        *self = match (*self, value) {
            (Reading::Absent, Some(v)) => Reading::Seen(v),
            (Reading::Seen(old), Some(v)) if old == v => Reading::Seen(v),
            _ => Reading::Spoilt,
        };
    }

    fn get(self) -> Option<T> {
        match self {
            Reading::Seen(v) => Some(v),
            Reading::Absent | Reading::Spoilt => None,
        }
    }
}

/// What the headers said of one budget.
#[derive(Debug, Clone, Copy, Default)]
struct Budget {
    limit: Reading<u64>,
    remaining: Reading<u64>,
    reset: Reading<SystemTime>,
}

impl Budget {
    fn observation(&self, slot: usize) -> Option<QuotaObservation> {
        let remaining = self.remaining.get()?;
        let limit = self.limit.get();
        if limit.is_some_and(|limit| remaining > limit) {
            return None;
        }
        let measure = *MEASURES.get(slot / WINDOWS.len())?;
        let (_, window) = *WINDOWS.get(slot % WINDOWS.len())?;
        Some(QuotaObservation { measure, remaining, limit, resets_at: self.reset.get(), window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;

    const MINUTE: Option<Duration> = Some(Duration::from_secs(60));
    const DAY: Option<Duration> = Some(Duration::from_secs(86_400));

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    fn obs(
        measure: QuotaMeasure,
        remaining: u64,
        limit: Option<u64>,
        resets_in: Option<Duration>,
        window: Option<Duration>,
    ) -> QuotaObservation {
        QuotaObservation { measure, remaining, limit, resets_at: resets_in.map(|d| now() + d), window }
    }

    /// Groq's documented table (§1.2): requests (a day) and tokens (a minute), Go durations.
    #[test]
    fn groq_and_openai_headers() {
        let groq = headers(&[
            ("retry-after", "2"),
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "18000"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-remaining-tokens", "17997"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ]);
        assert_eq!(
            observe(&groq, now()),
            vec![
                obs(QuotaMeasure::Requests, 14370, Some(14400), Some(Duration::from_millis(179_560)), None),
                obs(QuotaMeasure::Tokens, 17997, Some(18000), Some(Duration::from_millis(7_660)), None),
            ]
        );
        // OpenAI (§8): `12ms`, `9ms`.
        let openai = headers(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-reset-requests", "12ms"),
        ]);
        assert_eq!(
            observe(&openai, now()),
            vec![obs(QuotaMeasure::Requests, 4999, Some(5000), Some(Duration::from_millis(12)), None)]
        );
    }

    /// Cerebras' docs example (§2.2): suffixed windows, float-second resets.
    #[test]
    fn cerebras_windows() {
        let cerebras = headers(&[
            ("x-ratelimit-limit-requests-day", "1000000000"),
            ("x-ratelimit-limit-tokens-minute", "1000000000"),
            ("x-ratelimit-remaining-requests-day", "999997455"),
            ("x-ratelimit-remaining-tokens-minute", "999998298"),
            ("x-ratelimit-reset-requests-day", "33011.382867097855"),
            ("x-ratelimit-reset-tokens-minute", "11.382867097854614"),
            ("x-ratelimit-limit-requests-hour", "900"),
            ("x-ratelimit-remaining-requests-hour", "899"),
        ]);
        assert_eq!(
            observe(&cerebras, now()),
            vec![
                obs(QuotaMeasure::Requests, 899, Some(900), None, Some(Duration::from_secs(3600))),
                obs(
                    QuotaMeasure::Requests,
                    999_997_455,
                    Some(1_000_000_000),
                    Some(Duration::from_millis(33_011_383)),
                    DAY
                ),
                obs(
                    QuotaMeasure::Tokens,
                    999_998_298,
                    Some(1_000_000_000),
                    Some(Duration::from_millis(11_383)),
                    MINUTE
                ),
            ]
        );
    }

    /// OpenRouter's bare set (epoch ms) and SambaNova's (an epoch in seconds, `-day`).
    #[test]
    fn openrouter_and_sambanova() {
        let openrouter = headers(&[
            ("X-RateLimit-Limit", "50"),
            ("X-RateLimit-Remaining", "7"),
            ("X-RateLimit-Reset", "1791072000000"),
        ]);
        let seen = observe(&openrouter, now());
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].measure, seen[0].remaining, seen[0].limit), (QuotaMeasure::Requests, 7, Some(50)));
        assert_eq!(seen[0].resets_at, Some(at("2026-10-04T00:00:00Z")));
        let sambanova = headers(&[
            ("x-ratelimit-limit-requests-day", "20"),
            ("x-ratelimit-remaining-requests-day", "19"),
            ("x-ratelimit-reset-requests-day", "1791072000"),
        ]);
        let seen = observe(&sambanova, now());
        assert_eq!((seen[0].remaining, seen[0].window), (19, DAY));
        assert_eq!(seen[0].resets_at, Some(at("2026-10-04T00:00:00Z")));
    }

    /// Anthropic's example (§7): RFC 3339 resets; the input/output token sets are not read.
    #[test]
    fn anthropic_requests_and_tokens() {
        let anthropic = headers(&[
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3991"),
            ("anthropic-ratelimit-requests-reset", "2026-10-03T12:00:15Z"),
            ("anthropic-ratelimit-tokens-limit", "480000"),
            ("anthropic-ratelimit-tokens-remaining", "478000"),
            ("anthropic-ratelimit-tokens-reset", "2026-10-03T12:01:00Z"),
            ("anthropic-ratelimit-input-tokens-limit", "400000"),
            ("anthropic-ratelimit-input-tokens-remaining", "398543"),
            ("anthropic-ratelimit-input-tokens-reset", "2026-10-03T12:00:00Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "79998"),
        ]);
        assert_eq!(
            observe(&anthropic, now()),
            vec![
                obs(QuotaMeasure::Requests, 3991, Some(4000), Some(Duration::from_secs(15)), None),
                obs(QuotaMeasure::Tokens, 478_000, Some(480_000), Some(Duration::from_secs(60)), None),
            ]
        );
    }

    #[test]
    fn hostile_values_are_ignored() {
        for bad in ["-5", "abc", "1e3", "3.5", "", "99999999999999999999999", "NaN"] {
            let seen = observe(&headers(&[("x-ratelimit-remaining-requests", bad)]), now());
            assert_eq!(seen, vec![], "remaining {bad:?}");
        }
        // A garbage limit or reset is dropped, the rest kept.
        let seen = observe(
            &headers(&[
                ("x-ratelimit-remaining-tokens", "5"),
                ("x-ratelimit-limit-tokens", "lots"),
                ("x-ratelimit-reset-tokens", "1e300"),
            ]),
            now(),
        );
        assert_eq!(seen, vec![obs(QuotaMeasure::Tokens, 5, None, None, None)]);
        // More left than the budget holds: incoherent, not believed.
        let seen =
            observe(&headers(&[("x-ratelimit-remaining-tokens", "7"), ("x-ratelimit-limit-tokens", "6")]), now());
        assert_eq!(seen, vec![]);
        // Unknown windows and names.
        let seen = observe(
            &headers(&[("x-ratelimit-remaining-requests-week", "1"), ("x-ratelimit-remaining-tokensx", "1")]),
            now(),
        );
        assert_eq!(seen, vec![]);
        // Two headers that disagree are believed in neither; two that agree are one.
        let mut map = headers(&[("x-ratelimit-remaining-requests", "3")]);
        map.append("x-ratelimit-remaining-requests", reqwest::header::HeaderValue::from_static("9"));
        assert_eq!(observe(&map, now()), vec![]);
        let mut map = headers(&[("x-ratelimit-remaining-requests", "3")]);
        map.append("x-ratelimit-remaining-requests", reqwest::header::HeaderValue::from_static("3"));
        assert_eq!(observe(&map, now()).len(), 1);
        // Not UTF-8.
        let mut map = HeaderMap::new();
        map.insert("x-ratelimit-remaining-requests", reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert_eq!(observe(&map, now()), vec![]);
        // A reset at the end of time does not overflow.
        let last = std::time::UNIX_EPOCH + Duration::new(i64::MAX.unsigned_abs(), 999_999_999);
        let seen =
            observe(&headers(&[("x-ratelimit-remaining-tokens", "1"), ("x-ratelimit-reset-tokens", "2m")]), last);
        assert_eq!(
            seen,
            vec![QuotaObservation {
                measure: QuotaMeasure::Tokens,
                remaining: 1,
                limit: None,
                resets_at: None,
                window: None
            }]
        );
    }

    #[test]
    fn no_headers_no_allocation() {
        let seen = observe(&headers(&[("x-request-id", "r")]), now());
        assert_eq!(seen.capacity(), 0);
    }
}
