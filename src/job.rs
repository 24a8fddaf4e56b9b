//! The contract's envelopes (§2 job, §3 result) and job validation.
//!
//! Parsing is "parse, don't validate": a [`Job`] only exists if the message honours §2, and
//! anything else becomes an [`InvalidJob`] whose text goes into the `invalid_request` result.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chain::checks::{AcceptOverride, compiled_schema};
use crate::routing::Attempt;

/// The chat-completion request a job carries, passed on to providers field by field.
pub type ChatBody = Map<String, Value>;

/// A valid job (contract §2).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub custom_id: String,
    /// The chain name; `default` when the job names none.
    pub chain: String,
    /// Overrides the chain's `max_wait` when set.
    pub max_wait: Option<Duration>,
    pub body: ChatBody,
    /// Overrides the chain's answer checks, key by key (contract §7).
    pub accept: Option<AcceptOverride>,
}

/// Why a message is not a valid job; the text is safe to return to the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidJob {
    /// The `custom_id`, when the message got far enough to have one (for the error result).
    pub custom_id: Option<String>,
    pub message: String,
}

#[derive(Deserialize)]
struct RawJob {
    custom_id: Option<Value>,
    method: Option<Value>,
    url: Option<Value>,
    body: Option<Value>,
    chain: Option<Value>,
    max_wait: Option<Value>,
    accept: Option<Value>,
}

impl Job {
    /// Parses one message body. Unknown top-level fields are ignored (forward compatibility);
    /// everything §2 names is checked.
    pub fn parse(bytes: &[u8]) -> Result<Job, InvalidJob> {
        // Anything but an object would be reported in serde's words, naming a type of ours.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid(None, "the message is not a JSON object"));
        }
        let raw: RawJob = serde_json::from_slice(bytes)
            .map_err(|e| InvalidJob { custom_id: None, message: format!("the message is not a JSON object: {e}") })?;
        let custom_id = match raw.custom_id {
            Some(Value::String(id)) if !id.is_empty() => id,
            _ => return Err(invalid(None, "`custom_id` must be a non-empty string")),
        };
        let fail = |message: &str| Err(invalid(Some(&custom_id), message));
        match raw.method {
            None | Some(Value::Null) => {}
            Some(Value::String(m)) if m == "POST" => {}
            Some(_) => return fail("`method` must be \"POST\""),
        }
        match raw.url {
            None | Some(Value::Null) => {}
            Some(Value::String(u)) if u == "/v1/chat/completions" => {}
            Some(_) => return fail("`url` must be \"/v1/chat/completions\""),
        }
        let chain = match raw.chain {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::String(c)) if !c.is_empty() => c,
            Some(_) => return fail("`chain` must be a non-empty string"),
        };
        let max_wait = match raw.max_wait {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => match crate::config::parse_duration(&text) {
                Ok(d) => Some(d),
                Err(e) => return fail(&format!("`max_wait`: {e}")),
            },
            Some(_) => return fail("`max_wait` must be a duration string such as \"10m\""),
        };
        let body = match raw.body {
            Some(Value::Object(body)) => body,
            _ => return fail("`body` must be a chat-completion request object"),
        };
        let accept = match raw.accept {
            None | Some(Value::Null) => None,
            Some(value) => Some(AcceptOverride::parse(&value).map_err(|m| invalid(Some(&custom_id), &m))?),
        };
        validate_body(&body).map_err(|m| invalid(Some(&custom_id), &m))?;
        Ok(Job { custom_id, chain, max_wait, body, accept })
    }

    /// The idempotency key (contract §4): the AMQP `message_id` if set, else the job's
    /// [`fingerprint`](Job::fingerprint).
    pub fn idempotency_key(&self, message_id: Option<&str>) -> String {
        self.identity(message_id).key
    }

    /// The job's key and fingerprint together, the fingerprint computed once (it is the key
    /// when the message has no `message_id`).
    pub fn identity(&self, message_id: Option<&str>) -> JobIdentity {
        let fingerprint = self.fingerprint();
        let key = match message_id.filter(|id| !id.is_empty()) {
            Some(id) => format!("msg:{id}"),
            None => fingerprint.clone(),
        };
        JobIdentity { key, fingerprint }
    }

    /// What makes two messages the same job: a hash of (`custom_id`, chain, body). A key may
    /// only ever be given the result of the job whose fingerprint first used it. serde_json
    /// maps are ordered, so equal bodies hash equal whatever the order or spacing of the
    /// message's keys; the parts are length-prefixed so no two different jobs can produce the
    /// same input to the hash.
    ///
    /// The body is hashed as its compact serialization (the bytes
    /// `Value::Object(body).to_string()` gives), written straight from the parsed map: the
    /// ledger's rows carry fingerprints computed that way, so the bytes must never change (a
    /// test pins a known value). Hashing the message's raw bytes instead would be cheaper but
    /// not canonical: the same job republished with its keys in another order would get
    /// another fingerprint, and a redelivery across an upgrade would be refused as "another
    /// job" by its own `message_id`.
    pub fn fingerprint(&self) -> String {
        // Serializing a map of JSON values cannot fail (string keys, no non-finite numbers).
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut hash = Sha256::new();
        for part in [self.custom_id.as_bytes(), self.chain.as_bytes(), body.as_slice()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        let mut fingerprint = String::with_capacity(7 + 2 * digest.len());
        fingerprint.push_str("sha256:");
        push_hex(&mut fingerprint, &digest);
        fingerprint
    }
}

