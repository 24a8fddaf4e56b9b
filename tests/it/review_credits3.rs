//! Adversarial review 3 of admission credits (7deda6f, after review 2's fixes): each test but
//! the `held_` ones is a fault found, and fails on that commit. Two were left ignored with
//! their reasons (figures observed out of order; a credit's own figures counting its calls
//! twice) and are fixed by migration 0013 (learnt rows say which figure taught them; a worker
//! sends how much of its credit a call's figure holds): they fail on 75c6304. The tests after
//! them (`observe_sent`, the 10-argument `fallback_observe`) hold 0013's rule for credits.

use std::time::{Duration, SystemTime};

use fallback_worker::state::{Ask, ProviderState};

use crate::credits::{Worker, a_dead_credit, ask, granted, requests, tokens};
use crate::review_finish::used;
use crate::support::*;

/// One call of p admitted alone (no credit: `p_requests` NULL) (p's 1024 requests an hour): its id.
pub(crate) async fn one_call(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT usage_id FROM fallback_admit_batch('p', ARRAY['provider'], ARRAY['p'], ARRAY['requests'], \
         ARRAY[3600000]::bigint[], ARRAY[''], ARRAY[1024]::bigint[], ARRAY[NULL]::timestamptz[], \
         ARRAY[NULL]::timestamptz[], ARRAY[1]::bigint[], ARRAY[30000]::bigint[], ARRAY[NULL]::timestamptz[], \
         ARRAY[NULL]::bigint[], ARRAY[NULL]::bigint[])",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// The credit's end, as its worker writes it: its 4 calls admitted and answered.
async fn credit_ended_with_its_4_calls(env: &TestEnv, credit: i64) {
    sqlx::query(
        "SELECT fallback_finish_batch(ARRAY[$1]::bigint[], ARRAY[NULL]::bigint[], ARRAY[4]::bigint[], \
         ARRAY[true], ARRAY[1]::bigint[])",
    )
    .bind(credit)
    .execute(&mut env.db().await)
    .await
    .unwrap();
}

/// The provider's figure for p's hour (1024 requests): `taken` of them, in the answer to `call`
/// (0012's signature, as a worker of 0012 observes: the whole of a credit is unseen).
async fn observe(env: &TestEnv, taken: i64, call: Option<i64>) -> i64 {
    sqlx::query_scalar(
        "SELECT fallback_observe('provider', 'p', 'requests', 3600000::bigint, '', 1024::bigint, \
         1024 - $1::bigint, now() + interval '1 hour', $2::bigint)",
    )
    .bind(taken)
    .bind(call)
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// As [`observe`], through 0013's signature: with `sent`, the figure is in the answer to a call
/// of credit `call` and holds `sent` of the credit's calls.
pub(crate) async fn observe_sent(env: &TestEnv, taken: i64, call: Option<i64>, sent: Option<i64>) -> i64 {
    sqlx::query_scalar(
        "SELECT fallback_observe('provider', 'p', 'requests', 3600000::bigint, '', 1024::bigint, \
         1024 - $1::bigint, now() + interval '1 hour', $2::bigint, $3::bigint)",
    )
    .bind(taken)
    .bind(call)
    .bind(sent)
    .fetch_one(&mut env.db().await)
    .await
    .unwrap()
}

/// Finding 1 (medium): rows with no `admitted_at` as the observed call. Every row written
/// before 0012's ALTER (calls of 0011 workers in flight across the upgrade), and every row of
/// `fallback_admit` (0007, still in the schema), has none. `fallback_observe` then counts only
/// credits *living now* as unseen, and since 0012 the `newer` sum leaves every credit row out:
/// a credit granted after X (larger id) that has already ended is in neither, so its calls
/// (sent after the provider took X's figure) are taken back from the learnt use. Before 0012
/// the `newer` sum counted it (its id is larger than X's).
#[tokio::test]
async fn an_observed_call_with_no_admitted_at_does_not_take_back_an_ended_credit_granted_after_it() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    // The provider counts 50 calls made elsewhere (learnt with no call known).
    assert_eq!(observe(&env, 50, None).await, 50);
    // X: admitted by a worker of 0011 just before the upgrade (its row has no admitted_at).
    let x = one_call(&env).await;
    sqlx::query("UPDATE quota_use SET admitted_at = NULL WHERE call_id = $1")
        .bind(x)
        .execute(&mut env.db().await)
        .await
        .unwrap();
    // While X is out, a credit is granted after it, admits its 4 calls, closes and ends.
    let credit = a_dead_credit(&env).await;
    assert!(credit > x);
    credit_ended_with_its_4_calls(&env, credit).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 55);
    // X answers: the provider had taken 50 + X when it received it (not the credit's 4).
    observe(&env, 51, Some(x)).await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 55, "the hour counts {counted}; the provider has taken 55");
}

