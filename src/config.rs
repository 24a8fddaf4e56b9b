//! The TOML configuration (contract §5): parsed, defaulted and validated once at start.
//!
//! Every error names the file, the key and the problem, so an operator can fix a bad file
//! without reading code; the binary turns a [`ConfigError`] into exit code 2.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::calendar::DailyReset;
use crate::chain::checks::Accept;
use crate::secrets::redact_url;

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from; kept to name the file in later messages.
    pub source: PathBuf,
    pub amqp: AmqpConfig,
    pub postgres: PostgresConfig,
    pub http: HttpConfig,
    pub worker: WorkerConfig,
    /// Every declared provider, in file order, names unique.
    pub providers: Vec<ProviderConfig>,
    /// Chains by name; `default` always exists and every member names a declared provider.
    pub chains: BTreeMap<String, ChainConfig>,
    /// Pools of limits shared by several providers (`[[quotas]]`, contract §5): one account's
    /// limits across models or endpoints.
    pub quotas: Vec<QuotaPoolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// The broker's URL, or the URLs of a cluster's nodes, tried in turn; they may carry a
    /// password, so they only ever print redacted.
    pub url: BrokerUrls,
    pub jobs_queue: String,
    pub results_queue: String,
    /// Jobs in flight per worker process (the consumer's `basic.qos`).
    pub prefetch: u16,
    /// Glob patterns a job's `reply_to` must match.
    pub reply_to_allow: Vec<String>,
    /// Larger messages are poison: answered `invalid_request` and dead-lettered.
    pub max_message_bytes: usize,
    /// How long to wait for the broker to confirm a publish before treating the channel as broken
    /// (a broker under a memory alarm never confirms; we must not wait forever).
    #[serde(deserialize_with = "duration")]
    pub confirm_timeout: Duration,
    /// `quorum` declares every queue as a replicated quorum queue, so a RabbitMQ cluster can lose
    /// a node without losing a job; `classic` (the default) keeps the plain durable queues of a
    /// single broker.
    pub queue_type: QueueType,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: BrokerUrls::one("amqp://guest:guest@127.0.0.1:5672/%2f"),
            jobs_queue: "llm.jobs".into(),
            results_queue: "llm.results".into(),
            prefetch: 32,
            reply_to_allow: vec!["*".into()],
            max_message_bytes: 1024 * 1024,
            confirm_timeout: Duration::from_secs(30),
            queue_type: QueueType::Classic,
        }
    }
}

/// The kind of queue the service declares (contract §5 `amqp.queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Plain durable queues: one broker, or a cluster where each queue lives on one node.
    #[default]
    Classic,
    /// Raft-replicated queues (RabbitMQ 3.10 and later): a cluster keeps serving them, and the
    /// messages in them, while a minority of its nodes is down.
    Quorum,
}

/// One broker URL, or several: the nodes of one RabbitMQ cluster, tried in turn.
///
/// Never empty. `Debug` and [`redacted`](Self::redacted) hide every password, so the list can be
/// logged and put in errors as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<String>);

impl BrokerUrls {
    /// A single node.
    pub fn one(url: impl Into<String>) -> BrokerUrls {
        BrokerUrls(vec![url.into()])
    }

    /// A comma-separated list (env `AMQP_URL`, or a TOML string): a new URL starts at each comma
    /// followed (after blanks) by `amqp://` or `amqps://`, so a comma elsewhere (in a password, a
    /// query) stays in its URL. Blanks and commas around the URLs are dropped; `None` when
    /// nothing is left. Text before the first URL is kept as an entry, for validation to refuse.
    pub fn parse_list(text: &str) -> Option<BrokerUrls> {
        let mut starts = vec![0];
        for (i, _) in text.match_indices(',') {
            let rest = text[i + 1..].trim_start();
            if rest.starts_with("amqp://") || rest.starts_with("amqps://") {
                starts.push(i + 1);
            }
        }
        starts.push(text.len());
        let urls: Vec<String> = starts
            .windows(2)
            .map(|w| text[w[0]..w[1]].trim().trim_end_matches(',').trim().to_string())
            .filter(|u| !u.is_empty() && !u.chars().all(|c| c == ',' || c.is_whitespace()))
            .collect();
        (!urls.is_empty()).then_some(BrokerUrls(urls))
    }

