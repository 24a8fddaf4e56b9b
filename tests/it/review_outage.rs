//! The answers of a database outage (reviews 3 and 4): answers the database was unreachable
//! for, and answers of calls admitted locally and written back while in flight.

use std::time::{Duration, SystemTime};

use fallback_worker::config::LimitConfig;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Permit, ProviderState};

use crate::ledger_batching::{release, until_waiting_on_locks};
use crate::review_finish::{tokens, used};
use crate::support::relay::Relay;
use crate::support::*;

/// A store that reaches the database through a relay the test can take down, migrated.
pub(crate) async fn store_behind_relay(env: &TestEnv) -> (Relay, PgStore) {
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let store = PgStore::connect_lazy(&url, 4).unwrap();
    store.migrate().await.unwrap();
    (relay, store)
}

/// `p` with a 10,000-token hourly window; each ask estimates 100 tokens.
pub(crate) fn hourly_tokens() -> [LimitConfig; 1] {
    [tokens(10_000, 3600)]
}

pub(crate) fn ask_p(limits: &[LimitConfig]) -> Ask<'_> {
    Ask { provider: "p", limits, pools: &[], tokens: 100, flight: Duration::from_secs(60) }
}

/// One call through the database, answered as estimated (the window's row exists), then the
/// database goes away and a call is admitted from this worker's own view: its permit.
pub(crate) async fn an_outage_call(env: &TestEnv, store: &PgStore, relay: &Relay, limits: &[LimitConfig]) -> Permit {
    let Admission::Granted(first) = store.admit(ask_p(limits), SystemTime::now()).await else { panic!("room") };
    store.finish_recorded(first, Some(100), SystemTime::now()).await.unwrap();
    assert_eq!(used(env, "provider", "p", "tokens").await, 100);
    relay.set_down(true);
    let permit = loop {
        match store.admit(ask_p(limits), SystemTime::now()).await {
            Admission::Granted(permit) if permit.usage_id.is_none() => break permit,
            Admission::Granted(permit) => store.finish(permit, Some(100), SystemTime::now()).await,
            other => panic!("{other:?}"),
        }
    };
    assert!(store.is_degraded());
    permit
}

/// A plain connection holding `p`'s token window row: the write-back's insert waits on it.
pub(crate) async fn lock_window(env: &TestEnv) -> sqlx::PgConnection {
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM quota_window WHERE kind = 'provider' AND scope = 'p' AND measure = 'tokens' FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// `fallback_finish_batch` as 0012, except that its first call fails as a lock wait past its
/// `lock_timeout` (1s) does: another worker's batch holds a window (or the connection drops).
async fn first_finish_batch_fails(env: &TestEnv) {
    sqlx::raw_sql(
        "CREATE SEQUENCE review4_fail; \
         CREATE OR REPLACE FUNCTION fallback_finish_batch(p_calls bigint[], p_tokens bigint[], p_requests bigint[], p_ended boolean[], p_seqs bigint[]) \
         RETURNS void LANGUAGE plpgsql SET lock_timeout = '1s' SET enable_seqscan = off AS $$ \
         DECLARE r record; \
         BEGIN \
           IF nextval('review4_fail') = 1 THEN \
             RAISE EXCEPTION 'canceling statement due to lock timeout' USING ERRCODE = '55P03'; \
           END IF; \
           FOR r IN SELECT * FROM (SELECT DISTINCT kind, scope, measure, window_ms, calendar \
                                     FROM quota_use WHERE call_id = ANY (p_calls)) involved \
                     ORDER BY kind COLLATE \"C\", scope COLLATE \"C\", measure COLLATE \"C\", window_ms, calendar COLLATE \"C\" LOOP \
             PERFORM 1 FROM quota_window w WHERE w.kind = r.kind AND w.scope = r.scope AND w.measure = r.measure \
               AND w.window_ms = r.window_ms AND w.calendar = r.calendar FOR UPDATE; \
           END LOOP; \
           PERFORM fallback_apply_finishes(p_calls, p_tokens, p_requests, p_ended, p_seqs); \
         END $$;",
    )
    .execute(&mut env.db().await)
    .await
    .unwrap();
}

/// Up to the write-back, blocked on `p`'s token window: one call through the database (100,
/// answered), one admitted locally during the outage (estimate 100, in flight).
async fn outage_call_with_write_back_waiting(
    env: &TestEnv,
    store: &PgStore,
    relay: &Relay,
    fail_post_check: bool,
) -> (Permit, sqlx::PgConnection) {
    let permit = an_outage_call(env, store, relay, &hourly_tokens()).await;
    if fail_post_check {
        first_finish_batch_fails(env).await;
    }
    let locker = lock_window(env).await;
    relay.set_down(false);
    // The write-back's insert of the outage's call waits on the window.
    until_waiting_on_locks(env, 1).await;
    assert!(store.is_degraded());
    (permit, locker)
}

/// The commit's "whoever removes the map entry writes the answer": the call answers while its
/// rows are being written (after `insert_calls` read it as in flight, before the map has its
/// entry). Held if 100 + 5000.
#[tokio::test]
async fn an_answer_that_arrives_while_the_outage_call_is_being_written_back_counts_once() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let (permit, locker) = outage_call_with_write_back_waiting(&env, &store, &relay, false).await;
    store.finish(permit, Some(5000), SystemTime::now()).await;
    release(locker).await;
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 100 + 5000);
}

