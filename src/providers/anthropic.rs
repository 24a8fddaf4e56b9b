//! Anthropic's Messages API: `{base_url}/messages` with `x-api-key` and `anthropic-version`.
//!
//! System messages become the top-level `system`; `max_tokens`, which Anthropic requires, defaults
//! to [`DEFAULT_MAX_TOKENS`] when the job gives none. Beyond text:
//! - images: `image` blocks, a `data:` URL as a `base64` source, an `https` URL as a `url` one;
//! - tools: `tools` (`input_schema` is the function's parameters), `tool_choice` (auto / any /
//!   tool / none, `parallel_tool_calls: false` as `disable_parallel_tool_use`), assistant tool
//!   calls as `tool_use` blocks and tool results as `tool_result` blocks in a user turn;
//! - JSON: the API has no JSON mode, so `response_format` becomes the forced-tool pattern: one
//!   tool, [`JSON_TOOL`], whose `input_schema` is the requested schema (`{"type": "object"}`
//!   for `json_object`), forced by `tool_choice`; its input comes back as the message content.
//!
//! Answers: text blocks are the content, `tool_use` blocks the `tool_calls`.

use std::collections::BTreeSet;
use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

use super::errors::{ErrorInfo, classify};
use super::translate::{
    Answer, CallOut, Image, Part, ResponseFormat, ToolChoice, Usage, content_parts, functions, max_tokens, messages,
    new_call_id, refuse_unsupported, response_format, role, stop_sequences, text_of, tool_calls, tool_choice,
};
use super::{Completion, Failure, FailureKind, retry_info};
use crate::job::ChatBody;

/// The API version every request names.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the job sets neither `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The one tool of the forced-tool JSON pattern: its input is the JSON answer.
pub const JSON_TOOL: &str = "json_answer";

const UNSUPPORTED: &[&str] = &["functions", "function_call", "logprobs", "top_logprobs"];

