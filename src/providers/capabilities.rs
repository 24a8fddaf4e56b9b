//! What a job needs beyond plain text, and what a provider can carry (contract §3
//! `skipped_capability`, §5 `supports`).
//!
//! The chain asks before admission: a provider that cannot carry a job is passed over with no
//! request sent and no quota slot taken. Sending it anyway would at best waste a call on a 400,
//! at worst get an answer from a model that silently ignored the tools or the image.

use serde_json::Value;

use crate::config::{Capability, ProviderKind};
use crate::job::ChatBody;

/// A set of [`Capability`]s: what a job needs, or what a provider can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub tools: bool,
    pub json_schema: bool,
    pub images: bool,
}

impl Capabilities {
    pub const NONE: Capabilities = Capabilities { tools: false, json_schema: false, images: false };
    pub const ALL: Capabilities = Capabilities { tools: true, json_schema: true, images: true };

    /// What a kind's translation can carry. Every kind carries all three since each dialect
    /// translates tools, JSON schemas and images; a schema Gemini cannot express is refused by
    /// the translation itself, per request.
    pub fn of_kind(kind: ProviderKind) -> Capabilities {
        match kind {
            ProviderKind::Openai | ProviderKind::Gemini | ProviderKind::Anthropic => Capabilities::ALL,
        }
    }

    /// What a configured provider carries: its kind's set, narrowed by `supports` when given.
    pub fn configured(kind: ProviderKind, supports: Option<&[Capability]>) -> Capabilities {
        let kind = Capabilities::of_kind(kind);
        let Some(listed) = supports else { return kind };
        let listed = Capabilities::from_list(listed);
        Capabilities {
            tools: kind.tools && listed.tools,
            json_schema: kind.json_schema && listed.json_schema,
            images: kind.images && listed.images,
        }
    }

    pub fn from_list(list: &[Capability]) -> Capabilities {
        let has = |c: Capability| list.contains(&c);
        Capabilities {
            tools: has(Capability::Tools),
            json_schema: has(Capability::JsonSchema),
            images: has(Capability::Images),
        }
    }

    pub fn has(self, capability: Capability) -> bool {
        match capability {
            Capability::Tools => self.tools,
            Capability::JsonSchema => self.json_schema,
            Capability::Images => self.images,
        }
    }

    /// What `needs` asks for that `self` lacks, in the contract's order.
    pub fn missing(self, needs: Capabilities) -> Vec<Capability> {
        Capability::ALL.into_iter().filter(|c| needs.has(*c) && !self.has(*c)).collect()
    }
}

/// What a request needs: tools (declared, or tool turns in the conversation, which only a
/// provider with function calling can read), a JSON schema for the answer, images.
pub fn needs(body: &ChatBody) -> Capabilities {
    let messages = body.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let non_empty = |v: Option<&Value>| v.and_then(Value::as_array).is_some_and(|a| !a.is_empty());
    let tool_turn = |m: &Value| {
        non_empty(m.get("tool_calls"))
            || m.get("function_call").is_some_and(|f| !f.is_null())
            || matches!(m.get("role").and_then(Value::as_str), Some("tool" | "function"))
    };
    let image = |m: &Value| {
        m.get("content")
            .and_then(Value::as_array)
            .is_some_and(|parts| parts.iter().any(|p| p.get("type").and_then(Value::as_str) == Some("image_url")))
    };
    Capabilities {
        tools: non_empty(body.get("tools")) || non_empty(body.get("functions")) || messages.iter().any(tool_turn),
        json_schema: response_format(body) == Some("json_schema"),
        images: messages.iter().any(image),
    }
}

/// `response_format.type`, when the job set one.
pub fn response_format(body: &ChatBody) -> Option<&str> {
    body.get("response_format")?.get("type")?.as_str()
}

