//! Property tests over the dialect translators, both ways: a job's body (tools, tool turns,
//! response formats, image parts, schemas) into each provider's request, and each provider's
//! answer (text, function calls, tool_use blocks, the forced JSON tool) back into a
//! `chat.completion`.
//!
//! Both sides are hostile input: a job comes from whoever can publish to the queue, an answer
//! from a provider, a proxy or a new format. So the first property is "never panics"; then what
//! a translation promises: a request in the dialect's roles and id alphabet, a Gemini schema of
//! Gemini's types only, and an answer that always loads as the OpenAI SDK's `ChatCompletion`
//! (the Rust check of `providers::shape`).
//!
//! Cases per property: proptest's default 256, or `PROPTEST_CASES`.

use std::time::SystemTime;

use fallback_worker::config::ProviderKind;
use fallback_worker::job::ChatBody;
use fallback_worker::providers::capabilities::{self, Capabilities};
use fallback_worker::providers::shape::{chat_completion_problems, complete_envelope, failed_generation};
use fallback_worker::providers::{anthropic, gemini, gemini_schema, openai};
use proptest::prelude::*;
use proptest::sample::select;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value, json};

// ---- JSON ----------------------------------------------------------------------------------

/// Keys the translators look for, so that random objects often hit them.
const KEYS: &[&str] = &[
    "type",
    "text",
    "content",
    "role",
    "tool_calls",
    "tool_call_id",
    "id",
    "function",
    "name",
    "arguments",
    "parameters",
    "image_url",
    "url",
    "properties",
    "items",
    "required",
    "enum",
    "const",
    "anyOf",
    "allOf",
    "oneOf",
    "$ref",
    "$defs",
    "nullable",
    "additionalProperties",
    "format",
    "minimum",
    "functionCall",
    "args",
    "input",
    "parts",
    "candidates",
    "finishReason",
    "stop_reason",
    "usage",
    "model",
    "modelVersion",
    "schema",
    "json_schema",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(KEYS).prop_map(str::to_string), 1 => "[a-zA-Z_$#/]{1,10}"]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "",
            "auto",
            "none",
            "required",
            "function",
            "string",
            "integer",
            "number",
            "boolean",
            "array",
            "object",
            "null",
            "STRING",
            "OBJECT",
            "json_object",
            "json_schema",
            "text",
            "image_url",
            "tool_use",
            "tool_result",
            "input_audio",
            "#/$defs/A",
            "#/$defs/B",
            "#",
            "#/",
            "data:image/png;base64,AAAA",
            "data:;base64,",
            "data:image/png,raw",
            "https://x.org/a.png",
            "http://x",
            "ftp://x",
            "{\"a\": 1}",
            "[1, 2]",
            "{",
            "null",
            "STOP",
            "MAX_TOKENS",
            "SAFETY",
            "MALFORMED_FUNCTION_CALL",
            "max_tokens",
            "refusal",
            "json_answer",
            "call.1",
            "é",
            "\u{0}",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), number(), text().prop_map(Value::String),];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..7).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

// ---- JSON Schemas --------------------------------------------------------------------------

/// Schemas of the shapes people write (and break): typed nodes, unions, references (some to
/// themselves), keywords Gemini cannot express, and arbitrary JSON.
fn schema() -> impl Strategy<Value = Value> {
    let types = select(vec!["string", "integer", "number", "boolean", "null", "object", "array", "date"]);
    let leaf = prop_oneof![
        6 => types.prop_map(|t| json!({"type": t})),
        2 => Just(json!({"type": "string", "enum": ["a", "b"]})),
        1 => Just(json!({"type": "integer", "enum": [1]})),
        1 => Just(json!({"$ref": "#/$defs/A"})),
        1 => Just(json!({"$ref": "#/$defs/B"})),
        1 => Just(json!({"$ref": "#/nowhere"})),
        2 => Just(json!({"type": ["string", "null"]})),
        1 => Just(json!({"type": "number", "multipleOf": 2})),
        1 => Just(json!({})),
        1 => Just(json!(true)),
        1 => any_json(),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            (prop::collection::vec((key(), inner.clone()), 0..5), any::<bool>()).prop_map(|(props, all_required)| {
                let required: Vec<Value> =
                    if all_required { props.iter().map(|(k, _)| json!(k)).collect() } else { vec![json!("ghost")] };
                let properties: Map<String, Value> = props.into_iter().collect();
                json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
            }),
            inner.clone().prop_map(|items| json!({"type": "array", "items": items, "minItems": 1})),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|branches| json!({"anyOf": branches})),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|branches| json!({"allOf": branches})),
            (inner.clone(), inner).prop_map(|(a, b)| json!({"$defs": {"A": a, "B": b}, "$ref": "#/$defs/A"})),
        ]
    })
}

