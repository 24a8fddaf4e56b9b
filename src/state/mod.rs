//! Shared provider state and the result ledger, behind traits the chain and the worker use.
//!
//! [`postgres::PgStore`] is the production store shared by every worker (contract §6);
//! [`memory::MemoryStore`] is the embedded one for `batch` without a database and for unit tests.

pub mod memory;
pub mod postgres;

use std::time::SystemTime;

use crate::chain::CooldownReason;

/// A provider that must not be called before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    pub until: SystemTime,
    pub reason: CooldownReason,
    /// The provider's own words (secret-free), for `status` and the attempt list.
    pub detail: String,
}

/// The answer to "may I call this provider now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Call it.
    Granted,
    /// It is cooling down (a 429, a bad key, an open circuit…) until the given time.
    Cooling(Cooldown),
}

/// Provider state every worker sees the same way.
///
/// Methods do not fail: a store that cannot reach its database falls back to what this process
/// last knew (and logs it), because a worker must keep answering jobs through a database restart.
#[async_trait::async_trait]
pub trait ProviderState: Send + Sync {
    /// Whether `provider` may be called now. Reads the shared truth, so a cooldown set by another
    /// worker a moment ago is seen before this worker's next call.
    async fn admit(&self, provider: &str, now: SystemTime) -> Admission;

    /// Cools `provider` down until `cooldown.until` for every worker. A cooldown only moves
    /// forward: an earlier `until` than the one stored changes nothing.
    async fn cool_down(&self, provider: &str, cooldown: Cooldown);

    /// A call succeeded: closes the 5xx circuit.
    async fn record_success(&self, provider: &str);

    /// A call failed with a 5xx: returns how many 5xx in a row all workers have now seen.
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32;
}

/// What the ledger knows of a job when a delivery of it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// How many times this job has been received, this delivery included.
    pub deliveries: u32,
    /// The stored result (a JSON text), when the job was answered before.
    pub result: Option<String>,
}

/// The idempotency ledger (contract §4): results by job key.
#[async_trait::async_trait]
pub trait ResultLedger: Send + Sync {
    /// Records one more receipt of `key` and returns what is known of it.
    async fn open(&self, key: &str) -> Result<LedgerEntry, StoreError>;

    /// Stores the job's result so a redelivery is answered without a provider call.
    async fn store(&self, key: &str, result_json: &str) -> Result<(), StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}
