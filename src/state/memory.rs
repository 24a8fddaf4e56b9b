//! The embedded store: the same rules as Postgres, for one process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::quota::{self, Blocked, Scope, Usage};
use super::{
    Admission, Ask, Cooldown, LedgerEntry, Permit, ProbeClaim, ProviderState, Receipt, ResultLedger, StoreError,
};
use crate::chain::CIRCUIT_THRESHOLD;
use crate::chain::clock::later;
use crate::config::LimitConfig;
use crate::routing::CooldownReason;
use crate::routing::QuotaObservation;

#[derive(Default)]
pub struct MemoryStore {
    providers: Mutex<HashMap<String, ProviderRow>>,
    /// The use of every shared pool (`[[quotas]]`) by name: one scope however many providers
    /// draw from it. Locked after `providers`, never before.
    pools: Mutex<HashMap<String, Scope>>,
    next_usage_id: std::sync::atomic::AtomicI64,
    ledger: Mutex<HashMap<String, LedgerRow>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Rejected answers by (provider, reason), for tests and the embedded `batch` run.
    rejected_outputs: Mutex<HashMap<(String, String), u64>>,
}

/// One job key: the job it belongs to, its receipts and its result.
#[derive(Default)]
struct LedgerRow {
    fingerprint: String,
    deliveries: u32,
    result: Option<String>,
}

