//! Batched admission and finishes (issue #9, migration 0008): the asks for one provider that
//! wait together are decided in one transaction, in order, as if one after another; answers are
//! recorded in batches. Strictness must be exactly that of one admission at a time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fallback_worker::config::{LimitConfig, QuotaPoolConfig};
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, ProviderState, QuotaMeasure};
use sqlx::PgConnection;

use crate::ledger_batching::{
    DEFAULT_POOL, admit_queued, admits_again, finish_queued, release, store_at, store_behind_freezing_relay,
    until_waiting_on_locks,
};
use crate::support::*;

fn requests(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: Some(n), tokens: None, per: Duration::from_secs(secs), resets: None }
}

fn tokens(n: u64, secs: u64) -> LimitConfig {
    LimitConfig { requests: None, tokens: Some(n), per: Duration::from_secs(secs), resets: None }
}

/// Sends `n` asks at once from each store (each a worker), and returns every answer.
async fn ask_all(
    stores: &[PgStore],
    n: usize,
    provider_of: impl Fn(usize) -> &'static str,
    limits: &[LimitConfig],
    pools: &[QuotaPoolConfig],
    tokens_of: impl Fn(usize) -> u64,
) -> Vec<(&'static str, Admission)> {
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for i in 0..n {
            let (store, limits, pools) = (store.clone(), limits.to_vec(), pools.to_vec());
            let (provider, tokens) = (provider_of(i), tokens_of(s * n + i));
            tasks.push(tokio::spawn(async move {
                let ask = Ask { provider, limits: &limits, pools: &pools, tokens, flight: Duration::from_secs(5) };
                (provider, store.admit(ask, SystemTime::now()).await)
            }));
        }
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

async fn used(db: &mut PgConnection, kind: &str, scope: &str, measure: &str) -> i64 {
    sqlx::query_scalar("SELECT used FROM quota_window WHERE kind = $1 AND scope = $2 AND measure = $3")
        .bind(kind)
        .bind(scope)
        .bind(measure)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_asks_from_two_workers_get_exactly_the_limit_and_refusals_say_when() {
    let env = TestEnv::new().await;
    let stores = [store_at(&env.database_url, DEFAULT_POOL).await, store_at(&env.database_url, DEFAULT_POOL).await];
    let limits = [requests(7, 60), tokens(1_000_000, 60)];
    let started = SystemTime::now();
    let answers = ask_all(&stores, 60, |_| "p", &limits, &[], |_| 10).await;
    let ended = SystemTime::now();
    let granted = answers.iter().filter(|(_, a)| matches!(a, Admission::Granted(p) if p.usage_id.is_some())).count();
    assert_eq!(granted, 7, "exactly the limit across both workers: {answers:?}");
    for (_, answer) in &answers {
        match answer {
            Admission::Granted(_) => {}
            // Every slot is held by a call in flight: room comes when the window has moved on
            // (a call answered now leaves one window from now), not sooner, not later.
            Admission::OverQuota { until, measure: QuotaMeasure::Requests } => assert!(
                *until > started + Duration::from_secs(59) && *until <= ended + Duration::from_secs(61),
                "refused until {:?} after the start",
                until.duration_since(started)
            ),
            other => panic!("{other:?}"),
        }
    }
    let mut db = env.db().await;
    assert_eq!(used(&mut db, "provider", "p", "requests").await, 7);
    assert_eq!(used(&mut db, "provider", "p", "tokens").await, 70);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT call_id) FROM quota_use").fetch_one(&mut db).await.unwrap();
    assert_eq!(rows, 7, "one call id per grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_shared_by_two_providers_batched_concurrently_never_exceed_them() {
    let env = TestEnv::new().await;
    let stores = [store_at(&env.database_url, DEFAULT_POOL).await, store_at(&env.database_url, DEFAULT_POOL).await];
    let pools = [QuotaPoolConfig { name: "account".into(), limits: vec![requests(9, 60), tokens(500, 60)] }];
    let own = [requests(6, 60)];
    let provider_of = |i: usize| if i.is_multiple_of(2) { "model-a" } else { "model-b" };
    // Tokens vary: the pool's token limit refuses some asks that its request limit would take.
    let answers = ask_all(&stores, 50, provider_of, &own, &pools, |i| [30, 80, 55][i % 3]).await;
    let mut db = env.db().await;
    let (pool_requests, pool_tokens) =
        (used(&mut db, "pool", "account", "requests").await, used(&mut db, "pool", "account", "tokens").await);
    let granted: Vec<_> = answers.iter().filter(|(_, a)| matches!(a, Admission::Granted(_))).collect();
    assert!(pool_requests <= 9 && pool_tokens <= 500, "{pool_requests} requests, {pool_tokens} tokens");
    assert_eq!(i64::try_from(granted.len()).unwrap(), pool_requests, "every grant counted in the pool once");
    let own_a = used(&mut db, "provider", "model-a", "requests").await;
    let own_b = used(&mut db, "provider", "model-b", "requests").await;
    assert!(own_a <= 6 && own_b <= 6 && own_a + own_b == pool_requests, "{own_a} + {own_b} vs {pool_requests}");
    // Under 9 grants only when the tokens ran out first: then no room is left for the smallest ask.
    assert!(pool_requests == 9 || pool_tokens + 30 > 500, "{pool_requests} requests, {pool_tokens} tokens");
    for (_, answer) in &answers {
        assert!(matches!(answer, Admission::Granted(_) | Admission::OverQuota { .. }), "{answer:?}");
    }
}

/// A tiny deterministic generator (xorshift): the cases are the same on every run.
struct Cases(u64);

impl Cases {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

const WINDOWS: [(&str, &str, i64); 3] =
    [("pool", "requests", 30_000), ("provider", "requests", 60_000), ("provider", "tokens", 60_000)];

/// Seeds the three windows of `scope` with the same rows (amount, leaving in ms from `base_ms`).
async fn seed(db: &mut PgConnection, scope: &str, rows: &[(usize, i64, i64)], base_ms: i64) {
    for (w, (kind, measure, window_ms)) in WINDOWS.iter().enumerate() {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == w).collect();
        let amounts: Vec<i64> = mine.iter().map(|r| r.1).collect();
        let leaves: Vec<f64> = mine.iter().map(|r| (base_ms + r.2) as f64).collect();
        sqlx::query(
            "WITH added AS ( \
               INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at) \
               SELECT 0, $1, $2, $3, $4, '', a, to_timestamp(l / 1000) FROM unnest($5::bigint[], $6::float8[]) AS t(a, l) \
               RETURNING amount, leaves_at) \
             INSERT INTO quota_window (kind, scope, measure, window_ms, calendar, used, next_leave) \
             SELECT $1, $2, $3, $4, '', coalesce(sum(amount), 0), coalesce(min(leaves_at), 'infinity') FROM added",
        )
        .bind(kind)
        .bind(scope)
        .bind(measure)
        .bind(window_ms)
        .bind(&amounts)
        .bind(&leaves)
        .execute(&mut *db)
        .await
        .unwrap();
    }
}

/// What the current transaction of `db` read of each of `tables` (named in order): (table,
/// whole-table reads, reads through an index, rows fetched through an index). Postgres 15 also
/// counts a session's earlier, unflushed work there: measure on a connection that did nothing else.
pub(crate) async fn reads_in_transaction(db: &mut PgConnection, tables: &[&str]) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT relname::text, coalesce(seq_scan, 0), coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0) \
         FROM pg_stat_xact_user_tables WHERE relname = ANY($1) ORDER BY relname",
    )
    .bind(tables)
    .fetch_all(db)
    .await
    .unwrap()
}

