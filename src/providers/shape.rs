//! What the official OpenAI SDK requires of a `chat.completion` (openai-python's pydantic models
//! `ChatCompletion`, `Choice`, `ChatCompletionMessage`, `ChatCompletionMessageFunctionToolCall`,
//! `CompletionUsage`), as a check in Rust.
//!
//! Every result body must load in a client's SDK whatever dialect produced it (contract §3).
//! The translators are tested against this check on the providers' documented answers and on
//! arbitrary ones; a test also runs the SDK itself when Python has it, to keep this check
//! honest. Only required fields and the types pydantic enforces are checked: extra fields are
//! allowed, as the SDK allows them.

use serde_json::Value;

/// `Choice.finish_reason`'s literal values.
pub const FINISH_REASONS: &[&str] = &["stop", "length", "tool_calls", "content_filter", "function_call"];

/// Everything in `body` that the SDK's `ChatCompletion.model_validate` would refuse; empty when
/// it loads.
pub fn chat_completion_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut need = |ok: bool, what: &str| {
        if !ok {
            problems.push(what.to_string());
        }
    };
    need(body.is_object(), "the body is not an object");
    need(body.get("id").is_some_and(Value::is_string), "`id` is not a string");
    need(body.get("object").and_then(Value::as_str) == Some("chat.completion"), "`object` is not \"chat.completion\"");
    need(is_int(body.get("created")), "`created` is not an integer");
    need(body.get("model").is_some_and(Value::is_string), "`model` is not a string");
    need(optional(body.get("system_fingerprint"), Value::is_string), "`system_fingerprint` is not a string");
    problems.extend(answer_problems(body));
    problems
}

/// What the SDK would refuse in the answer itself (its `usage` and `choices`), the fields an
/// OpenAI-compatible provider fills and the envelope does not.
pub fn answer_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(usage) = body.get("usage").filter(|u| !u.is_null()) {
        for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            if !is_int(usage.get(key)) {
                problems.push(format!("`usage.{key}` is not an integer"));
            }
        }
    }
    let Some(choices) = body.get("choices").and_then(Value::as_array) else {
        problems.push("`choices` is not a list".into());
        return problems;
    };
    for (i, choice) in choices.iter().enumerate() {
        choice_problems(choice, &format!("choices[{i}]"), &mut problems);
    }
    problems
}

/// Mends what an OpenAI-compatible server says its own way in an answer the OpenAI SDK must
/// load (contract §3), without changing what it says:
/// - a `finish_reason` outside the SDK's literals is read as the one it stands for
///   ([`finish_reason_for`]); the provider's own word is kept beside it as
///   `native_finish_reason` (as OpenRouter does); a message with tool calls and no finish
///   finished for them (`tool_calls`), any other without one `stop`;
/// - a choice's `index` that is no integer becomes its position, `message.role` `assistant`;
/// - `content` given as parts becomes the text of its text parts (a reasoning model's
///   `thinking` part is not the answer);
/// - a tool call without `type` is a `function` one, one without an `id` gets one, and its
///   `arguments` given as JSON (or not at all) become the JSON text the SDK expects;
/// - a `refusal` that is no text is dropped; a `usage` missing one count gets it from the two
///   others, and one that still does not load is dropped.
///
/// What is left wrong is for [`answer_problems`] to name. A finish that says the generation
/// failed is not mended: [`failed_generation`] finds it first.
pub fn repair_answer(body: &mut Value) {
    let Some(fields) = body.as_object_mut() else { return };
    if let Some(usage) = fields.get_mut("usage").filter(|u| !u.is_null()) {
        complete_usage(usage);
        if !usage_loads(usage) {
            fields.remove("usage");
        }
    }
    let Some(choices) = fields.get_mut("choices").and_then(Value::as_array_mut) else { return };
    for (position, choice) in choices.iter_mut().enumerate() {
        repair_choice(choice, position);
    }
}

