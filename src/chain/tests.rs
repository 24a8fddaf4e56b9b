//! The engine driven by scripted providers, the in-memory store and a manual clock: no network,
//! no broker, no wall time. Every instant below is exact because only the tests move the clock.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::json;
use tokio::sync::Notify;

use super::clock::ManualClock;
use super::*;
use crate::providers::FailureKind;
use crate::state::memory::MemoryStore;

/// Where every test's clock starts.
fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn completion() -> Completion {
    Completion {
        status: 200,
        request_id: "req".into(),
        body: json!({"object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}]}),
        total_tokens: Some(10),
        exhausted_until: None,
        quota: Vec::new(),
    }
}

/// A provider that answers from a script (then succeeds) and counts its calls.
struct Scripted {
    answers: Mutex<VecDeque<Result<(), Failure>>>,
    calls: Mutex<usize>,
}

impl Scripted {
    fn new(answers: Vec<Result<(), Failure>>) -> Arc<Self> {
        Arc::new(Self { answers: Mutex::new(answers.into()), calls: Mutex::new(0) })
    }

    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl ChatProvider for Scripted {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        *self.calls.lock().unwrap() += 1;
        let next = self.answers.lock().unwrap().pop_front().unwrap_or(Ok(()));
        next.map(|()| completion())
    }
}

/// A provider that answers 503 until an instant of the test's clock, then succeeds.
struct Outage {
    clock: Arc<ManualClock>,
    until: SystemTime,
    failures: Mutex<usize>,
    successes: Mutex<usize>,
}

#[async_trait::async_trait]
impl ChatProvider for Outage {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        if self.clock.now() < self.until {
            *self.failures.lock().unwrap() += 1;
            return Err(failure(FailureKind::Server, 503));
        }
        *self.successes.lock().unwrap() += 1;
        Ok(completion())
    }
}

/// A provider whose first call stays in flight until the test releases it.
#[derive(Default)]
struct Gated {
    entered: Notify,
    release: Notify,
    calls: Mutex<usize>,
}

#[async_trait::async_trait]
impl ChatProvider for Gated {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls == 1
        };
        if first {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(completion())
    }
}

/// A provider whose calls all stay in flight until the test releases them, then answer 503.
#[derive(Default)]
struct Stalled {
    in_flight: Mutex<usize>,
    release: Notify,
}

#[async_trait::async_trait]
impl ChatProvider for Stalled {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        let released = self.release.notified();
        *self.in_flight.lock().unwrap() += 1;
        released.await;
        Err(failure(FailureKind::Server, 503))
    }
}

fn failure(kind: FailureKind, status: u16) -> Failure {
    Failure::new(kind, Some(status), format!("HTTP {status}"))
}

fn rate_limited(retry_at: SystemTime) -> Failure {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(retry_at);
    limited
}

fn member(name: &str, free: bool, provider: Arc<dyn ChatProvider>) -> Member {
    Member {
        name: name.into(),
        model: format!("{name}-model"),
        free,
        context_window: None,
        max_retries: 0,
        limits: Vec::new(),
        pools: Default::default(),
        timeout: secs(10),
        pool_mates: Vec::new(),
        timeouts: Default::default(),
        provider,
    }
}

fn chain(members: Vec<Member>, free_wait: Duration) -> Chain {
    Chain {
        name: "default".into(),
        members,
        max_wait: secs(600),
        max_wait_limit: secs(86_400),
        free_wait,
        accept: Accept::default(),
    }
}

fn body() -> ChatBody {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100})).unwrap()
}

fn job() -> Job {
    Job { custom_id: "job".into(), chain: "default".into(), max_wait: None, body: body(), accept: None }
}

/// `job` under the contract's default checks.
fn request(job: &Job) -> Request<'_> {
    Request { body: &job.body, expect: Expectation::for_job(Accept::default(), &job.body).unwrap() }
}

fn outcomes(progress: &JobProgress) -> Vec<(String, AttemptOutcome)> {
    progress.attempts.iter().map(|a| (a.provider.clone(), a.outcome)).collect()
}

async fn pass(chain: &Chain, progress: &mut JobProgress, store: &MemoryStore, clock: &ManualClock) -> Verdict {
    run_pass(chain, &request(&job()), chain.max_wait, progress, store, clock).await
}

/// A whole run, holding the job in place for up to `hold_limit`.
async fn run_holding(
    chain: &Chain,
    max_wait: Duration,
    progress: &mut JobProgress,
    store: &MemoryStore,
    clock: &ManualClock,
    hold_limit: Duration,
) -> Verdict {
    let hold = HoldPolicy::new(hold_limit, clock.now(), hold_limit.saturating_add(secs(60)));
    run(chain, &job(), max_wait, progress, store, hold, clock).await
}

fn answered_by(verdict: &Verdict) -> Option<&str> {
    match verdict {
        Verdict::Answered { provider, .. } => Some(provider),
        _ => None,
    }
}

#[tokio::test]
async fn a_429_moves_on_at_once_and_cools_the_provider_for_everyone() {
    let clock = ManualClock::starting_at(t0());
    let (a, b) = (Scripted::new(vec![Err(rate_limited(t0() + secs(30)))]), Scripted::new(vec![]));
    let chain = chain(vec![member("a", true, a.clone()), member("b", true, b.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut progress, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"), "{verdict:?}");
    assert_eq!(outcomes(&progress), vec![("a".into(), AttemptOutcome::RateLimited), ("b".into(), AttemptOutcome::Ok)]);
    let cooldown = store.cooldown_of("a").unwrap();
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::RateLimited, t0() + secs(30)));

    // The next job does not call the cooling provider at all.
    let mut next = JobProgress::new(clock.now());
    pass(&chain, &mut next, &store, &clock).await;
    assert_eq!(a.calls(), 1);
    assert_eq!(next.attempts[0].outcome, AttemptOutcome::SkippedCooldown);
}

#[tokio::test]
async fn timeouts_cool_down_30s_after_the_in_place_retries() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Err(failure(FailureKind::Timeout, 0)), Err(failure(FailureKind::Timeout, 0))]);
    let mut with_retry = member("a", true, a.clone());
    with_retry.max_retries = 1;
    let chain = chain(vec![with_retry, member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"));
    assert_eq!(a.calls(), 2, "one try plus max_retries = 1");
    assert!(clock.now() > t0(), "the retry waited its backoff on the clock");
    let cooldown = store.cooldown_of("a").unwrap();
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::Unreachable, clock.now() + secs(30)));
}

/// A hanging provider times out every job in flight at about the same time: each retrying in
/// place would send it one more request, and wait one more timeout, before any cooled it down.
/// A timeout that follows another job's on this worker within one timeout cools the provider
/// down at once; a lone one (a fluke, as far as this worker can tell) is still retried.
#[tokio::test]
async fn a_timeout_right_after_another_jobs_cools_the_provider_instead_of_retrying() {
    let clock = ManualClock::starting_at(t0());
    let hang = || Err(Failure::new(FailureKind::Timeout, None, "no answer within the provider's timeout"));
    let a = Scripted::new((0..6).map(|_| hang()).collect());
    let mut with_retry = member("a", true, a.clone());
    with_retry.max_retries = 1;
    let chain = chain(vec![with_retry, member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    // Each job against a store of its own: the cooldowns the others set do not hide `a`, so
    // only this worker's record of its timeouts tells the jobs apart.
    let alone = MemoryStore::new();
    pass(&chain, &mut JobProgress::new(clock.now()), &alone, &clock).await;
    assert_eq!(a.calls(), 2, "a lone timeout is retried once (its own first timeout is no other job's)");

    clock.advance(secs(1));
    let together = MemoryStore::new();
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &together, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"));
    assert_eq!(a.calls(), 3, "no retry in place: another job timed out on `a` a second ago");
    let cooldown = together.cooldown_of("a").unwrap();
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::Unreachable, clock.now() + secs(30)));

    clock.advance(secs(11));
    pass(&chain, &mut JobProgress::new(clock.now()), &MemoryStore::new(), &clock).await;
    assert_eq!(a.calls(), 5, "more than a timeout (10 s) later, a timeout is alone again");
}

