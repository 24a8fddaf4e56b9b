//! `fallback-worker status`: every configured provider's shared state, as all workers see it,
//! and every shared pool's (`[[quotas]]`): use per window, the next reset of calendar windows,
//! and who draws from it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::Row;

use crate::chain::rfc3339_seconds;
use crate::config::{Config, LimitConfig};
use crate::state::postgres::{PgStore, ScopeKind};

/// One provider's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderStatus {
    pub provider: String,
    pub free: bool,
    /// `usable`, `cooling` or `over_quota`.
    pub state: &'static str,
    /// RFC 3339, when cooling or over quota.
    pub until: Option<String>,
    /// Why it is cooling (`rate_limited`, `rate_limited_estimate`, `quota_day`,
    /// `quota_day_estimate`, `unreachable`, `auth`, `credits`, `circuit`, `model_unavailable`)
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
    /// The shared pools it also draws from (their use is on the pools' own lines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

/// One shared pool's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    pub pool: String,
    /// `usable`, `over_quota`, or `cooling` when none of its providers can draw from it and one
    /// at least cools down (as an account-scoped 429 makes them all: its windows may have room
    /// the provider will not give).
    pub state: &'static str,
    /// Which limit is spent (`requests`, `tokens`), when over quota; the providers' reason when
    /// cooling.
    pub reason: Option<String>,
    /// RFC 3339: when cooling, the earliest moment one of its providers is usable again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub windows: Vec<WindowUsage>,
    /// The configured providers drawing from it.
    pub providers: Vec<String>,
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
    /// A calendar window's reset as configured (`00:00 America/Los_Angeles`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets: Option<String>,
    /// When that window is next whole again (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_reset: Option<String>,
}

/// Reads every configured provider's state from the database; `pools` (from [`collect_pools`])
/// mark a provider whose pool is spent as over quota, without reading the pools again.
pub async fn collect(
    config: &Config,
    store: &PgStore,
    pools: &[PoolStatus],
) -> Result<Vec<ProviderStatus>, sqlx::Error> {
    let mut out = Vec::new();
    for provider in &config.providers {
        let row = sqlx::query(
            "SELECT CASE WHEN cooldown_until = 'infinity' THEN 253402300799999 WHEN cooldown_until = '-infinity' THEN 0 \
             ELSE (extract(epoch FROM cooldown_until) * 1000)::bigint END AS until_ms, cooldown_reason, cooldown_detail, \
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
            pools: provider.quotas.clone(),
        };
        if let Some(row) = row {
            let until = epoch(row.get("until_ms"));
            if until > SystemTime::now() {
                status.state = "cooling";
                status.until = Some(rfc3339_seconds(until));
                status.reason = row.get("cooldown_reason");
                status.detail = row.get("cooldown_detail");
            }
            status.consecutive_server_errors = row.get("consecutive_server_errors");
            status.last_error = row.get("last_error");
            status.last_error_at = row.get::<Option<i64>, _>("error_ms").map(|ms| rfc3339_seconds(epoch(ms)));
        }
        for limit in &provider.limits {
            status.windows.push(window_usage(store, ScopeKind::Provider, &provider.name, limit).await?);
        }
        if status.state == "usable"
            && let Some(full) = status.windows.iter().find(|w| w.used >= w.limit)
        {
            status.state = "over_quota";
            status.reason = Some(full.measure.to_string());
        }
        if status.state == "usable"
            && let Some(pool) = pools.iter().find(|p| p.state == "over_quota" && provider.quotas.contains(&p.pool))
        {
            // A spent pool stops the provider as surely as its own limit.
            status.state = "over_quota";
            status.reason = Some(format!("pool {}: {}", pool.pool, pool.reason.as_deref().unwrap_or("requests")));
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

/// Reads every configured pool's use from the database.
pub async fn collect_pools(config: &Config, store: &PgStore) -> Result<Vec<PoolStatus>, sqlx::Error> {
    let mut out = Vec::new();
    for pool in &config.quotas {
        let mut windows = Vec::new();
        for limit in &pool.limits {
            windows.push(window_usage(store, ScopeKind::Pool, &pool.name, limit).await?);
        }
        let full = windows.iter().find(|w| w.used >= w.limit);
        out.push(PoolStatus {
            pool: pool.name.clone(),
            state: if full.is_some() { "over_quota" } else { "usable" },
            reason: full.map(|w| w.measure.to_string()),
            until: None,
            providers: config
                .providers
                .iter()
                .filter(|p| p.quotas.contains(&pool.name))
                .map(|p| p.name.clone())
                .collect(),
            windows,
        });
    }
    Ok(out)
}

async fn window_usage(
    store: &PgStore,
    kind: ScopeKind,
    scope: &str,
    limit: &LimitConfig,
) -> Result<WindowUsage, sqlx::Error> {
    let (measure, max) = match (limit.requests, limit.tokens) {
        (Some(n), _) => ("requests", n),
        (_, n) => ("tokens", n.unwrap_or(0)),
    };
    // Read-only: what is in the window now (admission retires what has left it, lazily).
    let calendar = limit.resets.as_ref().map(|r| r.to_string());
    let used: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount), 0)::bigint FROM quota_use \
         WHERE kind = $1 AND scope = $2 AND measure = $3 AND window_ms = $4 AND calendar = $5 AND leaves_at > now()",
    )
    .bind(kind.as_str())
    .bind(scope)
    .bind(measure)
    .bind(i64::try_from(limit.per.as_millis()).unwrap_or(i64::MAX))
    .bind(calendar.as_deref().unwrap_or(""))
    .fetch_one(store.pool())
    .await?;
    Ok(WindowUsage {
        measure,
        limit: max,
        per: humantime::format_duration(limit.per).to_string(),
        used: used.max(0) as u64,
        next_reset: limit.resets.as_ref().map(|r| rfc3339_seconds(r.next_after(SystemTime::now()))),
        resets: calendar,
    })
}