/// Whether a choice says its generation failed, or an `error` object of its own: such an
/// answer is no answer, whichever choice it is. A finish reason that names an error
/// (OpenRouter's `error`, §3.4 of the reference; Cohere's `ERROR_TOXIC`, `ERROR_LIMIT`), a stop
/// by the server or the user (`abort`, `cancelled`, `USER_CANCEL`), an interruption (DeepSeek's
/// `insufficient_system_resource`), or a tool call the model failed to make (Gemini's
/// `MALFORMED_FUNCTION_CALL`, `UNEXPECTED_TOOL_CALL`, `TOO_MANY_TOOL_CALLS`), in any case.
pub fn failed_generation(choice: &Value) -> bool {
    const FAILED: &[&str] =
        &["error", "abort", "cancel", "insufficient", "interrupt", "malformed", "unexpected_tool", "too_many_tool"];
    let finish = choice.get("finish_reason").and_then(Value::as_str).map(str::to_ascii_lowercase);
    let failed = finish.is_some_and(|finish| FAILED.iter().any(|word| finish.contains(word)));
    failed || choice.get("error").is_some_and(|e| !e.is_null())
}

/// The tokens a `usage` says the call took, as the server gave it (before any mending): its
/// `total_tokens`, or the sum of the prompt and completion counts when that is more or there is
/// no total (a server whose "total" is one of them, as a Bedrock-backed one answers
/// `{"prompt_tokens": 1066, "total_tokens": 103}`, would otherwise lower the token windows
/// below what the provider counted). `None` when it gives no count.
pub fn usage_total(usage: &Value) -> Option<u64> {
    let count = |key: &str| usage.get(key).and_then(Value::as_u64);
    let (total, prompt, completion) = (count("total_tokens"), count("prompt_tokens"), count("completion_tokens"));
    if total.is_none() && (prompt.is_none() || completion.is_none()) {
        return None;
    }
    let parts = prompt.unwrap_or(0).saturating_add(completion.unwrap_or(0));
    Some(total.unwrap_or(0).max(parts))
}

fn usage_loads(usage: &Value) -> bool {
    ["prompt_tokens", "completion_tokens", "total_tokens"].iter().all(|key| is_int(usage.get(*key)))
}

/// Fills the one count of three a server left out from the two it gave (total = prompt +
/// completion), when they are counts.
fn complete_usage(usage: &mut Value) {
    let Some(fields) = usage.as_object_mut() else { return };
    let count = |key: &str| fields.get(key).filter(|v| is_int(Some(v))).and_then(Value::as_u64);
    let (prompt, completion, total) = (count("prompt_tokens"), count("completion_tokens"), count("total_tokens"));
    let missing = match (prompt, completion, total) {
        (Some(p), Some(c), None) => p.checked_add(c).map(|t| ("total_tokens", t)),
        (Some(p), None, Some(t)) => t.checked_sub(p).map(|c| ("completion_tokens", c)),
        (None, Some(c), Some(t)) => t.checked_sub(c).map(|p| ("prompt_tokens", p)),
        _ => None,
    };
    if let Some((key, value)) = missing {
        fields.insert(key.into(), Value::from(value));
    }
}

fn repair_choice(choice: &mut Value, position: usize) {
    let Some(fields) = choice.as_object_mut() else { return };
    if !is_int(fields.get("index")) {
        fields.insert("index".into(), Value::from(position));
    }
    let calls_tools = fields
        .get("message")
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .is_some_and(|calls| !calls.is_empty());
    let given = fields.get("finish_reason").cloned();
    let reason = match given.as_ref().and_then(Value::as_str) {
        Some(native) => finish_reason_for(native),
        None if calls_tools => "tool_calls",
        None => "stop",
    };
    if given.as_ref().and_then(Value::as_str) != Some(reason) {
        if let Some(Value::String(native)) = given {
            fields.insert("native_finish_reason".into(), Value::String(native));
        }
        fields.insert("finish_reason".into(), Value::from(reason));
    }
    let Some(message) = fields.get_mut("message").and_then(Value::as_object_mut) else { return };
    if message.get("role").and_then(Value::as_str) != Some("assistant") {
        message.insert("role".into(), Value::from("assistant"));
    }
    if let Some(text) = message.get("content").and_then(text_of_parts) {
        message.insert("content".into(), Value::String(text));
    }
    if message.get("refusal").is_some_and(|r| !r.is_null() && !r.is_string()) {
        message.remove("refusal");
    }
    if let Some(calls) = message.get_mut("tool_calls").and_then(Value::as_array_mut) {
        calls.iter_mut().for_each(repair_tool_call);
    }
}