/// Review 32 (74fe6cc): an HTTP 408 is a `Timeout` too, but it comes at once, not after the
/// provider held the request for `timeout`. Two jobs one after the other (no overlap at all:
/// the first one's retry was answered before the second was sent) each get a 408 two seconds
/// apart: the second one's is taken for "jobs timing out together" (a hang), is not retried,
/// and cools the provider down 30 s for every worker, though it had just answered.
#[tokio::test]
async fn review32_a_408_after_another_jobs_answered_retry_is_not_a_hang() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![
        Err(failure(FailureKind::Timeout, 408)),
        Ok(()),
        Err(failure(FailureKind::Timeout, 408)),
        Ok(()),
    ]);
    let mut with_retry = member("a", true, a.clone());
    with_retry.max_retries = 1;
    let chain = chain(vec![with_retry, member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    let first = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(answered_by(&first), Some("a"), "a lone 408 is retried in place and answered");

    clock.advance(secs(2));
    let second = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(a.calls(), 4, "the second job's 408 is retried in place too");
    assert_eq!(answered_by(&second), Some("a"), "{second:?}");
    assert!(store.cooldown_of("a").is_none(), "a provider that answers is not cooled down for every worker");
}

#[tokio::test]
async fn client_errors_move_on_without_cooldown_and_fail_the_job_when_all_refuse() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Err(failure(FailureKind::Client, 400))]);
    let b = Scripted::new(vec![Err(failure(FailureKind::Client, 413))]);
    let chain = chain(vec![member("a", true, a), member("b", true, b)], Duration::ZERO);
    let store = MemoryStore::new();
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    let Verdict::Failed { code, message } = verdict else { panic!("{verdict:?}") };
    assert_eq!(code, ErrorCode::AllProvidersFailed);
    assert!(message.contains("a: client_error 400") && message.contains("b: client_error 413"), "{message}");
    assert!(store.cooldown_of("a").is_none());
}

#[tokio::test]
async fn auth_errors_cool_down_an_hour() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Err(failure(FailureKind::Auth, 401))]);
    let chain = chain(vec![member("a", true, a), member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    let cooldown = store.cooldown_of("a").unwrap();
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::Auth, t0() + secs(3600)));
}

#[tokio::test]
async fn a_withdrawn_model_is_recorded_cooled_an_hour_and_skipped_by_the_next_job() {
    let clock = ManualClock::starting_at(t0());
    let gone = Scripted::new(vec![Err(failure(FailureKind::ModelUnavailable, 404))]);
    let chain =
        chain(vec![member("gone", true, gone.clone()), member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    let mut first = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut first, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"), "{verdict:?}");
    let an_hour = humantime::format_rfc3339_millis(t0() + secs(3600)).to_string();
    let attempt = &first.attempts[0];
    assert_eq!((attempt.outcome, attempt.status), (AttemptOutcome::ModelUnavailable, Some(404)));
    assert_eq!(attempt.until.as_deref(), Some(an_hour.as_str()), "the attempt carries the cooldown's end");
    assert_eq!(store.cooldown_of("gone").unwrap().reason, CooldownReason::ModelUnavailable);

    clock.advance(secs(60));
    let mut second = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut second, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"));
    assert_eq!(
        outcomes(&second),
        vec![("gone".into(), AttemptOutcome::SkippedCooldown), ("b".into(), AttemptOutcome::Ok)]
    );
    assert_eq!(second.attempts[0].until.as_deref(), Some(an_hour.as_str()));
    assert_eq!(gone.calls(), 1, "one request finds out, not every job");
}

#[tokio::test]
async fn a_run_of_server_errors_opens_the_circuit_for_5s() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new((0..3).map(|_| Err(failure(FailureKind::Server, 500))).collect());
    let chain = chain(vec![member("a", true, a.clone()), member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    for _ in 0..3 {
        pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    }
    let cooldown = store.cooldown_of("a").expect("circuit open");
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::Circuit, t0() + secs(5)));
    clock.advance(Duration::from_millis(4999));
    pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(a.calls(), 3, "no call while the circuit is open");
}

/// Opens `provider`'s circuit in `store` as three failed calls would have, until `until`.
async fn open_circuit(store: &MemoryStore, provider: &str, until: SystemTime) {
    for _ in 0..CIRCUIT_THRESHOLD {
        store.record_server_error(provider, "HTTP 503").await;
    }
    let detail = "3 server errors in a row".to_string();
    store.cool_down(provider, Cooldown { until, reason: CooldownReason::Circuit, detail }).await;
}

#[tokio::test]
async fn one_job_probes_an_expired_circuit_while_the_others_keep_skipping_and_its_success_closes_it() {
    let clock = ManualClock::starting_at(t0());
    let store = MemoryStore::new();
    open_circuit(&store, "a", t0() + secs(5)).await;
    clock.advance(secs(5));
    let gated = Arc::new(Gated::default());
    let chain = chain(vec![member("a", true, gated.clone())], Duration::ZERO);

    let (mut prober, mut other) = (JobProgress::new(clock.now()), JobProgress::new(clock.now()));
    let probe = pass(&chain, &mut prober, &store, &clock);
    let meanwhile = async {
        gated.entered.notified().await;
        let verdict = pass(&chain, &mut other, &store, &clock).await;
        gated.release.notify_one();
        verdict
    };
    let (probed, skipped) = tokio::join!(probe, meanwhile);
    assert_eq!(answered_by(&probed), Some("a"), "{probed:?}");
    let hold_end = t0() + secs(5) + secs(10) + FLIGHT_MARGIN;
    assert!(matches!(skipped, Verdict::Wait { until, .. } if until == hold_end), "{skipped:?}");
    assert_eq!(outcomes(&other), vec![("a".into(), AttemptOutcome::SkippedCooldown)]);
    assert_eq!(*gated.calls.lock().unwrap(), 1, "one probe across all jobs");

    // The probe's success closed the circuit: the next job calls at once, not after the hold.
    assert_eq!(store.cooldown_of("a"), None);
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("a"));
    assert_eq!(*gated.calls.lock().unwrap(), 2);
}

#[tokio::test]
async fn a_failed_probe_reopens_the_circuit_for_twice_as_long() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new((0..5).map(|_| Err(failure(FailureKind::Server, 503))).collect());
    let chain = chain(vec![member("a", true, a.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    for _ in 0..3 {
        pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    }
    let mut opened = Vec::new();
    for _ in 0..2 {
        let until = store.cooldown_of("a").unwrap().until;
        clock.advance(until.duration_since(clock.now()).unwrap());
        let probe_at = clock.now();
        pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
        let reopened = store.cooldown_of("a").unwrap();
        assert_eq!(reopened.reason, CooldownReason::Circuit);
        opened.push(reopened.until.duration_since(probe_at).unwrap());
    }
    assert_eq!(opened, [secs(10), secs(20)], "the probe's hold (15 s) does not stretch the open time");
    assert_eq!(a.calls(), 5, "one call per open period");
}

#[tokio::test]
async fn the_late_503s_of_calls_in_flight_when_the_circuit_opens_do_not_lengthen_it() {
    let clock = Arc::new(ManualClock::starting_at(t0()));
    let store = Arc::new(MemoryStore::new());
    let stalled = Arc::new(Stalled::default());
    let chain = Arc::new(chain(vec![member("a", true, stalled.clone())], Duration::ZERO));
    let jobs: Vec<_> = (0..8)
        .map(|_| {
            let (chain, store, clock) = (chain.clone(), store.clone(), clock.clone());
            tokio::spawn(async move {
                let mut progress = JobProgress::new(clock.now());
                run_pass(&chain, &request(&job()), chain.max_wait, &mut progress, store.as_ref(), clock.as_ref()).await
            })
        })
        .collect();
    for _ in 0..1000 {
        if *stalled.in_flight.lock().unwrap() == 8 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(*stalled.in_flight.lock().unwrap(), 8, "all eight calls are in flight");
    stalled.release.notify_waiters();
    for job in jobs {
        let verdict = job.await.unwrap();
        assert!(matches!(verdict, Verdict::Wait { .. }), "{verdict:?}");
    }
    let circuit = store.cooldown_of("a").unwrap();
    assert_eq!(circuit.reason, CooldownReason::Circuit);
    assert_eq!(circuit.until, t0() + secs(5), "opened once for 5 s, not 5 s doubled five times");
}

#[tokio::test]
async fn paid_providers_wait_for_free_wait() {
    let clock = ManualClock::starting_at(t0());
    let free = Scripted::new(vec![Err(rate_limited(t0() + secs(20)))]);
    let paid = Scripted::new(vec![]);
    let chain = chain(vec![member("free", true, free), member("paid", false, paid.clone())], secs(60));
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut progress, &store, &clock).await;
    assert!(
        matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(20)),
        "wakes for the free provider first"
    );
    assert_eq!(paid.calls(), 0);
    assert_eq!(progress.attempts[1].outcome, AttemptOutcome::SkippedPaid);

    // Once free_wait has passed the paid net is used.
    let mut old = JobProgress::new(t0() - secs(61));
    let verdict = pass(&chain, &mut old, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, free: false, .. } if provider == "paid"));
}

