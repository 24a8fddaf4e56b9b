//! Adversarial review, round 2, of f730b5f (openai-kind answers mended into what the OpenAI SDK
//! loads), 968caf9 (the outage write-back retried, stable ids) and fb6e889 (the provider's word
//! replaces our estimate, sooner or later; a guessed daily reset is an estimate). Each test is a
//! fault found and fails on fb6e889.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::providers::openai::interpret;
use fallback_worker::routing::CooldownReason;
use fallback_worker::state::{Cooldown, ProviderState};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::review_s33::store_behind_relay;
use crate::support::*;

pub(crate) fn answer_with(choices: Value) -> Result<Value, String> {
    let body = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": choices,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), SystemTime::now())
        .map(|done| done.body)
        .map_err(|failure| format!("{:?} {:?}: {}", failure.kind, failure.status, failure.message))
}

pub(crate) fn one_choice(message: Value, finish: Value) -> Value {
    json!([{"index": 0, "message": message, "finish_reason": finish}])
}

/// f730b5f `text_of_parts`: a `content` given as parts is mended only when every part is a
/// `text` one; any other part leaves the list as it is, and the answer is refused as garbled
/// (`server_error`, the chain moves on: a good answer lost, maybe a paid call made instead).
/// Mistral's reasoning models (Magistral) answer on their OpenAI-compatible endpoint with
/// exactly that: a `thinking` chunk (itself a list of text chunks), then the `text` chunk of the
/// answer. The SDK would load the answer once its text is taken (the thinking is not the
/// answer; OpenRouter, DeepSeek and vLLM give it as `reasoning`/`reasoning_content` beside it).
#[test]
fn a_reasoning_models_answer_with_a_thinking_chunk_is_not_refused_as_garbled() {
    let message = json!({"role": "assistant", "tool_calls": null, "content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": "The user asks for 6 * 7, which is 42."}]},
        {"type": "text", "text": "42"}
    ]});
    let body = answer_with(one_choice(message, json!("stop")))
        .expect("Magistral's answer (a thinking chunk, then the text) is refused as garbled");
    let content = &body["choices"][0]["message"]["content"];
    assert!(content.as_str().is_some_and(|c| c.contains("42")), "content given to the client: {content}");
}

/// f730b5f `finish_reason_for`: every finish reason outside its short table is mended into
/// `stop`, "absent or unknown → stop". Among the servers' own words are ones that say the answer
/// did *not* end well, and `stop` is what the `finish` check (contract §7) lets through and what
/// a client reads as a complete answer: a cut-off or filtered answer reaches the client as a
/// good one (before f730b5f the same answers reached the client with the server's word, which
/// at least did not claim `stop`).
/// - Anthropic's `model_context_window_exceeded` (its OpenAI-compatible endpoint passes stop
///   reasons through): the answer was cut off by the context window: `length`.
/// - Gemini's blocked finishes beyond `SAFETY`/`RECITATION`: `BLOCKLIST`, `PROHIBITED_CONTENT`,
///   `SPII`, `IMAGE_SAFETY`: `content_filter`.
/// - `ERROR` (any case other than the exact `error` that `success` turns into a server error):
///   mended into `stop`.
#[test]
fn a_finish_that_says_the_answer_was_cut_off_or_blocked_is_not_mended_into_stop() {
    let message = json!({"role": "assistant", "content": "The first half of an ans"});
    let mut wrong = Vec::new();
    for given in ["model_context_window_exceeded", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "ERROR"] {
        match answer_with(one_choice(message.clone(), json!(given))) {
            Ok(body) if body["choices"][0]["finish_reason"] == "stop" => wrong.push(given),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "finish reasons mended into `stop`, passing the `finish` check: {wrong:?}");
}

/// f730b5f with `n > 1`: `success` refuses an answer whose *first* choice ended in error
/// (`finish_reason: "error"`, OpenRouter's word for a generation that failed, providers.md
/// §3.4), but a later choice with the same error is mended: its `finish_reason` becomes
/// `stop`, and the client is told the failed generation completed normally.
#[test]
fn a_later_choice_that_ended_in_error_is_not_mended_into_stop() {
    let ok = json!({"index": 0, "message": {"role": "assistant", "content": "one"}, "finish_reason": "stop"});
    let failed = json!({"index": 1, "message": {"role": "assistant", "content": ""}, "finish_reason": "error",
        "error": {"code": 502, "message": "Provider disconnected unexpectedly"}});
    if let Ok(body) = answer_with(json!([ok, failed])) {
        assert_ne!(
            body["choices"][1]["finish_reason"], "stop",
            "the second choice ended in error and the client is told `stop`: {}",
            body["choices"][1]
        );
    }
}

/// f730b5f: a message that carries tool calls but whose server left `finish_reason` out (or
/// null, as streaming-oriented servers such as llama.cpp and some vLLM builds do on a
/// non-stream answer) is mended into `stop`, not `tool_calls`: a client whose loop runs the
/// tools on `finish_reason == "tool_calls"` (the OpenAI cookbook's) takes the answer as final
/// and never runs them. The mending has the message at hand.
#[test]
fn a_tool_call_answer_without_a_finish_is_mended_into_tool_calls() {
    let message = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
    ]});
    let body = answer_with(one_choice(message, Value::Null)).unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{}", body["choices"][0]);
}

