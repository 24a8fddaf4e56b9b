//! Adversarial review, session 31, of 2f4c408 (deep headers), 42e0a11 (env overrides),
//! 62252c7 (`body.stream`) and 0a23bf2 (workers recounted on a NOTIFY).

use std::time::{Duration, SystemTime};

use fallback_worker::broker::frames::MAX_FRAME;
use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use fallback_worker::state::{Admission, Ask, ProviderState};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::credits::requests;
use crate::review_outage::store_behind_relay;
use crate::review_probe2::{HOLD, migrated};
use crate::support::raw_amqp::{Nesting, RawPublisher, deepest, nested_headers};
use crate::support::*;

/// **Finding 1 (medium; regression of 0a23bf2).** The count a NOTIFY or a LISTEN reconnect
/// starts (`count_workers`) counts only rows fresher than `HEARTBEAT_STALE` (30 s), and never
/// this worker itself. After a database outage longer than 30 s no row is fresh, and the
/// listener, reconnecting at once when the database is back (`count_workers_soon()` on
/// reconnect), counts **0** workers: every worker sets its divisor to 1, up to
/// `HEARTBEAT_INTERVAL` (10 s) before its own next heartbeat, and a database that flaps again in
/// that window finds every worker taking each limit whole (N workers, N x the limit). Before
/// 0a23bf2 the divisor stayed what the last heartbeat counted (2 here). Any `NOTIFY
/// fallback_workers` at such a moment (a joining worker, or anyone with the database's
/// credentials) does the same. The outage is simulated by ageing the rows 40 s (what 40 s without
/// heartbeats leaves) and cutting the connections.
#[tokio::test]
async fn a_listener_reconnecting_after_a_long_outage_does_not_count_its_own_worker_out() {
    let env = TestEnv::new().await;
    let (relay, first) = store_behind_relay(&env).await;
    let second = migrated(&env.database_url, 2).await;
    first.heartbeat("first").await.unwrap();
    second.heartbeat("second").await.unwrap();
    assert_eq!(first.heartbeat("first").await.unwrap(), 2);
    let stop = CancellationToken::new();
    let listening = tokio::spawn(first.clone().listen(stop.clone()));
    eventually("the first worker listens", || async { first.is_listening() }).await;
    assert_eq!(first.workers_alive(), 2);

    // An outage of 40 s: no worker could beat (the rows aged as they would), then it is back.
    let mut db = env.db().await;
    sqlx::query("UPDATE worker_heartbeat SET seen_at = now() - interval '40 seconds'").execute(&mut db).await.unwrap();
    relay.set_down(true);
    eventually("the listener notices", || async { !first.is_listening() }).await;
    relay.set_down(false);
    eventually("the listener is back", || async { first.is_listening() }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let divisor = first.workers_alive();

    // The database flaps again before the next heartbeat.
    relay.set_down(true);
    let limits = [requests(4)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let mut granted = 0;
    for _ in 0..4 {
        if matches!(first.admit(ask, SystemTime::now()).await, Admission::Granted(_)) {
            granted += 1;
        }
    }
    stop.cancel();
    let _ = listening.await;
    assert_eq!(divisor, 2, "the divisor after the listener reconnected (2 workers ran throughout)");
    assert_eq!(granted, 2, "a local share of 4 over 2 workers");
}

/// **Finding 2 (high; 2f4c408's bound does not hold on quorum queues).** The defence assumes no
/// frame the broker sends is larger than the 128 KiB the worker asks for ("the broker takes the
/// smaller of its own and this, so no header it sends is larger"). RabbitMQ does not check the
/// frames it sends: a job published by a raw client with headers filling a frame exactly (legal
/// for its publisher) comes out of a quorum queue **22 bytes larger** (131,094 bytes of a
/// frame_max of 131,072, measured here on a Basic.Get, the broker's own additions to the
/// headers). lapin decodes the frame, then closes the connection with FRAME_ERROR ("frame too
/// large: 131094 bytes"); the supervisor reconnects, the job is delivered again, the
/// connection breaks again, about every 3 s, on every worker it reaches, until the quorum
/// queue's delivery limit drops it; every other job in flight on those connections is
/// redelivered each time (and counts a delivery against its own limit). Expected: both jobs
/// answered (the deep one served or refused, as on a classic queue). Fails on 0a23bf2 (as
/// before 2f4c408 it overflowed the stack instead).
#[tokio::test]
async fn a_frame_filling_job_redelivered_by_a_quorum_queue_is_answered() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let providers = format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], ""));
    let text = env.config_text(&providers, "").replacen("[amqp]\n", "[amqp]\nqueue_type = \"quorum\"\n", 1);
    let config = env.dir.join("quorum.toml");
    std::fs::write(&config, text).unwrap();
    // A first worker declares the (quorum) queues, and leaves.
    let mut declaring = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    declaring.signal("TERM");
    assert!(declaring.wait().await.success());

    let mut publisher = RawPublisher::connect(&amqp_url()).await;
    let frame_max = publisher.frame_max.min(MAX_FRAME);
    let headers = nested_headers(Nesting::Arrays, deepest(Nesting::Arrays, frame_max));
    publisher.publish(&env.jobs, job("deep").as_bytes(), &headers).await;
    publisher.close().await;
    // A consumer takes it and is gone before acknowledging it.
    let taken = RawPublisher::connect(&amqp_url()).await.get_and_return(&env.jobs).await;
    env.publish(&job("plain"), BasicProperties::default()).await;

    let mut worker = WorkerProcess::spawn(&config);
    let mut answered = Vec::new();
    for _ in 0..2 {
        match env.client.next_message(&env.results, PATIENCE).await {
            Some((body, _)) => answered.push(String::from_utf8_lossy(&body).to_string()),
            None => break,
        }
    }
    let jobs = env.client.queue_state(&env.jobs).await;
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker is still running");
    worker.signal("TERM");
    let _ = worker.wait().await;
    assert_eq!(
        answered.len(),
        2,
        "both jobs answered within {PATIENCE:?}: {answered:?}; jobs queue: {jobs}; the broker's content-header frame when taken: {taken} bytes of a frame_max of {frame_max}"
    );
}
