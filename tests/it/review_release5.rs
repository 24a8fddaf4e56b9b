//! Adversarial review, round 5, of the release (882cd58, migration 0016 in its final form: a
//! released call counts nothing from the release on when no rate-limit figure was counted in its
//! windows since it was admitted, `quota_window.observed_at >= quota_use.admitted_at`).
//! Strictness held in this round. Two tests below are known gaps, kept `#[ignore]`d (a slot kept
//! for a window that could come back sooner); the two on lock waits that add up past the
//! state-call timeout, as admissions' do, pass since every statement of the worker is bounded
//! by the database (`statement_timeout`, see `tests/it/statement_timeout.rs`).

use std::time::{Duration, SystemTime};

use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::credits::{requests, tokens};
use crate::ledger_batching::until_waiting_on_locks;
use crate::review_finish::used;
use crate::review_probe2::{HOLD, migrated};
use crate::review_release4::lock_queue;
use crate::support::*;

/// Finding 1 (the slot, not strictness). A call is dated when its admission statement starts
/// (`v_now` of `fallback_admit_batch`), before it waits for the windows; a figure marks the
/// window when it is counted (`observed_at`), after its own wait. A figure counted while the
/// admission waits in line behind it cannot have read the call (not yet written), yet it is
/// dated after the call's admission: the release takes it for a figure that may have counted
/// the call, and answers it: its slot stays taken for a whole window. Under load every
/// statement of a busy window waits in that line, so this is not rare: any figure ahead of
/// the admission in the window's queue costs the released call its slot.
///
/// 10 requests an hour. X is admitted. The window is held (a busy window: here a test
/// transaction). X's figure "9 of 10 left" waits for it, then R's admission waits behind it.
/// The window is let go: the figure is counted (it reads X alone), then R is admitted. R loses
/// the probe and is released: no figure counted since R's rows were written, so R should count
/// nothing (the window keeps 1, X). On 882cd58 it keeps 2.
#[tokio::test]
#[ignore = "known gap (liveness, not strictness): observed_at is a time, and admitted_at is taken before the admission waits for the window; a figure counted just before the rows existed still keeps the slot for a window"]
async fn a_figure_counted_before_the_calls_rows_were_written_does_not_keep_the_released_slot() {
    let env = TestEnv::new().await;
    let (worker, loser) = (migrated(&env.database_url, 4).await, migrated(&env.database_url, 4).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(x) = worker.admit(ask, SystemTime::now()).await else { panic!("X not granted") };
    let x_id = x.usage_id.unwrap();
    let mut holder = env.db().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT used FROM quota_window WHERE scope = 'p' FOR UPDATE").execute(&mut holder).await.unwrap();
    let (observed, r, waits) = tokio::join!(
        async {
            // X's figure, as `observe_quota` sends it (through fallback_observe_batch).
            sqlx::query_scalar::<_, i64>(
                "SELECT fallback_observe('provider', 'p', 'requests', 3600000, '', 10, 9, \
                        now() + interval '30 minutes', $1, NULL)",
            )
            .bind(x_id)
            .fetch_one(&mut env.db().await)
            .await
            .unwrap()
        },
        async {
            until_waiting_on_locks(&env, 1).await;
            loser.admit(ask, SystemTime::now()).await
        },
        async {
            until_waiting_on_locks(&env, 2).await;
            let waits = lock_queue(&env, "fallback_observe", "figure").await;
            sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
            waits
        }
    );
    assert_eq!(
        waits,
        [("admission".to_string(), "tuple".to_string()), ("figure".to_string(), "transactionid".to_string())],
        "the figure first in line for the window, the admission behind it"
    );
    assert_eq!(observed, 1, "X's figure read X alone: R was not written yet");
    let Admission::Granted(r) = r else { panic!("R not granted: {r:?}") };
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "X and R");
    // R loses the probe's claim at once: nothing was counted in the window since R was written.
    loser.release(r).await;
    loser.answers_recorded().await;
    assert_eq!(
        used(&env, "provider", "p", "requests").await,
        1,
        "no figure can have read R (it was counted before R's rows existed): R's slot should be back"
    );
}