/// The shared row's cooldown of `provider`: its reason, and its end.
async fn shared_cooldown(env: &TestEnv, provider: &str) -> (String, SystemTime) {
    let (reason, until_ms): (String, i64) = sqlx::query_as(
        "SELECT cooldown_reason, fallback_epoch_ms(cooldown_until) FROM provider_state WHERE provider = $1",
    )
    .bind(provider)
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    (reason, UNIX_EPOCH + Duration::from_millis(until_ms.max(0) as u64))
}

/// fb6e889 `share_cooldown`'s CASE (and `Cooldown::replaces`): the provider's word now replaces
/// our estimate "sooner or later" — with no regard to whether it has already ended, or was
/// given before the estimate. The outage write-back shares every cooldown learnt during the
/// outage as it was (`write_back` filters none that ended meanwhile). Worker A, cut from the
/// database, gets a 429 "retry after 1 s". While A is away, worker B gets a 429 with no time
/// from the same provider: our 60 s estimate, shared. When A's database comes back, its
/// write-back puts its long-ended 429 over B's running estimate: the shared row (and, by the
/// notice, every worker's view) says the provider is usable *now*, seconds after it refused B:
/// the herd after a 429 that contract §6 forbids. Before fb6e889 the older, ended cooldown
/// could not replace a later one.
#[tokio::test]
async fn an_ended_providers_word_written_back_does_not_erase_a_running_estimate() {
    let env = TestEnv::new().await;
    let (a, relay) = store_behind_relay(&env).await;
    let b = store_at(&env.database_url, DEFAULT_POOL).await;
    relay.set_down(true);
    // A's cooldown, learnt during its outage, has ended by the time it is shared.
    let word = Cooldown {
        until: SystemTime::now() - Duration::from_millis(500),
        reason: CooldownReason::RateLimited,
        detail: "429, retry-after: 1".into(),
    };
    a.cool_down("p", word).await;
    assert!(a.is_degraded(), "A could not share its cooldown: kept for the write-back");
    let estimate = Cooldown {
        until: SystemTime::now() + Duration::from_secs(60),
        reason: CooldownReason::RateLimitedEstimate,
        detail: "429 without a retry time".into(),
    };
    b.cool_down("p", estimate).await;
    let (reason, until) = shared_cooldown(&env, "p").await;
    assert_eq!(reason, "rate_limited_estimate");
    assert!(until > SystemTime::now() + Duration::from_secs(50));

    relay.set_down(false);
    eventually("A's database is back and its outage written back", || async { !a.is_degraded() }).await;
    let (reason, until) = shared_cooldown(&env, "p").await;
    let now = SystemTime::now();
    assert!(
        until > now + Duration::from_secs(30),
        "B's 429 of a moment ago is erased by A's ended one: the shared row says {reason} until {:?} ago",
        now.duration_since(until).unwrap_or_default()
    );
}

