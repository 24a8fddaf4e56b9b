//! `fallback-worker batch FILE.jsonl --out OUT.jsonl`: the same chains in-process, with no
//! RabbitMQ; provider state in Postgres when `DATABASE_URL` is set (shared with any workers),
//! otherwise in memory.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::backlog::{Line, Output, Progress, conclude, read_input};
use crate::app::{build_chains, migrate_when_reachable};
use crate::chain::{self, Chain, Clock, HoldPolicy, JobProgress, SystemClock};
use crate::config::Config;
use crate::job::{ErrorCode, JobResult, Routing};
use crate::providers::http::shared_client;
use crate::state::ProviderState;
use crate::state::memory::MemoryStore;
use crate::state::postgres::PgStore;
use crate::worker::{error_result, result_of, worker_id};

pub struct BatchOptions<'a> {
    pub input: &'a Path,
    pub out: &'a Path,
    pub errors: Option<&'a Path>,
    pub concurrency: usize,
    /// `DATABASE_URL` from the environment: shared state in Postgres instead of memory.
    pub database_url: Option<String>,
}

pub async fn run(config: &Config, options: BatchOptions<'_>, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let mut output = Output::open(options.out, options.errors)?;
    let chains = build_chains(config, &shared_client(), &|var| std::env::var(var).ok())?;
    let names = chains.keys().cloned().collect();
    let mut backlog = read_input(options.input, output.done(), &names)?;
    let state: Arc<dyn ProviderState> = match &options.database_url {
        Some(url) => {
            let store = PgStore::connect_lazy(url, (options.concurrency as u32 + 2).max(4))?;
            if !migrate_when_reachable(&store, &shutdown).await? {
                anyhow::bail!("interrupted before the database was reachable");
            }
            tokio::spawn(store.clone().listen(shutdown.clone()));
            Arc::new(store)
        }
        None => Arc::new(MemoryStore::new()),
    };
    let total = backlog.pending.len();
    let mut progress = Progress::new(total);
    let (sender, mut results) = mpsc::channel::<JobResult>(64);
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let worker = format!("batch:{}", worker_id());
    let pending = std::mem::take(&mut backlog.pending);
    let feeder = tokio::spawn({
        let (shutdown, state) = (shutdown.clone(), state.clone());
        async move {
            for line in pending {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                if shutdown.is_cancelled() {
                    return;
                }
                let chain = chains[&line.job.chain].clone();
                let (sender, state, worker) = (sender.clone(), state.clone(), worker.clone());
                tokio::spawn(async move {
                    let result = answer(&line, &chain, state.as_ref(), worker).await;
                    let _ = sender.send(result).await;
                    drop(permit);
                });
            }
        }
    });
    let mut done = 0;
    while done < total {
        tokio::select! {
            () = shutdown.cancelled() => {
                progress.finish();
                eprintln!("interrupted: {done} of {total} results written; run the same command again to resume");
                return Ok(ExitCode::from(1));
            }
            result = results.recv() => {
                let Some(result) = result else { break };
                if output.write(&result)? {
                    done += 1;
                }
                progress.update(done, output.failed);
            }
        }
    }
    feeder.abort();
    progress.finish();
    Ok(conclude(&backlog, &output))
}

/// Runs one line through its chain, waiting in place (there is no broker to park it in).
async fn answer(line: &Line, chain: &Chain, state: &dyn ProviderState, worker: String) -> JobResult {
    let started = Instant::now();
    let clock = SystemClock;
    let max_wait = line.job.max_wait.unwrap_or(chain.max_wait);
    let mut progress = JobProgress::new(clock.now());
    // Every wait within max_wait happens in place: there is no broker to park the job in.
    let hold = HoldPolicy::new(max_wait, clock.now(), max_wait.saturating_add(Duration::from_secs(60)));
    let verdict = chain::run(chain, &line.job.body, max_wait, &mut progress, state, hold, &clock).await;
    let total_ms = started.elapsed().as_millis() as u64;
    let routing = Routing {
        chain: Some(chain.name.clone()),
        provider: None,
        model: None,
        free: None,
        attempts: progress.attempts,
        worker,
        queued_ms: 0,
        total_ms,
    };
    // `run` only hands back a wait longer than the hold limit, here `max_wait`: a deadline.
    result_of(&line.job.custom_id, verdict, routing.clone()).unwrap_or_else(|until| {
        let message = format!(
            "no provider becomes usable within max_wait; the earliest is at {}",
            humantime::format_rfc3339_seconds(until)
        );
        error_result(Some(line.job.custom_id.clone()), ErrorCode::DeadlineExceeded, message, routing)
    })
}
