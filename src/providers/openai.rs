//! The OpenAI-compatible dialect (`{base_url}/chat/completions`): Groq, Cerebras, OpenRouter,
//! SambaNova, Hugging Face router, Gemini's OpenAI endpoint, OpenAI itself.
//!
//! They share the request and the success shape but each says "slow down", "out of quota for
//! today" and "bad key" its own way; [`interpret`] reads every shape from providers.md without
//! knowing which provider it is talking to, so a new compatible provider needs no code.

use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::errors::{ErrorInfo, classify};
use super::{Completion, Failure, FailureKind, short_message};
use super::{quota_headers, retry_info, shape};
use crate::job::ChatBody;

/// The request body for `model`: the job's body with the provider's own model.
pub fn request_body(body: &ChatBody, model: &str) -> Value {
    let mut body = body.clone();
    body.insert("model".into(), Value::String(model.to_string()));
    Value::Object(body)
}

/// The request body for `model`, serialized straight from the job's body: the JSON of
/// [`request_body`] (same keys, same order), without copying the body first. Every job's
/// call goes through this.
pub struct RequestBody<'a> {
    pub body: &'a ChatBody,
    pub model: &'a str,
}

impl Serialize for RequestBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const MODEL: &str = "model";
        let len = self.body.len() + usize::from(!self.body.contains_key(MODEL));
        let mut map = serializer.serialize_map(Some(len))?;
        // The body's keys come sorted (serde_json's map): `model` goes where it sorts.
        let mut model_written = false;
        for (key, value) in self.body {
            if key == MODEL {
                continue;
            }
            if !model_written && key.as_str() > MODEL {
                map.serialize_entry(MODEL, self.model)?;
                model_written = true;
            }
            map.serialize_entry(key, value)?;
        }
        if !model_written {
            map.serialize_entry(MODEL, self.model)?;
        }
        map.end()
    }
}

/// Reads one HTTP answer: a chat completion, or a classified failure.
pub fn interpret(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<Completion, Failure> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        return match parsed {
            Some(json) => success(status, headers, json, now),
            None => Err(Failure::new(
                FailureKind::Server,
                Some(status),
                "the provider answered 200 with a body that is not JSON",
            )),
        };
    }
    let info = ErrorInfo::read(parsed.as_ref(), body);
    Err(classify(status, headers, &info, now))
}

