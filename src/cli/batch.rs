//! `fallback-worker batch FILE.jsonl --out OUT.jsonl`: the same chains in-process, with no
//! RabbitMQ; provider state in Postgres when `DATABASE_URL` is set (shared with any workers),
//! otherwise in memory.
//!
//! A run always ends: every line it starts ends as a result line, even when its run panics or
//! outlives any wait its chain could make ([`line_bound`]); such a line gets an `internal_error`
//! result and the run exits 3.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backlog::{Line, Progress, conclude, open_backlog};
use crate::app::{build_chains, migrate_when_reachable};
use crate::chain::{self, Chain, Clock, HoldPolicy, JobProgress, SystemClock};
use crate::config::Config;
use crate::job::{ErrorCode, JobResult, Routing};
use crate::providers::http::shared_client;
use crate::state::ProviderState;
use crate::state::memory::MemoryStore;
use crate::state::postgres::PgStore;
use crate::worker::{error_result, result_of, worker_id};

/// How long `batch` waits for the database at `DATABASE_URL` to take the migrations, as
/// `migrate` does: a database that never comes must end the run, not hold it.
const DATABASE_PATIENCE: Duration = Duration::from_secs(60);

/// The slack [`answer`] gives a job past its `max_wait` to wait in place.
const HOLD_SLACK: Duration = Duration::from_secs(60);

pub struct BatchOptions<'a> {
    pub input: &'a Path,
    pub out: &'a Path,
    pub errors: Option<&'a Path>,
    pub concurrency: usize,
    /// `DATABASE_URL` from the environment: shared state in Postgres instead of memory.
    pub database_url: Option<String>,
}

pub async fn run(config: &Config, options: BatchOptions<'_>, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let chains = build_chains(config, &shared_client(), &|var| std::env::var(var).ok())?;
    let names = chains.keys().cloned().collect();
    let (mut output, mut backlog) =
        open_backlog(&shutdown, options.out, options.errors, options.input, names, None).await?;
    // The answers of its calls that a shared store records after their jobs went on: waited
    // for before the command returns (its runtime would drop them).
    let mut answers: Option<PgStore> = None;
    let state: Arc<dyn ProviderState> = match &options.database_url {
        Some(url) => {
            let store = PgStore::connect_lazy(url, (options.concurrency as u32 + 2).max(4))?;
            match tokio::time::timeout(DATABASE_PATIENCE, migrate_when_reachable(&store, &shutdown)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => anyhow::bail!("interrupted before the database was reachable"),
                Ok(Err(e)) => return Err(e),
                Err(_) => anyhow::bail!(
                    "the database at DATABASE_URL was not reachable within {}",
                    humantime::format_duration(DATABASE_PATIENCE)
                ),
            }
            tokio::spawn(store.clone().listen(shutdown.clone()));
            answers = Some(store.clone());
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
                let (sender, state, worker) = (sender.clone(), state.clone(), worker.clone());
                // read_input only lets through lines whose chain exists; still, no panic here.
                let Some(chain) = chains.get(&line.job.chain).cloned() else {
                    let message = format!("unknown chain `{}`", line.job.chain);
                    let routing = bare_routing(line.job.chain.clone(), worker, Duration::ZERO);
                    let result =
                        error_result(Some(line.job.custom_id.clone()), ErrorCode::InvalidRequest, message, routing);
                    let _ = sender.send(result).await;
                    continue;
                };
                tokio::spawn(async move {
                    let bound = line_bound(line.job.max_wait.unwrap_or(chain.max_wait), &chain);
                    let (custom_id, chain_name) = (line.job.custom_id.clone(), chain.name.clone());
                    let run = tokio::spawn({
                        let worker = worker.clone();
                        async move { answer(&line, &chain, state.as_ref(), worker).await }
                    });
                    let result = settle(run, bound, custom_id, chain_name, worker).await;
                    let _ = sender.send(result).await;
                    drop(permit);
                });
            }
        }
    });
    let mut done = 0;
    let mut interrupted = false;
    let mut written = Ok(());
    while done < total {
        tokio::select! {
            () = shutdown.cancelled() => {
                interrupted = true;
                break;
            }
            result = results.recv() => {
                let Some(result) = result else { break };
                match output.write(&result) {
                    Ok(true) => done += 1,
                    Ok(false) => {}
                    Err(e) => {
                        written = Err(e);
                        break;
                    }
                }
                progress.update(done, output.failed);
            }
        }
    }
    feeder.abort();
    progress.finish();
    // However the loop ended, the answers already queued are written before the command
    // returns (its runtime would drop the tasks that write them). Lines still running after an
    // interruption or a write error are not waited for: their calls keep their estimate.
    if let Some(store) = &answers {
        store.answers_recorded().await;
    }
    written?;
    if interrupted {
        eprintln!("interrupted: {done} of {total} results written; run the same command again to resume");
        return Ok(ExitCode::from(1));
    }
    // Every line started sends a result (see `settle`): a shortfall is a bug, but it is reported,
    // not passed off as a success.
    let unanswered = total - done;
    if unanswered > 0 {
        eprintln!("{unanswered} line(s) ended without a result");
    }
    Ok(conclude(&backlog, &output, unanswered))
}

