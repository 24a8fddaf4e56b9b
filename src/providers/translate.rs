//! Pieces every non-OpenAI dialect needs to translate a chat request and write its answer back.
//!
//! Reading the OpenAI request is done once here (content parts, images, tool calls, declared
//! functions, `tool_choice`), into small neutral types each dialect writes out its own way.
//! Everything comes from the job, so every reader returns what it cannot read instead of
//! guessing: the provider is then skipped (`skipped_capability`) rather than sent a request that
//! silently drops part of the job.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::job::ChatBody;

/// Refuses a request using one of `fields` (or `n` > 1): names what cannot be carried, so the
/// provider is skipped instead of sent something it would misread.
pub fn refuse_unsupported(body: &ChatBody, fields: &[&str]) -> Result<(), String> {
    if let Some(field) = fields.iter().find(|f| body.get(**f).is_some_and(|v| !v.is_null())) {
        return Err(format!("`{field}`"));
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err("`n` > 1".into());
    }
    Ok(())
}

/// The job's messages (validated non-empty by the envelope; empty here only in unit tests).
pub fn messages(body: &ChatBody) -> &[Value] {
    body.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

/// A message's role (`user` when it names none: the envelope refuses that, tests need not).
pub fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("user")
}

/// A message's text: a string, or the concatenation of its text parts (`None` for images etc.).
pub fn message_text(message: &Value) -> Option<String> {
    match message.get("content") {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text" | "refusal") | None => {
                    p.get("text").or_else(|| p.get("refusal")).and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|texts| texts.join("")),
        None | Some(Value::Null) => Some(String::new()),
        _ => None,
    }
}

/// A message's text, or an error naming the role whose content is not text.
pub fn text_of(message: &Value) -> Result<String, String> {
    message_text(message).ok_or_else(|| format!("{} content that is not text", role(message)))
}

/// One piece of a user message, in neutral form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Image(Image),
}

/// An `image_url` part: inline bytes from a `data:` URL, or a URL the provider fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// A `data:<media type>;base64,<data>` URL, split.
    Inline { media_type: String, data: String },
    /// An `http(s)://` URL.
    Url(String),
}

/// The parts of a message's content: a string is one text part, `null` none. An error names a
/// part this service does not translate (audio, files) or an image it cannot read.
pub fn content_parts(message: &Value) -> Result<Vec<Part>, String> {
    match message.get("content") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![Part::Text(text.clone())]),
        Some(Value::Array(parts)) => parts.iter().map(part).collect(),
        Some(_) => Err(format!("{} content that is neither text nor parts", role(message))),
    }
}

fn part(part: &Value) -> Result<Part, String> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") | None => match part.get("text") {
            Some(Value::String(text)) => Ok(Part::Text(text.clone())),
            _ => Err("a text part without text".into()),
        },
        Some("image_url") => {
            // `{"url": ...}` as documented; a bare string as some clients send it.
            let url = part.get("image_url").and_then(|i| i.get("url").or(Some(i))).and_then(Value::as_str);
            image(url.ok_or("an `image_url` part without a URL")?).map(Part::Image)
        }
        Some(other) => Err(format!("`{other}` content parts")),
    }
}

/// Reads an image URL: a base64 `data:` URL or an `http(s)` URL.
pub fn image(url: &str) -> Result<Image, String> {
    if let Some(rest) = strip_prefix_ignore_case(url, "data:") {
        let (header, data) = rest.split_once(',').ok_or("a `data:` image URL without data")?;
        let media_type = strip_suffix_ignore_case(header, ";base64")
            .ok_or("a `data:` image URL that is not base64")?
            .trim()
            .to_ascii_lowercase();
        if media_type.is_empty() {
            return Err("a `data:` image URL without a media type".into());
        }
        return Ok(Image::Inline { media_type, data: data.to_string() });
    }
    if strip_prefix_ignore_case(url, "https://").or_else(|| strip_prefix_ignore_case(url, "http://")).is_some() {
        return Ok(Image::Url(url.to_string()));
    }
    Err("an image URL that is neither `https://` nor `data:`".into())
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| text.get(prefix.len()..)).flatten()
}

