//! Test harness: a fresh database and unique queue names per test, workers in-process or as
//! real processes, a test client for the broker, and a TCP relay to cut connections.
//!
//! The services are the machine's real RabbitMQ and Postgres (`TEST_AMQP_URL`,
//! `TEST_DATABASE_URL` override the defaults). Everything a test creates is removed when its
//! [`TestEnv`] is dropped, pass or fail.

#![allow(dead_code)]

pub mod raw_amqp;
pub mod relay;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fallback_worker::app::WorkerApp;
use fallback_worker::config::{Config, EnvOverrides};
use fallback_worker::job::JobResult;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use tokio_util::sync::CancellationToken;

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// How long a test waits for something that should happen (generous: machines are shared).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One test's private world: a database, queue names, a broker client.
pub struct TestEnv {
    pub id: String,
    pub database_url: String,
    database: String,
    pub jobs: String,
    pub results: String,
    pub client: BrokerClient,
    /// Extra queues the test declared (reply queues), deleted at the end.
    extra_queues: std::sync::Mutex<Vec<String>>,
    pub dir: PathBuf,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ =
                tracing_subscriber::fmt().with_env_filter("info,fallback_worker=debug").with_test_writer().try_init();
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let database = format!("fwtest_{id}");
        let mut admin = PgConnection::connect(&admin_database_url()).await.expect("Postgres is reachable");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_database_url();
        let database_url = format!("{}/{database}?sslmode=disable", base.rsplit_once('/').unwrap().0);
        let dir = std::env::temp_dir().join(format!("fwtest_{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        TestEnv {
            jobs: format!("fwtest.{id}.jobs"),
            results: format!("fwtest.{id}.results"),
            client: BrokerClient::connect(&amqp_url()).await,
            database_url,
            database,
            id,
            extra_queues: Default::default(),
            dir,
        }
    }

    /// A config with these providers and chains, pointing at this test's database and queues.
    pub fn config(&self, providers_and_chains: &str) -> Config {
        self.config_with(providers_and_chains, "")
    }

    /// Like [`config`](Self::config), with extra `[worker]` keys.
    pub fn config_with(&self, providers_and_chains: &str, worker_keys: &str) -> Config {
        Config::parse(
            &self.config_text(providers_and_chains, worker_keys),
            Path::new("test.toml"),
            &EnvOverrides::default(),
        )
        .expect("test config is valid")
    }

    pub fn config_text(&self, providers_and_chains: &str, worker_keys: &str) -> String {
        format!(
            "[amqp]\nurl = \"{}\"\njobs_queue = \"{}\"\nresults_queue = \"{}\"\nprefetch = 8\nconfirm_timeout = \"10s\"\n\n\
             [postgres]\nurl = \"{}\"\n\n[http]\naddr = \"\"\n\n[worker]\ndrain_timeout = \"20s\"\n{worker_keys}\n\n{providers_and_chains}\n",
            amqp_url(),
            self.jobs,
            self.results,
            self.database_url,
        )
    }

