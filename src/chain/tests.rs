//! The engine driven by scripted providers and the in-memory store: no network, no broker.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::json;

use super::*;
use crate::providers::FailureKind;
use crate::state::memory::MemoryStore;

/// A provider that answers from a script and counts its calls.
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
        next.map(|()| Completion {
            status: 200,
            request_id: "req".into(),
            body: json!({"object": "chat.completion", "choices": []}),
            total_tokens: Some(10),
            exhausted_until: None,
        })
    }
}

fn failure(kind: FailureKind, status: u16) -> Failure {
    Failure::new(kind, Some(status), format!("HTTP {status}"))
}

fn member(name: &str, free: bool, provider: Arc<Scripted>) -> Member {
    Member {
        name: name.into(),
        model: format!("{name}-model"),
        free,
        context_window: None,
        max_retries: 0,
        limits: Vec::new(),
        timeout: Duration::from_secs(10),
        provider,
    }
}

fn chain(members: Vec<Member>, free_wait: Duration) -> Chain {
    Chain {
        name: "default".into(),
        members,
        max_wait: Duration::from_secs(600),
        max_wait_limit: Duration::from_secs(86_400),
        free_wait,
    }
}

fn body() -> ChatBody {
    serde_json::from_value(json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100})).unwrap()
}

fn outcomes(progress: &JobProgress) -> Vec<(String, AttemptOutcome)> {
    progress.attempts.iter().map(|a| (a.provider.clone(), a.outcome)).collect()
}

async fn pass(chain: &Chain, progress: &mut JobProgress, store: &MemoryStore) -> Verdict {
    run_pass(chain, &body(), chain.max_wait, progress, store).await
}

#[tokio::test]
async fn a_429_moves_on_at_once_and_cools_the_provider_for_everyone() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_secs(30));
    let (a, b) = (Scripted::new(vec![Err(limited)]), Scripted::new(vec![]));
    let chain = chain(vec![member("a", true, a.clone()), member("b", true, b.clone())], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(SystemTime::now());
    let verdict = pass(&chain, &mut progress, &store).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, .. } if provider == "b"), "{verdict:?}");
    assert_eq!(outcomes(&progress), vec![("a".into(), AttemptOutcome::RateLimited), ("b".into(), AttemptOutcome::Ok)]);
    assert_eq!(store.cooldown_of("a").unwrap().reason, CooldownReason::RateLimited);

    // The next job does not call the cooling provider at all.
    let mut next = JobProgress::new(SystemTime::now());
    pass(&chain, &mut next, &store).await;
    assert_eq!(a.calls(), 1);
    assert_eq!(next.attempts[0].outcome, AttemptOutcome::SkippedCooldown);
}

#[tokio::test]
async fn timeouts_cool_down_30s_after_the_in_place_retries() {
    let a = Scripted::new(vec![Err(failure(FailureKind::Timeout, 0)), Err(failure(FailureKind::Timeout, 0))]);
    let b = Scripted::new(vec![]);
    let mut with_retry = member("a", true, a.clone());
    with_retry.max_retries = 1;
    let chain = chain(vec![with_retry, member("b", true, b)], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(SystemTime::now());
    let verdict = pass(&chain, &mut progress, &store).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, .. } if provider == "b"));
    assert_eq!(a.calls(), 2, "one try plus max_retries = 1");
    let cooldown = store.cooldown_of("a").unwrap();
    assert_eq!(cooldown.reason, CooldownReason::Unreachable);
    let left = cooldown.until.duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(25) && left <= Duration::from_secs(30), "{left:?}");
}

#[tokio::test]
async fn client_errors_move_on_without_cooldown_and_fail_the_job_when_all_refuse() {
    let a = Scripted::new(vec![Err(failure(FailureKind::Client, 400))]);
    let b = Scripted::new(vec![Err(failure(FailureKind::Client, 413))]);
    let chain = chain(vec![member("a", true, a), member("b", true, b)], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(SystemTime::now());
    let verdict = pass(&chain, &mut progress, &store).await;
    let Verdict::Failed { code, message } = verdict else { panic!("{verdict:?}") };
    assert_eq!(code, ErrorCode::AllProvidersFailed);
    assert!(message.contains("a: client_error 400") && message.contains("b: client_error 413"), "{message}");
    assert!(store.cooldown_of("a").is_none());
}

#[tokio::test]
async fn auth_errors_cool_down_an_hour() {
    let a = Scripted::new(vec![Err(failure(FailureKind::Auth, 401))]);
    let chain = chain(vec![member("a", true, a), member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    pass(&chain, &mut JobProgress::new(SystemTime::now()), &store).await;
    let cooldown = store.cooldown_of("a").unwrap();
    assert_eq!(cooldown.reason, CooldownReason::Auth);
    assert!(cooldown.until > SystemTime::now() + Duration::from_secs(3500));
}

#[tokio::test]
async fn a_run_of_server_errors_opens_the_circuit() {
    let errors = (0..3).map(|_| Err(failure(FailureKind::Server, 500))).collect();
    let a = Scripted::new(errors);
    let chain = chain(vec![member("a", true, a.clone()), member("b", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    for _ in 0..3 {
        pass(&chain, &mut JobProgress::new(SystemTime::now()), &store).await;
    }
    let cooldown = store.cooldown_of("a").expect("circuit open");
    assert_eq!(cooldown.reason, CooldownReason::Circuit);
    pass(&chain, &mut JobProgress::new(SystemTime::now()), &store).await;
    assert_eq!(a.calls(), 3, "no call while the circuit is open");
}

#[tokio::test]
async fn paid_providers_wait_for_free_wait() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_secs(20));
    let free = Scripted::new(vec![Err(limited)]);
    let paid = Scripted::new(vec![]);
    let chain = chain(vec![member("free", true, free), member("paid", false, paid.clone())], Duration::from_secs(60));
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(SystemTime::now());
    let verdict = pass(&chain, &mut progress, &store).await;
    let Verdict::Wait { until } = verdict else { panic!("{verdict:?}") };
    assert!(until <= SystemTime::now() + Duration::from_secs(20), "wakes for the free provider first");
    assert_eq!(paid.calls(), 0);
    assert_eq!(progress.attempts[1].outcome, AttemptOutcome::SkippedPaid);

    // Once free_wait has passed the paid net is used.
    let mut old = JobProgress::new(SystemTime::now() - Duration::from_secs(61));
    let verdict = pass(&chain, &mut old, &store).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, free: false, .. } if provider == "paid"));
}

#[tokio::test]
async fn the_paid_net_is_used_at_once_when_free_wait_is_zero() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_secs(20));
    let chain = chain(
        vec![member("free", true, Scripted::new(vec![Err(limited)])), member("paid", false, Scripted::new(vec![]))],
        Duration::ZERO,
    );
    let verdict = pass(&chain, &mut JobProgress::new(SystemTime::now()), &MemoryStore::new()).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, .. } if provider == "paid"));
}

