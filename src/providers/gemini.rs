//! Google AI Studio's native dialect: `{base_url}/models/{model}:generateContent`, key in the
//! `x-goog-api-key` header (never in the URL, where it would reach logs).
//!
//! Translates an OpenAI chat request into `contents` / `systemInstruction` / `generationConfig`
//! / `tools` / `toolConfig`, and the answer back into a `chat.completion`:
//! - images: a `data:` URL becomes `inline_data`, an `https` URL `file_data`;
//! - tools: `functionDeclarations` (parameters through [`gemini_schema`]), `tool_choice` as
//!   `functionCallingConfig` (AUTO / NONE / ANY, a named tool as `allowedFunctionNames`);
//!   assistant tool calls become `functionCall` parts and tool results `functionResponse` parts
//!   (Gemini pairs them by function name, so a result takes the name of the call it answers);
//! - JSON: `responseMimeType: application/json`, plus `responseSchema` for a `json_schema`;
//! - answers: `functionCall` parts become `tool_calls` with `finish_reason: "tool_calls"`.
//!
//! Safety blocks (a 200 without text) are client errors: this prompt will not pass here, the
//! next provider may answer it.

use std::collections::HashMap;
use std::time::SystemTime;

use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

use super::errors::{ErrorInfo, classify};
use super::gemini_schema;
use super::translate::{
    Answer, CallOut, Image, Part, ResponseFormat, ToolChoice, Usage, content_parts, functions, max_tokens,
    media_type_of_url, messages, new_call_id, refuse_unsupported, response_format, role, stop_sequences, text_of,
    tool_calls, tool_choice,
};
use super::{Completion, Failure, FailureKind, retry_info};
use crate::job::ChatBody;

/// Request fields this dialect cannot carry; a job using one skips the provider.
const UNSUPPORTED: &[&str] = &["functions", "function_call", "logprobs", "top_logprobs"];

/// The thought signature Google documents for function calls that the model did not produce
/// itself (a conversation carried over from another model): Gemini 3 refuses a `functionCall`
/// part of the history without one, and this job's calls were made elsewhere.
const FOREIGN_CALL_SIGNATURE: &str = "skip_thought_signature_validator";

/// The `generateContent` body, or the name of what cannot be translated.
pub fn request_body(body: &ChatBody) -> Result<Value, String> {
    refuse_unsupported(body, UNSUPPORTED)?;
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // A tool result names its call only by id; Gemini pairs a response with its call by name.
    let mut call_names: HashMap<String, String> = HashMap::new();
    let mut after_tool_result = false;
    for message in messages(body) {
        let role = role(message);
        let is_tool_result = role == "tool";
        match role {
            "system" | "developer" => system.push(json!({"text": text_of(message)?})),
            "user" => contents.push(json!({"role": "user", "parts": user_parts(message)?})),
            "assistant" => contents.push(json!({"role": "model", "parts": model_parts(message, &mut call_names)?})),
            "tool" => {
                let part = function_response(message, &call_names)?;
                // All the results of one turn's calls go back in one content, in order.
                match contents.last_mut().and_then(|c| c.get_mut("parts")).and_then(Value::as_array_mut) {
                    Some(parts) if after_tool_result => parts.push(part),
                    _ => contents.push(json!({"role": "user", "parts": [part]})),
                }
            }
            other => return Err(format!("`{other}` messages")),
        }
        after_tool_result = is_tool_result;
    }
    let mut request = Map::new();
    request.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        request.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let declarations = function_declarations(body)?;
    let json_output = !matches!(response_format(body)?, ResponseFormat::Text);
    if !declarations.is_empty() && json_output {
        // Gemini (2.x) answers a JSON response type together with function declarations with
        // a 400: no call should be spent finding that out.
        return Err("`response_format` together with `tools`".into());
    }
    if !declarations.is_empty() {
        request.insert("tools".into(), json!([{"functionDeclarations": declarations}]));
        if let Some(config) = function_calling_config(body)? {
            request.insert("toolConfig".into(), json!({"functionCallingConfig": config}));
        }
    }
    let config = generation_config(body)?;
    if !config.is_empty() {
        request.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(request))
}

