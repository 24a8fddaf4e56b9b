//! Adversarial review, round 3, of 811ec54 (the mending of OpenAI-compatible answers: finish
//! reasons read by what they name, tool calls filled in, usage completed) and 00165d2 (cooldown
//! replacement with `now`, the write-back's leftovers). Each test is a fault found and fails on
//! 00165d2.

use std::time::SystemTime;

use fallback_worker::providers::openai::interpret;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::review_s33::store_behind_relay;
use crate::review_s33b::{answer_with, committing, one_choice};

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
        let body =
            answer_with(one_choice(call(city), json!("tool_calls"))).expect("a tool call without an id is mended");
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
/// project's Gemini dialect refuses the first two as a failed tool call (`gemini.rs`: "The
/// model failed at this request's tools: the next provider may not"); through the OpenAI
/// dialect they now read as the tool call the model failed to make. (Before 811ec54 they were
/// `stop`: wrong too, but no claim of a tool call.)
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
        "failed tool calls taken as answers that say `tool_calls` with no tool call (the Gemini dialect \
         refuses MALFORMED_FUNCTION_CALL and UNEXPECTED_TOOL_CALL): {wrong:?}"
    );
}

/// 811ec54 says a finish that tells of an answer cut off, blocked or failed is no longer
/// mended into `stop` ("`ERROR` ... in any case: a failed generation"; "a filter, block or
/// policy: content_filter"; "a length or token cap: length"), but only the exact words of its
/// lists are read so; everything else is still `stop`, which the `finish` check passes and a
/// client reads as a complete answer. Finishes that OpenAI-shaped APIs do send:
/// - DeepSeek's own OpenAI-compatible API: `insufficient_system_resource` ("the request is
///   interrupted due to insufficient resource of the inference system": the answer is cut
///   off) — `stop`;
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
    for given in
        ["insufficient_system_resource", "time_limit", "MODEL_ARMOR", "ERROR_TOXIC", "ERROR_LIMIT", "USER_CANCEL"]
    {
        if let Ok(body) = answer_with(one_choice(message.clone(), json!(given)))
            && body["choices"][0]["finish_reason"] == "stop"
        {
            wrong.push(given);
        }
    }
    assert!(wrong.is_empty(), "finish reasons mended into `stop`, passing the `finish` check: {wrong:?}");
}

/// 811ec54 `complete_usage` + `given_total`: a usage whose total is *smaller* than its own
/// prompt count (the Bedrock-backed answer review 33b quotes, `{"prompt_tokens":1066,
/// "total_tokens":103}`: its "total" is the completion's count) cannot be completed
/// (`checked_sub` fails), is dropped, and `success` then reads the provider's `total_tokens`
/// "whatever the mending drops": 103. The token windows are corrected down to 103 for a call
/// whose prompt alone was 1066 tokens by the provider's own count (contract §6: tokens
/// "corrected from `usage`"): every such call frees ~960 tokens it used, and the workers admit
/// past the provider's token limit by that much. A count that contradicts itself should not
/// lower the windows below what the provider says was sent.
#[test]
fn a_usage_whose_total_is_below_its_own_prompt_count_does_not_lower_the_token_count_below_it() {
    let body = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1066, "total_tokens": 103}});
    let done = interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), SystemTime::now()).unwrap();
    assert!(
        done.total_tokens.is_none_or(|t| t >= 1066),
        "the provider counted 1066 prompt tokens; the windows are corrected to {:?}",
        done.total_tokens
    );
}

