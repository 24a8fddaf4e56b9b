//! Answer checks (contract §7) end to end: mock providers that answer 200 badly on purpose,
//! through the real broker and database.

use fallback_worker::job::{ErrorCode, JobResult};
use fallback_worker::mock::{MockOptions, MockProvider, Profile, Scenario};
use fallback_worker::routing::AttemptOutcome;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::support::*;

/// A job asking for `{"echo": string}` by JSON Schema, with no completion cap of its own (so a
/// `length` finish is the provider's cap), plus `extra` top-level fields.
fn schema_job(custom_id: &str, extra: Value) -> String {
    let mut line = json!({"custom_id": custom_id, "body": {
        "messages": [{"role": "user", "content": "Answer with {\"echo\": \"hi\"}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "echo", "strict": true,
            "schema": {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"],
                       "additionalProperties": false}}}}});
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    line.to_string()
}

/// (provider, outcome, message) of each attempt.
fn attempts(result: &JobResult) -> Vec<(&str, AttemptOutcome, Option<&str>)> {
    result.routing.attempts.iter().map(|a| (a.provider.as_str(), a.outcome, a.message.as_deref())).collect()
}

async fn mocks(profiles: &[Profile]) -> Vec<MockProvider> {
    let mut out = Vec::new();
    for profile in profiles {
        out.push(MockProvider::start(MockOptions::new(*profile)).await.unwrap());
    }
    out
}

/// Providers named `names` on `mocks`, in one chain `default` with `chain_extra` keys.
fn config_text(names: &[&str], mocks: &[MockProvider], chain_extra: &str) -> String {
    let providers: String =
        names.iter().zip(mocks).map(|(name, mock)| provider(name, &mock.base_url(), true, "")).collect();
    format!("{providers}{}", chain("default", names, chain_extra))
}