// ---- job bodies ----------------------------------------------------------------------------

/// Tool call ids and names from a small pool, so that results often find their calls.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(vec!["call_1", "call_2", "call.3", "toolu_01A"]).prop_map(str::to_string), 1 => text()]
}

fn image_url() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "data:image/png;base64,iVBORw0KGgo=",
            "data:image/jpeg;base64,/9j/4AAQ",
            "data:image/tiff;base64,AAAA",
            "https://example.org/cat.webp",
            "https://example.org/render?id=1",
        ])
        .prop_map(str::to_string),
        1 => text(),
    ]
}

fn content() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        3 => text().prop_map(|t| json!({"type": "text", "text": t})),
        3 => image_url().prop_map(|url| json!({"type": "image_url", "image_url": {"url": url}})),
        1 => image_url().prop_map(|url| json!({"type": "image_url", "image_url": url})),
        1 => Just(json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})),
        1 => any_json(),
    ];
    prop_oneof![
        4 => text().prop_map(Value::String),
        1 => Just(Value::Null),
        3 => prop::collection::vec(part, 0..4).prop_map(Value::Array),
        1 => any_json(),
    ]
}

fn tool_call() -> impl Strategy<Value = Value> {
    let object =
        prop::collection::vec((key(), any_json()), 0..3).prop_map(|kv| Value::Object(kv.into_iter().collect()));
    let arguments = prop_oneof![
        4 => object.prop_map(|v| Value::String(v.to_string())),
        1 => text().prop_map(Value::String),
        1 => any_json(),
    ];
    (id(), id(), arguments).prop_map(|(id, name, arguments)| {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
    })
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        4 => Just("user"),
        3 => Just("assistant"),
        2 => Just("tool"),
        1 => Just("system"),
        1 => select(vec!["developer", "function", "critic"]),
    ];
    (role, content(), prop::option::of(prop::collection::vec(tool_call(), 0..3)), prop::option::of(id())).prop_map(
        |(role, content, calls, call_id)| {
            let mut message = json!({"role": role, "content": content});
            if let Some(calls) = calls {
                message["tool_calls"] = Value::Array(calls);
            }
            if let Some(id) = call_id {
                message["tool_call_id"] = Value::String(id);
            }
            message
        },
    )
}

fn tools() -> impl Strategy<Value = Value> {
    let tool = prop_oneof![
        6 => (id(), prop::option::of(schema())).prop_map(|(name, parameters)| {
            json!({"type": "function", "function": {"name": name, "description": "d", "parameters": parameters}})
        }),
        1 => any_json(),
    ];
    prop_oneof![4 => prop::collection::vec(tool, 0..4).prop_map(Value::Array), 1 => any_json()]
}

fn tool_choice() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec!["auto", "none", "required", "sometimes"]).prop_map(|c| json!(c)),
        text().prop_map(|name| json!({"type": "function", "function": {"name": name}})),
        any_json(),
    ]
}

fn response_format() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec!["text", "json_object", "json_schema", "xml"]).prop_map(|t| json!({"type": t})),
        schema()
            .prop_map(|s| json!({"type": "json_schema", "json_schema": {"name": "n", "strict": true, "schema": s}})),
        any_json(),
    ]
}

