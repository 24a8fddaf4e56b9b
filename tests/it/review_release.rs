//! Adversarial review of ca5a024 ("a job that loses the half-open probe gives its slot back
//! uncounted", `ProviderState::release`). Each test fails on ca5a024.

use std::time::{Duration, SystemTime};

use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::credits::{granted, requests, requests_left};
use crate::ledger_batching::{release, until_waiting_on_locks};
use crate::review_finish::used;
use crate::review_outage::{an_outage_call, hourly_tokens, lock_window, store_behind_relay};
use crate::review_probe2::{HOLD, expired_circuit, migrated};
use crate::support::*;

/// Finding 1. `release_call` drops the refusal this worker keeps (`quota_blocked`). That refusal
/// is also what stops an outage admission: "only an unreachable database hands limits to this
/// worker's own share, and not over the database's last word" (`PgStore::admit`). 10 requests an
/// hour, two workers (a local share of 5 each). Another worker has 8, this one 2: the window is
/// full, this worker's next ask is refused and the refusal kept (for the hour). One of its calls
/// loses the probe and is released (under ca5a024 the window then counted 9, one slot free; it
/// now counts the call as learnt use until a figure takes it back). The database then goes away. With the refusal kept (before ca5a024) no call is admitted locally; with it
/// dropped the worker admits up to its local share less its own calls (5 - 1 = 4): 9 + 4 = 13
/// calls in a window of 10 (and the write-back then writes 13 into the shared window).
#[tokio::test]
async fn a_release_does_not_let_an_outage_admit_past_the_databases_refusal() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let other = migrated(&env.database_url, 4).await;
    other.heartbeat("other").await.unwrap();
    assert_eq!(store.heartbeat("this").await.unwrap(), 2, "two workers alive: a local share of 5 of 10 each");
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let mut others = Vec::new();
    for _ in 0..8 {
        others.push(granted(&other, ask).await);
    }
    let _sent = granted(&store, ask).await;
    let lost = granted(&store, ask).await;
    assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::OverQuota { .. }), "the window is full");
    // The job of `lost` loses the probe: the chain releases its permit.
    store.release(lost).await;
    store.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    relay.set_down(true);
    let mut admitted_locally = 0;
    for _ in 0..10 {
        if let Admission::Granted(_) = store.admit(ask, SystemTime::now()).await {
            admitted_locally += 1;
        }
    }
    assert!(
        counted + admitted_locally <= 10,
        "the database's refusal was dropped by the release: {admitted_locally} calls admitted from the local \
         share while the shared window held {counted} of 10 (degraded: {})",
        store.is_degraded()
    );
    relay.set_down(false);
}