/// (usage granted, blocked_until_ms, blocked_by) per ask.
type Answer = (bool, Option<i64>, Option<String>);
/// A row of `fallback_admit_batch`: ask, usage_id, blocked_until_ms, blocked_by.
type BatchRow = (i32, Option<i64>, Option<i64>, Option<String>);

#[tokio::test]
async fn a_batch_answers_each_ask_as_one_admission_after_another_would() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut db = env.db().await;
    let mut cases = Cases(0x9e37_79b9_7f4a_7c15);
    let (kinds, measures, windows_ms): (Vec<&str>, Vec<&str>, Vec<i64>) = (
        WINDOWS.iter().map(|w| w.0).collect(),
        WINDOWS.iter().map(|w| w.1).collect(),
        WINDOWS.iter().map(|w| w.2).collect(),
    );
    let calendars = vec![""; 3];
    let (mut refused, mut grants, mut too_large) = (0, 0, 0);
    for case in 0..40 {
        let limits = [cases.between(2, 8) as i64, cases.between(2, 8) as i64, cases.between(50, 200) as i64];
        // Use already in the windows, leaving 1..25 s from now: the refusals' waits come from it.
        let rows: Vec<(usize, i64, i64)> = (0..cases.between(0, 8))
            .map(|_| {
                let w = cases.below(3) as usize;
                let amount = if w == 2 { cases.between(1, 60) as i64 } else { 1 };
                (w, amount, cases.between(1_000, 25_000) as i64)
            })
            .collect();
        let asks = cases.between(1, 16) as usize;
        let ask_tokens: Vec<i64> = (0..asks).map(|_| cases.between(1, limits[2] as u64 * 5 / 4) as i64).collect();
        let flights: Vec<i64> = (0..asks).map(|_| cases.between(1_000, 20_000) as i64).collect();
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let (batch_scope, one_scope) = (format!("batch-{case}"), format!("one-{case}"));
        seed(&mut db, &batch_scope, &rows, base_ms).await;
        seed(&mut db, &one_scope, &rows, base_ms).await;

        let scopes = vec![batch_scope.as_str(); 3];
        let batch: Vec<BatchRow> = sqlx::query_as(
            "SELECT ask, usage_id, blocked_until_ms, blocked_by FROM fallback_admit_batch($1, $2, $3, $4, $5, $6, $7, \
               array_fill(NULL::timestamptz, ARRAY[3]), array_fill(NULL::timestamptz, ARRAY[3]), $8, $9, \
               array_fill(NULL::timestamptz, ARRAY[3 * $10::int])) ORDER BY ask",
        )
        .bind(&batch_scope)
        .bind(&kinds)
        .bind(&scopes)
        .bind(&measures)
        .bind(&windows_ms)
        .bind(&calendars)
        .bind(limits.to_vec())
        .bind(&ask_tokens)
        .bind(&flights)
        .bind(i32::try_from(asks).unwrap())
        .fetch_all(&mut db)
        .await
        .unwrap();
        assert_eq!(
            batch.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=asks as i32).collect::<Vec<_>>(),
            "one row per ask"
        );
        let batch: Vec<Answer> = batch.into_iter().map(|(_, id, until, by)| (id.is_some(), until, by)).collect();

        let scopes = vec![one_scope.as_str(); 3];
        let mut one_by_one: Vec<Answer> = Vec::new();
        for (tokens, flight) in ask_tokens.iter().zip(&flights) {
            let (id, until, by): (Option<i64>, Option<i64>, Option<String>) = sqlx::query_as(
                "SELECT usage_id, blocked_until_ms, blocked_by FROM fallback_admit($1, $2, $3, $4, $5, $6, $7, \
                   array_fill(NULL::timestamptz, ARRAY[3]), array_fill(NULL::timestamptz, ARRAY[3]), \
                   array_fill(NULL::timestamptz, ARRAY[3]), $8, $9)",
            )
            .bind(&one_scope)
            .bind(&kinds)
            .bind(&scopes)
            .bind(&measures)
            .bind(&windows_ms)
            .bind(&calendars)
            .bind(limits.to_vec())
            .bind(tokens)
            .bind(flight)
            .fetch_one(&mut db)
            .await
            .unwrap();
            one_by_one.push((id.is_some(), until, by));
        }

        for (i, (b, o)) in batch.iter().zip(&one_by_one).enumerate() {
            let context = format!("case {case}, ask {i}: limits {limits:?}, use {rows:?}, tokens {ask_tokens:?}");
            assert_eq!((b.0, &b.2), (o.0, &o.2), "granted and blocked_by; {context}");
            // Waits set by the use already there are exact; a wait set by the window's end
            // (now + window) moves with the clock between the two runs.
            let (b_until, o_until) = (b.1.unwrap_or(0), o.1.unwrap_or(0));
            assert!((b_until - o_until).abs() <= 500, "until {b_until} vs {o_until}; {context}");
            match (b.0, b.2.as_deref()) {
                (true, _) => grants += 1,
                (false, Some("tokens_exceed_limit")) => too_large += 1,
                _ => refused += 1,
            }
        }
        for (kind, measure, _) in WINDOWS {
            let (b, o) =
                (used(&mut db, kind, &batch_scope, measure).await, used(&mut db, kind, &one_scope, measure).await);
            assert_eq!(b, o, "case {case}: {kind} {measure} used");
        }
    }
    // The cases cover every kind of answer.
    assert!(grants > 20 && refused > 20 && too_large > 3, "{grants} granted, {refused} refused, {too_large} too large");
}

