//! Answer checks (contract §7): a provider that answers 200 has not necessarily answered well.
//!
//! A chain (and a job, with `accept`) says what an acceptable answer is: [`Accept`]. For each job
//! the engine builds an [`Expectation`] once (the checks in force, whether the job capped the
//! completion itself, the JSON Schema it asked for, compiled) and holds every successful answer
//! against it. An answer that fails becomes a [`Rejection`]: the attempt is recorded as
//! `rejected_output` with the rejection's message and the job moves on to the next provider.
//!
//! Everything here is pure: no I/O, no clock. The answer comes from a provider and the schema
//! from a job, so both are hostile: nothing is indexed or unwrapped, and the validator runs
//! behind a panic guard. Compiled schemas are cached process-wide per schema text (a
//! [`SchemaCache`] bounded in entries and bytes), so a thousand jobs with the same schema compile
//! it once.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::error::ValidationErrorKind;
use jsonschema::{PatternOptions, ValidationError, Validator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What an acceptable answer is for a chain (`[chains.X] accept = { … }`), after a job's own
/// `accept` is applied. The defaults are the contract's: the three cheap checks on, no length
/// floor, and a job whose answers are all rejected fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Accept {
    /// Reject an answer with neither text nor tool calls.
    pub content: bool,
    /// Reject an answer stopped by a content filter, or cut off by a cap the job did not set.
    pub finish: bool,
    /// Reject an answer that is not the JSON (or JSON Schema) the job's `response_format` asks.
    pub json: bool,
    /// Reject a text answer shorter than this many characters; 0 turns the check off.
    pub min_chars: u64,
    /// What a job gets when every provider's answer was rejected.
    pub on_all_rejected: OnAllRejected,
}

impl Default for Accept {
    fn default() -> Self {
        Self { content: true, finish: true, json: true, min_chars: 0, on_all_rejected: OnAllRejected::Fail }
    }
}

impl Accept {
    /// The checks for one job: each key the job's `accept` sets replaces the chain's, the others
    /// stay as the chain says (a job asking for `min_chars` keeps the chain's other checks).
    pub fn overridden_by(self, job: Option<&AcceptOverride>) -> Accept {
        let Some(job) = job else { return self };
        Accept {
            content: job.content.unwrap_or(self.content),
            finish: job.finish.unwrap_or(self.finish),
            json: job.json.unwrap_or(self.json),
            min_chars: job.min_chars.unwrap_or(self.min_chars),
            on_all_rejected: job.on_all_rejected.unwrap_or(self.on_all_rejected),
        }
    }
}

/// Reads a chain's `accept` from a table only. serde would also read the struct from an array,
/// by position, and `accept = [false]` must not quietly turn the content check off.
pub fn accept_table<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Accept, D::Error> {
    struct Table;
    impl<'de> serde::de::Visitor<'de> for Table {
        type Value = Accept;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a table such as { json = true, min_chars = 20 }")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Accept, M::Error> {
            Accept::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(Table)
}

/// What happens when no answer passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAllRejected {
    /// The job fails with `all_providers_failed`; each attempt says why it was rejected.
    #[default]
    Fail,
    /// The job gets the last rejected answer, marked `routing.rejected = true`: for callers
    /// who prefer an imperfect answer to none.
    Best,
}

/// A job's `accept` (contract §2): only the keys it sets override the chain's. Unknown keys
/// and wrong types make the job `invalid_request` (a typo must not silently turn a check off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptOverride {
    #[serde(default)]
    pub content: Option<bool>,
    #[serde(default)]
    pub finish: Option<bool>,
    #[serde(default)]
    pub json: Option<bool>,
    #[serde(default)]
    pub min_chars: Option<u64>,
    #[serde(default)]
    pub on_all_rejected: Option<OnAllRejected>,
}

impl AcceptOverride {
    /// Reads a job's `accept` value; the error text is safe to return to the sender.
    pub fn parse(value: &Value) -> Result<AcceptOverride, String> {
        // serde would also read a struct from an array, by position: `[false]` must not
        // quietly turn the content check off.
        if !value.is_object() {
            return Err("`accept`: must be an object such as {\"min_chars\": 20}".into());
        }
        AcceptOverride::deserialize(value).map_err(|e| format!("`accept`: {e}"))
    }
}