/// Job bodies: mostly plausible, with every field sometimes absent and sometimes garbage.
fn chat_body() -> impl Strategy<Value = ChatBody> {
    (
        prop::collection::vec(message(), 0..6),
        prop::option::of(tools()),
        prop::option::of(tool_choice()),
        prop::option::of(response_format()),
        prop::option::of(any::<bool>()),
        prop::option::of(any_json()),
    )
        .prop_map(|(messages, tools, choice, format, parallel, max_tokens)| {
            let mut body = Map::new();
            body.insert("messages".into(), Value::Array(messages));
            let optional = [
                ("tools", tools),
                ("tool_choice", choice),
                ("response_format", format),
                ("parallel_tool_calls", parallel.map(Value::Bool)),
                ("max_tokens", max_tokens),
            ];
            for (key, value) in optional {
                if let Some(value) = value {
                    body.insert(key.into(), value);
                }
            }
            body
        })
}

/// Every Gemini schema node uses Gemini's own type names.
fn gemini_types_only(schema: &Value) -> bool {
    const TYPES: &[&str] = &["STRING", "INTEGER", "NUMBER", "BOOLEAN", "ARRAY", "OBJECT"];
    let Some(fields) = schema.as_object() else { return false };
    let typed = match fields.get("type") {
        Some(Value::String(t)) => TYPES.contains(&t.as_str()),
        None => fields.contains_key("anyOf"),
        Some(_) => false,
    };
    let properties = fields.get("properties").and_then(Value::as_object).into_iter().flatten().map(|(_, v)| v);
    let branches = fields.get("anyOf").and_then(Value::as_array).into_iter().flatten();
    typed && properties.chain(branches).chain(fields.get("items")).all(gemini_types_only)
}

fn anthropic_id(id: &Value) -> bool {
    id.as_str()
        .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
}

proptest! {
    #[test]
    fn any_job_body_translates_or_is_refused_without_panicking(body in chat_body()) {
        let _ = openai::request_body(&body, "m");
        for kind in [ProviderKind::Openai, ProviderKind::Gemini, ProviderKind::Anthropic] {
            let _ = capabilities::refusal(kind, Capabilities::NONE, &body);
        }
        if let Ok(request) = gemini::request_body(&body) {
            let contents = request["contents"].as_array().cloned().unwrap_or_default();
            for content in &contents {
                prop_assert!(matches!(content["role"].as_str(), Some("user" | "model")), "{content}");
                prop_assert!(content["parts"].as_array().is_some_and(|p| !p.is_empty()), "{content}");
            }
            let declarations = request.pointer("/tools/0/functionDeclarations").and_then(Value::as_array).cloned();
            for declaration in declarations.unwrap_or_default() {
                if let Some(parameters) = declaration.get("parameters") {
                    prop_assert!(gemini_types_only(parameters), "{parameters}");
                }
            }
            if let Some(schema) = request.pointer("/generationConfig/responseSchema") {
                prop_assert!(gemini_types_only(schema), "{schema}");
            }
        }
        if let Ok(request) = anthropic::request_body(&body, "m") {
            let declared: Vec<Value> =
                request["tools"].as_array().into_iter().flatten().map(|t| t["name"].clone()).collect();
            for turn in request["messages"].as_array().cloned().unwrap_or_default() {
                prop_assert!(matches!(turn["role"].as_str(), Some("user" | "assistant")), "{turn}");
                for block in turn["content"].as_array().cloned().unwrap_or_default() {
                    match block["type"].as_str() {
                        Some("tool_use") => {
                            prop_assert!(anthropic_id(&block["id"]) && block["input"].is_object(), "{block}");
                            // The API refuses a tool_use block whose tool is not declared.
                            prop_assert!(declared.contains(&block["name"]), "{block} not in {declared:?}");
                        }
                        Some("tool_result") => prop_assert!(anthropic_id(&block["tool_use_id"]), "{block}"),
                        _ => {}
                    }
                }
            }
            prop_assert!(request["max_tokens"].is_u64());
        }
    }

    #[test]
    fn any_schema_converts_to_gemini_types_or_is_refused(schema in schema()) {
        if let Ok(converted) = gemini_schema::convert(&schema) {
            prop_assert!(gemini_types_only(&converted), "{schema} -> {converted}");
        }
        let _ = gemini_schema::is_empty_object(&schema);
    }
}

