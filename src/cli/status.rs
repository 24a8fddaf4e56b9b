//! `fallback-worker status`: every configured provider's shared state, as all workers see it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::Row;

use crate::config::{Config, LimitConfig};
use crate::state::postgres::PgStore;

/// One provider's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderStatus {
    pub provider: String,
    pub free: bool,
    /// `usable`, `cooling` or `over_quota`.
    pub state: &'static str,
    /// RFC 3339, when cooling or over quota.
    pub until: Option<String>,
    /// Why it is cooling (`rate_limited`, `quota_day`, `unreachable`, `auth`, `credits`, `circuit`)
    /// or which limit is spent (`requests`, `tokens`).
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub consecutive_server_errors: i32,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub windows: Vec<WindowUsage>,
    /// Answers that failed a job's checks (contract §7), by reason, across all workers since
    /// the database was created. A rejection never cools a provider down: many here mean the
    /// provider is poor at what these jobs ask, not that it is unavailable.
    pub rejected_outputs: BTreeMap<String, u64>,
}

/// Use of one configured limit right now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowUsage {
    /// `requests` or `tokens`.
    pub measure: &'static str,
    pub limit: u64,
    pub per: String,
    /// Requests (or tokens) occupying the current window, in flight included.
    pub used: u64,
}

/// Reads every configured provider's state from the database.
pub async fn collect(config: &Config, store: &PgStore) -> Result<Vec<ProviderStatus>, sqlx::Error> {
    let mut out = Vec::new();
    for provider in &config.providers {
        let row = sqlx::query(
            "SELECT (extract(epoch FROM cooldown_until) * 1000)::bigint AS until_ms, cooldown_reason, cooldown_detail, \
             consecutive_server_errors, last_error, (extract(epoch FROM last_error_at) * 1000)::bigint AS error_ms \
             FROM provider_state WHERE provider = $1",
        )
        .bind(&provider.name)
        .fetch_optional(store.pool())
        .await?;
        let mut status = ProviderStatus {
            provider: provider.name.clone(),
            free: provider.free,
            state: "usable",
            until: None,
            reason: None,
            detail: None,
            consecutive_server_errors: 0,
            last_error: None,
            last_error_at: None,
            windows: Vec::new(),
            rejected_outputs: rejected_outputs(store, &provider.name).await?,
        };
        if let Some(row) = row {
            let until = epoch(row.get("until_ms"));
            if until > SystemTime::now() {
                status.state = "cooling";
                status.until = Some(rfc3339(until));
                status.reason = row.get("cooldown_reason");
                status.detail = row.get("cooldown_detail");
            }
            status.consecutive_server_errors = row.get("consecutive_server_errors");
            status.last_error = row.get("last_error");
            status.last_error_at = row.get::<Option<i64>, _>("error_ms").map(|ms| rfc3339(epoch(ms)));
        }
        for limit in &provider.limits {
            status.windows.push(window_usage(store, &provider.name, limit).await?);
        }
        if status.state == "usable"
            && let Some(full) = status.windows.iter().find(|w| w.used >= w.limit)
        {
            status.state = "over_quota";
            status.reason = Some(full.measure.to_string());
        }
        out.push(status);
    }
    Ok(out)
}

async fn rejected_outputs(store: &PgStore, provider: &str) -> Result<BTreeMap<String, u64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT reason, count FROM rejected_outputs WHERE provider = $1")
        .bind(provider)
        .fetch_all(store.pool())
        .await?;
    Ok(rows.into_iter().map(|(reason, count)| (reason, count.max(0) as u64)).collect())
}

async fn window_usage(store: &PgStore, provider: &str, limit: &LimitConfig) -> Result<WindowUsage, sqlx::Error> {
    let (measure, max) = match (limit.requests, limit.tokens) {
        (Some(n), _) => ("requests", n),
        (_, n) => ("tokens", n.unwrap_or(0)),
    };
    // Read-only: what is in the window now (admission retires what has left it, lazily).
    let used: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount), 0)::bigint FROM quota_use \
         WHERE scope = $1 AND measure = $2 AND window_ms = $3 AND leaves_at > now()",
    )
    .bind(provider)
    .bind(measure)
    .bind(i64::try_from(limit.per.as_millis()).unwrap_or(i64::MAX))
    .fetch_one(store.pool())
    .await?;
    Ok(WindowUsage {
        measure,
        limit: max,
        per: humantime::format_duration(limit.per).to_string(),
        used: used.max(0) as u64,
    })
}

/// The human-readable table.
pub fn render_table(statuses: &[ProviderStatus]) -> String {
    let mut rows = vec![
        ["PROVIDER", "FREE", "STATE", "UNTIL", "REASON", "USAGE", "REJECTED", "LAST ERROR"].map(String::from).to_vec(),
    ];
    for s in statuses {
        let usage =
            s.windows.iter().map(|w| format!("{}/{} {} per {}", w.used, w.limit, w.measure, w.per)).collect::<Vec<_>>();
        let last_error =
            s.last_error.as_deref().map(|e| crate::providers::short_message(e).chars().take(60).collect::<String>());
        rows.push(vec![
            s.provider.clone(),
            if s.free { "yes" } else { "no" }.to_string(),
            s.state.to_string(),
            s.until.clone().unwrap_or_else(|| "-".into()),
            s.reason.clone().unwrap_or_else(|| "-".into()),
            if usage.is_empty() { "-".into() } else { usage.join(", ") },
            rejected_cell(&s.rejected_outputs),
            last_error.unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `"3 (empty 2, not_json 1)"`, or `-` when no answer was rejected.
fn rejected_cell(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().fold(0, |sum, n| sum.saturating_add(*n));
    if total == 0 {
        return "-".into();
    }
    let each: Vec<String> = counts.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    format!("{total} ({})", each.join(", "))
}

fn epoch(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
