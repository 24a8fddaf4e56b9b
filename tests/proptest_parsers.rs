//! Property tests over everything that reads text a provider or an operator wrote: the
//! retry-info parsers, the error classifier, each dialect's `interpret`, and config loading.
//!
//! Provider answers are hostile input (a broken proxy, a compromised endpoint, a new format), so
//! the first property everywhere is "never panics", checked at extreme clocks too (the epoch, the
//! last instant `SystemTime` holds, long before the epoch): a panic in a parser would take a job
//! down with it. Where a parser has a plain meaning, a round-trip property checks it as well.
//!
//! Cases per property: proptest's default 256, or `PROPTEST_CASES` (e.g. `PROPTEST_CASES=20000
//! cargo test --test proptest_parsers`) for a longer local run. A failure prints the shrunk input;
//! turn it into a unit test next to the parser it broke.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::config::{Config, EnvOverrides};
use fallback_worker::providers::errors::{ErrorInfo, classify};
use fallback_worker::providers::{FailureKind, anthropic, gemini, openai, quota_headers, retry_info};
use fallback_worker::routing::{QuotaMeasure, QuotaObservation};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

// ---- clocks --------------------------------------------------------------------------------

fn last_instant() -> SystemTime {
    UNIX_EPOCH + Duration::new(i64::MAX.unsigned_abs(), 999_999_999)
}

fn first_instant() -> SystemTime {
    UNIX_EPOCH - Duration::from_secs(i64::MAX.unsigned_abs())
}

/// "Now" anywhere `SystemTime` can be, with the edges and the present weighted up.
fn any_now() -> impl Strategy<Value = SystemTime> {
    let present = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    prop_oneof![
        3 => Just(present),
        1 => Just(UNIX_EPOCH),
        1 => Just(last_instant()),
        1 => Just(first_instant()),
        1 => (0..=i64::MAX.unsigned_abs(), 0..1_000_000_000u32).prop_map(|(s, n)| UNIX_EPOCH + Duration::new(s, n)),
        1 => (0..=i64::MAX.unsigned_abs()).prop_map(|s| UNIX_EPOCH - Duration::from_secs(s)),
        1 => (0..4_000_000_000u64).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s)),
    ]
}

// ---- text a provider might write -----------------------------------------------------------

/// Numbers as text, including what breaks naive parsing: huge, negative, NaN, exponents.
fn numeric_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[-+]?[0-9]{0,25}(\\.[0-9]{0,12})?([eE][-+]?[0-9]{1,4})?",
        select(vec![
            "1e300",
            "-1e300",
            "99999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "-0",
            "0",
            "0.0",
            "1e30",
            "1e-30",
            "1791072000000",
            "1791072000",
            " 42 ",
            "",
        ])
        .prop_map(str::to_string),
    ]
}

/// Go-style durations, sane and absurd.
fn go_duration_text() -> impl Strategy<Value = String> {
    let part = ("[0-9]{1,25}(\\.[0-9]{0,12})?", select(vec!["h", "m", "s", "ms", "us", "µs", "ns", "x", ""]))
        .prop_map(|(n, u)| format!("{n}{u}"));
    prop::collection::vec(part, 1..5).prop_map(|parts| parts.concat())
}

fn rfc3339_text() -> impl Strategy<Value = String> {
    (
        "[0-9]{1,6}",
        "[0-9]{1,2}",
        "[0-9]{1,2}",
        "[0-9]{1,2}",
        "[0-9]{1,2}",
        "[0-9]{1,2}",
        "(\\.[0-9]{1,12})?",
        select(vec!["Z", "+00:00", "+02:00", "", "z"]),
    )
        .prop_map(|(y, mo, d, h, mi, s, frac, zone)| format!("{y}-{mo}-{d}T{h}:{mi}:{s}{frac}{zone}"))
}

fn http_date_text() -> impl Strategy<Value = String> {
    (
        select(vec!["Mon", "Sat", "Sun", "Xyz"]),
        0..40u32,
        select(vec!["Jan", "Oct", "Dec", "Foo"]),
        0..100_000u32,
        0..30u32,
        0..70u32,
        0..70u32,
    )
        .prop_map(|(wd, d, mo, y, h, mi, s)| format!("{wd}, {d:02} {mo} {y} {h:02}:{mi:02}:{s:02} GMT"))
}

