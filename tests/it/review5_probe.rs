//! Adversarial review (round 5) of b41caea: the probe claim waiting up to 1 s for the row
//! (`take_probe`), the per-provider claim gate (`probe_claims`), the echo lag carried by the
//! ping's payload (`echoed`).

use std::time::{Duration, Instant, SystemTime};

use fallback_worker::routing::CooldownReason;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Cooldown, ProviderState};

use crate::credits::Worker;
use crate::review_probe2::{HOLD, expired_circuit};
use crate::support::*;

/// Finding 1 (the gate has no deadline). The row of the provider is locked for longer than the
/// claim's 1 s lock wait (one admission transaction stuck behind a slow commit, a long
/// `fallback_finish_and_admit`, a vacuum of the row's page...). Jobs of one worker at the
/// circuit's end queue on `probe_claims` (no timeout: the gate is awaited outside `guarded`).
/// The first claim waits 1 s, gets 55P03, `lost_probe` reads the expired circuit and answers
/// `Held(expired)`, which the view does not record as a hold; each waiter then finds the view
/// unchanged (an expired circuit) and runs its own 1 s claim. The n-th job answers after ~n s:
/// with 6 jobs the last one waits ~6 s for an answer, three times `STATE_CALL_TIMEOUT`, and
/// nothing counts this as slowness of the database.
#[tokio::test]
async fn claims_queued_on_the_gate_answer_within_the_state_call_timeout() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = worker.store.clone();
    expired_circuit(&store, "p", 300).await;
    // One transaction holding the row for 7 s.
    let url = env.database_url.clone();
    let locker = tokio::spawn(async move {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM provider_state WHERE provider = 'p' FOR UPDATE").execute(&mut *tx).await.unwrap();
        sqlx::query("SELECT pg_sleep(7)").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let jobs: Vec<_> = (0..6)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let claim = store.claim_probe("p", SystemTime::now(), HOLD).await;
                (started.elapsed(), claim)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for j in jobs {
        answers.push(j.await.unwrap());
    }
    locker.await.unwrap();
    let slowest = answers.iter().map(|(d, _)| *d).max().unwrap();
    eprintln!("answers: {answers:?}");
    assert!(
        slowest < Duration::from_millis(2500),
        "6 jobs of one worker claimed the probe beside a row locked for 7 s: the slowest answered after {slowest:?} \
         (the gate is awaited without a deadline, each waiter runs its own 1 s claim): {answers:?}"
    );
}

/// Finding 2 (hostile or stray NOTIFY on the ping channel). `echoed` takes any number as a send
/// time on this process's monotonic clock. The channel's name is visible to any session in
/// `pg_stat_activity.query` (`LISTEN "fallback_listener_ping_…"`, the listener's last
/// statement). A payload `0` stores a lag of the process's age: a live, idle listener is
/// untrusted until its next echo (up to 1 s), and a NOTIFY sent more often than the pings keeps
/// it untrusted for good (every job then reads the table). (The converse: a payload far in the
/// future stores a lag of 0 and counts as `heard()`, trusting a lagging view.)
#[tokio::test]
async fn a_stray_notify_on_the_ping_channel_does_not_untrust_a_live_listener() {
    let env = TestEnv::new().await;
    let store = store_at_env(&env).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let listening = tokio::spawn(store.clone().listen(stop.clone()));
    eventually("the listener is live", || async { store.is_listening() }).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut db = env.db().await;
    // Every LISTEN session's ping channel (tests run side by side: notify them all).
    let queries: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE query LIKE '%fallback_listener_ping_%' \
         AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let channels: Vec<String> = queries
        .iter()
        .filter_map(|q| {
            let start = q.find("fallback_listener_ping_")?;
            Some(q[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
        })
        .collect();
    eprintln!("channels found in pg_stat_activity: {channels:?}");
    assert!(!channels.is_empty(), "the test's own setup: the ping channel is visible");
    let started = Instant::now();
    let (mut samples, mut untrusted) = (0, 0);
    while started.elapsed() < Duration::from_secs(3) {
        for channel in &channels {
            sqlx::query("SELECT pg_notify($1, '0')").bind(channel).execute(&mut db).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        samples += 1;
        if !store.is_listening() {
            untrusted += 1;
        }
    }
    stop.cancel();
    let _ = listening.await;
    assert_eq!(
        untrusted, 0,
        "a NOTIFY with payload '0' on the listener's ping channel (found in pg_stat_activity) every 20 ms: \
         the live listener was untrusted in {untrusted} of {samples} samples"
    );
}

async fn store_at_env(env: &TestEnv) -> PgStore {
    crate::ledger_batching::store_at(&env.database_url, 4).await
}

/// Finding 3 (any notice counts as the ping's echo). `is_listening()` looks for a missed echo
/// as `sent > heard`, and `heard()` runs for every notice received, on either channel. When
/// the LISTEN connection starts lagging (6 s here, in order: a lossy link), the pings' echoes
/// are late and are correctly missed; but once the delayed stream starts arriving, the other
/// workers' cooldown notices (committed *before* the oldest unechoed ping was sent, so proving
/// nothing about it) refresh `heard`, `echo_missed` turns false, and `echo_lag_ms` still holds
/// the last echo's lag from before the lag began (~0): the view, 6 s behind the table, is
/// trusted until the first late echo arrives (up to one ping interval, 1 s). On a busy
/// fleet (notices every few ms) this happens each time a lag starts or grows.
#[tokio::test]
async fn notices_arriving_late_do_not_make_a_lagging_view_trusted() {
    use crate::review4_probe::LaggingRelay;
    let env = TestEnv::new().await;
    let relay = LaggingRelay::start("127.0.0.1:5432".parse().unwrap()).await;
    let listen_url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let laggard = crate::ledger_batching::store_at(&env.database_url, 2).await.with_listen_url(&listen_url).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listening = tokio::spawn(laggard.clone().listen(stop.clone()));
    eventually("the laggard's listener is live", || async { laggard.is_listening() }).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = crate::ledger_batching::store_at(&env.database_url, 2).await;
    // Another worker's steady stream of cooldown notices (a busy fleet), every 20 ms.
    let notices = {
        let other = other.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let c = Cooldown {
                    until: SystemTime::now() + Duration::from_secs(60),
                    reason: CooldownReason::RateLimited,
                    detail: "review5: 429".into(),
                };
                other.cool_down("q", c).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.lag(6000);
    let lagging = Instant::now();
    // Sample from 2 s after the lag began (the echo missed by then) to 9 s: the view is 6 s
    // behind throughout and must not be trusted.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut trusted = Vec::new();
    let mut samples = 0;
    while lagging.elapsed() < Duration::from_secs(9) {
        samples += 1;
        if laggard.is_listening() {
            trusted.push(lagging.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let _ = notices.await;
    let _ = listening.await;
    assert!(
        trusted.is_empty(),
        "a listener 6 s behind was trusted in {} of {samples} samples, from {:?} to {:?} after the lag began \
         (late notices of another worker counted as the echo of the oldest ping)",
        trusted.len(),
        trusted.first(),
        trusted.last()
    );
}

/// Probe (a cancelled claim's transaction): the claim's UPDATE takes 3 s once (a trigger standing
/// for a slow disk), `guarded` drops `take_probe` at 2 s, mid-statement, inside the transaction.
/// The connection must come back clean: no session left `idle in transaction` holding the row,
/// nothing committed, and another worker's claim wins once the slow statement is over.
#[tokio::test]
async fn a_claim_cancelled_mid_transaction_leaves_no_open_transaction() {
    let env = TestEnv::new().await;
    let winner = crate::ledger_batching::store_at(&env.database_url, 2).await;
    expired_circuit(&winner, "p", 300).await;
    let mut db = env.db().await;
    sqlx::raw_sql(
        "CREATE SEQUENCE review5_once; \
         CREATE FUNCTION review5_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF nextval('review5_once') = 1 THEN PERFORM pg_sleep(3); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER review5_slow BEFORE UPDATE ON provider_state FOR EACH ROW EXECUTE FUNCTION review5_slow();",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let cancelled_store = crate::ledger_batching::store_at(&env.database_url, 1).await;
    let started = Instant::now();
    let cancelled = cancelled_store.claim_probe("p", SystemTime::now(), HOLD).await;
    let took = started.elapsed();
    // The slow statement ends 3 s after it began; give the pool 1.5 s more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let open: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let other = winner.claim_probe("p", SystemTime::now(), HOLD).await;
    eprintln!("cancelled: {cancelled:?} after {took:?}; open: {open:?}; other: {other:?}");
    assert!(
        took < Duration::from_millis(2600),
        "the test's own setup: the claim was cut by the 2 s timeout ({took:?})"
    );
    assert!(open.is_empty(), "sessions left in a transaction after the cancelled claim: {open:?}");
    assert!(
        !cancelled.is_call() && other.is_call(),
        "after a cancelled claim (answered {cancelled:?}), another worker's claim answered {other:?}"
    );
}

/// Finding 4 (`refused_for_everyone` trusts per-session refusals). 25006 and class 42 are
/// taken as "every worker's write is refused", but both are raised per session as often as
/// per server: a worker whose connections are read-only (`default_transaction_read_only` set
/// for its role or in its URL's options, a pooler routing it to a standby) gets 25006 while the
/// others write fine; a role lacking UPDATE on `provider_state` gets 42501. That worker then
/// probes on its own each time its local hold ends, beside the worker that took the probe in
/// the database: two probes of one circuit.
#[tokio::test]
async fn a_worker_with_a_read_only_session_does_not_probe_beside_the_claim_winner() {
    let env = TestEnv::new().await;
    let winner = crate::ledger_batching::store_at(&env.database_url, 2).await;
    expired_circuit(&winner, "p", 300).await;
    let url = format!("{}&options=-c%20default_transaction_read_only%3Don", env.database_url);
    let read_only = PgStore::connect_lazy(&url, 2).unwrap();
    let refused = sqlx::query("UPDATE provider_state SET updated_at = now() WHERE provider = 'p'")
        .execute(read_only.pool())
        .await;
    let code = refused.err().and_then(|e| e.as_database_error().and_then(|d| d.code().map(|c| c.to_string())));
    assert_eq!(code.as_deref(), Some("25006"), "the test's own setup: its session is read-only");
    // The read-only worker's job comes first (its claim refused), then another worker's.
    let beside = read_only.claim_probe("p", SystemTime::now(), HOLD).await;
    let won = winner.claim_probe("p", SystemTime::now(), HOLD).await;
    assert!(
        !(won.is_call() && beside.is_call()),
        "one worker took the probe in the database ({won:?}); a worker whose session alone is read-only (25006, \
         the database takes the others' writes) answered {beside:?}: two probes of one circuit"
    );
}

/// Probe (a single connection terminated): a DBA's `pg_terminate_backend` (or an
/// `idle_session_timeout`) of the claiming worker's idle pooled connection must not make that
/// worker take the database for down (57P01 and I/O errors are `is_transient`, which answers
/// `Unreachable`, which `refused_for_everyone` lets probe from here) beside the claim winner.
#[tokio::test]
async fn a_terminated_pool_connection_does_not_make_a_worker_probe_on_its_own() {
    let env = TestEnv::new().await;
    let winner = crate::ledger_batching::store_at(&env.database_url, 2).await;
    expired_circuit(&winner, "p", 300).await;
    let victim = PgStore::connect_lazy(&env.database_url, 1).unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(victim.pool()).await.unwrap();
    let mut db = env.db().await;
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut db).await.unwrap();
    assert!(killed, "the test's own setup");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let beside = victim.claim_probe("p", SystemTime::now(), HOLD).await;
    let won = winner.claim_probe("p", SystemTime::now(), HOLD).await;
    eprintln!("victim: {beside:?}, winner: {won:?}");
    assert!(
        !(won.is_call() && beside.is_call()),
        "a worker whose one idle connection was terminated answered {beside:?}, another worker {won:?}: two probes"
    );
}
