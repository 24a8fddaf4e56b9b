//! The Postgres store: the table is the truth, LISTEN/NOTIFY keeps a local copy warm.
//!
//! Every cooldown is written with `GREATEST` (it only moves forward) and announced with
//! `pg_notify` in the same statement, so it is visible to all workers at commit. Before each
//! call a worker reads the provider's row ([`ProviderState::admit`]); the local copy answers
//! when a cooldown is already known (no round trip) and when the database is unreachable.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::ledger_batcher::{self, Request};
use super::{Admission, Ask, Cooldown, LedgerEntry, Permit, ProviderState, QuotaMeasure, ResultLedger, StoreError};
use crate::chain::CIRCUIT_THRESHOLD;
use crate::chain::clock::later;
use crate::routing::CooldownReason;

/// The embedded migrations (`migrations/`), applied under sqlx's advisory lock so that N workers
/// can start together.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The NOTIFY channel for provider-state changes.
const CHANNEL: &str = "fallback_provider_state";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This process's copy of the shared state (kept by the listener and by our own writes).
    cache: Arc<Mutex<HashMap<String, CachedProvider>>>,
    /// One gate per provider: this process's jobs ask the database for a slot one at a time,
    /// and the ones behind a refusal read it from the cache instead of asking again (no herd
    /// of queries each time a slot frees).
    gates: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The ledger's batching task, started on first use.
    ledger: Arc<OnceLock<mpsc::Sender<Request>>>,
}

#[derive(Debug, Clone, Default)]
struct CachedProvider {
    cooldown: Option<Cooldown>,
    /// Last seen run of 5xx; a success only needs a write when it is not zero.
    consecutive_server_errors: i32,
    /// The database's last "no room before" answer for this provider's limits.
    quota_blocked: Option<(SystemTime, QuotaMeasure)>,
}

/// The notification payload, built by SQL's `json_build_object`.
#[derive(Deserialize)]
struct Notice {
    provider: String,
    until_ms: i64,
    reason: Option<String>,
    detail: Option<String>,
}

