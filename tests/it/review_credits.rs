//! Adversarial review of admission credits (commit 37b6cb0): each test but the `held_` ones is
//! a fault found, and failed on that commit (with a listening worker, as credits now need).

use std::time::{Duration, SystemTime};

use fallback_worker::routing::CooldownReason;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Cooldown, Permit, ProviderState};

use crate::credits::{HOUR, Worker, ask, granted, requests, requests_left, tokens};
use crate::review_finish::used;
use crate::support::*;

/// `fallback_observe` takes learnt use back by what the windows count beyond the provider's
/// figure, taking every row of a call id below the observed call's as already in that figure.
/// A credit taken before the observed call holds calls that are sent after the provider took
/// it: its unsent calls are read as "counted by the provider", and the learnt use they stand
/// for is deleted. Once the credit's calls go out the window counts less than was sent.
#[tokio::test]
async fn an_observation_after_a_credit_was_taken_does_not_take_back_what_its_later_calls_use() {
    let env = TestEnv::new().await;
    let (wa, wb) = (Worker::start(&env).await, Worker::start(&env).await);
    let (a, b) = (&wa.store, &wb.store);
    let limits = [requests(100_000), tokens(100_000_000)];
    // A's calls are too large for a credit (a million tokens of a 390,625-token share): each asks.
    let large = ask(&limits, 1_000_000);
    let mut sent = 0u64;

    // The provider counts 5000 calls made elsewhere: learnt from A's first call's headers.
    let x1 = granted(a, large).await;
    assert!(!x1.from_credit);
    sent += 1;
    a.observe_quota(large, &x1, &[requests_left(100_000 - 5000 - sent, 100_000, None)], SystemTime::now()).await;
    a.finish_recorded(x1, Some(1_000_000), SystemTime::now()).await.unwrap();
    assert_eq!(used(&env, "provider", "p", "requests").await, 5001);

    // B takes a credit (64 calls) and sends its first call.
    let c1 = granted(b, ask(&limits, 10)).await;
    assert!(c1.from_credit);
    sent += 1;
    let mut credit_calls = vec![c1];

    // A's next call: the provider has taken 5000 + X1 + C1 + X2 when it answers.
    let x2 = granted(a, large).await;
    assert!(!x2.from_credit);
    sent += 1;
    a.observe_quota(large, &x2, &[requests_left(100_000 - 5000 - sent, 100_000, None)], SystemTime::now()).await;
    a.finish_recorded(x2, Some(1_000_000), SystemTime::now()).await.unwrap();

    // B sends the rest of its credit.
    for _ in 0..63 {
        credit_calls.push(granted(b, ask(&limits, 10)).await);
        sent += 1;
    }
    let from_credit = credit_calls.iter().filter(|c| c.from_credit).count();
    for call in credit_calls {
        b.finish(call, Some(10), SystemTime::now()).await;
    }
    a.answers_recorded().await;
    b.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await as u64;
    assert!(
        counted >= 5000 + sent,
        "the hour counts {counted} requests; the provider has taken 5000 + {sent} ({from_credit} from a credit)"
    );
}

/// A one-by-one ask refused while another worker's credit held the last slots kept its
/// refusal (`quota_blocked`) until rows leave the window — here the learnt use, 50 minutes
/// on. The credit ends a second later having used one of its four slots: three are free, but
/// the refused worker admitted nothing before the refusal's time. Before credits, a request
/// slot that was counted stayed counted until its row left, so the kept refusal was true. A
/// refusal while a credit lives in the window now says to ask again within 2 s.
#[tokio::test]
async fn a_refusal_kept_while_a_credit_held_the_last_slots_ends_with_the_credit() {
    let env = TestEnv::new().await;
    let (wa, wb) = (Worker::start(&env).await, Worker::start(&env).await);
    let (a, b) = (&wa.store, &wb.store);
    let limits = [requests(1024)];
    // 1020 of the hour's 1024 are taken elsewhere (the provider's headers say so), for 50 min.
    let seen = requests_left(4, 1024, Some(Duration::from_secs(3000)));
    a.observe_quota(ask(&limits, 1), &Permit::UNCOUNTED, &[seen], SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1020);

    // B takes a credit of the last 4 slots and makes one call.
    let call = granted(b, ask(&limits, 1)).await;
    assert!(call.from_credit);
    let refused_at = SystemTime::now();
    let refused = a.admit(ask(&limits, 1), refused_at).await;
    let Admission::OverQuota { until, .. } = refused else { panic!("{refused:?}") };
    assert!(until <= refused_at + Duration::from_secs(3), "asked again {:?} later", until.duration_since(refused_at));

    b.finish(call, Some(1), SystemTime::now()).await;
    eventually("B's credit has ended with its one call", || async {
        used(&env, "provider", "p", "requests").await == 1021
    })
    .await;
    eventually("the refusal's time has come", || async { SystemTime::now() >= until }).await;
    let again = a.admit(ask(&limits, 1), SystemTime::now()).await;
    assert!(matches!(again, Admission::Granted(_)), "3 of 1024 slots are free, yet: {again:?}");
}