/// Anything a retry-related header or field could hold.
fn retry_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => numeric_text(),
        2 => go_duration_text(),
        1 => rfc3339_text(),
        1 => http_date_text(),
        1 => any::<String>(),
        1 => (numeric_text(), select(vec!["s", "ms", "m"])).prop_map(|(n, u)| format!("{n}{u}")),
    ]
}

/// Message texts that reach each classifier branch, with waits worth choking on.
fn message_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        select(vec![
            "Please try again in ",
            "Please retry in ",
            "(TPD)",
            "(RPD)",
            "Tokens per day limit exceeded",
            "Violated duration_s: 86400",
            "free-models-per-day",
            "request too large",
            "Your credit balance is too low",
            "monthly spending limit",
            "API key not valid",
            "requires moderation on OpenRouter. Your input was flagged for \"x\"",
            "blocked by guardrail",
            "budget",
            "does not exist",
            "has been decommissioned",
            "No endpoints found for ",
            "models/x is not found",
            "model: ",
            "<html>",
            ", ",
            ". ",
        ])
        .prop_map(str::to_string),
        retry_text(),
        "[ -~]{0,20}",
    ];
    prop::collection::vec(fragment, 0..6).prop_map(|parts| parts.concat())
}

// ---- JSON ----------------------------------------------------------------------------------

