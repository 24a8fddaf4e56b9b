//! Backlog benchmark (issue #3): how much of the free tiers' capacity a fleet of workers uses.
//!
//!     cargo bench --bench backlog                 # 300 jobs, 3 worker processes, every mode
//!     cargo bench --bench backlog -- 600 4        # jobs, workers
//!     BACKLOG_MODES=planned,credits cargo bench --bench backlog   # some modes only
//!
//! Two free mock providers enforce strict sliding windows (10 requests per 2 s each, the way real
//! providers do: over the limit they answer their real 429); a paid mock has no limit. The same
//! backlog runs twice against the real RabbitMQ and Postgres:
//! - `planned`: the chain knows the limits and plans calls across workers (`free_wait` = 1h);
//! - `reactive`: limits are not configured and `free_wait` is 0, the seed article's behaviour:
//!   call, collect the 429, cool down, fall through to the paid model.
//!
//! - `pooled`: the two free models sit behind one account (one mock serves both and holds one
//!   limit for the pair, as OpenRouter counts every `:free` model of a key together); the config
//!   declares that limit once, as a `[[quotas]]` pool both providers name (issue #11).
//! - `credits`: as `planned`, with limits large enough for admission credits (issue #9:
//!   512 requests per 2 s each, so a worker takes room for 2 calls at once) and a backlog of
//!   30 windows' worth, as the other modes (30,720 jobs, about a minute): credits must neither
//!   overrun a strict window nor leave its capacity unused. (At 1024 a window the three workers
//!   and the mock on two cores answer fewer jobs a second than the windows allow.) The backlog
//!   is queued before the workers start and the run counts from the first call (the first
//!   answer less the mock's latency), as an operator's backlog: published while the workers
//!   run, 30,720 jobs would share the cores with the publisher for the first seconds.
//!
//! A last run, `throughput`, measures the worker itself: one worker process, one unlimited
//! provider answering at once, 2000 jobs: jobs per second and CPU per job.
//!
//! It prints wall time against the ideal for strict windows and against jobs / (sum of free
//! rates), utilization, 429s received, paid calls, and the workers' CPU time per job and idle
//! memory (from /proc).

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use fallback_worker::mock::{MockOptions, MockProvider, Profile, RequestLimit};
use lapin::BasicProperties;
use support::{TestEnv, WorkerProcess, chain, job, provider};

const WINDOW: Duration = Duration::from_secs(2);
const PER_WINDOW: usize = 10;
const LATENCY: Duration = Duration::from_millis(20);
/// Each free mock's window in the `credits` mode: 1/256 of it is 2 calls.
const CREDIT_PER_WINDOW: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Planned,
    Reactive,
    Pooled,
    Credits,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Planned => "planned",
            Mode::Reactive => "reactive",
            Mode::Pooled => "pooled",
            Mode::Credits => "credits",
        }
    }

    /// Requests each free mock (or the account) accepts per window.
    fn per_window(self) -> usize {
        match self {
            Mode::Credits => CREDIT_PER_WINDOW,
            Mode::Planned | Mode::Reactive | Mode::Pooled => PER_WINDOW,
        }
    }

    /// Free calls the mocks accept per window: two providers, or one account for both.
    fn free_per_window(self) -> usize {
        match self {
            Mode::Pooled => self.per_window(),
            Mode::Planned | Mode::Reactive | Mode::Credits => 2 * self.per_window(),
        }
    }

    /// The backlog: the command line's, or as many windows' worth as the default backlog of
    /// the other modes is (30), where a window holds more.
    fn jobs(self, jobs: usize) -> usize {
        match self {
            Mode::Credits => 30 * self.free_per_window(),
            Mode::Planned | Mode::Reactive | Mode::Pooled => jobs,
        }
    }
}

