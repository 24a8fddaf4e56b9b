//! Adversarial review, round 3, of the release (5ef37db, migration 0016: a released call
//! becomes learnt use with `learnt_at = '-infinity'`). Each test fails on 5ef37db.

use std::time::{Duration, SystemTime};

use fallback_worker::state::{Ask, ProviderState};

use crate::credits::{granted, requests, requests_left};
use crate::review_finish::used;
use crate::review_probe2::{HOLD, migrated};
use crate::support::*;

/// Finding 1. A learnt row says which figures may take it back (`learnt_at`): a figure of a
/// call admitted before the row was learnt reads it as *newer* (`v_later`) and leaves it. But
/// a row learnt while the released call still counted as a real call is short by that call: the
/// figure that taught it read the call as counted by the provider (`v_used`), so it learnt only
/// the rest of what it saw. The released call, learnt at '-infinity', is then *older* than every
/// figure, also than one that reads the row it stood in for as newer: that figure takes the
/// released call back, and the window counts one less than the provider.
///
/// 10 requests an hour. Calls B, A, R are admitted in that order. The provider receives B (its
/// figure: 1 counted), then 5 requests of another client, then A (its figure: 7 counted; R is
/// never sent). A's figure is observed first: 7 > 3 counted, so 4 are learnt (5 others less R,
/// which reads as sent). R loses the probe and is released. B's slow answer then comes with its
/// figure "9 of 10 left": the learnt 4 are newer than B, R is older, and the excess (7 counted,
/// A newer, 4 later, 1 seen by B) is 1: R is taken back. The window counts 6 where the provider
/// counts 7 (B, 5 others, A) and admits 4 more calls: 11 at the provider. Answered (as before
/// the change), R stays newer than B's figure and the window keeps 7.
#[tokio::test]
async fn a_released_call_is_not_taken_back_by_a_figure_older_than_the_use_it_stood_in_for() {
    let env = TestEnv::new().await;
    let (worker, loser) = (migrated(&env.database_url, 4).await, migrated(&env.database_url, 4).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    let b = granted(&worker, ask).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let a = granted(&worker, ask).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let lost = granted(&loser, ask).await;
    assert!(b.usage_id < a.usage_id && a.usage_id < lost.usage_id, "{b:?} {a:?} {lost:?}");
    // A's figure (B, 5 others, A: 7 of 10) is observed first.
    worker.finish_written(a.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &a, &[requests_left(3, 10, resets)], SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 7, "B, A, R and 4 learnt");
    // R's job loses the probe.
    loser.release(lost).await;
    loser.answers_recorded().await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 7, "the release counts it as learnt use");
    // B's figure, taken before the other client's use and A, comes last.
    worker.finish_written(b.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &b, &[requests_left(9, 10, resets)], SystemTime::now()).await;
    worker.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 7, "the provider counts 7 of 10 (B, 5 others, A), the shared window {counted}");
}

/// Finding 2 (not of this change: `fallback_observe` since 0007, kept by 0013; found while
/// reading it for finding 1; kept as a known limitation, see the next test). A figure that
/// shows more than the window counts learns the
/// difference "beyond the other rows": `v_target - (v_used - v_live)`, where `v_used` holds the
/// calls admitted *after* the observed one too, which its figure does not count (the take-back
/// branch leaves them out as `newer`; the learning branch does not). They are read as counted
/// and learnt that much less: when they reach the provider the window counts less than it.
///
/// 10 requests an hour. X then N are admitted. The provider has 5 requests of another client,
/// then receives X: its figure says 4 of 10 left (6 counted). N is still on its way. The
/// window counted 2 (X, N) and learns 4, not 5: 6 counted, where the provider counts 7 once N
/// arrives, and 4 more calls are admitted (11 at the provider).
#[tokio::test]
#[ignore = "known limitation of fallback_observe's learning branch: it counts calls admitted after the observed one as seen; leaving those in flight out was tried and cost 6 points of a strict limit (overtaking calls learnt twice); see README"]
async fn a_figure_learnt_while_a_later_call_is_in_flight_does_not_count_that_call_as_seen() {
    let env = TestEnv::new().await;
    let worker = migrated(&env.database_url, 4).await;
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    let x = granted(&worker, ask).await;
    let n = granted(&worker, ask).await;
    worker.finish_written(x.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &x, &[requests_left(4, 10, resets)], SystemTime::now()).await;
    worker.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    drop(n);
    assert!(counted >= 7, "the provider counts 6 (5 others, X) and N on its way: 7 of 10; the shared window {counted}");
}