impl PgStore {
    /// A lazily connecting pool: the worker starts (and keeps running) while Postgres is down.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgStore, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?.application_name("fallback-worker");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> PgStore {
        PgStore { pool, cache: Arc::default(), gates: Arc::default(), ledger: Arc::default() }
    }

    fn ledger(&self) -> &mpsc::Sender<Request> {
        self.ledger.get_or_init(|| ledger_batcher::spawn(self.pool.clone()))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the database the pool points at (a fresh server has none called `fallback`).
    pub async fn create_database(&self) -> Result<(), sqlx::Error> {
        use sqlx::Connection as _;
        let options = self.pool.connect_options();
        let name = options.get_database().unwrap_or("fallback").to_string();
        let mut admin = sqlx::PgConnection::connect_with(&options.as_ref().clone().database("postgres")).await?;
        let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created the database"),
            // 42P04: another worker created it a moment ago.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Loads every provider row into the local copy.
    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT provider, (extract(epoch FROM cooldown_until) * 1000)::bigint AS until_ms, \
             cooldown_reason, cooldown_detail, consecutive_server_errors FROM provider_state",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut cache = self.cache.lock().unwrap();
        for row in rows {
            let entry = cache.entry(row.get("provider")).or_default();
            entry.cooldown = cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail"));
            entry.consecutive_server_errors = row.get("consecutive_server_errors");
        }
        Ok(())
    }

    /// Follows NOTIFY until `shutdown`; after any reconnect it reloads the table, since
    /// notifications sent while disconnected are lost.
    pub async fn listen(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let session = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(CHANNEL).await?;
                self.reload().await?;
                tracing::debug!("listening for provider-state changes");
                loop {
                    match listener.try_recv().await? {
                        Some(notification) => self.apply_notice(notification.payload()),
                        None => {
                            tracing::info!("provider-state listener reconnected; reloading");
                            self.reload().await?;
                        }
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = session => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "provider-state listener lost the database; retrying");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    fn apply_notice(&self, payload: &str) {
        let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
            tracing::warn!("ignoring a malformed provider-state notification");
            return;
        };
        let cooldown = cooldown_from(notice.until_ms, notice.reason, notice.detail);
        self.remember_cooldown(&notice.provider, cooldown);
    }

    fn remember_cooldown(&self, provider: &str, cooldown: Option<Cooldown>) {
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.entry(provider.to_string()).or_default();
        let newer = match (&entry.cooldown, &cooldown) {
            (Some(current), Some(new)) => new.replaces(current),
            (None, Some(_)) => true,
            // The shared row has no cooldown any more: a success closed the circuit.
            (Some(current), None) => current.reason == CooldownReason::Circuit,
            (None, None) => false,
        };
        if newer {
            entry.cooldown = cooldown;
        }
    }

    /// The latest cooldown this process knows for `provider` (expired or not), without asking
    /// the database.
    pub fn known_cooldown(&self, provider: &str) -> Option<Cooldown> {
        self.cache.lock().unwrap().get(provider)?.cooldown.clone()
    }

    fn quota_blocked(&self, provider: &str, now: SystemTime) -> Option<(SystemTime, QuotaMeasure)> {
        self.cache.lock().unwrap().get(provider)?.quota_blocked.filter(|(until, _)| *until > now)
    }

    fn gate(&self, provider: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.lock().unwrap().entry(provider.to_string()).or_default().clone()
    }

    /// The provider's row as the database has it (cooldown and error run).
    async fn read_cooldown(&self, provider: &str, now: SystemTime) -> Result<Option<Cooldown>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT (extract(epoch FROM cooldown_until) * 1000)::bigint AS until_ms, cooldown_reason, \
             cooldown_detail, consecutive_server_errors FROM provider_state WHERE provider = $1",
        )
        .bind(provider)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let cooldown = cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail"));
        self.cache.lock().unwrap().entry(provider.to_string()).or_default().consecutive_server_errors =
            row.get("consecutive_server_errors");
        self.remember_cooldown(provider, cooldown.clone());
        Ok(cooldown.filter(|c| c.until > now))
    }

    /// Takes a slot in the provider's windows, or learns when there will be one.
    async fn acquire(&self, ask: Ask<'_>, now: SystemTime) -> Result<Admission, sqlx::Error> {
        let (mut request_limits, mut request_windows, mut token_limits, mut token_windows) =
            (vec![], vec![], vec![], vec![]);
        for limit in ask.limits {
            let window = limit.per.as_millis() as i64;
            if let Some(n) = limit.requests {
                request_limits.push(n as i64);
                request_windows.push(window);
            }
            if let Some(n) = limit.tokens {
                token_limits.push(n as i64);
                token_windows.push(window);
            }
        }
        let row = sqlx::query(
            "SELECT usage_id, blocked_until_ms, blocked_by FROM fallback_acquire($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(ask.provider)
        .bind(&request_limits)
        .bind(&request_windows)
        .bind(&token_limits)
        .bind(&token_windows)
        .bind(ask.tokens.min(i64::MAX as u64) as i64)
        .bind(ask.flight.as_millis() as i64)
        .fetch_one(&self.pool)
        .await?;
        let usage_id: Option<i64> = row.get("usage_id");
        let until = row
            .get::<Option<i64>, _>("blocked_until_ms")
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
        let blocked_by: Option<String> = row.get("blocked_by");
        let admission = match (usage_id, until, blocked_by.as_deref()) {
            (Some(id), _, _) => Admission::Granted(Permit { usage_id: Some(id) }),
            (None, _, Some("tokens_exceed_limit")) => Admission::TooLarge,
            (None, Some(until), Some("cooldown")) => match self.read_cooldown(ask.provider, now).await? {
                Some(cooldown) => Admission::Cooling(cooldown),
                None => Admission::OverQuota { until, measure: QuotaMeasure::Requests },
            },
            (None, Some(until), Some("tokens")) => Admission::OverQuota { until, measure: QuotaMeasure::Tokens },
            (None, Some(until), _) => Admission::OverQuota { until, measure: QuotaMeasure::Requests },
            (None, None, _) => Admission::Granted(Permit { usage_id: None }),
        };
        let blocked = match &admission {
            Admission::OverQuota { until, measure } => Some((*until, *measure)),
            _ => None,
        };
        self.cache.lock().unwrap().entry(ask.provider.to_string()).or_default().quota_blocked = blocked;
        Ok(admission)
    }

    /// Deletes usage records older than any window can see (called by housekeeping).
    pub async fn prune_usage(&self, longest_window: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM provider_usage WHERE coalesce(done_at, expires_at) < now() - make_interval(secs => $1)",
        )
        .bind(longest_window.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes ledger rows first seen longer ago than `retention` (called by housekeeping).
    pub async fn prune_ledger(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM job_results WHERE first_seen < now() - make_interval(secs => $1)")
            .bind(retention.as_secs_f64())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn cooldown_from(until_ms: i64, reason: Option<String>, detail: Option<String>) -> Option<Cooldown> {
    let reason = CooldownReason::parse(reason.as_deref()?)?;
    Some(Cooldown {
        until: UNIX_EPOCH + Duration::from_millis(until_ms.max(0) as u64),
        reason,
        detail: detail.unwrap_or_default(),
    })
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[async_trait::async_trait]
impl ProviderState for PgStore {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        let provider = ask.provider;
        if let Some(cooldown) = self.known_cooldown(provider).filter(|c| c.until > now) {
            return Admission::Cooling(cooldown);
        }
        if ask.limits.is_empty() {
            return match self.read_cooldown(provider, now).await {
                Ok(Some(cooldown)) => Admission::Cooling(cooldown),
                Ok(None) => Admission::Granted(Permit { usage_id: None }),
                Err(e) => {
                    tracing::warn!(provider, error = %e, "cannot read provider state; using this worker's copy");
                    Admission::Granted(Permit { usage_id: None })
                }
            };
        }
        if let Some((until, measure)) = self.quota_blocked(provider, now) {
            return Admission::OverQuota { until, measure };
        }
        let gate = self.gate(provider);
        let _turn = gate.lock().await;
        // Whoever held the gate before us may have learnt the answer already.
        let now = now.max(SystemTime::now());
        if let Some(cooldown) = self.known_cooldown(provider).filter(|c| c.until > now) {
            return Admission::Cooling(cooldown);
        }
        if let Some((until, measure)) = self.quota_blocked(provider, now) {
            return Admission::OverQuota { until, measure };
        }
        match self.acquire(ask, now).await {
            Ok(admission) => admission,
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot count the call against shared limits; calling without");
                Admission::Granted(Permit { usage_id: None })
            }
        }
    }

    async fn finish(&self, permit: Permit, tokens: Option<u64>) {
        let Some(id) = permit.usage_id else { return };
        let result = sqlx::query(
            "UPDATE provider_usage SET done_at = clock_timestamp(), tokens = coalesce($2, tokens) WHERE id = $1",
        )
        .bind(id)
        .bind(tokens.map(|t| t.min(i64::MAX as u64) as i64))
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot record a call's answer; its slot frees when it expires");
        }
    }

    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.remember_cooldown(provider, Some(cooldown.clone()));
        let result = sqlx::query(
            "WITH up AS ( \
               INSERT INTO provider_state AS s (provider, cooldown_until, cooldown_reason, cooldown_detail, last_error, last_error_at) \
               VALUES ($1, to_timestamp($2::float8 / 1000), $3, $4, $4, now()) \
               ON CONFLICT (provider) DO UPDATE SET \
                 cooldown_reason = CASE WHEN (EXCLUDED.cooldown_until > s.cooldown_until OR (EXCLUDED.cooldown_reason = 'circuit' AND s.cooldown_reason = 'circuit')) THEN EXCLUDED.cooldown_reason ELSE s.cooldown_reason END, \
                 cooldown_detail = CASE WHEN (EXCLUDED.cooldown_until > s.cooldown_until OR (EXCLUDED.cooldown_reason = 'circuit' AND s.cooldown_reason = 'circuit')) THEN EXCLUDED.cooldown_detail ELSE s.cooldown_detail END, \
                 cooldown_until = CASE WHEN (EXCLUDED.cooldown_until > s.cooldown_until OR (EXCLUDED.cooldown_reason = 'circuit' AND s.cooldown_reason = 'circuit')) THEN EXCLUDED.cooldown_until ELSE s.cooldown_until END, \
                 last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now() \
               RETURNING s.provider, s.cooldown_until, s.cooldown_reason, s.cooldown_detail) \
             SELECT pg_notify($5, json_build_object('provider', provider, \
               'until_ms', (extract(epoch FROM cooldown_until) * 1000)::bigint, \
               'reason', cooldown_reason, 'detail', cooldown_detail)::text) FROM up",
        )
        .bind(provider)
        .bind(epoch_ms(cooldown.until) as f64)
        .bind(cooldown.reason.as_str())
        .bind(&cooldown.detail)
        .bind(CHANNEL)
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(provider, error = %e, "cannot share a cooldown; only this worker knows it");
        }
    }

    async fn record_success(&self, provider: &str) {
        let circuit = |c: &CachedProvider| c.cooldown.as_ref().is_some_and(|c| c.reason == CooldownReason::Circuit);
        let had_errors =
            self.cache.lock().unwrap().get(provider).is_some_and(|c| c.consecutive_server_errors > 0 || circuit(c));
        if !had_errors {
            return;
        }
        // Closing the circuit is announced so that every worker calls again at once.
        let result = sqlx::query(
            "WITH up AS ( \
               UPDATE provider_state SET consecutive_server_errors = 0, circuit_probe_at = NULL, updated_at = now(), \
                 cooldown_until = CASE WHEN cooldown_reason = 'circuit' THEN 'epoch'::timestamptz ELSE cooldown_until END, \
                 cooldown_reason = CASE WHEN cooldown_reason = 'circuit' THEN NULL ELSE cooldown_reason END \
               WHERE provider = $1 RETURNING provider, cooldown_reason) \
             SELECT pg_notify($2, json_build_object('provider', provider, 'until_ms', 0, \
               'reason', NULL::text, 'detail', NULL::text)::text) FROM up WHERE cooldown_reason IS NULL",
        )
        .bind(provider)
        .bind(CHANNEL)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => {
                if let Some(c) = self.cache.lock().unwrap().get_mut(provider) {
                    c.consecutive_server_errors = 0;
                }
                self.remember_cooldown(provider, None);
            }
            Err(e) => tracing::warn!(provider, error = %e, "cannot reset the provider's error run"),
        }
    }

    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> bool {
        // Only a circuit this process knows of can need a probe: the listener brings every
        // opening within moments, long before its (at least 5 s) open time ends, and `admit`
        // has just read the row.
        let Some(known) = self.known_cooldown(provider).filter(|c| c.reason == CooldownReason::Circuit) else {
            return true;
        };
        if known.until > now {
            return false;
        }
        let hold = Cooldown { until: later(now, hold_for), ..known };
        // One statement: take the probe if the circuit is still expired (a second worker's
        // UPDATE waits for the first's row lock, then finds the hold and takes nothing), announce
        // the hold, and tell "someone else holds it" from "there is no circuit any more".
        let claimed = sqlx::query_as::<_, (bool, bool)>(
            "WITH current AS (SELECT cooldown_reason FROM provider_state WHERE provider = $1), \
             claimed AS ( \
               UPDATE provider_state SET cooldown_until = to_timestamp($3::float8 / 1000), \
                 circuit_probe_at = to_timestamp($2::float8 / 1000), updated_at = now() \
               WHERE provider = $1 AND cooldown_reason = 'circuit' \
                 AND cooldown_until <= to_timestamp($2::float8 / 1000) \
               RETURNING provider, cooldown_until, cooldown_reason, cooldown_detail), \
             announced AS ( \
               SELECT pg_notify($4, json_build_object('provider', provider, \
                 'until_ms', (extract(epoch FROM cooldown_until) * 1000)::bigint, \
                 'reason', cooldown_reason, 'detail', cooldown_detail)::text) FROM claimed) \
             SELECT (SELECT count(*) FROM announced) > 0, \
                    coalesce((SELECT cooldown_reason = 'circuit' FROM current), false)",
        )
        .bind(provider)
        .bind(epoch_ms(now) as f64)
        .bind(epoch_ms(hold.until) as f64)
        .bind(CHANNEL)
        .fetch_one(&self.pool)
        .await;
        match claimed {
            Ok((true, _)) => {
                self.remember_cooldown(provider, Some(hold));
                true
            }
            Ok((false, circuit)) => !circuit,
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot claim the circuit's probe in the database; probing from here");
                self.remember_cooldown(provider, Some(hold));
                true
            }
        }
    }

    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        let result = sqlx::query_scalar::<_, i32>(
            "INSERT INTO provider_state AS s (provider, consecutive_server_errors, last_error, last_error_at) \
             VALUES ($1, 1, $2, now()) \
             ON CONFLICT (provider) DO UPDATE SET consecutive_server_errors = s.consecutive_server_errors \
                 + CASE WHEN s.consecutive_server_errors >= $3 AND s.circuit_probe_at IS NULL THEN 0 ELSE 1 END, \
               circuit_probe_at = NULL, \
               last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now() \
             RETURNING consecutive_server_errors",
        )
        .bind(provider)
        .bind(detail)
        .bind(i32::try_from(CIRCUIT_THRESHOLD).unwrap_or(i32::MAX))
        .fetch_one(&self.pool)
        .await;
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.entry(provider.to_string()).or_default();
        match result {
            Ok(count) => entry.consecutive_server_errors = count,
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot share a server error; counting locally");
                entry.consecutive_server_errors = entry.consecutive_server_errors.saturating_add(1);
            }
        }
        entry.consecutive_server_errors.max(0) as u32
    }
}

#[async_trait::async_trait]
impl ResultLedger for PgStore {
    async fn open(&self, key: &str) -> Result<LedgerEntry, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.ledger().send(Request::Open { key: key.to_string(), reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn store(&self, key: &str, result_json: &str) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Store { key: key.to_string(), json: result_json.to_string(), reply };
        self.ledger().send(request).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the ledger task stopped".into())
}
