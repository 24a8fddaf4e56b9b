//! `[[quotas]]` pools across worker processes (issue #11): one account's limit, declared once,
//! held by every worker for every provider that names it.

use std::time::Duration;

use fallback_worker::mock::{MockOptions, MockProvider, Profile, RequestLimit};
use lapin::BasicProperties;

use crate::support::{TestEnv, WorkerProcess, chain, job, provider};

/// Two free models behind one account that allows 4 calls a second between them (one mock
/// serves both and refuses a fifth with its real 429), a paid model after them, and two worker
/// processes: the pool keeps both workers and both models under the account's limit, so no
/// request is refused and nothing is paid for while `free_wait` lasts. Without the pool each
/// model would look unlimited and the 24 jobs would go out at once.
#[tokio::test]
async fn two_worker_processes_hold_one_pool_for_two_models_without_a_429_or_a_paid_call() {
    let env = TestEnv::new().await;
    let mut account_options = MockOptions::new(Profile::Openrouter);
    account_options.limits = vec![RequestLimit { requests: 4, per: Duration::from_secs(1) }];
    account_options.latency = Duration::from_millis(20);
    let account = MockProvider::start(account_options).await.unwrap();
    let paid = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    let pooled = "quotas = [\"account\"]";
    let providers = format!(
        "{}{}{}[[quotas]]\nname = \"account\"\nlimits = [{{ requests = 4, per = \"1s\" }}]\n\n{}",
        provider("model-a", &account.base_url(), true, pooled),
        provider("model-b", &account.base_url(), true, pooled),
        provider("paid", &paid.base_url(), false, ""),
        chain("default", &["model-a", "model-b", "paid"], "free_wait = \"1h\"\nmax_wait = \"5m\"")
    );
    let config = env.config_file(&providers, "");
    let mut workers = [WorkerProcess::spawn(&config), WorkerProcess::spawn(&config)];
    env.wait_for_queues().await;
    let jobs = 24;
    for i in 0..jobs {
        env.publish(&job(&format!("pool-{i}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, jobs).await;
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        worker.wait().await;
    }
    let free_models = ["model-a", "model-b"];
    assert!(
        results.iter().all(|r| r.is_success() && free_models.contains(&r.routing.provider.as_deref().unwrap_or(""))),
        "every job answered by a free model: {results:?}"
    );
    let stats = account.stats();
    assert_eq!(stats.rate_limited, 0, "the account refused no request");
    assert_eq!(stats.requests, jobs, "one request per job");
    assert_eq!(paid.requests(), 0, "no paid call while the pool can meet free_wait");
}
