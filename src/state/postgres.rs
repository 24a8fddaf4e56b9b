//! The Postgres store: the table is the truth, LISTEN/NOTIFY keeps a local copy warm.
//!
//! Every cooldown is written with `GREATEST` (it only moves forward) and announced with
//! `pg_notify` in the same statement, so it is visible to all workers at commit. Before each
//! call a worker reads the provider's row ([`ProviderState::admit`]); the local copy answers
//! when a cooldown is already known (no round trip) and when the database is unreachable.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use super::{Admission, Cooldown, LedgerEntry, ProviderState, ResultLedger, StoreError};
use crate::chain::CooldownReason;

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
}

#[derive(Debug, Clone, Default)]
struct CachedProvider {
    cooldown: Option<Cooldown>,
    /// Last seen run of 5xx; a success only needs a write when it is not zero.
    consecutive_server_errors: i32,
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
        PgStore { pool, cache: Arc::default() }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
            let entry = CachedProvider {
                cooldown: cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail")),
                consecutive_server_errors: row.get("consecutive_server_errors"),
            };
            cache.insert(row.get("provider"), entry);
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
            (Some(current), Some(new)) => new.until > current.until,
            (None, Some(_)) => true,
            _ => false,
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
    async fn admit(&self, provider: &str, now: SystemTime) -> Admission {
        if let Some(cooldown) = self.known_cooldown(provider).filter(|c| c.until > now) {
            return Admission::Cooling(cooldown);
        }
        let row = sqlx::query(
            "SELECT (extract(epoch FROM cooldown_until) * 1000)::bigint AS until_ms, cooldown_reason, \
             cooldown_detail, consecutive_server_errors FROM provider_state WHERE provider = $1",
        )
        .bind(provider)
        .fetch_optional(&self.pool)
        .await;
        match row {
            Ok(Some(row)) => {
                let cooldown =
                    cooldown_from(row.get("until_ms"), row.get("cooldown_reason"), row.get("cooldown_detail"));
                {
                    let mut cache = self.cache.lock().unwrap();
                    cache.entry(provider.to_string()).or_default().consecutive_server_errors =
                        row.get("consecutive_server_errors");
                }
                self.remember_cooldown(provider, cooldown.clone());
                match cooldown {
                    Some(c) if c.until > now => Admission::Cooling(c),
                    _ => Admission::Granted,
                }
            }
            Ok(None) => Admission::Granted,
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot read provider state; using this worker's copy");
                Admission::Granted
            }
        }
    }

    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.remember_cooldown(provider, Some(cooldown.clone()));
        let result = sqlx::query(
            "WITH up AS ( \
               INSERT INTO provider_state AS s (provider, cooldown_until, cooldown_reason, cooldown_detail, last_error, last_error_at) \
               VALUES ($1, to_timestamp($2::float8 / 1000), $3, $4, $4, now()) \
               ON CONFLICT (provider) DO UPDATE SET \
                 cooldown_reason = CASE WHEN EXCLUDED.cooldown_until > s.cooldown_until THEN EXCLUDED.cooldown_reason ELSE s.cooldown_reason END, \
                 cooldown_detail = CASE WHEN EXCLUDED.cooldown_until > s.cooldown_until THEN EXCLUDED.cooldown_detail ELSE s.cooldown_detail END, \
                 cooldown_until = GREATEST(s.cooldown_until, EXCLUDED.cooldown_until), \
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
        let had_errors = self.cache.lock().unwrap().get(provider).is_some_and(|c| c.consecutive_server_errors > 0);
        if !had_errors {
            return;
        }
        let result = sqlx::query(
            "UPDATE provider_state SET consecutive_server_errors = 0, updated_at = now() WHERE provider = $1",
        )
        .bind(provider)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => {
                if let Some(c) = self.cache.lock().unwrap().get_mut(provider) {
                    c.consecutive_server_errors = 0;
                }
            }
            Err(e) => tracing::warn!(provider, error = %e, "cannot reset the provider's error run"),
        }
    }

    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        let result = sqlx::query_scalar::<_, i32>(
            "INSERT INTO provider_state AS s (provider, consecutive_server_errors, last_error, last_error_at) \
             VALUES ($1, 1, $2, now()) \
             ON CONFLICT (provider) DO UPDATE SET consecutive_server_errors = s.consecutive_server_errors + 1, \
               last_error = EXCLUDED.last_error, last_error_at = now(), updated_at = now() \
             RETURNING consecutive_server_errors",
        )
        .bind(provider)
        .bind(detail)
        .fetch_one(&self.pool)
        .await;
        let mut cache = self.cache.lock().unwrap();
        let entry = cache.entry(provider.to_string()).or_default();
        match result {
            Ok(count) => entry.consecutive_server_errors = count,
            Err(e) => {
                tracing::warn!(provider, error = %e, "cannot share a server error; counting locally");
                entry.consecutive_server_errors += 1;
            }
        }
        entry.consecutive_server_errors.max(0) as u32
    }
}

#[async_trait::async_trait]
impl ResultLedger for PgStore {
    async fn open(&self, key: &str) -> Result<LedgerEntry, StoreError> {
        let row = sqlx::query(
            "INSERT INTO job_results (job_key) VALUES ($1) \
             ON CONFLICT (job_key) DO UPDATE SET deliveries = job_results.deliveries + 1 \
             RETURNING deliveries, result::text AS result",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await?;
        Ok(LedgerEntry { deliveries: row.get::<i32, _>("deliveries").max(0) as u32, result: row.get("result") })
    }

    async fn store(&self, key: &str, result_json: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO job_results (job_key, result, answered_at) VALUES ($1, $2::jsonb, now()) \
             ON CONFLICT (job_key) DO UPDATE SET result = EXCLUDED.result, answered_at = now()",
        )
        .bind(key)
        .bind(result_json)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
