//! Providers as they really fail (issue #8): a withdrawn model is found out by one request and
//! cools its provider down for every job; a moderation 403 fails over that one job and leaves the
//! provider usable for the others.

use std::time::{Duration, SystemTime};

use fallback_worker::cli::status::{self, ProviderStatus};
use fallback_worker::config::Config;
use fallback_worker::job::JobResult;
use fallback_worker::mock::{MockOptions, MockProvider, Profile, Scenario};
use fallback_worker::routing::AttemptOutcome;
use fallback_worker::state::postgres::PgStore;
use lapin::BasicProperties;

use crate::support::*;

fn outcomes(result: &JobResult) -> Vec<(&str, AttemptOutcome)> {
    result.routing.attempts.iter().map(|a| (a.provider.as_str(), a.outcome)).collect()
}

/// What `fallback-worker status` would print for `provider`.
async fn status_of(env: &TestEnv, config: &Config, provider: &str) -> ProviderStatus {
    let store = PgStore::connect_lazy(&env.database_url, 2).unwrap();
    let pools = status::collect_pools(config, &store).await.unwrap();
    let all = status::collect(config, &store, &pools).await.unwrap();
    all.into_iter().find(|s| s.provider == provider).unwrap()
}

/// A chain [withdrawn, good]: the withdrawn provider answers Groq's 404 `model_not_found` to
/// every request it gets.
async fn withdrawn_chain(env: &TestEnv) -> (MockProvider, MockProvider, Config) {
    let withdrawn = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    withdrawn.set_fallback(Scenario::ModelGone);
    let good = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}",
        provider("withdrawn", &withdrawn.base_url(), true, ""),
        provider("good", &good.base_url(), true, ""),
        chain("default", &["withdrawn", "good"], "")
    ));
    (withdrawn, good, config)
}

#[tokio::test]
async fn a_withdrawn_model_costs_one_request_not_one_per_job() {
    let env = TestEnv::new().await;
    let (withdrawn, good, config) = withdrawn_chain(&env).await;
    let worker = env.spawn_worker(config.clone(), "w1").await;

    // The first job finds out; the other 29 are published once its result is out, so the
    // cooldown it set is in place before they start (whatever the worker's concurrency).
    env.publish(&job("gone-0"), BasicProperties::default()).await;
    let (first, _) = env.next_result(&env.results).await;
    assert!(first.is_success(), "{first:?}");
    assert_eq!(outcomes(&first), vec![("withdrawn", AttemptOutcome::ModelUnavailable), ("good", AttemptOutcome::Ok)]);
    let gone = &first.routing.attempts[0];
    assert_eq!(gone.status, Some(404));
    assert!(gone.message.as_deref().is_some_and(|m| m.contains("does not exist")), "{gone:?}");

    for i in 1..30 {
        env.publish(&job(&format!("gone-{i}")), BasicProperties::default()).await;
    }
    let rest = env.results(&env.results, 29).await;
    for result in &rest {
        assert!(result.is_success(), "{result:?}");
        assert_eq!(result.routing.provider.as_deref(), Some("good"));
        assert_eq!(
            outcomes(result),
            vec![("withdrawn", AttemptOutcome::SkippedCooldown), ("good", AttemptOutcome::Ok)]
        );
    }
    assert_eq!(withdrawn.requests(), 1, "one request found out that the model is gone");
    assert_eq!(good.requests(), 30);

    // `status` says why, for about an hour (until an operator fixes the config).
    let withdrawn_status = status_of(&env, &config, "withdrawn").await;
    assert_eq!(withdrawn_status.state, "cooling");
    assert_eq!(withdrawn_status.reason.as_deref(), Some("model_unavailable"));
    let until = humantime::parse_rfc3339(withdrawn_status.until.as_deref().unwrap()).unwrap();
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(left > Duration::from_secs(55 * 60) && left <= Duration::from_secs(3600), "{left:?}");
    assert_eq!(status_of(&env, &config, "good").await.state, "usable");
    worker.stop().await;
}

#[tokio::test]
async fn thirty_jobs_at_once_call_a_withdrawn_model_at_most_once_per_job_in_flight() {
    let env = TestEnv::new().await;
    let (withdrawn, good, config) = withdrawn_chain(&env).await;
    let prefetch = usize::from(config.amqp.prefetch);
    let worker = env.spawn_worker(config, "w1").await;

    // All 30 at once: up to `prefetch` jobs start together and may each call the provider
    // before the first 404 lands. No job can start after it without seeing the cooldown: a
    // delivery slot frees only when a job is answered, and every job tries `withdrawn` first,
    // so the first answer comes after the first 404 and its cooldown.
    for i in 0..30 {
        env.publish(&job(&format!("burst-{i}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, 30).await;
    assert!(results.iter().all(|r| r.is_success() && r.routing.provider.as_deref() == Some("good")));
    let found_out =
        results.iter().filter(|r| r.routing.attempts[0].outcome == AttemptOutcome::ModelUnavailable).count();
    let calls = withdrawn.requests();
    assert!((1..=prefetch).contains(&calls), "{calls} requests to the withdrawn model with prefetch {prefetch}");
    assert_eq!(found_out, calls, "each request shows as one model_unavailable attempt");
    assert_eq!(good.requests(), 30);
    worker.stop().await;
}

#[tokio::test]
async fn a_moderation_403_fails_over_that_job_and_leaves_the_provider_usable() {
    let env = TestEnv::new().await;
    let moderated = MockProvider::start(MockOptions::new(Profile::Openrouter)).await.unwrap();
    moderated.script([Scenario::Moderation]);
    let backup = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}",
        provider("moderated", &moderated.base_url(), true, ""),
        provider("backup", &backup.base_url(), true, ""),
        chain("default", &["moderated", "backup"], "")
    ));
    let worker = env.spawn_worker(config.clone(), "w1").await;

    env.publish(&job("flagged"), BasicProperties::default()).await;
    let (flagged, _) = env.next_result(&env.results).await;
    assert!(flagged.is_success(), "{flagged:?}");
    assert_eq!(outcomes(&flagged), vec![("moderated", AttemptOutcome::ClientError), ("backup", AttemptOutcome::Ok)]);
    let refused = &flagged.routing.attempts[0];
    assert_eq!(refused.status, Some(403));
    assert!(refused.message.as_deref().is_some_and(|m| m.contains("requires moderation")), "{refused:?}");

    // Not a bad key: no cooldown for anyone.
    assert_eq!(env.cooling_providers().await, 0);
    assert_eq!(status_of(&env, &config, "moderated").await.state, "usable");

    env.publish(&job("clean"), BasicProperties::default()).await;
    let (clean, _) = env.next_result(&env.results).await;
    assert_eq!(outcomes(&clean), vec![("moderated", AttemptOutcome::Ok)]);
    assert_eq!((moderated.requests(), backup.requests()), (2, 1));
    worker.stop().await;
}