/// Finding 2 (the lock-timeout path). 0016's header: "a lock is waited for 1 s at most ... a
/// release behind a window held elsewhere fails as busy ... rather than run into the worker's
/// state-call timeout" (2 s). The 1 s is per window: a call in three windows (requests and
/// tokens of a provider, a pool) waits up to 3 s, each window just under 1 s, and the worker's
/// `guarded` gives up at 2 s, counting a timeout towards taking the database for down (the
/// failure the 1 s was meant to avoid). Admissions wait the same way, but an admission is a
/// job's own ask; a release is one more state call per lost probe.
///
/// Here the call's three windows are each held 0.8 s by a different transaction, one after the
/// other: `fallback_release_calls`, sent as the worker sends it, should give up (or finish)
/// within the 2 s the worker gives it.
#[tokio::test]
async fn a_release_waits_no_longer_than_the_state_call_timeout_over_several_windows() {
    let env = TestEnv::new().await;
    let loser = migrated(&env.database_url, 4).await;
    let limits = [
        requests(10),
        tokens(1000),
        fallback_worker::config::LimitConfig {
            requests: Some(100),
            tokens: None,
            per: Duration::from_secs(60),
            resets: None,
        },
    ];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 10, flight: HOLD };
    let Admission::Granted(r) = loser.admit(ask, SystemTime::now()).await else { panic!("R not granted") };
    let call = r.usage_id.unwrap();
    // Each window held by its own transaction, in the canonical order.
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "SELECT measure, window_ms FROM quota_window WHERE scope = 'p' \
          ORDER BY kind COLLATE \"C\", scope COLLATE \"C\", measure COLLATE \"C\", window_ms, calendar COLLATE \"C\"",
    )
    .fetch_all(&mut env.db().await)
    .await
    .unwrap();
    assert_eq!(keys.len(), 3);
    let mut holders = Vec::new();
    for (measure, window_ms) in &keys {
        let mut h = env.db().await;
        sqlx::query("BEGIN").execute(&mut h).await.unwrap();
        sqlx::query("SELECT used FROM quota_window WHERE scope = 'p' AND measure = $1 AND window_ms = $2 FOR UPDATE")
            .bind(measure)
            .bind(window_ms)
            .execute(&mut h)
            .await
            .unwrap();
        holders.push(h);
    }
    let (took, _) = tokio::join!(
        async {
            let started = tokio::time::Instant::now();
            // On the service's own connection, with the bound it sets on its statements.
            let released = sqlx::query_scalar::<_, bool>("SELECT fallback_release_calls($1)")
                .bind([call].as_slice())
                .fetch_one(loser.pool())
                .await;
            (started.elapsed(), released.map_err(|e| e.to_string()))
        },
        async {
            for mut h in holders {
                tokio::time::sleep(Duration::from_millis(800)).await;
                sqlx::query("COMMIT").execute(&mut h).await.unwrap();
            }
        }
    );
    let (took, released) = took;
    assert!(
        took < Duration::from_secs(2),
        "the release waited {took:?} (answer {released:?}): past the worker's 2 s state-call timeout"
    );
}