    /// Writes the config to a file for a worker process.
    pub fn config_file(&self, providers_and_chains: &str, worker_keys: &str) -> PathBuf {
        let path = self.dir.join(format!("config-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, self.config_text(providers_and_chains, worker_keys)).unwrap();
        path
    }

    /// Starts a worker in this process, returning once it consumes (so jobs published next
    /// find their queue).
    pub async fn spawn_worker(&self, config: Config, name: &str) -> WorkerHandle {
        let worker = self.spawn_worker_unready(config, name);
        let ready = worker.ready.clone();
        eventually("the worker consumes", || {
            let ready = ready.clone();
            async move { ready.load(std::sync::atomic::Ordering::Relaxed) }
        })
        .await;
        worker
    }

    /// Starts a worker without waiting for it to reach the broker.
    pub fn spawn_worker_unready(&self, config: Config, name: &str) -> WorkerHandle {
        let shutdown = CancellationToken::new();
        let mut app = WorkerApp::new(config);
        app.worker_id = name.to_string();
        let ready = app.broker_ready.clone();
        let http_addr = app.http_addr.clone();
        let task = tokio::spawn(app.run(shutdown.clone()));
        WorkerHandle { shutdown, task, ready, http_addr }
    }

    /// Waits until a worker (in any process) has declared this test's queues.
    pub async fn wait_for_queues(&self) {
        eventually("the worker declares its queues", || async { self.client.ready_in(&self.jobs).await.is_some() })
            .await;
    }

    /// A durable reply queue for this test.
    pub async fn reply_queue(&self, suffix: &str) -> String {
        let name = format!("fwtest.{}.reply.{suffix}", self.id);
        self.client.declare(&name).await;
        self.extra_queues.lock().unwrap().push(name.clone());
        name
    }

    /// Deletes `queue` with the test's own (e.g. the reply queue `enqueue` declares).
    pub fn remove_later(&self, queue: String) {
        self.extra_queues.lock().unwrap().push(queue);
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.jobs)
    }

    /// Publishes a job (with confirms) to this test's jobs queue.
    pub async fn publish(&self, body: &str, properties: BasicProperties) {
        self.client.publish(&self.jobs, body.as_bytes(), properties).await;
    }

    /// The next result on `queue`, waiting at most [`PATIENCE`]. Without one, the panic says
    /// where the jobs stand (still queued, or taken by a consumer that did not answer).
    pub async fn next_result(&self, queue: &str) -> (JobResult, BasicProperties) {
        let Some((body, properties)) = self.client.next_message(queue, PATIENCE).await else {
            let jobs = self.client.queue_state(&self.jobs).await;
            panic!("no result on {queue} within {PATIENCE:?}; jobs queue {}: {jobs}", self.jobs)
        };
        let result = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("result is not JSON ({e}): {}", String::from_utf8_lossy(&body)));
        (result, properties)
    }

    /// `n` results from `queue`.
    pub async fn results(&self, queue: &str, n: usize) -> Vec<JobResult> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next_result(queue).await.0);
        }
        out
    }

    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url).await.unwrap()
    }

    /// How many providers are cooling down now, per the shared table.
    pub async fn cooling_providers(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM provider_state WHERE cooldown_until > now()")
            .fetch_one(&mut self.db().await)
            .await
            .unwrap()
    }

    fn cleanup_queues(&self) -> Vec<String> {
        let mut queues = vec![self.jobs.clone(), self.results.clone(), self.dead_queue()];
        queues.extend(
            fallback_worker::broker::WAIT_TIERS
                .iter()
                .map(|t| format!("{}.wait.{}", self.jobs, humantime::format_duration(*t))),
        );
        queues.extend(self.extra_queues.lock().unwrap().iter().cloned());
        queues
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let queues = self.cleanup_queues();
        let exchange = format!("{}.dlx", self.jobs);
        let database = self.database.clone();
        let dir = self.dir.clone();
        // Drop cannot await: clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                    if let Ok(channel) = conn.create_channel().await {
                        for queue in queues {
                            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                        }
                        let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
                    }
                    let _ = conn.close(200, "bye".into()).await;
                }
                if let Ok(mut admin) = PgConnection::connect(&admin_database_url()).await {
                    let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&mut admin).await;
                }
            });
            let _ = std::fs::remove_dir_all(dir);
        });
        let _ = cleanup.join();
    }
}

/// A worker running in this process.
pub struct WorkerHandle {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub http_addr: std::sync::Arc<std::sync::OnceLock<std::net::SocketAddr>>,
}

impl WorkerHandle {
    /// Graceful stop: drains in-flight jobs.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("worker stops in time").unwrap().unwrap();
    }
}

