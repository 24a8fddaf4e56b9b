//! A hostile publisher (contract §2, §4): malformed properties, forged service headers, reused
//! idempotency keys, reply queues that refuse, and a worker that panics on a job. Nothing of it
//! stops the process, bends a job's promises or misroutes a result.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fallback_worker::broker::headers::{HeaderKey, PARKED_MAC, PARKED_STATE, ParkedState};
use fallback_worker::broker::{self, Session, Topology};
use fallback_worker::chain::{Chain, Member};
use fallback_worker::job::{ChatBody, ErrorCode};
use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use fallback_worker::providers::{ChatProvider, Completion, Failure};
use fallback_worker::routing::{Attempt, AttemptOutcome};
use fallback_worker::state::memory::MemoryStore;
use fallback_worker::worker::{HandlerRules, JobHandler};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn one_provider(mock: &MockProvider, chain_extra: &str) -> String {
    format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], chain_extra))
}

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

#[tokio::test]
async fn absurd_amqp_timestamps_are_ignored_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    for (i, timestamp) in [u64::MAX, 1 << 63, u64::MAX / 1000].into_iter().enumerate() {
        env.publish(&job(&format!("ts-{i}")), BasicProperties::default().with_timestamp(timestamp)).await;
    }
    let results = env.results(&env.results, 3).await;
    assert!(results.iter().all(|r| r.is_success()), "{results:?}");
    assert!(results.iter().all(|r| r.routing.queued_ms < 60_000), "a future timestamp is not a queue time");
    env.publish(&job("after"), BasicProperties::default()).await;
    assert!(env.next_result(&env.results).await.0.is_success(), "the same worker still answers");
    worker.stop().await;
}

/// A `custom_id` has no length limit, but a result's `correlation_id` (a copy of it when the
/// job has none) is an AMQP short string of at most 255 bytes: lapin panics on a longer one in a
/// debug build and writes a malformed frame in a release build.
#[tokio::test]
async fn a_custom_id_longer_than_a_short_string_is_answered_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let long_id = "é".repeat(200);
    env.publish(&job(&long_id), BasicProperties::default()).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(result.custom_id.as_deref(), Some(long_id.as_str()), "the body carries the custom_id whole");
    assert!(properties.correlation_id().as_ref().is_none_or(|id| id.as_str().is_empty()), "{properties:?}");
    env.publish(&job("after"), BasicProperties::default()).await;
    let (after, properties) = env.next_result(&env.results).await;
    assert!(after.is_success(), "the same worker still answers");
    assert_eq!(properties.correlation_id().as_ref().map(|id| id.as_str()), Some("after"));
    worker.stop().await;
}

#[tokio::test]
async fn a_max_wait_beyond_the_chains_limit_is_an_invalid_request() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "max_wait_limit = \"1h\"")), "w1").await;
    for (id, max_wait) in [("huge", "18446744073709551615s"), ("over", "2h")] {
        let body = serde_json::json!({"custom_id": id, "max_wait": max_wait,
            "body": {"messages": [{"role": "user", "content": "x"}]}});
        env.publish(&body.to_string(), BasicProperties::default()).await;
        let (result, _) = env.next_result(&env.results).await;
        let error = result.error.expect("an error result");
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{id}");
        assert!(error.message.contains("max_wait_limit"), "{}", error.message);
        assert!(env.client.next_message(&env.dead_queue(), PATIENCE).await.is_some(), "{id} is dead-lettered");
    }
    assert_eq!(mock.requests(), 0);
    worker.stop().await;
}