/// Finding 3 (the slot, not strictness). Any figure counted in the window since the call's
/// admission keeps the released call's slot, but not every figure read the call as sent. A
/// figure of a call X admitted *before* R whose count is at most the window's without the calls
/// admitted after X (`v_target <= v_used - v_live - newer`) neither learns (it would not have
/// without R either) nor takes anything back for R (R is newer than X: `call_id > p_call`, out
/// of the excess): taking R out after it leaves the window exactly as if R had never been
/// admitted. (A figure that learns, or one of a call admitted after R, or one whose count
/// exceeds the window without R, did read R: those must keep the slot, as they do.) This is
/// the usual case of a lost probe: calls admitted earlier answer while the loser claims, their
/// figures (sent with every answer by Groq, OpenRouter, Cerebras, ...) find the window at the
/// provider's count, and each costs the loser its slot for a whole window. A fix: a figure
/// marks the window only when its decision depended on rows newer than its call (or it learnt).
///
/// 10 requests an hour. X is admitted, then R. X answers "9 of 10 left" (the provider counts X
/// alone; the window counts X and R: nothing learnt, nothing taken back, R read as newer). R
/// loses the probe and is released: the window should keep 1 (X). On 882cd58 it keeps 2.
#[tokio::test]
#[ignore = "known gap (liveness, not strictness): any figure counted since the admission keeps the slot, also one that read the released call as newer"]
async fn a_figure_of_an_older_call_that_reads_the_released_call_as_newer_does_not_keep_its_slot() {
    let env = TestEnv::new().await;
    let (worker, loser) = (migrated(&env.database_url, 4).await, migrated(&env.database_url, 4).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let Admission::Granted(x) = worker.admit(ask, SystemTime::now()).await else { panic!("X not granted") };
    let Admission::Granted(r) = loser.admit(ask, SystemTime::now()).await else { panic!("R not granted") };
    assert!(x.usage_id < r.usage_id, "X admitted first");
    worker.finish_written(x.clone(), None, SystemTime::now()).await;
    let resets = Some(Duration::from_secs(1800));
    worker.observe_quota(ask, &x, &[crate::credits::requests_left(9, 10, resets)], SystemTime::now()).await;
    worker.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 2, "X's figure: R newer, nothing learnt or taken");
    loser.release(r).await;
    loser.answers_recorded().await;
    assert_eq!(
        used(&env, "provider", "p", "requests").await,
        1,
        "X's figure read R as not sent: R's slot should be back"
    );
}

/// Finding 2, through the worker: round 2's finding 3 again, with calls in three windows. Three
/// jobs lose the probes of three providers at once, each provider's windows busy (held just
/// under 1 s each, one after the other, as a queue of admissions and figures holds them): each
/// release waits about 2.4 s in all, none of its waits past `lock_timeout`, each a timeout "in a
/// row" for `guarded`, and the reachable database is taken for down (degraded mode: local
/// shares, no ledger).
#[tokio::test]
async fn releases_over_several_busy_windows_do_not_mark_a_reachable_database_down() {
    let env = TestEnv::new().await;
    let store = PgStore::connect_lazy(&env.database_url, 8).unwrap();
    store.migrate().await.unwrap();
    let limits = [
        requests(10),
        tokens(1000),
        fallback_worker::config::LimitConfig {
            requests: Some(100),
            tokens: None,
            per: Duration::from_secs(60),
            resets: None,
        },
    ];
    let providers = ["p1", "p2", "p3"];
    let mut lost = Vec::new();
    for provider in providers {
        let ask = Ask { provider, limits: &limits, pools: &[], tokens: 10, flight: HOLD };
        let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else { panic!("not granted") };
        lost.push(permit);
    }
    // Round k holds the k-th window (canonical order) of every provider.
    let mut rounds: Vec<Vec<sqlx::PgConnection>> = Vec::new();
    for k in 0..3i64 {
        let mut round = Vec::new();
        for provider in providers {
            let mut h = env.db().await;
            sqlx::query("BEGIN").execute(&mut h).await.unwrap();
            sqlx::query(
                "SELECT 1 FROM quota_window WHERE (kind, scope, measure, window_ms, calendar) = \
                   (SELECT kind, scope, measure, window_ms, calendar FROM quota_window WHERE scope = $1 \
                     ORDER BY kind COLLATE \"C\", scope COLLATE \"C\", measure COLLATE \"C\", window_ms, \
                              calendar COLLATE \"C\" OFFSET $2 LIMIT 1) FOR UPDATE",
            )
            .bind(provider)
            .bind(k)
            .execute(&mut h)
            .await
            .unwrap();
            round.push(h);
        }
        rounds.push(round);
    }
    for permit in lost {
        store.release(permit).await;
    }
    let (went_down, _) = tokio::join!(
        async {
            let mut went_down = false;
            let until = std::time::Instant::now() + Duration::from_secs(4);
            while std::time::Instant::now() < until {
                went_down |= store.is_degraded();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            went_down
        },
        async {
            for round in rounds {
                tokio::time::sleep(Duration::from_millis(800)).await;
                for mut h in round {
                    sqlx::query("COMMIT").execute(&mut h).await.unwrap();
                }
            }
        }
    );
    assert!(!went_down, "three releases over busy windows marked the reachable database down");
}
