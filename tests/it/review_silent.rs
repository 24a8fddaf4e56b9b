//! Adversarial review of fabddbd ("a batched call given up on counts as a timeout only when no
//! batch has heard from the database for 1.75 s", `state/last_answer.rs`). Three findings, each
//! failing on fabddbd, each fixed in its own commit after its test: 1 (a regression of fabddbd:
//! answers later than any call can wait kept every give-up from counting), 2 and 3 (older than
//! fabddbd, failing on b758a21 too: a batch's own "busy" counted once per request whatever the
//! batches heard; the timeouts in a row outlived a recovery).

use std::time::{Duration, Instant};

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Receipt, ResultLedger};

use crate::review_probe2::migrated;
use crate::statement_timeout::sleeping_trigger;
use crate::support::*;

/// Every transaction that writes `table` takes `seconds` more at its commit: a deferred
/// constraint trigger sleeps once per transaction. It runs inside COMMIT, which Postgres does
/// not hold to `statement_timeout` (`finish_xact_command` disables the timeout before it
/// commits): what a lagging synchronous standby (`synchronous_commit = on`) or a storage that
/// takes seconds to flush the WAL does to every write.
pub(crate) async fn slow_commits(env: &TestEnv, table: &str, seconds: f64) {
    let name = format!("review_silent_slow_commit_{table}");
    let trigger = format!(
        "CONSTRAINT TRIGGER {name} AFTER INSERT OR UPDATE ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
    );
    // Once per transaction: the first row's trigger marks the transaction (CASE evaluates in order).
    let once = format!(
        "CASE WHEN current_setting('review_silent.slept', true) IS DISTINCT FROM 'yes' \
           THEN CASE WHEN set_config('review_silent.slept', 'yes', true) = 'yes' THEN {seconds} END \
           ELSE 0 END"
    );
    sleeping_trigger(env, &name, &trigger, &once).await;
}

/// Finding 1 (high, regression of fabddbd). `LastAnswer::heard` takes any answer a batch
/// statement gets, however late, as proof that the database answers; a batched call's give-up
/// then never counts while some batch got an answer in the last 1.75 s. A database whose every
/// write answers, but only after the worker's 2 s (commits slowed by a lagging synchronous
/// standby or a stalled WAL disk: COMMIT is not bound by `statement_timeout`), answers some
/// batch every ~1.2 s once two ledger batches are in flight: every ledger call of every job
/// times out (2 s waited, twice per job), and the worker never goes to its own view. Before
/// fabddbd (b758a21) the same calls counted and the worker went down within ~3.3 s. The docs
/// say "one ... whose writes hang, does [go down] ... within about 2.5 s as before".
#[tokio::test]
async fn a_database_whose_every_answer_comes_after_the_deadline_is_taken_for_down() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    store.open("warm", "fingerprint", Receipt::of(false)).await.unwrap();
    {
        // Two idle connections, so that a second ledger batch goes out beside the first.
        let (a, b) = tokio::join!(store.pool().acquire(), store.pool().acquire());
        drop((a.unwrap(), b.unwrap()));
    }
    slow_commits(&env, "job_results", 2.3).await;
    let since = Instant::now();
    let mut opens: Vec<tokio::task::JoinHandle<String>> = Vec::new();
    let spawn_open = |store: &PgStore, i: usize| {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = store.open(&format!("job-{i}"), "fingerprint", Receipt::of(false)).await;
            format!("{:?} after {:?}", answer.map(|_| ()), started.elapsed())
        })
    };
    // Jobs arrive: one, then a steady flow from 1.15 s on (one every 100 ms).
    opens.push(spawn_open(&store, 0));
    tokio::time::sleep(Duration::from_millis(1150)).await;
    let mut i = 1;
    let mut went_down_after = None;
    while since.elapsed() < Duration::from_secs(10) {
        if store.is_degraded() {
            went_down_after = Some(since.elapsed());
            break;
        }
        opens.push(spawn_open(&store, i));
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut answers = Vec::new();
    for open in opens {
        answers.push(open.await.unwrap());
    }
    let in_time = answers.iter().filter(|a| a.starts_with("Ok")).count();
    let given_up = answers.iter().filter(|a| a.starts_with("Err(Busy")).count();
    assert!(
        went_down_after.is_some_and(|after| after < Duration::from_secs(6)),
        "not taken for down within 6 s ({went_down_after:?}) while {given_up} of {} ledger calls \
         waited 2 s and were given up as 'busy' ({in_time} answered in time): {:#?}",
        answers.len(),
        &answers[..answers.len().min(12)]
    );
}