#[derive(Default, Clone)]
struct ProviderRow {
    cooldown: Option<Cooldown>,
    consecutive_server_errors: u32,
    /// A half-open probe of the circuit is in flight: its 5xx counts, stale ones do not.
    probing: bool,
    /// The use of the provider's own limits.
    quota: Scope,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the answer to a granted call at `now` (its window then counts it until `now`
    /// plus the window): [`ProviderState::finish`].
    pub fn finish_at(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        let Some(id) = permit.usage_id else { return };
        let mut providers = self.providers.lock().unwrap();
        let mut pools = self.pools.lock().unwrap();
        let own = providers.values_mut().map(|row| &mut row.quota);
        // The same call is recorded once in its provider's scope and once in each pool's.
        for usage in own.chain(pools.values_mut()).filter_map(|scope| scope.usage_mut(id)) {
            usage.done = Some(now);
            if let Some(tokens) = tokens {
                usage.tokens = tokens;
            }
        }
    }

    /// Forgets the call recorded under `id`, in its provider's scope and its pools': it was
    /// never sent.
    pub fn forget(&self, id: i64) {
        let mut providers = self.providers.lock().unwrap();
        let mut pools = self.pools.lock().unwrap();
        let own = providers.values_mut().map(|row| &mut row.quota);
        for scope in own.chain(pools.values_mut()) {
            scope.forget(id);
        }
    }

    /// Records a call another store admitted, without checking any limit (the Postgres store's
    /// own account of its calls), in the provider's scope and its pools'; returns the record's
    /// id. Calls no window of theirs can see any more are forgotten.
    pub fn record_call(&self, ask: Ask<'_>, now: SystemTime) -> i64 {
        let mut providers = self.providers.lock().unwrap();
        // Drawn under the lock: every scope holds its calls in the order of their ids.
        let id = self.next_usage_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let usage = Usage { id, done: None, expires: now.checked_add(ask.flight).unwrap_or(now), tokens: ask.tokens };
        let row = providers.entry(ask.provider.to_string()).or_default();
        quota::prune_lately(&mut row.quota, keep_own(ask), now);
        row.quota.usage.push(usage.clone());
        let mut pools = self.pools.lock().unwrap();
        for pool in ask.pools {
            let scope = pools.entry(pool.name.clone()).or_default();
            quota::prune_lately(scope, quota::keep_for(&pool.limits), now);
            scope.usage.push(usage.clone());
        }
        id
    }

    /// The calls recorded under `ids`, by provider (for writing them back to the shared store).
    pub fn calls(&self, ids: &[i64]) -> Vec<(String, Usage)> {
        let providers = self.providers.lock().unwrap();
        providers
            .iter()
            .flat_map(|(name, row)| ids.iter().filter_map(|id| row.quota.usage(*id)).map(|u| (name.clone(), u.clone())))
            .collect()
    }

    /// What `limit` of `pool` holds now (real calls and learnt use), for inspection.
    pub fn pool_used(&self, pool: &str, limit: &LimitConfig, now: SystemTime) -> u64 {
        self.pools.lock().unwrap().get(pool).map_or(0, |scope| quota::used(scope, limit, now))
    }

    /// What `limit` of `provider`'s own holds now, for inspection.
    pub fn provider_used(&self, provider: &str, limit: &LimitConfig, now: SystemTime) -> u64 {
        self.providers.lock().unwrap().get(provider).map_or(0, |row| quota::used(&row.quota, limit, now))
    }

    /// How many answers of `provider` were rejected for `reason`.
    pub fn rejected_outputs(&self, provider: &str, reason: &str) -> u64 {
        let counts = self.rejected_outputs.lock().unwrap();
        counts.get(&(provider.to_string(), reason.to_string())).copied().unwrap_or(0)
    }

    /// The stored cooldown of `provider` (expired or not), for inspection.
    pub fn cooldown_of(&self, provider: &str) -> Option<Cooldown> {
        self.providers.lock().unwrap().get(provider)?.cooldown.clone()
    }
}

/// How long a provider's own record of a call is kept: for its longest window, its pools'
/// included, because the Postgres store writes an outage's calls back from that record (a
/// provider with pools only would otherwise forget them at once).
fn keep_own(ask: Ask<'_>) -> Duration {
    quota::keep_for(ask.limits.iter().chain(ask.pools.iter().flat_map(|p| p.limits.iter())))
}

#[async_trait::async_trait]
impl ProviderState for MemoryStore {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        let mut providers = self.providers.lock().unwrap();
        let row = providers.entry(ask.provider.to_string()).or_default();
        if let Some(cooldown) = row.cooldown.clone().filter(|c| c.until > now) {
            return Admission::Cooling(cooldown);
        }
        if ask.limits.is_empty() && ask.pools.is_empty() {
            return Admission::Granted(Permit::UNCOUNTED);
        }
        quota::prune(&mut row.quota, keep_own(ask), now);
        let mut blocked = quota::check(&row.quota, ask.limits, ask.tokens, now).err();
        let mut pools = self.pools.lock().unwrap();
        for pool in ask.pools {
            let scope = pools.entry(pool.name.clone()).or_default();
            quota::prune(scope, quota::keep_for(&pool.limits), now);
            if let Err(b) = quota::check(scope, &pool.limits, ask.tokens, now) {
                blocked = Some(blocked.map_or(b, |a| a.and(b)));
            }
        }
        match blocked {
            None => {
                let id = self.next_usage_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let expires = now.checked_add(ask.flight).unwrap_or(now);
                let usage = Usage { id, done: None, expires, tokens: ask.tokens };
                for pool in ask.pools {
                    pools.entry(pool.name.clone()).or_default().usage.push(usage.clone());
                }
                row.quota.usage.push(usage);
                Admission::Granted(Permit { usage_id: Some(id), ..Permit::UNCOUNTED })
            }
            Some(Blocked::Until(until, measure)) => Admission::OverQuota { until, measure },
            Some(Blocked::TooLarge) => Admission::TooLarge,
        }
    }

    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.finish_at(permit, tokens, now);
    }

    async fn release(&self, permit: Permit) {
        // Counted as an answered call: an observation may have counted it as sent meanwhile
        // (`quota::observe` takes every call up to the observed one for the provider's), and
        // forgetting it then would leave the window below the provider (review of the release,
        // round 2). The memory store keeps no learnt use a later figure could take back for it.
        self.finish_at(permit, None, SystemTime::now());
    }

    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        let mut providers = self.providers.lock().unwrap();
        let row = providers.entry(provider.to_string()).or_default();
        if row.cooldown.as_ref().is_none_or(|current| cooldown.replaces(current, None)) {
            row.cooldown = Some(cooldown);
        }
    }

    async fn record_success(&self, provider: &str) {
        if let Some(row) = self.providers.lock().unwrap().get_mut(provider) {
            row.consecutive_server_errors = 0;
            row.probing = false;
            if row.cooldown.as_ref().is_some_and(|c| c.reason == CooldownReason::Circuit) {
                row.cooldown = None;
            }
        }
    }

    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        let mut providers = self.providers.lock().unwrap();
        let Some(row) = providers.get_mut(provider) else { return ProbeClaim::Call };
        let Some(circuit) = row.cooldown.as_mut().filter(|c| c.reason == CooldownReason::Circuit) else {
            return ProbeClaim::Call;
        };
        if circuit.until > now {
            return ProbeClaim::Held(circuit.clone());
        }
        circuit.until = later(now, hold_for);
        row.probing = true;
        ProbeClaim::Call
    }

    async fn record_server_error(&self, provider: &str, _detail: &str) -> u32 {
        let mut providers = self.providers.lock().unwrap();
        let row = providers.entry(provider.to_string()).or_default();
        if row.consecutive_server_errors < CIRCUIT_THRESHOLD || row.probing {
            row.consecutive_server_errors = row.consecutive_server_errors.saturating_add(1);
        }
        row.probing = false;
        row.consecutive_server_errors
    }

    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        let mut counts = self.rejected_outputs.lock().unwrap();
        let count = counts.entry((provider.to_string(), reason.to_string())).or_default();
        *count = count.saturating_add(1);
    }

    async fn observe_quota(&self, ask: Ask<'_>, observed: &Permit, seen: &[QuotaObservation], now: SystemTime) {
        let mut providers = self.providers.lock().unwrap();
        let mut pools = self.pools.lock().unwrap();
        for observation in seen.iter().filter(|o| quota::current(o, now)) {
            let seen = quota::Seen {
                remaining: observation.remaining,
                resets_at: observation.resets_at,
                call: observed.usage_id,
            };
            for (pool, limit) in quota::matching(&ask, observation) {
                let scope = match pool {
                    Some(name) => pools.entry(name.to_string()).or_default(),
                    None => &mut providers.entry(ask.provider.to_string()).or_default().quota,
                };
                quota::observe(scope, limit, seen, now);
            }
        }
    }
}