/// How long a line may run before it is ended with `internal_error`: its `max_wait`, the slack
/// [`answer`] may wait in place past it, and two walks of its chain with every provider taking
/// its full timeout on every try (a walk may begin just before the deadline). A guard against a
/// hang, not a deadline: the chain itself ends a job with `deadline_exceeded` long before.
fn line_bound(max_wait: Duration, chain: &Chain) -> Duration {
    let walk = chain.members.iter().fold(Duration::ZERO, |walk, member| {
        walk.saturating_add(member.timeout.saturating_mul(member.max_retries.saturating_add(1)))
    });
    max_wait.saturating_add(HOLD_SLACK).saturating_add(walk.saturating_mul(2)).saturating_add(HOLD_SLACK)
}

/// The result of one line's run, whatever becomes of the run: a panic, or no answer within
/// `bound`, is that line's `internal_error` result, so the run never waits on a line that will
/// not answer.
async fn settle(
    run: JoinHandle<JobResult>,
    bound: Duration,
    custom_id: String,
    chain: String,
    worker: String,
) -> JobResult {
    let started = Instant::now();
    let abort = run.abort_handle();
    let message = match tokio::time::timeout(bound, run).await {
        Ok(Ok(result)) => return result,
        Ok(Err(failure)) => format!("the line's run failed: {failure}"),
        Err(_) => {
            abort.abort();
            format!(
                "no result within {} (max_wait and every provider's timeout passed)",
                humantime::format_duration(bound)
            )
        }
    };
    tracing::error!(custom_id, %message, "a line ended without an answer");
    error_result(Some(custom_id), ErrorCode::InternalError, message, bare_routing(chain, worker, started.elapsed()))
}

/// The routing of a result that no chain run produced.
fn bare_routing(chain: String, worker: String, took: Duration) -> Routing {
    Routing {
        chain: Some(chain),
        provider: None,
        model: None,
        free: None,
        attempts: Vec::new(),
        rejected: false,
        worker,
        queued_ms: 0,
        total_ms: took.as_millis() as u64,
    }
}

/// Runs one line through its chain, waiting in place (there is no broker to park it in).
async fn answer(line: &Line, chain: &Chain, state: &dyn ProviderState, worker: String) -> JobResult {
    let started = Instant::now();
    let max_wait = match chain.max_wait_for(line.job.max_wait) {
        Ok(max_wait) => max_wait,
        Err(reason) => {
            let routing = bare_routing(chain.name.clone(), worker, Duration::ZERO);
            return error_result(Some(line.job.custom_id.clone()), ErrorCode::InvalidRequest, reason, routing);
        }
    };
    let clock = SystemClock;
    let mut progress = JobProgress::new(clock.now());
    // Every wait within max_wait happens in place: there is no broker to park the job in.
    let hold = HoldPolicy::new(max_wait, clock.now(), max_wait.saturating_add(HOLD_SLACK));
    let verdict = chain::run(chain, &line.job, max_wait, &mut progress, state, hold, &clock).await;
    let total_ms = started.elapsed().as_millis() as u64;
    let routing = Routing {
        chain: Some(chain.name.clone()),
        provider: None,
        model: None,
        free: None,
        attempts: progress.attempts,
        rejected: false,
        worker,
        queued_ms: 0,
        total_ms,
    };
    // `run` only hands back a wait longer than the hold limit, here `max_wait`: a deadline.
    result_of(&line.job.custom_id, verdict, routing.clone()).unwrap_or_else(|until| {
        let message =
            format!("no provider becomes usable within max_wait; the earliest is at {}", chain::rfc3339_seconds(until));
        error_result(Some(line.job.custom_id.clone()), ErrorCode::DeadlineExceeded, message, routing)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_line_that_never_answers_ends_as_internal_error_at_its_bound() {
        let never = tokio::spawn(std::future::pending::<JobResult>());
        let started = tokio::time::Instant::now();
        let bound = Duration::from_secs(3600);
        let result = settle(never, bound, "stuck".into(), "default".into(), "batch:test".into()).await;
        assert!(started.elapsed() >= bound, "not before its bound");
        assert_eq!(result.custom_id.as_deref(), Some("stuck"));
        assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::InternalError));
        assert_eq!(result.routing.chain.as_deref(), Some("default"));
    }

    #[tokio::test]
    async fn a_line_whose_run_panics_ends_as_internal_error() {
        let panics = tokio::spawn(async { panic!("a bug in a chain") });
        let result = settle(panics, Duration::from_secs(60), "p".into(), "default".into(), "batch:test".into()).await;
        assert_eq!(result.custom_id.as_deref(), Some("p"));
        let error = result.error.expect("an error result");
        assert_eq!(error.code, ErrorCode::InternalError);
        assert!(error.message.contains("panicked"), "{}", error.message);
    }

    #[tokio::test]
    async fn an_answer_within_the_bound_is_passed_on_unchanged() {
        let answer = error_result(
            Some("ok".into()),
            ErrorCode::DeadlineExceeded,
            "m".into(),
            bare_routing("default".into(), "w".into(), Duration::ZERO),
        );
        let run = tokio::spawn({
            let answer = answer.clone();
            async move { answer }
        });
        assert_eq!(settle(run, Duration::from_secs(60), "ok".into(), "default".into(), "w".into()).await, answer);
    }

    #[test]
    fn the_bound_covers_max_wait_and_two_walks_of_the_chain() {
        let chain = Chain {
            name: "c".into(),
            members: Vec::new(),
            max_wait: Duration::ZERO,
            max_wait_limit: Duration::ZERO,
            free_wait: Duration::ZERO,
            accept: Default::default(),
        };
        assert_eq!(line_bound(Duration::from_secs(600), &chain), Duration::from_secs(600 + 120));
        assert_eq!(line_bound(Duration::MAX, &chain), Duration::MAX, "no overflow on external numbers");
    }
}
