//! `/metrics`, `/healthz` and `/readyz` on a running worker.

use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use lapin::BasicProperties;

use crate::support::relay::Relay;
use crate::support::*;

async fn get(worker: &WorkerHandle, path: &str) -> (u16, String) {
    let addr = worker.http_addr.get().expect("the endpoint is bound");
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The value of the first sample line starting with `series`.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_jobs_attempts_latency_and_quota_after_a_run() {
    let env = TestEnv::new().await;
    let groq = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let paid = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    groq.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(60.0))]);
    let mut config = env.config(&format!(
        "{}{}{}{}",
        provider("groq", &groq.base_url(), true, "limits = [{ requests = 30, per = \"1m\" }]\nquotas = [\"org\"]"),
        provider("paid", &paid.base_url(), false, ""),
        "[[quotas]]\nname = \"org\"\nlimits = [{ requests = 100, per = \"1d\", resets = \"00:00 UTC\" }]\n\n",
        chain("default", &["groq", "paid"], "")
    ));
    config.http.addr = "127.0.0.1:0".into();
    let worker = env.spawn_worker(config, "w1").await;
    for i in 0..3 {
        env.publish(&job(&format!("m-{i}")), BasicProperties::default()).await;
        env.next_result(&env.results).await;
    }
    env.publish("not json", BasicProperties::default()).await;
    env.next_result(&env.results).await;

    let (status, page) = get(&worker, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&page, r#"fallback_jobs_total{outcome="ok"}"#), Some(3.0), "{page}");
    assert_eq!(sample(&page, r#"fallback_jobs_total{outcome="invalid_request"}"#), Some(1.0));
    assert_eq!(sample(&page, r#"fallback_answers_total{tier="paid"}"#), Some(3.0));
    assert_eq!(sample(&page, r#"fallback_attempts_total{provider="groq",outcome="rate_limited"}"#), Some(1.0));
    assert_eq!(sample(&page, r#"fallback_attempts_total{provider="groq",outcome="skipped_cooldown"}"#), Some(2.0));
    assert_eq!(sample(&page, r#"fallback_provider_latency_seconds_count{provider="paid"}"#), Some(3.0));
    assert!(sample(&page, "fallback_queue_wait_seconds_count").is_some());
    assert_eq!(sample(&page, r#"fallback_provider_cooling{provider="groq"}"#), Some(1.0));
    assert_eq!(sample(&page, r#"fallback_quota_used{provider="groq",measure="requests",per="1m"}"#), Some(1.0));
    assert_eq!(sample(&page, r#"fallback_quota_limit{provider="groq",measure="requests",per="1m"}"#), Some(30.0));
    let pool = r#"{pool="org",measure="requests",per="1day",resets="00:00 UTC"}"#;
    assert_eq!(sample(&page, &format!("fallback_pool_quota_used{pool}")), Some(1.0), "{page}");
    assert_eq!(sample(&page, &format!("fallback_pool_quota_limit{pool}")), Some(100.0));
    assert_eq!(get(&worker, "/healthz").await.0, 200);
    worker.stop().await;
}

#[tokio::test]
async fn readyz_turns_unready_when_the_broker_goes_away_and_ready_again_after() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.http.addr = "127.0.0.1:0".into();
    config.amqp.url = format!("amqp://guest:guest@{}/%2f", relay.addr).into();
    let worker = env.spawn_worker(config, "w1").await;
    assert_eq!(get(&worker, "/readyz").await, (200, "broker up\ndatabase up\n".into()));

    relay.set_down(true);
    eventually("/readyz reports the broker down", || async { get(&worker, "/readyz").await.0 == 503 }).await;
    assert!(get(&worker, "/readyz").await.1.contains("broker down"));
    assert_eq!(get(&worker, "/healthz").await.0, 200, "alive all the same");

    relay.set_down(false);
    eventually("/readyz recovers", || async { get(&worker, "/readyz").await.0 == 200 }).await;
    env.publish(&job("after"), BasicProperties::default()).await;
    assert!(env.next_result(&env.results).await.0.is_success());
    worker.stop().await;
}