/// A job's idempotency key and fingerprint (contract §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    /// `msg:<message_id>`, or the fingerprint when the message has none.
    pub key: String,
    /// The hash of (`custom_id`, chain, body) the key is bound to.
    pub fingerprint: String,
}

/// Appends `bytes` in lowercase hex (without a `format!` per byte: this runs for every job).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    out.reserve(2 * bytes.len());
    for byte in bytes {
        for nibble in [byte >> 4, byte & 0x0f] {
            out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
}

/// `bytes` in lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    push_hex(&mut out, bytes);
    out
}

fn invalid(custom_id: Option<&str>, message: &str) -> InvalidJob {
    InvalidJob { custom_id: custom_id.map(str::to_string), message: message.to_string() }
}

fn validate_body(body: &ChatBody) -> Result<(), String> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err("`body.messages` must be a non-empty array".into());
    };
    if messages.is_empty() {
        return Err("`body.messages` must be a non-empty array".into());
    }
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str);
        if role.is_none() {
            return Err(format!("`body.messages[{i}].role` must be a string"));
        }
    }
    match body.get("stream") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err("`body.stream: true` is not supported: results are whole chat completions".into());
        }
        // "true" or 1 would reach the providers, each refusing it or streaming.
        Some(_) => return Err("`body.stream` must be a boolean (and not true)".into()),
    }
    // A schema the answers are to be checked against must compile: refused here, the job gets
    // a clear `invalid_request` instead of every provider's answer failing the check.
    let format = body.get("response_format");
    if format.and_then(|f| f.get("type")).and_then(Value::as_str) == Some("json_schema")
        && let Some(schema) = format.and_then(|f| f.get("json_schema")).and_then(|s| s.get("schema"))
        && !schema.is_null()
    {
        compiled_schema(schema).map_err(|e| format!("`body.response_format.json_schema.schema`: {e}"))?;
    }
    Ok(())
}

/// Rough token count of a request: prompt (≈ 4 characters a token) plus the completion budget.
/// Used before a call for quotas and context windows; corrected by the provider's `usage`.
pub fn estimate_prompt_tokens(body: &ChatBody) -> u64 {
    let chars: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| messages.iter().map(message_chars).sum())
        .unwrap_or(0);
    (chars as u64).div_ceil(4) + 4 * body.get("messages").and_then(Value::as_array).map_or(0, |m| m.len() as u64)
}

/// The completion budget the request asks for (`max_completion_tokens` or `max_tokens`).
pub fn requested_completion_tokens(body: &ChatBody) -> Option<u64> {
    body.get("max_completion_tokens").or_else(|| body.get("max_tokens")).and_then(Value::as_u64)
}

fn message_chars(message: &Value) -> usize {
    match message.get("content") {
        Some(Value::String(text)) => text.chars().count(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(|t| t.chars().count()).sum()
        }
        _ => 0,
    }
}