/// The image types the Messages API accepts in a `base64` source.
const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The Messages API body for `model`, or the name of what cannot be translated.
pub fn request_body(body: &ChatBody, model: &str) -> Result<Value, String> {
    refuse_unsupported(body, UNSUPPORTED)?;
    let json_tool = json_tool(response_format(body)?)?;
    let declared = functions(body)?;
    if json_tool.is_some() && !declared.is_empty() {
        // The forced tool would keep the model from calling the job's own tools.
        return Err("`response_format` together with `tools` (JSON comes through a forced tool here)".into());
    }
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    let mut after_tool_result = false;
    // The tools the conversation called, which the API wants declared.
    let mut called = BTreeSet::new();
    for message in messages(body) {
        let role = role(message);
        let is_tool_result = role == "tool";
        match role {
            "system" | "developer" => system.push(text_of(message)?),
            "user" => turns.push(json!({"role": "user", "content": user_content(message)?})),
            "assistant" => {
                turns.push(json!({"role": "assistant", "content": assistant_content(message, &mut called)?}));
            }
            "tool" => {
                let block = tool_result(message)?;
                // Every result of one turn's calls goes back in one user turn.
                match turns.last_mut().and_then(|t| t.get_mut("content")).and_then(Value::as_array_mut) {
                    Some(blocks) if after_tool_result => blocks.push(block),
                    _ => turns.push(json!({"role": "user", "content": [block]})),
                }
            }
            other => return Err(format!("`{other}` messages")),
        }
        after_tool_result = is_tool_result;
    }
    let mut request = Map::new();
    request.insert("model".into(), json!(model));
    request.insert("messages".into(), Value::Array(turns));
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
    let declared_names: BTreeSet<String> = declared.iter().map(|f| f.name.clone()).collect();
    let mut tools: Vec<Value> = declared
        .into_iter()
        .map(|f| {
            let mut tool = Map::new();
            tool.insert("name".into(), json!(f.name));
            if let Some(description) = f.description {
                tool.insert("description".into(), json!(description));
            }
            let schema = f.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            tool.insert("input_schema".into(), schema);
            Value::Object(tool)
        })
        .collect();
    let json_declared = json_tool.is_some();
    let choice = match json_tool {
        Some(tool) => {
            tools.insert(0, tool);
            Some(json!({"type": "tool", "name": JSON_TOOL}))
        }
        None if !tools.is_empty() => anthropic_tool_choice(body)?,
        // Only tools the conversation used earlier (declared below): none may be called now.
        None if !called.is_empty() => Some(json!({"type": "none"})),
        None => None,
    };
    // The API refuses `tool_use` / `tool_result` blocks whose tools are not declared, which
    // OpenAI allows: a tool called earlier but no longer offered is declared back, as such.
    // (A conversation may also have called a tool named like [`JSON_TOOL`]: declared back too
    // unless this request declares the JSON tool itself.)
    for name in called.into_iter().filter(|n| !declared_names.contains(n) && (!json_declared || n != JSON_TOOL)) {
        tools.push(json!({"name": name, "description": "Used earlier in this conversation; not offered now.",
            "input_schema": {"type": "object"}}));
    }
    if !tools.is_empty() {
        request.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = choice {
        request.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(request))
}

/// The forced tool for a JSON `response_format`, `None` for text.
fn json_tool(format: ResponseFormat) -> Result<Option<Value>, String> {
    let (schema, description) = match format {
        ResponseFormat::Text => return Ok(None),
        ResponseFormat::JsonObject => (json!({"type": "object"}), None),
        ResponseFormat::JsonSchema { schema, name, description } => {
            let schema = match schema.filter(|s| s.as_object().is_none_or(|o| !o.is_empty())) {
                None => json!({"type": "object"}),
                Some(schema) if schema.get("type").and_then(Value::as_str) == Some("object") => schema,
                Some(_) => {
                    return Err("a `json_schema` whose top level is not an object (a tool's input is one)".into());
                }
            };
            (schema, description.or(name))
        }
    };
    let about = description.map(|d| format!(" It is: {d}")).unwrap_or_default();
    Ok(Some(json!({
        "name": JSON_TOOL,
        "description": format!("Give your whole answer as this tool's input, a JSON object.{about}"),
        "input_schema": schema,
    })))
}

fn anthropic_tool_choice(body: &ChatBody) -> Result<Option<Value>, String> {
    let one_at_a_time = body.get("parallel_tool_calls") == Some(&Value::Bool(false));
    let mut choice = match tool_choice(body)? {
        Some(ToolChoice::None) => return Ok(Some(json!({"type": "none"}))),
        Some(ToolChoice::Auto) => json!({"type": "auto"}),
        Some(ToolChoice::Required) => json!({"type": "any"}),
        Some(ToolChoice::Function(name)) => json!({"type": "tool", "name": name}),
        None if one_at_a_time => json!({"type": "auto"}),
        None => return Ok(None),
    };
    if let (true, Value::Object(fields)) = (one_at_a_time, &mut choice) {
        fields.insert("disable_parallel_tool_use".into(), json!(true));
    }
    Ok(Some(choice))
}

/// A user message: a string stays one; parts become text and image blocks.
fn user_content(message: &Value) -> Result<Value, String> {
    if let Some(Value::String(text)) = message.get("content") {
        return Ok(json!(text));
    }
    let mut blocks = Vec::new();
    for part in content_parts(message)? {
        match part {
            // The API refuses empty text blocks.
            Part::Text(text) if text.is_empty() => {}
            Part::Text(text) => blocks.push(json!({"type": "text", "text": text})),
            Part::Image(Image::Inline { media_type, data }) => {
                if !IMAGE_TYPES.contains(&media_type.as_str()) {
                    return Err(format!("`{media_type}` images"));
                }
                blocks.push(
                    json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
                );
            }
            Part::Image(Image::Url(url)) => {
                blocks.push(json!({"type": "image", "source": {"type": "url", "url": url}}));
            }
        }
    }
    Ok(if blocks.is_empty() { json!("") } else { Value::Array(blocks) })
}

/// An assistant message: its text, and its tool calls as `tool_use` blocks (their names added
/// to `called`).
fn assistant_content(message: &Value, called: &mut BTreeSet<String>) -> Result<Value, String> {
    let text = text_of(message)?;
    let calls = tool_calls(message)?;
    if calls.is_empty() {
        return Ok(json!(text));
    }
    let mut blocks = Vec::new();
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in calls {
        called.insert(call.name.clone());
        blocks.push(json!({"type": "tool_use", "id": block_id(&call.id), "name": call.name, "input": call.arguments}));
    }
    Ok(Value::Array(blocks))
}

fn tool_result(message: &Value) -> Result<Value, String> {
    let id = message.get("tool_call_id").and_then(Value::as_str).ok_or("a tool result without a `tool_call_id`")?;
    Ok(json!({"type": "tool_result", "tool_use_id": block_id(id), "content": text_of(message)?}))
}

/// A tool call id as the API accepts it (`^[a-zA-Z0-9_-]+$`): kept when it already is one, else
/// replaced by a hash of it, the same way for a call and its result, so the pair still matches.
fn block_id(id: &str) -> String {
    let clean =
        !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if clean {
        return id.to_string();
    }
    // Injective where a character-by-character cleaning is not (`call.1` and `call:1` would both
    // become `call_1`, pairing a tool result with the wrong call): a hash of the whole id.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(id.as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("call_h{hex}")
}

/// What reading an answer needs to know of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading<'a> {
    /// The configured model, for an answer that names none.
    pub model: &'a str,
    /// The request asked for JSON through [`JSON_TOOL`]: that tool's input is the answer.
    pub json_tool: bool,
}