/// A worker as a separate OS process (to SIGKILL or SIGTERM it).
/// A directory of its own for a test's files, removed when the test ends (passed or not).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("fw-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    /// Writes `bytes` to the file `name` in it.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The exit status of `child` once it exits, within `patience`; `None` (the child killed) if
/// it has not by then.
pub fn exit_within(child: &mut std::process::Child, patience: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct WorkerProcess {
    pub child: Child,
}

impl WorkerProcess {
    pub fn spawn(config: &Path) -> WorkerProcess {
        Self::spawn_with_env(config, &[])
    }

    /// Like [`spawn`](Self::spawn), with extra environment variables. Trace export is off
    /// unless `env` turns it on, whatever the test runner's environment says.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> WorkerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_fallback-worker"))
            .args(["--config", config.to_str().unwrap(), "worker"])
            .env("RUST_LOG", if std::env::var_os("TEST_LOG").is_some() { "info" } else { "warn" })
            .env("LOG_FORMAT", "text")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            // The binary's own stacks are what is tested (tests/it/deep_headers.rs).
            .env_remove("RUST_MIN_STACK")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the worker binary starts");
        WorkerProcess { child }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most [`PATIENCE`].
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "worker process did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's own broker connection: publish with confirms, read queues.
pub struct BrokerClient {
    conn: Connection,
    channel: Channel,
}

impl BrokerClient {
    pub async fn connect(url: &str) -> BrokerClient {
        let conn = Connection::connect(url, ConnectionProperties::default()).await.expect("RabbitMQ is reachable");
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        BrokerClient { conn, channel }
    }

    /// Deletes `queue` (as an operator could, under a running worker).
    pub async fn delete(&self, queue: &str) {
        self.channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.unwrap();
    }

    /// `queue` as the broker knows it (its ready messages and consumers), or why not: asked on a
    /// channel of its own, which the broker closes when the queue does not exist.
    async fn inspect(&self, queue: &str) -> Result<lapin::Queue, lapin::Error> {
        let channel = self.conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await;
        let _ = channel.close(200, "probed".into()).await;
        declared
    }

    /// The messages ready in `queue`, or `None` when it does not exist.
    pub async fn ready_in(&self, queue: &str) -> Option<u32> {
        self.inspect(queue).await.ok().map(|declared| declared.message_count())
    }

    pub async fn declare(&self, queue: &str) {
        self.declare_with(queue, FieldTable::default()).await;
    }

    pub async fn declare_with(&self, queue: &str, args: FieldTable) {
        self.channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await.unwrap();
    }

    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish("".into(), queue.into(), Default::default(), body, properties.with_delivery_mode(2))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// The next message on `queue` (taken and acked), or `None` after `limit`. Pulls with
    /// `basic.get`, so no message is left stuck in a cancelled consumer's buffer.
    pub async fn next_message(&self, queue: &str, limit: Duration) -> Option<(Vec<u8>, BasicProperties)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(message)) = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
                message.delivery.ack(BasicAckOptions::default()).await.unwrap();
                return Some((message.delivery.data, message.delivery.properties));
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// "N ready, C consumers" for `queue`, read without touching its messages, for a failure's
    /// message.
    pub async fn queue_state(&self, queue: &str) -> String {
        match self.inspect(queue).await {
            Ok(q) => format!("{} ready, {} consumers", q.message_count(), q.consumer_count()),
            Err(e) => format!("not readable ({e})"),
        }
    }

    /// Messages now waiting in `queue` (0 if it does not exist).
    pub async fn depth(&self, queue: &str) -> u32 {
        let probe = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await;
        match probe {
            Ok(Some(message)) => {
                let count = message.message_count + 1;
                message
                    .delivery
                    .nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() })
                    .await
                    .unwrap();
                count
            }
            _ => 0,
        }
    }
}

/// A job line for `custom_id` with a short user message.
pub fn job(custom_id: &str) -> String {
    serde_json::json!({"custom_id": custom_id, "body": {"messages": [{"role": "user", "content": format!("hello {custom_id}")}], "max_tokens": 16}})
        .to_string()
}

/// A provider block for the config: a 2 s timeout and no in-place retry unless `extra` says.
pub fn provider(name: &str, base_url: &str, free: bool, extra: &str) -> String {
    let mut block = format!(
        "[[providers]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\nmodel = \"{name}-model\"\nfree = {free}\n{extra}\n"
    );
    for (key, default) in [("timeout", "\"2s\""), ("max_retries", "0")] {
        if !extra.contains(&format!("{key} =")) {
            block.push_str(&format!("{key} = {default}\n"));
        }
    }
    block
}

/// A chain block.
pub fn chain(name: &str, providers: &[&str], extra: &str) -> String {
    let list = providers.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ");
    format!("[chains.{name}]\nproviders = [{list}]\n{extra}\n")
}

/// A header value as text.
pub fn header(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Polls `check` until it is true, at most [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
