//! The load and loss checker of `scripts/cluster-test.sh`: publishes numbered jobs at a steady
//! pace to a RabbitMQ cluster (with confirms, moving to the next node when one is gone), runs a
//! command once a given number is confirmed (the script's SIGKILL of a node), reads every result,
//! and prints one line of figures: jobs, answered, lost, duplicates, time to recover.
//!
//! A job counts as owed only once the broker confirmed it (the Jepsen queue checker's rule); it
//! is lost if no result for it arrived. A job whose publish was not confirmed is published
//! again with the same `message_id`, which the workers' ledger answers without a second call.
//! Exit code: 0 when every owed job was answered successfully, 1 otherwise, 2 on bad usage.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use fallback_worker::broker;
use fallback_worker::config::BrokerUrls;
use fallback_worker::job::JobResult;
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// The cluster's node URLs, comma-separated, in the order this checker tries them.
    #[arg(long)]
    urls: String,
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// Jobs published per second.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Run `--kill-command` once this many jobs are confirmed.
    #[arg(long, default_value_t = 100)]
    kill_after: usize,
    /// A shell command, run once (what it prints is passed on).
    #[arg(long)]
    kill_command: Option<String>,
    #[arg(long, default_value = "llm.jobs")]
    jobs_queue: String,
    #[arg(long, default_value = "llm.results")]
    results_queue: String,
    /// Give up waiting for results this long after the last job was confirmed.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Once every job is answered, keep reading this long to count late duplicates.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    quiet: Duration,
}

/// How long one connection attempt to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish may wait for its confirm before it is sent again (elsewhere).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the publisher keeps trying to publish one job before the run is called failed.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(90);

