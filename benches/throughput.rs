//! Throughput benchmark (issue #9): the service's worker next to a minimal worker written here
//! with the same crates, measured in the same run, alternating.
//!
//!     cargo bench --bench throughput                              # every part (a few minutes)
//!     cargo bench --bench throughput -- part=latency               # one part (or a list: part=throughput,scaling)
//!     cargo bench --bench throughput -- jobs=5000 rounds=3         # sizes; also THROUGHPUT_JOBS=5000 …
//!
//! Settings (`key=value` argument, or the environment variable `THROUGHPUT_<KEY>`), defaults in
//! brackets: `part` [all: throughput,latency,admission,scaling], `jobs` per throughput run [3000],
//! `prefetch` [32,64], `rounds` of service/minimal [2], `rate` jobs/s [200] for `secs` [10],
//! `admission_jobs` [12000] with `block` [3000], `shared_jobs` [8000] for `shared_workers` [4],
//! `scaling_jobs` [6000] for `scaling_workers` [1,2,4], `minimal_runtime` [current | multi],
//! `minimal_connections` [1 | 2: publish on a second connection, as the service does],
//! `minimal_pad` [0]: bytes of padding the minimal worker adds to each answer it publishes (to
//! see what the size of the service's result envelope costs the broker), `minimal_mandatory`
//! [false]: publish the answers `mandatory`, as the service does (measured: no cost of its own),
//! `pg_connections` [3]: the service's `postgres.max_connections` (4: two ledger batches in flight),
//! `wrap` [none]: a command the worker processes (service and minimal) run under, split on
//! spaces, e.g. `THROUGHPUT_WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"`:
//! instruction counts do not depend on how busy the shared machine is (run two sizes and take
//! the difference per job, so start-up cancels out).
//!
//! **The reference line is the minimal worker**: consume with the same prefetch → one POST of the
//! job's `body` to the mock provider's `/chat/completions` → publish the answer to the results
//! queue (persistent, publisher confirm) → ack. No ledger, no chain, no shared state: what
//! lapin, reqwest and tokio cost on their own. It runs as a child process (this binary
//! re-executed with `THROUGHPUT_MINIMAL_WORKER` set) on the same tokio runtime flavour as the
//! service's `main` (current-thread), so its CPU is counted exactly like the service's.
//! The service is the release binary's `worker` (one process unless said), a fresh database per
//! run. Both call the project's mock provider (no latency, served from this process) through the
//! real RabbitMQ. Every line is printed as `service`, `reference`, `ratio = service / reference`
//! and the issue's target for that ratio:
//!
//! - `throughput pN jobs/s`: prefetch N, the jobs queued before the worker starts; jobs/s counts
//!   from the first result to the last (start-up excluded); mean of `rounds` runs, run in the
//!   order service, minimal, service, minimal. Higher is better, target ratio ≥ 0.8.
//! - `throughput pN CPU ms/job`: the worker process's utime+stime (`/proc/<pid>/stat`, 10 ms
//!   ticks) over that same span, per job. Lower is better, target ratio ≤ 2.
//! - `latency R/s p50|p99 ms`: R jobs/s published for `secs` seconds to an idle worker (prefetch
//!   32); each job carries its publish instant in `correlation_id`, latency is publish → result
//!   received here. Targets p50 ≤ 1.5, p99 ≤ 3.
//! - `admission last/first`: one process and a provider with limits (100000 requests and 10^8
//!   tokens per day) works `admission_jobs`; jobs/s over the last `block` results against the
//!   first `block`: does admission slow down as the usage tables grow? Target ≥ 0.9. The
//!   `no limits` line is the same for an unlimited provider, as a control.
//! - `admission limited/unlimited`: that limited run's jobs/s against the same backlog without
//!   limits (same run): what admission costs. Target ≥ 0.7.
//! - `admission K procs`: K processes share the limited provider on one backlog of `shared_jobs`:
//!   total jobs/s (admissions per second) against the same K processes without limits.
//! - `scaling N procs`: N processes, no limits, one backlog of `scaling_jobs`: total jobs/s against
//!   one minimal worker on the same backlog (prefetch 32).
//!
//! Before the table, one line per run: jobs/s and the workers' CPU per job, then the CPU per job
//! of every RabbitMQ (`beam.smp`) and Postgres process on the machine over the same span (other
//! users of them count too) and how busy the whole machine was: near 100 % means the cores, not
//! the worker, set the pace. The admission part also prints jobs/s along each single-process run
//! in eighths, to show whether the rate falls as usage grows or only starts slow.
//!
//! Everything shares the machine's cores (broker, Postgres, mock, this process, the workers):
//! figures are only comparable within one run, which is why each comes with its reference.

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use fallback_worker::job::JobResult;
use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use support::{TestEnv, WorkerProcess, chain, job, provider};