/// A credit's calls are admitted with no query, so the provider's cooldown in the database is
/// not read: a cooldown shared by another worker (its call got a 429) is ignored by this
/// worker's calls until its listener brings it (never, while the listener is down), for as
/// long as the credit admits. Before credits, each limited call asked the database, whose
/// admission answers `cooldown`.
#[tokio::test]
async fn a_cooldown_shared_by_another_worker_stops_calls_admitted_from_a_credit() {
    let env = TestEnv::new().await;
    let (wa, wb) = (Worker::start(&env).await, Worker::start(&env).await);
    let (a, b) = (&wa.store, &wb.store);
    let limits = [requests(100_000)];
    let first = granted(a, ask(&limits, 1)).await;
    assert!(first.from_credit);
    let until = SystemTime::now() + Duration::from_secs(60);
    let cooldown = Cooldown { until, reason: CooldownReason::RateLimited, detail: "429 from the provider".into() };
    b.cool_down("p", cooldown).await;
    // The cooldown reaches a's calls through its listener, as it reaches calls to a provider
    // without limits (a worker whose listener is down asks call by call: see
    // `credits::a_worker_without_its_listener_asks_call_by_call`).
    eventually("the cooldown's notification arrives", || async { a.known_cooldown("p").is_some() }).await;
    let next = a.admit(ask(&limits, 1), SystemTime::now()).await;
    assert!(matches!(next, Admission::Cooling(_)), "the provider cools down in the database, yet: {next:?}");
}

/// A credit closed at the end of its lifetime still held all of its calls (64) and their
/// tokens in every window until its slowest call answered (LLM calls: seconds to a minute),
/// though it admitted one. A worker making a call or two a second takes a new credit every
/// second: with 20 s calls it held some twenty credits of 64, 1280 requests for 40 sent —
/// 1/256 of the window each, about 8 % of every window per worker, that other workers' asks
/// were refused for. Now a credit counts what it admitted from when it closes.
#[tokio::test]
async fn a_closed_credit_holds_only_what_it_admitted() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000)];
    let call = granted(store, ask(&limits, 1)).await;
    assert!(call.from_credit);
    assert_eq!(used(&env, "provider", "p", "requests").await, 64);
    // Closed by its timer (1 s), its call still out.
    eventually("the closed credit counts the one call it admitted", || async {
        used(&env, "provider", "p", "requests").await == 1
    })
    .await;
    store.finish(call, None, SystemTime::now()).await;
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1);
}

/// A credit ask refused because another worker's credit held the room keeps this worker from
/// asking for a credit until the refusal's time (`no_room_until`): when rows leave the window,
/// here 50 minutes on (a day window: up to a day). The other credit ends a second later with
/// room for several credits again, but every call of this worker asks the database alone
/// meanwhile — the cost credits were made to save.
#[tokio::test]
async fn a_credit_refused_while_another_credit_held_the_room_is_asked_for_again_once_it_ended() {
    let env = TestEnv::new().await;
    let (wa, wb) = (Worker::start(&env).await, Worker::start(&env).await);
    let (a, b) = (&wa.store, &wb.store);
    // Credits of 8 calls; 2036 of the hour's 2048 are taken elsewhere, for 50 minutes.
    let limits = [requests(2048)];
    let seen = requests_left(12, 2048, Some(Duration::from_secs(3000)));
    a.observe_quota(ask(&limits, 1), &Permit::UNCOUNTED, &[seen], SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2036);

    // B's credit leaves 4: A's credit of 8 is refused, its call asks alone.
    let b_call = granted(b, ask(&limits, 1)).await;
    assert!(b_call.from_credit);
    let refused_at = SystemTime::now();
    let a_call = granted(a, ask(&limits, 1)).await;
    assert!(!a_call.from_credit);
    a.finish_recorded(a_call, Some(1), SystemTime::now()).await.unwrap();

    b.finish(b_call, Some(1), SystemTime::now()).await;
    eventually("B's credit has ended with its one call", || async {
        used(&env, "provider", "p", "requests").await == 2038
    })
    .await;
    // 10 free: room for a credit of 8, asked for again once the refusal's time has come (2 s
    // while a credit lives in the window; a margin for the database's clock).
    let asks_again = refused_at + Duration::from_millis(2500);
    eventually("the refusal's time has come", || async { SystemTime::now() >= asks_again }).await;
    let next = granted(a, ask(&limits, 1)).await;
    assert!(next.from_credit, "room for a credit, yet A asks alone: {next:?}");
    a.finish(next, Some(1), SystemTime::now()).await;
}