    /// The URLs in the order they are tried.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The first node: where a worker starts.
    pub fn first(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every URL with its password hidden, comma-separated: for logs and error messages.
    pub fn redacted(&self) -> String {
        self.0.iter().map(|u| redact_url(u)).collect::<Vec<_>>().join(", ")
    }
}

impl From<String> for BrokerUrls {
    fn from(url: String) -> BrokerUrls {
        BrokerUrls::one(url)
    }
}

impl From<&str> for BrokerUrls {
    fn from(url: &str) -> BrokerUrls {
        BrokerUrls::one(url)
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrls[{}]", self.redacted())
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    /// A TOML string (one URL, or a comma-separated list as in `AMQP_URL`) or an array of
    /// strings. An empty array is kept empty here, for validation to name the key.
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<BrokerUrls, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        match Form::deserialize(de) {
            Ok(Form::One(text)) => Ok(BrokerUrls::parse_list(&text).unwrap_or(BrokerUrls(Vec::new()))),
            Ok(Form::Many(urls)) => Ok(BrokerUrls(urls.into_iter().map(|u| u.trim().to_string()).collect())),
            Err(_) => Err(serde::de::Error::custom("must be a URL string or an array of URL strings")),
        }
    }
}

impl AmqpConfig {
    /// `<jobs_queue>.dead`: where poison messages go (contract §4).
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.jobs_queue)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Database URL; may carry a password, printed only through [`redact_url`].
    pub url: String,
    /// Connections per worker, the LISTEN session's included: 3 by default, so one Postgres
    /// with the default `max_connections = 100` serves 30 workers.
    pub max_connections: u32,
    /// Where the LISTEN session connects, when not `url`: Postgres itself or a session-mode
    /// PgBouncer, when `url` goes through a transaction-mode PgBouncer (LISTEN needs a session).
    pub listen_url: Option<String>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { url: "postgres://postgres@127.0.0.1:5432/fallback".into(), max_connections: 3, listen_url: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/metrics`, `/healthz`, `/readyz`; empty disables the listener.
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { addr: "0.0.0.0:9090".into() }
    }
}

/// Worker tuning beyond the contract's keys; every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// A job whose next usable provider is at most this far away waits in the worker; a longer
    /// wait parks it in a delay queue so it holds no broker slot.
    #[serde(deserialize_with = "duration")]
    pub hold_limit: Duration,
    /// Hard bound on the time one delivery is held unacked, far below RabbitMQ's
    /// `consumer_timeout` (30 min by default): past it the job is parked, not dropped.
    #[serde(deserialize_with = "duration")]
    pub delivery_deadline: Duration,
    /// A message delivered more often than this without an answer (it crashes workers) is poison.
    pub max_deliveries: u32,
    /// Graceful shutdown waits at most this long for in-flight jobs before leaving them to the
    /// broker (which redelivers them).
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// How long answered jobs stay in the result ledger (redeliveries within it are free).
    #[serde(deserialize_with = "duration")]
    pub result_retention: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            hold_limit: Duration::from_secs(10),
            delivery_deadline: Duration::from_secs(10 * 60),
            max_deliveries: 10,
            drain_timeout: Duration::from_secs(60),
            result_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The wire dialect a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Gemini,
    Anthropic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default = "default_kind")]
    pub kind: ProviderKind,
    pub base_url: String,
    /// Name of the environment variable holding the key; the key itself never sits in the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    pub model: String,
    /// Unknown means paid: a provider must be declared free to be used before `free_wait`.
    #[serde(default)]
    pub free: bool,
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default)]
    pub context_window: Option<u64>,
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What the model behind this provider can carry, narrowing what its kind can: a model
    /// without vision or function calling is skipped for such jobs before any request (and any
    /// quota) is spent on it. `None`: everything the kind carries.
    #[serde(default)]
    pub supports: Option<Vec<Capability>>,
    /// The shared pools (`[[quotas]]` names) this provider draws from as well as its own
    /// `limits`.
    #[serde(default)]
    pub quotas: Vec<String>,
}

/// `[[quotas]]`: limits held once for every provider that names the pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaPoolConfig {
    pub name: String,
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
}

/// Something a job may need beyond plain text, which a provider's `supports` may leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// `tools` / `tool_choice`, tool calls and tool results in the conversation.
    Tools,
    /// `response_format: {"type": "json_schema", ...}`.
    JsonSchema,
    /// `image_url` content parts.
    Images,
}

impl Capability {
    pub const ALL: [Capability; 3] = [Capability::Tools, Capability::JsonSchema, Capability::Images];

    /// The name the config and the skip messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Tools => "tools",
            Capability::JsonSchema => "json_schema",
            Capability::Images => "images",
        }
    }
}

fn default_kind() -> ProviderKind {
    ProviderKind::Openai
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_retries() -> u32 {
    1
}

/// One quota: at most `requests` calls or `tokens` tokens in any window of length `per`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(deserialize_with = "duration")]
    pub per: Duration,
    /// A calendar window (`per = "1d"` only): the quota is whole again at this time of day, as
    /// the provider counts, instead of sliding.
    #[serde(default, deserialize_with = "daily_reset")]
    pub resets: Option<DailyReset>,
}

fn daily_reset<'de, D: Deserializer<'de>>(de: D) -> Result<Option<DailyReset>, D::Error> {
    let text = String::deserialize(de)?;
    DailyReset::parse(&text).map(Some).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub providers: Vec<String>,
    #[serde(default = "default_max_wait", deserialize_with = "duration")]
    pub max_wait: Duration,
    /// The most a job's own `max_wait` may ask for.
    #[serde(default = "default_max_wait_limit", deserialize_with = "duration")]
    pub max_wait_limit: Duration,
    #[serde(default, deserialize_with = "duration")]
    pub free_wait: Duration,
    /// The answer checks (contract §7): `content`, `finish` and `json` on unless turned off.
    #[serde(default, deserialize_with = "crate::chain::checks::accept_table")]
    pub accept: Accept,
}

fn default_max_wait() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_max_wait_limit() -> Duration {
    Duration::from_secs(24 * 3600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    amqp: AmqpConfig,
    #[serde(default)]
    postgres: PostgresConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    worker: WorkerConfig,
    providers: Vec<ProviderConfig>,
    chains: BTreeMap<String, ChainConfig>,
    #[serde(default)]
    quotas: Vec<QuotaPoolConfig>,
}

/// Environment values that override the file (contract §1).
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    pub amqp_url: Option<String>,
    pub database_url: Option<String>,
    pub http_addr: Option<String>,
}

impl EnvOverrides {
    /// The overrides the environment sets. An empty `DATABASE_URL` is unset, as `batch` reads it
    /// (`HTTP_ADDR=""` means what `http.addr = ""` does: no HTTP endpoint).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self {
            amqp_url: var("AMQP_URL"),
            database_url: var("DATABASE_URL").filter(|url| !url.trim().is_empty()),
            http_addr: var("HTTP_ADDR"),
        }
    }

    /// The variable that set `key` (`amqp.url`, `amqp.url[1]`, `postgres.url`, `http.addr`), if
    /// one did: an error in its value is the variable's, not the file's.
    fn variable_for(&self, key: &str) -> Option<&'static str> {
        let is = |name: &str| key == name || key.strip_prefix(name).is_some_and(|rest| rest.starts_with('['));
        [
            ("amqp.url", "AMQP_URL", self.amqp_url.is_some()),
            ("postgres.url", "DATABASE_URL", self.database_url.is_some()),
            ("http.addr", "HTTP_ADDR", self.http_addr.is_some()),
        ]
        .into_iter()
        .find(|(name, _, set)| *set && is(name))
        .map(|(_, variable, _)| variable)
    }
}

/// Parses a duration such as `"500ms"`, `"30s"`, `"1m"`, `"1d"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like \"30s\", \"1m\" or \"1d\" ({e})"))
}

fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl Config {
    /// Reads, parses and validates `path`, then applies the environment overrides.
    pub fn load(path: &Path, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            problem: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses and validates TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw = parse_toml(text, &file)?;
        let mut config = Config {
            source: path.to_path_buf(),
            amqp: raw.amqp,
            postgres: raw.postgres,
            http: raw.http,
            worker: raw.worker,
            providers: raw.providers,
            chains: raw.chains,
            quotas: raw.quotas,
        };
        if let Some(urls) = &env.amqp_url {
            // A blank AMQP_URL leaves no URL, which validation refuses by name.
            config.amqp.url = BrokerUrls::parse_list(urls).unwrap_or(BrokerUrls(Vec::new()));
        }
        if let Some(url) = &env.database_url {
            config.postgres.url = url.clone();
        }
        if let Some(addr) = &env.http_addr {
            config.http.addr = addr.clone();
        }
        config.validate().map_err(|(key, problem)| match env.variable_for(&key) {
            Some(variable) => ConfigError {
                file: "environment".into(),
                key: format!("{variable} (overrides {key} in {file})"),
                problem,
            },
            None => ConfigError { file, key, problem },
        })?;
        Ok(config)
    }

    /// The pools `provider` draws from, resolved (name and limits), in its `quotas` order.
    pub fn pools_of(&self, provider: &ProviderConfig) -> Vec<QuotaPoolConfig> {
        provider.quotas.iter().filter_map(|name| self.quotas.iter().find(|q| &q.name == name).cloned()).collect()
    }

    /// The provider declared under `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_amqp(&self.amqp)?;
        validate_url(&self.postgres.url, &["postgres", "postgresql"], "postgres.url")?;
        if let Some(url) = &self.postgres.listen_url {
            validate_url(url, &["postgres", "postgresql"], "postgres.listen_url")?;
        }
        if self.postgres.max_connections < 2 {
            return Err(problem("postgres.max_connections", "must be at least 2 (one is the listener)"));
        }
        if !self.http.addr.is_empty() && self.http.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(problem(
                "http.addr",
                format!("`{}` is not an address like \"0.0.0.0:9090\" (or \"\" to disable)", self.http.addr),
            ));
        }
        validate_worker(&self.worker)?;
        let mut names = BTreeSet::new();
        for (i, provider) in self.providers.iter().enumerate() {
            validate_provider(provider, i)?;
            if !names.insert(provider.name.as_str()) {
                return Err(problem(format!("providers[{i}].name"), format!("`{}` is declared twice", provider.name)));
            }
        }
        validate_pools(&self.quotas, &self.providers)?;
        if !self.chains.contains_key("default") {
            return Err(problem("chains.default", "missing: every job without a `chain` uses it"));
        }
        for (name, chain) in &self.chains {
            let key = format!("chains.{name}.providers");
            if chain.providers.is_empty() {
                return Err(problem(key, "is empty"));
            }
            for member in &chain.providers {
                if !names.contains(member.as_str()) {
                    return Err(problem(&key, format!("`{member}` is not a declared provider")));
                }
            }
            if chain.max_wait > chain.max_wait_limit {
                return Err(problem(format!("chains.{name}.max_wait"), "is above the chain's max_wait_limit"));
            }
            // The row is pruned counting from the job's first receipt: it must outlive the
            // longest wait and the last delivery's work after it.
            let longest = chain.max_wait_limit.saturating_add(self.worker.delivery_deadline);
            if self.worker.result_retention < longest {
                return Err(problem(
                    "worker.result_retention",
                    format!(
                        "is shorter than chains.{name}.max_wait_limit + worker.delivery_deadline ({}): a job may wait that long, and its ledger row must outlive the wait",
                        humantime::format_duration(longest)
                    ),
                ));
            }
            let unique: BTreeSet<_> = chain.providers.iter().collect();
            if unique.len() != chain.providers.len() {
                return Err(problem(key, "names a provider twice"));
            }
        }
        Ok(())
    }
}