/// fb6e889: a per-day quota spent with no reset given (Cerebras' "Tokens per day limit
/// exceeded" without its `x-ratelimit-reset-*-day` header, a Groq `(TPD)` without "try again
/// in") cools the provider until our guess of midnight, `quota_day_estimate`. Any
/// `rate_limited` now replaces it, however soon it ends — also one that speaks of another limit:
/// a per-minute 429 ("retry-after: 2") from a call that was in flight beside the one that spent
/// the day. The day's quota is still spent, but every worker calls the provider again 2 s later,
/// each call refused per day (and on OpenRouter's free tier, failed attempts count toward the
/// daily quota, providers.md §3.5). A per-minute time says nothing of the day's reset: the
/// estimate it should replace is a per-minute one (`rate_limited_estimate`), not the day's.
#[tokio::test]
async fn a_per_minute_retry_time_does_not_end_a_spent_daily_quota() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let now = SystemTime::now();
    let day = Cooldown {
        until: now + Duration::from_secs(6 * 3600),
        reason: CooldownReason::QuotaDayEstimate,
        detail: "429 Tokens per day limit exceeded".into(),
    };
    store.cool_down("p", day).await;
    let minute = Cooldown {
        until: now + Duration::from_secs(2),
        reason: CooldownReason::RateLimited,
        detail: "429 Requests per minute limit exceeded, retry-after: 2".into(),
    };
    store.cool_down("p", minute).await;
    let (reason, until) = shared_cooldown(&env, "p").await;
    assert!(
        until > now + Duration::from_secs(3600),
        "the spent daily quota is forgotten: the shared row says {reason}, {:?} ahead",
        until.duration_since(now).unwrap_or_default()
    );
}

/// 968caf9 finding 4's fix (`shared_id` kept, `NOT EXISTS` guard) loses the answer of a call
/// that was in flight when the write-back committed and whose commit answer was lost. The first
/// try wrote the call's row with its *estimate* (10 tokens, leaving at the flight's end), but,
/// erroring, registered no `written_back` entry for it; the call's answer (5000 tokens) then
/// finds none (`queue_answer`: a local call not written back is left to the write-back's own
/// view) and is only counted in the own view. The retry plans the call as answered, with its
/// 5000 tokens, but the guard sees its row there and skips it: the window keeps the estimate,
/// and nothing else will ever write the answer. The shared window counts 4990 tokens less than
/// the provider was sent for the rest of its hour; every worker admits past the limit by it.
#[tokio::test]
async fn an_answer_to_a_call_whose_write_back_commit_answer_was_lost_is_counted() {
    use crate::credits::{ask, granted, tokens};
    use crate::review_finish::used;
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [tokens(1_000_000)];
    relay.set_down(true);
    let in_flight = granted(&store, ask(&limits, 10)).await;
    assert!(store.is_degraded());

    let mut admin = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review_s33b_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER review_s33b_slow_commit AFTER INSERT ON quota_use \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION review_s33b_slow_commit();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    relay.set_down(false);
    eventually("the write-back commits", || async {
        let committing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
               AND query ILIKE 'commit%'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        committing > 0
    })
    .await;
    relay.hold(true);
    eventually("the write-back has committed", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use WHERE scope = 'p'")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        rows > 0
    })
    .await;
    sqlx::raw_sql("DROP TRIGGER review_s33b_slow_commit ON quota_use").execute(&mut admin).await.unwrap();
    assert_eq!(used(&env, "provider", "p", "tokens").await, 10, "written back in flight, with its estimate");
    // The call's answer comes while the commit's answer is held back.
    store.finish(in_flight, Some(5000), SystemTime::now()).await;
    // The commit's answer is lost with the link; the write-back is retried.
    relay.cut();
    relay.hold(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    let counted = crate::review_s33::settled_count(&env, "tokens", 5000).await;
    assert_eq!(counted, 5000, "the call used 5000 tokens; the shared window counts {counted}");
}