/// What a provider of `kind` carrying `carries` lacks for `body`, as the attempt's message;
/// `None` when it lacks nothing.
pub fn refusal(kind: ProviderKind, carries: Capabilities, body: &ChatBody) -> Option<String> {
    let mut needs = needs(body);
    // Anthropic has no JSON mode: JSON comes back through a forced tool call, which a model
    // without function calling cannot make.
    let json_through_tools =
        kind == ProviderKind::Anthropic && matches!(response_format(body), Some("json_object" | "json_schema"));
    needs.tools |= json_through_tools;
    let missing = carries.missing(needs);
    if missing.is_empty() {
        return None;
    }
    let names: Vec<&str> = missing.iter().map(|c| c.as_str()).collect();
    let why = if json_through_tools && missing.contains(&Capability::Tools) {
        " (the anthropic kind answers JSON through a forced tool call)"
    } else {
        ""
    };
    Some(format!("the job needs {}{why}, which this provider's `supports` leaves out", names.join(" and ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::body;
    use serde_json::json;

    fn user(content: Value) -> Value {
        json!({"role": "user", "content": content})
    }

    #[test]
    fn needs_are_read_from_every_place_a_job_can_ask_for_them() {
        let plain = body(json!({"messages": [user(json!("hi"))], "response_format": {"type": "json_object"}}));
        assert_eq!(needs(&plain), Capabilities::NONE, "json_object is carried by every kind without a capability");
        let tools =
            body(json!({"messages": [user(json!("hi"))], "tools": [{"type": "function", "function": {"name": "f"}}]}));
        assert_eq!(needs(&tools), Capabilities { tools: true, ..Capabilities::NONE });
        let empty_tools = body(json!({"messages": [user(json!("hi"))], "tools": []}));
        assert_eq!(needs(&empty_tools), Capabilities::NONE);
        let tool_turns = body(json!({"messages": [user(json!("hi")),
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]}));
        assert!(needs(&tool_turns).tools, "a tool conversation without `tools` still needs function calling");
        let schema = body(
            json!({"messages": [user(json!("hi"))], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
        );
        assert_eq!(needs(&schema), Capabilities { json_schema: true, ..Capabilities::NONE });
        let image = body(json!({"messages": [user(json!([{"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}]))]}));
        assert_eq!(needs(&image), Capabilities { images: true, ..Capabilities::NONE });
    }

    #[test]
    fn supports_narrows_the_kind_and_the_refusal_names_what_is_missing() {
        let everything =
            body(json!({"messages": [user(json!([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]))],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}));
        let all = Capabilities::configured(ProviderKind::Gemini, None);
        assert_eq!(refusal(ProviderKind::Gemini, all, &everything), None);
        let nothing = Capabilities::configured(ProviderKind::Openai, Some(&[]));
        assert_eq!(
            refusal(ProviderKind::Openai, nothing, &everything).unwrap(),
            "the job needs tools and json_schema and images, which this provider's `supports` leaves out"
        );
        let vision = Capabilities::configured(ProviderKind::Openai, Some(&[Capability::Images]));
        assert_eq!(
            refusal(ProviderKind::Openai, vision, &everything).unwrap(),
            "the job needs tools and json_schema, which this provider's `supports` leaves out"
        );
    }

    #[test]
    fn anthropic_json_needs_tools_because_it_comes_through_a_forced_tool() {
        let json_mode = body(json!({"messages": [user(json!("hi"))], "response_format": {"type": "json_object"}}));
        let no_tools = Capabilities::configured(ProviderKind::Anthropic, Some(&[Capability::JsonSchema]));
        let message = refusal(ProviderKind::Anthropic, no_tools, &json_mode).unwrap();
        assert!(message.starts_with("the job needs tools (the anthropic kind answers JSON"), "{message}");
        assert_eq!(refusal(ProviderKind::Gemini, Capabilities::NONE, &json_mode), None);
        assert_eq!(refusal(ProviderKind::Openai, Capabilities::NONE, &json_mode), None);
    }
}