/// Keys the parsers look for, so random objects reach their branches.
const KEYS: &[&str] = &[
    "error",
    "message",
    "detail",
    "code",
    "type",
    "status",
    "details",
    "metadata",
    "@type",
    "retryDelay",
    "violations",
    "quotaId",
    "reason",
    "headers",
    "X-RateLimit-Reset",
    "x-ratelimit-reset",
    "limit_source",
    "reasons",
    "flagged_input",
    "choices",
    "finish_reason",
    "usage",
    "total_tokens",
    "id",
    "candidates",
    "content",
    "parts",
    "text",
    "thought",
    "finishReason",
    "usageMetadata",
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "totalTokenCount",
    "promptFeedback",
    "blockReason",
    "modelVersion",
    "responseId",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "model",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(KEYS).prop_map(str::to_string), 1 => "[a-zA-Z_@]{1,12}"]
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        select(vec![0u64, 1, u64::MAX, u64::MAX - 1, i64::MAX.unsigned_abs()]).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        message_text().prop_map(Value::String),
        select(vec![
            "RESOURCE_EXHAUSTED",
            "NOT_FOUND",
            "insufficient_quota",
            "queue_full",
            "model_not_found",
            "model_decommissioned",
            "not_found_error",
            "type.googleapis.com/google.rpc.RetryInfo",
            "API_KEY_INVALID",
            "openrouter_free_tier_daily",
            "openrouter_key_limit",
            "PerDay",
            "STOP",
            "SAFETY",
            "MAX_TOKENS",
            "message",
            "text",
            "error",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..7).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Error bodies in every envelope of providers.md §0, with random fields where it matters.
fn error_body() -> impl Strategy<Value = Value> {
    let details = prop::collection::vec(
        prop_oneof![
            retry_text().prop_map(|d| json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": d})),
            "[A-Za-z-]{0,40}(PerDay|PerMinute)?[A-Za-z-]{0,10}".prop_map(
                |id| json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": id}]})
            ),
            select(vec!["API_KEY_INVALID", "OTHER"]).prop_map(|r| json!({"reason": r})),
            any_json(),
        ],
        0..4,
    );
    let metadata = prop_oneof![
        Just(Value::Null),
        retry_text().prop_map(|r| json!({"headers": {"X-RateLimit-Reset": r}})),
        (select(vec!["openrouter_free_tier_daily", "openrouter_key_limit", "x_budget", "other"]), retry_text())
            .prop_map(|(s, r)| json!({"limit_source": s, "headers": {"x-ratelimit-reset": r}})),
        any_json().prop_map(|r| json!({"reasons": r, "flagged_input": "x"})),
        any_json(),
    ];
    let code = prop_oneof![json_number(), message_text().prop_map(Value::String), Just(Value::Null)];
    let kind = prop_oneof![any_json(), Just(json!("RESOURCE_EXHAUSTED")), Just(json!("insufficient_quota"))];
    (message_text(), code, kind, details, metadata, 0..6u8).prop_map(|(message, code, kind, details, metadata, shape)| {
        let inner = json!({"message": message, "code": code, "type": kind.clone(), "status": kind, "details": details, "metadata": metadata});
        match shape {
            0 => json!({"error": inner}),
            1 => json!([{"error": inner}]),
            2 => inner,
            3 => json!({"type": "error", "error": inner}),
            4 => json!({"error": message}),
            _ => json!({"detail": message}),
        }
    })
}

/// Success-shaped bodies of each dialect with hostile usage counts and odd fields.
fn success_body() -> impl Strategy<Value = Value> {
    let openai = (message_text(), any_json(), json_number(), any_json()).prop_map(|(text, finish, total, error)| {
        json!({"id": "x", "choices": [{"message": {"content": text}, "finish_reason": finish}], "usage": {"total_tokens": total}, "error": error})
    });
    let gemini = (message_text(), any_json(), json_number(), json_number(), json_number(), json_number(), any_json())
        .prop_map(|(text, finish, p, c, t, total, model)| {
            json!({"candidates": [{"content": {"parts": [{"text": text}, {"text": "y", "thought": true}]}, "finishReason": finish}],
                "usageMetadata": {"promptTokenCount": p, "candidatesTokenCount": c, "thoughtsTokenCount": t, "totalTokenCount": total},
                "modelVersion": model.clone(), "responseId": model})
        });
    let anthropic = (message_text(), any_json(), json_number(), json_number(), any_json()).prop_map(
        |(text, stop, input, output, model)| {
            json!({"type": "message", "id": model.clone(), "model": model, "content": [{"type": "text", "text": text}], "stop_reason": stop,
                "usage": {"input_tokens": input, "output_tokens": output}})
        },
    );
    prop_oneof![openai, gemini, anthropic, any_json()]
}

/// Body bytes: valid JSON of the shapes above, JSON cut short, or raw bytes.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => error_body().prop_map(|v| v.to_string().into_bytes()),
        3 => success_body().prop_map(|v| v.to_string().into_bytes()),
        1 => (success_body(), any::<Index>()).prop_map(|(v, cut)| {
            let text = v.to_string().into_bytes();
            let at = cut.index(text.len() + 1);
            text.into_iter().take(at).collect()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ]
}

// ---- headers -------------------------------------------------------------------------------

/// Header values, UTF-8 or not (obs-text bytes 0x80-0xFF are legal in a header and not UTF-8).
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => retry_text().prop_map(String::into_bytes),
        1 => Just(b"0".to_vec()),
        1 => prop::collection::vec(prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff, Just(b'\t')], 0..30),
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    let suffix =
        select(vec!["", "-requests", "-tokens", "-requests-day", "-tokens-minute", "-requests-hour", "-x", "-tokens-"]);
    prop_oneof![
        select(vec!["retry-after", "retry-after-ms", "x-request-id", "request-id", "x-generation-id"])
            .prop_map(str::to_string),
        suffix.clone().prop_map(|s| format!("x-ratelimit-remaining{s}")),
        suffix.clone().prop_map(|s| format!("x-ratelimit-limit{s}")),
        suffix.prop_map(|s| format!("x-ratelimit-reset{s}")),
        (select(vec!["requests", "tokens", "input-tokens"]), select(vec!["remaining", "reset", "limit"]))
            .prop_map(|(b, w)| format!("anthropic-ratelimit-{b}-{w}")),
        "[a-z][a-z0-9-]{0,20}",
    ]
}

/// A header map, with exhausted budgets (`remaining: 0` next to its reset) made likely.
fn header_map() -> impl Strategy<Value = HeaderMap> {
    let pair = (header_name(), header_value());
    let budget = (select(vec!["", "-requests", "-tokens-minute"]), retry_text(), any::<bool>()).prop_map(
        |(suffix, reset, anthropic)| {
            if anthropic {
                vec![
                    ("anthropic-ratelimit-requests-remaining".to_string(), b"0".to_vec()),
                    ("anthropic-ratelimit-requests-reset".to_string(), reset.into_bytes()),
                ]
            } else {
                vec![
                    (format!("x-ratelimit-remaining{suffix}"), b"0".to_vec()),
                    (format!("x-ratelimit-reset{suffix}"), reset.into_bytes()),
                ]
            }
        },
    );
    (prop::collection::vec(pair, 0..8), prop::collection::vec(budget, 0..3)).prop_map(|(pairs, budgets)| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs.into_iter().chain(budgets.into_iter().flatten()) {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value)) {
                map.append(name, value);
            }
        }
        map
    })
}

