//! Providers that share a `[[quotas]]` pool (contract §5, §6): a 429 the provider scopes to the
//! account, met through one of them, keeps every worker from sending a request to the others.

use std::time::{Duration, SystemTime};

use fallback_worker::cli::status;
use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use fallback_worker::routing::AttemptOutcome;
use lapin::BasicProperties;
use sqlx::Row;

use crate::support::*;

fn line(custom_id: &str, chain: &str) -> String {
    serde_json::json!({"custom_id": custom_id, "chain": chain,
        "body": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}})
    .to_string()
}

/// Providers `first` (chain `default`) and `second` (chain `second`) draw from one pool, each
/// chain falling back on `backup`. `first` meets the account's 429 on one worker; the job on
/// `second` then goes to the *other* worker, which must skip `second` as cooling down without
/// sending it anything. `extra` is each pooled provider's `kind` line.
async fn account_429_spares_the_pool(first: (Profile, &str), second: (Profile, &str)) {
    let env = TestEnv::new().await;
    let a = MockProvider::start(MockOptions::new(first.0)).await.unwrap();
    let b = MockProvider::start(MockOptions::new(second.0)).await.unwrap();
    let backup = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    let reset = SystemTime::now() + Duration::from_secs(3 * 3600);
    a.script([Scenario::RateLimited(RetryHint::Account(reset))]);
    let pooled = |kind: &str| format!("quotas = [\"account\"]\n{kind}");
    let config = env.config(&format!(
        "{}{}{}{}{}{}",
        provider("first", &a.base_url(), true, &pooled(first.1)),
        provider("second", &b.base_url(), true, &pooled(second.1)),
        provider("backup", &backup.base_url(), true, ""),
        "[[quotas]]\nname = \"account\"\nlimits = [{ requests = 1000, per = \"1d\" }]\n\n",
        chain("default", &["first", "backup"], ""),
        chain("second", &["second", "backup"], ""),
    ));
    let one = env.spawn_worker(config.clone(), "worker-one").await;
    let two = env.spawn_worker(config.clone(), "worker-two").await;

    env.publish(&line("meets-the-limit", "default"), BasicProperties::default()).await;
    let (met, _) = env.next_result(&env.results).await;
    assert_eq!(met.routing.provider.as_deref(), Some("backup"), "{met:?}");
    assert_eq!(
        (met.routing.attempts[0].outcome, met.routing.attempts[0].status),
        (AttemptOutcome::RateLimited, Some(429))
    );
    // Only the other worker is left to take the next job.
    let (stays, leaves) = if met.routing.worker == "worker-one" { (two, one) } else { (one, two) };
    let other = if met.routing.worker == "worker-one" { "worker-two" } else { "worker-one" };
    leaves.stop().await;

    env.publish(&line("after", "second"), BasicProperties::default()).await;
    let (after, _) = env.next_result(&env.results).await;
    assert_eq!(after.routing.worker, other);
    assert_eq!(after.routing.provider.as_deref(), Some("backup"), "{after:?}");
    let skipped = &after.routing.attempts[0];
    assert_eq!((skipped.provider.as_str(), skipped.outcome), ("second", AttemptOutcome::SkippedCooldown));
    assert_eq!(b.requests(), 0, "no request reached the pool mate");
    assert_eq!(a.requests(), 1);

    let row = sqlx::query("SELECT cooldown_reason, cooldown_detail FROM provider_state WHERE provider = 'second'")
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
    let (reason, detail): (String, String) = (row.get(0), row.get(1));
    assert_eq!(reason, "quota_day");
    assert!(detail.contains("account's limit") && detail.contains("`first`"), "{detail}");

    // `status`: the pool's window has room (2 of 1000), but nothing draws from it until the
    // account's reset.
    let state = fallback_worker::state::postgres::PgStore::connect_lazy(&env.database_url, 2).unwrap();
    let mut pools = status::collect_pools(&config, &state).await.unwrap();
    let providers = status::collect(&config, &state, &pools).await.unwrap();
    assert_eq!(pools[0].state, "usable", "before the providers are looked at: {:?}", pools[0]);
    status::mark_cooling_pools(&mut pools, &providers);
    assert_eq!((pools[0].pool.as_str(), pools[0].state), ("account", "cooling"), "{:?}", pools[0]);
    assert_eq!(pools[0].reason.as_deref(), Some("quota_day"));
    assert_eq!(pools[0].until, providers.iter().find(|p| p.provider == "first").unwrap().until);
    stays.stop().await;
}

#[tokio::test]
async fn openrouters_free_models_per_day_cools_every_free_model_of_the_key() {
    account_429_spares_the_pool((Profile::Openrouter, ""), (Profile::Openrouter, "")).await;
}

#[tokio::test]
async fn a_gemini_project_quota_cools_both_endpoints_of_the_project() {
    account_429_spares_the_pool((Profile::GeminiNative, "kind = \"gemini\""), (Profile::GeminiOpenai, "")).await;
}