fn strip_suffix_ignore_case<'a>(text: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = text.len().checked_sub(suffix.len())?;
    let tail = text.get(cut..)?;
    tail.eq_ignore_ascii_case(suffix).then(|| text.get(..cut)).flatten()
}

/// The media type an image URL's extension names, when it names a common one.
pub fn media_type_of_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
    match extension.as_str() {
        "jpg" | "jpeg" => Some("image/jpeg"),
        "png" => Some("image/png"),
        "gif" => Some("image/gif"),
        "webp" => Some("image/webp"),
        "heic" => Some("image/heic"),
        "heif" => Some("image/heif"),
        _ => None,
    }
}

/// One tool call of an assistant message, its arguments parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The parsed `function.arguments`: always a JSON object (both dialects require one).
    pub arguments: Map<String, Value>,
}

/// The tool calls of an assistant message (none when it has no `tool_calls`).
pub fn tool_calls(message: &Value) -> Result<Vec<ToolCall>, String> {
    let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) else {
        return Ok(Vec::new());
    };
    let calls = calls.as_array().ok_or("`tool_calls` that is not a list")?;
    calls
        .iter()
        .map(|call| {
            if call.get("type").and_then(Value::as_str).is_some_and(|t| t != "function") {
                return Err("a tool call that is not a function call".to_string());
            }
            let id = call.get("id").and_then(Value::as_str).ok_or("a tool call without an `id`")?;
            let name = call.pointer("/function/name").and_then(Value::as_str).ok_or("a tool call without a name")?;
            let arguments = match call.pointer("/function/arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::String(text)) if text.trim().is_empty() => Map::new(),
                Some(Value::String(text)) => match serde_json::from_str(text) {
                    Ok(Value::Object(arguments)) => arguments,
                    _ => return Err(format!("tool call `{name}` arguments that are not a JSON object")),
                },
                Some(Value::Object(arguments)) => arguments.clone(),
                Some(_) => return Err(format!("tool call `{name}` arguments that are not a JSON object")),
            };
            Ok(ToolCall { id: id.to_string(), name: name.to_string(), arguments })
        })
        .collect()
}

/// A declared function (`tools[].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// Its JSON Schema, when it has one.
    pub parameters: Option<Value>,
}

/// The job's declared functions (none when it declares no `tools`).
pub fn functions(body: &ChatBody) -> Result<Vec<Function>, String> {
    let Some(tools) = body.get("tools").filter(|t| !t.is_null()) else {
        return Ok(Vec::new());
    };
    let tools = tools.as_array().ok_or("`tools` that is not a list")?;
    tools
        .iter()
        .map(|tool| {
            match tool.get("type").and_then(Value::as_str) {
                Some("function") | None => {}
                Some(other) => return Err(format!("`{other}` tools")),
            }
            let function = tool.get("function").ok_or("a tool without a `function`")?;
            let name = function.get("name").and_then(Value::as_str).ok_or("a function without a name")?;
            // The Gemini and Anthropic APIs refuse other names with a 400 (after the call took its
            // quota slot): saying so here makes it a capability skip before admission.
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(format!(
                    "a function name outside [A-Za-z0-9_-]{{1,64}} (`{}`)",
                    crate::providers::short_message(name)
                ));
            }
            Ok(Function {
                name: name.to_string(),
                description: function.get("description").and_then(Value::as_str).map(str::to_string),
                parameters: function.get("parameters").filter(|p| !p.is_null()).cloned(),
            })
        })
        .collect()
}

/// `tool_choice`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    /// `"required"`: some tool must be called.
    Required,
    /// `{"type": "function", "function": {"name": ...}}`: this one.
    Function(String),
}