/// Why an answer was rejected: the stable label of `fallback_rejected_outputs_total{reason}`
/// and of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Neither text nor tool calls.
    Empty,
    /// `finish_reason: "length"` under a cap the job did not set.
    CutOff,
    /// `finish_reason: "content_filter"`.
    ContentFilter,
    /// The job asked for JSON and the content does not parse.
    NotJson,
    /// The content parses but does not validate against the job's schema.
    Schema,
    /// Fewer characters than `min_chars`.
    TooShort,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] =
        [Self::Empty, Self::CutOff, Self::ContentFilter, Self::NotJson, Self::Schema, Self::TooShort];

    pub fn label(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::CutOff => "cut_off",
            Self::ContentFilter => "content_filter",
            Self::NotJson => "not_json",
            Self::Schema => "schema",
            Self::TooShort => "too_short",
        }
    }

    /// How every rejection message of this reason begins. Messages are the attempt's only
    /// record of the reason (the result format has no other field for it), so a parked job's
    /// attempts, read back, still tell their reason apart: see [`RejectReason::of_message`].
    fn prefix(self) -> &'static str {
        match self {
            Self::Empty => "empty content",
            Self::CutOff => "cut off at the provider's cap",
            Self::ContentFilter => "stopped by the provider's content filter",
            Self::NotJson => "not JSON: ",
            Self::Schema => "schema: ",
            Self::TooShort => "too short: ",
        }
    }

    /// The reason a rejection message was written for (the inverse of the messages below).
    pub fn of_message(message: &str) -> Option<RejectReason> {
        Self::ALL.into_iter().find(|reason| message.starts_with(reason.prefix()))
    }
}

/// A failed check: the reason's label for counting, a short message for `routing.attempts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: &str) -> Rejection {
        Rejection { reason, message: bounded(&format!("{}{detail}", reason.prefix())) }
    }
}

/// The JSON a job's `response_format` asks for.
#[derive(Clone)]
enum JsonWanted {
    /// No JSON mode (or the `json` check is off).
    Nothing,
    /// `json_object`, or `json_schema` without a schema: any JSON value.
    Any,
    /// `json_schema` with a schema: a value it validates.
    Schema(Arc<Validator>),
}

/// The checks one job's answers must pass, built once per job.
#[derive(Clone)]
pub struct Expectation {
    pub accept: Accept,
    /// The job set `max_tokens` or `max_completion_tokens`: a `length` finish is what it asked.
    capped_by_job: bool,
    json: JsonWanted,
    /// The functions the job declared in `tools` (unless `tool_choice` is `none`): only a call
    /// to one of them, well formed, is an answer that needs no content.
    callable: Vec<String>,
}

impl std::fmt::Debug for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = match self.json {
            JsonWanted::Nothing => "nothing",
            JsonWanted::Any => "any",
            JsonWanted::Schema(_) => "schema",
        };
        f.debug_struct("Expectation")
            .field("accept", &self.accept)
            .field("capped_by_job", &self.capped_by_job)
            .field("json", &json)
            .finish()
    }
}

impl Expectation {
    /// The checks for a job with this request body. `Err` (a text for `invalid_request`) when
    /// the job asks for a JSON Schema that cannot be compiled: no answer could be checked.
    pub fn for_job(accept: Accept, body: &Map<String, Value>) -> Result<Expectation, String> {
        let capped_by_job = ["max_tokens", "max_completion_tokens"]
            .iter()
            .any(|key| body.get(*key).is_some_and(|value| !value.is_null()));
        let json = match (accept.json, wanted_json(body)) {
            (false, _) | (true, None) => JsonWanted::Nothing,
            (true, Some(None)) => JsonWanted::Any,
            (true, Some(Some(schema))) => JsonWanted::Schema(compiled_schema(schema)?),
        };
        Ok(Expectation { accept, capped_by_job, json, callable: callable_functions(body) })
    }