/// Why finding 2 is not fixed by leaving the later calls out: a call admitted after the
/// observed one that overtook it at the provider is in its figure, answered or still in flight.
/// Read as not in it (a migration tried in session 28, not kept), each overtaking learnt one
/// request too many, held until the figure of a call admitted after the learning took it back:
/// at a strict limit the backlog benchmark's planned mode fell from 98.3 % to 92.3 % in runs
/// alternating the two builds.
///
/// 10 requests an hour. X then Y are admitted; Y reaches the provider first (and is answered,
/// or not yet). The provider holds Y, 5 requests of another client and X: X's figure says 3 of
/// 10 left. The window counts X and Y, and learns 5.
#[tokio::test]
async fn a_later_call_that_overtook_the_observed_one_is_not_learnt_twice() {
    let env = TestEnv::new().await;
    let worker = migrated(&env.database_url, 4).await;
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    for (scope, answered) in [("p", true), ("q", false)] {
        let ask = Ask { provider: scope, ..ask };
        let x = granted(&worker, ask).await;
        let y = granted(&worker, ask).await;
        if answered {
            worker.finish_written(y, None, SystemTime::now()).await;
        }
        worker.finish_written(x.clone(), None, SystemTime::now()).await;
        worker.observe_quota(ask, &x, &[requests_left(3, 10, resets)], SystemTime::now()).await;
        worker.answers_recorded().await;
        let counted = used(&env, "provider", scope, "requests").await;
        assert_eq!(counted, 7, "Y (answered: {answered}), 5 others and X: nothing learnt twice");
    }
}

/// Finding 1, where the released call stood in for use *taken back* (no row learnt after its
/// admission: a fix that dates the released row after the rows learnt since its admission does
/// not cover this). A figure observed while the call counted as real read it as sent and took
/// back that much of older learnt use; a figure that reads that learnt use as newer later takes
/// the released call back as well.
///
/// 10 requests an hour. Z is admitted; the provider receives it (its figure: 1 counted), then 5
/// requests of another client, then F (admitted after Z): F's figure (7) is observed and 5 are
/// learnt, after Z's admission. R, then Y are admitted; the provider receives Y (8 counted, R
/// never sent); Y's figure finds 9 counted with nothing newer and takes one learnt request back
/// (for R, read as sent): 8. R is released (learnt, '-infinity'). Z's slow answer comes with "9
/// of 10 left": the learnt 4 are newer than Z, R is older, F and Y are newer: 8 - 2 - 4 - 1 = 1
/// is taken back, R. The window counts 7 where the provider counts 8.
#[tokio::test]
async fn a_released_call_that_a_take_back_counted_as_sent_is_not_taken_back_again_by_an_older_figure() {
    let env = TestEnv::new().await;
    let (worker, loser) = (migrated(&env.database_url, 4).await, migrated(&env.database_url, 4).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    let figure = |left: u64| [requests_left(left, 10, resets)];
    let z = granted(&worker, ask).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let f = granted(&worker, ask).await;
    worker.finish_written(f.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &f, &figure(3), SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 7, "Z, F and 5 learnt");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let lost = granted(&loser, ask).await;
    let y = granted(&worker, ask).await;
    worker.finish_written(y.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &y, &figure(2), SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 8, "R read as sent: one learnt request taken back");
    loser.release(lost).await;
    loser.answers_recorded().await;
    worker.finish_written(z.clone(), None, SystemTime::now()).await;
    worker.observe_quota(ask, &z, &figure(9), SystemTime::now()).await;
    worker.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 8, "the provider counts 8 of 10 (Z, 5 others, F, Y), the shared window {counted}");
}