#[async_trait::async_trait]
impl ResultLedger for MemoryStore {
    async fn open(&self, key: &str, fingerprint: &str, receipt: Receipt) -> Result<LedgerEntry, StoreError> {
        let mut ledger = self.ledger.lock().unwrap();
        let Some(row) = ledger.get_mut(key) else {
            let deliveries = receipt.first_count();
            let row = LedgerRow { fingerprint: fingerprint.to_string(), deliveries, result: None };
            ledger.insert(key.to_string(), row);
            return Ok(LedgerEntry { deliveries, result: None, other_job: false });
        };
        if row.fingerprint != fingerprint {
            return Ok(LedgerEntry { deliveries: row.deliveries, result: None, other_job: true });
        }
        row.deliveries = row.deliveries.saturating_add(receipt.later_count());
        Ok(LedgerEntry { deliveries: row.deliveries, result: row.result.clone(), other_job: false })
    }

    async fn store(&self, key: &str, fingerprint: &str, result_json: &str) -> Result<(), StoreError> {
        let mut ledger = self.ledger.lock().unwrap();
        let row = ledger.entry(key.to_string()).or_insert_with(|| LedgerRow {
            fingerprint: fingerprint.to_string(),
            deliveries: 1,
            result: None,
        });
        if row.fingerprint == fingerprint {
            row.result = Some(result_json.to_string());
        }
        Ok(())
    }