/// The post-check's answer fails to be written (its batch function gives up on a lock after
/// 1s, or the connection drops): `insert_calls` returns the error after every window's rows
/// were inserted, `write_back` puts the calls back in `unsynced_calls`, and `recover` inserts
/// them all again, under new database ids: the outage's call counts twice (its first rows keep
/// their estimate for the whole window).
#[tokio::test]
async fn a_post_check_answer_that_fails_does_not_write_the_outage_calls_twice() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let (permit, locker) = outage_call_with_write_back_waiting(&env, &store, &relay, true).await;
    store.finish(permit, Some(5000), SystemTime::now()).await;
    release(locker).await;
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use WHERE scope = 'p' AND measure = 'tokens'")
        .fetch_one(&mut env.db().await)
        .await
        .unwrap();
    assert_eq!(used(&env, "provider", "p", "tokens").await, 100 + 5000, "{rows} token rows for 2 calls");
    let finish_batches: i64 =
        sqlx::query_scalar("SELECT last_value FROM review4_fail").fetch_one(&mut env.db().await).await.unwrap();
    assert!(finish_batches >= 2, "the failing finish batch never ran ({finish_batches} calls)");
}

/// `finish` writes first an answer that raises a token window's count (the next job may go
/// to another worker, whose ask must count it). A call admitted locally carries no provider
/// (`Permit::UNCOUNTED`'s), so its answer after the write-back, which the commit now turns
/// into a shared one, goes detached: `finish` returns before the shared window counts it.
#[tokio::test]
async fn a_raised_answer_of_a_written_back_call_is_written_before_finish_returns() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let permit = an_outage_call(&env, &store, &relay, &hourly_tokens()).await;
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    eventually("written back", || async { used(&env, "provider", "p", "tokens").await >= 200 }).await;
    // The answer's batch waits on the window (another worker's transaction) for a moment.
    let locker = lock_window(&env).await;
    let finished = {
        let store = store.clone();
        tokio::spawn(async move { store.finish(permit, Some(5000), SystemTime::now()).await })
    };
    // Its batch waits on the window: a finish that did not wait for it has returned by now.
    until_waiting_on_locks(&env, 1).await;
    let returned_early = finished.is_finished();
    release(locker).await;
    finished.await.unwrap();
    store.answers_recorded().await;
    assert!(!returned_early, "finish returned before its raised answer was written");
    assert_eq!(used(&env, "provider", "p", "tokens").await, 100 + 5000);
}

/// Review 3 (older than the detached answers): a call the database admitted, whose answer
/// (a raised count, written first) arrives while the database is away, was given up on; the
/// write-back carried only the calls admitted locally, so every other worker went on counting
/// the estimate (100) of a call that used 5000 tokens. The answer is now kept and written back.
#[tokio::test]
async fn a_raised_answer_that_arrives_during_an_outage_counts_once_the_database_is_back() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let limits = hourly_tokens();
    let Admission::Granted(permit) = store.admit(ask_p(&limits), SystemTime::now()).await else { panic!("room") };
    assert!(permit.usage_id.is_some(), "admitted by the database");
    relay.set_down(true);
    store.finish(permit, Some(5000), SystemTime::now()).await;
    assert!(store.is_degraded());
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 5000, "the call's use, not its estimate");
}

/// Review 3 (older than the detached answers): a call admitted from this worker's own view
/// while the database is away, still in flight when it comes back, is written back with its
/// estimate; its answer then named no shared call and corrected the worker's own view alone,
/// so every other worker counted 100 tokens of a call that used 5000, for a whole window.
#[tokio::test]
async fn a_call_of_the_outage_answered_after_the_write_back_counts_its_answer_in_the_shared_window() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let permit = an_outage_call(&env, &store, &relay, &hourly_tokens()).await;
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    eventually("the outage's call is written back", || async { used(&env, "provider", "p", "tokens").await >= 200 })
        .await;

    // The call answers now: it used 5000 tokens.
    store.finish_written(permit, Some(5000), SystemTime::now()).await;
    store.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 100 + 5000, "the outage call's use, not its estimate");
}

/// The write-back of the outage's calls fails part-way (here: the insert into the second
/// window, in the canonical order, fails once): before, each window's statement was its own
/// transaction, so the first window kept its rows, and the retry, which writes back every call
/// again, counted the calls twice there. The write-back is now one transaction: the retry
/// counts each call once in every window.
#[tokio::test]
async fn a_write_back_that_fails_part_way_counts_each_call_once_when_retried() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let limits = [crate::credits::requests(100), tokens(10_000, 3600)];
    let _in_flight = an_outage_call(&env, &store, &relay, &limits).await;
    sqlx::raw_sql(
        "CREATE SEQUENCE write_back_fails; \
         CREATE FUNCTION write_back_fails_once() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.measure = 'tokens' AND nextval('write_back_fails') = 1 THEN \
             RAISE EXCEPTION 'injected: the write-back fails at its second window'; \
           END IF; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER write_back_fails_once BEFORE INSERT ON quota_use \
           FOR EACH ROW EXECUTE FUNCTION write_back_fails_once();",
    )
    .execute(&mut env.db().await)
    .await
    .unwrap();
    relay.set_down(false);
    eventually("the database is back", || async { !store.is_degraded() }).await;
    let tries: i64 =
        sqlx::query_scalar("SELECT last_value FROM write_back_fails").fetch_one(&mut env.db().await).await.unwrap();
    assert!(tries >= 2, "the injected failure never happened ({tries} token inserts)");
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "the call before the outage and the outage's");
    assert_eq!(used(&env, "provider", "p", "tokens").await, 200);
}