// ---- provider answers ----------------------------------------------------------------------

fn gemini_answer() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        text().prop_map(|t| json!({"text": t})),
        (text(), any_json()).prop_map(|(name, args)| json!({"functionCall": {"name": name, "args": args}})),
        (any_json(), any_json(), any_json())
            .prop_map(|(id, name, args)| json!({"functionCall": {"id": id, "name": name, "args": args}})),
        text().prop_map(|t| json!({"text": t, "thought": true})),
        any_json(),
    ];
    (prop::collection::vec(part, 0..4), any_json(), any_json(), any_json()).prop_map(|(parts, finish, model, usage)| {
        json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}],
            "modelVersion": model, "responseId": model, "usageMetadata": usage})
    })
}

fn anthropic_answer() -> impl Strategy<Value = Value> {
    let block = prop_oneof![
        text().prop_map(|t| json!({"type": "text", "text": t})),
        (text(), text(), any_json())
            .prop_map(|(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input})),
        (any_json(), any_json())
            .prop_map(|(id, input)| json!({"type": "tool_use", "id": id, "name": "json_answer", "input": input})),
        (any_json(), any_json()).prop_map(|(id, name)| json!({"type": "tool_use", "id": id, "name": name})),
        any_json(),
    ];
    (prop::collection::vec(block, 0..4), any_json(), any_json(), any_json(), any_json()).prop_map(
        |(content, stop, model, id, usage)| {
            json!({"type": "message", "id": id, "model": model, "content": content, "stop_reason": stop, "usage": usage})
        },
    )
}

/// An OpenAI-compatible server's answer: the documented fields, each sometimes of another type
/// or spelling (a server's own finish reasons, text parts, counts as text).
fn openai_answer() -> impl Strategy<Value = Value> {
    let finish = prop_oneof![
        select(vec!["stop", "length", "tool_calls", "eos", "max_tokens", "end_turn", "SAFETY", "error"])
            .prop_map(Value::from),
        any_json(),
    ];
    let content = prop_oneof![text().prop_map(Value::from), Just(Value::Null), content(), any_json()];
    let message = (content, prop_oneof![Just(json!("assistant")), any_json()], prop::option::of(tool_call())).prop_map(
        |(content, role, call)| match call {
            Some(call) => json!({"role": role, "content": content, "tool_calls": [call]}),
            None => json!({"role": role, "content": content}),
        },
    );
    let choice = (message, finish, prop_oneof![Just(json!(0)), any_json()])
        .prop_map(|(message, finish, index)| json!({"index": index, "message": message, "finish_reason": finish}));
    let usage = prop_oneof![
        Just(json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})),
        any_json().prop_map(|n| json!({"prompt_tokens": n, "completion_tokens": 4, "total_tokens": 7})),
        any_json(),
    ];
    (prop::collection::vec(choice, 0..3), usage, any_json())
        .prop_map(|(choices, usage, id)| json!({"id": id, "choices": choices, "usage": usage}))
}