#[tokio::test]
async fn a_wait_beyond_max_wait_is_deadline_exceeded() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_secs(3600));
    let mut chain = chain(vec![member("a", true, Scripted::new(vec![Err(limited)]))], Duration::ZERO);
    chain.max_wait = Duration::from_secs(60);
    let verdict = pass(&chain, &mut JobProgress::new(SystemTime::now()), &MemoryStore::new()).await;
    assert!(matches!(verdict, Verdict::Failed { code: ErrorCode::DeadlineExceeded, .. }), "{verdict:?}");
}

#[tokio::test]
async fn prompts_too_long_for_a_context_window_skip_it_without_a_call() {
    let small = Scripted::new(vec![]);
    let mut narrow = member("narrow", true, small.clone());
    narrow.context_window = Some(50);
    let chain = chain(vec![narrow, member("wide", true, Scripted::new(vec![]))], Duration::ZERO);
    let store = MemoryStore::new();
    let mut progress = JobProgress::new(SystemTime::now());
    let verdict = pass(&chain, &mut progress, &store).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, .. } if provider == "wide"));
    assert_eq!(small.calls(), 0);
    assert_eq!(progress.attempts[0].outcome, AttemptOutcome::SkippedContext);
    assert!(store.cooldown_of("narrow").is_none());
}

#[tokio::test]
async fn run_waits_in_place_for_a_short_cooldown_and_then_answers() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_millis(300));
    let a = Scripted::new(vec![Err(limited)]);
    let chain = chain(vec![member("a", true, a.clone())], Duration::ZERO);
    let mut progress = JobProgress::new(SystemTime::now());
    let hold = HoldPolicy { hold_limit: Duration::from_secs(5), hold_until: Instant::now() + Duration::from_secs(10) };
    let verdict = run(&chain, &body(), chain.max_wait, &mut progress, &MemoryStore::new(), hold).await;
    assert!(matches!(verdict, Verdict::Answered { .. }), "{verdict:?}");
    assert_eq!(a.calls(), 2);
}

#[tokio::test]
async fn run_hands_back_waits_longer_than_the_hold_limit() {
    let mut limited = failure(FailureKind::RateLimited, 429);
    limited.retry_at = Some(SystemTime::now() + Duration::from_secs(120));
    let chain = chain(vec![member("a", true, Scripted::new(vec![Err(limited)]))], Duration::ZERO);
    let hold = HoldPolicy { hold_limit: Duration::from_secs(5), hold_until: Instant::now() + Duration::from_secs(600) };
    let verdict =
        run(&chain, &body(), chain.max_wait, &mut JobProgress::new(SystemTime::now()), &MemoryStore::new(), hold).await;
    assert!(matches!(verdict, Verdict::Wait { .. }), "{verdict:?}");
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
    let progress = JobProgress::resume(SystemTime::now(), attempts);
    assert!(progress.dropped.contains("a"));
}

#[tokio::test]
async fn waking_up_again_and_again_lists_each_stretch_of_skips_once() {
    let store = MemoryStore::new();
    let cooling_until = SystemTime::now() + Duration::from_millis(400);
    store
        .cool_down(
            "free",
            crate::state::Cooldown { until: cooling_until, reason: CooldownReason::RateLimited, detail: String::new() },
        )
        .await;
    let paid = Scripted::new(vec![]);
    // The free provider cools for 400 ms; the paid one may be used after 150 ms: two passes skip
    // the free one, the second calls the paid one.
    let chain = chain(
        vec![member("free", true, Scripted::new(vec![])), member("paid", false, paid.clone())],
        Duration::from_millis(150),
    );
    let mut progress = JobProgress::new(SystemTime::now());
    let hold = HoldPolicy { hold_limit: Duration::from_secs(5), hold_until: Instant::now() + Duration::from_secs(10) };
    let verdict = run(&chain, &body(), chain.max_wait, &mut progress, &store, hold).await;
    assert!(matches!(verdict, Verdict::Answered { ref provider, .. } if provider == "paid"), "{verdict:?}");
    assert_eq!(
        outcomes(&progress),
        vec![
            ("free".into(), AttemptOutcome::SkippedCooldown),
            ("paid".into(), AttemptOutcome::SkippedPaid),
            ("paid".into(), AttemptOutcome::Ok),
        ]
    );
}