#[tokio::test]
async fn finishes_in_a_batch_free_their_own_rows_and_correct_their_own_token_counts() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100, 60), tokens(10_000, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 100, flight: Duration::from_secs(30) };
    let mut ids = Vec::new();
    for _ in 0..7 {
        let Admission::Granted(permit) = store.admit(ask, SystemTime::now()).await else { panic!("room for 7") };
        ids.push(permit);
    }
    let mut db = env.db().await;
    // Five answers in one batch (one id twice: it counts once, its first entry).
    let calls: Vec<i64> = ids.iter().take(5).map(|p| p.usage_id.unwrap()).chain([ids[0].usage_id.unwrap()]).collect();
    let counts = [Some(10i64), None, Some(300), Some(100), Some(0), Some(999)];
    let finished_at = SystemTime::now();
    sqlx::query("SELECT fallback_finish_batch($1, $2)")
        .bind(&calls)
        .bind(counts.to_vec())
        .execute(&mut db)
        .await
        .unwrap();
    // The sixth through the store (its batcher), the seventh not answered yet.
    store.finish_recorded(ids[5].clone(), Some(40), SystemTime::now()).await.unwrap();

    let expected_tokens = [10, 100, 300, 100, 0, 40, 100];
    for (i, (permit, tokens)) in ids.iter().zip(expected_tokens).enumerate() {
        let (amount, leaves_in_ms): (i64, f64) = sqlx::query_as(
            "SELECT amount, (extract(epoch FROM leaves_at - to_timestamp($2::float8 / 1000)) * 1000)::float8 FROM quota_use \
             WHERE call_id = $1 AND measure = 'tokens'",
        )
        .bind(permit.usage_id.unwrap())
        .bind(finished_at.duration_since(UNIX_EPOCH).unwrap().as_millis() as f64)
        .fetch_one(&mut db)
        .await
        .unwrap();
        assert_eq!(amount, tokens, "call {i}'s token count");
        if i < 6 {
            assert!(
                (59_000.0..62_000.0).contains(&leaves_in_ms),
                "answered call {i} leaves one window after its answer: {leaves_in_ms}"
            );
        } else {
            assert!(leaves_in_ms > 85_000.0, "the call in flight still leaves after its deadline: {leaves_in_ms}");
        }
    }
    assert_eq!(used(&mut db, "provider", "p", "tokens").await, expected_tokens.iter().sum::<i64>());
    assert_eq!(used(&mut db, "provider", "p", "requests").await, 7, "answers free no request before the window ends");
}