fn parse_toml(text: &str, file: &str) -> Result<FileConfig, ConfigError> {
    let located = |key: String, err: &toml::de::Error| {
        let line = err.span().map(|span| 1 + text[..span.start].matches('\n').count());
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        ConfigError { file: file.to_string(), key, problem: format!("{}{at}", err.message().trim()) }
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| located("(syntax)".into(), &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "(top level)".to_string() } else { path };
        located(key, e.inner())
    })
}

fn problem(key: impl Into<String>, problem: impl Into<String>) -> (String, String) {
    (key.into(), problem.into())
}

fn validate_amqp(amqp: &AmqpConfig) -> Result<(), (String, String)> {
    let urls = amqp.url.as_slice();
    if urls.is_empty() {
        return Err(problem("amqp.url", "needs at least one URL"));
    }
    for (i, url) in urls.iter().enumerate() {
        let key = if urls.len() == 1 { "amqp.url".to_string() } else { format!("amqp.url[{i}]") };
        validate_url(url, &["amqp", "amqps"], &key)?;
        if urls[..i].contains(url) {
            return Err(problem(key, format!("`{}` is listed twice", redact_url(url))));
        }
    }
    for (key, name) in [("amqp.jobs_queue", &amqp.jobs_queue), ("amqp.results_queue", &amqp.results_queue)] {
        if name.is_empty() || name.len() > 200 || name.starts_with("amq.") {
            return Err(problem(
                key,
                format!("`{name}` is not a usable queue name (1 to 200 bytes, not starting with `amq.`)"),
            ));
        }
    }
    if amqp.results_queue.starts_with(&amqp.jobs_queue) {
        return Err(problem(
            "amqp.results_queue",
            "must not start with the jobs queue's name (results would count as job-queue injections)",
        ));
    }
    if amqp.prefetch == 0 {
        return Err(problem("amqp.prefetch", "must be at least 1"));
    }
    if amqp.max_message_bytes == 0 {
        return Err(problem("amqp.max_message_bytes", "must be at least 1"));
    }
    // Below a second, a healthy broker's confirms come too late: every publish would count as
    // failed, its job be redelivered and its result published again, without end.
    if amqp.confirm_timeout < Duration::from_secs(1) {
        return Err(problem("amqp.confirm_timeout", "must be at least 1s"));
    }
    for (i, pattern) in amqp.reply_to_allow.iter().enumerate() {
        glob::Pattern::new(pattern)
            .map_err(|e| problem(format!("amqp.reply_to_allow[{i}]"), format!("`{pattern}` is not a glob: {e}")))?;
    }
    Ok(())
}

fn validate_worker(worker: &WorkerConfig) -> Result<(), (String, String)> {
    if worker.delivery_deadline < Duration::from_secs(1) {
        return Err(problem("worker.delivery_deadline", "must be at least 1s"));
    }
    if worker.hold_limit > worker.delivery_deadline {
        return Err(problem("worker.hold_limit", "must not exceed worker.delivery_deadline"));
    }
    if worker.max_deliveries == 0 {
        return Err(problem("worker.max_deliveries", "must be at least 1"));
    }
    // The ledger's rows also count the deliveries of jobs still running or parked: a retention
    // shorter than their wait forgets them, and a redelivery calls a provider again.
    if worker.result_retention < Duration::from_secs(3600) {
        return Err(problem("worker.result_retention", "must be at least 1h"));
    }
    Ok(())
}