#[tokio::test]
async fn the_paid_net_is_used_at_once_when_free_wait_is_zero() {
    let clock = ManualClock::starting_at(t0());
    let chain = chain(
        vec![
            member("free", true, Scripted::new(vec![Err(rate_limited(t0() + secs(20)))])),
            member("paid", false, Scripted::new(vec![])),
        ],
        Duration::ZERO,
    );
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &MemoryStore::new(), &clock).await;
    assert_eq!(answered_by(&verdict), Some("paid"));
}

#[tokio::test]
async fn a_429_retry_time_beyond_max_wait_fails_the_job_at_once() {
    let clock = ManualClock::starting_at(t0());
    let only = Scripted::new(vec![Err(rate_limited(t0() + secs(3600)))]);
    let chain = chain(vec![member("only", true, only.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let verdict = run_holding(&chain, secs(60), &mut JobProgress::new(clock.now()), &store, &clock, secs(60)).await;
    let Verdict::Failed { code: ErrorCode::DeadlineExceeded, message } = verdict else { panic!("{verdict:?}") };
    assert!(message.contains("max_wait (1m)"), "{message}");
    assert_eq!(clock.now(), t0(), "failed at once, without waiting");
    assert_eq!(only.calls(), 1);

    // A second job learns the same from the shared cooldown, without a call.
    let verdict = run_holding(&chain, secs(60), &mut JobProgress::new(clock.now()), &store, &clock, secs(60)).await;
    assert!(matches!(verdict, Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }), "{verdict:?}");
    assert_eq!((clock.now(), only.calls()), (t0(), 1));
}

#[tokio::test]
async fn an_estimate_beyond_max_wait_makes_the_job_wait_for_its_deadline_before_failing() {
    let clock = ManualClock::starting_at(t0());
    // A timeout: the provider gave no time, 30 s is our guess; the job may wait 10 s.
    let only = Scripted::new(vec![Err(failure(FailureKind::Timeout, 0))]);
    let chain = chain(vec![member("only", true, only.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_pass(&chain, &request(&job()), secs(10), &mut progress, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(10)), "{verdict:?}");

    let verdict = run_holding(&chain, secs(10), &mut progress, &store, &clock, secs(60)).await;
    assert!(matches!(verdict, Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }), "{verdict:?}");
    assert!(clock.now() >= t0() + secs(10), "failed only at the deadline: {:?}", clock.now().duration_since(t0()));
    assert_eq!(only.calls(), 1);
}

/// Black-box round 2, M1: a 429 with no retry time cools the provider for our default 60 s,
/// an estimate like a timeout's: a job whose `max_wait` ends before it waits until then (the
/// provider may say otherwise meanwhile, through another worker) instead of failing at once.
#[tokio::test]
async fn a_429_without_a_retry_time_makes_the_job_wait_for_its_deadline_before_failing() {
    let clock = ManualClock::starting_at(t0());
    let only = Scripted::new(vec![Err(failure(FailureKind::RateLimited, 429))]);
    let chain = chain(vec![member("only", true, only.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_pass(&chain, &request(&job()), secs(10), &mut progress, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(10)), "{verdict:?}");
    let cooldown = store.cooldown_of("only").unwrap();
    assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::RateLimitedEstimate, t0() + secs(60)));

    let verdict = run_holding(&chain, secs(10), &mut progress, &store, &clock, secs(60)).await;
    assert!(matches!(verdict, Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }), "{verdict:?}");
    assert!(clock.now() >= t0() + secs(10), "failed only at the deadline: {:?}", clock.now().duration_since(t0()));
    assert_eq!(only.calls(), 1);
}

fn outage(clock: &Arc<ManualClock>, lasting: Duration) -> Arc<Outage> {
    Arc::new(Outage {
        clock: clock.clone(),
        until: later(clock.now(), lasting),
        failures: Mutex::default(),
        successes: Mutex::default(),
    })
}

#[tokio::test]
async fn a_provider_down_for_10s_answers_a_job_that_may_wait_60s() {
    let clock = Arc::new(ManualClock::starting_at(t0()));
    let down = outage(&clock, secs(10));
    let mut flaky = member("flaky", true, down.clone());
    flaky.max_retries = 2;
    let chain = chain(vec![flaky], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_holding(&chain, secs(60), &mut progress, &store, &clock, secs(60)).await;
    assert_eq!(answered_by(&verdict), Some("flaky"), "{verdict:?}");
    assert!(clock.now() >= t0() + secs(10) && clock.now() <= t0() + secs(60));
    assert_eq!(*down.successes.lock().unwrap(), 1);
    assert!(outcomes(&progress).contains(&("flaky".into(), AttemptOutcome::ServerError)));
}

#[tokio::test]
async fn sixty_jobs_caught_in_a_10s_outage_all_wait_and_are_answered_after_it() {
    let clock = Arc::new(ManualClock::starting_at(t0()));
    let (first, second) = (outage(&clock, secs(10)), outage(&clock, secs(10)));
    let chain =
        chain(vec![member("first", true, first.clone()), member("second", true, second.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let max_wait = secs(60);
    // Each job: its progress and when it next runs a pass (all arrive at t0, as in a backlog).
    let mut jobs: Vec<(JobProgress, SystemTime)> = (0..60).map(|_| (JobProgress::new(t0()), t0())).collect();
    let mut answered = 0;
    while !jobs.is_empty() {
        let now = clock.now();
        let mut still_waiting = Vec::new();
        for (mut progress, wake) in jobs {
            if wake > now {
                still_waiting.push((progress, wake));
                continue;
            }
            match run_pass(&chain, &request(&job()), max_wait, &mut progress, &store, clock.as_ref()).await {
                Verdict::Answered { .. } => answered += 1,
                Verdict::Wait { until, .. } => still_waiting.push((progress, until)),
                failed @ Verdict::Failed { .. } => {
                    panic!("failed at +{:?}: {failed:?}", clock.now().duration_since(t0()))
                }
            }
        }
        jobs = still_waiting;
        if let Some(next) = jobs.iter().map(|(_, wake)| *wake).min() {
            clock.advance(next.duration_since(clock.now()).unwrap_or_default());
        }
        assert!(clock.now() <= t0() + max_wait, "still waiting at the deadline");
    }
    assert_eq!(answered, 60);
    for provider in [&first, &second] {
        // Three 503s open the circuit, the probe at +5 s fails, the one at +15 s closes it.
        assert_eq!(*provider.failures.lock().unwrap(), 4, "the circuit kept the herd away");
    }
    let successes = *first.successes.lock().unwrap() + *second.successes.lock().unwrap();
    assert_eq!(successes, 60);
}

#[tokio::test]
async fn a_max_wait_of_u64_max_seconds_panics_nowhere() {
    let huge = Duration::from_secs(u64::MAX);
    let clock = ManualClock::starting_at(t0());
    let store = MemoryStore::new();
    // A provider that is down (an estimate), one rate-limited (its word), a paid one never due.
    let chain = Chain {
        name: "default".into(),
        members: vec![
            member("down", true, Scripted::new(vec![Err(failure(FailureKind::Connect, 0))])),
            member("limited", true, Scripted::new(vec![Err(rate_limited(t0() + secs(30)))])),
            member("paid", false, Scripted::new(vec![])),
        ],
        max_wait: huge,
        max_wait_limit: huge,
        free_wait: huge,
        accept: Accept::default(),
    };
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_pass(&chain, &request(&job()), huge, &mut progress, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(30)), "{verdict:?}");
    assert_eq!(progress.attempts[2].until.as_deref(), Some("9999-12-31T00:00:00.000Z"));

    let hold = HoldPolicy::new(Duration::MAX, clock.now(), Duration::MAX);
    let verdict = run(&chain, &job(), huge, &mut progress, &store, hold, &clock).await;
    assert!(matches!(verdict, Verdict::Answered { .. }), "{verdict:?}");

    // A job claiming to be first seen past the end of time, and its deadline message.
    let beyond = far_future() + secs(86400);
    let mut late = JobProgress::new(beyond);
    let verdict = run_pass(&chain, &request(&job()), huge, &mut late, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Answered { .. }), "{verdict:?}");
    let verdict = conclude(&chain, huge, &late, &[NextTry::firm(beyond + secs(1))], beyond);
    let Verdict::Failed { code: ErrorCode::DeadlineExceeded, message } = verdict else { panic!("{verdict:?}") };
    assert!(message.contains("9999-12-31"), "{message}");
}

#[tokio::test]
async fn prompts_too_long_for_a_context_window_skip_it_without_a_call() {
    let clock = ManualClock::starting_at(t0());
    let small = Scripted::new(vec![]);
    let mut narrow = member("narrow", true, small.clone());
    narrow.context_window = Some(50);
    let chain = chain(vec![narrow, member("wide", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut progress, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("wide"));
    assert_eq!(small.calls(), 0);
    assert_eq!(progress.attempts[0].outcome, AttemptOutcome::SkippedContext);
    assert!(store.cooldown_of("narrow").is_none());
}

#[tokio::test]
async fn run_waits_in_place_for_a_short_cooldown_and_then_answers() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Err(rate_limited(t0() + secs(2)))]);
    let chain = chain(vec![member("a", true, a.clone())], Duration::ZERO);
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_holding(&chain, chain.max_wait, &mut progress, &MemoryStore::new(), &clock, secs(5)).await;
    assert!(matches!(verdict, Verdict::Answered { .. }), "{verdict:?}");
    assert_eq!(a.calls(), 2);
    let waited = clock.now().duration_since(t0()).unwrap();
    assert!(waited >= secs(2) && waited <= secs(2) + Duration::from_millis(250), "{waited:?}");
}

#[tokio::test]
async fn jobs_waiting_for_room_in_a_window_take_it_within_milliseconds_of_its_freeing() {
    let clock = ManualClock::starting_at(t0());
    let mut limited = member("limited", true, Says::new(vec![]));
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(2), resets: None }];
    let chain = chain(vec![limited], Duration::ZERO);
    let store = MemoryStore::new();
    assert_eq!(answered_by(&pass(&chain, &mut JobProgress::new(t0()), &store, &clock).await), Some("limited"));
    // Each job waits for the window's one request, a whole window: the wake-up is spread over
    // 5 ms, not a tenth of the wait (200 ms here), five times in a row.
    for _ in 0..5 {
        let asked = clock.now();
        let mut progress = JobProgress::new(asked);
        let verdict = run_holding(&chain, chain.max_wait, &mut progress, &store, &clock, secs(5)).await;
        assert_eq!(answered_by(&verdict), Some("limited"), "{verdict:?}");
        let waited = clock.now().duration_since(asked).unwrap();
        assert!(waited >= secs(2) && waited <= secs(2) + MIN_SPREAD, "{waited:?}");
    }
}

#[tokio::test]
async fn a_wait_for_room_is_handed_back_as_one_and_a_cooldown_as_a_spread_one() {
    let clock = ManualClock::starting_at(t0());
    let mut limited = member("limited", true, Says::new(vec![]));
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(60), resets: None }];
    let cooling = member("cooling", true, Scripted::new(vec![Err(rate_limited(t0() + secs(60)))]));
    let store = MemoryStore::new();
    let room_only = chain(vec![limited.clone()], Duration::ZERO);
    pass(&room_only, &mut JobProgress::new(t0()), &store, &clock).await;
    let verdict = pass(&room_only, &mut JobProgress::new(t0()), &store, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { wake: Wake::Room, .. }), "{verdict:?}");
    // A provider due no later waits out a 429: a herd of wake-ups would reach the provider.
    let both = chain(vec![limited, cooling], Duration::ZERO);
    let verdict = pass(&both, &mut JobProgress::new(t0()), &store, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { wake: Wake::Spread, .. }), "{verdict:?}");
}