    async fn record_failure(&self, key: &str, _reason: &str) -> Result<u32, StoreError> {
        let mut failures = self.failures.lock().unwrap();
        let count = failures.entry(key.to_string()).or_default();
        *count = count.saturating_add(1);
        Ok(*count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cooldown(until: SystemTime) -> Cooldown {
        Cooldown { until, reason: CooldownReason::RateLimited, detail: String::new() }
    }

    /// The worker's own record forgets what no window sees within a bounded factor of what its
    /// windows hold now (review of 0899754). After a burst of 10,000 calls in a minute's window,
    /// an hour of one call a minute: pruned only when the record doubles, the burst stayed for as
    /// long as calls stayed rare (10,000 more calls: about a week at one a minute).
    #[test]
    fn a_burst_no_window_sees_any_more_is_forgotten_when_calls_become_rare() {
        let store = MemoryStore::new();
        let limits = [per_minute(1_000_000)];
        let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: Duration::from_secs(5) };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..10_000u64 {
            store.record_call(ask, t0 + Duration::from_millis(i));
        }
        for k in 0..60u64 {
            store.record_call(ask, t0 + Duration::from_secs(3600 + 60 * k));
        }
        let kept = store.providers.lock().unwrap().get("p").map_or(0, |r| r.quota.usage.len());
        let seen = store.provider_used("p", &limits[0], t0 + Duration::from_secs(3600 + 60 * 59));
        assert!(seen <= 2, "{seen} in the window");
        assert!(kept <= 64 + 2 * 2, "{kept} calls kept, {seen} of them in a window");
    }

    /// The Postgres store's own account of its calls, recorded from many threads released at
    /// once into one pool: every scope keeps its calls in id order (the id is drawn under the
    /// lock; drawn outside it, this fails nearly every run), every answer finds its call by
    /// bisection (one it misses stays counted in flight until it expires), and the write-back
    /// after an outage finds each call once, under its provider.
    #[test]
    fn calls_recorded_under_contention_are_in_id_order_and_every_answer_finds_its_call() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let limits = vec![crate::config::LimitConfig {
            requests: Some(10_000_000),
            tokens: None,
            per: Duration::from_secs(600),
            resets: None,
        }];
        let pools = vec![crate::config::QuotaPoolConfig { name: "acct".into(), limits: limits.clone() }];
        let threads = 8;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (store, limits, pools, barrier) = (store.clone(), limits.clone(), pools.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let provider = if t % 2 == 0 { "p" } else { "q" };
                    let ask =
                        Ask { provider, limits: &limits, pools: &pools, tokens: 10, flight: Duration::from_secs(300) };
                    barrier.wait();
                    (0..5_000).map(|_| store.record_call(ask, SystemTime::now())).collect::<Vec<i64>>()
                })
            })
            .collect();
        let ids: Vec<i64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for id in &ids {
            rt.block_on(store.finish(Permit { usage_id: Some(*id), ..Permit::UNCOUNTED }, Some(3), SystemTime::now()));
        }
        let pool = store.pools.lock().unwrap().get("acct").cloned().unwrap_or_default();
        let unanswered = pool.usage.iter().filter(|u| u.done.is_none()).count();
        let out_of_order = pool.usage.windows(2).filter(|w| w[0].id > w[1].id).count();
        assert_eq!((out_of_order, unanswered), (0, 0), "pool: (out of order, answers that missed their call)");
        let own_in_order = store.providers.lock().unwrap().values().all(|r| r.quota.usage.is_sorted_by_key(|u| u.id));
        assert!(own_in_order, "every provider's scope in id order");
        assert_eq!(store.calls(&ids).len(), ids.len(), "each call once, under its provider");
    }

    #[tokio::test]
    async fn cooldowns_only_move_forward() {
        let store = MemoryStore::new();
        let now = SystemTime::now();
        store.cool_down("p", cooldown(now + Duration::from_secs(60))).await;
        store.cool_down("p", cooldown(now + Duration::from_secs(5))).await;
        assert_eq!(store.cooldown_of("p").unwrap().until, now + Duration::from_secs(60));
        let ask = Ask { provider: "p", limits: &[], pools: &[], tokens: 10, flight: Duration::from_secs(5) };
        assert!(matches!(store.admit(ask, now).await, Admission::Cooling(_)));
        assert_eq!(store.admit(ask, now + Duration::from_secs(61)).await, Admission::Granted(Permit::UNCOUNTED));
    }

    #[tokio::test]
    async fn limits_count_granted_calls_until_finished() {
        let store = MemoryStore::new();
        let limits = [crate::config::LimitConfig {
            requests: Some(2),
            tokens: None,
            per: Duration::from_secs(60),
            resets: None,
        }];
        let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: Duration::from_secs(5) };
        let now = SystemTime::now();
        let Admission::Granted(first) = store.admit(ask, now).await else { panic!() };
        assert!(matches!(store.admit(ask, now).await, Admission::Granted(_)));
        assert!(matches!(store.admit(ask, now).await, Admission::OverQuota { .. }));
        store.finish(first, Some(3), SystemTime::now()).await;
        assert!(
            matches!(store.admit(ask, now).await, Admission::OverQuota { .. }),
            "answered calls still count for the window"
        );
    }

    fn circuit(until: SystemTime) -> Cooldown {
        Cooldown { until, reason: CooldownReason::Circuit, detail: String::new() }
    }

    #[tokio::test]
    async fn one_caller_takes_the_probe_of_an_expired_circuit() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hold = Duration::from_secs(35);
        assert!(store.claim_probe("p", now, hold).await.is_call(), "no circuit: call");
        store.cool_down("p", circuit(now + Duration::from_secs(5))).await;
        assert!(!store.claim_probe("p", now, hold).await.is_call(), "open circuit: no call");
        let expired = now + Duration::from_secs(5);
        assert!(store.claim_probe("p", expired, hold).await.is_call(), "the first caller takes the probe");
        match store.claim_probe("p", expired, hold).await {
            ProbeClaim::Held(held) => assert_eq!(held.until, expired + hold, "the second skips it for the hold"),
            ProbeClaim::Call => panic!("the second caller may not call"),
        }
        assert_eq!(store.cooldown_of("p").unwrap().until, expired + hold, "the hold keeps others away");
        assert!(
            store.claim_probe("p", expired + hold, hold).await.is_call(),
            "a probe that never answered is taken again"
        );
    }

    #[tokio::test]
    async fn a_success_closes_the_circuit_and_a_failed_probe_reopens_it_from_now() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        store.cool_down("p", circuit(now)).await;
        assert!(store.claim_probe("p", now, Duration::from_secs(35)).await.is_call());
        // The probe fails at once: the doubled open time replaces the longer hold.
        store.cool_down("p", circuit(now + Duration::from_secs(10))).await;
        assert_eq!(store.cooldown_of("p").unwrap().until, now + Duration::from_secs(10));
        // A later probe succeeds: the circuit is closed for everyone at once.
        assert!(store.claim_probe("p", now + Duration::from_secs(10), Duration::from_secs(35)).await.is_call());
        store.record_success("p").await;
        assert_eq!(store.cooldown_of("p"), None);
        // Other cooldowns are not touched by a success.
        store.cool_down("p", cooldown(now + Duration::from_secs(60))).await;
        store.record_success("p").await;
        assert!(store.cooldown_of("p").is_some());
    }

    #[tokio::test]
    async fn late_5xx_of_calls_sent_before_the_circuit_opened_do_not_lengthen_the_run() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for expected in 1..=3 {
            assert_eq!(store.record_server_error("p", "503").await, expected);
        }
        assert_eq!(store.record_server_error("p", "503").await, 3, "even before the circuit is stored");
        store.cool_down("p", circuit(now + Duration::from_secs(5))).await;
        for _ in 0..5 {
            assert_eq!(store.record_server_error("p", "503").await, 3, "in flight before the circuit opened");
        }
        let expired = now + Duration::from_secs(5);
        assert!(store.claim_probe("p", expired, Duration::from_secs(35)).await.is_call());
        assert_eq!(store.record_server_error("p", "503").await, 4, "the failed probe counts");
        assert_eq!(store.record_server_error("p", "503").await, 4, "once");
    }

    #[tokio::test]
    async fn ledger_counts_deliveries_and_keeps_results() {
        let store = MemoryStore::new();
        assert_eq!(store.open("k", "job-a", Receipt::Fresh).await.unwrap().deliveries, 1);
        store.store("k", "job-a", "{}").await.unwrap();
        let again = store.open("k", "job-a", Receipt::Redelivered).await.unwrap();
        assert_eq!((again.deliveries, again.result.as_deref(), again.other_job), (2, Some("{}"), false));
    }

    #[tokio::test]
    async fn only_redeliveries_count_after_a_keys_first_receipt() {
        let store = MemoryStore::new();
        // Published again, or back from a park: a new message, not a failed delivery.
        for _ in 0..5 {
            assert_eq!(store.open("k", "job-a", Receipt::Fresh).await.unwrap().deliveries, 1);
        }
        assert_eq!(store.open("k", "job-a", Receipt::Redelivered).await.unwrap().deliveries, 2);
        // A redelivery whose first delivery the ledger never heard of counts both.
        assert_eq!(store.open("fresh-key", "job-b", Receipt::Redelivered).await.unwrap().deliveries, 2);
    }

    #[tokio::test]
    async fn a_key_reused_by_another_job_gets_nothing_of_the_first() {
        let store = MemoryStore::new();
        store.open("msg:1", "job-a", Receipt::Fresh).await.unwrap();
        store.store("msg:1", "job-a", "{\"a\":1}").await.unwrap();
        let other = store.open("msg:1", "job-b", Receipt::Redelivered).await.unwrap();
        assert!(other.other_job);
        assert_eq!(other.result, None);
        store.store("msg:1", "job-b", "{\"b\":1}").await.unwrap();
        let first = store.open("msg:1", "job-a", Receipt::Redelivered).await.unwrap();
        assert_eq!(
            (first.result.as_deref(), first.deliveries),
            (Some("{\"a\":1}"), 2),
            "job-b's receipt counted nothing"
        );
    }

    use crate::state::QuotaMeasure;

    fn pool(limits: Vec<crate::config::LimitConfig>) -> Vec<crate::config::QuotaPoolConfig> {
        vec![crate::config::QuotaPoolConfig { name: "account".into(), limits }]
    }

    fn per_minute(n: u64) -> crate::config::LimitConfig {
        crate::config::LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(60), resets: None }
    }

    #[tokio::test]
    async fn two_providers_drawing_from_one_pool_never_exceed_it_together() {
        let store = MemoryStore::new();
        let pools = pool(vec![per_minute(5)]);
        let own = [per_minute(4)];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ask = |provider| Ask { provider, limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
        let mut granted = 0;
        for i in 0..20 {
            let provider = if i % 2 == 0 { "a" } else { "b" };
            match store.admit(ask(provider), now).await {
                Admission::Granted(_) => granted += 1,
                Admission::OverQuota { until, .. } => assert_eq!(until, now + Duration::from_secs(60)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(granted, 5, "the pool's 5, not 4 + 4 of the providers' own limits");
        assert_eq!(store.pool_used("account", &pools[0].limits[0], now), 5);
        // A provider outside the pool is not held by it.
        assert!(matches!(
            store
                .admit(Ask { provider: "c", limits: &own, pools: &[], tokens: 1, flight: Duration::from_secs(5) }, now)
                .await,
            Admission::Granted(_)
        ));
        // Never answered: each call occupies the window until its deadline (5 s), then one more minute.
        assert!(matches!(store.admit(ask("a"), now + Duration::from_secs(64)).await, Admission::OverQuota { .. }));
        assert!(matches!(store.admit(ask("a"), now + Duration::from_secs(65)).await, Admission::Granted(_)));
    }

    #[tokio::test]
    async fn a_pool_token_limit_refuses_what_can_never_fit() {
        let store = MemoryStore::new();
        let limit = crate::config::LimitConfig {
            requests: None,
            tokens: Some(100),
            per: Duration::from_secs(60),
            resets: None,
        };
        let pools = pool(vec![limit]);
        let ask = Ask { provider: "a", limits: &[], pools: &pools, tokens: 101, flight: Duration::from_secs(5) };
        assert_eq!(store.admit(ask, SystemTime::now()).await, Admission::TooLarge);
    }

    #[tokio::test]
    async fn a_pools_calendar_day_spent_at_2330_has_room_at_midnight() {
        let store = MemoryStore::new();
        let daily = crate::config::LimitConfig {
            requests: Some(2),
            tokens: None,
            per: Duration::from_secs(86_400),
            resets: Some(crate::calendar::DailyReset::parse("00:00 UTC").unwrap()),
        };
        let pools = pool(vec![daily]);
        let at = |t: &str| humantime::parse_rfc3339(t).unwrap();
        let ask = |provider| Ask { provider, limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
        for provider in ["a", "b"] {
            let Admission::Granted(permit) = store.admit(ask(provider), at("2026-11-30T23:30:00Z")).await else {
                panic!()
            };
            // Answered at 23:30 too (by the wall clock it could be any day: a calendar day's
            // call counts until the reset after its answer).
            store.finish_at(permit, None, at("2026-11-30T23:30:00Z"));
        }
        assert_eq!(
            store.admit(ask("a"), at("2026-11-30T23:31:00Z")).await,
            Admission::OverQuota { until: at("2026-12-01T00:00:00Z"), measure: QuotaMeasure::Requests }
        );
        assert!(matches!(store.admit(ask("b"), at("2026-12-01T00:00:00Z")).await, Admission::Granted(_)));
    }

    #[tokio::test]
    async fn observations_correct_the_matching_limits_of_the_provider_and_its_pools() {
        use crate::routing::QuotaObservation;
        let store = MemoryStore::new();
        let own = [per_minute(30)];
        let daily = crate::config::LimitConfig {
            requests: Some(50),
            tokens: None,
            per: Duration::from_secs(86_400),
            resets: None,
        };
        let pools = pool(vec![per_minute(20), daily.clone()]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ask = Ask { provider: "a", limits: &own, pools: &pools, tokens: 1, flight: Duration::from_secs(5) };
        let seen = |remaining, limit, window| QuotaObservation {
            measure: QuotaMeasure::Requests,
            remaining,
            limit,
            resets_at: None,
            window,
        };
        // Named window: every declared 1d requests limit (only the pool's).
        let none = Permit::UNCOUNTED;
        store.observe_quota(ask, &none, &[seen(3, None, Some(Duration::from_secs(86_400)))], now).await;
        assert_eq!(store.pool_used("account", &daily, now), 47);
        assert_eq!(store.provider_used("a", &own[0], now), 0);
        // Stated limit equal to a declared one: the provider's own 30.
        store.observe_quota(ask, &none, &[seen(10, Some(30), None)], now).await;
        assert_eq!(store.provider_used("a", &own[0], now), 20);
        assert_eq!(store.pool_used("account", &pools[0].limits[0], now), 0);
        // Ambiguous (two per-minute, one daily request limits, no window, no size): ignored.
        store.observe_quota(ask, &none, &[seen(0, None, None)], now).await;
        assert_eq!(store.provider_used("a", &own[0], now), 20);
        // More left than we count: learnt use goes back, never below our own calls.
        let Admission::Granted(call) = store.admit(ask, now).await else { panic!("room") };
        store.observe_quota(ask, &call, &[seen(50, None, Some(Duration::from_secs(86_400)))], now).await;
        assert_eq!(store.pool_used("account", &daily, now), 1, "the one real call stays");
    }

    /// A header is the provider's count when it took the observed call; calls we admitted
    /// after it are in our count, not in its figure. Comparing the two as if taken together
    /// would take back another client's use of the key while they fly: 429s.
    #[tokio::test]
    async fn an_answer_observed_while_later_calls_fly_does_not_take_back_anothers_use() {
        use crate::routing::QuotaObservation;
        let store = MemoryStore::new();
        let pools = pool(vec![crate::config::LimitConfig {
            requests: Some(10),
            tokens: None,
            per: Duration::from_secs(60),
            resets: None,
        }]);
        let ask = Ask { provider: "p", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
        let now = SystemTime::now();
        let seen = |remaining| QuotaObservation {
            measure: QuotaMeasure::Requests,
            remaining,
            limit: Some(10),
            resets_at: Some(now + Duration::from_secs(60)),
            window: None,
        };
        // Another client of the key has used 5 of the 10: the answer to our first says 4 left.
        let Admission::Granted(first) = store.admit(ask, now).await else { panic!("room") };
        store.finish(first.clone(), None, SystemTime::now()).await;
        store.observe_quota(ask, &first, &[seen(4)], now).await;
        let mut flying = Vec::new();
        while let Admission::Granted(p) = store.admit(ask, now).await {
            flying.push(p);
        }
        assert_eq!(flying.len(), 4, "5 external + 1 + 4 = the account's 10");
        // The first of the four answers: the provider had counted 5 + 2 of ours, 3 left.
        let observed = flying.remove(0);
        store.finish(observed.clone(), None, SystemTime::now()).await;
        store.observe_quota(ask, &observed, &[seen(3)], now).await;
        assert_eq!(store.pool_used("account", &pools[0].limits[0], now), 10, "the other client's 5 still count");
        assert!(matches!(store.admit(ask, now).await, Admission::OverQuota { .. }));
        // The answer to the last call: its figure holds all of ours, and may take use back.
        let last = flying.pop().unwrap();
        store.observe_quota(ask, &last, &[seen(1)], now).await;
        assert_eq!(store.pool_used("account", &pools[0].limits[0], now), 9);
    }

    /// Headers written just before a daily reset arrive after it: the budget they call spent
    /// has been renewed since. Counting it again would block the whole new day.
    #[tokio::test]
    async fn a_spent_budget_whose_reset_passed_while_in_flight_does_not_block_the_new_day() {
        use crate::routing::QuotaObservation;
        let store = MemoryStore::new();
        let daily = crate::config::LimitConfig {
            requests: Some(50),
            tokens: None,
            per: Duration::from_secs(86_400),
            resets: Some(crate::calendar::DailyReset::parse("00:00 UTC").unwrap()),
        };
        let pools = pool(vec![daily]);
        let ask = Ask { provider: "or-a", limits: &[], pools: &pools, tokens: 1, flight: Duration::from_secs(30) };
        let midnight = humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        // Sent at 23:59:58 (the 50th of the day), answered at 00:00:04 with the headers of 23:59:58.
        let seen = QuotaObservation {
            measure: QuotaMeasure::Requests,
            remaining: 0,
            limit: Some(50),
            resets_at: Some(midnight),
            window: None,
        };
        store.observe_quota(ask, &Permit::UNCOUNTED, &[seen], midnight + Duration::from_secs(4)).await;
        let admission = store.admit(ask, midnight + Duration::from_secs(60)).await;
        assert!(matches!(admission, Admission::Granted(_)), "a new day of 50, yet: {admission:?}");
    }
}