struct Outcome {
    mode: Mode,
    wall: Duration,
    ideal: Duration,
    rate_min: Duration,
    rate_limited: usize,
    paid: usize,
    free: usize,
    cpu_ms_per_job: f64,
    idle_rss_mb: f64,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let jobs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    println!(
        "backlog: {jobs} jobs, {workers} worker processes, 2 free providers at {PER_WINDOW} requests / {WINDOW:?} (strict), mock latency {LATENCY:?}"
    );
    if std::env::var_os("ONLY_THROUGHPUT").is_some() {
        let (rate, cpu) = throughput(2000).await;
        println!("throughput {rate:.0} jobs/s {cpu:.3} ms/job");
        return;
    }
    let only = std::env::var("BACKLOG_MODES").unwrap_or_default();
    let wanted = |mode: Mode| only.is_empty() || only.split(',').any(|m| m.trim() == mode.name());
    let mut outcomes = Vec::new();
    for mode in [Mode::Planned, Mode::Reactive, Mode::Pooled, Mode::Credits] {
        if wanted(mode) {
            outcomes.push(run(mode, mode.jobs(jobs), workers).await);
        }
    }
    println!();
    println!(
        "{:<9} {:>6} {:>9} {:>9} {:>9} {:>12} {:>6} {:>6} {:>6} {:>12} {:>10}",
        "mode", "jobs", "wall_s", "ideal_s", "rate_s", "utilization", "429s", "paid", "free", "cpu_ms/job", "idle_MB"
    );
    for o in outcomes {
        // Free capacity used: free answers against what strict windows allow in the same time.
        let utilization = 100.0 * o.free as f64 / capacity(o.wall.saturating_sub(LATENCY), o.mode.free_per_window());
        println!(
            "{:<9} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>11.1}% {:>6} {:>6} {:>6} {:>12.3} {:>10.1}",
            o.mode.name(),
            o.mode.jobs(jobs),
            o.wall.as_secs_f64(),
            o.ideal.as_secs_f64(),
            o.rate_min.as_secs_f64(),
            utilization,
            o.rate_limited,
            o.paid,
            o.free,
            o.cpu_ms_per_job,
            o.idle_rss_mb
        );
    }
    let (rate, cpu) = throughput(2000).await;
    println!(
        "\nthroughput: 1 worker process, 1 unlimited provider (no latency), 2000 queued jobs: {rate:.0} jobs/s, {cpu:.3} ms CPU per job"
    );
    println!(
        "\nideal_s: the earliest strict sliding windows can serve the whole backlog from an empty start, plus one latency"
    );
    println!("rate_s: jobs / (sum of free rates), the issue's theoretical minimum");
    println!(
        "utilization: free answers / free calls strict windows allow during the run (continuous rate plus the first window)"
    );
}

