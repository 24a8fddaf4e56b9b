//! The seed's chain behaviours, end to end: broker → worker → mock providers → broker.

use std::time::{Duration, SystemTime};

use fallback_worker::job::ErrorCode;
use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use fallback_worker::routing::AttemptOutcome;
use lapin::BasicProperties;
use sqlx::Row;

use crate::support::*;

fn outcomes(result: &fallback_worker::job::JobResult) -> Vec<(&str, AttemptOutcome)> {
    result.routing.attempts.iter().map(|a| (a.provider.as_str(), a.outcome)).collect()
}

async fn cooldown_left(env: &TestEnv, provider: &str) -> (String, Duration) {
    let row = sqlx::query(
        "SELECT cooldown_reason, (extract(epoch FROM cooldown_until) * 1000)::bigint AS until_ms FROM provider_state WHERE provider = $1",
    )
    .bind(provider)
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    let until = SystemTime::UNIX_EPOCH + Duration::from_millis(row.get::<i64, _>("until_ms") as u64);
    (row.get("cooldown_reason"), until.duration_since(SystemTime::now()).unwrap_or_default())
}

#[tokio::test]
async fn a_429_moves_to_the_next_provider_and_cools_the_first_down() {
    let env = TestEnv::new().await;
    let groq = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let cerebras = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    groq.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(60.0))]);
    let config = env.config(&format!(
        "{}{}{}",
        provider("groq", &groq.base_url(), true, ""),
        provider("cerebras", &cerebras.base_url(), true, ""),
        chain("default", &["groq", "cerebras"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;

    env.publish(&job("doc-1"), BasicProperties::default()).await;
    let (first, properties) = env.next_result(&env.results).await;
    assert!(first.is_success(), "{first:?}");
    assert_eq!(first.custom_id.as_deref(), Some("doc-1"));
    assert_eq!(
        properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("doc-1"),
        "correlation_id defaults to custom_id"
    );
    assert_eq!(first.routing.provider.as_deref(), Some("cerebras"));
    assert_eq!(first.routing.model.as_deref(), Some("cerebras-model"));
    assert_eq!(first.routing.free, Some(true));
    assert_eq!(outcomes(&first), vec![("groq", AttemptOutcome::RateLimited), ("cerebras", AttemptOutcome::Ok)]);
    assert_eq!(first.routing.attempts[0].status, Some(429));
    assert_eq!(first.response.as_ref().unwrap().body["object"], "chat.completion");

    let (reason, left) = cooldown_left(&env, "groq").await;
    assert_eq!(reason, "rate_limited");
    assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60), "{left:?}");

    env.publish(&job("doc-2"), BasicProperties::default()).await;
    let (second, _) = env.next_result(&env.results).await;
    assert_eq!(outcomes(&second), vec![("groq", AttemptOutcome::SkippedCooldown), ("cerebras", AttemptOutcome::Ok)]);
    assert_eq!(groq.requests(), 1, "no request to a cooling provider");
    worker.stop().await;
}

#[tokio::test]
async fn a_timeout_cools_the_provider_down_30s() {
    let env = TestEnv::new().await;
    let slow = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    let backup = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    slow.script([Scenario::Hang]);
    let config = env.config(&format!(
        "{}{}{}",
        provider("slow", &slow.base_url(), true, "timeout = \"300ms\""),
        provider("backup", &backup.base_url(), true, ""),
        chain("default", &["slow", "backup"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("t-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(outcomes(&result), vec![("slow", AttemptOutcome::Timeout), ("backup", AttemptOutcome::Ok)]);
    let (reason, left) = cooldown_left(&env, "slow").await;
    assert_eq!(reason, "unreachable");
    assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30), "{left:?}");
    worker.stop().await;
}

#[tokio::test]
async fn other_errors_move_on_without_a_cooldown() {
    let env = TestEnv::new().await;
    let broken = MockProvider::start(MockOptions::new(Profile::Huggingface)).await.unwrap();
    let narrow = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let good = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    broken.script([Scenario::ServerError { status: 503, text: true }]);
    narrow.script([Scenario::ContextTooLong]);
    let config = env.config(&format!(
        "{}{}{}{}",
        provider("broken", &broken.base_url(), true, ""),
        provider("narrow", &narrow.base_url(), true, ""),
        provider("good", &good.base_url(), true, ""),
        chain("default", &["broken", "narrow", "good"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("e-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(
        outcomes(&result),
        vec![
            ("broken", AttemptOutcome::ServerError),
            ("narrow", AttemptOutcome::ClientError),
            ("good", AttemptOutcome::Ok)
        ]
    );
    let cooling = env.cooling_providers().await;
    assert_eq!(cooling, 0, "a lone 5xx and a client error cool nothing down");
    // The provider got the job's body with its own model.
    let sent = &good.stats().bodies[0];
    assert_eq!(sent["model"], "good-model");
    assert_eq!(sent["max_tokens"], 16);
    worker.stop().await;
}

#[tokio::test]
async fn a_job_waits_for_a_cooling_provider_and_is_answered_when_it_recovers() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(1.0))]);
    let config =
        env.config(&format!("{}{}", provider("only", &only.base_url(), true, ""), chain("default", &["only"], "")));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("w-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(outcomes(&result), vec![("only", AttemptOutcome::RateLimited), ("only", AttemptOutcome::Ok)]);
    assert!(result.routing.total_ms >= 1000, "it waited for the retry-after: {}", result.routing.total_ms);
    worker.stop().await;
}

#[tokio::test]
async fn a_long_wait_parks_the_job_in_a_delay_queue_and_answers_it_later() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::RetryAfterMs(2500))]);
    let config = env.config_with(
        &format!("{}{}", provider("only", &only.base_url(), true, ""), chain("default", &["only"], "")),
        "hold_limit = \"500ms\"",
    );
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("p-1"), BasicProperties::default().with_correlation_id("corr-p-1".into())).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-p-1"));
    let seen = outcomes(&result);
    assert_eq!(seen.first(), Some(&("only", AttemptOutcome::RateLimited)), "attempts survive the park: {seen:?}");
    assert_eq!(seen.last(), Some(&("only", AttemptOutcome::Ok)));
    assert_eq!(only.requests(), 2);
    assert!(result.routing.total_ms >= 2500, "{}", result.routing.total_ms);
    worker.stop().await;
}