/// The result message (contract §3): one OpenAI Batch output line plus `routing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: String,
    pub custom_id: Option<String>,
    pub response: Option<ResponseEnvelope>,
    pub error: Option<ErrorEnvelope>,
    pub routing: Routing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub status_code: u16,
    pub request_id: String,
    /// Always an OpenAI `chat.completion`, whatever the provider's own API.
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job itself is malformed: never retried.
    InvalidRequest,
    /// Every provider answered with an error not worth retrying.
    AllProvidersFailed,
    /// No provider became usable within `max_wait`.
    DeadlineExceeded,
    /// The worker itself failed on this job again and again; it was dead-lettered.
    InternalError,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    pub chain: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub free: Option<bool>,
    pub attempts: Vec<Attempt>,
    /// The answer failed the job's checks and was given because of `on_all_rejected = "best"`
    /// (contract §7). Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejected: bool,
    /// `host:pid` of the worker that answered.
    pub worker: String,
    /// Time from first receipt (or publish, when the sender set a timestamp) to processing start.
    pub queued_ms: u64,
    pub total_ms: u64,
}

impl JobResult {
    /// A new result id, time-ordered so results sort by creation.
    pub fn new_id() -> String {
        format!("res_{}", uuid::Uuid::now_v7().simple())
    }