impl<'a> Reading<'a> {
    /// A request without JSON output.
    pub fn text(model: &'a str) -> Self {
        Self { model, json_tool: false }
    }

    /// How to read the answer to `body`.
    pub fn of(body: &ChatBody, model: &'a str) -> Self {
        let json_tool =
            matches!(response_format(body), Ok(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }));
        Self { model, json_tool }
    }
}

/// Reads one answer into a `chat.completion` or a classified failure.
pub fn interpret(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    reading: Reading<'_>,
    now: SystemTime,
) -> Result<Completion, Failure> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        return Err(classify(status, headers, &ErrorInfo::read(parsed.as_ref(), body), now));
    }
    let Some(json) = parsed.filter(|j| j.get("type").and_then(Value::as_str) == Some("message")) else {
        return Err(Failure::new(FailureKind::Server, Some(status), "the provider answered 200 without a message"));
    };
    let blocks = json.get("content").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let of_type =
        |kind: &'static str| blocks.iter().filter(move |b| b.get("type").and_then(Value::as_str) == Some(kind));
    let mut text: String = of_type("text").filter_map(|b| b.get("text").and_then(Value::as_str)).collect();
    let uses: Vec<&Value> = of_type("tool_use").collect();
    let stop_reason = json.get("stop_reason").and_then(Value::as_str);
    let json_answer = reading
        .json_tool
        .then(|| uses.iter().find(|b| b.get("name").and_then(Value::as_str) == Some(JSON_TOOL)))
        .flatten();
    let (calls, finish_reason) = if let Some(json_answer) = json_answer {
        // The forced tool's input is the answer; any preamble text is not part of the JSON.
        text = json_answer.get("input").map_or_else(|| "{}".to_string(), Value::to_string);
        (Vec::new(), if stop_reason == Some("max_tokens") { "length" } else { "stop" })
    } else {
        let calls = uses.iter().map(|b| call_out(b)).collect::<Option<Vec<_>>>().ok_or_else(|| {
            Failure::new(FailureKind::Server, Some(status), "the provider answered a tool_use block without a name")
        })?;
        let finish_reason = match stop_reason {
            _ if !calls.is_empty() => "tool_calls",
            Some("max_tokens") => "length",
            Some("refusal") => "content_filter",
            _ => "stop",
        };
        (calls, finish_reason)
    };
    let count = |key: &str| json.pointer(&format!("/usage/{key}")).and_then(Value::as_u64).unwrap_or(0);
    let usage = Usage::new(count("input_tokens"), count("output_tokens"), None);
    let id = json.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let request_id =
        headers.get("request-id").and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_else(|| id.clone());
    let model = json.get("model").and_then(Value::as_str).unwrap_or(reading.model);
    let body = Answer { id: &id, model, text, tool_calls: calls, finish_reason, usage }.into_chat_completion(now);
    Ok(Completion {
        status,
        request_id,
        body,
        total_tokens: usage.map(|u| u.total_tokens),
        exhausted_until: retry_info::exhausted_reset(headers, now),
        quota: super::quota_headers::observe(headers, now),
    })
}