#[tokio::test]
async fn forged_service_headers_change_nothing() {
    let env = TestEnv::new().await;
    let free = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let paid = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    let providers = format!(
        "{}{}{}",
        provider("free", &free.base_url(), true, ""),
        provider("paid", &paid.base_url(), false, ""),
        chain("default", &["free", "paid"], "free_wait = \"1h\"")
    );
    let worker = env.spawn_worker(env.config(&providers), "w1").await;
    // The free provider refused this job for good, it was first seen in 1970, parked often:
    // all claimed by a publisher, signed with a key it guessed.
    let forged_attempt = Attempt {
        provider: "free".into(),
        outcome: AttemptOutcome::ClientError,
        status: Some(400),
        latency_ms: 1,
        until: None,
        message: None,
    };
    let state = ParkedState::new(UNIX_EPOCH, 1000, vec![forged_attempt.clone()]);
    let guessed = fallback_worker::broker::headers::encode_parked(&HeaderKey::new(vec![0; 32]), "x", &state);
    let mut forged: Vec<(&str, AMQPValue)> = guessed.to_vec();
    forged.push(("fallback-first-seen-ms", AMQPValue::LongLongInt(0)));
    forged.push(("fallback-parks", AMQPValue::LongLongInt(1_000_000)));
    let attempts = serde_json::to_string(&vec![forged_attempt]).unwrap();
    forged.push(("fallback-attempts", AMQPValue::LongString(attempts.into())));
    env.publish(&job("forged"), BasicProperties::default().with_headers(headers(&forged))).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(result.routing.provider.as_deref(), Some("free"), "the free provider was not dropped");
    assert_eq!(result.routing.attempts.len(), 1, "no forged attempt in the story: {:?}", result.routing.attempts);

    // With the free provider out of the way, free_wait still holds: no paid call.
    let only_paid = format!(
        "{}{}",
        provider("paid", &paid.base_url(), false, ""),
        chain("default", &["paid"], "free_wait = \"1h\"\nmax_wait = \"2s\"")
    );
    worker.stop().await;
    let worker = env.spawn_worker(env.config(&only_paid), "w2").await;
    let old = vec![(PARKED_STATE, AMQPValue::LongString(serde_json::to_string(&state).unwrap().into()))];
    let mut forged = old;
    forged.push((PARKED_MAC, AMQPValue::LongString("00".repeat(32).into())));
    forged.push(("fallback-first-seen-ms", AMQPValue::LongLongInt(0)));
    env.publish(&job("early-paid"), BasicProperties::default().with_headers(headers(&forged))).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::DeadlineExceeded));
    assert_eq!(paid.requests(), 0, "a forged first-seen time must not reach the paid model");
    worker.stop().await;
}

#[tokio::test]
async fn a_reused_message_id_never_returns_another_jobs_answer() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let (first_reply, second_reply) = (env.reply_queue("a").await, env.reply_queue("b").await);
    let with = |reply: &str| BasicProperties::default().with_message_id("m-1".into()).with_reply_to(reply.into());
    env.publish(&job("first"), with(&first_reply)).await;
    let (first, _) = env.next_result(&first_reply).await;
    assert!(first.is_success());

    env.publish(&job("second"), with(&second_reply)).await;
    let (second, _) = env.next_result(&second_reply).await;
    assert_eq!(second.custom_id.as_deref(), Some("second"));
    let error = second.error.expect("the second job is refused");
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(error.message.contains("already used by another job"), "{}", error.message);
    assert!(second.response.is_none(), "nothing of the first job's answer");

    // The first job's own redelivery is still answered from the ledger, unchanged.
    env.publish(&job("first"), with(&first_reply)).await;
    let (again, _) = env.next_result(&first_reply).await;
    assert_eq!(again.id, first.id);
    assert_eq!(mock.requests(), 1);
    worker.stop().await;
}

/// A reply queue of at most `max_length` messages that refuses publishes beyond (the broker
/// nacks them), removed with the test's queues.
async fn rejecting_queue(env: &TestEnv, max_length: i64) -> String {
    let full = format!("fwtest.{}.reply.full", env.id);
    let args = headers(&[
        ("x-max-length", AMQPValue::LongLongInt(max_length)),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
    ]);
    env.client.declare_with(&full, args).await;
    env.remove_later(full.clone());
    full
}

