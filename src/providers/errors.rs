//! Reading and classifying error answers, whatever the provider's envelope (providers.md §0):
//! OpenAI-style `{"error":{…}}`, Cerebras' unwrapped fields, OpenRouter's numeric codes and
//! `metadata`, Google's `status`/`details` (bare or wrapped in an array), Anthropic's
//! `{"type":"error","error":{…}}`, Hugging Face's `{"error":"…"}`, and HTML or plain-text pages
//! from proxies. Every dialect ends here, so a quirk is handled once for all providers.

use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde_json::Value;

use super::retry_info::{self, next_pacific_midnight, next_utc_midnight};
use super::{Failure, FailureKind, short_message};

/// The parts of an error body that classification reads, from any envelope providers use.
#[derive(Debug, Default)]
pub struct ErrorInfo {
    message: String,
    /// `code` as text (`rate_limit_exceeded`, `token_quota_exceeded`, `insufficient_quota`…).
    code: String,
    /// `type` (`tokens`, `insufficient_quota`, `invalid_request_error`…) or Google's `status`.
    kind: String,
    /// A numeric `code` (OpenRouter and Google put the HTTP status there).
    pub numeric_code: Option<u16>,
    /// OpenRouter's `error.metadata`.
    metadata: Option<Value>,
    /// Google's `error.details`.
    details: Vec<Value>,
}

impl ErrorInfo {
    pub fn read(parsed: Option<&Value>, raw: &[u8]) -> ErrorInfo {
        let Some(json) = parsed else {
            // HTML or plain-text bodies from proxies (Cloudflare, Envoy).
            let text = String::from_utf8_lossy(raw);
            let text =
                if text.trim_start().starts_with('<') { "an HTML error page".to_string() } else { text.into_owned() };
            return ErrorInfo { message: short_message(&text), ..ErrorInfo::default() };
        };
        // Gemini's OpenAI endpoint wraps the error in an array.
        let json = match json {
            Value::Array(items) => items.first().unwrap_or(&Value::Null),
            other => other,
        };
        let error = match json.get("error") {
            Some(Value::String(message)) => {
                return ErrorInfo { message: short_message(message), ..ErrorInfo::default() };
            }
            Some(error @ Value::Object(_)) => error,
            // Cerebras: the fields sit at the top level.
            _ => json,
        };
        let text = |key: &str| match error.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let message = [text("message"), text("detail")].into_iter().find(|m| !m.is_empty()).unwrap_or_default();
        ErrorInfo {
            message: short_message(&message),
            code: text("code"),
            kind: [text("type"), text("status")].into_iter().find(|m| !m.is_empty()).unwrap_or_default(),
            numeric_code: error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()),
            metadata: error.get("metadata").cloned(),
            details: error.get("details").and_then(Value::as_array).cloned().unwrap_or_default(),
        }
    }

    fn limit_source(&self) -> Option<&str> {
        self.metadata.as_ref()?.get("limit_source")?.as_str()
    }

    /// `metadata.headers.X-RateLimit-Reset` (OpenRouter puts its headers in the body too).
    fn metadata_reset(&self) -> Option<SystemTime> {
        let headers = self.metadata.as_ref()?.get("headers")?;
        let reset = headers.get("X-RateLimit-Reset").or_else(|| headers.get("x-ratelimit-reset"))?;
        retry_info::parse_epoch(reset.as_str()?)
    }

    /// Google's `RetryInfo.retryDelay`.
    fn retry_delay(&self) -> Option<std::time::Duration> {
        self.details
            .iter()
            .find(|d| d.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with("google.rpc.RetryInfo")))
            .and_then(|d| d.get("retryDelay")?.as_str())
            .and_then(retry_info::parse_protobuf_duration)
    }

    /// Google's `QuotaFailure` violations' quota ids.
    fn quota_ids(&self) -> Vec<&str> {
        self.details
            .iter()
            .filter_map(|d| d.get("violations")?.as_array())
            .flatten()
            .filter_map(|v| v.get("quotaId")?.as_str())
            .collect()
    }

    fn has_reason(&self, reason: &str) -> bool {
        self.details.iter().any(|d| d.get("reason").and_then(Value::as_str) == Some(reason))
    }
}