/// The human-readable table.
pub fn render_table(statuses: &[ProviderStatus]) -> String {
    let mut rows = vec![
        ["PROVIDER", "FREE", "STATE", "UNTIL", "REASON", "USAGE", "REJECTED", "LAST ERROR"].map(String::from).to_vec(),
    ];
    for s in statuses {
        let mut usage = s.windows.iter().map(window_cell).collect::<Vec<_>>();
        usage.extend(s.pools.iter().map(|pool| format!("pool {pool}")));
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
    aligned(rows)
}

/// The rows as columns padded to their widest cell.
fn aligned(rows: Vec<Vec<String>>) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |cell| cell.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Marks `cooling` each usable pool none of whose providers can draw from it, one at least
/// cooling down (the others over a limit of their own): its windows may show room, but no call
/// draws from it until the first of them is back (`until`). A reason they share (an
/// account-scoped 429 gives each `rate_limited` or `quota_day`) is the pool's.
pub fn mark_cooling_pools(pools: &mut [PoolStatus], providers: &[ProviderStatus]) {
    for pool in pools.iter_mut().filter(|p| p.state == "usable" && !p.providers.is_empty()) {
        let drawing: Vec<&ProviderStatus> = providers.iter().filter(|s| pool.providers.contains(&s.provider)).collect();
        let stopped = drawing.iter().all(|s| s.state != "usable") && drawing.iter().any(|s| s.state == "cooling");
        if drawing.len() != pool.providers.len() || !stopped {
            continue;
        }
        pool.state = "cooling";
        pool.until = drawing.iter().filter_map(|s| s.until.clone()).min();
        let first = drawing.first().and_then(|s| s.reason.clone());
        pool.reason = first.filter(|reason| drawing.iter().all(|s| s.reason.as_ref() == Some(reason)));
    }
}

/// The pools' table: use per window and who draws from each.
pub fn render_pools(pools: &[PoolStatus]) -> String {
    let mut rows = vec![["POOL", "STATE", "UNTIL", "REASON", "USAGE", "PROVIDERS"].map(String::from).to_vec()];
    for p in pools {
        rows.push(vec![
            p.pool.clone(),
            p.state.to_string(),
            p.until.clone().unwrap_or_else(|| "-".into()),
            p.reason.clone().unwrap_or_else(|| "-".into()),
            p.windows.iter().map(window_cell).collect::<Vec<_>>().join(", "),
            if p.providers.is_empty() { "-".into() } else { p.providers.join(", ") },
        ]);
    }
    aligned(rows)
}

/// `"3/50 requests per 1day (resets 00:00 UTC, next 2026-12-01T00:00:00Z)"`.
fn window_cell(w: &WindowUsage) -> String {
    let cell = format!("{}/{} {} per {}", w.used, w.limit, w.measure, w.per);
    match (&w.resets, &w.next_reset) {
        (Some(resets), Some(next)) => format!("{cell} (resets {resets}, next {next})"),
        _ => cell,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, state: &'static str, until: Option<&str>, reason: Option<&str>) -> ProviderStatus {
        ProviderStatus {
            provider: name.into(),
            free: true,
            state,
            until: until.map(str::to_string),
            reason: reason.map(str::to_string),
            detail: None,
            consecutive_server_errors: 0,
            last_error: None,
            last_error_at: None,
            windows: vec![],
            rejected_outputs: BTreeMap::new(),
            pools: vec!["acct".into()],
        }
    }

    fn pool(state: &'static str) -> PoolStatus {
        let reason = (state == "over_quota").then(|| "requests".to_string());
        PoolStatus {
            pool: "acct".into(),
            state,
            reason,
            until: None,
            windows: vec![],
            providers: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn a_pool_cools_only_when_none_of_its_providers_can_draw_from_it() {
        let (early, late) = (Some("2026-12-01T00:00:00Z"), Some("2026-12-01T08:00:00Z"));
        let mixed = [provider("a", "cooling", late, Some("quota_day")), provider("b", "usable", None, None)];
        let mut pools = [pool("usable")];
        mark_cooling_pools(&mut pools, &mixed);
        assert_eq!((pools[0].state, pools[0].until.as_deref()), ("usable", None), "b still draws from it");

        let both =
            [provider("a", "cooling", late, Some("quota_day")), provider("b", "cooling", early, Some("circuit"))];
        mark_cooling_pools(&mut pools, &both);
        assert_eq!((pools[0].state, pools[0].until.as_deref(), pools[0].reason.as_deref()), ("cooling", early, None));

        let same =
            [provider("a", "cooling", late, Some("quota_day")), provider("b", "cooling", late, Some("quota_day"))];
        let mut pools = [pool("usable"), pool("over_quota")];
        mark_cooling_pools(&mut pools, &same);
        assert_eq!(pools[0].reason.as_deref(), Some("quota_day"));
        assert_eq!(
            (pools[1].state, pools[1].reason.as_deref()),
            ("over_quota", Some("requests")),
            "a spent pool says so"
        );
        // One cooling, the other over a limit of its own (review 32, finding 9): none draws.
        let stopped =
            [provider("a", "cooling", late, Some("quota_day")), provider("b", "over_quota", None, Some("requests"))];
        let mut pools = [pool("usable")];
        mark_cooling_pools(&mut pools, &stopped);
        assert_eq!((pools[0].state, pools[0].until.as_deref(), pools[0].reason.as_deref()), ("cooling", late, None));
        // A provider of the pool the status did not list (not configured): not all are known to cool.
        let mut pools = [pool("usable")];
        mark_cooling_pools(&mut pools, &same[..1]);
        assert_eq!(pools[0].state, "usable");
    }
}