fn success(status: u16, headers: &HeaderMap, mut json: Value, now: SystemTime) -> Result<Completion, Failure> {
    // OpenRouter reports errors raised while generating inside a 200 body.
    if json.get("error").is_some_and(|e| !e.is_null()) {
        let info = ErrorInfo::read(Some(&json), &[]);
        // The code is the provider's word: only an error status is taken as one (a "code": 200
        // or 302 inside an error would otherwise read as a success or a redirect).
        let code = info.numeric_code.filter(|c| (400..600).contains(c)).unwrap_or(502);
        return Err(classify(code, headers, &info, now));
    }
    let choices = json.get("choices").and_then(Value::as_array);
    if choices.is_none_or(|c| c.is_empty()) {
        return Err(Failure::new(FailureKind::Server, Some(status), "the provider answered without choices"));
    }
    // A generation that failed is no answer, whichever of the choices (`n` > 1) it is.
    if let Some(failed) = choices.into_iter().flatten().find(|choice| shape::failed_generation(choice)) {
        let message = failed.pointer("/error/message").and_then(Value::as_str).unwrap_or("generation failed");
        return Err(Failure::new(FailureKind::Server, Some(status), short_message(message)));
    }
    // The provider's count as it gave it, read before the mending (which may drop the usage).
    let total_tokens = json.get("usage").and_then(shape::usage_total);
    // The answer goes to clients whose OpenAI SDK must load it (contract §3): a server's own
    // spellings are mended, and what cannot be is a garbled answer, as a body that is not JSON.
    shape::repair_answer(&mut json);
    let problems = shape::answer_problems(&json);
    if !problems.is_empty() {
        let named: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
        let message = format!("the provider's answer would not load in the OpenAI SDK: {}", named.join("; "));
        return Err(Failure::new(FailureKind::Server, Some(status), short_message(&message)));
    }
    let request_id = header(headers, "x-request-id")
        .or_else(|| header(headers, "x-generation-id"))
        .or_else(|| header(headers, "request-id"))
        .map(str::to_string)
        .or_else(|| json.get("id").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let exhausted_until = retry_info::exhausted_reset(headers, now);
    let quota = quota_headers::observe(headers, now);
    Ok(Completion { status, request_id, body: json, total_tokens, exhausted_until, quota })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;
    use std::time::Duration;

    fn fail(status: u16, hdrs: &[(&str, &str)], body: &str) -> Failure {
        interpret(status, &headers(hdrs), body.as_bytes(), now()).unwrap_err()
    }

    const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;

    #[test]
    fn success_keeps_the_completion_and_usage() {
        let done = interpret(200, &headers(&[("x-request-id", "req_1")]), COMPLETION.as_bytes(), now()).unwrap();
        assert_eq!(done.request_id, "req_1");
        assert_eq!(done.total_tokens, Some(7));
        assert_eq!(done.body["choices"][0]["message"]["content"], "hi");
        assert_eq!(done.exhausted_until, None);
    }

    /// Black-box round 2, L5: an OpenAI-compatible server's own finish reasons and spellings
    /// reached clients as given, and their SDK refused the result.
    #[test]
    fn a_servers_own_spellings_are_mended_into_what_the_sdk_loads() {
        let answer = |choice: Value| {
            let body = serde_json::json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
            interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), now())
        };
        let message = serde_json::json!({"role": "assistant", "content": "hi"});
        for (given, read) in [
            (serde_json::json!("eos"), "stop"),
            (serde_json::json!("end_turn"), "stop"),
            (serde_json::json!("MAX_TOKENS"), "length"),
            (serde_json::json!("tool_use"), "tool_calls"),
            (serde_json::json!("SAFETY"), "content_filter"),
            (serde_json::json!({"reason": "stop"}), "stop"),
            (Value::Null, "stop"),
        ] {
            let done = answer(serde_json::json!({"index": 0, "message": message, "finish_reason": given})).unwrap();
            let choice = &done.body["choices"][0];
            assert_eq!(choice["finish_reason"], read, "{given}");
            let native = given.as_str().map(Value::from).unwrap_or(Value::Null);
            assert_eq!(choice.get("native_finish_reason").cloned().unwrap_or(Value::Null), native, "{given}");
        }
        let done = answer(serde_json::json!({"index": "first", "finish_reason": "stop",
            "message": {"content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}], "refusal": 3}}))
        .unwrap();
        let choice = &done.body["choices"][0];
        assert_eq!((&choice["index"], &choice["message"]["role"]), (&Value::from(0), &Value::from("assistant")));
        assert_eq!((&choice["message"]["content"], choice["message"].get("refusal")), (&Value::from("hello"), None));
        assert!(done.body.get("choices").is_some() && crate::providers::shape::answer_problems(&done.body).is_empty());
        let counted_in_text = serde_json::json!({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": "1", "completion_tokens": 1, "total_tokens": 2.5}});
        let done = interpret(200, &HeaderMap::new(), counted_in_text.to_string().as_bytes(), now()).unwrap();
        assert_eq!((done.body.get("usage"), done.total_tokens), (None, None), "a usage the SDK refuses is dropped");
    }

    #[test]
    fn an_answer_that_cannot_be_mended_is_a_garbled_one() {
        for choice in [
            serde_json::json!({"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": 42}}),
            serde_json::json!({"index": 0, "finish_reason": "stop", "message": "hi"}),
            serde_json::json!({"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}}),
        ] {
            let body = serde_json::json!({"choices": [choice]}).to_string();
            let failure = interpret(200, &HeaderMap::new(), body.as_bytes(), now()).unwrap_err();
            assert_eq!((failure.kind, failure.status), (FailureKind::Server, Some(200)), "{choice}");
            assert!(failure.message.contains("would not load in the OpenAI SDK"), "{}", failure.message);
        }
    }

    #[test]
    fn a_success_that_spends_the_last_of_a_budget_says_until_when() {
        let spent = headers(&[("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "1m26.4s")]);
        let done = interpret(200, &spent, COMPLETION.as_bytes(), now()).unwrap();
        assert_eq!(done.exhausted_until, Some(now() + Duration::from_millis(86_400)));
    }

    #[test]
    fn a_success_reports_what_its_rate_limit_headers_say() {
        let groq = headers(&[
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-remaining-tokens", "garbage"),
        ]);
        let done = interpret(200, &groq, COMPLETION.as_bytes(), now()).unwrap();
        assert_eq!(
            done.quota,
            vec![crate::routing::QuotaObservation {
                measure: crate::routing::QuotaMeasure::Requests,
                remaining: 14370,
                limit: Some(14400),
                resets_at: Some(now() + Duration::from_millis(179_560)),
                window: None,
            }]
        );
        assert_eq!(done.exhausted_until, None);
        let none = interpret(200, &HeaderMap::new(), COMPLETION.as_bytes(), now()).unwrap();
        assert!(none.quota.is_empty());
    }

    #[test]
    fn request_body_replaces_model_and_keeps_the_rest() {
        let body: ChatBody = serde_json::from_str(r#"{"model":"theirs","temperature":0.2,"messages":[]}"#).unwrap();
        let sent = request_body(&body, "ours");
        assert_eq!(sent["model"], "ours");
        assert_eq!(sent["temperature"], 0.2);
    }

    #[test]
    fn the_streamed_request_body_is_the_request_body_byte_for_byte() {
        let bodies = [
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"theirs","temperature":0.2,"messages":[]}"#,
            r#"{"a":1,"max_tokens":3,"model":null,"n":2,"zz":[{"q":"é\n"}]}"#,
            r#"{"z":1}"#,
            r#"{}"#,
        ];
        for text in bodies {
            let body: ChatBody = serde_json::from_str(text).unwrap();
            let streamed = serde_json::to_vec(&RequestBody { body: &body, model: "ours" }).unwrap();
            assert_eq!(streamed, serde_json::to_vec(&request_body(&body, "ours")).unwrap(), "{text}");
        }
    }

    #[test]
    fn garbage_and_empty_answers_are_server_errors() {
        assert_eq!(fail(200, &[], "<html>oops").kind, FailureKind::Server);
        assert_eq!(fail(200, &[], r#"{"choices":[]}"#).kind, FailureKind::Server);
    }

    #[test]
    fn groq_minute_and_day_limits() {
        let tpm = fail(
            429,
            &[("retry-after", "5"), ("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "4.77s")],
            r#"{"error":{"message":"Rate limit reached for model `m` in organization `org_01mock` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5034, Requested 1443. Please try again in 4.77s. Need more tokens?","type":"tokens","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(tpm.kind, FailureKind::RateLimited);
        assert!(!tpm.daily);
        assert_eq!(tpm.retry_at, Some(now() + Duration::from_secs(5)));
        let tpd = fail(
            429,
            &[("x-ratelimit-remaining-tokens", "6000")],
            r#"{"error":{"message":"Rate limit reached for model `m` in organization `org_01` service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 97050, Requested 3619. Please try again in 9m38.016s. Need more tokens?","type":"tokens","code":"rate_limit_exceeded"}}"#,
        );
        assert!(tpd.daily);
        assert_eq!(tpd.retry_at, Some(now() + Duration::from_millis(578_016)));
    }

    #[test]
    fn groq_request_limits_per_day_and_flex_capacity() {
        let rpd = fail(
            429,
            &[
                ("retry-after", "87"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1m26.4s"),
            ],
            r#"{"error":{"message":"Rate limit reached for model `m` in organization `org_01mock` service tier `on_demand` on requests per day (RPD): Limit 1000, Used 1000, Requested 1. Please try again in 1m26.4s.","type":"requests","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(rpd.kind, FailureKind::RateLimited);
        assert!(rpd.daily);
        assert_eq!(rpd.retry_at, Some(now() + Duration::from_secs(87)));
        let rpm = fail(
            429,
            &[("retry-after", "2")],
            r#"{"error":{"message":"Rate limit reached on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s.","type":"requests","code":"rate_limit_exceeded"}}"#,
        );
        assert!(!rpm.daily);
        let flex = fail(498, &[], r#"{"error":{"message":"flex tier capacity exceeded","type":"capacity_exceeded"}}"#);
        assert_eq!(flex.kind, FailureKind::Server);
        assert_eq!(flex.status, Some(498));
    }

    #[test]
    fn groq_request_too_large_is_a_client_error() {
        let too_large = fail(
            413,
            &[],
            r#"{"error":{"message":"Request too large for model `m` on tokens per minute (TPM): Limit 6000, Requested 12328, please reduce your message size and try again.","type":"tokens","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(too_large.kind, FailureKind::Client);
        assert_eq!(too_large.retry_at, None);
    }

    #[test]
    fn cerebras_unwrapped_bodies() {
        let rpm = fail(
            429,
            &[("x-ratelimit-remaining-requests-minute", "0"), ("x-ratelimit-reset-requests-minute", "42.1")],
            r#"{"message":"Requests per minute limit exceeded - too many requests sent.","type":"too_many_requests_error","param":"quota","code":"request_quota_exceeded"}"#,
        );
        assert_eq!(rpm.kind, FailureKind::RateLimited);
        assert_eq!(rpm.retry_at, Some(now() + Duration::from_millis(42_100)));
        assert!(rpm.message.starts_with("Requests per minute"));
        let tpd = fail(
            429,
            &[("x-ratelimit-remaining-tokens-day", "0"), ("x-ratelimit-reset-tokens-day", "33011.382867097855")],
            r#"{"message":"Tokens per day limit exceeded - too many tokens processed.","type":"too_many_tokens_error","param":"quota","code":"token_quota_exceeded"}"#,
        );
        assert!(tpd.daily);
        assert_eq!(tpd.retry_at, Some(now() + Duration::from_millis(33_011_383)));
        assert_eq!(
            fail(
                401,
                &[],
                r#"{"message":"Wrong API Key","type":"invalid_request_error","param":"api_key","code":"wrong_api_key"}"#
            )
            .kind,
            FailureKind::Auth
        );
        assert_eq!(fail(403, &[], r#"{"detail":"Not authenticated"}"#).message, "Not authenticated");
    }

    #[test]
    fn openrouter_free_limits_use_epoch_ms() {
        let daily = fail(
            429,
            &[],
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1791072000000"},"limit_source":"openrouter_free_tier_daily"}},"user_id":"user_x"}"#,
        );
        assert!(daily.daily);
        assert_eq!(daily.retry_at, Some(humantime::parse_rfc3339("2026-10-04T00:00:00Z").unwrap()));
        let minute = fail(
            429,
            &[("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "1791028860000")],
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-min. ","code":429}}"#,
        );
        assert!(!minute.daily);
        assert_eq!(minute.retry_at, Some(humantime::parse_rfc3339("2026-10-03T12:01:00Z").unwrap()));
        let credits = fail(
            402,
            &[],
            r#"{"error":{"message":"This request requires more credits, or fewer max_tokens.","code":402,"metadata":{"provider_name":null}},"user_id":"u"}"#,
        );
        assert_eq!(credits.kind, FailureKind::Credits);
    }

    #[test]
    fn openrouter_error_inside_a_200() {
        let err =
            fail(200, &[], r#"{"error":{"code":502,"message":"Provider returned error","metadata":{"raw":"x"}}}"#);
        assert_eq!(err.kind, FailureKind::Server);
        let rate = fail(200, &[], r#"{"error":{"code":429,"message":"upstream rate-limited"}}"#);
        assert_eq!(rate.kind, FailureKind::RateLimited);
        // A code that is no error status is not believed: a generic upstream failure.
        for code in ["200", "302", "0", "70000"] {
            let odd = fail(200, &[], &format!(r#"{{"error":{{"code":{code},"message":"odd"}}}}"#));
            assert_eq!((odd.kind, odd.status), (FailureKind::Server, Some(502)), "code {code}");
        }
    }

    #[test]
    fn gemini_openai_endpoint_array_errors() {
        let bare = fail(
            429,
            &[],
            r#"[{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}]"#,
        );
        assert_eq!(bare.kind, FailureKind::RateLimited);
        assert_eq!(bare.retry_at, None); // → the 60 s default cooldown
        let per_day = fail(
            429,
            &[],
            r#"[{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"20"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}]"#,
        );
        assert!(per_day.daily);
        assert_eq!(per_day.retry_at, Some(humantime::parse_rfc3339("2026-10-04T07:00:00Z").unwrap()));
        let per_minute = fail(
            429,
            &[],
            r#"[{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}]"#,
        );
        assert!(!per_minute.daily);
        assert_eq!(per_minute.retry_at, Some(now() + Duration::from_secs(58)));
        let bad_key = fail(
            400,
            &[],
            r#"[{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}]"#,
        );
        assert_eq!(bad_key.kind, FailureKind::Auth);
    }

    #[test]
    fn sambanova_minute_and_day() {
        let rpm = fail(
            429,
            &[],
            r#"{"error":{"message":"Request would exceed rate limit\nViolated duration_s: 60, current usage: 20, limit: 20","type":"rate_limit_error","param":null,"code":"insufficient_quota"},"request_id":"r"}"#,
        );
        assert_eq!(rpm.kind, FailureKind::RateLimited);
        assert!(!rpm.daily);
        let day = fail(
            429,
            &[],
            r#"{"error":{"message":"Request would exceed rate limit\nViolated duration_s: 86400, current usage: 196279, limit: 200000","type":"rate_limit_error","code":"insufficient_quota"}}"#,
        );
        assert!(day.daily);
        assert_eq!(day.retry_at, Some(humantime::parse_rfc3339("2026-10-04T00:00:00Z").unwrap()));
        let queue = fail(
            429,
            &[],
            r#"{"error":{"message":"Queue is full","type":"rate_limit_error","param":null,"code":"queue_full"},"request_id":"r"}"#,
        );
        assert_eq!(queue.kind, FailureKind::Server);
        let cerebras_busy = fail(
            429,
            &[],
            r#"{"message":"We're experiencing high traffic right now! Please try again soon.","code":"queue_exceeded"}"#,
        );
        assert_eq!(cerebras_busy.kind, FailureKind::Server);
    }

    #[test]
    fn openai_quota_and_overload() {
        let billing = fail(
            429,
            &[],
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        );
        assert_eq!(billing.kind, FailureKind::Credits);
        let overloaded = fail(
            503,
            &[("retry-after", "30")],
            r#"{"error":{"code":"server_is_overloaded","message":"Our servers are currently overloaded.","type":"service_unavailable_error"}}"#,
        );
        assert_eq!(overloaded.kind, FailureKind::Server);
        assert_eq!(overloaded.retry_at, Some(now() + Duration::from_secs(30)));
    }

    #[test]
    fn hugging_face_and_proxy_bodies() {
        let credits =
            fail(402, &[], r#"{"error":"You have exceeded your monthly included credits for Inference Providers."}"#);
        assert_eq!(credits.kind, FailureKind::Credits);
        assert!(credits.message.contains("monthly included credits"));
        let envoy = fail(503, &[], "upstream connect error or disconnect/reset before headers. reset reason: overflow");
        assert_eq!(envoy.kind, FailureKind::Server);
        assert!(envoy.message.starts_with("upstream connect error"));
        let cloudflare = fail(502, &[], "<!DOCTYPE html><html><title>Bad gateway</title></html>");
        assert_eq!(cloudflare.message, "an HTML error page");
    }

    #[test]
    fn context_errors_move_on_and_a_missing_model_is_model_unavailable() {
        let ctx = fail(
            400,
            &[],
            r#"{"error":{"message":"Please reduce the length of the messages or completion.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
        );
        assert_eq!(ctx.kind, FailureKind::Client);
        assert_eq!(
            fail(404, &[], r#"{"error":{"message":"The model `x` does not exist","code":"model_not_found"}}"#).kind,
            FailureKind::ModelUnavailable
        );
        assert_eq!(
            fail(408, &[], r#"{"error":{"code":408,"message":"Request timed out"}}"#).kind,
            FailureKind::Timeout
        );
        assert_eq!(
            fail(529, &[], r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#).kind,
            FailureKind::RateLimited
        );
    }
}