/// What the publisher and the reader saw, for the figures.
#[derive(Default)]
struct Ledger {
    /// custom_id → when the broker confirmed it.
    confirmed: HashMap<String, Instant>,
    /// Jobs published more than once (a publish not confirmed in time, or cut off).
    republished: usize,
    /// custom_id → results received for it.
    answers: HashMap<String, usize>,
    /// Result message ids seen: a second copy of the same id is the broker redelivering it.
    result_ids: HashSet<String>,
    redelivered_results: usize,
    failed_results: usize,
    /// When each result arrived.
    arrivals: Vec<(Instant, String)>,
    killed_at: Option<Instant>,
    kill_output: String,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(urls) = BrokerUrls::parse_list(&args.urls) else {
        eprintln!("--urls: no URL");
        return ExitCode::from(2);
    };
    if args.kill_after >= args.jobs || args.rate <= 0.0 {
        eprintln!("--kill-after must be below --jobs, and --rate above 0");
        return ExitCode::from(2);
    }
    let shared: Shared = Arc::default();
    let reader = tokio::spawn(read_results(urls.clone(), args.results_queue.clone(), shared.clone()));
    let started = Instant::now();
    let published = publish_jobs(&args, &urls, &shared).await;
    let last_confirm = Instant::now();
    if let Err(e) = &published {
        eprintln!("publishing failed: {e}");
    }
    // Wait for every confirmed job to be answered, then a quiet spell for late duplicates.
    let deadline = last_confirm + args.settle;
    loop {
        let missing = {
            let ledger = lock(&shared);
            ledger.confirmed.keys().filter(|id| !ledger.answers.contains_key(*id)).count()
        };
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(args.quiet).await;
    reader.abort();
    let depths = queue_depths(&urls, &args).await;
    let ledger = lock(&shared);
    let figures = Figures::of(&ledger, started);
    println!("{}", figures.line());
    eprintln!("queues at the end: {depths}");
    let ok = published.is_ok() && figures.lost == 0 && figures.failed == 0 && figures.jobs == args.jobs;
    if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

struct Figures {
    jobs: usize,
    answered: usize,
    lost: usize,
    duplicates: usize,
    redelivered: usize,
    republished: usize,
    failed: usize,
    recover_ms: Option<u128>,
    longest_silence_ms: Option<u128>,
    total_ms: u128,
}

impl Figures {
    fn of(ledger: &Ledger, started: Instant) -> Figures {
        let answered = ledger.confirmed.keys().filter(|id| ledger.answers.contains_key(*id)).count();
        let duplicates = ledger.answers.values().map(|n| n.saturating_sub(1)).sum();
        // Recovered: a job published after the kill has been answered (the whole path works
        // again: publish, a worker on a live node, the result back).
        let recover_ms = ledger.killed_at.and_then(|killed| {
            ledger
                .arrivals
                .iter()
                .filter(|(_, id)| ledger.confirmed.get(id).is_some_and(|at| *at > killed))
                .map(|(at, _)| at.saturating_duration_since(killed).as_millis())
                .min()
        });
        // The longest stretch without any result, from the kill on.
        let longest_silence_ms = ledger.killed_at.map(|killed| {
            let mut times: Vec<Instant> =
                ledger.arrivals.iter().map(|(at, _)| *at).filter(|at| *at >= killed).collect();
            times.sort();
            let mut previous = killed;
            let mut longest = Duration::ZERO;
            for at in times {
                longest = longest.max(at.saturating_duration_since(previous));
                previous = at;
            }
            longest.as_millis()
        });
        Figures {
            jobs: ledger.confirmed.len(),
            answered,
            lost: ledger.confirmed.len() - answered,
            duplicates,
            redelivered: ledger.redelivered_results,
            republished: ledger.republished,
            failed: ledger.failed_results,
            recover_ms,
            longest_silence_ms,
            total_ms: started.elapsed().as_millis(),
        }
    }

    fn line(&self) -> String {
        let ms = |v: Option<u128>| v.map_or("n/a".to_string(), |v| format!("{v}ms"));
        format!(
            "figures: jobs={} answered={} lost={} duplicates={} (same result redelivered={}, jobs republished={}) \
             failed={} time_to_recover={} longest_silence={} run={}ms",
            self.jobs,
            self.answered,
            self.lost,
            self.duplicates,
            self.redelivered,
            self.republished,
            self.failed,
            ms(self.recover_ms),
            ms(self.longest_silence_ms),
            self.total_ms
        )
    }
}

/// One job line: a short prompt, numbered.
fn job_body(custom_id: &str) -> Vec<u8> {
    serde_json::json!({
        "custom_id": custom_id,
        "body": {"messages": [{"role": "user", "content": format!("cluster check {custom_id}")}], "max_tokens": 16}
    })
    .to_string()
    .into_bytes()
}

/// A confirm-mode channel on the first node from `start` on that takes a connection.
async fn open_publisher(urls: &BrokerUrls, start: usize) -> Result<(Connection, Channel, usize), String> {
    let list = urls.as_slice();
    let mut failures = Vec::new();
    for step in 0..list.len() {
        let at = (start + step) % list.len();
        let opened = async {
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, broker::connect(&list[at], "cluster-check (publish)"))
                .await
                .map_err(|_| "connect timed out".to_string())??;
            let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            channel.confirm_select(Default::default()).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, channel))
        };
        match opened.await {
            Ok((conn, channel)) => return Ok((conn, channel, at)),
            Err(e) => failures.push(e),
        }
    }
    Err(failures.join("; "))
}