#[tokio::test]
async fn a_full_reply_queue_and_a_foreign_user_id_stay_with_their_message() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    // A reply queue that is full and refuses publishes (the broker nacks them).
    let full = rejecting_queue(&env, 1).await;
    env.client.publish(&full, b"occupant", BasicProperties::default()).await;
    env.publish(&job("to-full"), BasicProperties::default().with_reply_to(full.as_str().into())).await;
    let (diverted, properties) = env.next_result(&env.results).await;
    assert_eq!(diverted.custom_id.as_deref(), Some("to-full"));
    assert!(diverted.is_success());
    assert_eq!(header(&properties, "fallback-undeliverable-reply-to").as_deref(), Some(full.as_str()));
    let (_, dead) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("the job is dead-lettered");
    assert!(header(&dead, "fallback-reason").is_some_and(|r| r.contains("refused")), "{dead:?}");

    // A poison job from a publisher that states its broker user (`guest` here; any other
    // user's copy republished by the worker as `guest` makes the broker close the channel),
    // with a TTL and a CC header: its dead-letter copy carries none of them, and the worker
    // goes on.
    // The publisher's own publish already copies the job to the CC'd queue once; the worker's
    // copy must not add a second.
    let canary = env.reply_queue("canary").await;
    let mallory = BasicProperties::default().with_user_id("guest".into()).with_expiration("30000".into()).with_headers(
        headers(&[("CC", AMQPValue::FieldArray(vec![AMQPValue::LongString(canary.as_str().into())].into()))]),
    );
    env.publish("not json", mallory).await;
    let (poison, _) = env.next_result(&env.results).await;
    assert_eq!(poison.error.map(|e| e.code), Some(ErrorCode::InvalidRequest));
    let (_, copy) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("the poison is dead-lettered");
    assert!(copy.user_id().is_none() && copy.expiration().is_none(), "{copy:?}");
    env.publish(&job("next"), BasicProperties::default()).await;
    let (next, _) = env.next_result(&env.results).await;
    assert_eq!(next.custom_id.as_deref(), Some("next"));
    assert_eq!(env.client.depth(&canary).await, 1, "the worker's copy was not routed by the CC header");
    worker.stop().await;
}

#[tokio::test]
async fn every_worker_listens_for_cooldowns() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let database = env.database_url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    eventually("the worker runs a LISTEN session", || async {
        let listening: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'")
                .bind(&database)
                .fetch_one(&mut env.db().await)
                .await
                .unwrap();
        listening >= 1
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_database_stopped_for_15_s_under_load_stops_no_job() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let relay = crate::support::relay::Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let providers = format!(
        "{}{}",
        provider("p", &mock.base_url(), true, "limits = [{ requests = 100000, per = \"1m\" }]"),
        chain("default", &["p"], "")
    );
    let mut config = env.config(&providers);
    config.postgres.url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("warm-up"), BasicProperties::default()).await;
    assert!(env.next_result(&env.results).await.0.is_success());

    relay.set_down(true);
    let outage = tokio::time::Instant::now();
    let mut published = 0;
    while outage.elapsed() < Duration::from_secs(15) {
        env.publish(&job(&format!("during-{published}")), BasicProperties::default()).await;
        published += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Jobs published during the outage were answered during it, not after it.
    let answered_during = env.client.depth(&env.results).await as usize;
    relay.set_down(false);
    assert!(
        answered_during + 20 >= published,
        "only {answered_during} of {published} jobs answered while the database was away"
    );
    let results = env.results(&env.results, published).await;
    assert!(results.iter().all(|r| r.is_success()));
    assert_eq!(env.client.depth(&env.jobs).await, 0, "nothing left behind");
    // The calls of the outage are written back once the database is back: each call counted
    // exactly once in the shared windows.
    let calls = mock.requests();
    assert_eq!(calls, published + 1);
    eventually("the outage's calls are counted in the shared windows", || async {
        let counted: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(amount), 0)::bigint FROM quota_use WHERE scope = 'p' AND measure = 'requests'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        assert!(counted as usize <= calls, "{counted} requests counted for {calls} calls: written back twice");
        counted as usize == calls
    })
    .await;
    worker.stop().await;
}

/// A provider that panics on every call: the worker's own failure, not the provider's.
struct Panicking;

#[async_trait::async_trait]
impl ChatProvider for Panicking {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        panic!("a bug in the worker");
    }
}