    /// Holds one answer (an OpenAI `chat.completion` body) against the checks, in the order
    /// that names the root cause: a filtered or cut-off answer is often also empty or broken
    /// JSON, and "cut off" is what the operator can act on.
    pub fn check(&self, answer: &Value) -> Result<(), Rejection> {
        let choice = answer.get("choices").and_then(Value::as_array).and_then(|choices| choices.first());
        let message = choice.and_then(|c| c.get("message"));
        let finish_reason = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str);
        let text = message.map(message_text).unwrap_or_default();
        let calls_tools = message.is_some_and(|m| calls_declared_tools(m, &self.callable));
        let accept = &self.accept;
        if accept.finish {
            match finish_reason {
                Some("content_filter") => return Err(Rejection::new(RejectReason::ContentFilter, "")),
                Some("length") if !self.capped_by_job => return Err(Rejection::new(RejectReason::CutOff, "")),
                _ => {}
            }
        }
        if accept.content && text.trim().is_empty() && !calls_tools {
            let refusal = message.and_then(|m| m.get("refusal")).and_then(Value::as_str).filter(|r| !r.is_empty());
            let detail = refusal.map(|r| format!(" (refusal: {r})")).unwrap_or_default();
            return Err(Rejection::new(RejectReason::Empty, &detail));
        }
        // A tool call is the answer itself: there is no content to hold to JSON or a length.
        if calls_tools {
            return Ok(());
        }
        self.check_json(&text)?;
        let chars = text.trim().chars().count() as u64;
        if accept.min_chars > 0 && chars < accept.min_chars {
            let detail = format!("{chars} characters, fewer than min_chars {}", accept.min_chars);
            return Err(Rejection::new(RejectReason::TooShort, &detail));
        }
        Ok(())
    }

    fn check_json(&self, text: &str) -> Result<(), Rejection> {
        let validator = match &self.json {
            JsonWanted::Nothing => return Ok(()),
            JsonWanted::Any => None,
            JsonWanted::Schema(validator) => Some(validator),
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| Rejection::new(RejectReason::NotJson, &e.to_string()))?;
        let Some(validator) = validator else { return Ok(()) };
        // A validator is third-party code running on a hostile schema and a hostile answer: a
        // panic in it rejects this answer instead of failing the whole delivery.
        let first_error = catch_unwind(AssertUnwindSafe(|| {
            if validator.is_valid(&value) {
                return None;
            }
            // A missing required property says most about what the model got wrong, so it is
            // named first whatever order the validator finds the errors in.
            validator
                .iter_errors(&value)
                .min_by_key(|e| !matches!(e.kind(), ValidationErrorKind::Required { .. }))
                .map(describe)
        }));
        match first_error {
            Ok(None) => Ok(()),
            Ok(Some(what)) => Err(Rejection::new(RejectReason::Schema, &what)),
            Err(_) => Err(Rejection::new(RejectReason::Schema, "the validator failed on this answer")),
        }
    }
}

/// `Some(None)`: JSON without a schema; `Some(Some(schema))`: JSON validating against it;
/// `None`: the job asked for no JSON.
fn wanted_json(body: &Map<String, Value>) -> Option<Option<&Value>> {
    let format = body.get("response_format")?;
    match format.get("type").and_then(Value::as_str)? {
        "json_object" => Some(None),
        "json_schema" => Some(format.get("json_schema").and_then(|s| s.get("schema")).filter(|s| !s.is_null())),
        _ => None,
    }
}

/// The text of a chat message: a string `content`, or the text parts of an array content.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect(),
        _ => String::new(),
    }
}

/// The function names a job may be answered with a call to.
fn callable_functions(body: &Map<String, Value>) -> Vec<String> {
    if body.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return Vec::new();
    }
    let tools = body.get("tools").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    tools.iter().filter_map(|tool| tool.pointer("/function/name").and_then(Value::as_str).map(str::to_string)).collect()
}

/// Whether a message answers by calling tools: a non-empty `tool_calls` (or a legacy
/// `function_call`) in which every call names a function the job declared and carries its
/// arguments as a string. Anything else (a call nobody offered, a broken call) is held to the
/// content checks like any other answer.
fn calls_declared_tools(message: &Value, callable: &[String]) -> bool {
    let well_formed = |function: Option<&Value>| {
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let arguments = function.and_then(|f| f.get("arguments")).map(Value::is_string);
        name.is_some_and(|name| callable.iter().any(|c| c == name)) && arguments == Some(true)
    };
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        return !calls.is_empty() && calls.iter().all(|call| well_formed(call.get("function")));
    }
    message.get("function_call").is_some_and(|call| well_formed(Some(call)))
}

/// A validation error in a few words: where in the answer (a JSON pointer) and what is wrong,
/// without quoting the answer's value (it may be long, and it is the provider's text).
fn describe(error: ValidationError<'_>) -> String {
    let path = error.instance_path().as_str().to_string();
    if let ValidationErrorKind::Required { property } = error.kind() {
        let name = property.as_str().map_or_else(|| property.to_string(), str::to_string);
        return format!("{path}/{} is required", name.replace('~', "~0").replace('/', "~1"));
    }
    let subject = if path.is_empty() { "the answer".to_string() } else { path };
    let what = error.masked_with(subject.as_str()).to_string();
    // Some messages (additional properties, unevaluated items) do not say where they apply.
    if what.contains(&subject) { what } else { format!("{subject}: {what}") }
}

/// The longest rejection message, in bytes (schema errors can quote long enums or patterns).
const MAX_MESSAGE: usize = 300;

/// Cuts a message to [`MAX_MESSAGE`] bytes on a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_MESSAGE {
        return text.to_string();
    }
    let end = (0..=MAX_MESSAGE).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", text.get(..end).unwrap_or_default())
}

