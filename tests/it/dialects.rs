//! Chains that mix API dialects, through the real queue and database: every answer comes back
//! as a chat.completion, every dialect's errors give the contract's outcomes and cooldowns.

use std::time::Duration;

use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use fallback_worker::routing::AttemptOutcome;
use lapin::BasicProperties;
use sqlx::Row;

use crate::support::*;

fn keyed(profile: Profile, key: &str) -> MockOptions {
    let mut options = MockOptions::new(profile);
    options.api_key = Some(key.into());
    options
}

fn set_key(var: &str, value: &str) {
    // Each test runs in its own process under nextest; no other thread reads this variable.
    unsafe { std::env::set_var(var, value) };
}

async fn reasons(env: &TestEnv) -> Vec<(String, String, i64)> {
    sqlx::query(
        "SELECT provider, coalesce(cooldown_reason, ''), greatest(0, extract(epoch FROM cooldown_until - now()))::bigint AS left_s \
         FROM provider_state WHERE cooldown_until > now() ORDER BY provider",
    )
    .fetch_all(&mut env.db().await)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn native_gemini_and_anthropic_answer_as_chat_completions() {
    let env = TestEnv::new().await;
    set_key("FWTEST_GEMINI_KEY", "AIza-test-key");
    set_key("FWTEST_ANTHROPIC_KEY", "sk-ant-test-key");
    let gemini = MockProvider::start(keyed(Profile::GeminiNative, "AIza-test-key")).await.unwrap();
    let claude = MockProvider::start(keyed(Profile::Anthropic, "sk-ant-test-key")).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}{}",
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\"\napi_key_env = \"FWTEST_GEMINI_KEY\""),
        provider("claude", &claude.base_url(), false, "kind = \"anthropic\"\napi_key_env = \"FWTEST_ANTHROPIC_KEY\""),
        chain("default", &["gemini"], ""),
        chain("paid", &["claude"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    let line = |id: &str, chain: &str| {
        serde_json::json!({"custom_id": id, "chain": chain, "body": {"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], "max_tokens": 50, "temperature": 0.1}})
        .to_string()
    };
    env.publish(&line("g-1", "default"), BasicProperties::default()).await;
    let (first, _) = env.next_result(&env.results).await;
    env.publish(&line("a-1", "paid"), BasicProperties::default()).await;
    let (second, _) = env.next_result(&env.results).await;
    for (result, content) in [(&first, "mock answer from gemini-model"), (&second, "mock answer from claude-model")] {
        assert!(result.is_success(), "{result:?}");
        let body = &result.response.as_ref().unwrap().body;
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], content);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 20);
    }
    let sent = &gemini.stats().bodies[0];
    assert_eq!(sent["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(sent["contents"][0]["role"], "user");
    assert_eq!(sent["generationConfig"]["maxOutputTokens"], 50);
    let sent = &claude.stats().bodies[0];
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["model"], "claude-model");
    assert_eq!(sent["max_tokens"], 50);
    worker.stop().await;
}

#[tokio::test]
async fn each_dialects_errors_give_the_contracts_outcomes_and_cooldowns() {
    let env = TestEnv::new().await;
    let gemini = MockProvider::start(MockOptions::new(Profile::GeminiNative)).await.unwrap();
    let claude = MockProvider::start(MockOptions::new(Profile::Anthropic)).await.unwrap();
    let broke = MockProvider::start(MockOptions::new(Profile::Anthropic)).await.unwrap();
    let openrouter = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    gemini.script([Scenario::RateLimited(RetryHint::Native(Duration::from_secs(58)))]);
    claude.script([Scenario::ServerError { status: 529, text: false }]);
    broke.script([Scenario::OutOfCredits]);
    let config = env.config(&format!(
        "{}{}{}{}{}",
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\""),
        provider("claude", &claude.base_url(), true, "kind = \"anthropic\""),
        provider("broke", &broke.base_url(), true, "kind = \"anthropic\""),
        provider("openrouter", &openrouter.base_url(), true, ""),
        chain("default", &["gemini", "claude", "broke", "openrouter"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("mix-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let outcomes: Vec<_> = result.routing.attempts.iter().map(|a| (a.provider.as_str(), a.outcome, a.status)).collect();
    assert_eq!(
        outcomes,
        vec![
            ("gemini", AttemptOutcome::RateLimited, Some(429)),
            ("claude", AttemptOutcome::RateLimited, Some(529)),
            ("broke", AttemptOutcome::AuthError, Some(400)),
            ("openrouter", AttemptOutcome::Ok, Some(200)),
        ]
    );
    let cooling = reasons(&env).await;
    let find = |name: &str| {
        cooling.iter().find(|(p, _, _)| p == name).cloned().unwrap_or_else(|| panic!("{name}: {cooling:?}"))
    };
    let (_, reason, left) = find("gemini");
    assert_eq!(reason, "rate_limited");
    assert!((50..=58).contains(&left), "RetryInfo.retryDelay: {left}");
    let (_, reason, left) = find("claude");
    assert_eq!(reason, "rate_limited_estimate", "no time given: the 60 s are ours");
    assert!((50..=60).contains(&left), "529 without a hint: 60 s, {left}");
    let (_, reason, left) = find("broke");
    assert_eq!(reason, "credits");
    assert!(left > 3500, "a low balance is a long cooldown: {left}");
    worker.stop().await;
}

#[tokio::test]
async fn refusals_that_are_about_the_request_move_on_without_cooldown() {
    let env = TestEnv::new().await;
    let gemini = MockProvider::start(MockOptions::new(Profile::GeminiNative)).await.unwrap();
    let claude = MockProvider::start(MockOptions::new(Profile::Anthropic)).await.unwrap();
    let groq = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    gemini.script([Scenario::SafetyBlock]);
    claude.script([Scenario::ContextTooLong]);
    let config = env.config(&format!(
        "{}{}{}{}",
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\""),
        provider("claude", &claude.base_url(), true, "kind = \"anthropic\""),
        provider("groq", &groq.base_url(), true, ""),
        chain("default", &["gemini", "claude", "groq"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("r-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let outcomes: Vec<_> = result.routing.attempts.iter().map(|a| (a.provider.as_str(), a.outcome)).collect();
    assert_eq!(
        outcomes,
        vec![
            ("gemini", AttemptOutcome::ClientError),
            ("claude", AttemptOutcome::ClientError),
            ("groq", AttemptOutcome::Ok)
        ]
    );
    assert!(result.routing.attempts[0].message.as_deref().unwrap().contains("SAFETY"));
    assert!(result.routing.attempts[1].message.as_deref().unwrap().contains("prompt is too long"));
    assert!(reasons(&env).await.is_empty(), "no cooldown");

    // A request a kind cannot carry is not sent at all.
    let with_logprobs = serde_json::json!({"custom_id": "logprobs-1", "body": {"messages": [{"role": "user", "content": "x"}],
        "logprobs": true}});
    env.publish(&with_logprobs.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let first = &result.routing.attempts[0];
    assert_eq!(
        (first.provider.as_str(), first.outcome, first.status),
        ("gemini", AttemptOutcome::SkippedCapability, None)
    );
    assert_eq!(first.message.as_deref(), Some("the gemini kind cannot carry `logprobs`"));
    assert_eq!(gemini.requests(), 1, "the logprobs job never reached the Gemini mock");
    assert_eq!(claude.requests(), 1);
    assert_eq!(result.routing.provider.as_deref(), Some("groq"));
    worker.stop().await;
}