/// A tool call as the SDK loads it, from a server that left out what it can do without: its
/// `type` (only `function` exists), its `id`, or `arguments` (a function without parameters:
/// OpenRouter for Anthropic models; blank, as GLM and DeepInfra send them), or gave `arguments`
/// as JSON rather than JSON text. A call without a function name is left for
/// [`answer_problems`] to name.
fn repair_tool_call(call: &mut Value) {
    let Some(fields) = call.as_object_mut() else { return };
    if fields.get("type").is_none_or(Value::is_null) {
        fields.insert("type".into(), Value::from("function"));
    }
    // A new id each time: a conversation carries the calls of many answers, and a provider
    // such as Anthropic refuses two calls with one id.
    if !fields.get("id").is_some_and(Value::is_string) {
        fields.insert("id".into(), Value::from(super::translate::new_call_id()));
    }
    let Some(function) = fields.get_mut("function").and_then(Value::as_object_mut) else { return };
    let text = super::translate::arguments_text(function.get("arguments"));
    function.insert("arguments".into(), Value::String(text));
}

/// The SDK's literal a provider's own finish reason stands for: the literal itself, a known
/// spelling of one (Anthropic's, Gemini's, Mistral's, Ollama's, vLLM's), or by what it names
/// (a length or token cap: `length`; a filter, block or policy: `content_filter`; a tool or
/// function: `tool_calls`); anything else ended as asked: `stop`.
fn finish_reason_for(native: &str) -> &'static str {
    if let Some(&literal) = FINISH_REASONS.iter().find(|literal| **literal == native) {
        return literal;
    }
    let native = native.to_ascii_lowercase();
    let names = |words: &[&str]| words.iter().any(|word| native.contains(word));
    let cut = ["length", "max_tokens", "max_output", "max_completion", "context_window", "limit", "truncat"];
    let blocked = [
        "filter",
        "safety",
        "block",
        "prohibited",
        "spii",
        "recitation",
        "moderation",
        "polic",
        "refus",
        "armor",
        "toxic",
    ];
    if names(&cut) {
        "length"
    } else if names(&blocked) {
        "content_filter"
    } else if names(&["tool", "function"]) {
        "tool_calls"
    } else {
        "stop"
    }
}

/// A `content` given as a list of parts (`[{"type": "text", "text": …}]`, as some
/// OpenAI-compatible servers answer): the text of its text parts, joined. Other parts (a
/// reasoning model's `thinking`) are not the answer. `None` for anything but a list.
fn text_of_parts(content: &Value) -> Option<String> {
    let parts = content.as_array()?;
    let texts = parts.iter().filter_map(|part| match part.get("type").and_then(Value::as_str) {
        Some("text") | None => part.get("text").and_then(Value::as_str),
        Some(_) => None,
    });
    Some(texts.collect())
}

/// Fills the fields the SDK requires at the top of a chat completion that an answer left out or
/// gave the wrong type (an OpenAI-compatible server's own variant, or a hostile one): `id`,
/// `object`, `created`, `model`. Fields given right are kept as they are, and so are extra
/// fields, as the SDK keeps them. A body that is not an object is left alone (the chain only
/// accepts answers with choices).
pub fn complete_envelope(body: &mut Value, id: &str, model: &str, created: u64) {
    let Some(fields) = body.as_object_mut() else { return };
    if !fields.get("id").is_some_and(Value::is_string) {
        fields.insert("id".into(), Value::from(id));
    }
    if fields.get("object").and_then(Value::as_str) != Some("chat.completion") {
        fields.insert("object".into(), Value::from("chat.completion"));
    }
    if !is_int(fields.get("created")) {
        fields.insert("created".into(), Value::from(created));
    }
    if !fields.get("model").is_some_and(Value::is_string) {
        fields.insert("model".into(), Value::from(model));
    }
}