async fn run(mode: Mode, jobs: usize, workers: usize) -> Outcome {
    let env = TestEnv::new().await;
    let strict = |profile| {
        let mut options = MockOptions::new(profile);
        options.limits = vec![RequestLimit { requests: mode.per_window(), per: WINDOW }];
        options.latency = LATENCY;
        options
    };
    let groq = MockProvider::start(strict(Profile::Groq)).await.unwrap();
    // Pooled: both free models are served by one account (one mock, one limit for the pair).
    let second = match mode {
        Mode::Pooled => None,
        Mode::Planned | Mode::Reactive | Mode::Credits => {
            Some(MockProvider::start(strict(Profile::Cerebras)).await.unwrap())
        }
    };
    let second_url = second.as_ref().map_or_else(|| groq.base_url(), |m| m.base_url());
    let mut paid_options = MockOptions::new(Profile::Openai);
    paid_options.latency = LATENCY;
    let paid = MockProvider::start(paid_options).await.unwrap();
    let window = humantime::format_duration(WINDOW);
    let limits = match mode {
        Mode::Planned | Mode::Credits => {
            format!("limits = [{{ requests = {}, per = \"{window}\" }}]", mode.per_window())
        }
        Mode::Pooled => "quotas = [\"account\"]".to_string(),
        Mode::Reactive => String::new(),
    };
    let pool = match mode {
        Mode::Pooled => {
            format!("[[quotas]]\nname = \"account\"\nlimits = [{{ requests = {PER_WINDOW}, per = \"{window}\" }}]\n\n")
        }
        Mode::Planned | Mode::Reactive | Mode::Credits => String::new(),
    };
    let free_wait = if mode == Mode::Reactive { "free_wait = \"0s\"" } else { "free_wait = \"1h\"" };
    let providers = format!(
        "{}{}{}{}{}",
        provider("groq", &groq.base_url(), true, &limits),
        provider("cerebras", &second_url, true, &limits),
        provider("paid", &paid.base_url(), false, ""),
        pool,
        chain("default", &["groq", "cerebras", "paid"], &format!("{free_wait}\nmax_wait = \"1h\""))
    );
    let config = env.config_file(&providers, "");
    let mut processes: Vec<WorkerProcess> = (0..workers).map(|_| WorkerProcess::spawn(&config)).collect();
    env.wait_for_queues().await;
    // Let every worker reach the broker before measuring idle memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss_mb = processes.iter().map(|p| rss_kb(p.child.id())).sum::<u64>() as f64 / 1024.0 / workers as f64;
    if mode == Mode::Credits {
        // Thousands of jobs, queued before the workers start, as an operator's backlog is:
        // published while the workers run, they would share the two cores with the publisher
        // for the first seconds, and the run would measure the publisher.
        stop(&mut processes).await;
        publish_backlog(&env, mode, jobs).await;
        processes = (0..workers).map(|_| WorkerProcess::spawn(&config)).collect();
    }
    let cpu_before: u64 = processes.iter().map(|p| cpu_ticks(p.child.id())).sum();
    let timeline = std::env::var_os("BACKLOG_TIMELINE").is_some();
    if timeline {
        groq.log_arrivals();
    }

    let started = Instant::now();
    let (results, wall) = if mode == Mode::Credits {
        // From the first call (its answer, less the mock's latency) to the last answer: the
        // workers' start-up is not the windows' capacity left unused.
        let (results, first) = consumed(&env, jobs).await;
        (results, first.elapsed() + LATENCY)
    } else {
        for i in 0..jobs {
            env.publish(&job(&format!("{}-{i}", mode.name())), BasicProperties::default()).await;
        }
        (env.results(&env.results, jobs).await, started.elapsed())
    };
    let cpu_after: u64 = processes.iter().map(|p| cpu_ticks(p.child.id())).sum();
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_ms_per_job = (cpu_after - cpu_before) as f64 / ticks_per_sec * 1000.0 / jobs as f64;
    stop(&mut processes).await;
    if timeline {
        print_slot_reuse(&groq.arrivals(), mode.per_window());
    }
    let failed = results.iter().filter(|r| !r.is_success()).count();
    assert_eq!(failed, 0, "{}: every job gets an answer", mode.name());
    let free = results.iter().filter(|r| r.routing.free == Some(true)).count();
    let per_window = mode.free_per_window();
    let free_rate = per_window as f64 / WINDOW.as_secs_f64();
    Outcome {
        mode,
        wall,
        ideal: ideal_wall(jobs, per_window) + LATENCY,
        rate_min: Duration::from_secs_f64(jobs as f64 / free_rate),
        rate_limited: groq.stats().rate_limited + second.as_ref().map_or(0, |m| m.stats().rate_limited),
        paid: paid.requests(),
        free,
        cpu_ms_per_job,
        idle_rss_mb,
    }
}

async fn stop(processes: &mut [WorkerProcess]) {
    for process in processes.iter() {
        process.signal("TERM");
    }
    for process in processes.iter_mut() {
        process.wait().await;
    }
}

/// `jobs` jobs on the jobs queue, 64 confirms in flight (one at a time would take longer than
/// the run).
async fn publish_backlog(env: &TestEnv, mode: Mode, jobs: usize) {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..jobs)
        .for_each_concurrent(64, |i| async move {
            env.publish(&job(&format!("{}-{i}", mode.name())), BasicProperties::default()).await
        })
        .await;
}