fn any_status() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => select(vec![
            0u16, 100, 200, 201, 204, 299, 300, 301, 302, 307, 308, 399, 400, 401, 402, 403, 404, 408, 410, 413,
            429, 498, 499, 500, 502, 503, 529, 599, 600, 999, u16::MAX,
        ]),
        1 => any::<u16>(),
    ]
}

// ---- retry info ----------------------------------------------------------------------------

proptest! {
    #[test]
    fn retry_parsers_never_panic_on_any_text(text in prop_oneof![retry_text(), message_text(), any::<String>()], now in any_now()) {
        let _ = retry_info::parse_go_duration(&text);
        let _ = retry_info::parse_seconds(&text);
        let _ = retry_info::parse_protobuf_duration(&text);
        let _ = retry_info::parse_epoch(&text);
        let _ = retry_info::parse_rfc3339(&text);
        let _ = retry_info::parse_retry_after(&text, now);
        let _ = retry_info::parse_reset(&text, now);
        let _ = retry_info::wait_from_message(&text);
        let _ = retry_info::wait_from_message(&format!("Please try again in {text}"));
        let _ = retry_info::next_utc_midnight(now);
        let _ = retry_info::next_pacific_midnight(now);
    }

    #[test]
    fn header_readers_never_panic(headers in header_map(), now in any_now()) {
        let _ = retry_info::from_headers(&headers, now);
        let _ = retry_info::exhausted_reset(&headers, now);
    }

    /// Whatever the headers, the quota reader returns at most one observation per budget, none
    /// claiming more left than its own limit.
    #[test]
    fn quota_headers_never_panic_nor_contradict_themselves(headers in header_map(), now in any_now()) {
        let seen = quota_headers::observe(&headers, now);
        prop_assert!(seen.len() <= 8);
        for observation in &seen {
            prop_assert!(observation.limit.is_none_or(|limit| observation.remaining <= limit), "{observation:?}");
        }
    }

    /// Budgets written in each provider's header names and formats read back as written.
    #[test]
    fn quota_headers_round_trip(budgets in prop::collection::vec(written_budget(), 0..8), now in any_now()) {
        let mut map = HeaderMap::new();
        let mut expected = std::collections::BTreeMap::new();
        for budget in &budgets {
            let slot = budget.slot();
            if expected.contains_key(&slot) {
                continue; // one budget per name: a second would contradict the first
            }
            for (name, value) in budget.headers() {
                map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(&value).unwrap());
            }
            expected.insert(slot, budget.observation(now));
        }
        let expected: Vec<_> = expected.into_values().collect();
        prop_assert_eq!(quota_headers::observe(&map, now), expected);
    }

    /// A wait given in seconds comes back as exactly that wait from now.
    #[test]
    fn whole_seconds_are_read_exactly(seconds in 0u64..=1_000_000_000_000, now in any_now()) {
        let wait = Duration::from_secs(seconds);
        prop_assert_eq!(retry_info::parse_seconds(&seconds.to_string()), Some(wait));
        prop_assert_eq!(retry_info::parse_protobuf_duration(&format!("{seconds}s")), Some(wait));
        prop_assert_eq!(retry_info::parse_retry_after(&seconds.to_string(), now), now.checked_add(wait));
    }

    /// Go durations read as the sum of their parts, rounded up to the millisecond.
    #[test]
    fn go_durations_add_up(h in 0u64..10_000, m in 0u64..10_000, s in 0u64..10_000, ms in 0u64..1000) {
        let expected = Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_millis(ms);
        prop_assert_eq!(retry_info::parse_go_duration(&format!("{h}h{m}m{s}s{ms}ms")), Some(expected));
        prop_assert_eq!(
            retry_info::wait_from_message(&format!("Please try again in {h}h{m}m{s}s{ms}ms. Need more tokens?")),
            Some(expected)
        );
    }

    /// A reset at or after now never lands before now (we never come back early).
    #[test]
    fn a_retry_instant_from_a_wait_is_never_before_now(wait in retry_text(), now in any_now()) {
        if let Some(at) = retry_info::parse_retry_after(&wait, now)
            && retry_info::parse_seconds(&wait).is_some()
        {
            prop_assert!(at >= now);
        }
    }
}