/// A producer that publishes a parked job again (a retry, a backlog enqueued twice) gets every
/// copy answered: copies and parked jobs coming back are new messages, not deliveries the
/// worker failed on. (A black-box run: 11 copies of a parked job made every one of them
/// `internal_error` "delivered 11 times without an answer", and the key stayed poisoned.)
#[tokio::test]
async fn copies_of_a_parked_job_published_again_are_all_answered_none_dead_lettered() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::RetryAfterMs(3000))]);
    let config = env.config_with(
        &format!("{}{}", provider("only", &only.base_url(), true, ""), chain("default", &["only"], "")),
        "hold_limit = \"500ms\"\nmax_deliveries = 2",
    );
    let worker = env.spawn_worker(config, "w1").await;
    let same_job = || BasicProperties::default().with_message_id("the-same-job".into());
    env.publish(&job("dup-1"), same_job()).await;
    eventually("the first call was answered 429", || async { only.requests() >= 1 }).await;
    for _ in 0..4 {
        env.publish(&job("dup-1"), same_job()).await;
    }
    for copy in 0..5 {
        let (result, _) = env.next_result(&env.results).await;
        assert!(result.is_success(), "copy {copy}: {result:?}");
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_provider_that_stays_away_past_max_wait_gives_deadline_exceeded() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::Daily(SystemTime::now() + Duration::from_secs(7200)))]);
    let config = env.config(&format!(
        "{}{}",
        provider("only", &only.base_url(), true, ""),
        chain("default", &["only"], "max_wait = \"1m\"")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("d-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let error = result.error.expect("an error result");
    assert_eq!(error.code, ErrorCode::DeadlineExceeded);
    assert!(result.response.is_none());
    let (reason, left) = cooldown_left(&env, "only").await;
    assert_eq!(reason, "quota_day", "a daily quota cools down until its reset");
    assert!(left > Duration::from_secs(7100), "{left:?}");
    worker.stop().await;
}

#[tokio::test]
async fn a_job_max_wait_overrides_the_chain() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(30.0))]);
    let config = env.config(&format!(
        "{}{}",
        provider("only", &only.base_url(), true, ""),
        chain("default", &["only"], "max_wait = \"1h\"")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    let line = serde_json::json!({"custom_id": "m-1", "max_wait": "5s", "body": {"messages": [{"role": "user", "content": "x"}]}});
    env.publish(&line.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::DeadlineExceeded));
    worker.stop().await;
}

