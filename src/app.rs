//! Wiring: from a validated [`Config`] to running tasks (consumer supervisor, state listener,
//! housekeeping), all stopped by one [`CancellationToken`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::broker::headers::HeaderKey;
use crate::broker::{self, Session, Topology};
use crate::chain::{Chain, Member};
use crate::config::{Config, ProviderConfig};
use crate::observability::{self, Probe};
use crate::providers::http::{HttpProvider, shared_client};
use crate::secrets::{ApiKey, redact_url};
use crate::state::postgres::{HEARTBEAT_INTERVAL, PgStore};
use crate::worker::{HandlerRules, JobHandler, worker_id};

/// Builds every chain of the config. A provider whose `api_key_env` is not set in the
/// environment is left out of all chains, with one warning.
pub fn build_chains(
    config: &Config,
    client: &reqwest::Client,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<HashMap<String, Arc<Chain>>> {
    let mut members: HashMap<&str, Member> = HashMap::new();
    for provider in &config.providers {
        let key = match &provider.api_key_env {
            Some(var) => match env(var).filter(|k| !k.is_empty()) {
                Some(key) => Some(ApiKey::new(key)),
                None => {
                    tracing::warn!(provider = %provider.name, env = %var, "API key variable is not set; provider disabled");
                    continue;
                }
            },
            None => None,
        };
        let http = HttpProvider::new(client.clone(), provider, key).map_err(anyhow::Error::msg)?;
        members.insert(
            &provider.name,
            Member {
                name: provider.name.clone(),
                model: provider.model.clone(),
                free: provider.free,
                context_window: provider.context_window,
                max_retries: provider.max_retries,
                limits: provider.limits.clone(),
                pools: config.pools_of(provider).into(),
                timeout: provider.timeout,
                pool_mates: pool_mates(config, provider),
                timeouts: Arc::default(),
                provider: observability::trace::traced(&provider.name, Arc::new(http)),
            },
        );
    }
    let mut chains = HashMap::new();
    for (name, chain) in &config.chains {
        let chain_members: Vec<Member> =
            chain.providers.iter().filter_map(|p| members.get(p.as_str()).cloned()).collect();
        if chain_members.is_empty() {
            tracing::warn!(chain = %name, "no provider of this chain is enabled; its jobs will fail");
        }
        chains.insert(
            name.clone(),
            Arc::new(Chain {
                name: name.clone(),
                members: chain_members,
                max_wait: chain.max_wait,
                max_wait_limit: chain.max_wait_limit,
                free_wait: chain.free_wait,
                accept: chain.accept,
            }),
        );
    }
    Ok(chains)
}

/// The other providers of the config that draw from one of `provider`'s `[[quotas]]` pools,
/// each once, in config order. Disabled ones too: another worker may have their key, and a
/// cooldown of a provider this worker does not call costs nothing.
fn pool_mates(config: &Config, provider: &ProviderConfig) -> Vec<String> {
    config
        .providers
        .iter()
        .filter(|other| other.name != provider.name)
        .filter(|other| other.quotas.iter().any(|pool| provider.quotas.contains(pool)))
        .map(|other| other.name.clone())
        .collect()
}

/// A worker process: everything `fallback-worker worker` runs.
pub struct WorkerApp {
    pub config: Config,
    /// The queues, from the config's names.
    pub topology: Topology,
    pub worker_id: String,
    /// Whether the broker session is up (for `/readyz`).
    pub broker_ready: Arc<AtomicBool>,
    /// Where `/metrics`, `/healthz` and `/readyz` listen, once bound (tests bind port 0).
    pub http_addr: Arc<OnceLock<SocketAddr>>,
}

impl WorkerApp {
    pub fn new(config: Config) -> WorkerApp {
        let topology = Topology::from_config(&config.amqp, &config.worker);
        WorkerApp { config, topology, worker_id: worker_id(), broker_ready: Arc::default(), http_addr: Arc::default() }
    }

    /// Runs until `shutdown`, then drains in-flight jobs. Only a broken configuration or a
    /// database that refuses the migrations ends it early; transient faults are waited out.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = &self.config;
        // One of the connections is the LISTEN session's own.
        let pool_size = config.postgres.max_connections.saturating_sub(1).max(1);
        let mut store = PgStore::connect_lazy(&config.postgres.url, pool_size)
            .with_context(|| format!("postgres.url `{}`", redact_url(&config.postgres.url)))?;
        if let Some(url) = &config.postgres.listen_url {
            store = store.with_listen_url(url).with_context(|| format!("postgres.listen_url `{}`", redact_url(url)))?;
        }
        if !migrate_when_reachable(&store, &shutdown).await? {
            return Ok(());
        }
        let Some(secret) = shared_secret_when_reachable(&store, &shutdown).await else {
            return Ok(());
        };
        let header_key = HeaderKey::new(secret);
        let chains = build_chains(config, &shared_client(), &|var| std::env::var(var).ok())?;
        let tasks = tokio_util::task::TaskTracker::new();
        // Cooldowns other workers set reach this one's cache through LISTEN/NOTIFY.
        tasks.spawn(store.clone().listen(shutdown.clone()));
        if !config.http.addr.is_empty() {
            let probe = Probe {
                config: Arc::new(config.clone()),
                store: store.clone(),
                broker_ready: self.broker_ready.clone(),
                metrics: observability::recorder(),
            };
            match observability::serve(&config.http.addr, probe, shutdown.clone()).await {
                Ok((bound, server)) => {
                    let _ = self.http_addr.set(bound);
                    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
                    tasks.spawn(async move {
                        let _ = server.await;
                    });
                }
                // Several workers on one host share a config: the second must still work.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => tracing::warn!(
                    addr = %config.http.addr,
                    "http.addr is in use (another worker on this host?): no /metrics here; give each worker its own HTTP_ADDR"
                ),
                Err(e) => return Err(e).with_context(|| format!("cannot listen on http.addr `{}`", config.http.addr)),
            }
        }
        let upkeep =
            Upkeep { store: store.clone(), worker: self.worker_id.clone(), retention: config.worker.result_retention };
        tasks.spawn(housekeeping(upkeep, shutdown.clone()));
        let reply_to_allow =
            config.amqp.reply_to_allow.iter().map(|p| glob::Pattern::new(p)).collect::<Result<_, _>>()?;
        let answers = store.clone();
        let store = Arc::new(store);
        let handler = Arc::new(JobHandler {
            chains,
            state: store.clone(),
            ledger: store,
            rules: HandlerRules {
                topology: self.topology.clone(),
                reply_to_allow,
                max_message_bytes: config.amqp.max_message_bytes,
                hold_limit: config.worker.hold_limit,
                delivery_deadline: config.worker.delivery_deadline,
                max_deliveries: config.worker.max_deliveries,
            },
            worker_id: self.worker_id.clone(),
            key_locks: Default::default(),
            header_key,
            local_failures: Default::default(),
        });
        let session = Session {
            urls: config.amqp.url.clone(),
            prefetch: config.amqp.prefetch,
            topology: self.topology.clone(),
            confirm_timeout: config.amqp.confirm_timeout,
            drain_timeout: config.worker.drain_timeout,
            connection_name: format!("fallback-worker {}", self.worker_id),
        };
        tracing::info!(worker = %self.worker_id, broker = %config.amqp.url.redacted(), "worker starting");
        broker::run_consumer(session, handler, shutdown.clone(), self.broker_ready.clone()).await;
        answers.answers_recorded().await;
        tasks.close();
        tasks.wait().await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// The service's shared secret, waiting out a database that blinks right after the migrations.
/// `None`: shut down before it came.
async fn shared_secret_when_reachable(store: &PgStore, shutdown: &CancellationToken) -> Option<Vec<u8>> {
    let mut delay = Duration::from_millis(250);
    loop {
        match store.shared_secret().await {
            Ok(secret) => return Some(secret),
            Err(e) => tracing::warn!(error = %e, "cannot read the service's shared secret yet; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Applies the migrations, waiting for the database if it is not up yet. `Ok(false)`: shut
/// down before the database came.
pub async fn migrate_when_reachable(store: &PgStore, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    let mut delay = Duration::from_millis(250);
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(true),
            Err(sqlx::migrate::MigrateError::Execute(e)) if crate::state::postgres::is_transient(&e) => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
            }
            Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("3D000") =>
            {
                store.create_database().await.context("the database does not exist and cannot be created")?;
                continue;
            }
            Err(e) => return Err(e).context("applying the database migrations"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What housekeeping works on.
struct Upkeep {
    store: PgStore,
    /// This worker's id, for its heartbeat.
    worker: String,
    retention: Duration,
}

/// Sends this worker's heartbeat (the divisor of each limit's local share during a database
/// outage) and prunes the ledger and the usage records now and then (any worker may; it is
/// idempotent).
async fn housekeeping(upkeep: Upkeep, shutdown: CancellationToken) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut prune = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = heartbeat.tick() => {
                if let Err(e) = upkeep.store.heartbeat(&upkeep.worker).await {
                    tracing::debug!(error = %e, "cannot send the heartbeat");
                }
            }
            _ = prune.tick() => prune_old_records(&upkeep).await,
        }
    }
}

async fn prune_old_records(upkeep: &Upkeep) {
    match upkeep.store.prune_ledger(upkeep.retention).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned old results from the ledger"),
        Err(e) => tracing::warn!(error = %e, "cannot prune the result ledger"),
    }
    if let Err(e) = upkeep.store.prune_usage().await {
        tracing::warn!(error = %e, "cannot prune old usage records");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::EnvOverrides;

    #[test]
    fn pool_mates_are_the_other_providers_of_any_shared_pool() {
        let provider = |name: &str, quotas: &str| {
            format!(
                "[[providers]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nquotas = [{quotas}]\n"
            )
        };
        let text = [
            provider("a", r#""or-free""#),
            provider("b", r#""or-free", "other""#),
            provider("c", r#""other""#),
            provider("d", ""),
            "[[quotas]]\nname = \"or-free\"\n[[quotas]]\nname = \"other\"\n".to_string(),
            "[chains.default]\nproviders = [\"a\", \"b\", \"c\", \"d\"]\n".to_string(),
        ]
        .concat();
        let config = Config::parse(&text, Path::new("test.toml"), &EnvOverrides::default()).unwrap();
        let mates = |name: &str| pool_mates(&config, config.providers.iter().find(|p| p.name == name).unwrap());
        assert_eq!(mates("a"), vec!["b"]);
        assert_eq!(mates("b"), vec!["a", "c"]);
        assert_eq!(mates("c"), vec!["b"]);
        assert!(mates("d").is_empty());
        let chains = build_chains(&config, &reqwest::Client::new(), &|_| None).unwrap();
        let members = &chains["default"].members;
        assert_eq!(members.iter().map(|m| m.pool_mates.len()).collect::<Vec<_>>(), vec![1, 2, 1, 0]);
    }
}