/// Finding 2. The release's write is not waited for (and may wait for a retry after a busy
/// batch, or for the write-back of an outage): "until it lands the windows count more, never
/// less". Not so when a rate-limit figure is observed meanwhile: `fallback_observe` reads every
/// real row older than the observed call as seen by the provider and takes back learnt use for
/// it; the release then zeroes the row as well. 10 requests an hour; another client of the key
/// has used 5 (learnt from an earlier answer). The loser is admitted, then the prober; the probe
/// answers with "3 left" (5 + our first call + the probe = 7): the observation takes back one
/// learnt request for the loser's row (still counting). The loser's release then lands: the
/// window counts 6 where the provider counts 7, and admits a call the provider refuses (429).
#[tokio::test]
async fn a_release_that_lands_after_the_probes_figure_leaves_the_window_below_the_providers_count() {
    let env = TestEnv::new().await;
    let (prober, loser) = (migrated(&env.database_url, 4).await, migrated(&env.database_url, 4).await);
    let limits = [requests(10)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    // Another client of the key used 5: the answer to our first call says 4 of 10 left.
    let first = granted(&prober, ask).await;
    prober.finish_written(first.clone(), None, SystemTime::now()).await;
    prober.observe_quota(ask, &first, &[requests_left(4, 10, resets)], SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 6, "5 learnt + our first call");
    expired_circuit(&prober, "p", 300).await;
    let lost = granted(&loser, ask).await;
    let probe = granted(&prober, ask).await;
    assert!(prober.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the prober takes the probe");
    assert!(!loser.claim_probe("p", SystemTime::now(), HOLD).await.is_call(), "the other loses it");
    // The probe reaches the provider (the loser's call never does): 5 + 1 + 1 counted, 3 left.
    prober.finish_written(probe.clone(), None, SystemTime::now()).await;
    prober.observe_quota(ask, &probe, &[requests_left(3, 10, resets)], SystemTime::now()).await;
    // The loser's release lands after the figure.
    loser.release(lost).await;
    loser.answers_recorded().await;
    prober.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 7, "the provider counts 7 of 10, the shared window {counted}");
}

/// Finding 3. A call admitted locally during an outage and released while the write-back is
/// writing it (after `insert_calls` read it as in flight, before `written_back` has its entry):
/// the release finds no entry (nothing written) and takes the call out of the worker's own view,
/// so the write-back's post-check finds no answer either. The call is written back in flight
/// and never ended: it counts its 100 tokens until its flight's end plus the window, longer
/// than the answered call it counted as before ca5a024. `finish` handles the same race
/// ("whoever takes the entry out writes the answer"), and a call admitted locally is now
/// released through it.
#[tokio::test]
async fn a_call_released_while_the_write_back_writes_it_is_not_left_in_flight() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_relay(&env).await;
    let permit = an_outage_call(&env, &store, &relay, &hourly_tokens()).await;
    let locker = lock_window(&env).await;
    relay.set_down(false);
    // The write-back's insert of the outage's call waits on the window.
    until_waiting_on_locks(&env, 1).await;
    // Its job loses the probe meanwhile.
    store.release(permit).await;
    release(locker).await;
    eventually("the database is back", || async { !store.is_degraded() }).await;
    store.answers_recorded().await;
    // Answered as a call that reported no count (its estimate stands: the write-back wrote it
    // as in flight, and a figure may count it as sent), never left in flight.
    assert_eq!(used(&env, "provider", "p", "tokens").await, 200, "the first call and the released one's estimate");
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM quota_use WHERE scope = 'p' AND NOT learnt AND leaves_at > now() + interval '1 hour'",
    )
    .fetch_one(&mut env.db().await)
    .await
    .unwrap();
    assert_eq!(in_flight, 0, "no row of the released call is left in flight");
}

/// Finding 2, through a credit and with no write delayed: a call admitted from a credit just
/// before the credit closes loses the probe just after. The credit's close wrote it among the
/// credit's calls (2); the release only takes it out of the book, and the windows learn of it
/// when the credit ends. Meanwhile another call, admitted after the close, answers with the
/// provider's figure: the closed credit counts as seen by that figure, so one learnt request is
/// taken back for the released call. The credit's end then removes that call as well: 5002
/// counted where the provider counts 5003. (Before ca5a024 the lost call stayed in the credit:
/// 5003 both.)
#[tokio::test]
async fn a_credit_call_released_after_its_credit_closed_leaves_the_window_below_the_providers_count() {
    let env = TestEnv::new().await;
    let worker = crate::credits::Worker::start(&env).await;
    let a = &worker.store;
    let b = migrated(&env.database_url, 4).await;
    let limits = [requests(100_000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: HOLD };
    let resets = Some(Duration::from_secs(1800));
    // Another client of the key used 5000: the answer to a first call (a single ask of `b`,
    // which has no listener and so no credit) says so.
    let first = granted(&b, ask).await;
    assert!(!first.from_credit);
    b.finish_written(first.clone(), None, SystemTime::now()).await;
    b.observe_quota(ask, &first, &[requests_left(100_000 - 5001, 100_000, resets)], SystemTime::now()).await;
    assert_eq!(used(&env, "provider", "p", "requests").await, 5001);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lost = granted(a, ask).await;
    let sent = granted(a, ask).await;
    assert!(lost.from_credit && sent.from_credit && lost.usage_id == sent.usage_id, "{lost:?} {sent:?}");
    eventually("the credit has closed with its two calls in flight", || async {
        used(&env, "provider", "p", "requests").await == 5001 + 2
    })
    .await;
    // `lost`'s job loses the probe now.
    a.release(lost).await;
    // A call admitted after the close is sent and answered: 5000 + first + sent + this = 5003.
    let later = granted(&b, ask).await;
    b.finish_written(later.clone(), None, SystemTime::now()).await;
    b.observe_quota(ask, &later, &[requests_left(100_000 - 5003, 100_000, resets)], SystemTime::now()).await;
    a.finish(sent, None, SystemTime::now()).await;
    a.answers_recorded().await;
    b.answers_recorded().await;
    let counted = used(&env, "provider", "p", "requests").await;
    assert!(counted >= 5003, "the provider counts 5003, the shared window {counted}");
}