#[test]
fn wake_ups_for_room_spread_over_5_ms_and_others_over_a_tenth_of_the_wait() {
    for _ in 0..1000 {
        assert!(spread(secs(2), Wake::Room) <= MIN_SPREAD);
        assert!(spread(secs(2), Wake::Spread) <= Duration::from_millis(200));
        assert!(spread(secs(3600), Wake::Spread) <= Duration::from_millis(250));
    }
    let wide = (0..1000).map(|_| spread(secs(2), Wake::Spread)).max().unwrap();
    assert!(wide > MIN_SPREAD, "a cooldown's wake-ups still spread wide: {wide:?}");
}

#[tokio::test]
async fn run_hands_back_waits_longer_than_the_hold_limit() {
    let clock = ManualClock::starting_at(t0());
    let chain =
        chain(vec![member("a", true, Scripted::new(vec![Err(rate_limited(t0() + secs(120)))]))], Duration::ZERO);
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_holding(&chain, chain.max_wait, &mut progress, &MemoryStore::new(), &clock, secs(5)).await;
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(120)), "{verdict:?}");
    assert_eq!(clock.now(), t0(), "handed back without waiting");
}

/// A wait of exactly the hold limit (in `batch`, a wait up to the deadline, whose hold limit is
/// `max_wait`) is held in place, whatever the random wake-up spread added to it: handed back,
/// `batch` read it as a deadline and failed the job at once.
#[tokio::test]
async fn run_holds_a_wait_of_exactly_the_hold_limit_whatever_its_spread() {
    for _ in 0..20 {
        let clock = ManualClock::starting_at(t0());
        let a = Scripted::new(vec![Err(rate_limited(t0() + secs(5)))]);
        let chain = chain(vec![member("a", true, a)], Duration::ZERO);
        let mut progress = JobProgress::new(clock.now());
        let verdict = run_holding(&chain, chain.max_wait, &mut progress, &MemoryStore::new(), &clock, secs(5)).await;
        assert!(matches!(verdict, Verdict::Answered { .. }), "{verdict:?}");
        assert!(clock.now() >= t0() + secs(5), "waited in place for the provider's time");
    }
}

#[tokio::test]
async fn run_does_not_wait_past_the_hold_deadline() {
    let clock = ManualClock::starting_at(t0());
    let chain = chain(vec![member("a", true, Scripted::new(vec![Err(rate_limited(t0() + secs(4)))]))], Duration::ZERO);
    let hold = HoldPolicy::new(secs(5), t0(), secs(3));
    let verdict =
        run(&chain, &job(), chain.max_wait, &mut JobProgress::new(t0()), &MemoryStore::new(), hold, &clock).await;
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(4)), "{verdict:?}");
}

#[test]
fn resumed_progress_keeps_dropped_providers() {
    let attempts = vec![Attempt {
        provider: "a".into(),
        outcome: AttemptOutcome::ClientError,
        status: Some(400),
        latency_ms: 3,
        until: None,
        message: None,
    }];
    let progress = JobProgress::resume(t0(), attempts);
    assert!(progress.dropped.contains("a"));
}

#[tokio::test]
async fn waking_up_again_and_again_lists_each_stretch_of_skips_once() {
    let clock = ManualClock::starting_at(t0());
    let store = MemoryStore::new();
    let cooling_until = t0() + Duration::from_millis(400);
    store
        .cool_down(
            "free",
            Cooldown { until: cooling_until, reason: CooldownReason::RateLimited, detail: String::new() },
        )
        .await;
    let paid = Scripted::new(vec![]);
    // The free provider cools for 400 ms; the paid one may be used after 150 ms: two passes skip
    // the free one, the second calls the paid one.
    let chain = chain(
        vec![member("free", true, Scripted::new(vec![])), member("paid", false, paid.clone())],
        Duration::from_millis(150),
    );
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_holding(&chain, chain.max_wait, &mut progress, &store, &clock, secs(5)).await;
    assert_eq!(answered_by(&verdict), Some("paid"), "{verdict:?}");
    assert_eq!(
        outcomes(&progress),
        vec![
            ("free".into(), AttemptOutcome::SkippedCooldown),
            ("paid".into(), AttemptOutcome::SkippedPaid),
            ("paid".into(), AttemptOutcome::Ok),
        ]
    );
}

/// A provider that answers 200 with these completion bodies, in order (then a good answer).
struct Says {
    bodies: Mutex<VecDeque<serde_json::Value>>,
    calls: Mutex<usize>,
}

impl Says {
    fn new(bodies: Vec<serde_json::Value>) -> Arc<Self> {
        Arc::new(Self { bodies: Mutex::new(bodies.into()), calls: Mutex::new(0) })
    }

    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl ChatProvider for Says {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        *self.calls.lock().unwrap() += 1;
        let next = self.bodies.lock().unwrap().pop_front();
        Ok(next.map_or_else(completion, |body| Completion { body, ..completion() }))
    }
}

/// A completion body whose message says `text`, stopped for `finish_reason`.
fn answer(text: &str, finish_reason: &str) -> serde_json::Value {
    json!({"object": "chat.completion", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]})
}

