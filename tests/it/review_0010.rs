//! Adversarial review of migration 0010 (admissions and answers through keys, plans made once).
//! The claim under test: same decisions and row effects as 0008/0009.

use std::time::{Duration, SystemTime};

use fallback_worker::config::LimitConfig;
use fallback_worker::state::{Admission, Ask, ProviderState};

use crate::batched_admission::reads_in_transaction;
use crate::ledger_batching::{DEFAULT_POOL, store_at};
use crate::support::*;

/// Two configured limits whose windows differ by less than a millisecond (`per = "1s"` and
/// `per = "1s 1us"`, both accepted by the config: only `per >= 100ms` is checked) are two
/// windows to the worker (`WindowKey` holds a `Duration`) but one row to the database
/// (`window_ms = 1000`): the arrays name the same window twice. 0008 updated that row once per
/// batch (`UPDATE .. FROM unnest(..)` updates a row once), so the stricter limit (2) admitted
/// 2 calls; 0010 updates it once per array entry, so every call counts twice in `used` and the
/// stricter limit admits only 1. Not "exactly the same decisions". Fixed in the worker:
/// windows are keyed in whole milliseconds, as the tables key them (`windows_of`), so the two
/// limits are one window, the stricter, and no batch names a window twice.
#[tokio::test]
async fn a_window_named_twice_admits_as_many_calls_as_before_0010() {
    let env = TestEnv::new().await;
    let store = store_at(&env.database_url, DEFAULT_POOL).await;
    let limits = [
        LimitConfig { requests: Some(2), tokens: None, per: Duration::from_secs(1), resets: None },
        LimitConfig {
            requests: Some(5),
            tokens: None,
            per: Duration::from_secs(1) + Duration::from_micros(1),
            resets: None,
        },
    ];
    let mut granted = 0;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: Duration::from_secs(30) };
        let answer = store.admit(ask, SystemTime::now()).await;
        if matches!(&answer, Admission::Granted(p) if p.usage_id.is_some()) {
            granted += 1;
        }
        answers.push(answer);
    }
    let mut db = env.db().await;
    let (used, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT used FROM quota_window WHERE scope = 'p' AND measure = 'requests'), \
                (SELECT count(*) FROM quota_use WHERE scope = 'p' AND measure = 'requests')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        granted, 2,
        "the stricter limit (2) admits 2 calls, as 0008/0009 did: {answers:?} (used {used}, rows {rows})"
    );
    assert_eq!((used, rows), (2, 2), "the window's total is what its rows add up to");
}

/// The windows of the generic-plan test: a 2 s pool window (retired often) and p's own two.
macro_rules! windows {
    () => {
        "'{pool,provider,provider}'::text[], '{acct,p,p}'::text[], '{requests,requests,tokens}'::text[], \
         '{2000,60000,60000}'::bigint[], '{\"\",\"\",\"\"}'::text[], '{1000,1000,100000}'::bigint[], \
         '{NULL,NULL,NULL}'::timestamptz[], '{NULL,NULL,NULL}'::timestamptz[]"
    };
}

/// The doc comment of `admissions_answers_and_retirement_read_no_table_whole` speaks of cached
/// generic plans, but that test runs each statement at most three times (PL/pgSQL uses custom
/// plans for the first five). This forces generic plans for every statement of the functions
/// (none of them sets plan_cache_mode any more) over many batches: no whole-table read. Held.
#[tokio::test]
async fn generic_plans_of_admission_answers_and_retirement_read_no_table_whole() {
    let env = TestEnv::new().await;
    let _store = store_at(&env.database_url, DEFAULT_POOL).await;
    sqlx::raw_sql(
        "INSERT INTO provider_state (provider) VALUES ('p'); ANALYZE quota_window, quota_use, provider_state",
    )
    .execute(&mut env.db().await)
    .await
    .unwrap();
    // Measured on a connection that did nothing else (see `reads_in_transaction`).
    let mut db = env.db().await;
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut db).await.unwrap();
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    let mut calls: Vec<i64> = Vec::new();
    for round in 0..12 {
        let ids: Vec<Option<i64>> = if round % 2 == 0 {
            sqlx::query_scalar(concat!(
                "SELECT usage_id FROM fallback_admit_batch('p', ",
                windows!(),
                ", '{10,20,30}', '{1,1,1}', array_fill(NULL::timestamptz, ARRAY[9]))"
            ))
            .fetch_all(&mut db)
            .await
            .unwrap()
        } else {
            sqlx::query_scalar(concat!(
                "SELECT usage_id FROM fallback_finish_and_admit('p', ",
                windows!(),
                ", '{10,20,30}', '{1,1,1}', array_fill(NULL::timestamptz, ARRAY[9]), $1, $2)"
            ))
            .bind(&calls)
            .bind(calls.iter().map(|_| Some(5i64)).collect::<Vec<_>>())
            .fetch_all(&mut db)
            .await
            .unwrap()
        };
        calls = ids.into_iter().flatten().collect();
        sqlx::query("SELECT fallback_finish_batch($1, $2)")
            .bind(&calls[..1])
            .bind(vec![Some(50i64)])
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query(
            "SELECT fallback_retire('pool', 'acct', 'requests', 2000, '', clock_timestamp() + interval '1 hour')",
        )
        .execute(&mut db)
        .await
        .unwrap();
    }
    let reads = reads_in_transaction(&mut db, &["provider_state", "quota_use", "quota_window"]).await;
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    assert_eq!(reads.len(), 3, "{reads:?}");
    for (table, scans, _, _) in &reads {
        assert_eq!(*scans, 0, "{table} read whole under generic plans: {reads:?}");
    }
}