#[tokio::test]
async fn a_job_that_panics_is_retried_then_dead_lettered_and_others_go_on() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = env.config(&one_provider(&mock, ""));
    let good = fallback_worker::app::build_chains(&config, &reqwest::Client::new(), &|_| None).unwrap();
    let member = |provider: Arc<dyn ChatProvider>| Member {
        name: "panicking".into(),
        model: "m".into(),
        free: true,
        context_window: None,
        max_retries: 0,
        limits: vec![],
        pools: Default::default(),
        timeout: Duration::from_secs(2),
        pool_mates: vec![],
        timeouts: Default::default(),
        provider,
    };
    let mut chains: HashMap<String, Arc<Chain>> = good;
    chains.insert(
        "bug".into(),
        Arc::new(Chain {
            name: "bug".into(),
            members: vec![member(Arc::new(Panicking))],
            max_wait: Duration::from_secs(60),
            max_wait_limit: Duration::from_secs(3600),
            free_wait: Duration::ZERO,
            accept: Default::default(),
        }),
    );
    let store = Arc::new(MemoryStore::new());
    let topology = Topology::new(&env.jobs, &env.results);
    let handler = JobHandler {
        chains,
        state: store.clone(),
        ledger: store,
        rules: HandlerRules {
            topology: topology.clone(),
            reply_to_allow: vec![glob::Pattern::new("*").unwrap()],
            max_message_bytes: 1 << 20,
            hold_limit: Duration::from_secs(1),
            delivery_deadline: Duration::from_secs(60),
            max_deliveries: 3,
        },
        worker_id: "w-panics".into(),
        key_locks: Default::default(),
        header_key: HeaderKey::new(b"test".to_vec()),
        local_failures: Default::default(),
    };
    let session = Session {
        urls: amqp_url().into(),
        prefetch: 8,
        topology,
        confirm_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(5),
        connection_name: "panic test".into(),
    };
    let (shutdown, ready) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
    let consumer = tokio::spawn(broker::run_consumer(session, Arc::new(handler), shutdown.clone(), ready.clone()));
    eventually("the consumer runs", || async { ready.load(Ordering::Relaxed) }).await;

    let bug = serde_json::json!({"custom_id": "bug-1", "chain": "bug",
        "body": {"messages": [{"role": "user", "content": "x"}]}});
    env.publish(&bug.to_string(), BasicProperties::default()).await;
    env.publish(&job("fine"), BasicProperties::default()).await;
    let mut by_id: HashMap<String, _> = HashMap::new();
    for result in env.results(&env.results, 2).await {
        by_id.insert(result.custom_id.clone().unwrap_or_default(), result);
    }
    assert!(by_id["fine"].is_success(), "the other job is answered meanwhile");
    let error = by_id["bug-1"].error.clone().expect("an internal_error result");
    assert_eq!(error.code, ErrorCode::InternalError);
    assert!(error.message.contains("3 times") && error.message.contains("panic"), "{}", error.message);
    let (_, dead) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("dead-lettered");
    assert!(header(&dead, "fallback-reason").is_some_and(|r| r.contains("a bug in the worker")));
    assert!(ready.load(Ordering::Relaxed), "the session survived the panics");
    shutdown.cancel();
    consumer.await.unwrap();
}

#[tokio::test]
async fn a_channel_the_broker_closes_over_one_message_is_reopened_for_the_next() {
    use fallback_worker::broker::{Outgoing, PublishError, Publisher, Routed};
    let env = TestEnv::new().await;
    let queue = env.reply_queue("publisher").await;
    let connection = Arc::new(broker::connect(&amqp_url(), "publisher test").await.unwrap());
    let publisher = Publisher::new(connection.clone(), Duration::from_secs(10)).await.unwrap();
    let send = |properties: BasicProperties| {
        let publisher = publisher.clone();
        let queue = queue.clone();
        async move { publisher.publish(Outgoing { routing_key: &queue, body: b"x", properties }).await }
    };
    // Another broker user's id: the broker closes the channel (PRECONDITION_FAILED).
    let refused = send(BasicProperties::default().with_user_id("mallory".into())).await;
    assert!(matches!(refused, Err(PublishError::Refused(_))), "{refused:?}");
    for _ in 0..3 {
        assert_eq!(send(BasicProperties::default()).await.unwrap(), Routed::Queued);
    }
    assert!(connection.status().connected(), "only the channel was closed");
    assert_eq!(env.client.depth(&queue).await, 3);
}

#[tokio::test]
async fn a_parked_jobs_state_is_bound_to_that_job_and_replays_onto_no_other() {
    use fallback_worker::mock::{RetryHint, Scenario};
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    mock.script([Scenario::RateLimited(RetryHint::RetryAfterMs(40_000))]);
    let providers = one_provider(&mock, "");
    let worker = env.spawn_worker(env.config_with(&providers, "hold_limit = \"500ms\""), "w1").await;
    env.publish(&job("parked"), BasicProperties::default().with_message_id("m-parked".into())).await;
    // The job waits 40 s for the provider: it is parked in the 30 s delay queue. Take it out.
    let wait_queue = format!("{}.wait.30s", env.jobs);
    let (body, parked) = env.client.next_message(&wait_queue, PATIENCE).await.expect("the job is parked");
    assert!(header(&parked, PARKED_MAC).is_some(), "{parked:?}");
    worker.stop().await;
    sqlx::query("UPDATE provider_state SET cooldown_until = now(), cooldown_reason = NULL")
        .execute(&mut env.db().await)
        .await
        .unwrap();
    let worker = env.spawn_worker(env.config(&providers), "w2").await;
    let carried = parked.headers().clone().unwrap_or_default();

    // The authentic state on another job (another body, another message_id): ignored.
    let other = BasicProperties::default().with_message_id("m-other".into()).with_headers(carried.clone());
    env.publish(&job("other"), other).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(result.custom_id.as_deref(), Some("other"));
    let outcomes: Vec<_> = result.routing.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, vec![AttemptOutcome::Ok], "no state carried over from the parked job");

    // Back on its own job, it is that job's story.
    let own = BasicProperties::default().with_message_id("m-parked".into()).with_headers(carried);
    env.client.publish(&env.jobs, &body, own).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(result.custom_id.as_deref(), Some("parked"));
    let outcomes: Vec<_> = result.routing.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, vec![AttemptOutcome::RateLimited, AttemptOutcome::Ok]);
    worker.stop().await;
}