fn messages(progress: &JobProgress) -> Vec<Option<&str>> {
    progress.attempts.iter().map(|a| a.message.as_deref()).collect()
}

#[tokio::test]
async fn a_rejected_answer_moves_on_without_a_cooldown_but_still_counts_in_the_window() {
    // The memory store stamps a finished call with the wall time: this clock starts there.
    let clock = ManualClock::starting_at(SystemTime::now());
    let bad = Says::new(vec![answer("  ", "stop")]);
    let good = Says::new(vec![]);
    let mut first = member("bad", true, bad.clone());
    first.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(60), resets: None }];
    let chain = chain(vec![first, member("good", true, good.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut progress, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("good"), "{verdict:?}");
    assert!(matches!(verdict, Verdict::Answered { rejected: false, .. }));
    assert_eq!(
        outcomes(&progress),
        vec![("bad".into(), AttemptOutcome::RejectedOutput), ("good".into(), AttemptOutcome::Ok)]
    );
    assert_eq!(messages(&progress), vec![Some("empty content"), None]);
    assert_eq!(progress.attempts[0].status, Some(200));
    assert_eq!(store.cooldown_of("bad"), None, "a bad answer cools nothing down");
    assert_eq!(store.rejected_outputs("bad", "empty"), 1, "counted for `status`");

    // The call took the provider's one request of the minute: the next job skips it for quota.
    let mut next = JobProgress::new(clock.now());
    pass(&chain, &mut next, &store, &clock).await;
    assert_eq!(next.attempts[0].outcome, AttemptOutcome::SkippedQuota);
    assert_eq!(bad.calls(), 1);
}

/// A job asking this, with no completion cap of its own (so a `length` finish is a cut-off).
fn asking(extra: serde_json::Value, accept: Option<serde_json::Value>) -> Job {
    let mut body: ChatBody = serde_json::from_value(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
    if let serde_json::Value::Object(extra) = extra {
        body.extend(extra);
    }
    let accept = accept.map(|a| checks::AcceptOverride::parse(&a).unwrap());
    Job { body, accept, ..job() }
}

async fn run_job(
    chain: &Chain,
    job: &Job,
    progress: &mut JobProgress,
    store: &MemoryStore,
    clock: &ManualClock,
) -> Verdict {
    let hold = HoldPolicy::new(secs(60), clock.now(), secs(120));
    run(chain, job, chain.max_wait, progress, store, hold, clock).await
}

#[tokio::test]
async fn a_rejected_provider_is_not_waited_for_nor_called_again_for_the_job() {
    let clock = ManualClock::starting_at(t0());
    let bad = Says::new(vec![answer("The three reasons are", "length"), answer("again", "length")]);
    let later = Scripted::new(vec![Err(rate_limited(t0() + secs(30)))]);
    let chain = chain(vec![member("bad", true, bad.clone()), member("later", true, later.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &asking(json!({}), None), &mut progress, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("later"), "{verdict:?}");
    let waited = clock.now().duration_since(t0()).unwrap();
    assert!(waited >= secs(30) && waited < secs(31), "it waited for the rate-limited provider only: {waited:?}");
    assert_eq!(bad.calls(), 1, "dropped for the job, like a client error");
    assert_eq!(messages(&progress)[0], Some("cut off at the provider's cap"));
    // A parked job read back from its attempts keeps the rejected provider dropped.
    let resumed = JobProgress::resume(t0(), progress.attempts.clone());
    assert!(resumed.dropped.contains("bad"));
}

#[tokio::test]
async fn a_length_finish_under_the_jobs_own_cap_is_accepted() {
    let clock = ManualClock::starting_at(t0());
    let short = Says::new(vec![answer("The three reasons are", "length")]);
    let chain = chain(vec![member("short", true, short.clone())], Duration::ZERO);
    let mut progress = JobProgress::new(clock.now());
    let capped = asking(json!({"max_completion_tokens": 5}), None);
    let verdict = run_job(&chain, &capped, &mut progress, &MemoryStore::new(), &clock).await;
    assert!(matches!(verdict, Verdict::Answered { rejected: false, .. }), "{verdict:?}");
}

/// A chain of three providers answering badly in three ways.
fn three_bad(accept: Accept) -> Chain {
    let mut chain = chain(
        vec![
            member("empty", true, Says::new(vec![answer("", "stop")])),
            member("prose", true, Says::new(vec![answer("Here it is: {\"echo\": \"x\"}", "stop")])),
            member("off", true, Says::new(vec![answer("{\"reply\": \"x\"}", "stop")])),
        ],
        Duration::ZERO,
    );
    chain.accept = accept;
    chain
}

fn echo_schema() -> serde_json::Value {
    json!({"response_format": {"type": "json_schema", "json_schema": {"name": "echo",
        "schema": {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}}}})
}

#[tokio::test]
async fn when_every_answer_is_rejected_the_job_fails_listing_each_reason() {
    let clock = ManualClock::starting_at(t0());
    let chain = three_bad(Accept::default());
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &asking(echo_schema(), None), &mut progress, &store, &clock).await;
    let Verdict::Failed { code: ErrorCode::AllProvidersFailed, message } = verdict else { panic!("{verdict:?}") };
    assert_eq!(
        message,
        "no answer from chain `default` passed the job's checks: empty: rejected_output 200: empty content; \
         prose: rejected_output 200: not JSON: expected value at line 1 column 1; \
         off: rejected_output 200: schema: /echo is required"
    );
    assert_eq!(clock.now(), t0(), "nothing to wait for");
    for (provider, reason) in [("empty", "empty"), ("prose", "not_json"), ("off", "schema")] {
        assert_eq!(store.rejected_outputs(provider, reason), 1, "{provider}");
        assert_eq!(store.cooldown_of(provider), None);
    }
}

#[tokio::test]
async fn on_all_rejected_best_gives_the_last_rejected_answer_marked() {
    let clock = ManualClock::starting_at(t0());
    let chain = three_bad(Accept { on_all_rejected: OnAllRejected::Best, ..Accept::default() });
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &asking(echo_schema(), None), &mut progress, &MemoryStore::new(), &clock).await;
    let Verdict::Answered { provider, rejected: true, completion, .. } = verdict else { panic!("{verdict:?}") };
    assert_eq!(provider, "off", "the last rejected answer");
    assert_eq!(completion.body["choices"][0]["message"]["content"], "{\"reply\": \"x\"}");
    assert_eq!(outcomes(&progress).iter().filter(|(_, o)| *o == AttemptOutcome::RejectedOutput).count(), 3);
}

#[tokio::test]
async fn best_never_beats_a_good_answer_later_in_the_chain() {
    let clock = ManualClock::starting_at(t0());
    let mut chain = chain(
        vec![member("empty", true, Says::new(vec![answer("", "stop")])), member("good", true, Says::new(vec![]))],
        Duration::ZERO,
    );
    chain.accept.on_all_rejected = OnAllRejected::Best;
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &asking(json!({}), None), &mut progress, &MemoryStore::new(), &clock).await;
    assert!(
        matches!(verdict, Verdict::Answered { ref provider, rejected: false, .. } if provider == "good"),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn best_also_answers_a_job_whose_other_providers_are_out_past_its_deadline() {
    let clock = ManualClock::starting_at(t0());
    let mut chain = chain(
        vec![
            member("empty", true, Says::new(vec![answer("", "stop")])),
            member("spent", true, Scripted::new(vec![Err(rate_limited(t0() + secs(7200)))])),
        ],
        Duration::ZERO,
    );
    chain.accept.on_all_rejected = OnAllRejected::Best;
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &asking(json!({}), None), &mut progress, &MemoryStore::new(), &clock).await;
    assert!(
        matches!(verdict, Verdict::Answered { ref provider, rejected: true, .. } if provider == "empty"),
        "{verdict:?}"
    );
    // Without `best` the same job fails on the provider's word.
    let (mut progress, store) = (JobProgress::new(clock.now()), MemoryStore::new());
    chain.accept.on_all_rejected = OnAllRejected::Fail;
    chain.members[0].provider = Says::new(vec![answer("", "stop")]);
    chain.members[1].provider = Scripted::new(vec![Err(rate_limited(t0() + secs(7200)))]);
    let verdict = run_job(&chain, &asking(json!({}), None), &mut progress, &store, &clock).await;
    assert!(matches!(verdict, Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }), "{verdict:?}");
}

#[tokio::test]
async fn a_jobs_accept_overrides_the_chains_key_by_key() {
    let clock = ManualClock::starting_at(t0());
    let chain = three_bad(Accept::default());
    // This job wants no JSON check: the prose answer is fine; the empty one still is not.
    let job = asking(echo_schema(), Some(json!({"json": false})));
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_job(&chain, &job, &mut progress, &MemoryStore::new(), &clock).await;
    assert_eq!(answered_by(&verdict), Some("prose"), "{verdict:?}");
    assert_eq!(messages(&progress)[0], Some("empty content"));
    // And one that asks for `best` on a chain that fails.
    let chain = three_bad(Accept::default());
    let job = asking(echo_schema(), Some(json!({"on_all_rejected": "best"})));
    let verdict = run_job(&chain, &job, &mut JobProgress::new(clock.now()), &MemoryStore::new(), &clock).await;
    assert!(matches!(verdict, Verdict::Answered { rejected: true, .. }), "{verdict:?}");
}

#[tokio::test]
async fn a_schema_that_does_not_compile_fails_the_job_before_any_call() {
    let clock = ManualClock::starting_at(t0());
    let never = Says::new(vec![]);
    let chain = chain(vec![member("never", true, never.clone())], Duration::ZERO);
    // Built by hand: `Job::parse` refuses such a job already.
    let job =
        asking(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}}), None);
    let verdict = run_job(&chain, &job, &mut JobProgress::new(clock.now()), &MemoryStore::new(), &clock).await;
    let Verdict::Failed { code: ErrorCode::InvalidRequest, message } = verdict else { panic!("{verdict:?}") };
    assert!(message.contains("does not compile"), "{message}");
    assert_eq!(never.calls(), 0);
}