/// The job's `tool_choice`, `None` when it set none.
pub fn tool_choice(body: &ChatBody) -> Result<Option<ToolChoice>, String> {
    match body.get("tool_choice") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(format!("`tool_choice` `{other}`")),
        },
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if choice.get("type").and_then(Value::as_str).is_none_or(|t| t == "function") => {
                Ok(Some(ToolChoice::Function(name.to_string())))
            }
            _ => Err("a `tool_choice` that names no function".into()),
        },
    }
}

/// What the job asked of `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    /// `json_schema`: the schema (`None` when the job gave none), its name and description.
    JsonSchema {
        schema: Option<Value>,
        name: Option<String>,
        description: Option<String>,
    },
}

/// The job's `response_format` (`Text` when it set none).
pub fn response_format(body: &ChatBody) -> Result<ResponseFormat, String> {
    let Some(format) = body.get("response_format").filter(|f| !f.is_null()) else {
        return Ok(ResponseFormat::Text);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let spec = format.get("json_schema");
            let text = |key: &str| spec.and_then(|s| s.get(key)).and_then(Value::as_str).map(str::to_string);
            Ok(ResponseFormat::JsonSchema {
                schema: spec.and_then(|s| s.get("schema")).filter(|s| !s.is_null()).cloned(),
                name: text("name"),
                description: text("description"),
            })
        }
        Some(other) => Err(format!("`response_format` type `{other}`")),
        None => Err("a `response_format` without a type".into()),
    }
}

/// `stop` as a list (OpenAI accepts a string or an array).
pub fn stop_sequences(body: &ChatBody) -> Option<Value> {
    match body.get("stop") {
        Some(Value::String(s)) => Some(Value::Array(vec![Value::String(s.clone())])),
        Some(Value::Array(list)) => Some(Value::Array(list.clone())),
        _ => None,
    }
}

/// The completion budget field, whichever name the job used.
pub fn max_tokens(body: &ChatBody) -> Option<&Value> {
    body.get("max_completion_tokens").or_else(|| body.get("max_tokens")).filter(|v| !v.is_null())
}

/// A tool call the provider made, to be written as an OpenAI `tool_calls` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOut {
    pub id: String,
    pub name: String,
    /// `function.arguments`: JSON text, as OpenAI sends it (a string, not an object).
    pub arguments: String,
}

/// A fresh OpenAI-style tool call id, for providers that give their calls none.
/// A tool call's arguments as the JSON text an OpenAI answer carries: the text itself, `{}` for
/// none (absent, null, blank: a function without parameters), or the JSON a dialect gave them
/// in (Anthropic's `input`, Gemini's `args`) written out.
pub fn arguments_text(arguments: Option<&Value>) -> String {
    match arguments {
        Some(Value::String(text)) if !text.trim().is_empty() => text.clone(),
        None | Some(Value::Null | Value::String(_)) => "{}".to_string(),
        Some(json) => json.to_string(),
    }
}

pub fn new_call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// What a translated answer says, to be written as an OpenAI `chat.completion`.
pub struct Answer<'a> {
    pub id: &'a str,
    /// Always a string: the official SDK's `ChatCompletion.model` is one.
    pub model: &'a str,
    pub text: String,
    /// The calls the model made; with any, `content` is `null` when there is no text.
    pub tool_calls: Vec<CallOut>,
    pub finish_reason: &'a str,
    /// `None` when the provider reported none, or counts that cannot be true.
    pub usage: Option<Usage>,
}

/// Token counts in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    /// The counts a provider reported (`total` when it gave one, else the sum); `None` when the
    /// sum does not fit a u64: a broken or hostile answer, whose counts must not correct the
    /// shared token budgets.
    pub fn new(prompt_tokens: u64, completion_tokens: u64, total: Option<u64>) -> Option<Usage> {
        let total_tokens = match total {
            Some(total) => total,
            None => prompt_tokens.checked_add(completion_tokens)?,
        };
        Some(Usage { prompt_tokens, completion_tokens, total_tokens })
    }
}

