//! Adversarial review (round 4) of d895502: the probe claim skipping a locked row
//! (`FOR UPDATE SKIP LOCKED`), any claim error other than `Busy` probing from here, the
//! LISTEN session's echo-based trust, `CreditBook::at_limit`.

use std::time::{Duration, Instant, SystemTime};

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProbeClaim, ProviderState};

use crate::credits::{Worker, requests};
use crate::ledger_batching::store_at;
use crate::review_probe2::{HOLD, expired_circuit};
use crate::support::*;

/// Three connections taking the provider's row `FOR UPDATE` in turn (one holds it, the others wait), each for `hold_ms` per
/// transaction, until `for_ms` has passed: what admission batches of a busy provider do
/// (`fallback_admit_batch`, `fallback_finish_and_admit`: the row is locked for the batch's
/// transaction, and the next batch already waits on it). Returns how many transactions ran.
fn queued_row_locks(
    env: &TestEnv,
    provider: &'static str,
    hold_ms: u64,
    for_ms: u64,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..3)
        .map(|_| {
            let url = env.database_url.clone();
            tokio::spawn(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_millis(for_ms) {
                    let mut tx = conn.begin().await.unwrap();
                    sqlx::query("SELECT 1 FROM provider_state WHERE provider = $1 FOR UPDATE")
                        .bind(provider)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT pg_sleep({})", hold_ms as f64 / 1000.0)))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// Finding 1 (SKIP LOCKED starves the probe). In the chain a job is admitted *before* it
/// claims the probe (`admit` then `claim_probe`), and an expired circuit admits: every job of a
/// busy limited provider at its circuit's end runs an admission batch that locks the provider's
/// row `FOR UPDATE` for its transaction, and the batches of several workers queue on that lock,
/// so the row is locked nearly all the time. A claim with `SKIP LOCKED` never joins that queue:
/// it is skipped whenever another batch holds the row, `lost_probe` reads an expired circuit and
/// answers `Held(expired)`, the job gives its slot back and comes again after a short overdue
/// pause, admitting again (one more batch on the lock). No job ever probes while the load
/// lasts: the circuit of a recovered provider stays open for as long as its own traffic keeps
/// the row busy, while before d895502 the claim waited its turn (tens of ms) and won.
#[tokio::test]
async fn claims_are_not_starved_by_admission_batches_queued_on_the_providers_row() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = worker.store.clone();
    expired_circuit(&store, "p", 300).await;
    // Batches whose commit is slow (a WAL flush on a slow disk: 200 ms), as in the previous
    // review's finding; the next batches wait on the row meanwhile.
    let lockers = queued_row_locks(&env, "p", 200, 3000);
    crate::ledger_batching::until_waiting_on_locks(&env, 1).await;
    let started = Instant::now();
    let (mut claims, mut won, mut held_expired) = (0, None, 0);
    while started.elapsed() < Duration::from_millis(2500) {
        let now = SystemTime::now();
        claims += 1;
        match store.claim_probe("p", now, HOLD).await {
            ProbeClaim::Call => {
                won = Some(started.elapsed());
                break;
            }
            ProbeClaim::Held(c) if c.until <= now => held_expired += 1,
            ProbeClaim::Held(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut batches = 0;
    for l in lockers {
        batches += l.await.unwrap();
    }
    assert!(
        won.is_some(),
        "{claims} claims in 2.5 s beside {batches} transactions of 200 ms locking the row in turn: none took the probe, \
         {held_expired} were told to keep away until a circuit end already past"
    );
}

/// Finding 1, with real admission batches on a fast database: three other workers admit a busy
/// limited provider (16 jobs each at a time; the same row lock, taken by `fallback_admit_batch`),
/// and a fourth worker's claims are skipped one after the other (9-15 claims, 250-400 ms, in
/// runs here, growing with the load) although each batch holds the row for a millisecond or
/// two. Before d895502 the first claim waited its turn and won.
///
/// A measurement, not a failing test: the count depends on the machine's load (runs here: 1-4
/// claims alone, 6-28 beside other tests). Run with `--run-ignored all`.
#[tokio::test]
#[ignore = "measurement: depends on the machine's load"]
async fn claims_beside_real_admission_batches_of_other_workers_win() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = worker.store.clone();
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(store_at(&env.database_url, 3).await);
    }
    // Three rounds, a provider each (a claim won holds its provider for 7 s): the load varies
    // with the machine's, so the worst round is what is asserted.
    let mut rounds = Vec::new();
    for provider in ["p0", "p1", "p2"] {
        expired_circuit(&store, provider, 300).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let mut admitters = Vec::new();
        for other in &others {
            for _ in 0..16 {
                let (other, stop) = (other.clone(), stop.clone());
                admitters.push(tokio::spawn(async move {
                    let limits = [requests(1_000_000)];
                    let mut n = 0u32;
                    while !stop.is_cancelled() {
                        let ask = Ask { provider, limits: &limits, pools: &[], tokens: 1, flight: HOLD };
                        if let Admission::Granted(permit) = other.admit(ask, SystemTime::now()).await {
                            other.finish(permit, None, SystemTime::now()).await;
                        }
                        n += 1;
                    }
                    n
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (mut claims, mut won) = (0, None);
        while started.elapsed() < Duration::from_millis(2500) {
            claims += 1;
            if store.claim_probe(provider, SystemTime::now(), HOLD).await.is_call() {
                won = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        stop.cancel();
        let mut admissions = 0;
        for a in admitters {
            admissions += a.await.unwrap();
        }
        eprintln!("{provider}: won after {won:?}, claim {claims}, {admissions} admissions");
        rounds.push((claims, won, admissions));
    }
    let worst = rounds.iter().map(|r| r.0).max().unwrap();
    assert!(
        worst <= 3,
        "beside admissions of three other workers, rounds (claims until one took the probe, after, admissions): \
         {rounds:?}: every claim before the winning one was skipped (the row locked by a batch) and its job kept away"
    );
}

/// Finding 2 (a cancelled claim probes beside the winner). Any claim error other than `Busy`
/// answers `Call` with a local hold, meant for a database that refuses writes for everyone
/// (disk full, read-only). A statement cancelled on a writable database is no such refusal: a
/// server-side `statement_timeout` shorter than the worker's 2 s (a common role setting) while
/// the database is slow, `pg_cancel_backend` by an operator; or a new pool connection refused
/// with 53300 (too many connections) under load: none is transient to `is_transient`, each is
/// `StoreError::Database`. That claim rolled
/// back, the circuit is still expired in the table, and the next worker's claim takes it: two
/// probes of a provider whose circuit the herd guarantee says one job probes.
#[tokio::test]
async fn a_cancelled_claim_does_not_probe_beside_the_worker_that_takes_the_probe() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let winner = worker.store.clone();
    expired_circuit(&winner, "p", 300).await;
    // A worker whose role has a statement_timeout of 100 ms, on a database slow for it (a
    // trigger standing for a slow disk: only its session's updates of the row take 300 ms).
    let mut db = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review4_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF current_setting('statement_timeout') <> '0' THEN PERFORM pg_sleep(0.3); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER review4_slow BEFORE UPDATE ON provider_state FOR EACH ROW EXECUTE FUNCTION review4_slow();",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let url = format!("{}&options=-c%20statement_timeout%3D100", env.database_url);
    let timed = PgStore::connect_lazy(&url, 2).unwrap();
    let setting: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(timed.pool()).await.unwrap();
    assert_eq!(setting, "100ms", "the test's own setup");
    let refused =
        sqlx::query("UPDATE provider_state SET updated_at = now() WHERE provider = 'p'").execute(timed.pool()).await;
    let code = refused.err().and_then(|e| e.as_database_error().and_then(|d| d.code().map(|c| c.to_string())));
    assert_eq!(code.as_deref(), Some("57014"), "the test's own setup: its updates are cancelled");
    // Not listening: its view reads the table, finds the expired circuit and claims.
    let now = SystemTime::now();
    let cancelled = timed.claim_probe("p", now, HOLD).await;
    let other = winner.claim_probe("p", SystemTime::now(), HOLD).await;
    eprintln!("cancelled: {cancelled:?}, other: {other:?}, listening: {}", winner.is_listening());
    assert!(
        !(cancelled.is_call() && other.is_call()),
        "a claim cancelled by the database (57014, the table unchanged) answered {cancelled:?}, and the next \
         worker's claim took the probe ({other:?}): two probes of one circuit"
    );
}

/// Held (a guard, passes): an idle, live listener stays trusted without a flap, ping after
/// ping. (Stamping the send time after the ping returns does not make it fail: the echo comes
/// back after the pinger's store here, and the window is sub-millisecond otherwise.)
#[tokio::test]
async fn a_live_idle_listener_never_flaps_to_untrusted() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = worker.store.clone();
    let started = Instant::now();
    let mut untrusted = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        if !store.is_listening() {
            untrusted.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        untrusted.is_empty(),
        "a live listener was untrusted at {} samples: {:?}",
        untrusted.len(),
        untrusted.first()
    );
}

/// A loopback relay whose service-to-client direction is delayed by a settable amount (a
/// lagging but live connection: a lossy network's retransmissions, a congested link), in order.
pub(crate) struct LaggingRelay {
    pub(crate) addr: std::net::SocketAddr,
    lag_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl LaggingRelay {
    pub(crate) async fn start(upstream: std::net::SocketAddr) -> LaggingRelay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lag_ms: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let lag = lag_ms.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let lag = lag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_service, mut to_service) = outbound.into_split();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                    let reader = async move {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            match from_service.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let due = tokio::time::Instant::now()
                                        + Duration::from_millis(lag.load(Ordering::Relaxed));
                                    if tx.send((due, buffer[..n].to_vec())).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let writer = async move {
                        while let Some((due, bytes)) = rx.recv().await {
                            tokio::time::sleep_until(due).await;
                            if to_client.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    };
                    let up = tokio::io::copy(&mut from_client, &mut to_service);
                    tokio::select! {
                        _ = up => {}
                        _ = async { tokio::join!(reader, writer) } => {}
                    }
                });
            }
        });
        LaggingRelay { addr, lag_ms, accept }
    }

    pub(crate) fn lag(&self, ms: u64) {
        self.lag_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LaggingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Finding 3 (an echo proves the past, not the present). Trust comes back as soon as the echo
/// of the oldest ping not echoed arrives, however late: an echo 6 s late says the view is
/// current as of 6 s ago, yet `is_listening()` is true again until the next ping stored goes
/// 1 s without its echo. A LISTEN connection that lags steadily (alive, in order, seconds
/// behind: retransmissions on a lossy link) so flaps between untrusted and trusted, and while
/// trusted it has not heard of a circuit opened in the last 6 s, which may already have ended
/// (a circuit is open 5 s at least): `claim_probe` answers `Call` from the view, without the
/// table, beside the worker that claimed the probe.
#[tokio::test]
async fn a_steadily_lagging_listener_is_not_trusted_again_by_a_late_echo() {
    let env = TestEnv::new().await;
    let relay = LaggingRelay::start("127.0.0.1:5432".parse().unwrap()).await;
    let listen_url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let laggard = store_at(&env.database_url, 2).await.with_listen_url(&listen_url).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listening = tokio::spawn(laggard.clone().listen(stop.clone()));
    eventually("the laggard's listener is live", || async { laggard.is_listening() }).await;
    let prober = store_at(&env.database_url, 2).await;
    relay.lag(6000);
    let lagging = Instant::now();
    let sampler = {
        let laggard = laggard.clone();
        tokio::spawn(async move {
            while lagging.elapsed() < Duration::from_secs(6) {
                if !laggard.is_listening() {
                    return Some(lagging.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A circuit of the shortest open time opens now: the laggard hears of it 6 s later.
    expired_circuit(&prober, "p", fallback_worker::chain::CIRCUIT_BASE.as_millis() as u64).await;
    // The circuit has ended; wait for the laggard to trust its view again (a late echo).
    let mut trusted_again = None;
    while lagging.elapsed() < Duration::from_millis(7400) {
        if laggard.is_listening() && laggard.known_cooldown("p").is_none() {
            trusted_again = Some(lagging.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let laggards =
        if trusted_again.is_some() { Some(laggard.claim_probe("p", SystemTime::now(), HOLD).await) } else { None };
    let probers = prober.claim_probe("p", SystemTime::now(), HOLD).await;
    stop.cancel();
    let _ = listening.await;
    let untrusted_at = sampler.await.unwrap();
    assert!(untrusted_at.is_some(), "the test's own setup: a listener 6 s behind is untrusted soon");
    assert!(
        !(laggards.as_ref().is_some_and(|c| c.is_call()) && probers.is_call()),
        "the laggard's view, 6 s behind, untrusted {untrusted_at:?} after the lag began, was trusted again {trusted_again:?} after the lag began without knowing the \
         ended circuit; it answered {laggards:?} without the table, and the prober took the probe too ({probers:?})"
    );
}

/// Finding 4 (low; a measurement, flaky by nature): a pool busy for 1-2 s per acquire (less than the 2 s a ping waits)
/// sends each ping late; its send time is stamped before the wait, so it is stored already
/// more than 1 s old, and the view is untrusted until the echo is handled (a race between the
/// pinger's store and the LISTEN task's `heard()`).
/// Seen: 1 untrusted sample of ~2850 in one of two runs (a flap of about a millisecond).
#[tokio::test]
#[ignore = "a race of about a millisecond: fails in some runs only"]
async fn a_ping_sent_late_by_a_busy_pool_does_not_flap_trust() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = worker.store.clone();
    let started = Instant::now();
    let mut busy = Vec::new();
    for _ in 0..store.pool().options().get_max_connections() {
        let pool = store.pool().clone();
        busy.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(6) {
                let _ = sqlx::query("SELECT pg_sleep(1.4)").execute(&pool).await;
            }
        }));
    }
    let (mut samples, mut untrusted) = (0, Vec::new());
    while started.elapsed() < Duration::from_secs(6) {
        samples += 1;
        if !store.is_listening() {
            untrusted.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for b in busy {
        let _ = b.await;
    }
    assert!(
        untrusted.is_empty(),
        "a live listener was untrusted at {} of {samples} samples: {:?}",
        untrusted.len(),
        untrusted.iter().take(5).collect::<Vec<_>>()
    );
}

/// Held: concurrent claims of one expired circuit from several workers (no other lock on the
/// row) take one probe, never two, round after round.
#[tokio::test]
async fn concurrent_claims_take_one_probe() {
    let env = TestEnv::new().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(store_at(&env.database_url, 3).await);
    }
    for round in 0..5 {
        let provider: &'static str = ["c0", "c1", "c2", "c3", "c4"][round];
        expired_circuit(&stores[0], provider, 300).await;
        let mut claims = Vec::new();
        for store in &stores {
            for _ in 0..5 {
                let store = store.clone();
                claims.push(tokio::spawn(async move { store.claim_probe(provider, SystemTime::now(), HOLD).await }));
            }
        }
        let mut calls = 0;
        for c in claims {
            calls += usize::from(c.await.unwrap().is_call());
        }
        assert_eq!(calls, 1, "round {round}: {calls} of 20 concurrent claims told to probe");
    }
}