#[tokio::test]
async fn every_provider_refusing_the_request_is_all_providers_failed() {
    let env = TestEnv::new().await;
    let a = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let b = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    a.set_fallback(Scenario::ContextTooLong);
    b.set_fallback(Scenario::ContextTooLong);
    let config = env.config(&format!(
        "{}{}{}",
        provider("a", &a.base_url(), true, ""),
        provider("b", &b.base_url(), false, ""),
        chain("default", &["a", "b"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("f-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let error = result.error.expect("an error result");
    assert_eq!(error.code, ErrorCode::AllProvidersFailed);
    assert!(error.message.contains("maximum context length"), "each provider's own error is kept: {}", error.message);
    worker.stop().await;
}

#[tokio::test]
async fn a_success_reporting_a_spent_budget_cools_the_provider_before_any_429() {
    let env = TestEnv::new().await;
    let groq = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let backup = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    groq.script([Scenario::SpentBudget(Duration::from_secs(90))]);
    let config = env.config(&format!(
        "{}{}{}",
        provider("groq", &groq.base_url(), true, ""),
        provider("backup", &backup.base_url(), true, ""),
        chain("default", &["groq", "backup"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("h-1"), BasicProperties::default()).await;
    let (first, _) = env.next_result(&env.results).await;
    assert_eq!(first.routing.provider.as_deref(), Some("groq"));
    let (reason, left) = cooldown_left(&env, "groq").await;
    assert_eq!(reason, "rate_limited");
    assert!(left > Duration::from_secs(80) && left <= Duration::from_secs(90), "{left:?}");
    env.publish(&job("h-2"), BasicProperties::default()).await;
    let (second, _) = env.next_result(&env.results).await;
    assert_eq!(outcomes(&second), vec![("groq", AttemptOutcome::SkippedCooldown), ("backup", AttemptOutcome::Ok)]);
    assert_eq!(groq.stats().rate_limited, 0);
    assert_eq!(groq.requests(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_prompt_too_long_for_a_context_window_skips_the_provider_without_a_request() {
    let env = TestEnv::new().await;
    let small = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    let large = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}",
        provider("small", &small.base_url(), true, "context_window = 100"),
        provider("large", &large.base_url(), true, "context_window = 100000"),
        chain("default", &["small", "large"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    let long = serde_json::json!({"custom_id": "long", "body": {"messages": [{"role": "user", "content": "word ".repeat(200)}]}});
    env.publish(&long.to_string(), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(outcomes(&result), vec![("small", AttemptOutcome::SkippedContext), ("large", AttemptOutcome::Ok)]);
    assert_eq!(small.requests(), 0);
    let cooling = env.cooling_providers().await;
    assert_eq!(cooling, 0, "a context skip cools nothing down");
    worker.stop().await;
}

#[tokio::test]
async fn the_paid_net_waits_for_free_wait_then_answers() {
    let env = TestEnv::new().await;
    let free = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let paid = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    free.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(300.0))]);
    let config = env.config(&format!(
        "{}{}{}",
        provider("free", &free.base_url(), true, ""),
        provider("paid", &paid.base_url(), false, ""),
        chain("default", &["free", "paid"], "free_wait = \"1500ms\"")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("paid-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success());
    assert_eq!(result.routing.provider.as_deref(), Some("paid"));
    assert_eq!(result.routing.free, Some(false));
    let seen = outcomes(&result);
    assert_eq!(&seen[..2], &[("free", AttemptOutcome::RateLimited), ("paid", AttemptOutcome::SkippedPaid)]);
    assert_eq!(seen.last(), Some(&("paid", AttemptOutcome::Ok)));
    assert!(result.routing.total_ms >= 1500, "the paid call waited for free_wait: {}", result.routing.total_ms);
    assert_eq!(paid.requests(), 1);
    worker.stop().await;
}