/// What the provider's headers teach is learnt as the difference between its figure and the
/// window's count (`fallback_observe`: a learnt row of `target - used`). While a credit is
/// live the window counts its unsent calls as used, so the learnt row is short by them; when
/// the credit ends with the calls it admitted the window drops below the provider's own
/// figure by its unused calls (63 here) — on every answer that carries headers (Groq's and
/// OpenRouter's all do) while a credit is live. The credit's own call observes here; any
/// other call's headers do the same.
#[tokio::test]
async fn use_learnt_while_a_credit_is_live_is_not_lost_when_the_credit_ends() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000)];
    let call = granted(store, ask(&limits, 1)).await;
    assert!(call.from_credit);
    // The provider has taken 5000 calls made elsewhere, and this one.
    let seen = requests_left(100_000 - 5001, 100_000, None);
    store.observe_quota(ask(&limits, 1), &call, &[seen], SystemTime::now()).await;
    // All the provider counts is learnt beside the live credit (its calls may have gone after
    // the figure was taken): more than is used until the next figure, never less. But for the
    // credit's first call, which the figure holds (since 0013 the worker says so): its 63
    // others are unseen.
    assert_eq!(used(&env, "provider", "p", "requests").await, 5001 + 63);
    store.finish(call, Some(1), SystemTime::now()).await;
    store.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 5001, "the provider counts 5001 requests, the window {counted}");
}

/// Held: a worker of the previous version (0010's signatures) beside credits — its asks count
/// one request each and its answers end its calls, in the same windows as a credit.
#[tokio::test]
async fn held_a_worker_of_0010_admits_and_answers_beside_credits() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), tokens(100_000_000)];
    let credit_call = granted(store, ask(&limits, 10)).await;
    assert!(credit_call.from_credit);
    let mut db = env.db().await;
    let windows = "'p', ARRAY['provider','provider'], ARRAY['p','p'], ARRAY['requests','tokens'], \
                   ARRAY[3600000,3600000]::bigint[], ARRAY['',''], ARRAY[100000,100000000]::bigint[], \
                   ARRAY[NULL,NULL]::timestamptz[], ARRAY[NULL,NULL]::timestamptz[]";
    let admit = format!(
        "SELECT usage_id FROM fallback_admit_batch({windows}, ARRAY[500]::bigint[], ARRAY[30000]::bigint[], \
         ARRAY[NULL,NULL]::timestamptz[])"
    );
    let old: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(admit)).fetch_one(&mut db).await.unwrap();
    assert_eq!(used(&env, "provider", "p", "requests").await, 65);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 640 + 500);
    sqlx::query("SELECT fallback_finish_batch(ARRAY[$1]::bigint[], ARRAY[20]::bigint[])")
        .bind(old)
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(used(&env, "provider", "p", "tokens").await, 640 + 20);
    let both = format!(
        "SELECT usage_id FROM fallback_finish_and_admit({windows}, ARRAY[7]::bigint[], ARRAY[30000]::bigint[], \
         ARRAY[NULL,NULL]::timestamptz[], ARRAY[$1]::bigint[], ARRAY[30]::bigint[])"
    );
    let second: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(both)).bind(old).fetch_one(&mut db).await.unwrap();
    assert!(second > old);
    // The old call's answer given again sets its count (30), the new one counts its estimate 7.
    assert_eq!(used(&env, "provider", "p", "tokens").await, 640 + 30 + 7);
    assert_eq!(used(&env, "provider", "p", "requests").await, 66);
    store.finish(credit_call, Some(10), SystemTime::now()).await;
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 3);
    assert_eq!(used(&env, "provider", "p", "tokens").await, 10 + 30 + 7);
}

