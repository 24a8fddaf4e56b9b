//! Delivery guarantees (contract §4): reply_to, idempotency, crashes and graceful shutdown.

use std::path::PathBuf;
use std::time::Duration;

use fallback_worker::job::ErrorCode;
use fallback_worker::mock::{MockOptions, MockProvider, Profile, Scenario};
use lapin::BasicProperties;

use crate::support::*;

fn one_provider(mock: &MockProvider, extra: &str) -> String {
    format!("{}{}", provider("p", &mock.base_url(), true, extra), chain("default", &["p"], ""))
}

#[tokio::test]
async fn results_go_to_reply_to_with_the_jobs_correlation_id() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let reply = env.reply_queue("mine").await;
    let properties =
        BasicProperties::default().with_reply_to(reply.as_str().into()).with_correlation_id("corr-7".into());
    env.publish(&job("r-1"), properties).await;
    let (result, properties) = env.next_result(&reply).await;
    assert!(result.is_success());
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-7"));
    assert_eq!(properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(properties.delivery_mode(), &Some(2), "results are persistent");
    assert_eq!(env.client.depth(&env.results).await, 0, "nothing went to the default results queue");
    worker.stop().await;
}

#[tokio::test]
async fn a_redelivered_job_is_answered_from_the_ledger_without_a_provider_call() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let properties = BasicProperties::default().with_message_id("msg-42".into());
    env.publish(&job("i-1"), properties.clone()).await;
    let (first, _) = env.next_result(&env.results).await;
    env.publish(&job("i-1"), properties).await;
    let (second, _) = env.next_result(&env.results).await;
    assert_eq!(mock.requests(), 1, "the second delivery is answered from the store");
    assert_eq!(first, second, "the stored result is republished as it was");

    // Without a message_id the key is the hash of (custom_id, chain, body).
    env.publish(&job("i-2"), BasicProperties::default()).await;
    let (third, _) = env.next_result(&env.results).await;
    env.publish(&job("i-2"), BasicProperties::default()).await;
    let (fourth, _) = env.next_result(&env.results).await;
    assert_eq!(third.id, fourth.id);
    assert_eq!(mock.requests(), 2);
    worker.stop().await;
}

/// A worker process whose call for `custom_id` hangs (the mock's first request), and its
/// config file, for a second worker to take over once it is killed.
async fn a_worker_holding(env: &TestEnv, mock: &MockProvider, custom_id: &str) -> (PathBuf, WorkerProcess) {
    mock.script([Scenario::Hang]);
    let config = env.config_file(&one_provider(mock, "timeout = \"60s\""), "");
    let worker = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    env.publish(&job(custom_id), BasicProperties::default()).await;
    assert!(mock.wait_for_requests(1, PATIENCE).await, "the first worker took the job");
    (config, worker)
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_nothing() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let (config, mut first) = a_worker_holding(&env, &mock, "k-1").await;
    first.signal("KILL");
    first.wait().await;

    let second = WorkerProcess::spawn(&config);
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(result.custom_id.as_deref(), Some("k-1"));
    assert_eq!(mock.requests(), 2, "redelivered to the second worker");
    drop(second);
}

/// A job that every worker dies on (here: killed while its call hangs) is redelivered by the
/// broker each time; past `max_deliveries` (2) redeliveries counted in the ledger, the next
/// worker answers it `internal_error` and dead-letters it instead of dying again.
#[tokio::test]
async fn a_job_every_worker_dies_on_is_dead_lettered_after_max_deliveries() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    mock.script([Scenario::Hang, Scenario::Hang]);
    let config = env.config_file(&one_provider(&mock, "timeout = \"60s\""), "max_deliveries = 2");
    let mut worker = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    env.publish(&job("killer"), BasicProperties::default()).await;
    for taken in 1..=2 {
        assert!(mock.wait_for_requests(taken, PATIENCE).await, "delivery {taken} reached the provider");
        worker.signal("KILL");
        worker.wait().await;
        worker = WorkerProcess::spawn(&config);
    }
    // The third delivery (the second redelivery) is one too many.
    let (result, _) = env.next_result(&env.results).await;
    let error = result.error.expect("an error result");
    assert_eq!(error.code, ErrorCode::InternalError, "{}", error.message);
    assert!(error.message.contains("delivered 3 times"), "{}", error.message);
    assert_eq!(mock.requests(), 2, "the third delivery called no provider");
    let (body, _) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("dead-lettered");
    assert!(String::from_utf8_lossy(&body).contains("killer"));
    drop(worker);
}