async fn publish_jobs(args: &Args, urls: &BrokerUrls, shared: &Shared) -> Result<(), String> {
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut session: Option<(Connection, Channel)> = None;
    let mut node = 0;
    for n in 0..args.jobs {
        pace.tick().await;
        let custom_id = format!("cj-{n:05}");
        let body = job_body(&custom_id);
        let give_up = Instant::now() + PUBLISH_PATIENCE;
        let mut tries = 0;
        loop {
            if Instant::now() >= give_up {
                return Err(format!("{custom_id} could not be published within {PUBLISH_PATIENCE:?}"));
            }
            let channel = match &session {
                Some((_, channel)) => channel.clone(),
                None => match open_publisher(urls, node).await {
                    Ok((conn, channel, at)) => {
                        node = at;
                        session = Some((conn, channel.clone()));
                        channel
                    }
                    Err(e) => {
                        eprintln!("publisher: no node takes a connection ({e}); trying again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                },
            };
            tries += 1;
            if tries == 2 {
                lock(shared).republished += 1;
            }
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(custom_id.as_str().into())
                .with_correlation_id(custom_id.as_str().into());
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let sent =
                channel.basic_publish("".into(), args.jobs_queue.as_str().into(), options, &body, properties).await;
            let outcome = match sent {
                Ok(confirm) => match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(Confirmation::Ack(Some(_)))) => Err("returned: the jobs queue is missing".to_string()),
                    Ok(Ok(other)) => Err(format!("not confirmed: {other:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no confirm within {CONFIRM_TIMEOUT:?}")),
                },
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    eprintln!("publisher: {custom_id}: {e}; publishing it again on the next node");
                    if let Some((conn, _)) = session.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "retry".into())).await;
                    }
                    node += 1;
                }
            }
        }
        lock(shared).confirmed.insert(custom_id, Instant::now());
        if n + 1 == args.kill_after
            && let Some(command) = &args.kill_command
        {
            let (command, shared) = (command.clone(), shared.clone());
            // Off the pacing task: publishing goes on while the node is found and killed.
            tokio::task::spawn_blocking(move || {
                let output = std::process::Command::new("sh").arg("-c").arg(&command).output();
                let mut ledger = lock(&shared);
                ledger.killed_at = Some(Instant::now());
                ledger.kill_output = match output {
                    Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
                    Ok(out) => format!(
                        "{} {} ({})",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim(),
                        out.status
                    ),
                    Err(e) => format!("could not run: {e}"),
                };
                eprintln!("kill command: {}", ledger.kill_output);
            });
        }
    }
    if let Some((conn, _)) = session {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "published".into())).await;
    }
    Ok(())
}

/// Reads the results queue until aborted, moving to the next node whenever the session breaks.
async fn read_results(urls: BrokerUrls, queue: String, shared: Shared) {
    let list = urls.as_slice().to_vec();
    let mut node = 0;
    loop {
        let url = &list[node % list.len()];
        node += 1;
        let session = async {
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, broker::connect(url, "cluster-check (results)"))
                .await
                .map_err(|_| "connect timed out".to_string())??;
            let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            channel.basic_qos(500, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
            let consumer = channel
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, consumer))
        };
        let (_conn, mut consumer) = match session.await {
            Ok(session) => session,
            Err(e) => {
                eprintln!("reader: {e}; trying the next node");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        while let Some(Ok(delivery)) = consumer.next().await {
            record(&shared, &delivery.data, &delivery.properties);
            if delivery.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
        eprintln!("reader: the results session ended; moving to the next node");
    }
}

fn record(shared: &Shared, body: &[u8], properties: &BasicProperties) {
    let correlation = properties.correlation_id().as_ref().map(|c| c.to_string());
    let parsed = serde_json::from_slice::<JobResult>(body).ok();
    let Some(custom_id) = correlation.or_else(|| parsed.as_ref().and_then(|r| r.custom_id.clone())) else {
        eprintln!("reader: a result naming no job: {}", String::from_utf8_lossy(body));
        return;
    };
    let mut ledger = lock(shared);
    if parsed.as_ref().is_none_or(|r| !r.is_success()) {
        ledger.failed_results += 1;
        eprintln!("reader: {custom_id} was not answered successfully: {}", String::from_utf8_lossy(body));
    }
    if let Some(id) = properties.message_id().as_ref()
        && !ledger.result_ids.insert(id.to_string())
    {
        ledger.redelivered_results += 1;
    }
    *ledger.answers.entry(custom_id.clone()).or_default() += 1;
    ledger.arrivals.push((Instant::now(), custom_id));
}

/// Messages left in the service's queues, read on any node that answers.
async fn queue_depths(urls: &BrokerUrls, args: &Args) -> String {
    let Ok(conn) = broker::connect_any(urls, "cluster-check (depths)", CONNECT_TIMEOUT).await else {
        return "(no node answered)".into();
    };
    let dead = format!("{}.dead", args.jobs_queue);
    let mut parts = Vec::new();
    for queue in [&args.jobs_queue, &args.results_queue, &dead] {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = match conn.create_channel().await {
            Ok(channel) => match channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                Ok(declared) => declared.message_count().to_string(),
                Err(e) => format!("? ({e})"),
            },
            Err(e) => format!("? ({e})"),
        };
        parts.push(format!("{queue}={depth}"));
    }
    let _ = conn.close(200, "bye".into()).await;
    parts.join(" ")
}
