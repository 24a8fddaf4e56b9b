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
use crate::routing::LimitScope;

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

    /// Whom a 429 is about (contract §6): the whole account when the provider says so, else
    /// this model. The account's word, from providers.md:
    /// - OpenRouter (§3.3, §3.5): the `:free` limits (20 a minute, 50 or 1000 a day) are
    ///   "account-wide across all `:free` models (not per model or key)", so both
    ///   `free-models-per-day` (and `-high-balance`) and `free-models-per-min` in the message
    ///   are the account's, as is any `metadata.limit_source` OpenRouter counts itself
    ///   (`openrouter_free_tier_daily`, `openrouter_key_limit`, `…_budget`). The exception is
    ///   `upstream_provider_shared_pool`: the upstream provider throttled this one model (the
    ///   message names it, "… is temporarily rate-limited upstream"), so other models of the
    ///   account still answer.
    /// - Gemini (§4.1): "rate limits are applied per project, not per API key", and the
    ///   `QuotaFailure` violations name what counted: an id with `PerProject`
    ///   (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`, `…PerMinutePerProjectPerModel…`)
    ///   is a count the project holds for every key and both endpoints (native and
    ///   OpenAI-compatible) that reach the model, which is what a `[[quotas]]` pool declares,
    ///   so the pool cools. `GenerateContentInputTokensPerModelPerMinute-FreeTier` names no
    ///   project: it says this request's input tokens did not fit the model's minute budget,
    ///   which a smaller request through another entry may still fit, so only this provider
    ///   cools. A bare `RESOURCE_EXHAUSTED` names nothing and stays the model's.
    /// - Everything else (Groq's and Cerebras' org limits per model, Anthropic's, SambaNova's)
    ///   is reported per model and stays `Model`.
    fn scope(&self) -> LimitScope {
        let openrouter_account = match self.limit_source() {
            Some(source) => source.starts_with("openrouter_"),
            None => self.message.contains("free-models-per-day") || self.message.contains("free-models-per-min"),
        };
        let project_quota = self.quota_ids().iter().any(|id| id.contains("PerProject"));
        if openrouter_account || project_quota { LimitScope::Account } else { LimitScope::Model }
    }

    fn has_reason(&self, reason: &str) -> bool {
        self.details.iter().any(|d| d.get("reason").and_then(Value::as_str) == Some(reason))
    }

    /// The error says the configured model is gone or unknown, whichever provider wrote it
    /// (`message` is the lowercased message):
    /// - `model_not_found` (Groq, OpenAI, Cerebras at 404; SambaNova at 400) and the Hugging Face
    ///   router's 400 `model_not_supported` (no enabled provider serves the model);
    /// - Groq's 400 `model_decommissioned` / "has been decommissioned";
    /// - the text "… does not exist or you do not have access to it" at 404;
    /// - OpenRouter's 404 "No endpoints found for <model>." (not "… matching your data policy"
    ///   or "… that can handle the requested parameters", which depend on the request);
    /// - Gemini's 404 `NOT_FOUND` "models/… is not found for API version …";
    /// - Anthropic's 404 `not_found_error` "model: <model>";
    /// - any 410 (SambaNova's `model_deprecated`): the resource is gone for every request.
    fn names_a_missing_model(&self, status: u16, message: &str) -> bool {
        let code = self.code.as_str();
        match status {
            400 | 404 if matches!(code, "model_not_found" | "model_not_supported") => true,
            400 => code == "model_decommissioned" || message.contains("has been decommissioned"),
            404 => {
                message.contains("does not exist")
                    || message.starts_with("no endpoints found for ")
                    || (self.kind == "NOT_FOUND" && message.contains("models/") && message.contains("is not found"))
                    || (self.kind == "not_found_error" && message.starts_with("model:"))
            }
            410 => true,
            _ => false,
        }
    }

    /// OpenRouter's 403 for a spent budget (`metadata.limit_source` such as
    /// `openrouter_key_limit`, `openrouter_workspace_budget`, `openrouter_guardrail_budget`, or
    /// a message that names a budget): every request fails alike until it is topped up.
    fn spent_budget(&self, message: &str) -> bool {
        let source = self.limit_source().unwrap_or_default();
        source.ends_with("_budget")
            || matches!(source, "openrouter_key_limit" | "openrouter_credits")
            || message.contains("budget")
    }

    /// A 403 that refuses this request's content rather than the caller: OpenRouter's
    /// moderation ("<model> requires moderation on OpenRouter. Your input was flagged for …",
    /// with `metadata.reasons` and `metadata.flagged_input`) and guardrails ("blocked by
    /// guardrail", prompt-injection detectors, content policies). Not a bad key: Cloudflare's
    /// HTML 403, Cerebras' "Not authenticated", Gemini's `PERMISSION_DENIED` stay `Auth`.
    fn refuses_the_content(&self, message: &str) -> bool {
        let flagged =
            self.metadata.as_ref().is_some_and(|m| m.get("reasons").is_some() || m.get("flagged_input").is_some());
        const MARKERS: &[&str] = &[
            "requires moderation",
            "input was flagged",
            "output was flagged",
            "guardrail",
            "prompt injection",
            "content policy",
        ];
        flagged || MARKERS.iter().any(|marker| message.contains(marker))
    }
}

