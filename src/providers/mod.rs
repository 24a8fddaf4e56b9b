//! LLM providers: one file per wire dialect, all behind [`ChatProvider`].
//!
//! A dialect turns a chat request into its HTTP call and the answer into either a
//! [`Completion`] (always an OpenAI `chat.completion`) or a classified [`Failure`] with the
//! retry information the provider gave. [`http::HttpProvider`] does the I/O over one shared
//! reqwest client.

pub mod anthropic;
pub mod capabilities;
pub mod errors;
pub mod gemini;
pub mod gemini_schema;
pub mod http;
pub mod openai;
pub mod quota_headers;
pub mod retry_info;
pub mod shape;
pub mod translate;

use std::time::SystemTime;

use serde_json::Value;

use crate::job::ChatBody;
use crate::routing::{LimitScope, QuotaObservation};

/// A successful answer, already in OpenAI `chat.completion` form.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub status: u16,
    /// The provider's request id (header or body), for the result's `response.request_id`.
    pub request_id: String,
    pub body: Value,
    /// `usage.total_tokens`, when the provider reported it (corrects quota estimates).
    pub total_tokens: Option<u64>,
    /// The rate-limit headers of this success say a budget is now spent, until this reset:
    /// the next call would be refused, so the provider cools down without waiting for a 429.
    pub exhausted_until: Option<SystemTime>,
    /// What the rate-limit headers of this answer said of each budget (contract §6: they
    /// correct the shared view both ways).
    pub quota: Vec<QuotaObservation>,
}

/// How a failed call is classified (contract §3 outcomes, §6 cooldowns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 429/529/`RESOURCE_EXHAUSTED`: slow down until `retry_at`.
    RateLimited,
    Timeout,
    /// Connection refused, reset or closed mid-answer.
    Connect,
    /// 5xx or an answer that is not what the API promises (garbage).
    Server,
    /// Bad key (401/403, Gemini's `API_KEY_INVALID`).
    Auth,
    /// Out of credits (402, a low balance): like a bad key, the provider is out for long.
    Credits,
    /// The configured model is gone (404 model not found, 400 decommissioned, 410 deprecated,
    /// Gemini `NOT_FOUND`): every job would fail the same way, so the provider cools down 1 h.
    ModelUnavailable,
    /// The request itself was refused (400, 404, 413, too long): next provider, no cooldown.
    Client,
}

impl FailureKind {
    /// Worth another try on the same provider within this attempt (`max_retries`).
    pub fn is_retryable_in_place(self) -> bool {
        matches!(self, Self::Timeout | Self::Server)
    }
}

/// A failed call with everything the chain needs to decide what to do next.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub status: Option<u16>,
    /// When the provider said it will accept calls again.
    pub retry_at: Option<SystemTime>,
    /// The provider says a per-day quota is spent (so `retry_at` is the daily reset).
    pub daily: bool,
    /// `retry_at` is our guess (the next UTC midnight for a per-day quota whose provider gave
    /// no reset), not the provider's word.
    pub retry_guessed: bool,
    /// Whether a 429 is about this model or the whole account (its `[[quotas]]` pools).
    pub scope: LimitScope,
    /// Short, secret-free description (the provider's message, trimmed).
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, status: Option<u16>, message: impl Into<String>) -> Self {
        Self {
            kind,
            status,
            retry_at: None,
            daily: false,
            retry_guessed: false,
            scope: LimitScope::Model,
            message: message.into(),
        }
    }
}

/// One configured provider the chain can call.
#[async_trait::async_trait]
pub trait ChatProvider: Send + Sync {
    /// Sends one chat request (the job's body; the provider sets its own `model`).
    async fn complete(&self, body: &ChatBody) -> Result<Completion, Failure>;

    /// Whether this provider can carry `body` at all (its API, its dialect's translation and its
    /// configured `supports`), or what it lacks. The chain asks before taking a quota slot, so
    /// a provider that could only refuse the job costs neither a request nor a slot
    /// (`skipped_capability`). The default carries everything: a provider that sends the body
    /// as it is.
    fn can_carry(&self, body: &ChatBody) -> Result<(), String> {
        let _ = body;
        Ok(())
    }
}

/// Cuts a provider message to a readable length for results and logs.
pub fn short_message(text: &str) -> String {
    const MAX: usize = 300;
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_string();
    }
    // The longest prefix of at most MAX bytes that ends on a character boundary.
    let end = (0..=MAX).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", text.get(..end).unwrap_or_default())
}

/// Helpers for the dialects' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::time::SystemTime;

    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

    /// The instant the reference examples are read at.
    pub fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-10-03T12:00:00Z").unwrap()
    }

    /// A chat request body from JSON.
    pub fn body(json: serde_json::Value) -> crate::job::ChatBody {
        serde_json::from_value(json).unwrap()
    }

    pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::short_message;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        assert_eq!(short_message("  short  "), "short");
        let long = "é".repeat(400); // two bytes each: byte 300 is a boundary, 301 is not
        assert_eq!(short_message(&long), format!("{}…", "é".repeat(150)));
        let odd = format!("a{}", "é".repeat(400)); // byte 300 falls inside a character
        assert_eq!(short_message(&odd), format!("a{}…", "é".repeat(149)));
    }
}