fn validate_provider(provider: &ProviderConfig, i: usize) -> Result<(), (String, String)> {
    let key = |field: &str| format!("providers[{i}].{field}");
    if !is_storable_name(&provider.name) {
        return Err(problem(key("name"), "must be 1 to 100 characters, none of them a control character"));
    }
    validate_url(&provider.base_url, &["http", "https"], &key("base_url"))?;
    if provider.model.is_empty() {
        return Err(problem(key("model"), "must not be empty"));
    }
    if provider.timeout.is_zero() {
        return Err(problem(key("timeout"), "must be more than 0s"));
    }
    if provider.context_window == Some(0) {
        return Err(problem(key("context_window"), "must be at least 1 (or left out: unknown)"));
    }
    if provider.max_retries > 10 {
        return Err(problem(key("max_retries"), "must be at most 10"));
    }
    if let Some(env) = &provider.api_key_env
        && (env.is_empty() || env.contains('='))
    {
        return Err(problem(key("api_key_env"), "must name an environment variable"));
    }
    validate_limits(&provider.limits, &key("limits"))?;
    for name in provider.headers.keys() {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(problem(key("headers"), format!("`{name}` is not a valid header name")));
        }
    }
    Ok(())
}

/// Whether a provider's or a pool's name can key the shared state: 1 to 100 bytes, and no
/// control character, since Postgres `text` cannot store `\u{0}` (every admission of that
/// provider would fail at the database) and the others garble logs and `status`.
fn is_storable_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 100 && !name.chars().any(char::is_control)
}

/// The longest window a limit may have.
const LONGEST_PER: Duration = Duration::from_secs(3650 * 86_400);

/// The limits of a provider or a pool, under `prefix` (`providers[2].limits`, `quotas[0].limits`):
/// one rule for both, since a pool's limits are held exactly like a provider's own.
fn validate_limits(limits: &[LimitConfig], prefix: &str) -> Result<(), (String, String)> {
    for (j, limit) in limits.iter().enumerate() {
        let key = format!("{prefix}[{j}]");
        match (limit.requests, limit.tokens) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(problem(key, "needs exactly one of `requests` or `tokens`"));
            }
            (Some(0), _) | (_, Some(0)) => {
                return Err(problem(
                    key,
                    "a limit of 0 would never allow a call; remove the provider from its chains instead",
                ));
            }
            _ => {}
        }
        if limit.per < Duration::from_millis(100) {
            return Err(problem(format!("{key}.per"), "must be at least 100ms"));
        }
        // The database computes when a call leaves (now + per): beyond its range every
        // admission would fail, and the provider would never be called.
        if limit.per > LONGEST_PER {
            return Err(problem(format!("{key}.per"), "must be at most 3650d (ten years)"));
        }
        if limit.resets.is_some() && limit.per != Duration::from_secs(86_400) {
            return Err(problem(format!("{key}.resets"), "a calendar reset needs `per = \"1d\"`"));
        }
    }
    Ok(())
}

/// `[[quotas]]` and the providers' `quotas`: pool names unique and non-empty, every pool's limits
/// valid, every name a provider draws from declared, and every pool drawn from by someone (an
/// unused pool is almost always a typo in a provider's `quotas`).
fn validate_pools(pools: &[QuotaPoolConfig], providers: &[ProviderConfig]) -> Result<(), (String, String)> {
    let mut names = BTreeSet::new();
    for (i, pool) in pools.iter().enumerate() {
        if !is_storable_name(&pool.name) {
            return Err(problem(
                format!("quotas[{i}].name"),
                "must be 1 to 100 characters, none of them a control character",
            ));
        }
        if !names.insert(pool.name.as_str()) {
            return Err(problem(format!("quotas[{i}].name"), format!("`{}` is declared twice", pool.name)));
        }
        // A pool without limits is allowed: it only says which providers share an account, so
        // that a 429 the provider scopes to the account cools them all.
        validate_limits(&pool.limits, &format!("quotas[{i}].limits"))?;
    }
    let mut used = BTreeSet::new();
    for (i, provider) in providers.iter().enumerate() {
        for (j, name) in provider.quotas.iter().enumerate() {
            let key = format!("providers[{i}].quotas[{j}]");
            if !names.contains(name.as_str()) {
                return Err(problem(key, format!("`{name}` is not a declared `[[quotas]]` pool")));
            }
            if provider.quotas[..j].contains(name) {
                return Err(problem(key, format!("`{name}` is listed twice")));
            }
            used.insert(name.as_str());
        }
    }
    if let Some((i, pool)) = pools.iter().enumerate().find(|(_, p)| !used.contains(p.name.as_str())) {
        return Err(problem(
            format!("quotas[{i}].name"),
            format!("`{}` is not in any provider's `quotas`: nothing draws from it", pool.name),
        ));
    }
    Ok(())
}

fn validate_url(url: &str, schemes: &[&str], key: &str) -> Result<(), (String, String)> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) && url.len() > s.len() + 3 => Ok(()),
        _ => Err(problem(key, format!("`{}` is not a URL of scheme {}", redact_url(url), schemes.join(" or ")))),
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Anthropic => "anthropic",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[providers]]
name = "groq"
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ_API_KEY"
model = "llama-3.3-70b-versatile"
free = true
limits = [{ requests = 30, per = "1m" }, { tokens = 6000, per = "1m" }]