#[tokio::test]
async fn each_bad_answer_moves_the_job_to_the_next_provider_and_is_listed_with_its_reason() {
    let env = TestEnv::new().await;
    let names = ["bad-empty", "bad-cut", "bad-prose", "bad-schema", "good"];
    let mocks =
        mocks(&[Profile::Sambanova, Profile::Openai, Profile::Groq, Profile::Openrouter, Profile::Cerebras]).await;
    let [empty, cut, prose, off, good] = &mocks[..] else { unreachable!() };
    empty.script([Scenario::EmptyAnswer]);
    cut.script([Scenario::CutOff]);
    prose.script([Scenario::ProseAroundJson]);
    off.script([Scenario::OffSchemaJson]);
    good.script([Scenario::Says(r#"{"echo": "hi"}"#.into())]);
    let worker = env.spawn_worker(env.config(&config_text(&names, &mocks, "")), "w1").await;

    env.publish(&schema_job("bad-1", json!({})), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(result.routing.provider.as_deref(), Some("good"));
    assert!(!result.routing.rejected);
    assert_eq!(
        attempts(&result),
        vec![
            ("bad-empty", AttemptOutcome::RejectedOutput, Some("empty content")),
            ("bad-cut", AttemptOutcome::RejectedOutput, Some("cut off at the provider's cap")),
            ("bad-prose", AttemptOutcome::RejectedOutput, Some("not JSON: expected value at line 1 column 1")),
            ("bad-schema", AttemptOutcome::RejectedOutput, Some("schema: /echo is required")),
            ("good", AttemptOutcome::Ok, None),
        ]
    );
    assert!(result.routing.attempts.iter().all(|a| a.status == Some(200) && a.until.is_none()));
    assert_eq!(result.response.as_ref().unwrap().body["choices"][0]["message"]["content"], r#"{"echo": "hi"}"#);
    let raw = serde_json::to_value(&result).unwrap();
    assert_eq!(raw["routing"].get("rejected"), None, "absent unless true");
    assert_eq!(raw["routing"]["attempts"][0]["outcome"], "rejected_output");

    // No provider that answered badly is cooling down: the next job is sent to the first one
    // again at once (it answers well this time).
    assert_eq!(env.cooling_providers().await, 0);
    env.publish(&job("bad-2"), BasicProperties::default()).await;
    let (next, _) = env.next_result(&env.results).await;
    assert_eq!(attempts(&next), vec![("bad-empty", AttemptOutcome::Ok, None)]);
    assert_eq!(empty.requests(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn bad_answers_in_the_gemini_and_anthropic_shapes_are_caught_too() {
    let env = TestEnv::new().await;
    let mocks = mocks(&[Profile::GeminiNative, Profile::Anthropic, Profile::Groq]).await;
    mocks[0].script([Scenario::EmptyAnswer]);
    mocks[1].script([Scenario::CutOff]);
    let text = format!(
        "{}{}{}{}",
        provider("gemini", &mocks[0].base_url(), true, "kind = \"gemini\""),
        provider("claude", &mocks[1].base_url(), true, "kind = \"anthropic\""),
        provider("groq", &mocks[2].base_url(), true, ""),
        chain("default", &["gemini", "claude", "groq"], "")
    );
    let worker = env.spawn_worker(env.config(&text), "w1").await;
    // No cap of its own: Anthropic's `max_tokens` (the dialect's default) is the provider's cap.
    let line = json!({"custom_id": "dialects-1", "body": {"messages": [{"role": "user", "content": "x"}]}});
    env.publish(&line.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(
        attempts(&result),
        vec![
            ("gemini", AttemptOutcome::RejectedOutput, Some("empty content")),
            ("claude", AttemptOutcome::RejectedOutput, Some("cut off at the provider's cap")),
            ("groq", AttemptOutcome::Ok, None),
        ]
    );
    worker.stop().await;
}

#[tokio::test]
async fn rejections_are_counted_per_provider_and_reason_in_metrics_and_status() {
    let env = TestEnv::new().await;
    let names = ["counted-a", "counted-b"];
    let mocks = mocks(&[Profile::Groq, Profile::Cerebras]).await;
    mocks[0].script([Scenario::EmptyAnswer, Scenario::ProseAroundJson]);
    mocks[1].script([Scenario::Success, Scenario::Says(r#"{"echo": "hi"}"#.into())]);
    let text = config_text(&names, &mocks, "");
    let mut config = env.config(&text);
    config.http.addr = "127.0.0.1:0".into();
    let worker = env.spawn_worker(config, "w1").await;
    // One after the other, so each job meets the scripted answers meant for it.
    for line in [job("count-1"), schema_job("count-2", json!({}))] {
        env.publish(&line, BasicProperties::default()).await;
        let (result, _) = env.next_result(&env.results).await;
        assert_eq!(result.routing.provider.as_deref(), Some("counted-b"), "{result:?}");
    }
    let addr = worker.http_addr.get().expect("the endpoint is bound");
    let page = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    for (reason, count) in [("empty", 1), ("not_json", 1)] {
        let series = format!(r#"fallback_rejected_outputs_total{{provider="counted-a",reason="{reason}"}} {count}"#);
        assert!(page.lines().any(|l| l == series), "{series} in\n{page}");
    }
    assert!(page.contains(r#"fallback_attempts_total{provider="counted-a",outcome="rejected_output"} 2"#), "{page}");

    let file = env.config_file(&text, "");
    let status = |json: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"));
        command.args(["--config", file.to_str().unwrap(), "status"]);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let output = status(true);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let statuses: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(statuses[0]["rejected_outputs"], json!({"empty": 1, "not_json": 1}));
    assert_eq!(statuses[0]["state"], "usable", "a rejection is not a cooldown");
    assert_eq!(statuses[1]["rejected_outputs"], json!({}));
    let table = String::from_utf8(status(false).stdout).unwrap();
    let line = table.lines().find(|l| l.starts_with("counted-a")).expect(&table);
    assert!(line.contains("2 (empty 1, not_json 1)"), "{table}");
    worker.stop().await;
}

#[tokio::test]
async fn a_job_that_set_max_tokens_accepts_a_length_finish() {
    let env = TestEnv::new().await;
    let names = ["capped", "other"];
    let mocks = mocks(&[Profile::Openai, Profile::Groq]).await;
    mocks[0].set_fallback(Scenario::CutOff);
    let worker = env.spawn_worker(env.config(&config_text(&names, &mocks, "")), "w1").await;
    // `job()` sets max_tokens: 16, so a `length` finish is the cap the job asked for.
    env.publish(&job("cap-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(attempts(&result), vec![("capped", AttemptOutcome::Ok, None)]);
    assert_eq!(result.response.as_ref().unwrap().body["choices"][0]["finish_reason"], "length");
    // The same answer to a job without a cap is the provider's cap: rejected.
    let uncapped = json!({"custom_id": "cap-2", "body": {"messages": [{"role": "user", "content": "x"}]}});
    env.publish(&uncapped.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(
        attempts(&result),
        vec![
            ("capped", AttemptOutcome::RejectedOutput, Some("cut off at the provider's cap")),
            ("other", AttemptOutcome::Ok, None)
        ]
    );
    worker.stop().await;
}

#[tokio::test]
async fn when_every_answer_is_rejected_the_job_fails_listing_each_reason() {
    let env = TestEnv::new().await;
    let names = ["first", "second"];
    let mocks = mocks(&[Profile::Groq, Profile::Openrouter]).await;
    mocks[0].set_fallback(Scenario::EmptyAnswer);
    mocks[1].set_fallback(Scenario::ProseAroundJson);
    let worker = env.spawn_worker(env.config(&config_text(&names, &mocks, "")), "w1").await;
    env.publish(&schema_job("all-1", json!({})), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let error = result.error.as_ref().expect("an error result");
    assert_eq!(error.code, ErrorCode::AllProvidersFailed);
    assert_eq!(
        error.message,
        "no answer from chain `default` passed the job's checks: first: rejected_output 200: empty content; \
         second: rejected_output 200: not JSON: expected value at line 1 column 1"
    );
    assert!(result.response.is_none() && !result.routing.rejected);
    assert_eq!((mocks[0].requests(), mocks[1].requests()), (1, 1), "each asked once, no waiting");
    assert_eq!(env.cooling_providers().await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn on_all_rejected_best_returns_the_last_answer_marked_rejected() {
    let env = TestEnv::new().await;
    let names = ["empty", "off-schema"];
    let mocks = mocks(&[Profile::Cerebras, Profile::Openai]).await;
    mocks[0].set_fallback(Scenario::EmptyAnswer);
    mocks[1].set_fallback(Scenario::OffSchemaJson);
    let config = env.config(&config_text(&names, &mocks, "accept = { on_all_rejected = \"best\" }"));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&schema_job("best-1", json!({})), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert!(result.routing.rejected);
    assert_eq!(result.routing.provider.as_deref(), Some("off-schema"), "the last rejected answer");
    assert_eq!(
        attempts(&result),
        vec![
            ("empty", AttemptOutcome::RejectedOutput, Some("empty content")),
            ("off-schema", AttemptOutcome::RejectedOutput, Some("schema: /echo is required")),
        ]
    );
    let content = result.response.as_ref().unwrap().body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), json!({"reply": "mock answer from off-schema-model"}));
    assert_eq!(serde_json::to_value(&result).unwrap()["routing"]["rejected"], true);
    worker.stop().await;
}

#[tokio::test]
async fn a_jobs_accept_overrides_the_chains() {
    let env = TestEnv::new().await;
    let names = ["terse", "fallback"];
    let mocks = mocks(&[Profile::Groq, Profile::Cerebras]).await;
    // The chain wants at least 40 characters; "mock answer from terse-model" has 28.
    let worker = env.spawn_worker(env.config(&config_text(&names, &mocks, "accept = { min_chars = 40 }")), "w1").await;
    env.publish(&job("terse-1"), BasicProperties::default()).await;
    let (chain_rule, _) = env.next_result(&env.results).await;
    assert_eq!(
        attempts(&chain_rule),
        vec![
            ("terse", AttemptOutcome::RejectedOutput, Some("too short: 28 characters, fewer than min_chars 40")),
            ("fallback", AttemptOutcome::RejectedOutput, Some("too short: 31 characters, fewer than min_chars 40")),
        ]
    );
    assert_eq!(chain_rule.error.map(|e| e.code), Some(ErrorCode::AllProvidersFailed));

    let own = json!({"custom_id": "terse-2", "accept": {"min_chars": 0},
        "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16}});
    env.publish(&own.to_string(), BasicProperties::default()).await;
    let (job_rule, _) = env.next_result(&env.results).await;
    assert_eq!(attempts(&job_rule), vec![("terse", AttemptOutcome::Ok, None)]);

    // This job asks for `best` on a chain that fails: it gets the last answer, marked.
    let best = json!({"custom_id": "terse-3", "accept": {"on_all_rejected": "best"},
        "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16}});
    env.publish(&best.to_string(), BasicProperties::default()).await;
    let (best, _) = env.next_result(&env.results).await;
    assert!(best.is_success() && best.routing.rejected, "{best:?}");
    assert_eq!(best.routing.provider.as_deref(), Some("fallback"));
    worker.stop().await;
}

#[tokio::test]
async fn a_malformed_accept_or_a_schema_that_does_not_compile_is_invalid_request() {
    let env = TestEnv::new().await;
    let mocks = mocks(&[Profile::Groq]).await;
    let worker = env.spawn_worker(env.config(&config_text(&["only"], &mocks, "")), "w1").await;
    env.publish(&schema_job("typo", json!({"accept": {"jsno": false}})), BasicProperties::default()).await;
    let bad_schema = json!({"custom_id": "bad-schema", "body": {"messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}}});
    env.publish(&bad_schema.to_string(), BasicProperties::default()).await;
    let mut results = env.results(&env.results, 2).await;
    results.sort_by(|a, b| b.custom_id.cmp(&a.custom_id));
    let expected = [
        ("typo", "`accept`: unknown field `jsno`"),
        ("bad-schema", "`body.response_format.json_schema.schema`: the JSON Schema does not compile"),
    ];
    for (result, (custom_id, needle)) in results.into_iter().zip(expected) {
        assert_eq!(result.custom_id.as_deref(), Some(custom_id));
        let error = result.error.expect("an error result");
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        assert!(error.message.contains(needle), "{}", error.message);
        assert!(env.client.next_message(&env.dead_queue(), PATIENCE).await.is_some(), "dead-lettered");
    }
    assert_eq!(mocks[0].requests(), 0);
    worker.stop().await;
}

#[tokio::test]
async fn a_tool_call_is_an_answer() {
    let env = TestEnv::new().await;
    let mocks = mocks(&[Profile::Groq, Profile::Cerebras]).await;
    mocks[0].script([Scenario::ToolCall]);
    let worker = env.spawn_worker(env.config(&config_text(&["caller", "other"], &mocks, "")), "w1").await;
    let line = json!({"custom_id": "tool-1", "body": {"messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}});
    env.publish(&line.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(attempts(&result), vec![("caller", AttemptOutcome::Ok, None)]);
    let message = &result.response.as_ref().unwrap().body["choices"][0]["message"];
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    worker.stop().await;
}
