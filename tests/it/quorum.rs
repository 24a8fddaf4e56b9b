//! `amqp.queue_type = "quorum"` and `amqp.url` lists on the machine's single RabbitMQ node
//! (contract §4, §5). A single node runs quorum queues with one replica, so these tests check the
//! declarations and the message paths; `scripts/cluster-test.sh` kills a node of a real cluster.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use fallback_worker::broker::{QueueRole, Topology, WAIT_TIERS};
use fallback_worker::cli::enqueue::reply_queue_for;
use fallback_worker::config::{BrokerUrls, Config, QueueType};
use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use fallback_worker::routing::AttemptOutcome;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::support::relay::Relay;
use crate::support::*;

/// A URL where nothing listens: a node that is gone.
const DEAD_NODE: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

fn one_provider(mock: &MockProvider) -> String {
    format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], ""))
}

fn quorum(mut config: Config) -> Config {
    config.amqp.queue_type = QueueType::Quorum;
    config
}

/// Whether `queue` is a quorum queue: the broker takes a declaration with the service's quorum
/// arguments as equivalent, and refuses one that says `classic` (each on a channel of its own,
/// as a refusal closes its channel).
async fn is_quorum(queue: &str, args: FieldTable) -> bool {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("RabbitMQ is reachable");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let channel = conn.create_channel().await.unwrap();
    let exists = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok();
    let channel = conn.create_channel().await.unwrap();
    let same = channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await.is_ok();
    let mut classic = FieldTable::default();
    classic.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
    let channel = conn.create_channel().await.unwrap();
    let not_classic = channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), classic).await.is_err();
    let _ = conn.close(200, "probed".into()).await;
    exists && same && not_classic
}

#[tokio::test]
async fn a_quorum_worker_declares_quorum_queues_answers_and_brings_a_parked_job_back() {
    let env = TestEnv::new().await;
    let only = MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap();
    only.script([Scenario::RateLimited(RetryHint::RetryAfterMs(2500))]);
    let config = quorum(env.config_with(&one_provider(&only), "hold_limit = \"500ms\""));
    let topology = Topology::from_config(&config.amqp, &config.worker);
    let worker = env.spawn_worker(config, "w1").await;

    let mut queues = vec![
        (env.jobs.clone(), topology.arguments(QueueRole::Jobs)),
        (env.results.clone(), topology.arguments(QueueRole::Results)),
        (env.dead_queue(), topology.arguments(QueueRole::Dead)),
    ];
    queues.extend(WAIT_TIERS.iter().map(|t| (topology.wait_queue(*t), topology.arguments(QueueRole::Wait(*t)))));
    for (queue, args) in queues {
        assert!(is_quorum(&queue, args).await, "{queue} is a quorum queue with the service's arguments");
    }

    // The first call is refused for 2.5 s, longer than the 500 ms hold: the job is parked in a
    // quorum delay queue, dead-letters back (at least once) and is answered.
    env.publish(&job("parked"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    let outcomes: Vec<AttemptOutcome> = result.routing.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes.first(), Some(&AttemptOutcome::RateLimited), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&AttemptOutcome::Ok), "{outcomes:?}");
    assert!(result.routing.total_ms >= 2500, "it waited in a delay queue: {} ms", result.routing.total_ms);

    for i in 0..5 {
        env.publish(&job(&format!("plain-{i}")), BasicProperties::default()).await;
    }
    let answered: BTreeSet<String> =
        env.results(&env.results, 5).await.into_iter().filter_map(|r| r.custom_id).collect();
    assert_eq!(answered, (0..5).map(|i| format!("plain-{i}")).collect());
    eventually("the jobs queue drains", || async { env.client.depth(&env.jobs).await == 0 }).await;
    worker.stop().await;
}

