//! Adversarial review of migration 0011 (`quota_use_learnt`, `fallback_observe` with
//! `enable_seqscan = off`).
//!
//! Counters are read on a fresh connection: on PostgreSQL 15, `pg_stat_xact_user_tables` also
//! shows a session's earlier transactions' counts that were not flushed yet (see
//! `xact_counters_carry_earlier_transactions`), so seeding on the measuring connection can
//! pollute what is measured.

use sqlx::PgConnection;

use crate::batched_admission::reads_in_transaction;
use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::support::*;

/// Four providers p0..p3, each with a 60 s requests and a 60 s tokens window; `n` calls of
/// distinct ids 1..=n (as admissions give them) in turn to each provider (n / 4 per window);
/// 5 learnt in p1's requests window; statistics that say so.
async fn seed_window(db: &mut PgConnection, n: i64) {
    sqlx::query(
        "INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at) \
         SELECT g, 'provider', 'p' || (g % 4), m, 60000, '', 1, now() + interval '30 s' + g * interval '1 ms' \
           FROM generate_series(1, $1::bigint) g, (VALUES ('requests'), ('tokens')) v(m)",
    )
    .bind(n)
    .execute(&mut *db)
    .await
    .unwrap();
    sqlx::raw_sql(
        "INSERT INTO quota_use (call_id, kind, scope, measure, window_ms, calendar, amount, leaves_at, learnt) \
         VALUES (0, 'provider', 'p1', 'requests', 60000, '', 5, now() + interval '20 s', true); \
         INSERT INTO quota_window (kind, scope, measure, window_ms, calendar, used, next_leave) \
         SELECT kind, scope, measure, window_ms, calendar, sum(amount), min(leaves_at) FROM quota_use \
          GROUP BY kind, scope, measure, window_ms, calendar; \
         ANALYZE quota_window, quota_use",
    )
    .execute(&mut *db)
    .await
    .unwrap();
}

/// (seq_scan, idx_scan, idx_tup_fetch) of quota_use in the transaction that runs `sql`, on a
/// fresh connection; returns also what `sql` returned.
async fn observe_measured(env: &TestEnv, session: &'static str, sql: &'static str) -> (i64, (i64, i64, i64)) {
    let mut db = env.db().await;
    if !session.is_empty() {
        sqlx::raw_sql(session).execute(&mut db).await.unwrap();
    }
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    let got: i64 = sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap();
    let reads = reads_in_transaction(&mut db, &["quota_use"]).await;
    sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
    let (_, scans, through_keys, fetched) = reads.into_iter().next().unwrap_or_default();
    (got, (scans, through_keys, fetched))
}

/// The headers came with the answer to call 7996 (p1 has one call admitted after it, 7997):
/// the lowering sums the window's calls admitted after it. With a generic plan (as any cached plan may become, and as
/// `plan_cache_mode = force_generic_plan` makes it) that sum finds them through the window's
/// leaving index and reads every call of the window, to keep 1 of them: no sequential scan, so
/// the commit's test is satisfied, yet the whole window is read on every observation. Fixed:
/// the calls after it are found through the call index first (0011's `fallback_observe`).
#[tokio::test]
async fn observe_with_a_generic_plan_reads_only_the_calls_after_the_observed_one() {
    observing_call_7996_takes_back_the_learnt_use_reading_few_rows("SET plan_cache_mode = force_generic_plan").await;
}

/// The headers of call 7996's answer, observed in a window of 8000 calls under `plan_setting`:
/// the learnt 5 are taken back, with no sequential scan and fewer than 100 rows of quota_use read
/// (the window holds 1 call after 7996).
async fn observing_call_7996_takes_back_the_learnt_use_reading_few_rows(plan_setting: &'static str) {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    seed_window(&mut env.db().await, 8_000).await;
    let (used, (scans, _, fetched)) = observe_measured(
        &env,
        plan_setting,
        "SELECT fallback_observe('provider', 'p1', 'requests', 60000, '', 2010, 12, now() + interval '1 minute', 7996)",
    )
    .await;
    assert_eq!(used, 2_000, "the learnt 5 taken back");
    assert_eq!(scans, 0, "no sequential scan");
    assert!(
        fetched < 100,
        "an observation read {fetched} rows of quota_use to sum the 1 call of the window after call 7996"
    );
}

/// The same observation with custom plans (the default): it reads only the few rows it needs.
#[tokio::test]
async fn observe_with_custom_plans_reads_few_rows() {
    observing_call_7996_takes_back_the_learnt_use_reading_few_rows("").await;
}

/// Mutation: without `quota_use_learnt` the commit's criteria (no sequential scan, some index
/// scan) still hold, because `enable_seqscan = off` sends the search for learnt rows through
/// the leaving index, which holds every call of the window. The committed test cannot see the
/// index go; only the rows read can.
#[tokio::test]
async fn the_learnt_index_is_what_keeps_an_observation_from_reading_its_window() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut db = env.db().await;
    seed_window(&mut db, 8_000).await;
    let sql = "SELECT fallback_observe('provider', 'p1', 'requests', 60000, '', 2010, 12, now() + interval '1 minute', 1000000)";
    let (_, (_, _, with_index)) = observe_measured(&env, "", sql).await;
    sqlx::raw_sql("DROP INDEX quota_use_learnt").execute(&mut db).await.unwrap();
    let (used, (scans, through_keys, without_index)) = observe_measured(&env, "", sql).await;
    assert_eq!(used, 2_000);
    assert_eq!(scans, 0, "the commit's criterion: no sequential scan");
    assert!(through_keys > 0, "the commit's criterion: read through keys");
    assert!(with_index < 10, "with the index: {with_index} rows");
    assert!(without_index > 1_500, "without the index the whole window is read ({without_index} rows)");
}

/// On PostgreSQL 15 the per-transaction counters include what earlier transactions of the
/// same session did and was not flushed yet: the commit's test seeds (and updates
/// quota_window) on the connection it then measures.
#[tokio::test]
async fn xact_counters_carry_earlier_transactions() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    let mut db = env.db().await;
    seed_window(&mut db, 10).await;
    sqlx::raw_sql("SET enable_indexscan = off; SET enable_bitmapscan = off; SELECT count(*) FROM quota_use")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    let scans: i64 =
        sqlx::query_scalar("SELECT coalesce(seq_scan, 0) FROM pg_stat_xact_user_tables WHERE relname = 'quota_use'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert!(scans >= 1, "a transaction that read nothing shows {scans} sequential scans");
}