/// The results queue deleted by hand under a running worker: the next result finds no queue,
/// the worker rebuilds its session (which declares its queues again) and the job, back from
/// the broker, is answered from the ledger into the new queue. (A black-box run: the job went
/// round as an internal failure, with nowhere for its result to go.)
#[tokio::test]
async fn a_results_queue_deleted_under_a_running_worker_is_declared_again_and_gets_the_result() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    env.client.delete(&env.results).await;
    assert_eq!(env.client.ready_in(&env.results).await, None);
    env.publish(&job("after-delete"), BasicProperties::default()).await;
    eventually("the results queue is back with the result", || async {
        env.client.ready_in(&env.results).await.is_some_and(|ready| ready >= 1)
    })
    .await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    assert_eq!(result.custom_id.as_deref(), Some("after-delete"));
    assert_eq!(mock.requests(), 1, "the second delivery is answered from the ledger");
    worker.stop().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_jobs_and_exits_0() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    mock.script([Scenario::Slow(Duration::from_millis(1500))]);
    let config = env.config_file(&one_provider(&mock, "timeout = \"10s\""), "");
    let mut worker = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    env.publish(&job("s-1"), BasicProperties::default()).await;
    assert!(mock.wait_for_requests(1, PATIENCE).await);
    worker.signal("TERM");
    let status = worker.wait().await;
    assert_eq!(status.code(), Some(0));
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "the in-flight job was finished: {result:?}");
    assert_eq!(env.client.depth(&env.jobs).await, 0, "and acked");
}

/// A SIGTERM that comes while the worker still starts (here reading its config, which a FIFO
/// holds back) asks for the same clean stop as one that comes later: exit 0, not death by the
/// signal's default action.
#[tokio::test]
async fn a_sigterm_while_the_worker_starts_is_a_clean_stop() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = std::fs::read(env.config_file(&one_provider(&mock, ""), "")).unwrap();
    let fifo = env.dir.join("config.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut worker = WorkerProcess::spawn(&fifo);
    // Opening a FIFO to write returns once a reader has opened it: the worker is in its
    // config load, and stays there until the config is written.
    let open = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo));
    let mut writer = tokio::time::timeout(PATIENCE, open).await.expect("the worker opens its config").unwrap().unwrap();
    worker.signal("TERM");
    std::io::Write::write_all(&mut writer, &config).unwrap();
    drop(writer);
    let status = worker.wait().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn a_bad_config_exits_2_naming_file_and_key() {
    let env = TestEnv::new().await;
    let path = env.dir.join("bad.toml");
    std::fs::write(&path, "[[providers]]\nname = \"x\"\nbase_url = \"http://h\"\nmodel = \"m\"\ntimeout = \"fast\"\n[chains.default]\nproviders = [\"x\"]\n")
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", path.to_str().unwrap(), "worker"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("providers[0].timeout") && stderr.contains("fast"),
        "{stderr}"
    );

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", "/nonexistent/fallback.toml", "migrate"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test]
async fn migrate_applies_the_schema_and_exits_0() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = env.config_file(&one_provider(&mock, ""), "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", config.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('provider_state', 'job_results')",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    assert_eq!(tables, 2);
}

#[tokio::test]
async fn a_jobs_queue_declared_first_by_a_publisher_is_used_as_it_is() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    // A producer that declared the queue its own way before any worker ran.
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(100_000));
    env.client.declare_with(&env.jobs, args).await;
    env.publish(&job("early"), BasicProperties::default()).await;
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success());
    assert_eq!(result.custom_id.as_deref(), Some("early"));
    worker.stop().await;
}

