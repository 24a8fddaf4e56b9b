//! Headers nested as deep as a frame holds (black-box review, session 31, finding 1: one job
//! with a header table nested 2,000 deep overflowed lapin's reading thread, aborted the worker,
//! was redelivered to the next, and stopped the whole service; `src/broker/frames.rs`).

use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use lapin::BasicProperties;

use crate::support::raw_amqp::{Nesting, RawPublisher, deepest, nested_headers};
use crate::support::*;

/// A worker process on its own defaults (its stacks, its frame size) with one free provider `p`,
/// consuming; the mock lives as long as the returned handle.
pub(crate) async fn worker_process(env: &TestEnv) -> (MockProvider, WorkerProcess) {
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let providers = format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], ""));
    let worker = WorkerProcess::spawn(&env.config_file(&providers, ""));
    env.wait_for_queues().await;
    (mock, worker)
}

/// The deepest headers one frame carries, as tables and as arrays, ahead of an ordinary job: a
/// worker process on its own defaults answers all three (the headers change nothing about how
/// a job is served) and is still running.
#[tokio::test]
async fn headers_nested_as_deep_as_a_frame_holds_stop_neither_the_worker_nor_its_other_jobs() {
    let env = TestEnv::new().await;
    let (_mock, mut worker) = worker_process(&env).await;
    let mut publisher = RawPublisher::connect(&amqp_url()).await;
    for (custom_id, nesting) in [("tables", Nesting::Tables), ("arrays", Nesting::Arrays)] {
        let headers = publisher.deepest_headers(nesting);
        publisher.publish(&env.jobs, job(custom_id).as_bytes(), &headers).await;
    }
    publisher.close().await;
    env.publish(&job("plain"), BasicProperties::default()).await;
    let mut answered: Vec<String> = Vec::new();
    for result in env.results(&env.results, 3).await {
        assert!(result.is_success(), "{result:?}");
        answered.extend(result.custom_id);
    }
    answered.sort();
    assert_eq!(answered, ["arrays", "plain", "tables"]);
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker is still running");
    worker.signal("TERM");
    assert!(worker.wait().await.success(), "and drains and exits 0 on SIGTERM");
}

/// The test's own publisher: the frames it writes are what the broker takes (the deepest
/// headers are exactly one frame: one level more is refused).
#[tokio::test]
async fn the_raw_publisher_fills_a_frame_exactly() {
    let mut publisher = RawPublisher::connect(&amqp_url()).await;
    let frame_max = publisher.frame_max;
    let env = TestEnv::new().await;
    env.client.declare(&env.jobs).await;
    for nesting in [Nesting::Tables, Nesting::Arrays] {
        let depth = deepest(nesting, frame_max);
        publisher.publish(&env.jobs, b"{}", &nested_headers(nesting, depth)).await;
        // 14 (class .. flags) + headers + 1 (delivery mode) + 8 (frame overhead) ≤ frame_max.
        let frame = 14 + nested_headers(nesting, depth).len() + 1 + 8;
        assert!(frame <= frame_max as usize && frame + 7 > frame_max as usize, "{nesting:?}: {frame} of {frame_max}");
    }
    publisher.close().await;
    // Counted without a delivery: this test process's own lapin would overflow decoding them.
    assert_eq!(env.client.ready_in(&env.jobs).await, Some(2));
}