/// A row of the shared table is another writer's word, read as cautiously as a message: a
/// cooldown an operator set by hand with a reason of their own (or none) stops calls to that
/// provider until its time, like any cooldown; the job goes on to the next provider. Before, an
/// unknown reason read as no cooldown at all. (How the notice of such a row reaches a running
/// worker: `shared_state::a_cooldown_set_by_hand_with_an_unknown_reason_or_none_is_held`.)
#[tokio::test]
async fn a_provider_cooled_down_by_hand_with_a_reason_of_its_own_is_not_called() {
    let env = TestEnv::new().await;
    let stopped = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    let next = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let providers = format!(
        "{}{}{}",
        provider("stopped", &stopped.base_url(), true, ""),
        provider("next", &next.base_url(), true, ""),
        chain("default", &["stopped", "next"], "")
    );
    // The operator's row is in the table when the worker starts.
    crate::shared_state::migrated_store(&env).await;
    for reason in [Some("maintenance window"), None] {
        sqlx::query(
            "INSERT INTO provider_state (provider, cooldown_until, cooldown_reason) \
             VALUES ('stopped', now() + interval '1 hour', $1) \
             ON CONFLICT (provider) DO UPDATE SET cooldown_until = EXCLUDED.cooldown_until, \
               cooldown_reason = EXCLUDED.cooldown_reason",
        )
        .bind(reason)
        .execute(&mut env.db().await)
        .await
        .unwrap();
        let worker = env.spawn_worker(env.config(&providers), "w1").await;
        env.publish(&job(&format!("after {reason:?}")), BasicProperties::default()).await;
        let (result, _) = env.next_result(&env.results).await;
        let outcomes: Vec<_> = result.routing.attempts.iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, vec![AttemptOutcome::SkippedCooldown, AttemptOutcome::Ok], "{reason:?}: {result:?}");
        worker.stop().await;
    }
    assert_eq!(stopped.requests(), 0, "no call to the stopped provider");
}

/// A reply queue that rejects publishes makes the broker nack its results, and the worker
/// renews its publishing channel; the results of other jobs still waiting for their confirms
/// on the old channel were lost with it and published again (a black-box run: other jobs'
/// results twice). Each job gets one result, however many nacks come between.
#[tokio::test]
async fn nacked_results_do_not_duplicate_the_results_of_other_jobs() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let full = rejecting_queue(&env, 0).await;
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..120 {
        let custom_id = format!("job-{i}");
        let properties = if i % 3 == 1 {
            BasicProperties::default().with_reply_to(full.as_str().into())
        } else {
            BasicProperties::default()
        };
        env.publish(&job(&custom_id), properties).await;
        expected.insert(custom_id);
    }
    let mut seen = Vec::new();
    for _ in 0..expected.len() {
        seen.extend(env.next_result(&env.results).await.0.custom_id);
    }
    // Anything published twice went out right after a nack, long before this job is taken.
    env.publish(&job("sentinel"), BasicProperties::default()).await;
    loop {
        let custom_id = env.next_result(&env.results).await.0.custom_id;
        if custom_id.as_deref() == Some("sentinel") {
            break;
        }
        seen.extend(custom_id);
    }
    let distinct: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct, expected);
    let mut counts = std::collections::BTreeMap::new();
    for custom_id in &seen {
        *counts.entry(custom_id.as_str()).or_insert(0) += 1;
    }
    counts.retain(|_, n| *n > 1);
    assert!(counts.is_empty(), "results published more than once: {counts:?}");
    worker.stop().await;
}