#[tokio::test]
async fn the_brokers_delivery_limit_dead_letters_only_after_the_services_own_count() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = quorum(env.config_with(&one_provider(&mock), "max_deliveries = 3"));
    let limit = Topology::from_config(&config.amqp, &config.worker).jobs_delivery_limit;
    let worker = env.spawn_worker(config, "w1").await;
    worker.stop().await;

    // No worker consumes now: this client receives the job and hands it back, as a worker that
    // crashes on it would, until the broker gives up on it.
    env.publish(&job("crasher"), BasicProperties::default().with_correlation_id("crasher".into())).await;
    let mut deliveries = 0;
    while env.client.depth(&env.jobs).await > 0 {
        deliveries += 1;
        assert!(deliveries <= limit + 1, "the broker keeps handing the job out past its limit {limit}");
    }
    assert!(deliveries > 3, "the service's max_deliveries (3) comes first: {deliveries}");
    let (body, properties) =
        env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("dead-lettered, not dropped");
    assert!(String::from_utf8_lossy(&body).contains("crasher"));
    assert_eq!(header(&properties, "x-first-death-reason").as_deref(), Some("delivery_limit"));
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("crasher"));
}

#[tokio::test]
async fn a_queue_declared_classic_by_someone_else_is_used_as_it_is() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    env.client.declare(&env.jobs).await;
    let shortest_wait = Topology::new(&env.jobs, &env.results).wait_queue(WAIT_TIERS[0]);
    env.client.declare(&shortest_wait).await;
    let worker = env.spawn_worker(quorum(env.config(&one_provider(&mock))), "w1").await;
    env.publish(&job("on-classic"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    let topology = Topology::new(&env.jobs, &env.results).quorum(10);
    assert!(!is_quorum(&env.jobs, topology.arguments(QueueRole::Jobs)).await, "the existing queue was kept");
    assert!(is_quorum(&env.results, topology.arguments(QueueRole::Results)).await, "the missing one was declared");
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_skips_a_dead_node_and_moves_on_when_its_node_goes() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let upstream = "127.0.0.1:5672".parse().unwrap();
    let (first, second) = (Relay::start(upstream).await, Relay::start(upstream).await);
    let mut config = quorum(env.config(&one_provider(&mock)));
    let list = [
        DEAD_NODE.to_string(),
        format!("amqp://guest:guest@{}/%2f", first.addr),
        format!("amqp://guest:guest@{}/%2f", second.addr),
    ];
    config.amqp.url = BrokerUrls::parse_list(&list.join(",")).expect("three URLs");
    let worker = env.spawn_worker(config, "w1").await;

    for i in 0..5 {
        env.publish(&job(&format!("n-{i}")), BasicProperties::default()).await;
    }
    let mut answered: BTreeSet<String> =
        env.results(&env.results, 5).await.into_iter().filter_map(|r| r.custom_id).collect();
    assert!(first.cut() >= 2, "the worker skipped the dead node and was on the first live one");
    first.set_down(true);
    // Published after the node went: only a session on the next node can answer them.
    for i in 5..20 {
        env.publish(&job(&format!("n-{i}")), BasicProperties::default()).await;
    }
    while answered.len() < 20 {
        let (result, _) = env.next_result(&env.results).await;
        assert!(result.is_success(), "{result:?}");
        answered.insert(result.custom_id.unwrap());
    }
    assert_eq!(answered.len(), 20, "every job answered through the next node");
    assert!(second.cut() >= 2, "the worker is on the next node");
    worker.stop().await;
}

#[tokio::test]
async fn enqueue_with_quorum_queues_takes_a_node_list_from_amqp_url() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let worker = env.spawn_worker(quorum(env.config(&one_provider(&mock))), "w1").await;
    let text = env.config_text(&one_provider(&mock), "").replacen("[amqp]\n", "[amqp]\nqueue_type = \"quorum\"\n", 1);
    let config = env.dir.join("enqueue-quorum.toml");
    std::fs::write(&config, text).unwrap();
    let input = env.dir.join("in.jsonl");
    std::fs::write(&input, (0..3).map(|i| job(&format!("e-{i}")) + "\n").collect::<String>()).unwrap();
    let out = env.dir.join("out.jsonl");
    let reply_queue = reply_queue_for(&out);
    env.remove_later(reply_queue.clone());
    let mut command = Command::new(env!("CARGO_BIN_EXE_fallback-worker"));
    command
        .arg("--config")
        .arg(&config)
        .args(["enqueue", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--idle-timeout", "60s"])
        .env("AMQP_URL", format!("{DEAD_NODE},{}", amqp_url()))
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || command.output().expect("enqueue starts")),
    )
    .await
    .expect("enqueue ends")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "no password in what it prints: {stderr}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
    worker.stop().await;
}