/// A batch whose connection died without a close (no RST) must not hold its provider's later
/// asks back for the life of the process: after the batch timeout they go out again, and the
/// database (which answers new connections all along) grants them.
#[tokio::test]
async fn a_batch_on_a_dead_connection_does_not_stall_its_provider() {
    let env = TestEnv::new().await;
    let (relay, store) = store_behind_freezing_relay(&env).await;
    let limits = [requests(100, 60)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
    assert!(matches!(store.admit(ask, SystemTime::now()).await, Admission::Granted(_)));
    // Another worker holds the provider's row: this worker's batch waits on it ...
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM provider_state WHERE provider = 'p' FOR UPDATE").execute(&mut locker).await.unwrap();
    let hung = {
        let (store, limits) = (store.clone(), limits.to_vec());
        tokio::spawn(async move {
            let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(5) };
            store.admit(ask, SystemTime::now()).await
        })
    };
    until_waiting_on_locks(&env, 1).await;
    // ... and its connection dies silently while it waits.
    relay.freeze_existing();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let stuck = hung.await.unwrap();
    assert!(matches!(stuck, Admission::OverQuota { .. }), "the stuck ask is told to come back shortly: {stuck:?}");

    // Granted locally (the store thought the database down) does not count: the shared windows
    // must take this provider's calls again.
    admits_again(&store, ask, "the batch's connection").await;
}

/// What a batch of one answer and one ask decided: whether the ask was granted, the tokens
/// window's total after both, and whether the answer and the grant were written by the same
/// transaction (the rows' `xmin`).
struct AnswerThenAsk {
    granted: bool,
    /// Refused by the tokens window (not sent back for a lock).
    refused_for_tokens: bool,
    tokens_used: i64,
    one_transaction: bool,
}

