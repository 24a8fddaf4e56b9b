//! Google AI Studio's native dialect: `{base_url}/models/{model}:generateContent`, key in the
//! `x-goog-api-key` header (never in the URL, where it would reach logs).
//!
//! Translates an OpenAI chat request into `contents` / `systemInstruction` / `generationConfig`
//! and the answer back into a `chat.completion`. Safety blocks (a 200 without text) are client
//! errors: this prompt will not pass here, the next provider may answer it.

use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

use super::errors::{ErrorInfo, classify};
use super::translate::{Answer, Usage, max_tokens, refuse_unsupported, stop_sequences, text_messages};
use super::{Completion, Failure, FailureKind, retry_info};
use crate::job::ChatBody;

/// Request fields this dialect cannot carry yet; a job using one skips the provider.
const UNSUPPORTED: &[&str] = &["tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs"];

/// The `generateContent` body, or the name of what cannot be translated.
pub fn request_body(body: &ChatBody) -> Result<Value, String> {
    refuse_unsupported(body, UNSUPPORTED)?;
    let mut system = Vec::new();
    let mut contents = Vec::new();
    for (role, text) in text_messages(body)? {
        match role.as_str() {
            "system" | "developer" => system.push(json!({"text": text})),
            "user" => contents.push(json!({"role": "user", "parts": [{"text": text}]})),
            "assistant" => contents.push(json!({"role": "model", "parts": [{"text": text}]})),
            other => return Err(format!("`{other}` messages")),
        }
    }
    let mut request = Map::new();
    request.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        request.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let config = generation_config(body);
    if !config.is_empty() {
        request.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(request))
}

fn generation_config(body: &ChatBody) -> Map<String, Value> {
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), v.clone());
        }
    }
    if let Some(max) = max_tokens(body) {
        config.insert("maxOutputTokens".into(), max.clone());
    }
    if let Some(stop) = stop_sequences(body) {
        config.insert("stopSequences".into(), stop);
    }
    let format = body.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str);
    if matches!(format, Some("json_object" | "json_schema")) {
        config.insert("responseMimeType".into(), json!("application/json"));
    }
    config
}