/// One budget as a provider writes it: `x-ratelimit-*` (with or without a window suffix,
/// resets in float seconds or a Go duration) or Anthropic's (RFC 3339 resets, no window).
#[derive(Debug, Clone)]
struct WrittenBudget {
    tokens: bool,
    /// Index into ["", "-minute", "-hour", "-day"]; Anthropic's sets have none (0).
    window: usize,
    anthropic: bool,
    limit: Option<u64>,
    remaining: u64,
    /// Whole seconds from now, below 1e9 so that it cannot read as an epoch.
    reset_secs: Option<u64>,
    go_duration: bool,
}

const SUFFIXES: [&str; 4] = ["", "-minute", "-hour", "-day"];
const WINDOW_SECS: [Option<u64>; 4] = [None, Some(60), Some(3600), Some(86_400)];
const PRESENT: u64 = 1_790_000_000;

fn written_budget() -> impl Strategy<Value = WrittenBudget> {
    (
        any::<bool>(),
        0..4usize,
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        0..1_000_000_000u64,
        any::<bool>(),
    )
        .prop_map(|(tokens, window, anthropic, a, b, with_limit, reset, go_duration)| {
            let (remaining, limit) = (a.min(b), a.max(b));
            WrittenBudget {
                tokens,
                window: if anthropic { 0 } else { window },
                anthropic,
                limit: with_limit.then_some(limit),
                remaining,
                reset_secs: (reset % 3 != 0).then_some(reset),
                go_duration,
            }
        })
}

impl WrittenBudget {
    fn slot(&self) -> (bool, usize) {
        (self.tokens, self.window)
    }

    fn headers(&self) -> Vec<(String, String)> {
        let measure = if self.tokens { "tokens" } else { "requests" };
        let name = |field: &str| {
            if self.anthropic {
                format!("anthropic-ratelimit-{measure}-{field}")
            } else {
                format!("x-ratelimit-{field}-{measure}{}", SUFFIXES[self.window])
            }
        };
        let mut headers = vec![(name("remaining"), self.remaining.to_string())];
        if let Some(limit) = self.limit {
            headers.push((name("limit"), limit.to_string()));
        }
        if let Some(secs) = self.reset_secs {
            let value = if self.anthropic {
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(PRESENT + secs)).to_string()
            } else if self.go_duration {
                format!("{}h{}m{}s", secs / 3600, secs % 3600 / 60, secs % 60)
            } else {
                format!("{secs}.000")
            };
            headers.push((name("reset"), value));
        }
        headers
    }

    fn observation(&self, now: SystemTime) -> QuotaObservation {
        let resets_at = self.reset_secs.and_then(|secs| {
            if self.anthropic {
                Some(UNIX_EPOCH + Duration::from_secs(PRESENT + secs))
            } else {
                now.checked_add(Duration::from_secs(secs))
            }
        });
        QuotaObservation {
            measure: if self.tokens { QuotaMeasure::Tokens } else { QuotaMeasure::Requests },
            remaining: self.remaining,
            limit: self.limit,
            resets_at,
            window: WINDOW_SECS[self.window].map(Duration::from_secs),
        }
    }
}

// ---- errors ----------------------------------------------------------------------------

proptest! {
    #[test]
    fn classify_never_panics_on_any_bytes(status in any_status(), headers in header_map(), raw in body_bytes(), now in any_now()) {
        let parsed: Option<Value> = serde_json::from_slice(&raw).ok();
        let info = ErrorInfo::read(parsed.as_ref(), &raw);
        let failure = classify(status, &headers, &info, now);
        prop_assert_eq!(failure.status, Some(status));
        prop_assert!(!failure.message.is_empty());
        if (300..400).contains(&status) {
            prop_assert_eq!(failure.kind, FailureKind::Server);
        }
        // Only the kinds that wait for the provider carry a time; a client error never does.
        if matches!(failure.kind, FailureKind::Client | FailureKind::ModelUnavailable | FailureKind::Auth) {
            prop_assert_eq!(failure.retry_at, None);
        }
    }

    #[test]
    fn classify_never_panics_on_any_json(status in any_status(), headers in header_map(), json in prop_oneof![any_json(), error_body()], now in any_now()) {
        let info = ErrorInfo::read(Some(&json), &[]);
        let failure = classify(status, &headers, &info, now);
        prop_assert!(failure.message.chars().count() <= 301, "messages are cut to a readable length");
    }
}