/// Call A (`asked` tokens) is admitted; while another ask of the provider waits on its row lock,
/// A's answer (`answered` tokens) and then an ask of `next` tokens queue behind it, so both go
/// out in the provider's next batch. Limit: 1000 tokens per minute.
async fn answer_then_ask_in_one_batch(asked: u64, answered: u64, next: u64) -> AnswerThenAsk {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(100, 60), tokens(1000, 60)];
    let ask = |tokens| Ask { provider: "p", limits: &limits, pools: &[], tokens, flight: Duration::from_secs(30) };
    let Admission::Granted(a) = store.admit(ask(asked), SystemTime::now()).await else { panic!("room for A") };
    let locker = crate::admission_review::lock_provider_row(&env, "p").await;
    let blocked = admit_queued(&store, "p", &limits, 1);
    until_waiting_on_locks(&env, 1).await;
    let finished = finish_queued(&store, &a, Some(answered));
    let asked = admit_queued(&store, "p", &limits, next);
    release(locker).await;
    assert!(matches!(blocked.await.unwrap().0, Admission::Granted(_)), "the waiting ask of 1 token fits");
    finished.await.unwrap();
    let answer = asked.await.unwrap().0;
    let mut db = env.db().await;
    let xmin = |call: i64| {
        sqlx::query_scalar::<_, String>("SELECT xmin::text FROM quota_use WHERE call_id = $1 AND measure = 'tokens'")
            .bind(call)
    };
    let answered_in: String = xmin(a.usage_id.unwrap()).fetch_one(&mut db).await.unwrap();
    let granted_in = match &answer {
        Admission::Granted(b) => Some(xmin(b.usage_id.unwrap()).fetch_one(&mut db).await.unwrap()),
        _ => None,
    };
    AnswerThenAsk {
        granted: granted_in.is_some(),
        refused_for_tokens: matches!(answer, Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }),
        tokens_used: used(&mut db, "provider", "p", "tokens").await,
        one_transaction: granted_in.as_deref() == Some(answered_in.as_str()),
    }
}

/// Migration 0009: a provider's answers go out with its next asks, in one transaction, applied
/// first. A lowered count frees its room for the ask that follows it: 100 + 1 + 800 fits, where
/// the ask decided before the answer (900 + 1 + 800) would be refused.
#[tokio::test]
async fn an_answer_queued_before_an_ask_frees_its_room_for_it_in_the_same_transaction() {
    let decided = answer_then_ask_in_one_batch(900, 100, 800).await;
    assert!(decided.granted, "the lowered answer is applied before the ask");
    assert!(decided.one_transaction, "the answer and the grant were written by one transaction");
    assert_eq!(decided.tokens_used, 100 + 1 + 800);
}

/// The other way round: a raised count counts before the ask that follows it. Decided first,
/// the ask (100 + 1 + 100) would fit, and the answer would then take the window to 1051 of 1000.
#[tokio::test]
async fn an_answer_queued_before_an_ask_counts_its_raise_before_the_ask_is_decided() {
    let decided = answer_then_ask_in_one_batch(100, 950, 100).await;
    assert!(!decided.granted && decided.refused_for_tokens, "950 + 1 + 100 does not fit in 1000");
    assert_eq!(decided.tokens_used, 950 + 1, "never more than the limit");
}

/// Answers alone lock their windows one by one in the canonical order (0009 rewrote that lock):
/// with the later window (the provider's own; a pool's sorts first) held elsewhere, an answer
/// waits on it while holding the earlier one (the pool's), never the other way round (two
/// workers would then deadlock).
#[tokio::test]
async fn answers_alone_lock_their_windows_in_the_canonical_order() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let (limits, pools) =
        ([requests(100, 60)], [QuotaPoolConfig { name: "acct".into(), limits: vec![tokens(1000, 60)] }]);
    let ask = Ask { provider: "p", limits: &limits, pools: &pools, tokens: 10, flight: Duration::from_secs(30) };
    let Admission::Granted(call) = store.admit(ask, SystemTime::now()).await else { panic!("room") };
    let lock_window = "SELECT 1 FROM quota_window WHERE kind = $1 AND scope = $2 FOR UPDATE";
    let try_lock_window = "SELECT 1 FROM quota_window WHERE kind = $1 AND scope = $2 FOR UPDATE NOWAIT";
    let mut locker = env.db().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query(lock_window).bind("provider").bind("p").execute(&mut locker).await.unwrap();
    let finisher = store.clone();
    let finished = tokio::spawn(async move { finisher.finish_recorded(call, Some(20), SystemTime::now()).await });
    until_waiting_on_locks(&env, 1).await;
    let mut probe = env.db().await;
    sqlx::query("BEGIN").execute(&mut probe).await.unwrap();
    let earlier = sqlx::query(try_lock_window).bind("pool").bind("acct").execute(&mut probe).await;
    let code = earlier.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("55P03"), "the answer holds the earlier window while it waits: {earlier:?}");
    sqlx::query("ROLLBACK").execute(&mut probe).await.unwrap();
    release(locker).await;
    finished.await.unwrap().unwrap();
    assert_eq!(used(&mut env.db().await, "pool", "acct", "tokens").await, 20, "the answer was recorded");
}