/// Compiles `schema` (or takes it from the cache). `Err` says why it does not compile.
///
/// Compiled offline: a `$ref` to anything outside the schema itself fails to compile rather
/// than make the worker fetch a URL or read a file a job names (the crate's `resolve-http` and
/// `resolve-file` features are off too). Patterns use the `regex` engine, linear in time, so a
/// hostile `pattern` cannot backtrack for minutes on a provider's answer.
pub fn compiled_schema(schema: &Value) -> Result<Arc<Validator>, String> {
    let text = schema.to_string();
    let key: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    if let Some(hit) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(hit);
    }
    check_schema_cost(schema)?;
    // Compiled outside the lock: a large schema must not hold up every other job's lookup.
    let built = catch_unwind(AssertUnwindSafe(|| {
        jsonschema::options().offline().with_pattern_options(PatternOptions::regex()).build(schema)
    }));
    let validator = match built {
        Ok(Ok(validator)) => Arc::new(validator),
        Ok(Err(e)) => return Err(bounded(&format!("the JSON Schema does not compile: {}", e.masked()))),
        Err(_) => return Err("the JSON Schema does not compile: the compiler failed on it".to_string()),
    };
    cache().lock().unwrap_or_else(|p| p.into_inner()).insert(key, text.len(), validator.clone());
    Ok(validator)
}

/// The most schema nodes a schema may stand for once its `$ref`s are followed. Validation time
/// grows with that expansion, not with the schema's text: 30 definitions each `anyOf` the one
/// before, twice, are 1.5 KB and 2^30 branches, which would hold a worker's thread for hours
/// (the check runs on the async runtime and cannot be interrupted). Real answer schemas expand to
/// a few hundred nodes.
pub const MAX_SCHEMA_EXPANSION: u64 = 20_000;

/// Keywords whose subschemas apply to a part of the instance, not to the instance itself: a
/// `$ref` cycle through one of them follows the answer's own depth and ends with it.
const DESCENDING: [&str; 9] = [
    "properties",
    "patternProperties",
    "additionalProperties",
    "items",
    "prefixItems",
    "additionalItems",
    "contains",
    "unevaluatedProperties",
    "unevaluatedItems",
];

/// Refuses a schema whose `$ref`s expand beyond [`MAX_SCHEMA_EXPANSION`] nodes, that loops on
/// itself without descending into the answer, or that refers to anything but a JSON pointer
/// inside itself.
fn check_schema_cost(root: &Value) -> Result<(), String> {
    let mut walk = SchemaWalk { root, memo: HashMap::new(), on_path: Vec::new() };
    let cost = walk.cost(root, 0)?;
    if cost > MAX_SCHEMA_EXPANSION {
        return Err(format!(
            "the JSON Schema is too complex: its references expand to more than {MAX_SCHEMA_EXPANSION} subschemas"
        ));
    }
    Ok(())
}

struct SchemaWalk<'a> {
    root: &'a Value,
    /// Expanded size of each `$ref` target already measured.
    memo: HashMap<String, u64>,
    /// `$ref` targets being expanded, with how many descending keywords lay above each.
    on_path: Vec<(String, u32)>,
}

impl SchemaWalk<'_> {
    fn cost(&mut self, node: &Value, descended: u32) -> Result<u64, String> {
        match node {
            Value::Object(map) => {
                let mut total = 1u64;
                for (key, child) in map {
                    let part = match key.as_str() {
                        "$ref" => self.follow(child, descended)?,
                        "$dynamicRef" | "$recursiveRef" => {
                            return Err("the JSON Schema uses $dynamicRef, which is not supported".into());
                        }
                        // Annotations and literal values hold no subschemas.
                        "enum" | "const" | "examples" | "default" | "description" | "title" => 0,
                        k if DESCENDING.contains(&k) => self.cost(child, descended.saturating_add(1))?,
                        _ => self.cost(child, descended)?,
                    };
                    total = total.saturating_add(part);
                    if total > MAX_SCHEMA_EXPANSION {
                        return Ok(total);
                    }
                }
                Ok(total)
            }
            Value::Array(items) => {
                let mut total = 0u64;
                for item in items {
                    total = total.saturating_add(self.cost(item, descended)?);
                    if total > MAX_SCHEMA_EXPANSION {
                        return Ok(total);
                    }
                }
                Ok(total)
            }
            _ => Ok(0),
        }
    }

    fn follow(&mut self, reference: &Value, descended: u32) -> Result<u64, String> {
        let Some(pointer) = reference.as_str().and_then(|r| r.strip_prefix('#')) else {
            return Err("the JSON Schema may only refer to itself (`#/...`)".into());
        };
        if let Some(&(_, above)) = self.on_path.iter().find(|(p, _)| p == pointer) {
            if above == descended {
                return Err("the JSON Schema refers to itself without descending into the answer".into());
            }
            // A recursive schema: validation follows the answer's depth. Counted once.
            return Ok(1);
        }
        if let Some(&known) = self.memo.get(pointer) {
            return Ok(known);
        }
        let Some(target) = self.root.pointer(pointer) else {
            return Err(format!("the JSON Schema refers to `#{pointer}`, which it does not contain"));
        };
        self.on_path.push((pointer.to_string(), descended));
        let cost = self.cost(target, descended);
        self.on_path.pop();
        let cost = cost?;
        self.memo.insert(pointer.to_string(), cost);
        Ok(cost)
    }
}