/// How long a run may go without a single result before the bench gives up.
const STALL: Duration = Duration::from_secs(60);
/// USER_HZ: the unit of utime and stime in `/proc/<pid>/stat`.
const TICKS_PER_SEC: f64 = 100.0;
/// The service's limits in the `admission` part (issue #9).
const LIMITS: &str = r#"limits = [{ requests = 100000, per = "1d" }, { tokens = 100000000, per = "1d" }]"#;
/// Set in the child process that runs the minimal worker.
const MINIMAL_ENV: &str = "THROUGHPUT_MINIMAL_WORKER";

fn main() {
    if std::env::var_os(MINIMAL_ENV).is_some() {
        minimal::main();
        return;
    }
    let settings = Settings::read();
    println!("throughput: parts {}; load average {}", settings.parts.join(","), load_average());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let rows = runtime.block_on(run_parts(&settings));
    print_table(&rows);
    println!("\nload average at the end: {} (other processes share the cores)", load_average());
}

async fn run_parts(settings: &Settings) -> Vec<Row> {
    let broker = Broker::connect().await;
    let mut rows = Vec::new();
    if settings.runs("throughput") {
        for &prefetch in &settings.prefetch {
            rows.extend(throughput(&broker, settings, prefetch).await);
        }
    }
    if settings.runs("latency") {
        rows.extend(latency(&broker, settings).await);
    }
    if settings.runs("admission") {
        rows.extend(admission(&broker, settings).await);
    }
    if settings.runs("scaling") {
        rows.extend(scaling(&broker, settings).await);
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// The four parts

/// Part 1: service / minimal / service / minimal at one prefetch.
async fn throughput(broker: &Broker, settings: &Settings, prefetch: u16) -> Vec<Row> {
    let (mut service, mut minimal) = (Vec::new(), Vec::new());
    for round in 1..=settings.rounds {
        let tag = format!("round {round}");
        service.push(backlog_run(broker, Subject::service(1), prefetch, settings.jobs, &tag).await);
        minimal.push(backlog_run(broker, Subject::Minimal, prefetch, settings.jobs, &tag).await);
    }
    let mean = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    vec![
        Row::new(format!("throughput p{prefetch}: jobs/s vs minimal"), mean(&service, Run::rate))
            .against(mean(&minimal, Run::rate))
            .at_least(0.8),
        Row::new(format!("throughput p{prefetch}: CPU ms/job vs minimal"), mean(&service, Run::cpu_ms_per_job))
            .against(mean(&minimal, Run::cpu_ms_per_job))
            .at_most(2.0),
    ]
}

/// Part 2: publish → result latency at a paced rate, prefetch 32.
async fn latency(broker: &Broker, settings: &Settings) -> Vec<Row> {
    let service = paced_run(broker, Subject::service(1), settings.rate, settings.secs).await;
    let minimal = paced_run(broker, Subject::Minimal, settings.rate, settings.secs).await;
    let rate = settings.rate;
    vec![
        Row::new(format!("latency {rate}/s: p50 ms vs minimal"), percentile_ms(&service, 0.50))
            .against(percentile_ms(&minimal, 0.50))
            .at_most(1.5),
        Row::new(format!("latency {rate}/s: p99 ms vs minimal"), percentile_ms(&service, 0.99))
            .against(percentile_ms(&minimal, 0.99))
            .at_most(3.0),
    ]
}

/// Part 3: a limited provider at scale, against the same backlog without limits.
async fn admission(broker: &Broker, settings: &Settings) -> Vec<Row> {
    let (jobs, block) = (settings.admission_jobs, settings.block.min(settings.admission_jobs));
    let limited = backlog_run(broker, Subject::limited(1), 32, jobs, "limited").await;
    let unlimited = backlog_run(broker, Subject::service(1), 32, jobs, "no limits").await;
    println!("    jobs/s along the limited run, in eighths: {}", limited.profile(8));
    println!("    jobs/s along the run without limits:      {}", unlimited.profile(8));
    let k = settings.shared_workers;
    let shared = backlog_run(broker, Subject::limited(k), 32, settings.shared_jobs, "limited").await;
    let shared_unlimited = backlog_run(broker, Subject::service(k), 32, settings.shared_jobs, "no limits").await;
    let first = |run: &Run| run.rate_over(0..block);
    let last = |run: &Run| run.rate_over(run.jobs() - block..run.jobs());
    vec![
        Row::new(format!("admission: last/first {block} of {jobs}, jobs/s"), last(&limited))
            .against(first(&limited))
            .at_least(0.9),
        Row::new("  same, no limits (control)", last(&unlimited)).against(first(&unlimited)),
        Row::new("admission: limited vs no limits, jobs/s", limited.rate()).against(unlimited.rate()).at_least(0.7),
        Row::new(format!("admission: {k} procs limited vs no limits"), shared.rate()).against(shared_unlimited.rate()),
    ]
}

/// Part 4: 1, 2, 4 … processes on one backlog, against one minimal worker.
async fn scaling(broker: &Broker, settings: &Settings) -> Vec<Row> {
    let jobs = settings.scaling_jobs;
    let minimal = backlog_run(broker, Subject::Minimal, 32, jobs, "scaling").await;
    let mut rows = Vec::new();
    for &n in &settings.scaling_workers {
        let run = backlog_run(broker, Subject::service(n), 32, jobs, "scaling").await;
        rows.push(Row::new(format!("scaling: {n} procs, jobs/s vs 1 minimal"), run.rate()).against(minimal.rate()));
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Runs

/// Who works the queue.
#[derive(Clone, Copy)]
enum Subject {
    /// The service's worker processes, the provider limited or not.
    Service { processes: usize, limited: bool },
    /// One minimal worker process (the reference).
    Minimal,
}

impl Subject {
    fn service(processes: usize) -> Subject {
        Subject::Service { processes, limited: false }
    }

    fn limited(processes: usize) -> Subject {
        Subject::Service { processes, limited: true }
    }

    fn label(self) -> String {
        match self {
            Subject::Service { processes, limited } => {
                format!("service x{processes}{}", if limited { " limited" } else { "" })
            }
            Subject::Minimal => "minimal".into(),
        }
    }
}

/// One run's results, in arrival order.
struct Run {
    arrivals: Vec<Instant>,
    /// CPU spent between the first result and the last.
    cpu: CpuUse,
}

impl Run {
    fn jobs(&self) -> usize {
        self.arrivals.len()
    }

    /// Jobs per second from the first result to the last.
    fn rate(&self) -> f64 {
        self.rate_over(0..self.jobs())
    }

    /// Jobs per second over the results in `range` (by arrival order).
    fn rate_over(&self, range: std::ops::Range<usize>) -> f64 {
        let span = self.arrivals[range.end - 1] - self.arrivals[range.start];
        (range.len() - 1) as f64 / span.as_secs_f64()
    }

    /// The worker processes' CPU per job.
    fn cpu_ms_per_job(&self) -> f64 {
        self.per_job_ms(self.cpu.workers)
    }

    fn per_job_ms(&self, ticks: u64) -> f64 {
        ticks as f64 / TICKS_PER_SEC * 1000.0 / (self.jobs() - 1) as f64
    }

    /// Jobs/s over each of `slices` equal parts of the run: how the rate moves along it.
    fn profile(&self, slices: usize) -> String {
        let size = self.jobs() / slices;
        let rates: Vec<String> =
            (0..slices).map(|i| format!("{:.0}", self.rate_over(i * size..(i + 1) * size))).collect();
        rates.join(" ")
    }
}

/// A fresh world for one run: database, queues, mock provider.
struct Stage {
    env: TestEnv,
    mock: MockProvider,
}

impl Stage {
    async fn new(broker: &Broker) -> Stage {
        let env = TestEnv::new().await;
        broker.declare(&env.jobs).await;
        broker.declare(&env.results).await;
        let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
        Stage { env, mock }
    }

    /// Starts the subject's processes on this stage's queues.
    fn spawn(&self, subject: Subject, prefetch: u16) -> Vec<WorkerProcess> {
        match subject {
            Subject::Service { processes, limited } => {
                let config = self.service_config(prefetch, limited);
                (0..processes).map(|_| spawn_service(&config)).collect()
            }
            Subject::Minimal => vec![self.spawn_minimal(prefetch)],
        }
    }

    fn service_config(&self, prefetch: u16, limited: bool) -> PathBuf {
        let limits = if limited { LIMITS } else { "" };
        let providers =
            format!("{}{}", provider("fast", &self.mock.base_url(), true, limits), chain("default", &["fast"], ""));
        let path = self.env.dir.join(format!("service-p{prefetch}-{limited}.toml"));
        // `pg_connections=4` gives the ledger a second batch in flight (the default 3: one).
        let connections: u32 = setting("pg_connections", 3);
        let text = self
            .env
            .config_text(&providers, "")
            .replace("prefetch = 8", &format!("prefetch = {prefetch}"))
            .replace("\n\n[http]", &format!("\nmax_connections = {connections}\n\n[http]"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn spawn_minimal(&self, prefetch: u16) -> WorkerProcess {
        let child = wrapped(std::env::current_exe().unwrap().to_str().unwrap())
            .env(MINIMAL_ENV, "1")
            .env("MINIMAL_AMQP_URL", support::amqp_url())
            .env("MINIMAL_JOBS", &self.env.jobs)
            .env("MINIMAL_RESULTS", &self.env.results)
            .env("MINIMAL_PROVIDER_URL", format!("{}/chat/completions", self.mock.base_url()))
            .env("MINIMAL_PREFETCH", prefetch.to_string())
            .env("MINIMAL_RUNTIME", setting::<String>("minimal_runtime", "current".into()))
            .env("MINIMAL_CONNECTIONS", setting::<String>("minimal_connections", "1".into()))
            .env("MINIMAL_PAD", setting::<String>("minimal_pad", "0".into()))
            .env("MINIMAL_MANDATORY", setting::<String>("minimal_mandatory", "false".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the bench binary re-executes itself");
        WorkerProcess { child }
    }
}

/// The command that runs `program`: itself, or under the `wrap` setting's command.
fn wrapped(program: &str) -> Command {
    let wrap: String = setting("wrap", String::new());
    let mut words = wrap.split_whitespace();
    match words.next() {
        None => Command::new(program),
        Some(first) => {
            let mut command = Command::new(first);
            command.args(words).arg(program);
            command
        }
    }
}

/// The service's worker process, like `WorkerProcess::spawn`, under the `wrap` setting's command.
fn spawn_service(config: &std::path::Path) -> WorkerProcess {
    if setting("wrap", String::new()).is_empty() {
        return WorkerProcess::spawn(config);
    }
    let child = wrapped(env!("CARGO_BIN_EXE_fallback-worker"))
        .args(["--config", config.to_str().unwrap(), "worker"])
        .env("RUST_LOG", "warn")
        .env("LOG_FORMAT", "text")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the wrapped worker starts");
    WorkerProcess { child }
}

/// `jobs` queued first, then the subject started: every result's arrival, and the CPU the
/// workers spent between the first and the last.
async fn backlog_run(broker: &Broker, subject: Subject, prefetch: u16, jobs: usize, tag: &str) -> Run {
    let started = Instant::now();
    let stage = Stage::new(broker).await;
    broker.prequeue(&stage.env.jobs, jobs).await;
    let mut results = broker.consume(&stage.env.results).await;
    let mut workers = stage.spawn(subject, prefetch);
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    let collected = collect(&mut results, jobs, &pids).await;
    stop(&mut workers).await;
    check_answers(subject, &collected);
    let result_bytes = collected.bodies.iter().map(Vec::len).sum::<usize>() / collected.bodies.len().max(1);
    let run = Run { arrivals: collected.arrivals, cpu: collected.cpu };
    println!(
        "  {:<22} p{prefetch:<3} {tag:<14} {jobs:>6} jobs  {:>8.0} jobs/s  {:>6.3} ms CPU/job  \
         (broker {:.3}, postgres {:.3}; machine {:.0}% busy; run {:.1} s; results {result_bytes} B)",
        subject.label(),
        run.rate(),
        run.cpu_ms_per_job(),
        run.per_job_ms(run.cpu.broker),
        run.per_job_ms(run.cpu.postgres),
        run.cpu.machine_busy_pct,
        started.elapsed().as_secs_f64()
    );
    run
}

/// Jobs published at `rate` per second for `secs` to a running, idle subject (prefetch 32):
/// each job's publish → result latency.
async fn paced_run(broker: &Broker, subject: Subject, rate: u32, secs: u32) -> Vec<Duration> {
    let stage = Stage::new(broker).await;
    let mut results = broker.consume(&stage.env.results).await;
    let mut workers = stage.spawn(subject, 32);
    broker.wait_for_consumers(&stage.env.jobs, workers.len()).await;
    // Warm-up: connections and pools open before the measured jobs.
    let origin = Instant::now();
    broker.prequeue(&stage.env.jobs, 50).await;
    collect(&mut results, 50, &[]).await;

    let n = (rate * secs) as usize;
    let receiver = tokio::spawn(async move { collect(&mut results, n, &[]).await });
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..n {
        ticks.tick().await;
        let sent = origin.elapsed().as_nanos().to_string();
        broker.publish(&stage.env.jobs, &job(&format!("paced-{i}")), &sent).await;
    }
    broker.publisher.wait_for_confirms().await.unwrap();
    let collected = receiver.await.unwrap();
    stop(&mut workers).await;
    check_answers(subject, &collected);
    let mut latencies: Vec<Duration> = collected
        .arrivals
        .iter()
        .zip(&collected.correlation_ids)
        .map(|(at, sent)| *at - (origin + Duration::from_nanos(sent.parse().unwrap())))
        .collect();
    latencies.sort();
    println!(
        "  {:<22} p32  {rate}/s for {secs} s {n:>6} jobs  p50 {:>7.2} ms  p99 {:>7.2} ms",
        subject.label(),
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99)
    );
    latencies
}

/// `sorted[q]` in milliseconds (nearest rank).
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

async fn stop(workers: &mut [WorkerProcess]) {
    for worker in workers.iter() {
        worker.signal("TERM");
    }
    for worker in workers.iter_mut() {
        worker.wait().await;
    }
}

/// Results as they arrive.
struct Collected {
    arrivals: Vec<Instant>,
    correlation_ids: Vec<String>,
    bodies: Vec<Vec<u8>>,
    /// CPU spent between the first arrival and the last.
    cpu: CpuUse,
}

/// Takes `n` results from `consumer`, noting when each arrived.
async fn collect(consumer: &mut Consumer, n: usize, pids: &[u32]) -> Collected {
    let mut collected = Collected {
        arrivals: Vec::with_capacity(n),
        correlation_ids: Vec::new(),
        bodies: Vec::new(),
        cpu: CpuUse::default(),
    };
    let mut cpu_at_first = None;
    while collected.arrivals.len() < n {
        let delivery = match tokio::time::timeout(STALL, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(other) => panic!("the results consumer ended: {other:?}"),
            Err(_) => panic!("no result for {STALL:?}: {} of {n} arrived", collected.arrivals.len()),
        };
        collected.arrivals.push(Instant::now());
        if collected.arrivals.len() == 1 {
            cpu_at_first = Some(CpuSnapshot::take(pids));
        }
        let correlation_id = delivery.properties.correlation_id().as_ref().map(|c| c.to_string());
        collected.correlation_ids.push(correlation_id.unwrap_or_default());
        collected.bodies.push(delivery.data);
    }
    if let Some(first) = cpu_at_first {
        collected.cpu = CpuSnapshot::take(pids).since(&first);
    }
    collected
}

/// Every result is a success: the service's result envelope, or the minimal worker's relayed
/// chat.completion.
fn check_answers(subject: Subject, collected: &Collected) {
    let failed = collected
        .bodies
        .iter()
        .filter(|body| match subject {
            Subject::Service { .. } => !serde_json::from_slice::<JobResult>(body).is_ok_and(|r| r.is_success()),
            Subject::Minimal => {
                !serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v["choices"].is_array())
            }
        })
        .count();
    assert_eq!(failed, 0, "{}: every job is answered", subject.label());
}

/// CPU counters at one instant: the workers', the broker's and Postgres' (every `beam.smp` and
/// `postgres` process on the machine, so other users of them count too), the whole machine's.
struct CpuSnapshot {
    workers: u64,
    /// (pid, is the broker, ticks) of every broker and Postgres process.
    infra: Vec<(u32, bool, u64)>,
    machine_busy: u64,
    machine_total: u64,
}

/// What was spent between two snapshots, in ticks (the machine's as a share of its capacity).
#[derive(Default)]
struct CpuUse {
    workers: u64,
    broker: u64,
    postgres: u64,
    machine_busy_pct: f64,
}

impl CpuSnapshot {
    fn take(worker_pids: &[u32]) -> CpuSnapshot {
        let (machine_busy, machine_total) = machine_ticks();
        CpuSnapshot {
            workers: worker_pids.iter().map(|pid| process_cpu_ticks(*pid)).sum(),
            infra: infra_processes().into_iter().map(|(pid, broker)| (pid, broker, process_cpu_ticks(pid))).collect(),
            machine_busy,
            machine_total,
        }
    }

    /// A process that started in between counts whole; one that ended in between is lost.
    fn since(&self, earlier: &CpuSnapshot) -> CpuUse {
        let mut used = CpuUse { workers: self.workers.saturating_sub(earlier.workers), ..Default::default() };
        for &(pid, broker, ticks) in &self.infra {
            let before = earlier.infra.iter().find(|(p, ..)| *p == pid).map_or(0, |(.., t)| *t);
            *(if broker { &mut used.broker } else { &mut used.postgres }) += ticks.saturating_sub(before);
        }
        let total = self.machine_total.saturating_sub(earlier.machine_total).max(1);
        used.machine_busy_pct = 100.0 * self.machine_busy.saturating_sub(earlier.machine_busy) as f64 / total as f64;
        used
    }
}

/// Every RabbitMQ and Postgres process: (pid, is the broker).
fn infra_processes() -> Vec<(u32, bool)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| match std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim() {
            "beam.smp" => Some((pid, true)),
            "postgres" => Some((pid, false)),
            _ => None,
        })
        .collect()
}

/// (busy, total) ticks of all cores since boot, from the first line of `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn process_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15; after the ")" they are at 11 and 12.
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

// ---------------------------------------------------------------------------------------------
// The bench's own broker client: pipelined publishing and a push consumer for results

struct Broker {
    /// Kept open for its channels.
    _publishing: Connection,
    /// Confirm-mode channel for jobs.
    publisher: Channel,
    /// Results are consumed on a connection of their own.
    consuming: Connection,
    /// Declares and probes queues.
    control: Channel,
}

impl Broker {
    async fn connect() -> Broker {
        let url = support::amqp_url();
        let publishing =
            Connection::connect(&url, ConnectionProperties::default()).await.expect("RabbitMQ is reachable");
        let publisher = publishing.create_channel().await.unwrap();
        publisher.confirm_select(Default::default()).await.unwrap();
        let control = publishing.create_channel().await.unwrap();
        let consuming = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
        Broker { _publishing: publishing, publisher, consuming, control }
    }

    /// A plain durable queue, as the service declares its jobs and results queues.
    async fn declare(&self, queue: &str) {
        self.control.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    }

    /// Publishes one job persistently; its confirm is collected later.
    async fn publish(&self, queue: &str, body: &str, correlation_id: &str) {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_correlation_id(correlation_id.into());
        self.publisher
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body.as_bytes(), properties)
            .await
            .unwrap();
    }

    /// Queues `n` jobs, waiting for the broker's confirms every 500.
    async fn prequeue(&self, queue: &str, n: usize) {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        for i in 0..n {
            self.publish(queue, &job(&format!("{}-{i}", &tag[..8])), &i.to_string()).await;
            if i % 500 == 499 {
                self.publisher.wait_for_confirms().await.unwrap();
            }
        }
        self.publisher.wait_for_confirms().await.unwrap();
    }

    /// A push consumer on `queue` with automatic acks, so taking results costs the workers
    /// nothing and the bench little.
    async fn consume(&self, queue: &str) -> Consumer {
        let channel = self.consuming.create_channel().await.unwrap();
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        channel.basic_consume(queue.into(), "bench".into(), options, FieldTable::default()).await.unwrap()
    }

    /// Waits until `n` consumers read `queue` (the workers are up).
    async fn wait_for_consumers(&self, queue: &str, n: usize) {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        support::eventually("the workers consume", || async {
            let declared = self.control.queue_declare(queue.into(), passive, FieldTable::default()).await;
            declared.is_ok_and(|q| q.consumer_count() as usize >= n)
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: a minimal worker, in a child process

mod minimal {
    use super::*;

    struct Params {
        amqp_url: String,
        jobs: String,
        results: String,
        provider_url: String,
        prefetch: u16,
        connections: u8,
        pad: usize,
        mandatory: bool,
    }

    /// The child process's entry point (`THROUGHPUT_MINIMAL_WORKER` set); runs until killed.
    pub fn main() {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
        let params = Params {
            amqp_url: var("MINIMAL_AMQP_URL"),
            jobs: var("MINIMAL_JOBS"),
            results: var("MINIMAL_RESULTS"),
            provider_url: var("MINIMAL_PROVIDER_URL"),
            prefetch: var("MINIMAL_PREFETCH").parse().unwrap(),
            connections: var("MINIMAL_CONNECTIONS").parse().unwrap(),
            pad: var("MINIMAL_PAD").parse().unwrap(),
            mandatory: var("MINIMAL_MANDATORY").parse().unwrap(),
        };
        let runtime = var("MINIMAL_RUNTIME");
        // The service's `main` runs a current-thread runtime; `minimal_runtime=multi` compares
        // against a multi-thread one instead.
        let mut builder = match runtime.as_str() {
            "multi" => tokio::runtime::Builder::new_multi_thread(),
            _ => tokio::runtime::Builder::new_current_thread(),
        };
        builder.enable_all().build().unwrap().block_on(work(params));
    }

    async fn work(params: Params) {
        let conn = Connection::connect(&params.amqp_url, ConnectionProperties::default()).await.unwrap();
        let consuming = conn.create_channel().await.unwrap();
        consuming.basic_qos(params.prefetch, BasicQosOptions::default()).await.unwrap();
        // `minimal_connections=2` publishes on a connection of its own, as the service does (a
        // broker that blocks publishers must not block the consumer's acks).
        let publishing = match params.connections {
            2 => Connection::connect(&params.amqp_url, ConnectionProperties::default()).await.unwrap(),
            _ => conn,
        };
        let publisher = publishing.create_channel().await.unwrap();
        publisher.confirm_select(Default::default()).await.unwrap();
        let http = reqwest::Client::new();
        let params = std::sync::Arc::new(params);
        let mut deliveries = consuming
            .basic_consume(
                params.jobs.as_str().into(),
                "minimal".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while let Some(delivery) = deliveries.next().await {
            let (http, publisher, params) = (http.clone(), publisher.clone(), params.clone());
            tokio::spawn(async move { handle(delivery.unwrap(), &http, &publisher, &params).await });
        }
    }

    /// POST the job's body, publish the answer with a confirm, ack.
    async fn handle(delivery: lapin::message::Delivery, http: &reqwest::Client, publisher: &Channel, params: &Params) {
        let job: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        let answer = http.post(&params.provider_url).json(&job["body"]).send().await.unwrap().bytes().await.unwrap();
        // Trailing whitespace keeps the answer valid JSON.
        let answer = match params.pad {
            0 => answer.to_vec(),
            pad => [&answer[..], &vec![b' '; pad]].concat(),
        };
        let mut properties =
            BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        publisher
            .basic_publish(
                "".into(),
                params.results.as_str().into(),
                BasicPublishOptions { mandatory: params.mandatory, ..Default::default() },
                &answer,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and the table

struct Settings {
    parts: Vec<String>,
    jobs: usize,
    prefetch: Vec<u16>,
    rounds: usize,
    rate: u32,
    secs: u32,
    admission_jobs: usize,
    block: usize,
    shared_jobs: usize,
    shared_workers: usize,
    scaling_jobs: usize,
    scaling_workers: Vec<usize>,
}

impl Settings {
    fn read() -> Settings {
        Settings {
            parts: list("part", "throughput,latency,admission,scaling"),
            jobs: setting("jobs", 3000),
            prefetch: list("prefetch", "32,64"),
            rounds: setting("rounds", 2),
            rate: setting("rate", 200),
            secs: setting("secs", 10),
            admission_jobs: setting("admission_jobs", 12000),
            block: setting("block", 3000),
            shared_jobs: setting("shared_jobs", 8000),
            shared_workers: setting("shared_workers", 4),
            scaling_jobs: setting("scaling_jobs", 6000),
            scaling_workers: list("scaling_workers", "1,2,4"),
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part || p == "all")
    }
}

/// `key=value` among the arguments, else `THROUGHPUT_<KEY>`, else `default`.
fn setting<T: FromStr>(key: &str, default: T) -> T {
    let from_args = std::env::args().skip(1).find_map(|a| a.strip_prefix(&format!("{key}=")).map(str::to_string));
    let from_env = || std::env::var(format!("THROUGHPUT_{}", key.to_uppercase())).ok();
    match from_args.or_else(from_env) {
        Some(text) => text.parse().unwrap_or_else(|_| panic!("{key}={text} is not valid")),
        None => default,
    }
}

/// A comma-separated setting.
fn list<T: FromStr>(key: &str, default: &str) -> Vec<T> {
    let text: String = setting(key, default.to_string());
    text.split(',').map(|item| item.trim().parse().unwrap_or_else(|_| panic!("{key}: `{item}` is not valid"))).collect()
}

/// One line of the table: the service's figure, its same-run reference and the issue's target
/// for their ratio.
struct Row {
    measure: String,
    service: f64,
    reference: f64,
    target: Option<(&'static str, f64)>,
}

impl Row {
    fn new(measure: impl Into<String>, service: f64) -> Row {
        Row { measure: measure.into(), service, reference: f64::NAN, target: None }
    }

    fn against(mut self, reference: f64) -> Row {
        self.reference = reference;
        self
    }

    fn at_least(mut self, ratio: f64) -> Row {
        self.target = Some(("≥", ratio));
        self
    }

    fn at_most(mut self, ratio: f64) -> Row {
        self.target = Some(("≤", ratio));
        self
    }

    /// Rounded to the two decimals the table shows, so a verdict never contradicts the figure.
    fn ratio(&self) -> f64 {
        (self.service / self.reference * 100.0).round() / 100.0
    }

    fn verdict(&self) -> &'static str {
        match self.target {
            Some(("≥", t)) if self.ratio() >= t => "met",
            Some(("≤", t)) if self.ratio() <= t => "met",
            Some(_) => "MISSED",
            None => "",
        }
    }
}

fn print_table(rows: &[Row]) {
    println!();
    let header = format!("{:<46} {:>10} {:>10} {:>7}  target", "measure", "service", "reference", "ratio");
    println!("{header}");
    for row in rows {
        let target = row.target.map(|(op, t)| format!("{op} {t}")).unwrap_or_default();
        println!(
            "{:<46} {:>10} {:>10} {:>7.2}  {:<7} {}",
            row.measure,
            figure(row.service),
            figure(row.reference),
            row.ratio(),
            target,
            row.verdict()
        );
    }
}

/// The first three fields of `/proc/loadavg`: how busy the machine was around the run.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Three significant digits or so: 1234, 123.4, 0.275.
fn figure(x: f64) -> String {
    match x {
        x if x >= 100.0 => format!("{x:.0}"),
        x if x >= 10.0 => format!("{x:.1}"),
        x if x >= 1.0 => format!("{x:.2}"),
        x => format!("{x:.3}"),
    }
}