/// A provider that cannot carry tools (`supports = []` on a kind that can), counting its calls.
struct NoTools {
    calls: Mutex<usize>,
}

#[async_trait::async_trait]
impl ChatProvider for NoTools {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        *self.calls.lock().unwrap() += 1;
        Ok(completion())
    }

    fn can_carry(&self, body: &ChatBody) -> Result<(), String> {
        match body.get("tools") {
            Some(_) => Err("the job needs tools".into()),
            None => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_provider_that_cannot_carry_the_job_is_skipped_before_admission() {
    let clock = ManualClock::starting_at(t0());
    let store = MemoryStore::new();
    let picky = Arc::new(NoTools { calls: Mutex::new(0) });
    // One request a minute: a skip that took the slot would leave none for the plain job.
    let mut limited = member("picky", false, picky.clone());
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(60), resets: None }];
    let chain = chain(vec![limited, member("other", true, Scripted::new(vec![]))], secs(3600));
    let mut tools = job();
    tools.body.insert("tools".into(), json!([{"type": "function", "function": {"name": "f"}}]));

    let mut progress = JobProgress::new(clock.now());
    let verdict = run_pass(&chain, &request(&tools), chain.max_wait, &mut progress, &store, &clock).await;

    assert_eq!(answered_by(&verdict), Some("other"), "{verdict:?}");
    assert_eq!(
        outcomes(&progress),
        vec![("picky".into(), AttemptOutcome::SkippedCapability), ("other".into(), AttemptOutcome::Ok)]
    );
    assert_eq!(progress.attempts[0].message.as_deref(), Some("the job needs tools"));
    // Not paid-skipped and waited for: a provider that can never carry the job is dropped,
    // whatever `free_wait` says, and a resumed job does not try it again.
    assert!(JobProgress::resume(t0(), progress.attempts.clone()).dropped.contains("picky"));
    assert_eq!(*picky.calls.lock().unwrap(), 0);

    // The slot is still there: the next admission gets it, the one after finds it spent.
    let limits = chain.members[0].limits.clone();
    let ask = Ask { provider: "picky", limits: &limits, pools: &[], tokens: 10, flight: secs(60) };
    assert!(matches!(store.admit(ask, clock.now()).await, Admission::Granted(_)));
    assert!(matches!(store.admit(ask, clock.now()).await, Admission::OverQuota { .. }));
}

/// A provider that answers once with what its rate-limit headers said.
struct Observing {
    quota: Vec<crate::routing::QuotaObservation>,
}

#[async_trait::async_trait]
impl ChatProvider for Observing {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        Ok(Completion { quota: self.quota.clone(), ..completion() })
    }
}

/// One `observe_quota` call, as the store received it.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    provider: String,
    limits: Vec<LimitConfig>,
    tokens: u64,
    seen: Vec<crate::routing::QuotaObservation>,
    now: SystemTime,
}

/// The memory store, plus a record of what it was taught through `observe_quota` and of the
/// order of the answers and observations it was given.
#[derive(Default)]
struct Recording {
    store: MemoryStore,
    observed: Mutex<Vec<Observed>>,
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait::async_trait]
impl ProviderState for Recording {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        self.store.admit(ask, now).await
    }
    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.calls.lock().unwrap().push("finish");
        self.store.finish(permit, tokens, now).await;
    }
    async fn release(&self, permit: Permit) {
        self.calls.lock().unwrap().push("release");
        self.store.release(permit).await;
    }
    async fn finish_written(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.calls.lock().unwrap().push("finish_written");
        self.store.finish(permit, tokens, now).await;
    }
    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.store.cool_down(provider, cooldown).await;
    }
    async fn record_success(&self, provider: &str) {
        self.store.record_success(provider).await;
    }
    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        self.store.claim_probe(provider, now, hold_for).await
    }
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        self.store.record_server_error(provider, detail).await
    }
    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        self.store.record_rejected_output(provider, reason).await;
    }
    async fn observe_quota(
        &self,
        ask: Ask<'_>,
        _observed: &Permit,
        seen: &[crate::routing::QuotaObservation],
        now: SystemTime,
    ) {
        self.calls.lock().unwrap().push("observe_quota");
        let (provider, limits, tokens) = (ask.provider.to_string(), ask.limits.to_vec(), ask.tokens);
        self.observed.lock().unwrap().push(Observed { provider, limits, tokens, seen: seen.to_vec(), now });
    }
}