fn cache() -> &'static Mutex<SchemaCache> {
    static CACHE: OnceLock<Mutex<SchemaCache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(SchemaCache::new(SCHEMA_CACHE_ENTRIES, SCHEMA_CACHE_BYTES)))
}

/// Compiled schemas kept at most (the least recently used goes first).
pub const SCHEMA_CACHE_ENTRIES: usize = 256;
/// Schema text kept at most, summed over the entries: a compiled schema's size grows with its
/// text, and schemas come from jobs, so the count alone would not bound the memory.
pub const SCHEMA_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// A least-recently-used cache of compiled schemas keyed by the SHA-256 of their text. Eviction
/// scans the entries (a few hundred at most), which costs less than keeping an order list in
/// step, and happens only on a miss.
pub struct SchemaCache {
    entries: HashMap<[u8; 32], CachedSchema>,
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    /// A use counter: the entry with the smallest `last_used` is the least recently used.
    tick: u64,
}

struct CachedSchema {
    validator: Arc<Validator>,
    bytes: usize,
    last_used: u64,
}

impl SchemaCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> SchemaCache {
        SchemaCache { entries: HashMap::new(), max_entries, max_bytes, bytes: 0, tick: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Validator>> {
        self.tick = self.tick.saturating_add(1);
        let entry = self.entries.get_mut(key)?;
        entry.last_used = self.tick;
        Some(entry.validator.clone())
    }

    /// Keeps `validator` under `key`, evicting the least recently used entries until both
    /// bounds hold. A schema larger than the whole byte budget is not kept at all.
    pub fn insert(&mut self, key: [u8; 32], bytes: usize, validator: Arc<Validator>) {
        if bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        while self.entries.len() >= self.max_entries || self.bytes.saturating_add(bytes) > self.max_bytes {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| *k) else { break };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes = self.bytes.saturating_sub(gone.bytes);
            }
        }
        self.tick = self.tick.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries.insert(key, CachedSchema { validator, bytes, last_used: self.tick });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(value: Value) -> Map<String, Value> {
        serde_json::from_value(value).unwrap()
    }

