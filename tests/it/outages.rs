//! Providers as they really fail (contract §6): a run of 5xx opens a circuit that one request
//! across all workers probes, and jobs wait out such an outage instead of failing early.

use std::time::{Duration, SystemTime};

use fallback_worker::mock::{MockOptions, MockProvider, Profile, Scenario};
use fallback_worker::routing::CooldownReason;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Cooldown, ProbeClaim, ProviderState};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::support::relay::Relay;
use crate::support::*;

async fn migrated_store(env: &TestEnv) -> PgStore {
    let store = PgStore::connect_lazy(&env.database_url, 4).unwrap();
    store.migrate().await.unwrap();
    store
}

/// The run of 5xx the shared table holds for `provider` (0 before its first error).
async fn server_errors(env: &TestEnv, provider: &str) -> i32 {
    sqlx::query_scalar("SELECT consecutive_server_errors FROM provider_state WHERE provider = $1")
        .bind(provider)
        .fetch_optional(&mut env.db().await)
        .await
        .unwrap()
        .unwrap_or(0)
}

fn circuit(until: SystemTime) -> Cooldown {
    Cooldown { until, reason: CooldownReason::Circuit, detail: "3 server errors in a row".into() }
}

const ASK: Ask<'static> = Ask { provider: "p", limits: &[], pools: &[], tokens: 1, flight: Duration::from_secs(7) };

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_of_many_takes_the_probe_of_an_expired_circuit() {
    let env = TestEnv::new().await;
    let mut workers = Vec::new();
    for _ in 0..6 {
        workers.push(migrated_store(&env).await);
    }
    for expected in 1..=3 {
        assert_eq!(workers[0].record_server_error("p", "HTTP 503").await, expected);
    }
    assert_eq!(workers[1].record_server_error("p", "HTTP 503").await, 3, "a late 503 does not lengthen the run");
    // An instant in the future stands for "once the circuit has expired": no wall-clock wait.
    let expired = SystemTime::now() + Duration::from_secs(60);
    workers[0].cool_down("p", circuit(expired)).await;
    for worker in &workers {
        // Each worker reads the row before calling, as the chain does.
        assert!(matches!(worker.admit(ASK, expired).await, Admission::Granted(_)));
    }
    let hold = Duration::from_secs(7);
    let claiming: Vec<_> = workers
        .iter()
        .map(|worker| {
            let worker = worker.clone();
            tokio::spawn(async move { worker.claim_probe("p", expired, hold).await.is_call() })
        })
        .collect();
    let mut claims = Vec::new();
    for claim in claiming {
        claims.push(claim.await.unwrap());
    }
    assert_eq!(claims.iter().filter(|taken| **taken).count(), 1, "exactly one probe: {claims:?}");

    let (prober, loser) = (claims.iter().position(|t| *t).unwrap(), claims.iter().position(|t| !*t).unwrap());
    match workers[loser].admit(ASK, expired).await {
        Admission::Cooling(c) => assert_eq!((c.reason, c.until > expired), (CooldownReason::Circuit, true)),
        other => panic!("the others keep skipping it while the probe is in flight: {other:?}"),
    }
    assert_eq!(workers[prober].record_server_error("p", "HTTP 503").await, 4, "the failed probe counts");
    assert_eq!(workers[loser].record_server_error("p", "HTTP 503").await, 4, "a late answer does not");
    // The probe failed: the reopened circuit counts from the failure and replaces the hold,
    // even when it ends before the hold would have.
    let reopened = expired + Duration::from_secs(2);
    workers[prober].cool_down("p", circuit(reopened)).await;
    // Another worker reads the truth from the table (the listener would update the others).
    match migrated_store(&env).await.admit(ASK, expired).await {
        Admission::Cooling(c) => {
            let drift = c.until.duration_since(reopened).unwrap_or_else(|e| e.duration());
            assert!(drift < Duration::from_millis(2), "the reopened circuit replaced the hold: {drift:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// Another worker takes the probe (the hold written straight to the table, as its claim does).
async fn probe_taken(env: &TestEnv, provider: &str, at: SystemTime, hold: Duration) {
    let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as f64;
    let taken = sqlx::query(
        "UPDATE provider_state SET cooldown_until = to_timestamp($2 / 1000), circuit_probe_at = to_timestamp($3 / 1000) \
         WHERE provider = $1 AND cooldown_reason = 'circuit'",
    )
    .bind(provider)
    .bind(ms(at + hold))
    .bind(ms(at))
    .execute(&mut env.db().await)
    .await
    .unwrap();
    assert_eq!(taken.rows_affected(), 1);
}

/// A worker whose claim of the probe loses before the winner's notice reaches it is told to
/// skip the provider until the winner's hold ends. Its own view still shows the expired
/// circuit, on which an unlimited provider's admission (read from that view) and a credit's
/// (read from nothing) grant the call: before, the chain gave the slot back and asked that view
/// again, was granted, and called the provider beside the probe.
#[tokio::test]
async fn a_worker_that_loses_the_probe_before_its_notice_arrives_does_not_call() {
    let env = TestEnv::new().await;
    // The loser's LISTEN session goes through a relay that can hold the notices back: the
    // moments between the winner's claim and its notice's arrival, made to last.
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let listen_url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = &store_at(&env.database_url, DEFAULT_POOL).await.with_listen_url(&listen_url).unwrap();
    let stop = CancellationToken::new();
    let listening = tokio::spawn(store.clone().listen(stop.clone()));
    eventually("the listener is live", || async { store.is_listening() }).await;
    let prober = migrated_store(&env).await;
    let limits = [crate::credits::requests(100_000)];
    let unlimited = ASK;
    let limited = Ask { provider: "q", limits: &limits, ..ASK };
    // The database decides a limited provider's admission on its own clock: the circuits end
    // for real, 200 ms from now.
    let expired = SystemTime::now() + Duration::from_millis(200);
    for provider in ["p", "q"] {
        for _ in 0..3 {
            prober.record_server_error(provider, "HTTP 503").await;
        }
        prober.cool_down(provider, circuit(expired)).await;
    }
    eventually("the loser hears of both circuits", || async {
        ["p", "q"].iter().all(|p| store.known_cooldown(p).is_some_and(|c| c.reason == CooldownReason::Circuit))
    })
    .await;
    tokio::time::sleep(expired.duration_since(SystemTime::now()).unwrap_or_default()).await;
    relay.hold(true);
    let hold = Duration::from_secs(7);
    for ask in [unlimited, limited] {
        let expired = SystemTime::now();
        let permit = match store.admit(ask, expired).await {
            Admission::Granted(permit) => permit,
            other => panic!("{}: an expired circuit admits: {other:?}", ask.provider),
        };
        if ask.provider == "q" {
            assert!(permit.from_credit, "the limited provider's call comes from a credit: {permit:?}");
        }
        // The winner's hold differs from the one this worker would take: the answer must be
        // the table's, not a guess.
        let winners_hold = hold + Duration::from_secs(1);
        probe_taken(&env, ask.provider, expired, winners_hold).await;
        let view = store.known_cooldown(ask.provider).map(|c| c.until);
        assert!(
            view.is_some_and(|until| until <= expired),
            "{}: the hold's notice is held back: {view:?}",
            ask.provider
        );
        match store.claim_probe(ask.provider, expired, hold).await {
            ProbeClaim::Held(c) => {
                let off = c.until.duration_since(expired + winners_hold).unwrap_or_else(|e| e.duration());
                assert_eq!(c.reason, CooldownReason::Circuit, "{}", ask.provider);
                assert!(off < Duration::from_millis(2), "{}: skipped until the hold ends: {c:?}", ask.provider);
            }
            ProbeClaim::Call => panic!("{}: the loser is told to call beside the probe", ask.provider),
        }
        store.finish(permit, None, expired).await;
    }
    // The notices held back arrive: the view learns the holds from them.
    relay.hold(false);
    eventually("the held notices have arrived", || async {
        ["p", "q"].iter().all(|p| store.known_cooldown(p).is_some_and(|c| c.until > SystemTime::now()))
    })
    .await;
    stop.cancel();
    listening.await.unwrap();
}

#[tokio::test]
async fn a_probes_success_closes_the_circuit_for_every_worker_at_once() {
    let env = TestEnv::new().await;
    let (prober, other) = (migrated_store(&env).await, migrated_store(&env).await);
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(other.clone().listen(shutdown.clone()));
    for _ in 0..3 {
        prober.record_server_error("p", "HTTP 503").await;
    }
    let now = SystemTime::now();
    prober.cool_down("p", circuit(now)).await;
    eventually("the other worker hears of the circuit", || async {
        other.known_cooldown("p").is_some_and(|c| c.reason == CooldownReason::Circuit)
    })
    .await;
    assert!(matches!(prober.admit(ASK, now).await, Admission::Granted(_)));
    assert!(prober.claim_probe("p", now, Duration::from_secs(7)).await.is_call());
    eventually("the other worker hears of the probe's hold", || async {
        other.known_cooldown("p").is_some_and(|c| c.until > now)
    })
    .await;
    assert!(matches!(other.admit(ASK, now).await, Admission::Cooling(_)));

    prober.record_success("p").await;
    eventually("the closed circuit reaches the other worker", || async { other.known_cooldown("p").is_none() }).await;
    assert!(matches!(other.admit(ASK, now).await, Admission::Granted(_)), "it may call at once");
    assert_eq!(server_errors(&env, "p").await, 0);
    shutdown.cancel();
    listening.await.unwrap();
}

#[tokio::test]
async fn jobs_caught_in_an_outage_of_every_provider_are_all_answered_after_it() {
    let env = TestEnv::new().await;
    let mocks = [
        MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap(),
        MockProvider::start(MockOptions::new(Profile::Openai)).await.unwrap(),
    ];
    for mock in &mocks {
        mock.set_fallback(Scenario::ServerError { status: 503, text: false });
    }
    let config = env.config(&format!(
        "{}{}{}",
        provider("first", &mocks[0].base_url(), true, ""),
        provider("second", &mocks[1].base_url(), true, ""),
        chain("default", &["first", "second"], "max_wait = \"60s\"")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    let total = 60;
    for i in 0..total {
        env.publish(&job(&format!("o-{i}")), BasicProperties::default()).await;
    }

    // The outage lasts until each provider's circuit has opened and its first probe failed
    // (its run of 5xx grows past the threshold only through a probe).
    for name in ["first", "second"] {
        eventually("a probe of the open circuit fails", || async { server_errors(&env, name).await >= 4 }).await;
    }
    for mock in &mocks {
        mock.set_fallback(Scenario::Success);
    }
    let failed_calls: Vec<usize> = mocks.iter().map(|m| m.stats().requests).collect();

    let results = env.results(&env.results, total).await;
    let failures: Vec<_> = results.iter().filter(|r| !r.is_success()).map(|r| (&r.custom_id, &r.error)).collect();
    assert!(failures.is_empty(), "every job is answered once the providers recover: {failures:?}");
    let answered: std::collections::BTreeSet<_> = results.iter().filter_map(|r| r.custom_id.clone()).collect();
    assert_eq!(answered.len(), total);
    for calls in failed_calls {
        // At most the calls in flight when the circuit opened (prefetch 8) and one probe.
        assert!(calls <= 8 + 1, "{calls} calls during the outage: the circuit did not hold the herd back");
    }
    worker.stop().await;
}