fn user_parts(message: &Value) -> Result<Vec<Value>, String> {
    let parts: Vec<Value> = content_parts(message)?
        .into_iter()
        .map(|part| match part {
            Part::Text(text) => json!({"text": text}),
            Part::Image(Image::Inline { media_type, data }) => {
                json!({"inline_data": {"mime_type": media_type, "data": data}})
            }
            Part::Image(Image::Url(url)) => match media_type_of_url(&url) {
                Some(media_type) => json!({"file_data": {"mime_type": media_type, "file_uri": url}}),
                None => json!({"file_data": {"file_uri": url}}),
            },
        })
        .collect();
    // Gemini refuses a content without parts; an empty message stays an empty text.
    Ok(if parts.is_empty() { vec![json!({"text": ""})] } else { parts })
}

fn model_parts(message: &Value, call_names: &mut HashMap<String, String>) -> Result<Vec<Value>, String> {
    let text = text_of(message)?;
    let calls = tool_calls(message)?;
    let mut parts = Vec::new();
    if !text.is_empty() || calls.is_empty() {
        parts.push(json!({"text": text}));
    }
    for call in calls {
        call_names.insert(call.id, call.name.clone());
        parts.push(json!({"functionCall": {"name": call.name, "args": call.arguments}, "thoughtSignature": FOREIGN_CALL_SIGNATURE}));
    }
    Ok(parts)
}

fn function_response(message: &Value, call_names: &HashMap<String, String>) -> Result<Value, String> {
    let by_id = message.get("tool_call_id").and_then(Value::as_str).and_then(|id| call_names.get(id));
    let name = by_id
        .map(String::as_str)
        .or_else(|| message.get("name").and_then(Value::as_str))
        .ok_or("a tool result whose call is not in the conversation")?;
    let text = text_of(message)?;
    // Gemini wants an object; a result that is one is passed as is, anything else is its
    // documented `output` key.
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(object)) => Value::Object(object),
        Ok(other) => json!({"output": other}),
        Err(_) => json!({"output": text}),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
}

fn function_declarations(body: &ChatBody) -> Result<Vec<Value>, String> {
    functions(body)?
        .into_iter()
        .map(|function| {
            let mut declaration = Map::new();
            declaration.insert("name".into(), json!(function.name));
            if let Some(description) = function.description {
                declaration.insert("description".into(), json!(description));
            }
            // Gemini refuses an OBJECT without properties: a function without arguments is
            // declared without `parameters`.
            if let Some(parameters) = function.parameters.filter(|p| !gemini_schema::is_empty_object(p)) {
                let converted = gemini_schema::convert(&parameters)
                    .map_err(|what| format!("tool `{}` parameters with {what}", function.name))?;
                declaration.insert("parameters".into(), converted);
            }
            Ok(Value::Object(declaration))
        })
        .collect()
}

fn function_calling_config(body: &ChatBody) -> Result<Option<Value>, String> {
    Ok(tool_choice(body)?.map(|choice| match choice {
        ToolChoice::Auto => json!({"mode": "AUTO"}),
        ToolChoice::None => json!({"mode": "NONE"}),
        ToolChoice::Required => json!({"mode": "ANY"}),
        ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
    }))
}