/// Classifies an error answer and extracts when to come back.
pub fn classify(status: u16, headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Failure {
    // The shared client follows no redirect (http.rs): following one would carry the key header
    // to whichever host `Location` names. A 3xx from a chat endpoint is a misconfigured or
    // moved provider; as a server error it is retried like one and opens the circuit if it lasts.
    if (300..400).contains(&status) {
        let message = format!("the provider answered a redirect (HTTP {status}), not followed");
        return Failure::new(FailureKind::Server, Some(status), message);
    }
    let message = if info.message.is_empty() { format!("HTTP {status}") } else { info.message.clone() };
    let mut failure = Failure::new(kind_for(status, info), Some(status), message);
    match failure.kind {
        FailureKind::RateLimited => {
            let daily_reset = daily_reset(headers, info, now);
            failure.daily = daily_reset.is_some();
            failure.retry_guessed = daily_reset.is_some_and(|(_, guessed)| guessed);
            failure.retry_at = daily_reset.map(|(reset, _)| reset).or_else(|| retry_at(headers, info, now));
            failure.scope = info.scope();
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
        // Every job would get the same answer until an operator changes the model: one request
        // finds out, the provider cools down 1 h (contract §6).
        400 | 404 | 410 if info.names_a_missing_model(status, &message) => FailureKind::ModelUnavailable,
        400 if info.has_reason("API_KEY_INVALID") || message.contains("api key not valid") => FailureKind::Auth,
        // Anthropic's low balance is a 400; Hugging Face's spending cap a 403.
        400 | 403 if message.contains("credit balance is too low") || message.contains("spending limit") => {
            FailureKind::Credits
        }
        // OpenRouter's 403 for a spent key, workspace or guardrail budget: the account, not the key.
        403 if info.spent_budget(&message) => FailureKind::Credits,
        // A 403 that judges this request's content (moderation, a guardrail) says nothing about
        // the key: the next provider may take the job, and this one stays usable for others.
        403 if info.refuses_the_content(&message) => FailureKind::Client,
        401 | 403 => FailureKind::Auth,
        402 => FailureKind::Credits,
        408 => FailureKind::Timeout,
        413 => FailureKind::Client,
        498 => FailureKind::Server, // Groq flex tier out of capacity
        500..=599 => FailureKind::Server,
        _ if info.kind == "RESOURCE_EXHAUSTED" => FailureKind::RateLimited,
        // A status HTTP does not define (600-999, or under 400 and not handled above) comes from
        // a broken server or proxy, never from this job: it cools the provider down like a 5xx.
        400..=499 => FailureKind::Client,
        _ => FailureKind::Server,
    }
}

/// The retry instant for a per-minute (or unknown-window) limit, most precise source first.
fn retry_at(headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Option<SystemTime> {
    retry_info::from_headers(headers, now)
        .or_else(|| info.metadata_reset())
        .or_else(|| info.retry_delay().and_then(|d| now.checked_add(d)))
        .or_else(|| retry_info::wait_from_message(&info.message).and_then(|d| now.checked_add(d)))
}

/// When the error says a per-day quota is spent: its reset, and whether that is our guess (the
/// next UTC midnight, for a provider that gave none) rather than the provider's word.
fn daily_reset(headers: &HeaderMap, info: &ErrorInfo, now: SystemTime) -> Option<(SystemTime, bool)> {
    let message = &info.message;
    let reset_header = |names: &[&str]| {
        names.iter().filter_map(|n| headers.get(*n)?.to_str().ok()).find_map(|v| retry_info::parse_reset(v, now))
    };
    let given = |reset: Option<SystemTime>| match reset {
        Some(reset) => Some((reset, false)),
        None => next_utc_midnight(now).map(|guess| (guess, true)),
    };
    // Groq names the window: "(TPD)" / "(RPD)"; its "try again in" is the precise wait.
    if message.contains("(TPD)") || message.contains("(RPD)") {
        return given(retry_at(headers, info, now));
    }
    // Gemini: the quota id says PerDay; its retryDelay is misleading, the reset is Pacific
    // midnight, by Google's own rule ("RPD quotas reset at midnight Pacific time").
    if info.quota_ids().iter().any(|id| id.contains("PerDay")) {
        return next_pacific_midnight(now).map(|reset| (reset, false));
    }
    // OpenRouter's free tier: reset at UTC midnight, also given as epoch ms.
    let openrouter_daily =
        info.limit_source() == Some("openrouter_free_tier_daily") || message.contains("free-models-per-day");
    if openrouter_daily {
        let header = headers.get("x-ratelimit-reset").and_then(|v| v.to_str().ok()).and_then(retry_info::parse_epoch);
        return given(header.or_else(|| info.metadata_reset()));
    }
    // Cerebras: "Tokens per day limit exceeded".
    if message.to_ascii_lowercase().contains("per day") {
        return given(reset_header(&["x-ratelimit-reset-tokens-day", "x-ratelimit-reset-requests-day"]));
    }
    // SambaNova: "Violated duration_s: 86400".
    if message.contains("duration_s: 86400") {
        return given(reset_header(&["x-ratelimit-reset-requests-day"]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;

    fn classified(status: u16, body: &str) -> Failure {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        classify(status, &HeaderMap::new(), &ErrorInfo::read(parsed.as_ref(), body.as_bytes()), now())
    }

    fn kind(status: u16, body: &str) -> FailureKind {
        classified(status, body).kind
    }

    /// Verbatim bodies from providers.md (§1.4, §2.4, §3.4, §4.1, §4.2, §6, §7, §8 and the §11
    /// `model_gone` rows): the configured model is gone, whoever says so.
    #[test]
    fn a_withdrawn_model_is_model_unavailable_in_every_envelope() {
        let gone = [
            // Groq 404 (and a model deprecated since 2026-08 answers the same).
            (
                404,
                r#"{"error":{"message":"The model `llama-3.1-405b-reasoning` does not exist or you do not have access to it.","type":"invalid_request_error","code":"model_not_found"}}"#,
            ),
            // Groq 400 decommissioned.
            (
                400,
                r#"{"error":{"message":"The model `llama-3.2-11b-vision-preview` has been decommissioned and is no longer supported. Please refer to https://console.groq.com/docs/deprecations for a recommendation on which model to use instead.","type":"invalid_request_error","code":"model_decommissioned"}}"#,
            ),
            // Cerebras, unwrapped.
            (
                404,
                r#"{"message":"Model llama-4-scout-17b does not exist or you do not have access to it.","type":"not_found_error","param":"model","code":"model_not_found"}"#,
            ),
            // OpenAI.
            (
                404,
                r#"{"error":{"message":"The model `gpt-legacy` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            ),
            // OpenRouter: only a message.
            (
                404,
                r#"{"error":{"message":"No endpoints found for nousresearch/hermes-3-llama-3.1-405b:free.","code":404}}"#,
            ),
            // Gemini native and its OpenAI endpoint's array form.
            (
                404,
                r#"{"error":{"code":404,"message":"models/gemini-pro is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods.","status":"NOT_FOUND"}}"#,
            ),
            (
                404,
                r#"[{"error":{"code":404,"message":"models/gemini-pro is not found for API version v1beta, or is not supported for generateContent.","status":"NOT_FOUND"}}]"#,
            ),
            // Anthropic.
            (
                404,
                r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-3-5-sonnet-20241022"},"request_id":"req_011CVfG3PpZSwfcTNx5NJCWZ"}"#,
            ),
            // SambaNova: providers.md gives the codes (400 `model_not_found`, 410
            // `model_deprecated`) and the envelope, not the messages.
            (
                400,
                r#"{"error":{"message":"Model not found","type":"invalid_request_error","param":"model","code":"model_not_found"},"request_id":"r"}"#,
            ),
            (
                410,
                r#"{"error":{"message":"Model deprecated","type":"invalid_request_error","param":"model","code":"model_deprecated"},"request_id":"r"}"#,
            ),
            // Hugging Face router: no enabled provider serves the model.
            (
                400,
                r#"{"error":{"message":"The requested model 'Qwen/Qwen3-Next-80B-A3B-Thinking' is not supported by any provider you have enabled.","type":"invalid_request_error","param":"model","code":"model_not_supported"}}"#,
            ),
        ];
        for (status, body) in gone {
            let failure = classified(status, body);
            assert_eq!(failure.kind, FailureKind::ModelUnavailable, "{status} {body}");
            assert_eq!(failure.status, Some(status));
            assert_eq!(failure.retry_at, None, "the chain's 1 h applies");
        }
    }

    #[test]
    fn not_found_that_depends_on_the_request_stays_a_client_error() {
        // OpenRouter: the account's data policy or this request's parameters, not the model.
        assert_eq!(
            kind(
                404,
                r#"{"error":{"message":"No endpoints found matching your data policy (Free model training).","code":404}}"#
            ),
            FailureKind::Client
        );
        assert_eq!(
            kind(
                503,
                r#"{"error":{"code":503,"message":"No endpoints found that can handle the requested parameters."}}"#
            ),
            FailureKind::Server
        );
        assert_eq!(kind(404, "<html><title>404 Not Found</title></html>"), FailureKind::Client);
        assert_eq!(
            kind(
                400,
                r#"{"error":{"message":"Please reduce the length of the messages or completion.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
            ),
            FailureKind::Client
        );
        // A 400 "does not exist" is about a parameter, not the model.
        assert_eq!(
            kind(400, r#"{"error":{"message":"The tool `x` does not exist.","type":"invalid_request_error"}}"#),
            FailureKind::Client
        );
    }

    /// OpenRouter's 403 moderation refusal. providers.md names the case (§3.2: "403 moderation
    /// flag, guardrail or budget") without a captured body, so this is the shape OpenRouter
    /// documents (errors-and-debugging: `ModerationErrorMetadata` with `reasons`,
    /// `flagged_input`, `provider_name`, `model_slug`), with its documented message.
    const OPENROUTER_MODERATION: &str = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"violence\"","metadata":{"reasons":["violence"],"flagged_input":"how do I...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}},"user_id":"user_x"}"#;

    #[test]
    fn a_403_that_judges_the_request_is_a_client_error() {
        assert_eq!(kind(403, OPENROUTER_MODERATION), FailureKind::Client);
        // The metadata alone is enough, whatever the message says.
        assert_eq!(
            kind(
                403,
                r#"{"error":{"code":403,"message":"Forbidden","metadata":{"reasons":["hate"],"flagged_input":"…"}}}"#
            ),
            FailureKind::Client
        );
        // Guardrails (constructed from OpenRouter's description: "blocked by a guardrail, for
        // example a content filter or prompt-injection detector").
        for message in [
            "Request blocked by guardrail: PII detected",
            "Request blocked: prompt injection patterns detected",
            "This request violates our content policy.",
        ] {
            let body = serde_json::json!({"error": {"code": 403, "message": message}}).to_string();
            assert_eq!(kind(403, &body), FailureKind::Client, "{message}");
        }
        // Inside a 200 (OpenRouter reports errors raised while routing in the body).
        let in_body =
            crate::providers::openai::interpret(200, &HeaderMap::new(), OPENROUTER_MODERATION.as_bytes(), now());
        assert_eq!(in_body.unwrap_err().kind, FailureKind::Client);
    }

    #[test]
    fn a_403_about_the_caller_keeps_its_kind() {
        // Cloudflare's HTML page (Groq, lobehub#2143) and Cerebras without a key: the key.
        let cloudflare = "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>Please enable cookies.</body></html>";
        assert_eq!(kind(403, cloudflare), FailureKind::Auth);
        assert_eq!(kind(403, r#"{"detail":"Not authenticated"}"#), FailureKind::Auth);
        assert_eq!(
            kind(403, r#"{"error":{"code":403,"message":"Permission denied.","status":"PERMISSION_DENIED"}}"#),
            FailureKind::Auth
        );
        assert_eq!(
            kind(
                403,
                r#"{"type":"error","error":{"type":"permission_error","message":"Your API key does not have permission to use the specified resource."}}"#
            ),
            FailureKind::Auth
        );
        // Hugging Face's monthly spending cap and OpenRouter's budgets: the account's money.
        assert_eq!(
            kind(403, r#"{"error":"You have exceeded your monthly spending limit for Inference Providers."}"#),
            FailureKind::Credits
        );
        assert_eq!(
            kind(
                403,
                r#"{"error":{"code":403,"message":"Key limit exceeded","metadata":{"limit_source":"openrouter_key_limit"}}}"#
            ),
            FailureKind::Credits
        );
        assert_eq!(
            kind(
                403,
                r#"{"error":{"code":403,"message":"Guardrail budget exhausted","metadata":{"limit_source":"openrouter_guardrail_budget"}}}"#
            ),
            FailureKind::Credits
        );
    }

    /// providers.md §3.3 and §4.1, verbatim where captured: who a 429 is about.
    #[test]
    fn account_scoped_429s_are_told_from_the_models_own() {
        let account = [
            // OpenRouter's daily free-model cap, verbatim (2026).
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1788912000000"},"limit_source":"openrouter_free_tier_daily","remedy_hint":"…"}},"user_id":"user_…"}"#,
            // The 1000-a-day tier, and the per-minute cap: the message alone says it.
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-day-high-balance.","code":429}}"#,
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-min. ","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"20","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"1791028860000"}}},"user_id":"user_mock"}"#,
            // A proxied variant with a string code.
            r#"{"error":{"message":"Rate limit exceeded: free-models-per-day.","type":"rate_limit_error","code":"429"}}"#,
            // Gemini per minute, verbatim (2026): PerMinutePerProjectPerModel.
            r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 5, model: gemini-3-flash\nPlease retry in 58.217843437s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-3-flash","location":"global"},"quotaValue":"5"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}"#,
            // Gemini per day (2025 form: QuotaFailure, Help, RetryInfo), and the same through
            // the OpenAI-compatible endpoint's array.
            r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-flash"},"quotaValue":"250"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#,
            r#"[{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"20"}]}]}}]"#,
        ];
        for body in account {
            let failure = classified(429, body);
            assert_eq!((failure.kind, failure.scope), (FailureKind::RateLimited, LimitScope::Account), "{body}");
        }
        let model = [
            // OpenRouter: the upstream provider throttled this one model, verbatim.
            r#"{"error":{"message":"Provider returned error","code":429,"metadata":{"raw":"google/gemma-4-31b-it:free is temporarily rate-limited upstream. Please retry shortly, or add your own key to accumulate your rate limits: https://openrouter.ai/settings/integrations","provider_name":"Google AI Studio","is_byok":false,"provider_error_code":"429","limit_source":"upstream_provider_shared_pool","remedy_hint":"Retry shortly, add your own provider key (https://openrouter.ai/settings/integrations), or route to another provider with provider routing: https://openrouter.ai/docs/features/provider-routing"}},"user_id":"user_3Jl6aKLIaiC4dg8s3fhdvCpIhBu"}"#,
            // Gemini's per-model token budget and its bare form.
            r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_input_token_count","quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier","quotaValue":"250000"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"26s"}]}}"#,
            r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#,
            r#"[{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}]"#,
            // Groq, Cerebras, Anthropic, OpenAI: per model (or per organization and model).
            r#"{"error":{"message":"Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01kes94v04f9ramd2n1vj4gjnc` service tier `on_demand` on tokens per minute (TPM): Limit 12000, Used 2542, Requested 9855. Please try again in 1.984999999s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing","type":"tokens","code":"rate_limit_exceeded"}}"#,
            r#"{"message":"Tokens per day limit exceeded - too many tokens processed.","type":"too_many_tokens_error","param":"quota","code":"token_quota_exceeded"}"#,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your account's rate limit. Please try again later."},"request_id":"req_011Ca6u66aLnUk1L2q2MSyRy"}"#,
            r#"{"error":{"message":"Rate limit reached for gpt-4.1 in organization org-vyUrKHsIdLcZGKR3zqCqllrS on tokens per min (TPM): Limit 30000, Used 28039, Requested 3906. Please try again in 3.89s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
        ];
        for body in model {
            let failure = classified(429, body);
            assert_eq!((failure.kind, failure.scope), (FailureKind::RateLimited, LimitScope::Model), "{body}");
        }
        // Only a rate limit has a scope: OpenRouter's spent key budget is `Credits`, as before.
        let budget = r#"{"error":{"code":403,"message":"Key limit exceeded","metadata":{"limit_source":"openrouter_key_limit"}}}"#;
        assert_eq!(classified(403, budget).scope, LimitScope::Model);
    }

    #[test]
    fn a_status_http_does_not_define_is_a_server_error_not_the_jobs() {
        for status in [600, 799, 999] {
            assert_eq!(classified(status, "").kind, FailureKind::Server, "HTTP {status}");
        }
        assert_eq!(classified(418, "").kind, FailureKind::Client);
    }

    #[test]
    fn a_redirect_is_a_server_error_that_says_so() {
        for status in [301, 302, 303, 307, 308] {
            let failure = classified(status, "");
            assert_eq!(failure.kind, FailureKind::Server);
            assert_eq!(failure.message, format!("the provider answered a redirect (HTTP {status}), not followed"));
        }
    }

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