#[tokio::test]
async fn a_success_hands_what_the_headers_said_to_the_store_with_the_admissions_ask() {
    let clock = ManualClock::starting_at(t0());
    let seen = vec![crate::routing::QuotaObservation {
        measure: QuotaMeasure::Requests,
        remaining: 3,
        limit: Some(14_400),
        resets_at: Some(t0() + secs(179)),
        window: None,
    }];
    let mut limited = member("a", true, Arc::new(Observing { quota: seen.clone() }));
    limited.limits = vec![LimitConfig { requests: Some(10), tokens: None, per: secs(60), resets: None }];
    let observing = chain(vec![limited.clone()], Duration::ZERO);
    let store = Recording::default();
    let verdict =
        run_pass(&observing, &request(&job()), observing.max_wait, &mut JobProgress::new(t0()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("a"));
    let observed = store.observed.lock().unwrap().clone();
    let tokens = estimate_prompt_tokens(&body()).saturating_add(100);
    let expected = Observed { provider: "a".into(), limits: limited.limits.clone(), tokens, seen, now: t0() };
    assert_eq!(observed, vec![expected]);
    // Counted against the call's answer: the answer is written before the headers are read.
    assert_eq!(*store.calls.lock().unwrap(), ["finish_written", "observe_quota"]);

    // An answer without rate-limit headers teaches nothing: the store is not called, and the
    // job does not wait for its answer to be written.
    let silent = chain(vec![member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = Recording::default();
    run_pass(&silent, &request(&job()), silent.max_wait, &mut JobProgress::new(t0()), &store, &clock).await;
    assert!(store.observed.lock().unwrap().is_empty());
    assert_eq!(*store.calls.lock().unwrap(), ["finish"]);
}

fn account_limited(retry_at: SystemTime) -> Failure {
    let mut limited = rate_limited(retry_at);
    limited.daily = true;
    limited.scope = crate::routing::LimitScope::Account;
    limited.message = "Rate limit exceeded: free-models-per-day.".into();
    limited
}

#[tokio::test]
async fn an_account_scoped_429_cools_every_pool_mate_and_no_request_reaches_them() {
    let clock = ManualClock::starting_at(t0());
    let reset = t0() + secs(7200);
    let a = Scripted::new(vec![Err(account_limited(reset))]);
    let (b, c) = (Scripted::new(vec![]), Scripted::new(vec![]));
    let mut pooled_a = member("a", true, a.clone());
    // `z` shares the pool but is in no chain here (another chain, or another worker's key).
    pooled_a.pool_mates = vec!["b".into(), "z".into()];
    let mut pooled_b = member("b", true, b.clone());
    pooled_b.pool_mates = vec!["a".into(), "z".into()];
    let chain = chain(vec![pooled_a, pooled_b, member("c", true, c.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut progress, &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("c"), "{verdict:?}");
    assert_eq!(
        outcomes(&progress),
        vec![
            ("a".into(), AttemptOutcome::RateLimited),
            ("b".into(), AttemptOutcome::SkippedCooldown),
            ("c".into(), AttemptOutcome::Ok)
        ]
    );
    assert_eq!(b.calls(), 0, "the pool mate got no request");
    for name in ["a", "b", "z"] {
        let cooldown = store.cooldown_of(name).unwrap();
        assert_eq!((cooldown.reason, cooldown.until), (CooldownReason::QuotaDay, reset), "{name}");
        assert!(cooldown.detail.contains("account's limit"), "{name}: {}", cooldown.detail);
        assert!(cooldown.detail.contains("free-models-per-day"), "{name}: {}", cooldown.detail);
    }
    assert!(store.cooldown_of("b").unwrap().detail.contains("met by `a`"));
    assert!(store.cooldown_of("c").is_none(), "outside the pool");
}

#[tokio::test]
async fn a_model_scoped_429_cools_only_the_provider_even_in_a_pool() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Err(rate_limited(t0() + secs(30)))]);
    let b = Scripted::new(vec![]);
    let mut pooled_a = member("a", true, a.clone());
    pooled_a.pool_mates = vec!["b".into()];
    let mut pooled_b = member("b", true, b.clone());
    pooled_b.pool_mates = vec!["a".into()];
    let chain = chain(vec![pooled_a, pooled_b], Duration::ZERO);
    let store = MemoryStore::new();
    let verdict = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("b"), "{verdict:?}");
    assert_eq!(b.calls(), 1);
    assert!(store.cooldown_of("b").is_none());
    assert_eq!(store.cooldown_of("a").unwrap().detail, "HTTP 429");
}

#[tokio::test]
async fn members_drawing_from_one_pool_share_it() {
    let clock = ManualClock::starting_at(t0());
    // Long enough that the memory store's wall-clock answer time stays inside it.
    let limit = LimitConfig { requests: Some(1), tokens: None, per: secs(400 * 86_400), resets: None };
    let pools: Arc<[QuotaPoolConfig]> = vec![QuotaPoolConfig { name: "account".into(), limits: vec![limit] }].into();
    let (a, b) = (Scripted::new(vec![]), Scripted::new(vec![]));
    let (mut in_pool_a, mut in_pool_b) = (member("a", true, a.clone()), member("b", true, b.clone()));
    in_pool_a.pools = pools.clone();
    in_pool_b.pools = pools;
    let chain = chain(vec![in_pool_a, in_pool_b], Duration::ZERO);
    let store = MemoryStore::new();
    let first = pass(&chain, &mut JobProgress::new(clock.now()), &store, &clock).await;
    assert_eq!(answered_by(&first), Some("a"));
    let mut next = JobProgress::new(clock.now());
    let verdict = pass(&chain, &mut next, &store, &clock).await;
    assert!(
        matches!(verdict, Verdict::Wait { .. } | Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }),
        "{verdict:?}"
    );
    assert_eq!(
        outcomes(&next),
        vec![("a".into(), AttemptOutcome::SkippedQuota), ("b".into(), AttemptOutcome::SkippedQuota)],
        "the pool is spent for both"
    );
    assert_eq!(b.calls(), 0);
}

/// A provider whose one answer says its request budget of 10 is now spent until `reset`.
struct Spending {
    reset: SystemTime,
}

#[async_trait::async_trait]
impl ChatProvider for Spending {
    async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
        let spent = crate::routing::QuotaObservation {
            measure: QuotaMeasure::Requests,
            remaining: 0,
            limit: Some(10),
            resets_at: Some(self.reset),
            window: None,
        };
        Ok(Completion { exhausted_until: Some(self.reset), quota: vec![spent], ..completion() })
    }
}

#[tokio::test]
async fn a_spent_budget_the_config_holds_leaves_the_provider_to_its_window_not_a_cooldown() {
    let clock = ManualClock::starting_at(t0());
    let reset = t0() + secs(5);
    // The config declares the same budget: the shared window holds it, room comes when it frees.
    let mut held = member("held", true, Arc::new(Spending { reset }));
    held.limits = vec![LimitConfig { requests: Some(10), tokens: None, per: secs(2), resets: None }];
    let store = MemoryStore::new();
    let verdict = pass(&chain(vec![held], Duration::ZERO), &mut JobProgress::new(t0()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("held"));
    assert_eq!(store.cooldown_of("held"), None, "no cooldown for a budget the config holds");

    // A budget the config does not declare still cools the provider until the reset.
    let unheld = member("unheld", true, Arc::new(Spending { reset }));
    let store = MemoryStore::new();
    let verdict = pass(&chain(vec![unheld], Duration::ZERO), &mut JobProgress::new(t0()), &store, &clock).await;
    assert_eq!(answered_by(&verdict), Some("unheld"));
    assert_eq!(store.cooldown_of("unheld").map(|c| c.until), Some(reset));
}

// ---- review of 969b086 (Wake::Room) ----

/// R1: a provider whose cooldown (a 429's reset) ends 2 ms after another's window has room is
/// due inside the 5 ms Room spread: the jobs the one slot does not take fall through to it.
#[tokio::test]
async fn review_a_cooldown_due_just_after_a_room_time_keeps_the_wide_spread() {
    let clock = ManualClock::starting_at(t0());
    let mut limited = member("limited", true, Says::new(vec![]));
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(2), resets: None }];
    let room = t0() + secs(2);
    let reset = room + Duration::from_millis(2);
    let cooling = member("cooling", true, Scripted::new(vec![Err(rate_limited(reset))]));
    let both = chain(vec![limited, cooling], Duration::ZERO);
    let store = MemoryStore::new();
    assert_eq!(answered_by(&pass(&both, &mut JobProgress::new(t0()), &store, &clock).await), Some("limited"));
    let verdict = pass(&both, &mut JobProgress::new(t0()), &store, &clock).await;
    assert!(
        matches!(verdict, Verdict::Wait { until, wake: Wake::Spread } if until == room),
        "the 429'd provider is due 2 ms after the room time: {verdict:?}"
    );
}

/// 40 jobs wait out a full 1-per-2 s window while a second provider waits out a 429 whose
/// reset is `after` the window's room; returns how many calls reach the 429'd provider within
/// 5 ms of its reset (the jobs replayed as `run` would wake them).
async fn herd_onto_a_429d_provider(after: Duration) -> usize {
    let clock = ManualClock::starting_at(t0());
    let mut limited = member("limited", true, Says::new(vec![]));
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(2), resets: None }];
    let reset = t0() + secs(2) + after;
    let answers = Scripted::new(vec![Err(rate_limited(reset))]);
    let cooling = member("cooling", true, answers.clone());
    let both = chain(vec![limited, cooling], Duration::ZERO);
    let store = MemoryStore::new();
    assert_eq!(answered_by(&pass(&both, &mut JobProgress::new(t0()), &store, &clock).await), Some("limited"));
    let mut jobs: Vec<(JobProgress, SystemTime)> = (0..40).map(|_| (JobProgress::new(t0()), t0())).collect();
    let mut herd = 0;
    while !jobs.is_empty() {
        let now = clock.now();
        let mut still_waiting = Vec::new();
        for (mut progress, wake_at) in jobs {
            if wake_at > now {
                still_waiting.push((progress, wake_at));
                continue;
            }
            let before = answers.calls();
            match pass(&both, &mut progress, &store, &clock).await {
                Verdict::Wait { until, wake } => {
                    // As `run` does: the wait, then the spread.
                    let wait = until.duration_since(now).unwrap_or_default();
                    still_waiting.push((progress, now + wait + spread(wait, wake)));
                }
                Verdict::Answered { .. } => {}
                failed => panic!("{failed:?}"),
            }
            if now >= reset && now <= reset + MIN_SPREAD {
                herd += answers.calls() - before;
            }
        }
        jobs = still_waiting;
        if let Some(next) = jobs.iter().map(|(_, at)| *at).min() {
            clock.advance(next.duration_since(clock.now()).unwrap_or_default());
        }
    }
    herd
}

/// R1, the herd itself, with the reset 2 ms after the room.
#[tokio::test]
async fn review_jobs_waking_for_room_do_not_herd_onto_a_provider_whose_429_ends_just_after() {
    let herd = herd_onto_a_429d_provider(Duration::from_millis(2)).await;
    assert!(herd <= 10, "{herd} of 40 jobs reached the 429'd provider within 5 ms of its reset");
}