fn choice_problems(choice: &Value, at: &str, problems: &mut Vec<String>) {
    let mut need = |ok: bool, what: &str| {
        if !ok {
            problems.push(format!("`{at}.{what}"));
        }
    };
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    need(finish.is_some_and(|f| FINISH_REASONS.contains(&f)), "finish_reason` is not one of the SDK's literals");
    need(is_int(choice.get("index")), "index` is not an integer");
    let Some(message) = choice.get("message").filter(|m| m.is_object()) else {
        problems.push(format!("`{at}.message` is not an object"));
        return;
    };
    need(message.get("role").and_then(Value::as_str) == Some("assistant"), "message.role` is not \"assistant\"");
    need(optional(message.get("content"), Value::is_string), "message.content` is neither a string nor null");
    need(optional(message.get("refusal"), Value::is_string), "message.refusal` is neither a string nor null");
    let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) else { return };
    let Some(calls) = calls.as_array() else {
        problems.push(format!("`{at}.message.tool_calls` is not a list"));
        return;
    };
    for (j, call) in calls.iter().enumerate() {
        let mut need = |ok: bool, what: &str| {
            if !ok {
                problems.push(format!("`{at}.message.tool_calls[{j}].{what}"));
            }
        };
        need(call.get("id").is_some_and(Value::is_string), "id` is not a string");
        need(call.get("type").and_then(Value::as_str) == Some("function"), "type` is not \"function\"");
        need(call.pointer("/function/name").is_some_and(Value::is_string), "function.name` is not a string");
        need(call.pointer("/function/arguments").is_some_and(Value::is_string), "function.arguments` is not a string");
    }
}

/// Present and an integer (pydantic's `int` refuses fractions and text).
fn is_int(value: Option<&Value>) -> bool {
    value.is_some_and(|v| v.is_u64() || v.is_i64())
}