/// Reads one answer into a `chat.completion` or a classified failure.
pub fn interpret(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    model: &str,
    now: SystemTime,
) -> Result<Completion, Failure> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        return Err(classify(status, headers, &ErrorInfo::read(parsed.as_ref(), body), now));
    }
    let Some(json) = parsed else {
        return Err(Failure::new(
            FailureKind::Server,
            Some(status),
            "the provider answered 200 with a body that is not JSON",
        ));
    };
    if let Some(reason) = json.pointer("/promptFeedback/blockReason").and_then(Value::as_str) {
        return Err(Failure::new(FailureKind::Client, Some(status), format!("the prompt was blocked ({reason})")));
    }
    let Some(candidate) = json.pointer("/candidates/0") else {
        return Err(Failure::new(FailureKind::Server, Some(status), "the provider answered without candidates"));
    };
    let text: String = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p.get("thought") != Some(&Value::Bool(true)))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let reason = candidate.get("finishReason").and_then(Value::as_str).unwrap_or("STOP");
    let finish_reason = match reason {
        "STOP" => "stop",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => "content_filter",
        _ => "stop",
    };
    if finish_reason == "content_filter" && text.is_empty() {
        return Err(Failure::new(FailureKind::Client, Some(status), format!("the answer was blocked ({reason})")));
    }
    let count = |key: &str| json.pointer(&format!("/usageMetadata/{key}")).and_then(Value::as_u64);
    // Thinking tokens are billed as output, so they count as completion tokens.
    let usage =
        count("candidatesTokenCount").unwrap_or(0).checked_add(count("thoughtsTokenCount").unwrap_or(0)).and_then(
            |completion| Usage::new(count("promptTokenCount").unwrap_or(0), completion, count("totalTokenCount")),
        );
    let id = json
        .get("responseId")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let model = json.get("modelVersion").and_then(Value::as_str).unwrap_or(model);
    let body = Answer { id: &id, model: json!(model), text, finish_reason, usage }.into_chat_completion(now);
    Ok(Completion {
        status,
        request_id: id,
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
    fn chat_requests_become_generate_content() {
        let request = request_body(&body(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "Summarise"}
            ],
            "temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "stop": "END",
            "response_format": {"type": "json_object"}
        })))
        .unwrap();
        assert_eq!(request["systemInstruction"], json!({"parts": [{"text": "Be brief."}]}));
        assert_eq!(request["contents"][0], json!({"role": "user", "parts": [{"text": "Hi"}]}));
        assert_eq!(request["contents"][1]["role"], "model");
        assert_eq!(request["contents"][1]["parts"][0]["text"], "Hello");
        assert_eq!(
            request["generationConfig"],
            json!({"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 64, "stopSequences": ["END"], "responseMimeType": "application/json"})
        );
    }

    #[test]
    fn what_cannot_be_translated_is_named() {
        let tools = body(json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}));
        assert_eq!(request_body(&tools).unwrap_err(), "`tools`");
        let image = body(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        );
        assert!(request_body(&image).unwrap_err().contains("not text"));
    }

    #[test]
    fn answers_become_chat_completions() {
        let answer = json!({"candidates": [{"content": {"parts": [{"text": "Hello "}, {"text": "there"}], "role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10}, "modelVersion": "gemini-2.5-flash", "responseId": "abc"});
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), "m", now()).unwrap();
        assert_eq!(done.body["object"], "chat.completion");
        assert_eq!(done.body["model"], "gemini-2.5-flash");
        assert_eq!(done.body["choices"][0]["message"]["content"], "Hello there");
        assert_eq!(done.body["choices"][0]["finish_reason"], "length");
        assert_eq!(done.body["usage"], json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}));
        assert_eq!(done.total_tokens, Some(10));
        assert_eq!(done.request_id, "abc");
    }

    #[test]
    fn safety_blocks_move_to_the_next_provider() {
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}});
        let failure = interpret(200, &HeaderMap::new(), blocked.to_string().as_bytes(), "m", now()).unwrap_err();
        assert_eq!(failure.kind, FailureKind::Client);
        assert!(failure.message.contains("SAFETY"));
        let filtered = json!({"candidates": [{"content": {"parts": []}, "finishReason": "SAFETY"}]});
        assert_eq!(
            interpret(200, &HeaderMap::new(), filtered.to_string().as_bytes(), "m", now()).unwrap_err().kind,
            FailureKind::Client
        );
    }

    #[test]
    fn native_errors_are_classified() {
        let per_minute = r#"{"error":{"code":429,"message":"You exceeded your current quota. Please retry in 58.217843437s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaValue":"5"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}"#;
        let failure = interpret(429, &HeaderMap::new(), per_minute.as_bytes(), "m", now()).unwrap_err();
        assert_eq!(
            (failure.kind, failure.daily, failure.retry_at),
            (FailureKind::RateLimited, false, Some(now() + Duration::from_secs(58)))
        );
        let per_day = per_minute.replace("PerMinute", "PerDay");
        let failure = interpret(429, &HeaderMap::new(), per_day.as_bytes(), "m", now()).unwrap_err();
        assert!(failure.daily);
        assert_eq!(failure.retry_at, Some(humantime::parse_rfc3339("2026-10-04T07:00:00Z").unwrap()));
        let bad_key = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        assert_eq!(
            interpret(400, &HeaderMap::new(), bad_key.as_bytes(), "m", now()).unwrap_err().kind,
            FailureKind::Auth
        );
        let overloaded = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
        assert_eq!(
            interpret(503, &HeaderMap::new(), overloaded.as_bytes(), "m", now()).unwrap_err().kind,
            FailureKind::Server
        );
        let too_long = r#"{"error":{"code":400,"message":"The input token count (1091639) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            interpret(400, &HeaderMap::new(), too_long.as_bytes(), "m", now()).unwrap_err().kind,
            FailureKind::Client
        );
        let billing = r#"{"error":{"code":402,"message":"Your prepaid credit balance is depleted.","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            interpret(402, &HeaderMap::new(), billing.as_bytes(), "m", now()).unwrap_err().kind,
            FailureKind::Credits
        );
    }

    #[test]
    fn usage_that_cannot_be_true_is_dropped_not_summed() {
        let answer = |usage: Value| {
            let body = json!({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}], "usageMetadata": usage});
            interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), "m", now()).unwrap()
        };
        let overflowing =
            answer(json!({"promptTokenCount": 5, "candidatesTokenCount": u64::MAX, "thoughtsTokenCount": 1}));
        assert_eq!(overflowing.total_tokens, None);
        assert_eq!(overflowing.body.get("usage"), None);
        assert_eq!(overflowing.body["choices"][0]["message"]["content"], "x");
        let no_total = answer(json!({"promptTokenCount": u64::MAX, "candidatesTokenCount": 1}));
        assert_eq!(no_total.total_tokens, None);
        let thinking = answer(json!({"promptTokenCount": 5, "candidatesTokenCount": 3, "thoughtsTokenCount": 4}));
        assert_eq!(thinking.body["usage"], json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}));
    }

    #[test]
    fn a_withdrawn_model_is_model_unavailable() {
        let gone = r#"{"error":{"code":404,"message":"models/gemini-pro is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods.","status":"NOT_FOUND"}}"#;
        let failure = interpret(404, &HeaderMap::new(), gone.as_bytes(), "gemini-pro", now()).unwrap_err();
        assert_eq!((failure.kind, failure.status), (FailureKind::ModelUnavailable, Some(404)));
    }
}
