//! Faults the worker must survive by itself (contract §4 "Survives").

use std::collections::BTreeSet;
use std::time::Duration;

use fallback_worker::mock::{MockOptions, MockProvider, Profile, Scenario};
use lapin::BasicProperties;

use crate::support::relay::Relay;
use crate::support::*;

#[tokio::test]
async fn a_broker_connection_cut_mid_run_is_recovered_and_every_job_answered() {
    let env = TestEnv::new().await;
    let mut options = MockOptions::new(Profile::Groq);
    options.latency = Duration::from_millis(30);
    let mock = MockProvider::start(options).await.unwrap();
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr).into();
    let worker = env.spawn_worker(config, "w1").await;

    let total = 40;
    for i in 0..total {
        env.publish(&job(&format!("c-{i}")), BasicProperties::default()).await;
    }
    let mut answered = BTreeSet::new();
    while answered.len() < 10 {
        let (result, _) = env.next_result(&env.results).await;
        answered.insert(result.custom_id.unwrap());
    }
    assert!(relay.cut() >= 2, "the worker's consume and publish connections were cut");
    while answered.len() < total {
        let (result, _) = env.next_result(&env.results).await;
        assert!(result.is_success(), "{result:?}");
        answered.insert(result.custom_id.unwrap());
    }
    let expected: BTreeSet<String> = (0..total).map(|i| format!("c-{i}")).collect();
    assert_eq!(answered, expected, "every job answered after the cut");
    eventually("the jobs queue drains", || async { env.client.depth(&env.jobs).await == 0 }).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_started_before_the_broker_is_reachable_waits_for_it() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    // The broker is "down": connections are dropped as soon as they are accepted.
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap()).await;
    relay.set_down(true);
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr).into();
    let worker = env.spawn_worker_unready(config, "w1");
    eventually("the worker tries again after a refusal", || async { relay.refused() >= 2 }).await;
    assert!(!worker.task.is_finished(), "no exit on a transient fault");
    relay.set_down(false);
    env.wait_for_queues().await;
    env.publish(&job("late-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success());
    worker.stop().await;
}

#[tokio::test]
async fn providers_that_hang_answer_garbage_or_close_the_connection_are_survived() {
    let env = TestEnv::new().await;
    let flaky = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    let good = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    flaky.script([Scenario::Garbage, Scenario::CloseConnection]);
    let config = env.config(&format!(
        "{}{}{}",
        provider("flaky", &flaky.base_url(), true, ""),
        provider("good", &good.base_url(), true, ""),
        chain("default", &["flaky", "good"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("g-1"), BasicProperties::default()).await;
    let (first, _) = env.next_result(&env.results).await;
    env.publish(&job("g-2"), BasicProperties::default()).await;
    let (second, _) = env.next_result(&env.results).await;
    use fallback_worker::routing::AttemptOutcome;
    assert_eq!(first.routing.attempts[0].outcome, AttemptOutcome::ServerError, "garbage is a server error");
    assert_eq!(
        second.routing.attempts[0].outcome,
        AttemptOutcome::ConnectError,
        "a closed connection is a connect error"
    );
    assert!(first.is_success() && second.is_success());
    worker.stop().await;
}

#[tokio::test]
async fn a_database_that_goes_away_does_not_stop_the_worker_or_lose_a_job() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.postgres.url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("before"), BasicProperties::default()).await;
    assert!(env.next_result(&env.results).await.0.is_success());

    relay.set_down(true);
    let started = std::time::Instant::now();
    for id in ["during-1", "during-2"] {
        env.publish(&job(id), BasicProperties::default()).await;
    }
    let during = env.results(&env.results, 2).await;
    assert!(during.iter().all(|r| r.is_success()), "answered without the database: {during:?}");
    eprintln!("answered while the database was away in {:?}", started.elapsed());

    relay.set_down(false);
    // The worker notices the database is back by itself; from then on results are stored again.
    let after = std::sync::atomic::AtomicUsize::new(0);
    eventually("the ledger is written again", || async {
        let n = after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        env.publish(&job(&format!("after-{n}")), BasicProperties::default()).await;
        assert!(env.next_result(&env.results).await.0.is_success());
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM job_results WHERE result LIKE '%\"after-%'")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        stored >= 1
    })
    .await;
    assert_eq!(env.client.depth(&env.jobs).await, 0);
    worker.stop().await;
}
