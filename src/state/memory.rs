//! The embedded store: the same rules as Postgres, for one process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{Admission, Cooldown, LedgerEntry, ProviderState, ResultLedger, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    providers: Mutex<HashMap<String, ProviderRow>>,
    ledger: Mutex<HashMap<String, LedgerEntry>>,
}

#[derive(Default, Clone)]
struct ProviderRow {
    cooldown: Option<Cooldown>,
    consecutive_server_errors: u32,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stored cooldown of `provider` (expired or not), for inspection.
    pub fn cooldown_of(&self, provider: &str) -> Option<Cooldown> {
        self.providers.lock().unwrap().get(provider)?.cooldown.clone()
    }
}

#[async_trait::async_trait]
impl ProviderState for MemoryStore {
    async fn admit(&self, provider: &str, now: SystemTime) -> Admission {
        let providers = self.providers.lock().unwrap();
        match providers.get(provider).and_then(|row| row.cooldown.clone()) {
            Some(cooldown) if cooldown.until > now => Admission::Cooling(cooldown),
            _ => Admission::Granted,
        }
    }

    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        let mut providers = self.providers.lock().unwrap();
        let row = providers.entry(provider.to_string()).or_default();
        if row.cooldown.as_ref().is_none_or(|current| cooldown.until > current.until) {
            row.cooldown = Some(cooldown);
        }
    }

    async fn record_success(&self, provider: &str) {
        if let Some(row) = self.providers.lock().unwrap().get_mut(provider) {
            row.consecutive_server_errors = 0;
        }
    }

    async fn record_server_error(&self, provider: &str, _detail: &str) -> u32 {
        let mut providers = self.providers.lock().unwrap();
        let row = providers.entry(provider.to_string()).or_default();
        row.consecutive_server_errors += 1;
        row.consecutive_server_errors
    }
}

#[async_trait::async_trait]
impl ResultLedger for MemoryStore {
    async fn open(&self, key: &str) -> Result<LedgerEntry, StoreError> {
        let mut ledger = self.ledger.lock().unwrap();
        let entry = ledger.entry(key.to_string()).or_insert(LedgerEntry { deliveries: 0, result: None });
        entry.deliveries += 1;
        Ok(entry.clone())
    }

    async fn store(&self, key: &str, result_json: &str) -> Result<(), StoreError> {
        let mut ledger = self.ledger.lock().unwrap();
        let entry = ledger.entry(key.to_string()).or_insert(LedgerEntry { deliveries: 1, result: None });
        entry.result = Some(result_json.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::CooldownReason;
    use std::time::Duration;

    fn cooldown(until: SystemTime) -> Cooldown {
        Cooldown { until, reason: CooldownReason::RateLimited, detail: String::new() }
    }

    #[tokio::test]
    async fn cooldowns_only_move_forward() {
        let store = MemoryStore::new();
        let now = SystemTime::now();
        store.cool_down("p", cooldown(now + Duration::from_secs(60))).await;
        store.cool_down("p", cooldown(now + Duration::from_secs(5))).await;
        assert_eq!(store.cooldown_of("p").unwrap().until, now + Duration::from_secs(60));
        assert!(matches!(store.admit("p", now).await, Admission::Cooling(_)));
        assert_eq!(store.admit("p", now + Duration::from_secs(61)).await, Admission::Granted);
    }

    #[tokio::test]
    async fn ledger_counts_deliveries_and_keeps_results() {
        let store = MemoryStore::new();
        assert_eq!(store.open("k").await.unwrap().deliveries, 1);
        store.store("k", "{}").await.unwrap();
        let again = store.open("k").await.unwrap();
        assert_eq!((again.deliveries, again.result.as_deref()), (2, Some("{}")));
    }
}