#[tokio::test]
async fn workers_sharing_a_config_on_one_host_all_run_even_when_http_addr_is_taken() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text =
        env.config_text(&one_provider(&mock, ""), "").replace("addr = \"\"", &format!("addr = \"127.0.0.1:{port}\""));
    let config = env.dir.join("shared.toml");
    std::fs::write(&config, text).unwrap();
    let mut first = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    let mut second = WorkerProcess::spawn(&config);
    for i in 0..10 {
        env.publish(&job(&format!("two-{i}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, 10).await;
    assert!(results.iter().all(|r| r.is_success()));
    assert!(
        first.child.try_wait().unwrap().is_none() && second.child.try_wait().unwrap().is_none(),
        "both workers still run"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "the first worker serves the endpoints");
    first.signal("TERM");
    second.signal("TERM");
    assert_eq!(first.wait().await.code(), Some(0));
    assert_eq!(second.wait().await.code(), Some(0));
}

#[tokio::test]
async fn migrate_creates_a_missing_database() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let fresh = format!("fwtest_{}_fresh", env.id);
    let url = env.database_url.replace(&format!("fwtest_{}", env.id), &fresh);
    let config = env.config_file(&one_provider(&mock, ""), "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", config.to_str().unwrap(), "migrate"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let mut admin = env.db().await;
    let exists: bool = sqlx::query_scalar("SELECT exists(SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&fresh)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let drop = format!("DROP DATABASE IF EXISTS \"{fresh}\" WITH (FORCE)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&mut admin).await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(exists, "the database was created");
}

#[tokio::test]
async fn two_copies_of_a_job_in_flight_at_once_call_the_provider_once() {
    let env = TestEnv::new().await;
    let mut slow = MockOptions::new(Profile::Groq);
    slow.latency = Duration::from_millis(300);
    let mock = MockProvider::start(slow).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    let properties = BasicProperties::default().with_message_id("twice".into());
    env.publish(&job("dup"), properties.clone()).await;
    env.publish(&job("dup"), properties).await;
    let results = env.results(&env.results, 2).await;
    assert_eq!(results[0], results[1], "the second copy got the first one's stored result");
    assert_eq!(mock.requests(), 1);
    worker.stop().await;
}

/// Acks are coalesced (`broker/acks.rs`): a job that takes long must not hold back the acks of
/// the jobs after it, or their prefetch slots stay taken and the worker stops taking jobs.
#[tokio::test]
async fn a_slow_job_does_not_hold_back_the_acks_of_the_jobs_after_it() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    // The first job's call hangs for the rest of the test; every later call answers at once.
    mock.script([Scenario::Hang]);
    let mut config = env.config(&one_provider(&mock, "timeout = \"120s\""));
    config.amqp.prefetch = 2;
    let worker = env.spawn_worker(config, "w1").await;
    env.publish(&job("slow"), BasicProperties::default()).await;
    assert!(mock.wait_for_requests(1, PATIENCE).await, "the first job is in hand");
    for n in 0..6 {
        env.publish(&job(&format!("after-{n}")), BasicProperties::default()).await;
    }
    // With 2 slots and the first one held, each later job needs the ack of the one before it.
    let results = env.results(&env.results, 6).await;
    let mut answered: Vec<_> = results.iter().filter_map(|r| r.custom_id.clone()).collect();
    answered.sort();
    let expected: Vec<_> = (0..6).map(|n| format!("after-{n}")).collect();
    assert_eq!(answered, expected, "every later job was answered while the first one hung");
    // Not stopped: a graceful stop would wait out the drain timeout for the hung call.
    drop(worker);
}

/// Every job that was answered is acked, whichever frames carried the acks: after a burst and
/// a graceful stop, nothing comes back to the queue (an unacked job would, and be answered
/// twice by the next worker).
#[tokio::test]
async fn after_a_burst_and_a_stop_every_answered_job_is_acked() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(env.config(&one_provider(&mock, "")), "w1").await;
    for n in 0..200 {
        env.publish(&job(&format!("burst-{n}")), BasicProperties::default()).await;
    }
    let results = env.results(&env.results, 200).await;
    assert!(results.iter().all(|r| r.is_success()));
    worker.stop().await;
    assert_eq!(env.client.depth(&env.jobs).await, 0, "no answered job went back to the queue");
    assert_eq!(mock.requests(), 200, "each job called once");
}

/// A range of acks (`multiple`) never covers a job still in hand: jobs after a hung one are
/// answered and acked, the worker is killed, and the hung job comes back to the next worker.
#[tokio::test]
async fn acks_of_later_jobs_never_cover_a_job_still_in_hand() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let (config, mut first) = a_worker_holding(&env, &mock, "held").await;
    for n in 0..20 {
        env.publish(&job(&format!("later-{n}")), BasicProperties::default()).await;
    }
    env.results(&env.results, 20).await;
    first.signal("KILL");
    first.wait().await;

    // A later job whose ack had not gone out yet comes back too, and is answered again from
    // the ledger: skip those. The held job must come back (each wait bounded by PATIENCE).
    let second = WorkerProcess::spawn(&config);
    let held = loop {
        let (result, _) = env.next_result(&env.results).await;
        if result.custom_id.as_deref() == Some("held") {
            break result;
        }
    };
    assert!(held.is_success(), "{held:?}");
    assert_eq!(mock.requests(), 22, "the held job was called again; no later job was");
    drop(second);
}
