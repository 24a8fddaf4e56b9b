//! Prometheus metrics and the health endpoints, served on `http.addr`:
//! `/metrics`, `/healthz` (the process is alive), `/readyz` (broker session up and database
//! answering).
//!
//! Metric names (all prefixed `fallback_`):
//! - `jobs_total{outcome}`: finished deliveries: `ok`, `invalid_request`, `all_providers_failed`,
//!   `deadline_exceeded`, `parked` (waiting in a delay queue), `from_ledger` (redelivery answered
//!   from the store);
//! - `attempts_total{provider,outcome}`: every attempt, skips included;
//! - `provider_latency_seconds{provider}`: latency of calls that reached the provider;
//! - `answers_total{tier}`: successful answers by `free` or `paid` provider;
//! - `rejected_outputs_total{provider,reason}`: answers that failed a job's checks (contract §7),
//!   by reason: `empty`, `cut_off`, `content_filter`, `not_json`, `schema`, `too_short`;
//! - `queue_wait_seconds`: time from publish (or first receipt) to processing;
//! - `provider_cooling{provider}` and `quota_used{provider,measure,per}` /
//!   `quota_limit{…}`: the shared state, read from Postgres at scrape time; likewise
//!   `pool_quota_used{pool,measure,per[,resets]}` / `pool_quota_limit{…}` for shared pools.
//!
//! Traces across the queue (W3C trace context in AMQP headers, a span per provider call) are
//! in [`trace`]; their export is set up in [`crate::telemetry`].

pub mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::chain::checks::RejectReason;
use crate::config::Config;
use crate::job::JobResult;
use crate::routing::{Attempt, AttemptOutcome};
use crate::state::postgres::PgStore;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls reuse it.
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
            let recorder =
                PrometheusBuilder::new().set_buckets(&buckets).expect("static buckets are valid").build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a library user's): ours then stays local.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Records one delivery's result: its outcome and the attempts made during it.
pub fn record_result(result: &JobResult, new_attempts: &[Attempt]) {
    let outcome = match (&result.error, result.routing.free) {
        (Some(error), _) => match error.code {
            crate::job::ErrorCode::InvalidRequest => "invalid_request",
            crate::job::ErrorCode::AllProvidersFailed => "all_providers_failed",
            crate::job::ErrorCode::DeadlineExceeded => "deadline_exceeded",
            crate::job::ErrorCode::InternalError => "internal_error",
        },
        (None, free) => {
            metrics::counter!("fallback_answers_total", "tier" => if free == Some(true) { "free" } else { "paid" })
                .increment(1);
            "ok"
        }
    };
    metrics::counter!("fallback_jobs_total", "outcome" => outcome).increment(1);
    metrics::histogram!("fallback_queue_wait_seconds").record(result.routing.queued_ms as f64 / 1000.0);
    record_attempts(new_attempts);
}

/// Records attempts of a delivery that did not finish the job (it was parked).
pub fn record_parked(new_attempts: &[Attempt]) {
    metrics::counter!("fallback_jobs_total", "outcome" => "parked").increment(1);
    record_attempts(new_attempts);
}

/// Whether this worker serves from its own view because the database is unreachable.
pub fn record_database_down(down: bool) {
    metrics::gauge!("fallback_database_degraded").set(if down { 1.0 } else { 0.0 });
}

/// A delivery the worker failed on internally (a panic, an unforeseen error).
pub fn record_internal_failure() {
    metrics::counter!("fallback_internal_failures_total").increment(1);
}

/// A result or copy the broker refused for one message (a nack, a full or missing queue).
pub fn record_refused_publish() {
    metrics::counter!("fallback_refused_publishes_total").increment(1);
}

pub fn record_from_ledger() {
    metrics::counter!("fallback_jobs_total", "outcome" => "from_ledger").increment(1);
}

fn record_attempts(attempts: &[Attempt]) {
    for attempt in attempts {
        metrics::counter!("fallback_attempts_total", "provider" => attempt.provider.clone(), "outcome" => attempt.outcome.as_str())
            .increment(1);
        if attempt.outcome == AttemptOutcome::RejectedOutput {
            // The attempt's message is its only record of the reason; its wording is fixed per
            // reason (and its label therefore bounded) by `chain::checks`.
            let reason =
                attempt.message.as_deref().and_then(RejectReason::of_message).map_or("other", RejectReason::label);
            metrics::counter!("fallback_rejected_outputs_total", "provider" => attempt.provider.clone(), "reason" => reason)
                .increment(1);
        }
        let reached_provider = attempt.status.is_some()
            || matches!(attempt.outcome, AttemptOutcome::Timeout | AttemptOutcome::ConnectError);
        if reached_provider {
            metrics::histogram!("fallback_provider_latency_seconds", "provider" => attempt.provider.clone())
                .record(attempt.latency_ms as f64 / 1000.0);
        }
    }
}

/// What the endpoints need.
#[derive(Clone)]
pub struct Probe {
    pub config: Arc<Config>,
    pub store: PgStore,
    pub broker_ready: Arc<AtomicBool>,
    pub metrics: PrometheusHandle,
}

/// Binds `addr` and serves until `shutdown`. Binding happens before returning, so a port in use
/// is reported at start.
pub async fn serve(
    addr: &str,
    probe: Probe,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(probe);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::warn!(error = %e, "the metrics and health endpoint stopped");
        }
    });
    Ok((bound, task))
}

async fn readyz(State(probe): State<Probe>) -> (StatusCode, String) {
    let broker = probe.broker_ready.load(Ordering::Relaxed);
    let database = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(probe.store.pool()))
        .await
        .is_ok_and(|r| r.is_ok());
    let status = if broker && database { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |up: bool| if up { "up" } else { "down" };
    (status, format!("broker {}\ndatabase {}\n", word(broker), word(database)))
}

async fn metrics_page(State(probe): State<Probe>) -> String {
    let read = async {
        let pools = crate::cli::status::collect_pools(&probe.config, &probe.store).await?;
        let providers = crate::cli::status::collect(&probe.config, &probe.store, &pools).await?;
        Ok::<_, sqlx::Error>((providers, pools))
    };
    if let Ok(Ok((providers, pools))) = tokio::time::timeout(Duration::from_secs(2), read).await {
        set_provider_gauges(providers);
        set_pool_gauges(pools);
    }
    probe.metrics.render()
}

fn set_provider_gauges(statuses: Vec<crate::cli::status::ProviderStatus>) {
    for status in statuses {
        let cooling = if status.state == "cooling" { 1.0 } else { 0.0 };
        metrics::gauge!("fallback_provider_cooling", "provider" => status.provider.clone()).set(cooling);
        for window in status.windows {
            let labels = [
                ("provider", status.provider.clone()),
                ("measure", window.measure.to_string()),
                ("per", window.per.clone()),
            ];
            metrics::gauge!("fallback_quota_used", &labels).set(window.used as f64);
            metrics::gauge!("fallback_quota_limit", &labels).set(window.limit as f64);
        }
    }
}

fn set_pool_gauges(pools: Vec<crate::cli::status::PoolStatus>) {
    for pool in pools {
        for window in pool.windows {
            let mut labels =
                vec![("pool", pool.pool.clone()), ("measure", window.measure.to_string()), ("per", window.per.clone())];
            // A calendar day and a sliding day of one pool are two series.
            if let Some(resets) = &window.resets {
                labels.push(("resets", resets.clone()));
            }
            metrics::gauge!("fallback_pool_quota_used", &labels).set(window.used as f64);
            metrics::gauge!("fallback_pool_quota_limit", &labels).set(window.limit as f64);
        }
    }
}