/// A store whose decisions are taken on a clock `behind` the worker's (the database's
/// `clock_timestamp()` against the worker's `SystemTime::now()`): every instant it is given is
/// moved back, every instant it names is on its own clock.
struct Behind {
    inner: MemoryStore,
    behind: Duration,
    asks: Mutex<usize>,
}

#[async_trait::async_trait]
impl ProviderState for Behind {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        *self.asks.lock().unwrap() += 1;
        self.inner.admit(ask, now - self.behind).await
    }
    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.inner.finish(permit, tokens, now - self.behind).await
    }
    async fn release(&self, permit: Permit) {
        self.inner.release(permit).await
    }
    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.inner.cool_down(provider, cooldown).await
    }
    async fn record_success(&self, provider: &str) {
        self.inner.record_success(provider).await
    }
    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        self.inner.claim_probe(provider, now - self.behind, hold_for).await
    }
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        self.inner.record_server_error(provider, detail).await
    }
    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        self.inner.record_rejected_output(provider, reason).await
    }
}

/// R2: the database's clock 100 ms behind the worker's. A job woken within 5 ms of the room
/// time the database named is refused again, now with a room time in the worker's past: it
/// asked again every 0-5 ms (about 40 asks) until the database's clock got there.
#[tokio::test]
async fn review_a_database_clock_100ms_behind_does_not_make_a_room_wait_ask_in_a_loop() {
    let clock = ManualClock::starting_at(t0());
    let mut limited = member("limited", true, Says::new(vec![]));
    limited.limits = vec![LimitConfig { requests: Some(1), tokens: None, per: secs(2), resets: None }];
    let chain = chain(vec![limited], Duration::ZERO);
    let store = Behind { inner: MemoryStore::new(), behind: Duration::from_millis(100), asks: Mutex::new(0) };
    let first = run_pass(&chain, &request(&job()), chain.max_wait, &mut JobProgress::new(t0()), &store, &clock).await;
    assert_eq!(answered_by(&first), Some("limited"));
    *store.asks.lock().unwrap() = 0;
    let hold = HoldPolicy::new(secs(5), clock.now(), secs(60));
    let verdict = run(&chain, &job(), chain.max_wait, &mut JobProgress::new(t0()), &store, hold, &clock).await;
    assert_eq!(answered_by(&verdict), Some("limited"), "{verdict:?}");
    let asks = *store.asks.lock().unwrap();
    // The refusal, the wake-up at the room time, then pauses of at least 2.5, 10, 40 and 125 ms.
    assert!(asks <= 6, "{asks} asks for one slot");
}

/// A worker whose view of a provider lags the shared state: it admits every call as its view
/// allows (the circuit it knows of has expired), while the probe's claim, as the database takes
/// it, sees that another worker holds the probe.
struct LaggingView {
    truth: MemoryStore,
    admits: Mutex<usize>,
    finishes: Mutex<usize>,
    releases: Mutex<usize>,
}

#[async_trait::async_trait]
impl ProviderState for LaggingView {
    async fn admit(&self, _ask: Ask<'_>, _now: SystemTime) -> Admission {
        *self.admits.lock().unwrap() += 1;
        Admission::Granted(Permit::UNCOUNTED)
    }
    async fn finish(&self, _permit: Permit, _tokens: Option<u64>, _now: SystemTime) {
        *self.finishes.lock().unwrap() += 1;
    }
    async fn release(&self, _permit: Permit) {
        *self.releases.lock().unwrap() += 1;
    }
    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.truth.cool_down(provider, cooldown).await
    }
    async fn record_success(&self, provider: &str) {
        self.truth.record_success(provider).await
    }
    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        self.truth.claim_probe(provider, now, hold_for).await
    }
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        self.truth.record_server_error(provider, detail).await
    }
    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        self.truth.record_rejected_output(provider, reason).await
    }
}

/// A job whose admission was granted on a lagging view, and whose claim of the probe lost,
/// skips the provider until the winner's hold ends: the slot goes back and the provider is
/// not called, whatever a second look at the (lagging) view would say.
#[tokio::test]
async fn a_job_that_loses_the_probe_skips_the_provider_until_the_hold_even_on_a_lagging_view() {
    let clock = ManualClock::starting_at(t0());
    let truth = MemoryStore::new();
    open_circuit(&truth, "a", t0() + secs(5)).await;
    clock.advance(secs(5));
    let hold = secs(10) + FLIGHT_MARGIN;
    assert!(truth.claim_probe("a", clock.now(), hold).await.is_call(), "another worker takes the probe");
    let a = Scripted::new(vec![Ok(())]);
    let chain = chain(vec![member("a", true, a.clone())], Duration::ZERO);
    let store = LaggingView { truth, admits: Mutex::new(0), finishes: Mutex::new(0), releases: Mutex::new(0) };
    let mut progress = JobProgress::new(clock.now());
    let verdict = run_pass(&chain, &request(&job()), chain.max_wait, &mut progress, &store, &clock).await;
    assert_eq!(a.calls(), 0, "no call beside the probe");
    assert!(matches!(verdict, Verdict::Wait { until, .. } if until == t0() + secs(5) + hold), "{verdict:?}");
    assert_eq!(outcomes(&progress), vec![("a".into(), AttemptOutcome::SkippedCooldown)]);
    assert_eq!(
        (*store.admits.lock().unwrap(), *store.finishes.lock().unwrap(), *store.releases.lock().unwrap()),
        (1, 0, 1),
        "one ask, its slot given back uncounted"
    );
}

/// A claim lost to a circuit that the row shows as already ended (`lost_probe` returns `Held`
/// for an expired circuit, e.g. a row read a moment after the claim statement, or a row
/// rounded to the millisecond): the job is told to wait for a time already past.
struct ExpiredHeld {
    inner: MemoryStore,
    /// Until then every claim is answered `Held` with a circuit ending at the claim's `now`.
    stale_until: SystemTime,
    claims: Mutex<usize>,
}

#[async_trait::async_trait]
impl ProviderState for ExpiredHeld {
    async fn admit(&self, ask: Ask<'_>, now: SystemTime) -> Admission {
        self.inner.admit(ask, now).await
    }
    async fn finish(&self, permit: Permit, tokens: Option<u64>, now: SystemTime) {
        self.inner.finish(permit, tokens, now).await
    }
    async fn release(&self, permit: Permit) {
        self.inner.release(permit).await
    }
    async fn cool_down(&self, provider: &str, cooldown: Cooldown) {
        self.inner.cool_down(provider, cooldown).await
    }
    async fn record_success(&self, provider: &str) {
        self.inner.record_success(provider).await
    }
    async fn claim_probe(&self, provider: &str, now: SystemTime, hold_for: Duration) -> ProbeClaim {
        *self.claims.lock().unwrap() += 1;
        if now < self.stale_until {
            let detail = "3 server errors in a row".to_string();
            return ProbeClaim::Held(Cooldown { until: now, reason: CooldownReason::Circuit, detail });
        }
        self.inner.claim_probe(provider, now, hold_for).await
    }
    async fn record_server_error(&self, provider: &str, detail: &str) -> u32 {
        self.inner.record_server_error(provider, detail).await
    }
    async fn record_rejected_output(&self, provider: &str, reason: &str) {
        self.inner.record_rejected_output(provider, reason).await
    }
}

/// Held: a `Held` whose cooldown has already ended neither busy-loops the job nor fails it: the
/// overdue pauses grow (2.5, 10, 40, then 125-250 ms) and the job calls once the claim is won.
#[tokio::test]
async fn review_a_claim_held_by_an_expired_circuit_neither_loops_nor_fails_the_job() {
    let clock = ManualClock::starting_at(t0());
    let a = Scripted::new(vec![Ok(())]);
    let chain = chain(vec![member("a", true, a.clone())], Duration::ZERO);
    let store = ExpiredHeld { inner: MemoryStore::new(), stale_until: t0() + secs(1), claims: Mutex::new(0) };
    let hold = HoldPolicy::new(secs(5), clock.now(), secs(60));
    let verdict = run(&chain, &job(), chain.max_wait, &mut JobProgress::new(t0()), &store, hold, &clock).await;
    assert_eq!(answered_by(&verdict), Some("a"), "{verdict:?}");
    assert_eq!(a.calls(), 1);
    let claims = *store.claims.lock().unwrap();
    assert!(claims <= 16, "{claims} claims in one second");
}