// ---- dialects ------------------------------------------------------------------------------

proptest! {
    #[test]
    fn every_dialect_reads_any_answer_without_panicking(
        status in any_status(),
        headers in header_map(),
        body in body_bytes(),
        now in any_now(),
    ) {
        for result in [
            openai::interpret(status, &headers, &body, now),
            gemini::interpret(status, &headers, &body, "model", now),
            anthropic::interpret(status, &headers, &body, anthropic::Reading::text("model"), now),
        ] {
            match result {
                Ok(done) => {
                    prop_assert!((200..300).contains(&status));
                    prop_assert_eq!(done.status, status);
                    prop_assert!(done.body.is_object());
                }
                Err(failure) => prop_assert!(failure.status.is_some()),
            }
        }
    }

    /// Whatever the usage counts (up to u64::MAX, where a sum would wrap), a translated answer
    /// is a chat.completion whose reported usage is the one the quotas are corrected with.
    #[test]
    fn translated_usage_never_wraps(body in success_body(), now in any_now()) {
        let bytes = body.to_string().into_bytes();
        let answers = [
            gemini::interpret(200, &HeaderMap::new(), &bytes, "model", now),
            anthropic::interpret(200, &HeaderMap::new(), &bytes, anthropic::Reading::text("model"), now),
        ];
        for done in answers.into_iter().flatten() {
            prop_assert_eq!(&done.body["object"], "chat.completion");
            prop_assert_eq!(done.body.pointer("/usage/total_tokens").and_then(Value::as_u64), done.total_tokens);
        }
    }
}

// ---- config --------------------------------------------------------------------------------

const SEED: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
jobs_queue = "llm.jobs"
results_queue = "llm.results"
prefetch = 32
reply_to_allow = ["*", "svc.*"]
max_message_bytes = 1048576

[postgres]
url = "postgres://postgres@127.0.0.1:5432/fallback"

[http]
addr = "0.0.0.0:9090"

[[providers]]
name = "groq"
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ_API_KEY"
model = "llama-3.3-70b-versatile"
free = true
timeout = "10s"
max_retries = 1
context_window = 131072
limits = [{ requests = 30, per = "1m" }, { tokens = 6000, per = "1m" }]
headers = { "HTTP-Referer" = "https://example.org" }

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_API_KEY"
model = "claude-sonnet-4-5"

[chains.default]
providers = ["groq", "claude"]
max_wait = "10m"
free_wait = "0s"
"#;

fn seeds() -> Vec<&'static str> {
    vec![SEED, include_str!("../fallback.example.toml")]
}

/// TOML values, sane and not: durations too big for anything, zeros, wrong types.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        numeric_text(),
        "\"[0-9]{1,25}(ns|ms|s|m|h|d|w|y|)\"",
        select(vec![
            "\"1e300s\"",
            "\"18446744073709551615s\"",
            "\"0s\"",
            "\"\"",
            "true",
            "[]",
            "{}",
            "[\"a\", 1]",
            "[{ requests = 0, per = \"1ms\" }]",
            "[{ tokens = 18446744073709551615, per = \"1d\" }]",
            "{ \"bad header\" = \"x\" }",
            "\"ftp://x\"",
            "\"amqp://\"",
            "\"http://\"",
            "\"::\"",
        ])
        .prop_map(str::to_string),
        any::<String>().prop_map(|s| toml_quote(&s)),
    ]
}