impl Answer<'_> {
    pub fn into_chat_completion(self, now: SystemTime) -> Value {
        let content = if self.text.is_empty() && !self.tool_calls.is_empty() { Value::Null } else { json!(self.text) };
        let mut message = json!({"role": "assistant", "content": content});
        if !self.tool_calls.is_empty()
            && let Value::Object(fields) = &mut message
        {
            let calls = self
                .tool_calls
                .into_iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect();
            fields.insert("tool_calls".into(), Value::Array(calls));
        }
        let mut completion = json!({
            "id": format!("chatcmpl-{}", self.id),
            "object": "chat.completion",
            "created": now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
        });
        if let (Some(usage), Value::Object(fields)) = (self.usage, &mut completion) {
            fields.insert(
                "usage".into(),
                json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}),
            );
        }
        completion
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::body;

    #[test]
    fn image_urls_are_split_or_refused() {
        assert_eq!(
            image("data:image/PNG;base64,iVBORw0KGgo=").unwrap(),
            Image::Inline { media_type: "image/png".into(), data: "iVBORw0KGgo=".into() }
        );
        assert_eq!(image("https://example.org/a.jpg").unwrap(), Image::Url("https://example.org/a.jpg".into()));
        assert!(image("data:image/png,rawbytes").unwrap_err().contains("not base64"));
        assert!(image("data:;base64,AAAA").unwrap_err().contains("media type"));
        assert!(image("data:image/png;base64").unwrap_err().contains("without data"));
        assert!(image("file:///etc/passwd").is_err());
        // Multi-byte text where a prefix would be cut is no reason to panic.
        assert!(image("dé").is_err() && image("é").is_err());
        assert_eq!(media_type_of_url("https://x.org/p/cat.JPG?size=2"), Some("image/jpeg"));
        assert_eq!(media_type_of_url("https://x.org/render"), None);
    }

    #[test]
    fn tool_calls_and_choices_are_read_or_refused() {
        let message = json!({"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}]});
        let calls = tool_calls(&message).unwrap();
        assert_eq!(calls[0].arguments.get("x"), Some(&json!(1)));
        assert!(calls[1].arguments.is_empty());
        let broken = json!({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1, 2"}}]});
        assert_eq!(tool_calls(&broken).unwrap_err(), "tool call `f` arguments that are not a JSON object");
        assert!(tool_calls(&json!({"tool_calls": [{"function": {"name": "f"}}]})).is_err(), "no id");
        let named = body(json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}));
        assert_eq!(tool_choice(&named).unwrap(), Some(ToolChoice::Function("f".into())));
        assert_eq!(tool_choice(&body(json!({"tool_choice": "required"}))).unwrap(), Some(ToolChoice::Required));
        assert!(tool_choice(&body(json!({"tool_choice": "sometimes"}))).is_err());
        assert!(
            functions(&body(json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]})))
                .unwrap_err()
                .contains("custom")
        );
        for bad in ["get.weather", "", "x".repeat(65).as_str(), "naïve"] {
            let tools = body(json!({"tools": [{"type": "function", "function": {"name": bad}}]}));
            assert!(functions(&tools).unwrap_err().contains("function name outside"), "{bad:?}");
        }
        let fine = body(json!({"tools": [{"type": "function", "function": {"name": "get_weather-2"}}]}));
        assert_eq!(functions(&fine).unwrap()[0].name, "get_weather-2");
    }

    #[test]
    fn an_answer_with_tool_calls_has_null_content_and_string_arguments() {
        let call = CallOut { id: "call_1".into(), name: "f".into(), arguments: "{\"x\":1}".into() };
        let answer = Answer {
            id: "1",
            model: "m",
            text: String::new(),
            tool_calls: vec![call],
            finish_reason: "tool_calls",
            usage: None,
        };
        let completion = answer.into_chat_completion(SystemTime::UNIX_EPOCH);
        let message = &completion["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(
            message["tool_calls"],
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}])
        );
        assert_eq!(completion["choices"][0]["finish_reason"], "tool_calls");
    }
}