/// Admissions, answers and retirement find every row through a key (migration 0010): none of
/// their statements reads a whole table, so their cost grows neither with the dead versions a
/// window row leaves behind (every batch updates it) nor with the calls in the window. The
/// tables are small and analyzed here, which is exactly when a planner prefers to scan them
/// (and the plan it keeps would go on scanning as they grow): 0009 scanned quota_window and
/// quota_use 20 and 18 times in this transaction, and 0010 without its `enable_seqscan = off`
/// all three tables.
#[tokio::test]
async fn admissions_answers_and_retirement_read_no_table_whole() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut seeder = env.db().await;
    let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    // Use that left a while ago (retired by the first admission) and use still in the windows.
    let rows = [(0, 1, -5_000), (1, 1, -5_000), (2, 40, -5_000), (1, 1, 20_000), (2, 30, 20_000)];
    seed(&mut seeder, "p", &rows, base_ms).await;
    // Statistics that say how small the tables are: what makes a planner choose to scan them.
    sqlx::raw_sql(
        "INSERT INTO provider_state (provider) VALUES ('p'); ANALYZE quota_window, quota_use, provider_state",
    )
    .execute(&mut seeder)
    .await
    .unwrap();
    let mut db = env.db().await;
    let (kinds, measures, windows_ms): (Vec<&str>, Vec<&str>, Vec<i64>) = (
        WINDOWS.iter().map(|w| w.0).collect(),
        WINDOWS.iter().map(|w| w.1).collect(),
        WINDOWS.iter().map(|w| w.2).collect(),
    );
    let (scopes, calendars, limits) = (vec!["p"; 3], vec![""; 3], vec![3i64, 4, 1_000]);
    let admit_batch = "SELECT ask, usage_id, blocked_until_ms, blocked_by FROM fallback_admit_batch($1, $2, $3, $4, $5, \
         $6, $7, array_fill(NULL::timestamptz, ARRAY[3]), array_fill(NULL::timestamptz, ARRAY[3]), $8, $9, \
         array_fill(NULL::timestamptz, ARRAY[3 * $10::int])) ORDER BY ask";
    let finish_and_admit = "SELECT ask, usage_id, blocked_until_ms, blocked_by FROM fallback_finish_and_admit($1, $2, \
         $3, $4, $5, $6, $7, array_fill(NULL::timestamptz, ARRAY[3]), array_fill(NULL::timestamptz, ARRAY[3]), $8, $9, \
         array_fill(NULL::timestamptz, ARRAY[3 * $10::int]), $11, $12) ORDER BY ask";
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    let first: Vec<BatchRow> = sqlx::query_as(admit_batch)
        .bind("p")
        .bind(&kinds)
        .bind(&scopes)
        .bind(&measures)
        .bind(&windows_ms)
        .bind(&calendars)
        .bind(&limits)
        .bind(vec![100i64, 100])
        .bind(vec![10_000i64, 10_000])
        .bind(2i32)
        .fetch_all(&mut db)
        .await
        .unwrap();
    let calls: Vec<i64> = first.iter().filter_map(|r| r.1).collect();
    assert_eq!(calls.len(), 2, "both granted: {first:?}");
    // Their answers ride with three more asks, of which the pool's limit (3) refuses one.
    let second: Vec<BatchRow> = sqlx::query_as(finish_and_admit)
        .bind("p")
        .bind(&kinds)
        .bind(&scopes)
        .bind(&measures)
        .bind(&windows_ms)
        .bind(&calendars)
        .bind(&limits)
        .bind(vec![50i64, 50, 50])
        .bind(vec![10_000i64, 10_000, 10_000])
        .bind(3i32)
        .bind(&calls)
        .bind(vec![Some(120i64), None])
        .fetch_all(&mut db)
        .await
        .unwrap();
    let granted: Vec<i64> = second.iter().filter_map(|r| r.1).collect();
    assert_eq!(granted.len(), 1, "one more fits the pool's 3 requests: {second:?}");
    assert!(second.iter().any(|r| r.3.as_deref() == Some("requests")), "the rest wait for room: {second:?}");
    sqlx::query("SELECT fallback_finish_batch($1, $2)")
        .bind(&granted)
        .bind(vec![Some(10i64)])
        .execute(&mut db)
        .await
        .unwrap();
    // What this transaction read, table by table (counted while it runs).
    let reads = reads_in_transaction(&mut db, &["provider_state", "quota_use", "quota_window"]).await;
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert_eq!(reads.len(), 3, "every table was read: {reads:?}");
    for (table, scans, through_keys, _) in &reads {
        assert_eq!(*scans, 0, "{table} read whole: {reads:?}");
        assert!(*through_keys > 0, "{table} read through its keys: {reads:?}");
    }
    assert_eq!(used(&mut db, "pool", "p", "requests").await, 3, "the old use retired, three calls in");
    assert_eq!(used(&mut db, "provider", "p", "tokens").await, 30 + 120 + 100 + 10, "answers counted");
}