    /// A completion whose first choice has this message and finish reason.
    fn answer(message: Value, finish_reason: &str) -> Value {
        json!({"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]})
    }

    fn says(text: &str) -> Value {
        answer(json!({"role": "assistant", "content": text}), "stop")
    }

    fn expect(accept: Accept, request: Value) -> Expectation {
        Expectation::for_job(accept, &body(request)).unwrap()
    }

    fn plain() -> Expectation {
        expect(Accept::default(), json!({"messages": []}))
    }

    fn rejection(expectation: &Expectation, answer: &Value) -> (RejectReason, String) {
        let rejected = expectation.check(answer).unwrap_err();
        (rejected.reason, rejected.message)
    }

    const ECHO_SCHEMA: &str = r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "echo",
        "schema": {"type": "object", "properties": {"echo": {"type": "string"}, "n": {"type": "integer"}}, "required": ["echo"]}}}}"#;

    fn echo_schema_job() -> Expectation {
        expect(Accept::default(), serde_json::from_str(ECHO_SCHEMA).unwrap())
    }

    #[test]
    fn a_schema_whose_references_explode_is_refused_before_it_is_compiled() {
        let mut defs = serde_json::Map::new();
        defs.insert("d0".into(), json!({"type": "string"}));
        for i in 1..=30 {
            let previous = format!("#/$defs/d{}", i - 1);
            defs.insert(format!("d{i}"), json!({"anyOf": [{"$ref": previous}, {"$ref": previous}]}));
        }
        let schema = json!({"$defs": defs, "$ref": "#/$defs/d30"});
        let refused = compiled_schema(&schema).unwrap_err();
        assert!(refused.contains("too complex"), "{refused}");
        let looping = json!({"anyOf": [{"$ref": "#"}, {"type": "string"}]});
        assert!(compiled_schema(&looping).unwrap_err().contains("without descending"));
        assert!(compiled_schema(&json!({"$ref": "https://example.org/s.json"})).is_err());
        // A recursive schema that descends into the answer is fine.
        let tree = json!({"type": "object", "properties": {"name": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}}}});
        assert!(compiled_schema(&tree).is_ok());
    }

    #[test]
    fn only_a_well_formed_call_to_a_declared_tool_is_an_answer_without_content() {
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let with_tools = expect(Accept { min_chars: 50, ..Accept::default() }, json!({"tools": tools}));
        let good = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}]});
        assert!(with_tools.check(&answer(good, "tool_calls")).is_ok());
        for garbage in [
            json!({"role": "assistant", "content": "", "tool_calls": [null]}),
            json!({"role": "assistant", "content": "", "tool_calls": [{}]}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "rm_rf", "arguments": "{}"}}]}),
            json!({"role": "assistant", "content": "", "function_call": {}}),
        ] {
            assert_eq!(rejection(&with_tools, &answer(garbage, "stop")).0, RejectReason::Empty);
        }
        // A job that offered no tools is not answered by a call.
        let plain_call = json!({"role": "assistant", "content": "x", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}]});
        let no_tools = expect(Accept { min_chars: 50, ..Accept::default() }, json!({}));
        assert_eq!(rejection(&no_tools, &answer(plain_call, "tool_calls")).0, RejectReason::TooShort);
    }

    #[test]
    fn a_plain_answer_passes_every_default_check() {
        assert_eq!(plain().check(&says("Paris is the capital of France.")), Ok(()));
    }

    #[test]
    fn content_rejects_empty_whitespace_missing_and_null_content() {
        let empties = [
            says(""),
            says(" \n\t "),
            answer(json!({"role": "assistant", "content": null}), "stop"),
            answer(json!({"role": "assistant"}), "stop"),
            answer(json!({"role": "assistant", "content": [{"type": "text", "text": "  "}]}), "stop"),
            json!({"object": "chat.completion", "choices": []}),
            json!({"object": "chat.completion"}),
            json!("not even an object"),
        ];
        for empty in &empties {
            assert_eq!(rejection(&plain(), empty), (RejectReason::Empty, "empty content".into()), "{empty}");
        }
        let refused =
            answer(json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}), "stop");
        assert_eq!(rejection(&plain(), &refused).1, "empty content (refusal: I can't help with that.)");
    }

    #[test]
    fn content_accepts_tool_calls_and_text_parts() {
        let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]});
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        assert_eq!(
            expect(Accept::default(), json!({"tools": tools})).check(&answer(call.clone(), "tool_calls")),
            Ok(())
        );
        let parts = json!({"role": "assistant", "content": [{"type": "text", "text": "Hello"}]});
        assert_eq!(plain().check(&answer(parts, "stop")), Ok(()));
        // A tool call is the answer even when the job asked for JSON content.
        let json_job = expect(Accept::default(), json!({"tools": tools, "response_format": {"type": "json_object"}}));
        assert_eq!(json_job.check(&answer(call, "tool_calls")), Ok(()));
    }

    #[test]
    fn finish_rejects_the_providers_cap_and_the_content_filter_but_not_the_jobs_own_cap() {
        let cut = answer(json!({"role": "assistant", "content": "The three reasons are: first,"}), "length");
        assert_eq!(rejection(&plain(), &cut), (RejectReason::CutOff, "cut off at the provider's cap".into()));
        for key in ["max_tokens", "max_completion_tokens"] {
            let capped = expect(Accept::default(), json!({key: 16}));
            assert_eq!(capped.check(&cut), Ok(()), "{key}: the job asked for a short answer");
        }
        let null_cap = expect(Accept::default(), json!({"max_tokens": null}));
        assert_eq!(rejection(&null_cap, &cut).0, RejectReason::CutOff, "a null cap is no cap");
        let filtered = answer(json!({"role": "assistant", "content": "I"}), "content_filter");
        assert_eq!(
            rejection(&expect(Accept::default(), json!({"max_tokens": 16})), &filtered),
            (RejectReason::ContentFilter, "stopped by the provider's content filter".into())
        );
        // The root cause wins over its symptom: an empty answer cut off is "cut off".
        assert_eq!(rejection(&plain(), &answer(json!({"content": ""}), "length")).0, RejectReason::CutOff);
    }

    #[test]
    fn json_object_rejects_prose_around_json_with_the_parsers_words() {
        let job = expect(Accept::default(), json!({"response_format": {"type": "json_object"}}));
        assert_eq!(job.check(&says(r#" {"echo": "hi"} "#)), Ok(()));
        let prose = says("Sure! Here is the JSON:\n```json\n{\"echo\": \"hi\"}\n```");
        assert_eq!(
            rejection(&job, &prose),
            (RejectReason::NotJson, "not JSON: expected value at line 1 column 1".into())
        );
        let trailing = says("{\"echo\": \"hi\"} Hope this helps!");
        assert_eq!(rejection(&job, &trailing).1, "not JSON: trailing characters at line 1 column 16");
        // A text response_format, or none, asks for no JSON.
        let text = expect(Accept::default(), json!({"response_format": {"type": "text"}}));
        assert_eq!(text.check(&prose), Ok(()));
    }

    #[test]
    fn json_schema_rejects_answers_off_the_schema_naming_the_place() {
        let job = echo_schema_job();
        assert_eq!(job.check(&says(r#"{"echo": "hi", "n": 3}"#)), Ok(()));
        let missing = says(r#"{"reply": "hi"}"#);
        assert_eq!(rejection(&job, &missing), (RejectReason::Schema, "schema: /echo is required".into()));
        let wrong_type = says(r#"{"echo": "hi", "n": "three"}"#);
        assert_eq!(rejection(&job, &wrong_type).1, r#"schema: /n is not of type "integer""#);
        let closed = expect(
            Accept::default(),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object",
                "properties": {"echo": {"type": "string"}}, "required": ["echo"], "additionalProperties": false}}}}),
        );
        assert_eq!(rejection(&closed, &missing).1, "schema: /echo is required", "the missing property comes first");
        assert_eq!(
            rejection(&closed, &says(r#"{"echo": "hi", "extra": 1}"#)).1,
            "schema: the answer: Additional properties are not allowed ('extra' was unexpected)"
        );
        let not_object = says(r#"["hi"]"#);
        assert_eq!(rejection(&job, &not_object).1, r#"schema: the answer is not of type "object""#);
        assert_eq!(rejection(&job, &says("hi")).0, RejectReason::NotJson);
        // A json_schema without a schema asks for any JSON.
        let no_schema = expect(
            Accept::default(),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        );
        assert_eq!(no_schema.check(&missing), Ok(()));
        assert_eq!(rejection(&no_schema, &says("hi")).0, RejectReason::NotJson);
    }

    #[test]
    fn a_required_property_with_a_slash_is_written_as_a_json_pointer() {
        let schema =
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"required": ["a/b~c"]}}}});
        let job = expect(Accept::default(), schema);
        assert_eq!(rejection(&job, &says("{}")).1, "schema: /a~1b~0c is required");
    }

    #[test]
    fn min_chars_rejects_short_text_and_is_off_by_default() {
        let accept = Accept { min_chars: 20, ..Accept::default() };
        let job = expect(accept, json!({}));
        assert_eq!(
            rejection(&job, &says("  Yes.  ")),
            (RejectReason::TooShort, "too short: 4 characters, fewer than min_chars 20".into())
        );
        assert_eq!(job.check(&says("ééééééééééééééééééééé")), Ok(()), "characters, not bytes");
        assert_eq!(plain().check(&says("Yes.")), Ok(()));
    }

    #[test]
    fn each_check_can_be_turned_off() {
        let off = Accept { content: false, finish: false, json: false, ..Accept::default() };
        let job = expect(off, json!({"response_format": {"type": "json_object"}}));
        assert_eq!(job.check(&says("")), Ok(()));
        assert_eq!(job.check(&answer(json!({"content": "x"}), "length")), Ok(()));
        assert_eq!(job.check(&answer(json!({"content": "x"}), "content_filter")), Ok(()));
        assert_eq!(job.check(&says("no json here")), Ok(()));
    }

    #[test]
    fn a_jobs_accept_overrides_only_the_keys_it_sets() {
        let chain = Accept { min_chars: 10, ..Accept::default() };
        let job = AcceptOverride::parse(&json!({"json": false, "on_all_rejected": "best"})).unwrap();
        let merged = chain.overridden_by(Some(&job));
        assert_eq!(
            merged,
            Accept { json: false, on_all_rejected: OnAllRejected::Best, min_chars: 10, ..Accept::default() }
        );
        assert_eq!(chain.overridden_by(None), chain);
        let off = AcceptOverride::parse(&json!({"min_chars": 0})).unwrap();
        assert_eq!(chain.overridden_by(Some(&off)).min_chars, 0);
    }

    #[test]
    fn a_bad_accept_shape_is_refused_with_a_reason() {
        let cases = [
            (json!({"jsno": true}), "unknown field `jsno`"),
            (json!({"json": "yes"}), "invalid type"),
            (json!({"on_all_rejected": "maybe"}), "unknown variant `maybe`"),
            (json!({"min_chars": -1}), "invalid value"),
            (json!("strict"), "must be an object"),
            (json!([false]), "must be an object"),
        ];
        for (value, needle) in cases {
            let err = AcceptOverride::parse(&value).unwrap_err();
            assert!(err.starts_with("`accept`: ") && err.contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn every_message_maps_back_to_its_reason() {
        let cases = [
            (rejection(&plain(), &says("")), RejectReason::Empty),
            (rejection(&plain(), &answer(json!({"content": "x"}), "length")), RejectReason::CutOff),
            (rejection(&plain(), &answer(json!({"content": "x"}), "content_filter")), RejectReason::ContentFilter),
            (rejection(&echo_schema_job(), &says("x")), RejectReason::NotJson),
            (rejection(&echo_schema_job(), &says("{}")), RejectReason::Schema),
            (
                rejection(&expect(Accept { min_chars: 5, ..Accept::default() }, json!({})), &says("x")),
                RejectReason::TooShort,
            ),
        ];
        for ((reason, message), expected) in cases {
            assert_eq!(reason, expected);
            assert_eq!(RejectReason::of_message(&message), Some(expected), "{message}");
        }
        assert_eq!(RejectReason::of_message("HTTP 503"), None);
        let labels: Vec<&str> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, ["empty", "cut_off", "content_filter", "not_json", "schema", "too_short"]);
    }

    #[test]
    fn a_schema_that_does_not_compile_refuses_the_job_and_nothing_is_fetched() {
        let bad = json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}});
        let err = Expectation::for_job(Accept::default(), &body(bad.clone())).unwrap_err();
        assert!(err.starts_with("the JSON Schema does not compile"), "{err}");
        // The same job with the json check off is served (nothing to compile).
        assert!(Expectation::for_job(Accept { json: false, ..Accept::default() }, &body(bad)).is_ok());
        for remote in ["https://example.com/schema.json", "file:///etc/passwd"] {
            let err = compiled_schema(&json!({"$ref": remote})).unwrap_err();
            assert!(err.contains("may only refer to itself"), "{remote}: {err}");
        }
        let local = json!({"$defs": {"e": {"type": "string"}}, "properties": {"echo": {"$ref": "#/$defs/e"}}});
        assert!(compiled_schema(&local).unwrap().is_valid(&json!({"echo": "x"})));
    }

    #[test]
    fn a_hostile_pattern_runs_in_linear_time() {
        // Catastrophic for a backtracking engine; the `regex` engine answers at once.
        let job = expect(
            Accept::default(),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^(a+)+$"}}}}),
        );
        let evil = format!("\"{}!\"", "a".repeat(5000));
        assert_eq!(rejection(&job, &says(&evil)).0, RejectReason::Schema);
        // Lookarounds need backtracking: such a schema is refused rather than risked.
        assert!(compiled_schema(&json!({"pattern": "(?=a)a"})).is_err());
    }

    #[test]
    fn long_schema_messages_are_cut() {
        let pattern = format!("^{}$", "long-pattern-".repeat(40));
        let job = expect(
            Accept::default(),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"pattern": pattern}}}}),
        );
        let (reason, message) = rejection(&job, &says("\"other\""));
        assert_eq!(reason, RejectReason::Schema);
        assert!(message.len() <= MAX_MESSAGE + '…'.len_utf8() && message.ends_with('…'), "{message}");
    }

    #[test]
    fn the_same_schema_compiles_once_and_the_cache_stays_bounded() {
        let schema = json!({"type": "object", "required": ["only-in-this-test-8d2f"]});
        let first = compiled_schema(&schema).unwrap();
        let again = compiled_schema(&schema.clone()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one compiled schema per schema text, not per job");

        let validator = |n: u64| Arc::new(jsonschema::validator_for(&json!({"minimum": n})).unwrap());
        let key = |n: u8| [n; 32];
        let mut cache = SchemaCache::new(3, 100);
        for n in 0..3 {
            cache.insert(key(n), 10, validator(n.into()));
        }
        assert!(cache.get(&key(0)).is_some(), "0 is now the most recently used");
        cache.insert(key(3), 10, validator(3));
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key(1)).is_none(), "the least recently used went first");
        assert!(cache.get(&key(0)).is_some() && cache.get(&key(3)).is_some());
        // The byte budget evicts too (30 + 90 > 100: the two least recently used go), and a
        // schema above it is never kept.
        cache.insert(key(4), 90, validator(4));
        assert_eq!((cache.len(), cache.bytes), (2, 100));
        assert!(cache.get(&key(3)).is_some() && cache.get(&key(4)).is_some());
        cache.insert(key(5), 101, validator(5));
        assert!(cache.get(&key(5)).is_none());
        // Re-inserting a key replaces it without counting its bytes twice.
        cache.insert(key(4), 90, validator(4));
        assert_eq!((cache.len(), cache.bytes), (2, 100));
    }
}
