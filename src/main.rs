//! The `fallback-worker` binary: parse the command line, load the config, hand over to the
//! library. Exit codes (contract §1): 0 success, 1 runtime failure, 2 bad usage or config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use fallback_worker::app::{WorkerApp, migrate_when_reachable};
use fallback_worker::broker::frames::DEEP_STACK;
use fallback_worker::config::{Config, EnvOverrides};
use fallback_worker::mock::{Answers, MockOptions, MockProvider, Profile, RequestLimit, parse_limit};
use fallback_worker::state::postgres::PgStore;
use fallback_worker::telemetry;

#[derive(Parser)]
#[command(
    name = "fallback-worker",
    version,
    about = "Chat-completion jobs from RabbitMQ through a fallback chain of LLM providers"
)]
struct Cli {
    /// The TOML configuration.
    #[arg(long, global = true, env = "FALLBACK_CONFIG", default_value = "fallback.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume jobs until SIGTERM/SIGINT, then drain in-flight jobs and exit 0.
    Worker,
    /// Apply the Postgres migrations and exit.
    Migrate,
    /// Publish every line of an OpenAI-Batch file as a job and write the results to OUT
    /// (resumable: lines already in OUT are skipped). Exit 3 if a line was invalid, failed, or
    /// got no result before the idle timeout.
    Enqueue {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Write failed lines here instead of OUT (like the Batch API's error file).
        #[arg(long)]
        errors: Option<PathBuf>,
        /// Give up when no result has arrived for this long, e.g. `2h` (default: the longest
        /// max_wait of the lines plus 30 minutes).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<Duration>,
    },
    /// Run the same chains in-process, without RabbitMQ (and without Postgres unless
    /// DATABASE_URL is set). Exit 3 if a line was invalid or failed.
    Batch {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        errors: Option<PathBuf>,
        /// Jobs in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Print every provider's shared state: cooling down until when and why, quota used per
    /// window, last error.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run the project's mock LLM provider (for the demo, local runs and benchmarks).
    MockProvider {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Which provider's dialect to imitate.
        #[arg(long, value_enum, default_value = "groq")]
        profile: Profile,
        /// A strict sliding-window limit such as `10/2s`; repeat for several.
        #[arg(long = "limit", value_parser = parse_limit)]
        limits: Vec<RequestLimit>,
        /// Latency of each successful answer, e.g. `200ms`.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Require `Authorization: Bearer <key>`.
        #[arg(long, env = "MOCK_API_KEY")]
        api_key: Option<String>,
        /// Answer every request this way (bad answers show the answer checks at work).
        #[arg(long, value_enum, default_value = "good")]
        answers: Answers,
    },
}

fn main() -> ExitCode {
    deep_stacks_for_every_thread();
    // The runtime's thread walks (clones, drops, encodes) what lapin decoded: the same depth.
    let service = std::thread::Builder::new().name("fallback-worker".into()).stack_size(DEEP_STACK).spawn(service);
    match service.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: cannot start the service's thread: {e}");
            ExitCode::from(1)
        }
    }
}

/// Gives every thread spawned without a size of its own (lapin's I/O thread, which decodes
/// every frame, the runtime's blocking threads) a stack that holds the deepest headers a frame
/// can carry (`broker::frames`): one message nested deeper than the default 2 MiB holds would
/// otherwise abort every worker that receives it. An operator's `RUST_MIN_STACK` is kept when
/// it is at least as large.
fn deep_stacks_for_every_thread() {
    let asked = std::env::var("RUST_MIN_STACK").ok().and_then(|v| v.trim().parse::<usize>().ok());
    if asked.is_some_and(|bytes| bytes >= DEEP_STACK) {
        return;
    }
    // SAFETY: the first statement of `main`: no other thread exists yet that could read the
    // environment concurrently (the standard library reads this variable once, at the first
    // spawn).
    unsafe { std::env::set_var("RUST_MIN_STACK", DEEP_STACK.to_string()) };
}