/// p's limits in the refusal tests: 10 requests and 1000 tokens a minute.
pub(crate) const REFUSAL_LIMITS: [LimitConfig; 2] = [
    LimitConfig { requests: Some(10), tokens: None, per: Duration::from_secs(60), resets: None },
    LimitConfig { requests: None, tokens: Some(1_000), per: Duration::from_secs(60), resets: None },
];

/// An ask of `tokens` to p under [`REFUSAL_LIMITS`].
pub(crate) fn refusal_ask(tokens: u64) -> Ask<'static> {
    Ask { provider: "p", limits: &REFUSAL_LIMITS, pools: &[], tokens, flight: Duration::from_secs(30) }
}

/// 900 of p's 1000 tokens taken, then an ask of 500 refused for lack of tokens: when the
/// database said there would be room.
pub(crate) async fn a_token_refusal(store: &PgStore) -> SystemTime {
    assert!(matches!(store.admit(refusal_ask(900), SystemTime::now()).await, Admission::Granted(_)));
    let refused = store.admit(refusal_ask(500), SystemTime::now()).await;
    let Admission::OverQuota { until, measure: QuotaMeasure::Tokens } = refused else { panic!("{refused:?}") };
    until
}

/// From here the database refuses to admit anything: an ask it is still asked fails, so only
/// the refusal a worker kept can answer one with a time.
pub(crate) async fn the_database_admits_no_more(env: &TestEnv) {
    for_every_signature(env, "fallback_admit_batch", "DROP FUNCTION").await;
}

/// Runs `command` (`DROP FUNCTION`, `ALTER FUNCTION`, followed by the signature and `rest`) on
/// every signature of `function`: since migration 0012 the functions of 0010 have two.
pub(crate) async fn for_every_signature(env: &TestEnv, function: &str, command: &str) {
    for_every_signature_then(env, function, command, "").await;
}

/// As [`for_every_signature`], with `rest` after each signature.
pub(crate) async fn for_every_signature_then(env: &TestEnv, function: &str, command: &str, rest: &str) {
    let signatures: Vec<String> = sqlx::query_scalar("SELECT oid::regprocedure::text FROM pg_proc WHERE proname = $1")
        .bind(function)
        .fetch_all(&mut env.db().await)
        .await
        .unwrap();
    assert!(signatures.len() >= 2, "{function}: {signatures:?}");
    for signature in signatures {
        // The signature is the catalog's own text, the command and rest the test's literals.
        let sql = format!("{command} {signature} {rest}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut env.db().await).await.unwrap();
    }
}

/// A refusal for lack of tokens is kept so that waiting jobs do not herd the database, but it
/// stands only for asks at least as large: a smaller ask may fit, and the database decides it.
/// (The kept refusal used to answer every later ask of the provider until its time, so one large
/// job refused for a day's token budget held every small one back, on free capacity.)
#[tokio::test]
async fn a_token_refusal_does_not_hold_back_a_smaller_ask_that_fits() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    a_token_refusal(&store).await;
    let small = store.admit(refusal_ask(50), SystemTime::now()).await;
    assert!(matches!(small, Admission::Granted(_)), "50 tokens fit beside 900 of 1000: {small:?}");
    let large = store.admit(refusal_ask(500), SystemTime::now()).await;
    assert!(matches!(large, Admission::OverQuota { measure: QuotaMeasure::Tokens, .. }), "{large:?}");
    assert_eq!(used(&mut env.db().await, "provider", "p", "tokens").await, 950);
}