/// f730b5f `answer_problems`: a tool call without `function.arguments` is refused as garbled
/// (`server_error`, the chain moves on), with nothing mended. OpenRouter answers so for
/// Anthropic models calling a tool that takes no arguments (OpenRouterTeam/ai-sdk-provider
/// issue #287, 2025-12: `"function": {"name": "list_available_components"}`, "Expected:
/// `"arguments": "{}"`"). A good answer — the tool the job asked for, called rightly — is lost,
/// and the next provider (maybe a paid one) is called instead. `"{}"` is what the call means.
#[test]
fn a_tool_call_without_arguments_is_not_refused_as_garbled() {
    let message = json!({"role": "assistant", "content": "", "tool_calls": [
        {"id": "toolu_bdrk_01", "type": "function", "index": 0, "function": {"name": "list_available_components"}}
    ]});
    let body = answer_with(one_choice(message, json!("tool_calls")))
        .expect("OpenRouter's tool call with no arguments is refused as garbled");
    let arguments = &body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"];
    assert!(arguments.is_string(), "{arguments}");
}

/// f730b5f `repair_answer` drops a `usage` the SDK would refuse *before* `success` reads its
/// `total_tokens`: a server that leaves `completion_tokens` out (as in a Bedrock-backed
/// OpenAI-compatible answer quoted in SecretiveShell/MCP-Bridge issue #48:
/// `"usage":{"prompt_tokens":1066,"total_tokens":103}`) now reports no count at all, and the
/// provider's token windows keep the call's estimate instead of the count the provider gave
/// (contract §6: "corrected from `usage` after it"). Before f730b5f the count was read.
#[test]
fn a_usage_the_sdk_would_refuse_still_corrects_the_token_count() {
    let body = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1066, "total_tokens": 1103}});
    let done = interpret(200, &HeaderMap::new(), body.to_string().as_bytes(), SystemTime::now()).unwrap();
    assert_eq!(
        done.total_tokens,
        Some(1103),
        "the provider said 1103 tokens; the count read is {:?}",
        done.total_tokens
    );
}

/// Whether a `COMMIT` is running in the test's database.
pub(crate) async fn committing(env: &TestEnv) -> bool {
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
           AND query ILIKE 'commit%'",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    running > 0
}

/// 968caf9: `keep_for_the_write_back` spawns `write_back_what_is_left` on the answers'
/// tracker when the worker is not degraded, and that loop retries "until it lands", with no
/// bound (the answers' own retry, `write_answers_again`, gives each answer four tries).
/// `answers_recorded` — what a stopping worker waits on, "within the bound of a state call" —
/// closes the tracker and waits for it: while the database does not take the write (here it
/// refuses one answer for good; a row held by another session's long transaction does the same
/// for as long), the worker cannot stop: SIGTERM does not end it (contract §1: drain and exit).
/// The path: a call admitted while the first write-back commits, still in flight at the
/// second (`write_back_what_is_left`), answered while that one commits; its answer, written by
/// `remember_written_back_in_flight`, fails and goes to `keep_for_the_write_back` outside an
/// outage.
#[tokio::test]
async fn a_stopping_worker_does_not_wait_for_a_write_back_the_database_refuses() {
    use crate::credits::{ask, granted, tokens};
    let env = TestEnv::new().await;
    let (store, relay) = store_behind_relay(&env).await;
    let limits = [tokens(1_000_000)];
    let mut admin = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review_s33b_slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER review_s33b_slow_commit AFTER INSERT ON quota_use \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION review_s33b_slow_commit(); \
         CREATE FUNCTION review_s33b_refuse() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'review33b: this answer is refused'; END $$; \
         CREATE TRIGGER review_s33b_refuse BEFORE UPDATE ON quota_use FOR EACH ROW \
           WHEN (NEW.amount = 5000) EXECUTE FUNCTION review_s33b_refuse();",
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
    eventually("the second write-back has committed", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(DISTINCT call_id) FROM quota_use")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        rows == 2
    })
    .await;
    // The answer's write is refused (a rolled-back transaction), then written back again.
    let rollbacks = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()")
                .fetch_one(&mut env.db().await)
                .await
                .unwrap();
        n
    };
    let before = rollbacks().await;
    eventually("the refused answer is being written back", || async { rollbacks().await >= before + 2 }).await;
    // The worker is told to stop.
    let stopped = tokio::time::timeout(Duration::from_secs(15), store.answers_recorded()).await;
    assert!(stopped.is_ok(), "15 s after the stop began, answers_recorded still waits on the write-back's retries");
}