/// A `tool_use` block as an OpenAI tool call; `None` when it names no tool.
fn call_out(block: &Value) -> Option<CallOut> {
    let name = block.get("name")?.as_str()?.to_string();
    let arguments = super::translate::arguments_text(block.get("input"));
    let id =
        block.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()).map_or_else(new_call_id, str::to_string);
    Some(CallOut { id, name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::*;
    use std::time::Duration;

    const TEXT: Reading<'static> = Reading { model: "configured-model", json_tool: false };

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
        assert_eq!(request_body(&body(json!({"messages": [], "logprobs": true})), "m").unwrap_err(), "`logprobs`");
        assert_eq!(request_body(&body(json!({"messages": [], "tools": []})), "m").unwrap().get("tools"), None);
    }

    /// The tool-use guide's request, from its OpenAI equivalent: declared tools, a named choice
    /// with parallel calls off, the model's call and the tool's result, then images.
    #[test]
    fn tools_tool_turns_and_images_become_content_blocks() {
        let request = request_body(
            &body(json!({
                "messages": [
                    {"role": "user", "content": "What's the weather like in San Francisco?"},
                    {"role": "assistant", "content": "I'll check.", "tool_calls": [
                        {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"San Francisco, CA\"}"}},
                        {"id": "call.2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
                    {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "noon"}]},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Describe these."},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/a.jpg"}}]}
                ],
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given location",
                    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
                    {"type": "function", "function": {"name": "get_time"}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": false
            })),
            "claude-sonnet-4-5",
        )
        .unwrap();
        assert_eq!(
            request["tools"],
            json!([{"name": "get_weather", "description": "Get the current weather in a given location",
                    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
                   {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}])
        );
        assert_eq!(
            request["tool_choice"],
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
        );
        let turns = request["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 4, "both results go back in one user turn: {turns:?}");
        assert_eq!(
            turns[1],
            json!({"role": "assistant", "content": [
                {"type": "text", "text": "I'll check."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA"}},
                {"type": "tool_use", "id": block_id("call.2"), "name": "get_time", "input": {}}]})
        );
        assert_eq!(
            turns[2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
                {"type": "tool_result", "tool_use_id": block_id("call.2"), "content": "noon"}]})
        );
        assert_eq!(
            turns[3]["content"],
            json!([{"type": "text", "text": "Describe these."},
                   {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                   {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/a.jpg"}}])
        );
    }

    #[test]
    fn tool_call_ids_that_clean_alike_stay_apart() {
        assert_eq!(block_id("call_1"), "call_1");
        assert_eq!(block_id("toolu-01"), "toolu-01");
        let (dot, colon) = (block_id("call.1"), block_id("call:1"));
        assert_ne!(dot, colon);
        assert_ne!(dot, "call_1");
        for id in [&dot, &colon] {
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "{id}");
        }
        assert_eq!(block_id("call.1"), dot, "a call and its result map alike");
    }

    #[test]
    fn tools_called_earlier_but_not_offered_now_are_declared_and_not_callable() {
        let request = request_body(
            &body(json!({"messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "user", "content": "Summarise in one word."}]})),
            "m",
        )
        .unwrap();
        assert_eq!(request["tools"][0]["name"], "get_weather");
        assert_eq!(request["tools"][0]["input_schema"], json!({"type": "object"}));
        assert_eq!(request["tool_choice"], json!({"type": "none"}));
        let plain = request_body(&body(json!({"messages": [{"role": "user", "content": "x"}]})), "m").unwrap();
        assert_eq!((plain.get("tools"), plain.get("tool_choice")), (None, None));
        // Found by the property test: an earlier call to a tool named like the JSON tool.
        let named_like_json = request_body(
            &body(json!({"messages": [
                {"role": "assistant", "content": [], "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": JSON_TOOL, "arguments": "{}"}}]},
                {"role": "user", "content": "x"}]})),
            "m",
        )
        .unwrap();
        assert_eq!(named_like_json["tools"][0]["name"], JSON_TOOL);
    }

    #[test]
    fn tool_choice_becomes_anthropics() {
        let with = |extra: Value| {
            let mut job = json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]});
            job.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            request_body(&body(job), "m").unwrap()["tool_choice"].clone()
        };
        assert_eq!(with(json!({"tool_choice": "auto"})), json!({"type": "auto"}));
        assert_eq!(with(json!({"tool_choice": "required"})), json!({"type": "any"}));
        assert_eq!(with(json!({"tool_choice": "none"})), json!({"type": "none"}));
        assert_eq!(with(json!({})), Value::Null, "the API's default (auto)");
        assert_eq!(
            with(json!({"parallel_tool_calls": false})),
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn json_output_is_a_forced_tool() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
        let request = request_body(
            &body(json!({"messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "description": "a person", "schema": schema}}})),
            "m",
        )
        .unwrap();
        assert_eq!(request["tools"][0]["name"], JSON_TOOL);
        assert_eq!(request["tools"][0]["input_schema"], schema);
        assert!(request["tools"][0]["description"].as_str().unwrap().ends_with("It is: a person"));
        assert_eq!(request["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));
        let object = request_body(
            &body(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})),
            "m",
        )
        .unwrap();
        assert_eq!(object["tools"][0]["input_schema"], json!({"type": "object"}));
        let text = request_body(
            &body(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}})),
            "m",
        )
        .unwrap();
        assert_eq!(text.get("tools"), None);

        let refused = |job: Value| request_body(&body(job), "m").unwrap_err();
        assert!(refused(json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "array", "items": {}}}}}))
            .contains("top level is not an object"));
        assert!(refused(json!({"messages": [], "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}]}))
            .contains("together with `tools`"));
        assert!(refused(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}))
            .contains("`image/tiff` images"));
        assert!(refused(json!({"messages": [{"role": "tool", "content": "x"}]})).contains("without a `tool_call_id`"));
    }

    /// The tool-use guide's answer.
    #[test]
    fn tool_use_blocks_become_tool_calls() {
        let answer = json!({"id": "msg_01Aq9w938a90dw8q", "type": "message", "model": "claude-sonnet-4-5", "stop_reason": "tool_use", "role": "assistant",
            "content": [{"type": "text", "text": "I need to use get_weather."},
                        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "celsius"}}],
            "usage": {"input_tokens": 50, "output_tokens": 20}});
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), TEXT, now()).unwrap();
        let choice = &done.body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "I need to use get_weather.");
        assert_eq!(
            choice["message"]["tool_calls"],
            json!([{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"}}])
        );
        assert_eq!(crate::providers::shape::chat_completion_problems(&done.body), Vec::<String>::new());
        let nameless = json!({"type": "message", "content": [{"type": "tool_use", "id": "t", "input": {}}], "stop_reason": "tool_use"});
        assert_eq!(
            interpret(200, &HeaderMap::new(), nameless.to_string().as_bytes(), TEXT, now()).unwrap_err().kind,
            FailureKind::Server
        );
    }

    #[test]
    fn the_forced_tools_input_is_the_json_content() {
        let answer = json!({"id": "msg_02", "type": "message", "role": "assistant", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Here it is:"}, {"type": "tool_use", "id": "toolu_02", "name": JSON_TOOL, "input": {"name": "Ada"}}],
            "usage": {"input_tokens": 9, "output_tokens": 6}});
        let json_reading = Reading { model: "configured-model", json_tool: true };
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), json_reading, now()).unwrap();
        let choice = &done.body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["content"], "{\"name\":\"Ada\"}");
        assert_eq!(choice["message"].get("tool_calls"), None);
        assert_eq!(done.body["model"], "configured-model", "an answer without a model names the configured one");
        assert_eq!(crate::providers::shape::chat_completion_problems(&done.body), Vec::<String>::new());
        // Read without the JSON expectation, the same answer is a call of that tool.
        let plain = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), TEXT, now()).unwrap();
        assert_eq!(plain.body["choices"][0]["finish_reason"], "tool_calls");
        let mut cut = answer.clone();
        cut["stop_reason"] = json!("max_tokens");
        let cut = interpret(200, &HeaderMap::new(), cut.to_string().as_bytes(), json_reading, now()).unwrap();
        assert_eq!(cut.body["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn messages_become_chat_completions() {
        let answer = json!({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Bonjour"}], "stop_reason": "max_tokens", "usage": {"input_tokens": 12, "output_tokens": 4}});
        let done =
            interpret(200, &headers(&[("request-id", "req_011")]), answer.to_string().as_bytes(), TEXT, now()).unwrap();
        assert_eq!(done.request_id, "req_011");
        assert_eq!(done.body["choices"][0]["message"]["content"], "Bonjour");
        assert_eq!(done.body["choices"][0]["finish_reason"], "length");
        assert_eq!(done.body["usage"]["total_tokens"], 16);
        assert_eq!(done.body["model"], "claude-sonnet-4-5");
    }

    #[test]
    fn errors_follow_the_reference() {
        let fail = |status, hdrs: &[(&str, &str)], text: &str| {
            interpret(status, &headers(hdrs), text.as_bytes(), TEXT, now()).unwrap_err()
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
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), TEXT, now()).unwrap();
        assert_eq!(done.total_tokens, None);
        assert_eq!(done.body.get("usage"), None);
    }

    #[test]
    fn a_withdrawn_model_is_model_unavailable() {
        let gone = r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-3-5-sonnet-20241022"},"request_id":"req_011CVfG3PpZSwfcTNx5NJCWZ"}"#;
        let failure = interpret(404, &HeaderMap::new(), gone.as_bytes(), TEXT, now()).unwrap_err();
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
            TEXT,
            now(),
        );
        assert_eq!(limited.unwrap_err().kind, FailureKind::RateLimited);
    }
}