/// Finding 2 (high, older than credits: 0007/0011's take-back, kept by 0012): figures observed
/// out of order. Y is admitted after X and answers first; its figure (higher: calls made
/// elsewhere while X was out) is learnt. X's older figure arrives next: `fallback_observe`
/// reads "used minus the calls after X" as what the provider counted at X, but `used` now holds
/// the use learnt from Y's later figure, so that use is taken back as an excess. The window ends
/// below the provider's count (here by 50). A credit's own learnt-beside use is lost the same way.
/// Fixed (0013): the use learnt from Y's figure is newer than X's, neither counted as seen by
/// it nor taken back.
#[tokio::test]
async fn an_older_figure_observed_after_a_newer_one_does_not_take_back_what_the_newer_one_learnt() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    let x = one_call(&env).await;
    let y = one_call(&env).await;
    assert!(y > x);
    // Provider: 100 elsewhere, X (figure 101), 50 elsewhere, Y (figure 152). Y answers first.
    assert_eq!(observe(&env, 152, Some(y)).await, 152);
    observe(&env, 101, Some(x)).await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 152, "the hour counts {counted}; the provider has taken 152");
}

/// Finding 3 (low): the deadline timer racing the last answer. The timer ends a closed credit
/// at its deadline with the in-flight call counted at its estimate, and drops the credit from
/// the book; an answer that comes after (a call slower than its flight plus the 5 s margin, or
/// an answer whose bookkeeping was held up) finds no credit and `credit_answer` returns None:
/// the provider's token count is never written. A call admitted alone writes its count
/// whenever it answers.
#[tokio::test]
async fn a_credit_call_answering_after_the_deadline_timer_still_counts_its_tokens() {
    let env = TestEnv::new().await;
    let worker = Worker::start(&env).await;
    let store = &worker.store;
    let limits = [requests(100_000), tokens(100_000_000)];
    let short = Ask { flight: Duration::from_millis(100), ..ask(&limits, 100) };
    let call = granted(store, short).await;
    assert!(call.from_credit);
    eventually("the timer has ended the credit", || async {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_use WHERE scope = 'p' AND credit_live")
            .fetch_one(&mut env.db().await)
            .await
            .unwrap();
        live == 0
    })
    .await;
    assert_eq!(used(&env, "provider", "p", "tokens").await, 100);
    store.finish(call, Some(9000), SystemTime::now()).await;
    store.answers_recorded().await;
    let counted = used(&env, "provider", "p", "tokens").await;
    assert!(counted >= 9000, "the hour counts {counted} tokens; the provider has taken 9000");
}

/// Finding 4 (medium, the 97 % goal): a credit's own calls learnt a second time. Every answer
/// of a credit's call is observed as the credit (`p_call` = its id), and the whole credit is
/// then taken as unseen (`credit_open_until` is after its own `admitted_at`), although the
/// figure of its k-th call holds its first k calls. Each figure is learnt beside the credit:
/// after its 4 calls are observed the window counts 50 + 4 (the credit) + 4 (learnt again),
/// and nothing gives them back while only this credit's calls are observed (a later figure on
/// the credit takes its 4 as unseen again). On a key used only through credits each credit's
/// calls count twice until a call admitted after it is observed.
/// Fixed (0013): the worker sends, with the figure of the credit's k-th call, that the credit
/// had sent k calls; only the rest of the credit is unseen.
#[tokio::test]
async fn the_figures_of_a_credits_own_calls_do_not_count_its_calls_twice() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    assert_eq!(observe(&env, 50, None).await, 50);
    let credit = a_dead_credit(&env).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 54);
    // Its 4 calls answer, each with the provider's figure when it received it.
    for k in 1..=4 {
        observe_sent(&env, 50 + k, Some(credit), Some(k)).await;
    }
    credit_ended_with_its_4_calls(&env, credit).await;
    // A last figure on the credit (its 4th call's, the provider still at 54) gives nothing back.
    observe_sent(&env, 54, Some(credit), Some(4)).await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 54, "the hour counts {counted}, below the provider's 54");
    assert!(counted <= 54, "the hour counts {counted}; the provider has taken 54: the credit's calls twice");
}

