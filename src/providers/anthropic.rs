//! Anthropic's Messages API: `{base_url}/messages` with `x-api-key` and `anthropic-version`.
//!
//! System messages become the top-level `system`; `max_tokens`, which Anthropic requires, defaults
//! to [`DEFAULT_MAX_TOKENS`] when the job gives none; content blocks come back as the message text.

use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

use super::errors::{ErrorInfo, classify};
use super::translate::{Answer, Usage, max_tokens, refuse_unsupported, stop_sequences, text_messages};
use super::{Completion, Failure, FailureKind, retry_info};
use crate::job::ChatBody;

/// The API version every request names.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the job sets neither `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

const UNSUPPORTED: &[&str] =
    &["tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format"];

/// The Messages API body for `model`, or the name of what cannot be translated.
pub fn request_body(body: &ChatBody, model: &str) -> Result<Value, String> {
    refuse_unsupported(body, UNSUPPORTED)?;
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for (role, text) in text_messages(body)? {
        match role.as_str() {
            "system" | "developer" => system.push(text),
            "user" | "assistant" => messages.push(json!({"role": role, "content": text})),
            other => return Err(format!("`{other}` messages")),
        }
    }
    let mut request = Map::new();
    request.insert("model".into(), json!(model));
    request.insert("messages".into(), Value::Array(messages));
    let max_tokens = max_tokens(body).and_then(Value::as_u64).unwrap_or(DEFAULT_MAX_TOKENS);
    request.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        request.insert("system".into(), json!(system.join("\n\n")));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            request.insert(key.into(), v.clone());
        }
    }
    if let Some(stop) = stop_sequences(body) {
        request.insert("stop_sequences".into(), stop);
    }
    Ok(Value::Object(request))
}

/// Reads one answer into a `chat.completion` or a classified failure.
pub fn interpret(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<Completion, Failure> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        return Err(classify(status, headers, &ErrorInfo::read(parsed.as_ref(), body), now));
    }
    let Some(json) = parsed.filter(|j| j.get("type").and_then(Value::as_str) == Some("message")) else {
        return Err(Failure::new(FailureKind::Server, Some(status), "the provider answered 200 without a message"));
    };
    let text: String = json
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let finish_reason = match json.get("stop_reason").and_then(Value::as_str) {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    };
    let count = |key: &str| json.pointer(&format!("/usage/{key}")).and_then(Value::as_u64).unwrap_or(0);
    let usage = Usage::new(count("input_tokens"), count("output_tokens"), None);
    let id = json.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let request_id =
        headers.get("request-id").and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_else(|| id.clone());
    let body = Answer { id: &id, model: json.get("model").cloned().unwrap_or(Value::Null), text, finish_reason, usage }
        .into_chat_completion(now);
    Ok(Completion {
        status,
        request_id,
        body,
        total_tokens: usage.map(|u| u.total_tokens),
        exhausted_until: retry_info::exhausted_reset(headers, now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;
    use std::time::Duration;

    #[test]
    fn chat_requests_become_messages() {
        let request = request_body(
            &body(json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use French."}, {"role": "user", "content": "Hi"}],
                "temperature": 0.5, "stop": ["END"]})),
            "claude-sonnet-4-5",
        )
        .unwrap();
        assert_eq!(request["system"], "Be brief.\n\nUse French.");
        assert_eq!(request["messages"], json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(request["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(request["stop_sequences"], json!(["END"]));
        assert_eq!(request["model"], "claude-sonnet-4-5");
        let with_budget =
            request_body(&body(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 77})), "m")
                .unwrap();
        assert_eq!(with_budget["max_tokens"], 77);
        assert_eq!(request_body(&body(json!({"messages": [], "tools": []})), "m").unwrap_err(), "`tools`");
    }

    #[test]
    fn messages_become_chat_completions() {
        let answer = json!({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Bonjour"}], "stop_reason": "max_tokens", "usage": {"input_tokens": 12, "output_tokens": 4}});
        let done =
            interpret(200, &headers(&[("request-id", "req_011")]), answer.to_string().as_bytes(), now()).unwrap();
        assert_eq!(done.request_id, "req_011");
        assert_eq!(done.body["choices"][0]["message"]["content"], "Bonjour");
        assert_eq!(done.body["choices"][0]["finish_reason"], "length");
        assert_eq!(done.body["usage"]["total_tokens"], 16);
        assert_eq!(done.body["model"], "claude-sonnet-4-5");
    }

    #[test]
    fn errors_follow_the_reference() {
        let fail = |status, hdrs: &[(&str, &str)], text: &str| {
            interpret(status, &headers(hdrs), text.as_bytes(), now()).unwrap_err()
        };
        let limited = fail(
            429,
            &[
                ("retry-after", "15"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-10-03T12:00:15Z"),
            ],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your account's rate limit. Please try again later."},"request_id":"req_011"}"#,
        );
        assert_eq!((limited.kind, limited.retry_at), (FailureKind::RateLimited, Some(now() + Duration::from_secs(15))));
        let reset_only = fail(
            429,
            &[
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                ("anthropic-ratelimit-input-tokens-reset", "2026-10-03T12:00:30Z"),
            ],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}"#,
        );
        assert_eq!(reset_only.retry_at, Some(now() + Duration::from_secs(30)));
        assert_eq!(
            fail(
                529,
                &[],
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#
            )
            .kind,
            FailureKind::RateLimited
        );
        let too_long = fail(
            400,
            &[],
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208310 tokens > 200000 maximum"},"request_id":"req_1"}"#,
        );
        assert_eq!(too_long.kind, FailureKind::Client);
        let credit = fail(
            400,
            &[],
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#,
        );
        assert_eq!(credit.kind, FailureKind::Credits);
        assert_eq!(
            fail(401, &[], r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#)
                .kind,
            FailureKind::Auth
        );
        assert_eq!(
            fail(500, &[], r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#).kind,
            FailureKind::Server
        );
    }

    #[test]
    fn usage_that_cannot_be_true_is_dropped_not_summed() {
        let answer = json!({"id": "msg_01", "type": "message", "model": "m", "content": [{"type": "text", "text": "x"}],
            "usage": {"input_tokens": u64::MAX, "output_tokens": 1}});
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), now()).unwrap();
        assert_eq!(done.total_tokens, None);
        assert_eq!(done.body.get("usage"), None);
    }

    #[test]
    fn a_withdrawn_model_is_model_unavailable() {
        let gone = r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-3-5-sonnet-20241022"},"request_id":"req_011CVfG3PpZSwfcTNx5NJCWZ"}"#;
        let failure = interpret(404, &HeaderMap::new(), gone.as_bytes(), now()).unwrap_err();
        assert_eq!((failure.kind, failure.status), (FailureKind::ModelUnavailable, Some(404)));
        // A reset header from the far end of time is no reason to panic.
        let far = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ]);
        let limited = interpret(
            429,
            &far,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}"#,
            now(),
        );
        assert_eq!(limited.unwrap_err().kind, FailureKind::RateLimited);
    }
}