    pub fn is_success(&self) -> bool {
        self.response.is_some() && self.error.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Job, InvalidJob> {
        Job::parse(text.as_bytes())
    }

    #[test]
    fn contract_example_parses() {
        let job = parse(r#"{"custom_id": "doc-42", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Summarise: ..."}], "max_tokens": 512, "temperature": 0.2},
            "chain": "default", "max_wait": "10m"}"#)
        .unwrap();
        assert_eq!(job.custom_id, "doc-42");
        assert_eq!(job.chain, "default");
        assert_eq!(job.max_wait, Some(Duration::from_secs(600)));
        assert_eq!(job.body["temperature"], 0.2);
    }

    #[test]
    fn defaults_apply_when_optional_fields_are_absent() {
        let job = parse(r#"{"custom_id":"a","body":{"messages":[{"role":"user","content":"hi"}]}}"#).unwrap();
        assert_eq!(job.chain, "default");
        assert_eq!(job.max_wait, None);
    }

    #[test]
    fn every_rule_of_section_2_is_checked() {
        let cases = [
            ("not json", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            (r#"{"body":{"messages":[{"role":"user"}]}}"#, "custom_id"),
            (r#"{"custom_id":"","body":{"messages":[{"role":"user"}]}}"#, "custom_id"),
            (r#"{"custom_id":"a","method":"GET","body":{"messages":[{"role":"user"}]}}"#, "method"),
            (r#"{"custom_id":"a","url":"/v1/embeddings","body":{"messages":[{"role":"user"}]}}"#, "url"),
            (r#"{"custom_id":"a"}"#, "body"),
            (r#"{"custom_id":"a","body":{"messages":[]}}"#, "messages"),
            (r#"{"custom_id":"a","body":{"messages":[{"content":"x"}]}}"#, "role"),
            (r#"{"custom_id":"a","body":{"messages":[{"role":"user"}],"stream":true}}"#, "stream"),
            (r#"{"custom_id":"a","body":{"messages":[{"role":"user"}],"stream":"true"}}"#, "`body.stream` must be"),
            (r#"{"custom_id":"a","body":{"messages":[{"role":"user"}],"stream":1}}"#, "`body.stream` must be"),
            (r#"{"custom_id":"a","max_wait":"soon","body":{"messages":[{"role":"user"}]}}"#, "max_wait"),
            (r#"{"custom_id":"a","chain":7,"body":{"messages":[{"role":"user"}]}}"#, "chain"),
            (
                r#"{"custom_id":"a","accept":{"jsno":true},"body":{"messages":[{"role":"user"}]}}"#,
                "`accept`: unknown field `jsno`",
            ),
            (
                r#"{"custom_id":"a","accept":"strict","body":{"messages":[{"role":"user"}]}}"#,
                "`accept`: must be an object",
            ),
            (
                r#"{"custom_id":"a","accept":{"on_all_rejected":"any"},"body":{"messages":[{"role":"user"}]}}"#,
                "`accept`: unknown variant",
            ),
            (
                r#"{"custom_id":"a","body":{"messages":[{"role":"user"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"nope"}}}}}"#,
                "`body.response_format.json_schema.schema`: the JSON Schema does not compile",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.message.contains(needle), "{text}: {err}");
            assert!(!err.message.contains("RawJob"), "{text}: the service's own type named to a publisher: {err}");
        }
        for top_level in ["[1,2]", " \"a string\"", "42", "null", "true"] {
            assert_eq!(parse(top_level).unwrap_err().message, "the message is not a JSON object");
        }
        assert_eq!(parse(r#"{"custom_id":"a","url":"x","body":{}}"#).unwrap_err().custom_id.as_deref(), Some("a"));
    }

    #[test]
    fn a_jobs_accept_is_read_key_by_key() {
        let job = parse(r#"{"custom_id":"a","accept":{"min_chars":40,"on_all_rejected":"best"},"body":{"messages":[{"role":"user"}]}}"#).unwrap();
        let accept = job.accept.unwrap();
        assert_eq!(accept.min_chars, Some(40));
        assert_eq!(accept.on_all_rejected, Some(crate::chain::OnAllRejected::Best));
        assert_eq!((accept.content, accept.finish, accept.json), (None, None, None), "unset keys keep the chain's");
        assert_eq!(
            parse(r#"{"custom_id":"a","accept":null,"body":{"messages":[{"role":"user"}]}}"#).unwrap().accept,
            None
        );
        let schema = r#"{"custom_id":"a","body":{"messages":[{"role":"user"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","required":["echo"]}}}}}"#;
        assert!(parse(schema).is_ok());
    }

    #[test]
    fn idempotency_key_prefers_message_id_and_is_stable() {
        let a =
            parse(r#"{"custom_id":"a","body":{"messages":[{"role":"user","content":"x"}],"temperature":0}}"#).unwrap();
        let same =
            parse(r#"{"body":{"temperature":0,"messages":[{"content":"x","role":"user"}]},"custom_id":"a"}"#).unwrap();
        let other =
            parse(r#"{"custom_id":"b","body":{"messages":[{"role":"user","content":"x"}],"temperature":0}}"#).unwrap();
        assert_eq!(a.idempotency_key(None), same.idempotency_key(None));
        assert_ne!(a.idempotency_key(None), other.idempotency_key(None));
        assert_eq!(a.idempotency_key(Some("m-1")), "msg:m-1");
        assert_eq!(a.idempotency_key(Some("")), a.idempotency_key(None));
    }

    /// The ledger's rows carry fingerprints computed by earlier versions: the bytes hashed
    /// must never change.
    #[test]
    fn the_fingerprint_of_a_known_job_never_changes() {
        let job = parse(r#"{"custom_id":"doc-42","chain":"default","body":{"temperature":0.2,"messages":[{"role":"user","content":"Summarise: é \"x\"\n"}],"max_tokens":512,"n":1.0}}"#).unwrap();
        assert_eq!(job.fingerprint(), legacy_fingerprint(&job));
        assert_eq!(job.fingerprint(), "sha256:c5f2851dbbbb0042f678569c1c5d00590d37f01a07b781d211a1ffc166d123cb");
    }

    /// The fingerprint as the first versions computed it (a clone of the body, `to_string`, a
    /// `format!` per byte).
    fn legacy_fingerprint(job: &Job) -> String {
        let body = Value::Object(job.body.clone()).to_string();
        let mut hash = Sha256::new();
        for part in [job.custom_id.as_str(), job.chain.as_str(), body.as_str()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    proptest::proptest! {
        /// Any body: the fingerprint is the legacy one, byte for byte.
        #[test]
        fn the_fingerprint_is_the_legacy_one_for_any_body(
            custom_id in ".{1,12}",
            chain in ".{1,8}",
            text in ".{0,40}",
            number in proptest::num::f64::NORMAL,
            integer in proptest::prelude::any::<i64>(),
            key in "x_[a-z]{1,6}",
        ) {
            let body = serde_json::json!({"messages": [{"role": "user", "content": text}],
                key: {"n": number, "i": integer, "list": [text, null, true]}});
            let line = serde_json::json!({"custom_id": custom_id, "chain": chain, "body": body}).to_string();
            let job = parse(&line).unwrap();
            proptest::prop_assert_eq!(job.fingerprint(), legacy_fingerprint(&job));
            let identity = job.identity(None);
            proptest::prop_assert_eq!(&identity.key, &identity.fingerprint);
            proptest::prop_assert_eq!(job.identity(Some("m")).key, "msg:m");
        }
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn token_estimate_counts_text_parts_and_budget() {
        let job = parse(r#"{"custom_id":"a","body":{"max_tokens":100,"messages":[{"role":"user","content":"abcdefgh"},{"role":"user","content":[{"type":"text","text":"abcd"}]}]}}"#).unwrap();
        assert_eq!(estimate_prompt_tokens(&job.body), 3 + 8);
        assert_eq!(requested_completion_tokens(&job.body), Some(100));
    }
}
