//! The bound Postgres puts on each of the worker's statements (`statement_timeout`, below the
//! worker's own 2 s state-call timeout): a state call held up by busy rows ends with the
//! database's answer instead of being given up by the worker, and the statements that may
//! legitimately run long (migrations, the ledger's pruning) run without it.
//! `review_release5` holds the two cases that motivated it (a release over several busy
//! windows).

use std::time::{Duration, Instant};

use fallback_worker::state::postgres::PgStore;
use sqlx::PgConnection;

use crate::review_probe2::migrated;
use crate::support::*;

/// Longer than the statement bound (1.5 s), shorter than anything a test would wait for.
const PAST_THE_BOUND: Duration = Duration::from_millis(2500);

/// Opens a transaction on `conn` that holds what `lock` takes until it commits.
pub(crate) async fn holding(conn: &mut PgConnection, lock: &str) {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(lock.to_string())).execute(&mut *conn).await.unwrap();
}

/// Waits until a session of the test's database has waited on a lock for longer than
/// [`PAST_THE_BOUND`] (a statement bounded at 1.5 s would have been cancelled by then).
pub(crate) async fn until_a_lock_wait_outlasts_the_bound(env: &TestEnv) {
    eventually("a lock wait past the statement bound", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() \
               AND wait_event_type = 'Lock' AND clock_timestamp() - query_start > make_interval(secs => $1)",
        )
        .bind(PAST_THE_BOUND.as_secs_f64())
        .fetch_one(&mut env.db().await)
        .await
        .unwrap()
    })
    .await;
}

/// Makes every statement `event` names (`"BEFORE INSERT ON quota_use"`, with a `REFERENCING`
/// clause if `seconds` reads one) sleep `seconds`, an SQL expression: a database slow for those
/// statements, as lock waits that add up or a slow disk make it. `name` names the trigger.
pub(crate) async fn slow_statements(env: &TestEnv, name: &str, event: &str, seconds: &str) {
    sleeping_trigger(env, name, &format!("TRIGGER {name} {event} FOR EACH STATEMENT"), seconds).await;
}

/// Creates a function `name` that sleeps `seconds` (an SQL expression, which a row trigger's
/// may write on `NEW`) and the trigger `CREATE {trigger} EXECUTE FUNCTION name()`. It returns
/// `NEW`: a row trigger before the write keeps the row (a statement's or an after trigger's
/// return is ignored).
pub(crate) async fn sleeping_trigger(env: &TestEnv, name: &str, trigger: &str, seconds: &str) {
    let sql = format!(
        "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM pg_sleep(({seconds})::float8); RETURN NEW; END $$; \
         CREATE {trigger} EXECUTE FUNCTION {name}();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut env.db().await).await.unwrap();
}

/// A second worker (its URL `url`) migrates while another worker's migration holds the
/// migrations' table past the statement bound: it waits, and succeeds.
pub(crate) async fn migration_waits_past_the_bound(env: &TestEnv, url: &str) {
    migrated(&env.database_url, 2).await;
    let mut holder = env.db().await;
    holding(&mut holder, "LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE").await;
    let second = PgStore::connect_lazy(url, 2).unwrap();
    let migrating = tokio::spawn(async move { second.migrate().await.map_err(|e| e.to_string()) });
    until_a_lock_wait_outlasts_the_bound(env).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_eq!(migrating.await.unwrap(), Ok(()), "the second worker's migration waited and succeeded");
}

#[tokio::test]
async fn the_database_cancels_a_statement_of_the_worker_before_the_worker_would_give_up_on_it() {
    let env = TestEnv::new().await;
    let store = PgStore::connect_lazy(&env.database_url, 2).unwrap();
    let started = Instant::now();
    let slept = sqlx::query("SELECT pg_sleep(5)").execute(store.pool()).await;
    let took = started.elapsed();
    let Err(sqlx::Error::Database(db)) = &slept else { panic!("a 5 s statement was not cancelled: {slept:?}") };
    assert_eq!(db.code().as_deref(), Some("57014"), "cancelled for its time: {db}");
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}: past the worker's 2 s state-call timeout");
}

#[tokio::test]
async fn pruning_waits_for_a_busy_row_past_the_statement_bound() {
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 2).await;
    sqlx::query(
        "INSERT INTO job_results (job_key, fingerprint, deliveries, first_seen) \
         VALUES ('old', 'sha256:old', 1, now() - interval '3 days')",
    )
    .execute(&mut env.db().await)
    .await
    .unwrap();
    let mut holder = env.db().await;
    holding(&mut holder, "SELECT 1 FROM job_results WHERE job_key = 'old' FOR UPDATE").await;
    let prune = {
        let store = store.clone();
        tokio::spawn(async move { store.prune_ledger(Duration::from_secs(86_400)).await })
    };
    until_a_lock_wait_outlasts_the_bound(&env).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let pruned = prune.await.unwrap();
    assert_eq!(pruned.map_err(|e| e.to_string()), Ok(1), "the prune waited for the row and deleted it");
}

#[tokio::test]
async fn migrations_wait_for_another_worker_past_the_statement_bound() {
    let env = TestEnv::new().await;
    migration_waits_past_the_bound(&env, &env.database_url).await;
}

#[tokio::test]
async fn a_shorter_bound_the_operator_set_is_kept_and_a_longer_one_is_lowered() {
    let env = TestEnv::new().await;
    let mut seen = Vec::new();
    for asked in ["100", "5000", "0"] {
        let url = format!("{}&options=-c%20statement_timeout%3D{asked}", env.database_url);
        let store = PgStore::connect_lazy(&url, 1).unwrap();
        let setting: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(store.pool()).await.unwrap();
        seen.push(setting);
        store.pool().close().await;
    }
    assert_eq!(seen, ["100ms", "1500ms", "1500ms"], "the URL's 100 ms, 5 s and none");
}

/// Contention is not an outage: admissions that each wait `lock_timeout` (1 s) for a window
/// another worker holds, one after the other for over 4 s, are refused as busy and asked again,
/// and the worker keeps the shared view (only statements cancelled for their time count towards
/// taking the database for down).
#[tokio::test]
async fn admissions_behind_a_window_held_elsewhere_for_seconds_do_not_take_the_database_for_down() {
    use fallback_worker::state::{Admission, Ask, ProviderState};
    let env = TestEnv::new().await;
    let store = migrated(&env.database_url, 4).await;
    let limits = [crate::credits::requests(1000)];
    let ask = Ask { provider: "p", limits: &limits, pools: &[], tokens: 1, flight: crate::review_probe2::HOLD };
    let Admission::Granted(_) = store.admit(ask, std::time::SystemTime::now()).await else { panic!("not granted") };
    let mut holder = env.db().await;
    holding(&mut holder, "SELECT 1 FROM quota_window WHERE scope = 'p' FOR UPDATE").await;
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(6) {
        match store.admit(ask, std::time::SystemTime::now()).await {
            Admission::Granted(permit) => panic!("granted through a window held elsewhere: {permit:?}"),
            _ => refused += 1,
        }
        assert!(!store.is_degraded(), "taken for down after {:?} of lock waits ({refused} asks)", started.elapsed());
    }
    assert!(refused >= 4, "the asks waited for the window: {refused}");
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let admitted = store.admit(ask, std::time::SystemTime::now()).await;
    assert!(matches!(admitted, Admission::Granted(_)), "the window free again: {admitted:?}");
}