/// Absent, null, or of the right type (pydantic's `Optional[...]` with a default).
fn optional(value: Option<&Value>, right: fn(&Value) -> bool) -> bool {
    value.is_none_or(|v| v.is_null() || right(v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_envelope_missing_its_top_fields_is_completed_and_one_given_right_is_kept() {
        let choices = json!([{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]);
        let mut bare = json!({"choices": choices, "custom_id": "someone-else", "object": "list", "created": "today"});
        complete_envelope(&mut bare, "chatcmpl-r1", "llama", 1_700_000_000);
        assert_eq!(chat_completion_problems(&bare), Vec::<String>::new());
        assert_eq!(
            (&bare["id"], &bare["object"], &bare["created"], &bare["model"]),
            (&json!("chatcmpl-r1"), &json!("chat.completion"), &json!(1_700_000_000), &json!("llama"))
        );
        assert_eq!(bare["custom_id"], "someone-else", "extra fields stay, as the SDK keeps them");
        let given = json!({"id": "x", "object": "chat.completion", "created": 5, "model": "m", "choices": choices});
        let mut kept = given.clone();
        complete_envelope(&mut kept, "chatcmpl-r1", "llama", 1_700_000_000);
        assert_eq!(kept, given);
        let mut not_an_object = json!(["a"]);
        complete_envelope(&mut not_an_object, "i", "m", 0);
        assert_eq!(not_an_object, json!(["a"]));
    }

    use std::process::{Command, Stdio};
    use std::time::SystemTime;

    use reqwest::header::HeaderMap;
    use serde_json::json;

    use super::*;
    use crate::providers::{anthropic, gemini};

    /// A chat.completion as OpenAI documents it, with a tool call.
    fn documented() -> Value {
        json!({"id": "chatcmpl-abc123", "object": "chat.completion", "created": 1_699_896_916, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99}})
    }

    #[test]
    fn the_documented_completion_passes_and_each_broken_field_is_named() {
        assert_eq!(chat_completion_problems(&documented()), Vec::<String>::new());
        let broken = [
            ("/model", Value::Null, "`model` is not a string"),
            ("/created", json!(1.5), "`created` is not an integer"),
            ("/choices/0/finish_reason", json!("error"), "`choices[0].finish_reason` is not one of the SDK's literals"),
            ("/choices/0/message/content", json!(["x"]), "`choices[0].message.content` is neither a string nor null"),
            (
                "/choices/0/message/tool_calls/0/function/arguments",
                json!({"location": "Boston"}),
                "`choices[0].message.tool_calls[0].function.arguments` is not a string",
            ),
            ("/usage/total_tokens", json!("99"), "`usage.total_tokens` is not an integer"),
        ];
        for (pointer, value, problem) in broken {
            let mut body = documented();
            if let Some(slot) = body.pointer_mut(pointer) {
                *slot = value;
            }
            assert_eq!(chat_completion_problems(&body), vec![problem.to_string()], "{pointer}");
        }
        assert_eq!(chat_completion_problems(&json!([])).first().map(String::as_str), Some("the body is not an object"));
    }

    /// Translated answers of every kind: text, tool calls, JSON through a forced tool.
    fn translated() -> Vec<Value> {
        let now = SystemTime::UNIX_EPOCH;
        let gemini_answers = [
            json!({"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}}),
            json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}], "role": "model"}, "finishReason": "STOP"}]}),
        ];
        let anthropic_answers = [
            (
                json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
                "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}}),
                false,
            ),
            (
                json!({"id": "msg_2", "type": "message", "role": "assistant", "model": "claude", "content": [{"type": "tool_use", "id": "toolu_2", "name": anthropic::JSON_TOOL, "input": {"a": 1}}],
                "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}}),
                true,
            ),
        ];
        let mut bodies: Vec<Value> = gemini_answers
            .iter()
            .map(|a| gemini::interpret(200, &HeaderMap::new(), a.to_string().as_bytes(), "m", now).unwrap().body)
            .collect();
        for (answer, json_tool) in anthropic_answers {
            let reading = anthropic::Reading { model: "m", json_tool };
            bodies.push(
                anthropic::interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), reading, now).unwrap().body,
            );
        }
        bodies
    }

    #[test]
    fn translated_answers_pass_the_rust_check() {
        for body in translated() {
            assert_eq!(chat_completion_problems(&body), Vec::<String>::new(), "{body}");
        }
    }

    /// The same answers through the SDK itself, when this machine's Python has the `openai`
    /// package (`pip install openai`); otherwise the test says so and checks nothing more than
    /// the Rust check above. It also runs the documented broken answer, so that an SDK that
    /// accepted anything would fail it.
    #[test]
    fn translated_answers_load_in_the_official_openai_sdk_when_installed() {
        let probe = Command::new("python3").args(["-c", "import openai"]).stderr(Stdio::null()).status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: python3 with the `openai` package is not available (pip install openai)");
            return;
        }
        let script = "import json, sys\n\
from openai.types.chat import ChatCompletion\n\
bodies = json.load(sys.stdin)\n\
for body in bodies['good']:\n    ChatCompletion.model_validate(body)\n\
try:\n    ChatCompletion.model_validate(bodies['bad'])\nexcept Exception:\n    sys.exit(0)\n\
sys.exit('the SDK accepted arguments that are an object')\n";
        let mut bad = documented();
        if let Some(arguments) = bad.pointer_mut("/choices/0/message/tool_calls/0/function/arguments") {
            *arguments = json!({"location": "Boston"});
        }
        let input = json!({"good": translated(), "bad": bad}).to_string();
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
}
