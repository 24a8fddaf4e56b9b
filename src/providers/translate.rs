//! Pieces every non-OpenAI dialect needs to translate a chat request.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

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

/// A message's text: a string, or the concatenation of its text parts (`None` for images etc.).
pub fn message_text(message: &Value) -> Option<String> {
    match message.get("content") {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") | None => p.get("text").and_then(Value::as_str).map(str::to_string),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|texts| texts.join("")),
        None | Some(Value::Null) => Some(String::new()),
        _ => None,
    }
}

/// The job's messages as (role, text), or what cannot be translated.
pub fn text_messages(body: &ChatBody) -> Result<Vec<(String, String)>, String> {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|message| {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("user").to_string();
            let text = message_text(message).ok_or_else(|| format!("{role} content that is not text"))?;
            Ok((role, text))
        })
        .collect()
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

/// What a translated answer says, to be written as an OpenAI `chat.completion`.
pub struct Answer<'a> {
    pub id: &'a str,
    pub model: Value,
    pub text: String,
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
        let mut completion = json!({
            "id": format!("chatcmpl-{}", self.id),
            "object": "chat.completion",
            "created": now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": self.finish_reason}],
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