/// Held: a credit whose calls answer while the database is away — one raising it, the last
/// ending it — is written back with what its calls used once the database is back.
#[tokio::test]
async fn held_a_credit_that_ends_during_an_outage_is_written_back() {
    let env = TestEnv::new().await;
    let relay = crate::support::relay::Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(store.clone().listen(stop.clone()));
    eventually("the listener is live", || async { store.is_listening() }).await;
    let limits = [requests(100_000), tokens(100_000_000)];
    let first = granted(&store, ask(&limits, 100)).await;
    let second = granted(&store, ask(&limits, 100)).await;
    assert!(first.from_credit && second.from_credit);
    relay.set_down(true);
    store.finish(first, Some(9000), SystemTime::now()).await;
    assert!(store.is_degraded());
    // While the database is away the credit still admits (its room is counted there)... but it
    // was closed by the raise: this call is the worker's own share.
    let local = granted(&store, ask(&limits, 100)).await;
    assert!(!local.from_credit);
    store.finish(second, Some(50), SystemTime::now()).await;
    store.finish(local, Some(100), SystemTime::now()).await;
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    eventually("the credit and the outage's call are written back", || async {
        used(&env, "provider", "p", "requests").await == 3 && used(&env, "provider", "p", "tokens").await == 9150
    })
    .await;
    stop.cancel();
}

/// A credit that ends during an outage and the outage's own calls are written back in one
/// transaction. They were two: the calls went in first (counting more, never less, in
/// between), then the credit's ending; a reader between them saw the whole credit *and* the
/// outage's calls, and the flaky `a_database_stopped_for_15_s_under_load_stops_no_job` caught
/// that moment twice ("297 counted for 234 calls": 64 + 233). Here the ending is held up by a
/// lock on the credit's rows, so the moment between lasts until the test looks.
#[tokio::test]
async fn a_credit_ending_and_the_outages_calls_are_written_back_together() {
    let env = TestEnv::new().await;
    let relay = crate::support::relay::Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(store.clone().listen(stop.clone()));
    eventually("the listener is live", || async { store.is_listening() }).await;
    let limits = [requests(100_000)];
    let from_credit = granted(&store, ask(&limits, 1)).await;
    assert!(from_credit.from_credit);
    let credit = from_credit.usage_id.unwrap();
    store.finish(from_credit, Some(1), SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 64, "the whole credit counts until it ends");

    relay.set_down(true);
    // Without its session the worker admits nothing from the credit: the call asks, and finds
    // the database gone.
    eventually("the listener has lost its session", || async { !store.is_listening() }).await;
    let local = granted(&store, ask(&limits, 1)).await;
    assert!(store.is_degraded() && !local.from_credit);
    store.finish(local, Some(1), SystemTime::now()).await;
    // Closes the credit: its ending (one call) waits for the write-back with the outage's call.
    store.answers_recorded().await;

    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM quota_use WHERE call_id = $1 FOR UPDATE")
        .bind(credit)
        .execute(&mut locker)
        .await
        .unwrap();
    relay.set_down(false);
    eventually("the write-back waits on the credit's rows", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    let meanwhile = used(&env, "provider", "p", "requests").await;
    assert_eq!(
        meanwhile, 64,
        "the outage's call counted beside the whole credit: the write-back was not one transaction"
    );
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    eventually("the database is back", || async { !store.is_degraded() }).await;
    eventually("the credit's one call and the outage's call are counted", || async {
        used(&env, "provider", "p", "requests").await == 2
    })
    .await;
    stop.cancel();
}

/// Held, with a caveat: a credit call answered after `answers_recorded` returned still ends
/// its credit (the ending is spawned on the closed tracker) — but nothing waits for it: a
/// worker that stops with credit calls still out (past its drain timeout) leaves the whole
/// credit counted until its deadline, as an unanswered call leaves its one slot.
#[tokio::test]
async fn held_a_credit_call_answered_after_answers_recorded_still_ends_its_credit() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000)];
    let call = granted(store, ask(&limits, 1)).await;
    assert!(call.from_credit);
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 1, "closed: its one call, still out");
    store.finish(call, Some(1), SystemTime::now()).await;
    eventually("the credit ends: its call leaves one window after its answer", || async {
        let leaves: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM leaves_at - now())::float8 FROM quota_use WHERE scope = 'p' AND measure = 'requests'",
        )
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
        leaves <= HOUR as f64
    })
    .await;
}