/// Every ask takes one request, so a refusal for lack of requests stands for asks of any size.
#[tokio::test]
async fn a_request_refusal_holds_back_asks_of_every_size() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [requests(1, 60), tokens(1_000, 60)];
    let ask = |tokens| Ask { provider: "p", limits: &limits, pools: &[], tokens, flight: Duration::from_secs(30) };
    assert!(matches!(store.admit(ask(100), SystemTime::now()).await, Admission::Granted(_)));
    let refused = store.admit(ask(500), SystemTime::now()).await;
    let Admission::OverQuota { until, measure: QuotaMeasure::Requests } = refused else { panic!("{refused:?}") };
    // Only the kept refusal can answer now, and it answers the smaller ask too.
    the_database_admits_no_more(&env).await;
    let small = store.admit(ask(10), SystemTime::now()).await;
    assert_eq!(small, Admission::OverQuota { until, measure: QuotaMeasure::Requests }, "the kept refusal answers");
}

/// An observation of a provider's headers (`fallback_observe`, for every answer whose headers
/// speak of a declared limit) reads only the rows it needs (migration 0011): taking back learnt
/// use, 0007 looked for the window's learnt rows, and for the calls admitted after the observed
/// one, through the index of all the window's calls (or a scan of the whole table). Measured on a
/// connection of its own (Postgres 15 shows a session's earlier, unflushed counts in the view),
/// with cached and with generic plans.
#[tokio::test]
async fn observations_read_no_table_whole() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut seeder = env.db().await;
    let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    // A window holding 2000 calls (call ids 1..=2000), 5 of learnt use, and statistics that say so.
    let calls: Vec<(usize, i64, i64)> = (0..2_000).map(|i| (1, 1, 30_000 + i)).collect();
    seed(&mut seeder, "p", &calls, base_ms).await;
    sqlx::raw_sql(
        "UPDATE quota_use SET call_id = id WHERE NOT learnt; \
         INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt) \
         VALUES (0, 'provider', 'p', 'requests', 60000, '', 5, now() + interval '20 s', true); \
         UPDATE quota_window SET used = used + 5 WHERE kind = 'provider' AND scope = 'p' AND measure = 'requests'; \
         ANALYZE quota_window, quota_use",
    )
    .execute(&mut seeder)
    .await
    .unwrap();
    let last_call: i64 = sqlx::query_scalar("SELECT max(call_id) FROM quota_use").fetch_one(&mut seeder).await.unwrap();
    for generic in [false, true] {
        let mut db = env.db().await;
        if generic {
            sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut db).await.unwrap();
        }
        sqlx::query("BEGIN").execute(&mut db).await.unwrap();
        // Headers of the call before the last (the last one admitted after it): the provider
        // says 1998 of 2010 are used, 7 fewer than our 2005 (2000 calls, 5 learnt): the learnt
        // use is taken back (real calls never are); then that it has 0 left: learnt again.
        let observe = "SELECT fallback_observe('provider', 'p', 'requests', 60000, '', 2010, $1, \
                       now() + interval '1 minute', $2)";
        let mut answers = Vec::new();
        for remaining in [12i64, 0, 12, 0, 12, 0] {
            let used: i64 =
                sqlx::query_scalar(observe).bind(remaining).bind(last_call - 1).fetch_one(&mut db).await.unwrap();
            answers.push(used);
        }
        let reads = reads_in_transaction(&mut db, &["quota_use", "quota_window"]).await;
        sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
        let context = format!("generic plans: {generic}; {reads:?}");
        assert_eq!(answers[..2], [2_000, 2_010], "the learnt use taken back, then learnt again; {context}");
        assert_eq!(reads.len(), 2, "both tables were read: {context}");
        for (table, scans, through_keys, fetched) in &reads {
            assert_eq!(*scans, 0, "{table} read whole: {context}");
            assert!(*through_keys > 0, "{table} read through its keys: {context}");
            // Six observations: a few rows each, not the window's 2000 calls.
            assert!(*fetched < 100, "{table}: {fetched} rows fetched; {context}");
        }
    }
}