/// `n` results, taken by a consumer, and when the first arrived: one `basic.get` per result
/// (the test helper's way) keeps up with hundreds of results a second, not with the thousands
/// the `credits` mode answers.
async fn consumed(env: &TestEnv, n: usize) -> (Vec<fallback_worker::job::JobResult>, Instant) {
    use futures_lite::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(&support::amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = channel
        .basic_consume(env.results.as_str().into(), "backlog".into(), options, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let mut results = Vec::with_capacity(n);
    let mut first = None;
    let mut arrivals = Vec::with_capacity(n);
    while results.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else { panic!("{} of {n} results, then none for 60 s", results.len()) };
        let now = Instant::now();
        first.get_or_insert(now);
        arrivals.push(now);
        results.push(serde_json::from_slice(&delivery.data).unwrap());
    }
    let first = first.unwrap_or_else(Instant::now);
    if std::env::var_os("BACKLOG_TIMELINE").is_some() {
        // Answers per window, counted from the first: where the capacity goes unused.
        let mut per_window = vec![0usize; 1];
        for arrival in arrivals {
            let index = (arrival.duration_since(first).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
            if per_window.len() <= index {
                per_window.resize(index + 1, 0);
            }
            per_window[index] += 1;
        }
        println!("answers per {WINDOW:?} from the first: {per_window:?}");
    }
    (results, first)
}

/// How long after a window each slot of the first free mock was used again: the gap between
/// every accepted request and the one `per_window` before it, less the window (percentiles).
fn print_slot_reuse(arrivals: &[Instant], per_window: usize) {
    let mut late: Vec<Duration> = arrivals
        .iter()
        .zip(arrivals.iter().skip(per_window))
        .map(|(freed, reused)| reused.duration_since(*freed).saturating_sub(WINDOW))
        .collect();
    late.sort();
    // A burst of `per_window` calls goes out no faster than the workers move jobs, and every
    // later window's calls follow the slots it took: the first and the last window's spread is
    // time the capacity formula counts and no strict client could use.
    let spread = |calls: &[Instant]| match (calls.first(), calls.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64() * 1000.0,
        _ => 0.0,
    };
    let first = arrivals.get(..per_window).unwrap_or(arrivals);
    let last = arrivals.get(arrivals.len().saturating_sub(per_window)..).unwrap_or(arrivals);
    println!(
        "groq: its first window's calls went out over {:.0} ms, its last window's over {:.0} ms",
        spread(first),
        spread(last)
    );
    let at = |q: f64| late.get(((late.len() as f64 - 1.0) * q) as usize).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    println!(
        "groq: {} slots used again, later than a window by p10 {:.1} / p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms",
        late.len(),
        at(0.1),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

/// Calls strict windows allow within `t` from an empty start, counted at the continuous rate
/// plus the first window's burst.
fn capacity(t: Duration, per_window: usize) -> f64 {
    per_window as f64 * (1.0 + t.as_secs_f64() / WINDOW.as_secs_f64())
}

/// With strict windows starting empty, `per_window` calls go out at 0, W, 2W, …
fn ideal_wall(jobs: usize, per_window: usize) -> Duration {
    WINDOW * (jobs.div_ceil(per_window) as u32 - 1)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15; after the ")" they are at 11 and 12.
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One worker, no limits, no latency: how fast and how cheaply the worker itself moves jobs.
/// The backlog is queued before the measured worker starts, so its whole life is the run
/// (its start-up, a few ms of CPU, is included).
async fn throughput(jobs: usize) -> (f64, f64) {
    let env = TestEnv::new().await;
    let fast = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let providers = format!("{}{}", provider("fast", &fast.base_url(), true, ""), chain("default", &["fast"], ""));
    // The contract's default prefetch, as a production worker runs.
    let config = env.dir.join("throughput.toml");
    std::fs::write(&config, env.config_text(&providers, "").replace("prefetch = 8", "prefetch = 32")).unwrap();
    // A first worker declares the queues and leaves.
    let mut declarer = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    declarer.signal("TERM");
    declarer.wait().await;
    for i in 0..jobs {
        env.publish(&job(&format!("t-{i}")), BasicProperties::default()).await;
    }
    let started = Instant::now();
    let mut worker = WorkerProcess::spawn(&config);
    let results = env.results(&env.results, jobs).await;
    let elapsed = started.elapsed();
    let cpu = cpu_ticks(worker.child.id());
    worker.signal("TERM");
    worker.wait().await;
    assert!(results.iter().all(|r| r.is_success()));
    (jobs as f64 / elapsed.as_secs_f64(), cpu as f64 * 10.0 / jobs as f64)
}