fn generation_config(body: &ChatBody) -> Result<Map<String, Value>, String> {
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
    match response_format(body)? {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        ResponseFormat::JsonSchema { schema, .. } => {
            config.insert("responseMimeType".into(), json!("application/json"));
            // No schema, or `{}`: any JSON, which is JSON mode.
            if let Some(schema) = schema.filter(|s| s.as_object().is_none_or(|o| !o.is_empty())) {
                let converted = gemini_schema::convert(&schema).map_err(|what| {
                    format!("a `json_schema` with {what} (Gemini's responseSchema cannot express it)")
                })?;
                config.insert("responseSchema".into(), converted);
            }
        }
    }
    Ok(config)
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
    let parts = candidate.pointer("/content/parts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let answered: Vec<&Value> = parts.iter().filter(|p| p.get("thought") != Some(&Value::Bool(true))).collect();
    let text: String = answered.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
    let calls =
        answered.iter().filter_map(|p| p.get("functionCall")).map(call_out).collect::<Option<Vec<_>>>().ok_or_else(
            || Failure::new(FailureKind::Server, Some(status), "the provider answered a function call without a name"),
        )?;
    let reason = candidate.get("finishReason").and_then(Value::as_str).unwrap_or("STOP");
    let finish_reason = match reason {
        _ if !calls.is_empty() => "tool_calls",
        "STOP" => "stop",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => "content_filter",
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" => {
            // The model failed at this request's tools: the next provider may not.
            return Err(Failure::new(
                FailureKind::Client,
                Some(status),
                format!("the model's tool call failed ({reason})"),
            ));
        }
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
    let body = Answer { id: &id, model, text, tool_calls: calls, finish_reason, usage }.into_chat_completion(now);
    Ok(Completion {
        status,
        request_id: id,
        body,
        total_tokens: usage.map(|u| u.total_tokens),
        exhausted_until: retry_info::exhausted_reset(headers, now),
        quota: super::quota_headers::observe(headers, now),
    })
}

/// A `functionCall` part as an OpenAI tool call; `None` when it names no function. Arguments
/// are written back as JSON text (`{}` when the model gave none).
fn call_out(call: &Value) -> Option<CallOut> {
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = super::translate::arguments_text(call.get("args"));
    let id =
        call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()).map_or_else(new_call_id, str::to_string);
    Some(CallOut { id, name, arguments })
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
        let logprobs = body(json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}));
        assert_eq!(request_body(&logprobs).unwrap_err(), "`logprobs`");
        let image = body(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        );
        assert!(request_body(&image).unwrap_err().contains("neither `https://` nor `data:`"));
        let audio =
            body(json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}));
        assert_eq!(request_body(&audio).unwrap_err(), "`input_audio` content parts");
        let orphan = body(
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]}),
        );
        assert_eq!(request_body(&orphan).unwrap_err(), "a tool result whose call is not in the conversation");
        let map = body(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": {"type": "object", "additionalProperties": {"type": "integer"}}}}}));
        let refused = request_body(&map).unwrap_err();
        assert!(
            refused.starts_with("a `json_schema` with `additionalProperties` with a schema (a map) at `/`"),
            "{refused}"
        );
        let tool = body(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"v": {"not": {"type": "string"}}}}}}]}));
        assert_eq!(request_body(&tool).unwrap_err(), "tool `f` parameters with `not` at `/properties/v`");
        let both =
            body(json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f"}}]}));
        assert_eq!(request_body(&both).unwrap_err(), "`response_format` together with `tools`");
    }

    /// The request of Gemini's function-calling guide, from its OpenAI equivalent: a declared
    /// function, a forced choice, the model's call and the function's result, then an image.
    #[test]
    fn tools_tool_turns_and_images_become_gemini_parts() {
        let request = request_body(&body(json!({
            "messages": [
                {"role": "user", "content": "What's the weather in Boston and Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Boston, MA\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 22, \"unit\": \"celsius\"}"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rainy"},
                {"role": "user", "content": [
                    {"type": "text", "text": "And in these pictures?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
                    {"type": "image_url", "image_url": {"url": "https://example.org/sky.png", "detail": "low"}}]}
            ],
            "tools": [{"type": "function", "function": {"name": "get_current_weather", "description": "Get the current weather in a given location",
                "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}},
                {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}}
        })))
        .unwrap();
        assert_eq!(
            request["tools"],
            json!([{"functionDeclarations": [
                {"name": "get_current_weather", "description": "Get the current weather in a given location",
                 "parameters": {"type": "OBJECT", "properties": {
                     "location": {"type": "STRING", "description": "The city and state, e.g. San Francisco, CA"},
                     "unit": {"type": "STRING", "format": "enum", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}},
                {"name": "now"}]}])
        );
        assert_eq!(
            request["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_current_weather"]}})
        );
        let contents = request["contents"].as_array().unwrap();
        assert_eq!(contents.len(), 4, "the two results share one turn: {contents:?}");
        assert_eq!(
            contents[1],
            json!({"role": "model", "parts": [
                {"functionCall": {"name": "get_current_weather", "args": {"location": "Boston, MA"}}, "thoughtSignature": FOREIGN_CALL_SIGNATURE},
                {"functionCall": {"name": "get_current_weather", "args": {"location": "Paris"}}, "thoughtSignature": FOREIGN_CALL_SIGNATURE}]})
        );
        assert_eq!(
            contents[2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_current_weather", "response": {"temperature": 22, "unit": "celsius"}}},
                {"functionResponse": {"name": "get_current_weather", "response": {"output": "rainy"}}}]})
        );
        assert_eq!(
            contents[3]["parts"],
            json!([{"text": "And in these pictures?"},
                   {"inline_data": {"mime_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
                   {"file_data": {"mime_type": "image/png", "file_uri": "https://example.org/sky.png"}}])
        );
    }

    #[test]
    fn tool_choice_becomes_a_calling_mode() {
        let with = |choice: Value| {
            let request = request_body(&body(json!({"messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": choice})))
            .unwrap();
            request["toolConfig"]["functionCallingConfig"].clone()
        };
        assert_eq!(with(json!("auto")), json!({"mode": "AUTO"}));
        assert_eq!(with(json!("none")), json!({"mode": "NONE"}));
        assert_eq!(with(json!("required")), json!({"mode": "ANY"}));
        assert_eq!(with(Value::Null), Value::Null, "no tool_choice: Gemini's default (AUTO)");
    }

    #[test]
    fn a_json_schema_becomes_a_response_schema() {
        let request = request_body(&body(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "recipe", "strict": true, "schema": {
                "type": "object", "properties": {"name": {"type": "string"}, "steps": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "steps"], "additionalProperties": false}}}})))
        .unwrap();
        assert_eq!(
            request["generationConfig"],
            json!({"responseMimeType": "application/json", "responseSchema": {"type": "OBJECT",
                "properties": {"name": {"type": "STRING"}, "steps": {"type": "ARRAY", "items": {"type": "STRING"}}}, "required": ["name", "steps"]}})
        );
    }

    /// The answer shape of Gemini's function-calling guide.
    #[test]
    fn function_calls_become_tool_calls() {
        let answer = json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "Let me check."},
                {"functionCall": {"name": "get_current_weather", "args": {"location": "Boston, MA"}}, "thoughtSignature": "c2ln"},
                {"functionCall": {"id": "fc_2", "name": "now"}}]},
            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 70, "candidatesTokenCount": 20, "totalTokenCount": 90}, "modelVersion": "gemini-2.5-flash"});
        let done = interpret(200, &HeaderMap::new(), answer.to_string().as_bytes(), "m", now()).unwrap();
        let choice = &done.body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Let me check.");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(
            calls[0]["function"],
            json!({"name": "get_current_weather", "arguments": "{\"location\":\"Boston, MA\"}"})
        );
        assert_eq!(calls[1]["id"], "fc_2");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_eq!(crate::providers::shape::chat_completion_problems(&done.body), Vec::<String>::new());

        let only_call = json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "STOP"}]});
        let done = interpret(200, &HeaderMap::new(), only_call.to_string().as_bytes(), "m", now()).unwrap();
        assert_eq!(done.body["choices"][0]["message"]["content"], Value::Null);

        let nameless =
            json!({"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}, "finishReason": "STOP"}]});
        let failure = interpret(200, &HeaderMap::new(), nameless.to_string().as_bytes(), "m", now()).unwrap_err();
        assert_eq!(failure.kind, FailureKind::Server);
        let malformed = json!({"candidates": [{"content": {"parts": []}, "finishReason": "MALFORMED_FUNCTION_CALL"}]});
        let failure = interpret(200, &HeaderMap::new(), malformed.to_string().as_bytes(), "m", now()).unwrap_err();
        assert_eq!(failure.kind, FailureKind::Client);
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