/// 00165d2 finding 4's fix runs the leftovers' write-back untracked: `answers_recorded` — what a
/// stopping worker waits on, documented as "a stopping worker leaves no call counted with its
/// estimate alone" (answers given up on "within the bound of a state call") — no longer waits
/// for it at all, not even for the bound of one state call. Review 33b asked for the wait to be
/// *bounded*; it is now *zero*. An answer that met one refused write as an outage ended (a lock
/// wait, a deadlock, a statement cancelled: the database takes it half a second later) is in
/// the leftovers when SIGTERM comes; `answers_recorded` returns at once, the process exits, the
/// task dies, and the shared window keeps the call's 10-token estimate for the 5000 tokens the
/// provider was sent (contract §6: "corrected from `usage` after it"): every worker admits past
/// the token limit by 4990 for the rest of the window. Here the database refuses the answer
/// three times (a second and a half of the leftovers' retries), far within a state call's bound.
#[tokio::test]
async fn a_stopping_worker_writes_an_answer_the_database_takes_within_a_state_calls_bound() {
    use crate::credits::{ask, granted, tokens};
    use crate::review_finish::used;
    use crate::support::eventually;
    use fallback_worker::state::ProviderState;
    let env = crate::support::TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [tokens(1_000_000)];
    let mut admin = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review_s33c_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER review_s33c_slow_commit AFTER INSERT ON quota_use \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION review_s33c_slow_commit(); \
         CREATE SEQUENCE review_s33c_refusals; \
         CREATE FUNCTION review_s33c_refuse() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN IF nextval('review_s33c_refusals') <= 3 THEN \
                RAISE EXCEPTION 'review33c: this answer is refused for now'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER review_s33c_refuse BEFORE UPDATE ON quota_use FOR EACH ROW \
           WHEN (NEW.amount = 5000) EXECUTE FUNCTION review_s33c_refuse();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    relay.set_down(true);
    let first = granted(&store, ask(&limits, 10)).await;
    assert!(store.is_degraded());
    store.finish(first, Some(10), SystemTime::now()).await;
    relay.set_down(false);
    eventually("the first write-back commits", || committing(&env)).await;
    let late = granted(&store, ask(&limits, 10)).await;
    assert!(store.is_degraded(), "admitted during the first write-back, from the own view");
    eventually("the first write-back is done", || async { !store.is_degraded() }).await;
    eventually("the second write-back commits", || committing(&env)).await;
    store.finish(late, Some(5000), SystemTime::now()).await;
    let refusals = || async {
        let (last, called): (i64, bool) = sqlx::query_as("SELECT last_value, is_called FROM review_s33c_refusals")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        if called { last } else { 0 }
    };
    eventually("the answer's write is refused once", || async { refusals().await >= 1 }).await;
    // The worker is told to stop: what it waits on before it exits.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(15), store.answers_recorded()).await;
    assert!(stopped.is_ok(), "answers_recorded does not end");
    let counted = used(&env, "provider", "p", "tokens").await;
    let (refused, stop) = (refusals().await, tokio::time::Instant::now());
    // What the worker would have written had it waited (it has not exited here).
    let mut landed = None;
    while stop.elapsed() < std::time::Duration::from_secs(10) {
        if used(&env, "provider", "p", "tokens").await == 10 + 5000 {
            landed = Some(stop.elapsed());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        counted,
        10 + 5000,
        "the worker has stopped with the answer unwritten (refused {refused} times so far): the window counts \
         {counted}; the database took it {landed:?} after the stop"
    );
}

/// 00165d2 `MemoryStore::cool_down` decides "still to come" by the wall clock
/// (`cooldown.replaces(current, SystemTime::now())`), while everything else the store answers
/// runs on the caller's `now` (`admit`, `finish`), and the chain's engine runs on its `Clock`
/// ("no test depends on wall time", `chain/clock.rs`; its tests start at 2027-01-15). The same
/// calls, at the caller's times, now give different states depending on when they are run:
/// - at a caller's time before the wall clock (a replay, the chain's tests once 2027 has come),
///   the provider's own time, 5 s ahead of the caller, no longer replaces our 60 s estimate: the
///   job waits the full minute contract §6 says the provider's word ends sooner;
/// - at a caller's time after it (the chain's engine tests today: their t0 is 2027), a
///   provider's time already past *for the caller* still replaces a running estimate: the very
///   herd finding 1 of review 33b fixed, which an engine test therefore cannot catch (and whose
///   outcome flips once the wall clock passes t0).
/// The store's decision should be a function of its inputs.
#[tokio::test]
async fn the_memory_stores_cooldown_replacement_does_not_depend_on_the_wall_clock() {
    use fallback_worker::routing::CooldownReason;
    use fallback_worker::state::{Cooldown, ProviderState, memory::MemoryStore};
    use std::time::{Duration, UNIX_EPOCH};
    let cooldown = |until, reason| Cooldown { until, reason, detail: String::new() };
    let mut wrong = Vec::new();
    for (when, caller_now) in [
        ("a caller's clock before the wall clock (2023)", UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        ("a caller's clock after the wall clock (2030)", UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
    ] {
        // A 429 without a time, then one saying "retry after 5 s": the provider's word ends it sooner.
        let store = MemoryStore::new();
        store.cool_down("p", cooldown(caller_now + Duration::from_secs(60), CooldownReason::RateLimitedEstimate)).await;
        store.cool_down("p", cooldown(caller_now + Duration::from_secs(5), CooldownReason::RateLimited)).await;
        let kept = store.cooldown_of("p").map(|c| c.reason);
        if kept != Some(CooldownReason::RateLimited) {
            wrong.push(format!("{when}: the provider's time 5 s ahead is refused, {kept:?} kept"));
        }
        // A provider's time already past for the caller (a notice come late) and a running estimate.
        let store = MemoryStore::new();
        store.cool_down("p", cooldown(caller_now + Duration::from_secs(60), CooldownReason::RateLimitedEstimate)).await;
        store.cool_down("p", cooldown(caller_now - Duration::from_secs(1), CooldownReason::RateLimited)).await;
        let kept = store.cooldown_of("p").map(|c| c.reason);
        if kept != Some(CooldownReason::RateLimitedEstimate) {
            wrong.push(format!("{when}: a provider's time already past ends the running estimate ({kept:?} kept)"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// 811ec54 `repair_tool_call`: a call whose `arguments` are absent becomes `"{}"` ("a function
/// without parameters"), but one whose server says the same with an empty string — `""`, as
/// GLM through OpenRouter, Claude through gateways and DeepInfra answer for a tool without
/// parameters (hermes-agent#83937, autogen#7128, langchain#27602, aichat#1217) — is kept as
/// `""`. The SDK loads it, and then the client's `json.loads(call.function.arguments)` raises
/// (every one of those reports is that crash); a client that sends the history back (every tool
/// loop does) makes the next job fail on a vLLM-served provider, which parses the history's
/// arguments (vllm#19419: "JSON decode error when tool call argument is empty"). The project's
/// own request translators already read `""` as no arguments (`translate::tool_calls`: a blank
/// text is `{}`); the answer's mending, made for exactly this case, mends the absent spelling
/// and not the empty one.
#[test]
fn a_tool_call_whose_arguments_are_an_empty_string_is_mended_like_absent_ones() {
    let mut wrong = Vec::new();
    for given in [json!(""), json!("  ")] {
        let message = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "list_scopes", "arguments": given}}]});
        let body = answer_with(one_choice(message, json!("tool_calls"))).expect("a tool call is taken");
        let arguments = &body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"];
        let parses =
            arguments.as_str().and_then(|a| serde_json::from_str::<Value>(a).ok()).is_some_and(|v| v.is_object());
        if !parses {
            wrong.push(format!("{given} -> {arguments}"));
        }
    }
    // The absent spelling of the same call, for comparison: mended into "{}".
    let absent = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "list_scopes"}}]});
    let body = answer_with(one_choice(absent, json!("tool_calls"))).unwrap();
    let mended = &body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"];
    assert!(
        wrong.is_empty(),
        "arguments the client's json.loads cannot read, where absent ones become {mended}: {wrong:?}"
    );
}
