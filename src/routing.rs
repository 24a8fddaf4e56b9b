//! Leaf types every layer shares: what happened to one provider for one job ([`Attempt`],
//! [`AttemptOutcome`], contract §3) and why a provider is cooling down ([`CooldownReason`], §6).
//!
//! They sit below `chain`, `job`, `state` and `broker` so that none of those needs another just
//! for a name.

use serde::{Deserialize, Serialize};

/// What happened when the chain considered one provider for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Ok,
    RateLimited,
    Timeout,
    ConnectError,
    ServerError,
    AuthError,
    ClientError,
    /// The provider's model is gone (404 model not found, 400 decommissioned, 410 deprecated).
    ModelUnavailable,
    /// An answer arrived but failed the job's checks (contract §7); `message` says which.
    RejectedOutput,
    SkippedCooldown,
    SkippedQuota,
    SkippedContext,
    /// The provider's API or its configured `supports` cannot carry what the job needs (tools,
    /// a JSON schema, images…): passed over before any request or quota is spent on it.
    SkippedCapability,
    SkippedPaid,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::ConnectError => "connect_error",
            Self::ServerError => "server_error",
            Self::AuthError => "auth_error",
            Self::ClientError => "client_error",
            Self::ModelUnavailable => "model_unavailable",
            Self::RejectedOutput => "rejected_output",
            Self::SkippedCooldown => "skipped_cooldown",
            Self::SkippedQuota => "skipped_quota",
            Self::SkippedContext => "skipped_context",
            Self::SkippedCapability => "skipped_capability",
            Self::SkippedPaid => "skipped_paid",
        }
    }

    /// The outcomes after which retrying this job on this provider cannot help (the request
    /// itself is the problem, or the provider's answer to it failed the job's checks), so the
    /// provider is dropped from the job's chain. A rejected answer must not make the job wait
    /// for the same provider to answer the same way again.
    pub fn is_final_for_job(self) -> bool {
        matches!(self, Self::ClientError | Self::SkippedContext | Self::RejectedOutput | Self::SkippedCapability)
    }
}

/// One line of `routing.attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub provider: String,
    pub outcome: AttemptOutcome,
    /// The HTTP status, when a response arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// For skips and cooling failures: until when the provider is unusable (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// A short, secret-free description of the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why a provider is cooling down; shown by `status` and stored with the cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CooldownReason {
    /// A 429 (or 529): until the provider's retry time.
    RateLimited,
    /// A 429 (or 529) that gave no retry time: 60 s, our estimate. It holds the provider as
    /// long all the same, but never fails a job before its `max_wait` (contract §6: only a time
    /// the provider gave may), and the provider's own time, when a later 429 gives one (still
    /// to come), replaces it even if sooner. A worker of an older version reads it as `Unrecognized`:
    /// also an estimate.
    RateLimitedEstimate,
    /// A per-day quota is spent: until its reset.
    QuotaDay,
    /// A per-day quota is spent and the provider gave no reset: until the next UTC midnight,
    /// our guess. An estimate, as [`RateLimitedEstimate`](Self::RateLimitedEstimate) is; the
    /// provider's own daily reset, when a later 429 gives one, replaces it.
    QuotaDayEstimate,
    /// Timeout or connection failure: 30 s.
    Unreachable,
    /// 401/403: the key is bad, 1 h.
    Auth,
    /// Out of credits (402, low balance): 1 h, or the provider's reset.
    Credits,
    /// A run of 5xx opened the circuit.
    Circuit,
    /// The configured model is withdrawn: 1 h, until an operator fixes the config.
    ModelUnavailable,
    /// A cooldown in the shared table whose reason this worker does not know (set by hand, or
    /// by a newer version in a rolling upgrade): held until its time all the same, as an
    /// estimate, never a reason to fail a job early.
    Unrecognized,
}

impl CooldownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::RateLimitedEstimate => "rate_limited_estimate",
            Self::QuotaDay => "quota_day",
            Self::QuotaDayEstimate => "quota_day_estimate",
            Self::Unreachable => "unreachable",
            Self::Auth => "auth",
            Self::Credits => "credits",
            Self::Circuit => "circuit",
            Self::ModelUnavailable => "model_unavailable",
            Self::Unrecognized => "unrecognized",
        }
    }

    /// Whether a cooldown's end is the provider's own word (a 429's retry time, a daily reset),
    /// rather than our estimate of when it may work again (a 429 that gave no time, an open
    /// circuit, an unreachable host, a bad key an operator may fix). Only the provider's word
    /// may fail a job before its `max_wait` (contract §6); an estimate makes the job wait.
    pub fn is_providers_word(self) -> bool {
        matches!(self, Self::RateLimited | Self::QuotaDay)
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::RateLimited,
            Self::RateLimitedEstimate,
            Self::QuotaDay,
            Self::QuotaDayEstimate,
            Self::Unreachable,
            Self::Auth,
            Self::Credits,
            Self::Circuit,
            Self::ModelUnavailable,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// What a limit counts: calls or tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QuotaMeasure {
    Requests,
    Tokens,
}

/// Whom a provider's 429 is about (contract §6): this model alone, or the whole account (every
/// provider that draws from the same `[[quotas]]` pool), e.g. OpenRouter's
/// `free-models-per-day` or a Gemini project quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitScope {
    #[default]
    Model,
    Account,
}

/// What a provider's rate-limit headers said about one of its budgets on an answer
/// (`x-ratelimit-remaining-*` and `-reset-*`, Anthropic's and Gemini's equivalents): the shared
/// view of the matching limit is corrected from it (contract §6), never beyond what the config
/// declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaObservation {
    pub measure: QuotaMeasure,
    /// What the provider says is left.
    pub remaining: u64,
    /// The size of the budget, when the provider said it.
    pub limit: Option<u64>,
    /// When the provider says the budget is whole again, when it said.
    pub resets_at: Option<std::time::SystemTime>,
    /// The window the provider named (`-day`, `-minute` suffixes), when it named one.
    pub window: Option<std::time::Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_skip_is_named_as_the_contract_says_and_ends_the_provider_for_the_job() {
        let outcome = AttemptOutcome::SkippedCapability;
        assert_eq!(serde_json::to_string(&outcome).unwrap(), "\"skipped_capability\"");
        assert_eq!(serde_json::from_str::<AttemptOutcome>("\"skipped_capability\"").unwrap(), outcome);
        assert_eq!(outcome.as_str(), "skipped_capability");
        // A parked job resumed from its attempt list must not try the provider again.
        assert!(outcome.is_final_for_job());
    }
}