/// An OpenAI-compatible answer that says everything the SDK needs, in a server's own way: any
/// finish reason but a failed generation's (or none), an index of any type, a role other than
/// `assistant` or none, content as text or as parts (with a reasoning part), tool calls missing
/// their type, id or arguments, a usage missing one count.
fn mendable_openai_answer() -> impl Strategy<Value = Value> {
    let finish = prop_oneof![
        "[a-zA-Z_]{0,24}"
            .prop_filter("not a failed generation", |f| !failed_generation(&json!({"finish_reason": f})))
            .prop_map(Value::from),
        Just(Value::Null),
    ];
    let content = prop_oneof![
        text().prop_map(Value::from),
        Just(Value::Null),
        (text(), text()).prop_map(|(thought, answer)| json!([
            {"type": "thinking", "thinking": [{"type": "text", "text": thought}]}, {"type": "text", "text": answer}])),
        prop::collection::vec(text(), 0..3)
            .prop_map(|parts| Value::Array(parts.into_iter().map(|t| json!({"type": "text", "text": t})).collect())),
    ];
    let call = (text(), prop::option::of(any_json()), any::<bool>(), any::<bool>()).prop_map(
        |(name, arguments, typed, with_id)| {
            let mut function = json!({"name": name});
            if let Some(arguments) = arguments {
                function["arguments"] = arguments;
            }
            let mut call = json!({"function": function});
            if typed {
                call["type"] = json!("function");
            }
            if with_id {
                call["id"] = json!("call_1");
            }
            call
        },
    );
    let role = prop_oneof![Just(json!("assistant")), Just(json!("model")), Just(Value::Null)];
    let message = (content, role, prop::collection::vec(call, 0..2)).prop_map(|(content, role, calls)| {
        let mut message = json!({"content": content, "role": role});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        message
    });
    let choice = (message, finish, any_json())
        .prop_map(|(message, finish, index)| json!({"index": index, "message": message, "finish_reason": finish}));
    let usage = prop_oneof![
        Just(json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})),
        Just(json!({"prompt_tokens": 3, "total_tokens": 7})),
        Just(json!({"completion_tokens": 4, "total_tokens": 7})),
        Just(json!({"prompt_tokens": 3, "completion_tokens": 4})),
        Just(Value::Null),
    ];
    (prop::collection::vec(choice, 1..3), usage)
        .prop_map(|(choices, usage)| json!({"choices": choices, "usage": usage}))
}

proptest! {
    /// An answer that says everything the SDK needs in a server's own way is taken, mended,
    /// and loads (without the mending, each of these is refused as garbled).
    #[test]
    fn any_mendable_openai_answer_is_taken_and_loads(body in mendable_openai_answer()) {
        let bytes = body.to_string().into_bytes();
        let done = openai::interpret(200, &HeaderMap::new(), &bytes, SystemTime::now());
        prop_assert!(done.is_ok(), "refused: {:?}\n{}", done.err().map(|f| f.message), body);
        let mut body = done.map(|d| d.body).unwrap_or_default();
        complete_envelope(&mut body, "chatcmpl-1", "configured", 1);
        prop_assert_eq!(chat_completion_problems(&body), Vec::<String>::new(), "{}", body);
    }
}

proptest! {
    /// Whatever an OpenAI-compatible server answers, a success is one the OpenAI SDK loads once
    /// its envelope is completed (as every result's is); anything else is a classified failure.
    #[test]
    fn any_openai_answer_that_succeeds_loads_as_a_chat_completion(body in prop_oneof![openai_answer(), any_json()]) {
        let bytes = body.to_string().into_bytes();
        if let Ok(mut done) = openai::interpret(200, &HeaderMap::new(), &bytes, SystemTime::now()) {
            complete_envelope(&mut done.body, "chatcmpl-1", "configured", 1);
            prop_assert_eq!(chat_completion_problems(&done.body), Vec::<String>::new(), "{}", done.body);
        }
    }
}

proptest! {
    /// Whatever a provider answers, a translated success is a `chat.completion` the OpenAI SDK
    /// loads; anything else is a classified failure.
    #[test]
    fn any_translated_answer_loads_as_a_chat_completion(
        gemini_body in prop_oneof![gemini_answer(), any_json()],
        anthropic_body in prop_oneof![anthropic_answer(), any_json()],
        json_tool in any::<bool>(),
    ) {
        let now = SystemTime::now();
        let gemini_bytes = gemini_body.to_string().into_bytes();
        let reading = anthropic::Reading { model: "configured", json_tool };
        let anthropic_bytes = anthropic_body.to_string().into_bytes();
        let answers = [
            gemini::interpret(200, &HeaderMap::new(), &gemini_bytes, "configured", now),
            anthropic::interpret(200, &HeaderMap::new(), &anthropic_bytes, reading, now),
        ];
        for done in answers.into_iter().flatten() {
            prop_assert_eq!(chat_completion_problems(&done.body), Vec::<String>::new(), "{}", done.body);
            let choice = &done.body["choices"][0];
            let calls = choice["message"]["tool_calls"].as_array().map_or(0, Vec::len);
            prop_assert_eq!(calls > 0, choice["finish_reason"] == "tool_calls", "{}", done.body);
        }
    }
}