[chains.default]
providers = ["groq"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &EnvOverrides::default())
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.amqp.jobs_queue, "llm.jobs");
        assert_eq!(config.amqp.results_queue, "llm.results");
        assert_eq!(config.amqp.prefetch, 32);
        assert_eq!(config.amqp.max_message_bytes, 1_048_576);
        assert_eq!(config.amqp.dead_letter_queue(), "llm.jobs.dead");
        assert_eq!(config.http.addr, "0.0.0.0:9090");
        let groq = config.provider("groq").unwrap();
        assert_eq!(groq.kind, ProviderKind::Openai);
        assert_eq!(groq.max_retries, 1);
        assert_eq!(groq.limits[0].per, Duration::from_secs(60));
        let chain = &config.chains["default"];
        assert_eq!(chain.max_wait, Duration::from_secs(600));
        assert_eq!(chain.free_wait, Duration::ZERO);
        assert_eq!(chain.accept, Accept::default(), "the contract's checks are on by default");
        assert!(chain.accept.content && chain.accept.finish && chain.accept.json);
    }

    #[test]
    fn a_chains_accept_is_read_and_a_bad_one_names_its_key() {
        use crate::chain::checks::OnAllRejected;
        let text = MINIMAL.replace(
            r#"providers = ["groq"]"#,
            "providers = [\"groq\"]\naccept = { json = false, min_chars = 12, on_all_rejected = \"best\" }",
        );
        let accept = parse(&text).unwrap().chains["default"].accept;
        assert_eq!(
            accept,
            Accept { json: false, min_chars: 12, on_all_rejected: OnAllRejected::Best, ..Accept::default() }
        );
        for (bad, key) in [
            ("accept = { jsno = false }", "chains.default.accept.jsno"),
            ("accept = { on_all_rejected = \"worst\" }", "chains.default.accept.on_all_rejected"),
            ("accept = { min_chars = -3 }", "chains.default.accept.min_chars"),
            ("accept = [false]", "chains.default.accept"),
        ] {
            let text = MINIMAL.replace(r#"providers = ["groq"]"#, &format!("providers = [\"groq\"]\n{bad}"));
            let err = parse(&text).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }

    #[test]
    fn durations_and_sizes_that_cannot_work_name_their_key() {
        for (extra, key) in [
            ("[amqp]\nconfirm_timeout = \"0s\"\n", "amqp.confirm_timeout"),
            ("[amqp]\nconfirm_timeout = \"500ms\"\n", "amqp.confirm_timeout"),
            ("[worker]\nresult_retention = \"0s\"\n", "worker.result_retention"),
        ] {
            let err = parse(&format!("{extra}{MINIMAL}")).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
        let err = parse(&MINIMAL.replace("free = true", "free = true\ncontext_window = 0")).unwrap_err();
        assert_eq!(err.key, "providers[0].context_window", "{err}");
        let fine = "[amqp]\nconfirm_timeout = \"1s\"\n[worker]\nresult_retention = \"1d 10m\"\n";
        assert!(parse(&format!("{fine}{MINIMAL}")).is_ok());
    }

    #[test]
    fn unknown_provider_in_chain_names_the_key() {
        let text = MINIMAL.replace(r#"providers = ["groq"]"#, r#"providers = ["groq", "nope"]"#);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.file, "test.toml");
        assert_eq!(err.key, "chains.default.providers");
        assert!(err.problem.contains("`nope`"), "{err}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let text = MINIMAL.replace(r#"per = "1m" }, { tokens"#, r#"per = "soon" }, { tokens"#);
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "providers[0].limits[0].per");
        assert!(err.problem.contains("soon") && err.problem.contains("line 8"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = parse(&format!("{MINIMAL}\n[amqp]\nprefetsh = 3\n")).unwrap_err();
        assert_eq!(err.key, "amqp.prefetsh");
        assert!(err.problem.contains("unknown field"), "{err}");
    }

    #[test]
    fn missing_default_chain_is_refused() {
        let err = parse(&MINIMAL.replace("[chains.default]", "[chains.other]")).unwrap_err();
        assert_eq!(err.key, "chains.default");
    }

    #[test]
    fn limit_needs_exactly_one_measure() {
        let text = MINIMAL.replace("{ requests = 30, per", "{ requests = 30, tokens = 5, per");
        assert_eq!(parse(&text).unwrap_err().key, "providers[0].limits[0]");
    }

    #[test]
    fn duplicate_provider_names_are_refused() {
        let dup = MINIMAL.replace(
            "[chains.default]",
            "[[providers]]\nname = \"groq\"\nbase_url = \"http://x\"\nmodel = \"m\"\n[chains.default]",
        );
        assert_eq!(parse(&dup).unwrap_err().key, "providers[1].name");
    }

    #[test]
    fn provider_and_pool_names_with_control_characters_are_refused() {
        let nul = MINIMAL.replacen("name = \"groq\"", "name = \"gr\\u0000oq\"", 1);
        let err = parse(&nul).unwrap_err();
        assert_eq!((err.file.as_str(), err.key.as_str()), ("test.toml", "providers[0].name"), "{err}");
        assert!(err.problem.contains("control character"), "{err}");
        let pooled = MINIMAL.replace("[chains.default]", "[[quotas]]\nname = \"acc\\tount\"\n[chains.default]");
        assert_eq!(parse(&pooled).unwrap_err().key, "quotas[0].name");
    }

    #[test]
    fn env_overrides_win_and_passwords_never_print() {
        let env = EnvOverrides {
            amqp_url: Some("amqp://u:s3cret@broker:5672/%2f".into()),
            database_url: Some("ftp://u:hunter2@db/x".into()),
            http_addr: None,
        };
        let err = Config::parse(MINIMAL, Path::new("f.toml"), &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment: DATABASE_URL (overrides postgres.url in f.toml): `ftp://u:***@db/x` is not a URL of scheme postgres or postgresql"
        );
        // The file's own values are still the file's.
        let file_err = Config::parse(
            &format!("[http]\naddr = \"nowhere\"\n{MINIMAL}"),
            Path::new("f.toml"),
            &EnvOverrides { database_url: None, ..env.clone() },
        );
        assert!(file_err.is_err_and(|e| e.file == "f.toml" && e.key == "http.addr"));
        let env = EnvOverrides { database_url: Some("postgres://u:pw@db/x".into()), ..env };
        let config = Config::parse(MINIMAL, Path::new("f.toml"), &env).unwrap();
        assert_eq!(config.amqp.url.as_slice(), ["amqp://u:s3cret@broker:5672/%2f"]);
        assert_eq!(config.postgres.url, "postgres://u:pw@db/x");
    }

    #[test]
    fn results_queue_inside_jobs_namespace_is_refused() {
        let text = format!("[amqp]\njobs_queue = \"q\"\nresults_queue = \"q.results\"\n{MINIMAL}");
        assert_eq!(parse(&text).unwrap_err().key, "amqp.results_queue");
    }

    #[test]
    fn supports_narrows_what_a_provider_carries_and_names_a_bad_entry() {
        let config = parse(&MINIMAL.replace("free = true", "free = true\nsupports = [\"tools\", \"images\"]")).unwrap();
        assert_eq!(config.provider("groq").unwrap().supports, Some(vec![Capability::Tools, Capability::Images]));
        assert_eq!(parse(MINIMAL).unwrap().provider("groq").unwrap().supports, None, "absent: the kind decides");
        let none = parse(&MINIMAL.replace("free = true", "free = true\nsupports = []")).unwrap();
        assert_eq!(none.provider("groq").unwrap().supports, Some(vec![]));
        let err =
            parse(&MINIMAL.replace("free = true", "free = true\nsupports = [\"tools\", \"vision\"]")).unwrap_err();
        assert_eq!(err.key, "providers[0].supports[1]");
        assert!(err.problem.contains("vision") && err.problem.contains("json_schema"), "{err}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../fallback.example.toml");
        let config = parse(text).unwrap();
        assert!(config.providers.iter().any(|p| !p.free), "the example has a paid safety net");
    }

    #[test]
    fn amqp_url_takes_one_url_or_a_list_of_nodes() {
        let one = parse(MINIMAL).unwrap();
        assert_eq!(one.amqp.url.as_slice(), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        assert_eq!(one.amqp.queue_type, QueueType::Classic, "classic unless asked");
        let array = parse(&format!(
            "[amqp]\nurl = [\"amqp://u:p@n1:5672/%2f\", \" amqp://u:p@n2:5672/%2f \"]\nqueue_type = \"quorum\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(array.amqp.url.as_slice(), ["amqp://u:p@n1:5672/%2f", "amqp://u:p@n2:5672/%2f"]);
        assert_eq!(array.amqp.url.first(), "amqp://u:p@n1:5672/%2f");
        assert_eq!(array.amqp.queue_type, QueueType::Quorum);
        let string_list = parse(&format!("[amqp]\nurl = \"amqp://n1, amqps://n2\"\n{MINIMAL}")).unwrap();
        assert_eq!(string_list.amqp.url.as_slice(), ["amqp://n1", "amqps://n2"]);
    }

    #[test]
    fn amqp_url_env_is_a_comma_separated_list() {
        let env = EnvOverrides {
            amqp_url: Some("amqp://u:pw@n1:5681/%2f,amqp://u:pw@n2:5682/%2f, amqp://u:pw@n3:5683/%2f,".into()),
            ..Default::default()
        };
        let config = Config::parse(MINIMAL, Path::new("f.toml"), &env).unwrap();
        assert_eq!(
            config.amqp.url.as_slice(),
            ["amqp://u:pw@n1:5681/%2f", "amqp://u:pw@n2:5682/%2f", "amqp://u:pw@n3:5683/%2f"],
            "trimmed, a trailing comma ignored"
        );
    }

    #[test]
    fn a_comma_that_starts_no_url_stays_in_its_url() {
        let urls = BrokerUrls::parse_list("amqp://u:pa,ss@n1/%2f?x=1,2,amqp://n2").unwrap();
        assert_eq!(urls.as_slice(), ["amqp://u:pa,ss@n1/%2f?x=1,2", "amqp://n2"]);
        assert_eq!(BrokerUrls::parse_list(" , ,"), None);
        assert_eq!(BrokerUrls::parse_list("amqp://one").unwrap().len(), 1);
    }

    #[test]
    fn bad_node_lists_name_the_entry_and_never_print_a_password() {
        let err = parse(&format!("[amqp]\nurl = []\n{MINIMAL}")).unwrap_err();
        assert_eq!((err.key.as_str(), err.problem.as_str()), ("amqp.url", "needs at least one URL"));
        let bad = parse(&format!("[amqp]\nurl = [\"amqp://u:s3cret@n1/\", \"http://u:s3cret@n2/\"]\n{MINIMAL}"));
        let err = bad.unwrap_err();
        assert_eq!(err.key, "amqp.url[1]");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let twice = parse(&format!("[amqp]\nurl = [\"amqp://u:s3cret@n1/\", \"amqp://u:s3cret@n1/\"]\n{MINIMAL}"));
        let err = twice.unwrap_err();
        assert_eq!(err.key, "amqp.url[1]");
        assert!(err.problem.contains("twice") && !err.to_string().contains("s3cret"), "{err}");
        let blank_env = EnvOverrides { amqp_url: Some(" ".into()), ..Default::default() };
        let blank = Config::parse(MINIMAL, Path::new("f.toml"), &blank_env).unwrap_err();
        assert_eq!(
            (blank.file.as_str(), blank.key.as_str()),
            ("environment", "AMQP_URL (overrides amqp.url in f.toml)")
        );
        let not_a_url = parse(&format!("[amqp]\nurl = 5\n{MINIMAL}")).unwrap_err();
        assert_eq!(not_a_url.key, "amqp.url");
        let debug = format!("{:?}", BrokerUrls::parse_list("amqp://u:s3cret@n1/,amqp://u:s3cret@n2/").unwrap());
        assert!(!debug.contains("s3cret") && debug.contains("n2"), "{debug}");
    }

    const POOLED: &str = r#"
[[providers]]
name = "a"
base_url = "https://openrouter.ai/api/v1"
model = "m1:free"
free = true
quotas = ["account"]

[[providers]]
name = "b"
base_url = "https://openrouter.ai/api/v1"
model = "m2:free"
free = true
quotas = ["account"]

[[quotas]]
name = "account"
limits = [{ requests = 20, per = "1m" }, { requests = 50, per = "1d", resets = "00:00 UTC" }]

[chains.default]
providers = ["a", "b"]
"#;

    #[test]
    fn pools_are_parsed_and_resolved_for_each_provider() {
        let config = parse(POOLED).unwrap();
        let a = config.provider("a").unwrap();
        let pools = config.pools_of(a);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "account");
        assert_eq!(pools[0].limits[1].resets.as_ref().map(|r| r.to_string()).as_deref(), Some("00:00 UTC"));
    }

    #[test]
    fn bad_pools_name_the_file_and_key() {
        let cases = [
            (
                POOLED.replace(
                    r#"quotas = ["account"]
"#,
                    "quotas = [\"acount\"]\n",
                ),
                "providers[0].quotas[0]",
                "acount",
            ),
            (POOLED.replace(r#"name = "account""#, r#"name = """#), "quotas[0].name", "1 to 100"),
            (POOLED.replace("quotas = [\"account\"]\n", ""), "quotas[0].name", "nothing draws"),
            (
                format!("{POOLED}\n[[quotas]]\nname = \"account\"\nlimits = [{{ requests = 1, per = \"1m\" }}]\n"),
                "quotas[1].name",
                "twice",
            ),
            (
                POOLED.replace("{ requests = 20, per", "{ requests = 20, tokens = 5, per"),
                "quotas[0].limits[0]",
                "exactly one",
            ),
            (POOLED.replace(r#"per = "1d", resets"#, r#"per = "2d", resets"#), "quotas[0].limits[1].resets", "1d"),
            (POOLED.replace(r#"per = "1m" }, {"#, r#"per = "10ms" }, {"#), "quotas[0].limits[0].per", "100ms"),
            (POOLED.replace(r#"per = "1m" }, {"#, r#"per = "1000000y" }, {"#), "quotas[0].limits[0].per", "3650d"),
            (POOLED.replace(r#"per = "1m" }, {"#, r#"per = "3651d" }, {"#), "quotas[0].limits[0].per", "3650d"),
            (
                POOLED.replacen(r#"quotas = ["account"]"#, r#"quotas = ["account", "account"]"#, 1),
                "providers[0].quotas[1]",
                "twice",
            ),
        ];
        for (text, key, words) in cases {
            let err = parse(&text).unwrap_err();
            assert_eq!(err.file, "test.toml");
            assert_eq!(err.key, key, "{err}");
            assert!(err.problem.contains(words), "{err}");
        }
    }

    #[test]
    fn an_unknown_queue_type_is_refused() {
        let err = parse(&format!("[amqp]\nqueue_type = \"stream\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.key, "amqp.queue_type");
        assert!(err.problem.contains("classic") && err.problem.contains("quorum"), "{err}");
    }
}