/// Held: an observation of a credit's own call never takes back what its calls sent, even
/// once the credit has closed and ended (its `credit_open_until` is after its admission).
#[tokio::test]
async fn held_a_credits_own_figure_after_it_ended_takes_nothing_back_below_the_provider() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    assert_eq!(observe(&env, 50, None).await, 50);
    let credit = a_dead_credit(&env).await;
    let x = one_call(&env).await;
    credit_ended_with_its_4_calls(&env, credit).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 55);
    // The credit's first call's figure (50 + 1), observed after everything else.
    observe(&env, 51, Some(credit)).await;
    assert!(x > credit);
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 55, "the hour counts {counted}; the provider has taken 55");
}

/// Held (0013): a credit's own figures observed out of order. Its 3rd call's figure (60 more
/// calls made elsewhere meanwhile) is learnt first; its 1st call's figure (older, lower) comes
/// next. Which of a credit's figures is older is not known: the use learnt from its own
/// figures is never taken back by another of them.
#[tokio::test]
async fn held_a_credits_older_figure_does_not_take_back_what_its_newer_one_learnt() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    assert_eq!(observe(&env, 50, None).await, 50);
    let credit = a_dead_credit(&env).await;
    // Provider: 50, the credit's call 1 (figure 51), 60 elsewhere, calls 2 and 3 (figure 113).
    assert_eq!(observe_sent(&env, 113, Some(credit), Some(3)).await, 113 + 1, "learnt beside the credit's 4th call");
    observe_sent(&env, 51, Some(credit), Some(1)).await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 114, "the hour counts {counted}; the provider has taken 113, and 1 call may come");
}

/// Held (0013): use learnt from a credit's figure while a call X admitted during its lifetime
/// is out. The credit's figures may be taken after X's: X's older (lower) figure neither
/// counts that use as seen nor takes it back.
#[tokio::test]
async fn held_a_call_admitted_while_a_credit_admitted_does_not_take_back_what_the_credits_figure_taught() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    assert_eq!(observe(&env, 50, None).await, 50);
    let credit = a_dead_credit(&env).await;
    let x = one_call(&env).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 55);
    // Provider: 50, X (figure 51), 100 elsewhere, the credit's calls 1 and 2 (figure 153).
    assert_eq!(
        observe_sent(&env, 153, Some(credit), Some(2)).await,
        153 + 2,
        "learnt beside the credit's 2 calls to come"
    );
    observe(&env, 51, Some(x)).await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 155, "the hour counts {counted}; the provider has taken 153, and 2 calls may come");
}

/// Held (0013): what a credit's figure taught is taken back by the figure of a call admitted
/// after the credit stopped admitting (its figure is newer): the provider's count fell (a
/// sliding window), and the window follows it down to what is still in flight.
#[tokio::test]
async fn held_a_call_admitted_after_a_credit_closed_takes_back_what_the_credits_figure_taught() {
    let env = TestEnv::new().await;
    let _migrated = Worker::start(&env).await;
    let credit = a_dead_credit(&env).await;
    credit_ended_with_its_4_calls(&env, credit).await;
    // Its 4th call's figure: 100 elsewhere and its 4 calls.
    assert_eq!(observe_sent(&env, 104, Some(credit), Some(4)).await, 104);
    let x = one_call(&env).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 105);
    // X's figure: the 100 made elsewhere have left the provider's window.
    assert_eq!(observe(&env, 5, Some(x)).await, 5, "the learnt 100 taken back");
}