/// Classifies an error answer and extracts when to come back.
pub fn classify(status: u16, headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Failure {
    let message = if info.message.is_empty() { format!("HTTP {status}") } else { info.message.clone() };
    let mut failure = Failure::new(kind_for(status, info), Some(status), message);
    match failure.kind {
        FailureKind::RateLimited => {
            let daily_reset = daily_reset(headers, info, now);
            failure.daily = daily_reset.is_some();
            failure.retry_at = daily_reset.or_else(|| retry_at(headers, info, now));
        }
        FailureKind::Server | FailureKind::Credits => failure.retry_at = retry_info::from_headers(headers, now),
        _ => {}
    }
    failure
}

fn kind_for(status: u16, info: &ErrorInfo) -> FailureKind {
    let message = info.message.to_ascii_lowercase();
    match status {
        429 if info.kind == "insufficient_quota" => FailureKind::Credits, // OpenAI billing, not a rate
        429 if message.starts_with("request too large") => FailureKind::Client,
        // Cerebras' "high traffic" and SambaNova's full queue are the provider's capacity, not
        // our quota: a short per-job backoff, no shared 60 s cooldown.
        429 if matches!(info.code.as_str(), "queue_exceeded" | "queue_full") => FailureKind::Server,
        429 | 529 => FailureKind::RateLimited,
        400 if info.has_reason("API_KEY_INVALID") || message.contains("api key not valid") => FailureKind::Auth,
        // Anthropic's low balance is a 400; Hugging Face's spending cap a 403.
        400 | 403 if message.contains("credit balance is too low") || message.contains("spending limit") => {
            FailureKind::Credits
        }
        401 | 403 => FailureKind::Auth,
        402 => FailureKind::Credits,
        408 => FailureKind::Timeout,
        413 => FailureKind::Client,
        498 => FailureKind::Server, // Groq flex tier out of capacity
        500..=599 => FailureKind::Server,
        _ if info.kind == "RESOURCE_EXHAUSTED" => FailureKind::RateLimited,
        _ => FailureKind::Client,
    }
}

/// The retry instant for a per-minute (or unknown-window) limit, most precise source first.
fn retry_at(headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Option<SystemTime> {
    retry_info::from_headers(headers, now)
        .or_else(|| info.metadata_reset())
        .or_else(|| info.retry_delay().and_then(|d| now.checked_add(d)))
        .or_else(|| retry_info::wait_from_message(&info.message).and_then(|d| now.checked_add(d)))
}

/// When the error says a per-day quota is spent: its reset.
fn daily_reset(headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Option<SystemTime> {
    let message = &info.message;
    let reset_header = |names: &[&str]| {
        names.iter().filter_map(|n| headers.get(*n)?.to_str().ok()).find_map(|v| retry_info::parse_reset(v, now))
    };
    // Groq names the window: "(TPD)" / "(RPD)"; its "try again in" is the precise wait.
    if message.contains("(TPD)") || message.contains("(RPD)") {
        return retry_at(headers, info, now).or_else(|| next_utc_midnight(now));
    }
    // Gemini: the quota id says PerDay; its retryDelay is misleading, the reset is Pacific midnight.
    if info.quota_ids().iter().any(|id| id.contains("PerDay")) {
        return next_pacific_midnight(now);
    }
    // OpenRouter's free tier: reset at UTC midnight, also given as epoch ms.
    let openrouter_daily =
        info.limit_source() == Some("openrouter_free_tier_daily") || message.contains("free-models-per-day");
    if openrouter_daily {
        let header = headers.get("x-ratelimit-reset").and_then(|v| v.to_str().ok()).and_then(retry_info::parse_epoch);
        return header.or_else(|| info.metadata_reset()).or_else(|| next_utc_midnight(now));
    }
    // Cerebras: "Tokens per day limit exceeded".
    if message.to_ascii_lowercase().contains("per day") {
        let reset = reset_header(&["x-ratelimit-reset-tokens-day", "x-ratelimit-reset-requests-day"]);
        return reset.or_else(|| next_utc_midnight(now));
    }
    // SambaNova: "Violated duration_s: 86400".
    if message.contains("duration_s: 86400") {
        let reset = reset_header(&["x-ratelimit-reset-requests-day"]);
        return reset.or_else(|| next_utc_midnight(now));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_past_the_end_of_time_are_dropped_not_panicked_on() {
        let last = std::time::UNIX_EPOCH + std::time::Duration::new(i64::MAX.unsigned_abs(), 999_999_999);
        let body = r#"{"error":{"code":429,"message":"Please retry in 58s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}"#;
        let parsed: Value = serde_json::from_str(body).unwrap();
        let failure = classify(429, &HeaderMap::new(), &ErrorInfo::read(Some(&parsed), body.as_bytes()), last);
        assert_eq!((failure.kind, failure.retry_at), (FailureKind::RateLimited, None));
        let groq_day = r#"{"error":{"message":"… on tokens per day (TPD): Limit 100000. Please try again in 9m38.016s.","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let parsed: Value = serde_json::from_str(groq_day).unwrap();
        let failure = classify(429, &HeaderMap::new(), &ErrorInfo::read(Some(&parsed), groq_day.as_bytes()), last);
        assert_eq!(failure.retry_at, None);
    }
}