/// Finding 2 (medium, older than fabddbd, against its rule and the docs). A batch on a connection
/// kept from the previous batch whose session ended (an operator's or a failover tool's
/// `pg_terminate_backend`) fails as "busy" (`BatchConnection::run`: "the worker does not switch
/// to its own view for it"; docs/operations.md: "fails that one batch as 'busy' ... not as a
/// database outage"). But `answer_of` takes every batch-level `Busy` for a timeout, once per
/// request, whatever the batches heard: a kept-connection batch of three or more requests is
/// three timeouts in a row, and the worker takes a database that just answered (the session's
/// own FATAL 57P01 is an answer `LastAnswer` heard) for down: no ledger, local quota shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_three_on_a_kept_connection_whose_session_was_terminated_does_not_take_the_database_down() {
    use crate::ledger_batching::{DEFAULT_POOL, lock_keys, open_queued, release, store_at, until_waiting_on_locks};
    let env = TestEnv::new().await;
    // Two connections open and idle: one ledger batch in flight at a time.
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    // A batch in flight (waiting on its row lock, well within lock_timeout), three opens of other
    // keys queued behind it, their rows held too so that their batch waits on its connection.
    let first_locker = lock_keys(&env, &["first"]).await;
    let later_locker = lock_keys(&env, &["later-1", "later-2", "later-3"]).await;
    let first = open_queued(&store, "first");
    until_waiting_on_locks(&env, 1).await;
    let later = [open_queued(&store, "later-1"), open_queued(&store, "later-2"), open_queued(&store, "later-3")];
    // The first batch ends; its connection goes straight to the three opens (kept, unpinged).
    release(first_locker).await;
    let first = first.await.unwrap();
    until_waiting_on_locks(&env, 1).await;
    // That session ends under their statement, as an operator ends a session holding things up.
    let killed: Vec<i32> = sqlx::query_scalar(
        "WITH s AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
           AND application_name = 'fallback-worker' AND wait_event_type = 'Lock') \
         SELECT pid FROM s WHERE pg_terminate_backend(pid)",
    )
    .fetch_all(&mut env.db().await)
    .await
    .unwrap();
    let mut answers = Vec::new();
    for open in later {
        answers.push(format!("{:?}", open.await.unwrap().map(|_| ())));
    }
    release(later_locker).await;
    let degraded = store.is_degraded();
    // The database answers a new call at once.
    let after = store.open("after", "job", Receipt::Fresh).await.map(|_| ());
    assert!(
        !degraded,
        "one terminated session ({killed:?}) took a database that answers for down (no ledger, \
         local shares); first: {:?}; the three opens on the kept connection: {answers:?}; an open \
         right after: {after:?}",
        first.map(|_| ())
    );
}

/// Finding 3 (medium, older than fabddbd; fabddbd leans on it). `timed_out` is "several in a
/// row", but nothing sets `timeouts_in_a_row` back when the worker leaves degraded mode
/// (`recover` resets only the run of cancellations): right after the database is back, the
/// count still stands at three, and the very first call given up on takes the database for down
/// again: one slow call, where three were the rule ("one slow query must not switch the worker's
/// mode"). fabddbd adds to it: the recovery's own answers (its ping, its write-back) are not
/// batch statements, so `LastAnswer` is as old as the outage and the first batched give-up after
/// it always counts.
#[tokio::test]
async fn a_single_call_given_up_on_right_after_a_recovery_does_not_take_the_database_down_again() {
    use crate::review_outage::store_behind_relay;
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    store.open("warm", "fingerprint", Receipt::of(false)).await.unwrap();
    // An outage: nothing arrives, three ledger calls are given up on, the worker goes down.
    relay.hold(true);
    let stalled: Vec<_> = (0..3)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.open(&format!("outage-{i}"), "fingerprint", Receipt::of(false)).await })
        })
        .collect();
    for open in stalled {
        let _ = open.await.unwrap();
    }
    assert!(store.is_degraded(), "three calls given up on took the database for down");
    // The database is back: the worker probes it, writes back and leaves its own view.
    relay.hold(false);
    eventually("the worker is back on the shared view", || async { !store.is_degraded() }).await;
    // One slow moment: a single ledger call gets no answer within its 2 s.
    relay.hold(true);
    let one = store.open("one-slow-call", "fingerprint", Receipt::of(false)).await.map(|_| ());
    let degraded = store.is_degraded();
    relay.hold(false);
    assert!(!degraded, "one call given up on right after the recovery ({one:?}) took the database for down again");
}