fn service() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Before anything that takes time (the config, the telemetry, the first connection): a
    // SIGTERM that comes while the process starts asks for the same clean stop as any other,
    // instead of killing it with the signal's default action.
    let signals = {
        let _runtime = runtime.enter();
        match ShutdownSignals::register() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("error: cannot handle SIGTERM/SIGINT: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let cli = Cli::parse();
    let telemetry = telemetry::init();
    let code = runtime.block_on(run(cli, signals));
    // The spans of the last jobs are still queued for export: flush them, off the runtime. A
    // file still being opened on a blocking thread (a FIFO nobody opened, when a stop came
    // first) is not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    telemetry.shutdown();
    code
}

async fn run(cli: Cli, mut signals: ShutdownSignals) -> ExitCode {
    if let Command::MockProvider { listen, profile, limits, latency, api_key, answers } = cli.command {
        let options = MockOptions { profile, api_key, limits, latency };
        return match MockProvider::start_on(listen, options).await {
            Ok(mock) => {
                mock.set_fallback(answers.scenario());
                tracing::info!(addr = %mock.addr, ?profile, ?answers, "mock provider listening");
                signals.recv().await;
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("cannot listen on {listen}: {e}")),
        };
    }
    // Read on a blocking thread: a config that does not come (a FIFO, `/dev/stdin` at a
    // terminal, a hung network mount) must not keep a stop request from being heard.
    let path = cli.config.clone();
    let loading = tokio::task::spawn_blocking(move || Config::load(&path, &EnvOverrides::from_env()));
    let config = tokio::select! {
        loaded = loading => match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => return fail(format!("reading the config {}: {e}", cli.config.display())),
        },
        () = signals.recv() => return stopped_before_the_config(&cli.command),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            signals.recv().await;
            tracing::info!("shutdown requested; draining");
            shutdown.cancel();
        }
    });
    let backlog_run = match &cli.command {
        Command::Enqueue { input, out, errors, idle_timeout } => {
            let options = fallback_worker::cli::enqueue::EnqueueOptions {
                config: &cli.config,
                input,
                out,
                errors: errors.as_deref(),
                idle_timeout: *idle_timeout,
            };
            Some(fallback_worker::cli::enqueue::run(&config, options, shutdown.clone()).await)
        }
        Command::Batch { input, out, errors, concurrency } => {
            let database_url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
            let options = fallback_worker::cli::batch::BatchOptions {
                input,
                out,
                errors: errors.as_deref(),
                concurrency: *concurrency,
                database_url,
            };
            Some(fallback_worker::cli::batch::run(&config, options, shutdown.clone()).await)
        }
        _ => None,
    };
    if let Some(outcome) = backlog_run {
        return outcome.unwrap_or_else(|e| fail(format!("{e:#}")));
    }
    let result = match cli.command {
        Command::Worker => WorkerApp::new(config).run(shutdown).await,
        Command::Migrate => migrate(&config, &shutdown).await,
        Command::Status { json } => status(&config, json).await,
        Command::MockProvider { .. } | Command::Enqueue { .. } | Command::Batch { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

async fn migrate(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let store = PgStore::connect_lazy(&config.postgres.url, 2)?;
    let deadline = tokio::time::timeout(Duration::from_secs(60), migrate_when_reachable(&store, shutdown));
    match deadline.await {
        Ok(Ok(true)) => {
            tracing::info!("migrations applied");
            Ok(())
        }
        Ok(Ok(false)) => anyhow::bail!("interrupted before the database was reachable"),
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!("the database was not reachable within 60 s"),
    }
}

async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = PgStore::connect_lazy(&config.postgres.url, 2)?;
    let mut pools = fallback_worker::cli::status::collect_pools(config, &store)
        .await
        .context("reading pool state (is the database reachable and migrated?)")?;
    let statuses = fallback_worker::cli::status::collect(config, &store, &pools)
        .await
        .context("reading provider state (is the database reachable and migrated?)")?;
    fallback_worker::cli::status::mark_cooling_pools(&mut pools, &statuses);
    if json {
        // One array: the providers' lines (`provider`), then the pools' (`pool`).
        let mut lines = Vec::new();
        for status in &statuses {
            lines.push(serde_json::to_value(status)?);
        }
        for pool in &pools {
            lines.push(serde_json::to_value(pool)?);
        }
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        print!("{}", fallback_worker::cli::status::render_table(&statuses));
        if !pools.is_empty() {
            print!("\n{}", fallback_worker::cli::status::render_pools(&pools));
        }
    }
    Ok(())
}

/// A stop asked for before the config was read: a clean stop for a worker, which had nothing
/// in flight (exit 0, as for any SIGTERM); for a command that had work to do (`batch`,
/// `enqueue`, `migrate`, `status`), an interruption like one a moment later (exit 1), never
/// the success a script would take it for.
fn stopped_before_the_config(command: &Command) -> ExitCode {
    match command {
        Command::Worker | Command::MockProvider { .. } => {
            tracing::info!("stopped before the config was read");
            ExitCode::SUCCESS
        }
        _ => fail("interrupted before the config was read; run the same command again".into()),
    }
}

fn fail(message: String) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("error: {message}");
    ExitCode::from(1)
}

/// SIGTERM and SIGINT, handled from when they are registered: one that arrives before anyone
/// waits for it is kept, and [`recv`](Self::recv) returns at once.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Replaces the signals' default action (ending the process); needs the runtime entered.
    fn register() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals { terminate: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    /// Waits for the first of them.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