fn toml_quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c) & 0xFFFF)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value of one `key = value` line.
    Value(Index, String),
    /// Insert text at a character position.
    Insert(Index, String),
    /// Delete a run of characters.
    Delete(Index, usize),
    DuplicateLine(Index),
    DropLine(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Mutation::Value(i, v)),
        2 => (any::<Index>(), prop_oneof![any::<String>(), Just("\n[amqp]\n".to_string()), Just("\n[[providers]]\n".to_string()), "[\\[\\]={}\"\\n ,a-z0-9.]{1,12}"]).prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => (any::<Index>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => any::<Index>().prop_map(Mutation::DropLine),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let chars: Vec<char> = text.chars().collect();
    match mutation {
        Mutation::Value(at, value) => {
            let assignments: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
            if assignments.is_empty() {
                return text.to_string();
            }
            let line = assignments[at.index(assignments.len())];
            let key = lines[line].split(" = ").next().unwrap_or_default().to_string();
            lines[line] = format!("{key} = {value}");
            lines.join("\n")
        }
        Mutation::Insert(at, insert) => {
            let at = at.index(chars.len() + 1);
            chars[..at].iter().collect::<String>() + insert + &chars[at..].iter().collect::<String>()
        }
        Mutation::Delete(at, n) => {
            let at = at.index(chars.len() + 1);
            let end = (at + n).min(chars.len());
            chars[..at].iter().chain(&chars[end..]).collect()
        }
        Mutation::DuplicateLine(at) if !lines.is_empty() => {
            let i = at.index(lines.len());
            let line = lines[i].clone();
            lines.insert(i, line);
            lines.join("\n")
        }
        Mutation::DropLine(at) if !lines.is_empty() => {
            lines.remove(at.index(lines.len()));
            lines.join("\n")
        }
        Mutation::Truncate(at) => chars[..at.index(chars.len() + 1)].iter().collect(),
        _ => text.to_string(),
    }
}

/// TOML-looking text built from the config's own vocabulary.
fn tomlish_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        select(vec![
            "[amqp]",
            "[postgres]",
            "[http]",
            "[worker]",
            "[[providers]]",
            "[chains.default]",
            "[chains.x]",
            "[quotas]",
            "["
        ])
        .prop_map(str::to_string),
        (
            select(vec![
                "url",
                "jobs_queue",
                "results_queue",
                "prefetch",
                "reply_to_allow",
                "max_message_bytes",
                "confirm_timeout",
                "max_connections",
                "addr",
                "hold_limit",
                "delivery_deadline",
                "max_deliveries",
                "drain_timeout",
                "result_retention",
                "name",
                "kind",
                "base_url",
                "api_key_env",
                "model",
                "free",
                "timeout",
                "max_retries",
                "context_window",
                "limits",
                "headers",
                "providers",
                "max_wait",
                "free_wait",
                "x",
            ]),
            toml_value(),
        )
            .prop_map(|(k, v)| format!("{k} = {v}")),
        any::<String>(),
    ];
    prop::collection::vec(line, 0..25).prop_map(|lines| lines.join("\n"))
}

/// Loading must end in a config or in an error that names the file and a key.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, Path::new("fuzz.toml"), &EnvOverrides::default()) {
        Ok(config) => {
            prop_assert!(config.chains.contains_key("default"));
            for chain in config.chains.values() {
                for member in &chain.providers {
                    prop_assert!(config.provider(member).is_some(), "chain member `{}` is declared", member);
                }
            }
            prop_assert!(config.amqp.prefetch >= 1);
        }
        Err(e) => {
            prop_assert_eq!(e.file.as_str(), "fuzz.toml");
            prop_assert!(!e.key.trim().is_empty(), "the error names a key: {}", e);
            prop_assert!(!e.problem.trim().is_empty(), "the error says what is wrong: {}", e);
        }
    }
    Ok(())
}

#[test]
fn the_config_seeds_are_valid() {
    for seed in seeds() {
        Config::parse(seed, Path::new("seed.toml"), &EnvOverrides::default()).unwrap();
    }
}

proptest! {
    #[test]
    fn config_loading_never_panics_on_any_text(text in prop_oneof![any::<String>(), tomlish_text()]) {
        check_config(&text)?;
    }

    #[test]
    fn config_loading_never_panics_on_a_mutated_valid_file(
        seed in select(seeds()),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let text = mutations.iter().fold(seed.to_string(), |text, m| apply(&text, m));
        check_config(&text)?;
    }
}
