//! Adversarial review, round 3, of 811ec54 (the mending of OpenAI-compatible answers: finish
//! reasons read by what they name, tool calls filled in, usage completed) and 00165d2 (cooldown
//! replacement with `now`, the write-back's leftovers). Each test is a fault found and fails on
//! 00165d2.

use std::time::SystemTime;

use fallback_worker::providers::openai::interpret;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

fn answer_with(choices: Value) -> Result<Value, String> {
    let body = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": choices,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), SystemTime::now())
        .map(|done| done.body)
        .map_err(|failure| format!("{:?} {:?}: {}", failure.kind, failure.status, failure.message))
}

fn one_choice(message: Value, finish: Value) -> Value {
    json!([{"index": 0, "message": message, "finish_reason": finish}])
}

/// 811ec54 `repair_tool_call`: a tool call without an `id` gets `call_{choice}_{position}`: the
/// same id on every answer. A tool conversation runs over several jobs (the client sends the
/// assistant's tool calls and their results back with the next turn); when the server answering
/// it leaves ids out (the case the mending is for), turn 1's call and turn 2's call are both
/// `call_0_0`. The next turn's history then holds two calls, and two tool results, under one id:
/// which result answers which call is lost, and a chain that falls back to Anthropic sends two
/// `tool_use` blocks with one id, which its API refuses ("messages.3.content.0: `tool_use` ids
/// must be unique", 400 `invalid_request_error`: the very failure opencode#1279 reports after a
/// switch from an OpenRouter model to Claude). The project has a fresh id for exactly this
/// (`translate::new_call_id`, "for providers that give their calls none", used by the Gemini
/// dialect); the mending does not use it.
#[test]
fn tool_call_ids_filled_in_on_two_turns_of_one_conversation_do_not_collide() {
    let call = |city: &str| {
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": format!("{{\"city\":\"{city}\"}}")}}
        ]})
    };
    let turn = |city: &str| {
        let body = answer_with(one_choice(call(city), json!("tool_calls"))).expect("a tool call without an id is mended");
        body["choices"][0]["message"].clone()
    };
    let (first, second) = (turn("Paris"), turn("Rome"));
    let id = |message: &Value| message["tool_calls"][0]["id"].as_str().unwrap_or_default().to_string();
    let (first_id, second_id) = (id(&first), id(&second));
    // What the client sends with its third turn, and what the Anthropic dialect makes of it.
    let conversation: fallback_worker::job::ChatBody = serde_json::from_value(json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris, then in Rome?"},
            first, {"role": "tool", "tool_call_id": first_id, "content": "sunny"},
            second, {"role": "tool", "tool_call_id": second_id, "content": "rainy"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    }))
    .unwrap();
    let anthropic = fallback_worker::providers::anthropic::request_body(&conversation, "claude").unwrap();
    let tool_use_ids: Vec<&Value> = anthropic["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|block| block["type"] == "tool_use")
        .map(|block| &block["id"])
        .collect();
    assert_ne!(
        first_id, second_id,
        "two calls of one conversation are given the same id; the Anthropic request made of it carries \
         `tool_use` ids {tool_use_ids:?}, which its API refuses as not unique"
    );
}

/// 811ec54 `finish_reason_for` reads a finish by the words in it: "tool" or "function" is
/// `tool_calls`. Gemini's (and Vertex's) finishes for a tool call that *failed* name a function
/// too: `MALFORMED_FUNCTION_CALL` (the model wrote an invalid call; the message carries none),
/// `UNEXPECTED_TOOL_CALL`, `TOO_MANY_TOOL_CALLS`. An OpenAI-compatible server that passes them
/// through (Gemini's own compat endpoint behind a gateway, any-llm, LiteLLM) now gets an answer
/// mended into `finish_reason: "tool_calls"` with no tool call in it: taken as a success (the
/// `finish` check passes `tool_calls`, the `content` check passes the text the model wrote
/// before its broken call), and a client that runs tools on `tool_calls` finds none to run. The
/// project's Gemini dialect refuses the same finishes as a failed tool call (`gemini.rs`: "The
/// model failed at this request's tools: the next provider may not"); through the OpenAI
/// dialect they now read as the tool call the model failed to make.
#[test]
fn a_finish_that_names_a_failed_tool_call_is_not_mended_into_tool_calls() {
    let message = json!({"role": "assistant", "content": "Let me look that up for you."});
    let mut wrong = Vec::new();
    for given in ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"] {
        if let Ok(body) = answer_with(one_choice(message.clone(), json!(given))) {
            let choice = &body["choices"][0];
            let calls = choice["message"]["tool_calls"].as_array().map_or(0, Vec::len);
            wrong.push(format!("{given} -> {} with {calls} tool calls", choice["finish_reason"]));
        }
    }
    assert!(
        wrong.is_empty(),
        "failed tool calls taken as answers (the Gemini dialect refuses each of them): {wrong:?}"
    );
}

/// 811ec54 says a finish that tells of an answer cut off, blocked or failed is no longer
/// mended into `stop` ("`ERROR` ... in any case: a failed generation"; "a filter, block or
/// policy: content_filter"; "a length or token cap: length"), but only the exact words of its
/// lists are read so; everything else is still `stop`, which the `finish` check passes and a
/// client reads as a complete answer. Finishes that OpenAI-shaped APIs do send:
/// - IBM watsonx.ai chat (`TextChatResultChoice.finish_reason`): `time_limit` ("Time limit
///   reached": the answer is cut off) — `stop`;
/// - Vertex/Gemini `MODEL_ARMOR` ("The model response was blocked by Model Armor") — `stop`;
/// - Cohere (and OCI's Cohere chat) `ERROR_TOXIC` (blocked as toxic), `ERROR_LIMIT` (the context
///   limit was reached), `USER_CANCEL` (cancelled) — `stop`, though two of them begin with the
///   `ERROR` the fix says it reads in any case.
#[test]
fn a_finish_that_says_cut_off_blocked_or_failed_in_other_words_is_not_mended_into_stop() {
    let message = json!({"role": "assistant", "content": "The first half of an ans"});
    let mut wrong = Vec::new();
    for given in ["time_limit", "MODEL_ARMOR", "ERROR_TOXIC", "ERROR_LIMIT", "USER_CANCEL"] {
        if let Ok(body) = answer_with(one_choice(message.clone(), json!(given)))
            && body["choices"][0]["finish_reason"] == "stop"
        {
            wrong.push(given);
        }
    }
    assert!(wrong.is_empty(), "finish reasons mended into `stop`, passing the `finish` check: {wrong:?}");
}
