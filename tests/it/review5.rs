//! Review 5: adversarial tests of 4658f10, bc83ea3, 7a7a7a2, 9b6c2a3, 7e3dce6. Each fails on
//! bd7ec68; fixed: a cooldown only this worker holds outlives the table's notices and reloads; a
//! reload drops rows gone from the table; a renamed row announces its old name gone; a notice
//! too long for NOTIFY goes shorter or unsent, never failing the change; `scrub` knows `\/`.

use std::time::SystemTime;

use fallback_worker::routing::CooldownReason;
use fallback_worker::secrets::scrub;
use fallback_worker::state::ProviderState;
use tokio_util::sync::CancellationToken;

use crate::shared_state::{cooldown, migrated_store};
use crate::support::*;

/// 0015: an UPDATE that renames a provider's row (the trigger fires on a change of `provider`)
/// notifies only the NEW name; workers keep the old name's cooldown in memory, and no later
/// read clears it (`read_cooldown` finding no row only clears a circuit). The row for `q` is
/// gone from the table, `status` says usable, every worker still skips `q` for 300 s (or
/// forever with an `infinity` cooldown) until restart: the very bug 0015 was written to fix.
#[tokio::test]
async fn review5_a_renamed_row_clears_the_old_names_cooldown_in_running_workers() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    eventually("the listener is live", || async { reader.is_listening() }).await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    eventually("the cooldown arrives", || async {
        reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now())
    })
    .await;
    let mut db = env.db().await;
    sqlx::query("UPDATE provider_state SET provider = 'q-retired' WHERE provider = 'q'")
        .execute(&mut db)
        .await
        .unwrap();
    eventually("the renamed row arrives under its new name", || async {
        reader.known_cooldown("q-retired").is_some_and(|c| c.until > SystemTime::now())
    })
    .await;
    // `q` has no row any more: running workers must not keep skipping it.
    eventually("the old name's cooldown is dropped", || async {
        reader.known_cooldown("q").is_none_or(|c| c.until <= SystemTime::now())
    })
    .await;
    shutdown.cancel();
    listening.await.unwrap();
}

/// 0015 says "no change can fail on NOTIFY's 8000-byte payload limit", but only the detail is
/// cut: a by-hand `cooldown_reason` (or a long provider name) of ~8000 bytes makes the
/// trigger's pg_notify raise "payload string too long" and the operator's UPDATE fails. The
/// same for a detail cut to 1000 characters that JSON-escapes to 6 bytes each plus a
/// 2000-character reason.
#[tokio::test]
async fn review5_a_long_reason_typed_by_hand_does_not_fail_the_change() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    let mut db = env.db().await;
    let changed = sqlx::query(
        "UPDATE provider_state SET cooldown_reason = repeat('r', 2500), \
         cooldown_detail = repeat(chr(1), 1000) WHERE provider = 'q'",
    )
    .execute(&mut db)
    .await;
    assert!(changed.is_ok(), "the trigger made the operator's change fail: {changed:?}");
}

/// 7e3dce6: a key containing `/` (AWS-style, base64 keys) echoed in a JSON error body by a
/// server that escapes slashes (`\/`, PHP's and many Java encoders' default) is split into
/// runs shorter than 12 characters, none of which is hidden: the whole key survives, only
/// with backslashes in it. Reachable where the message is not unescaped by a JSON parse:
/// `ErrorInfo::read` keeps a body that does not parse (a proxy's text/plain wrapper around the
/// upstream's JSON, a JSON body cut short) as the message, and a message string that itself
/// holds an upstream's JSON keeps its escapes.
#[test]
fn review5_a_key_echoed_with_json_escaped_slashes_is_scrubbed() {
    let key = "wJalrXUt/nFEMI/K7MDENG/bPxRfi/CYEXAMPLEKEY";
    let echoed = format!("{{\"error\":\"invalid key {}\"}}", key.replace('/', "\\/"));
    let scrubbed = scrub(&echoed, &[key]);
    let pieces: Vec<&str> = key.split('/').filter(|p| p.len() >= 5).collect();
    for piece in pieces {
        assert!(!scrubbed.contains(piece), "`{piece}` of the key survives: {scrubbed}");
    }
}

/// 0015 (and the reconnect path of `listen`): notices sent while the LISTEN session was away
/// are lost, and `reload` is what makes up for them, "the table is the truth". But `reload`
/// only sets the rows still in the table: a row DELETEd while the listener was reconnecting
/// (the delete 0015's trigger announces, the test above covers only with a live listener)
/// leaves its cooldown in every worker that missed the notice, until it ends or the worker
/// restarts. Here the reader is not listening when the row is deleted (as during a
/// reconnect), then reloads as `listen` does after one.
#[tokio::test]
async fn review5_a_row_deleted_while_the_listener_was_away_is_dropped_on_reload() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    reader.reload().await.unwrap();
    assert!(reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now()), "loaded");
    let mut db = env.db().await;
    sqlx::query("DELETE FROM provider_state WHERE provider = 'q'").execute(&mut db).await.unwrap();
    reader.reload().await.unwrap();
    assert!(
        reader.known_cooldown("q").is_none_or(|c| c.until <= SystemTime::now()),
        "the deleted row's cooldown survives the reload: {:?}",
        reader.known_cooldown("q")
    );
}

/// A real reconnect: the listener's session is terminated, the row deleted before it is back.
#[tokio::test]
async fn review5_a_row_deleted_during_a_listener_reconnect_reaches_the_worker() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    eventually("the listener is live", || async { reader.is_listening() }).await;
    writer.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    eventually("the cooldown arrives", || async {
        reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now())
    })
    .await;
    let mut db = env.db().await;
    // One transaction: the listener's session ends, and the row goes, before it can listen again.
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    let ended = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "the listener's session was found and ended");
    sqlx::query("DELETE FROM provider_state WHERE provider = 'q'").execute(&mut db).await.unwrap();
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    eventually("the deleted row clears the cooldown after the reconnect", || async {
        reader.known_cooldown("q").is_none_or(|c| c.until <= SystemTime::now())
    })
    .await;
    shutdown.cancel();
    listening.await.unwrap();
}

/// 0015: "where the service's own notices only ever move a cooldown forward", the table's set
/// the copy exactly, wiping what only this worker knows. A cooldown the database refuses is
/// kept by this worker alone (`cool_down`: "Refused for good ... this worker keeps it"; also
/// one not shared yet because the row was busy, until the next heartbeat shares it). Any
/// later change of the row by anyone (here another worker's 5xx) sends the table's row, with
/// no cooldown, and this worker calls the provider that just told it to wait. The refusal is
/// made here by a test trigger that rejects long cooldowns.
#[tokio::test]
async fn review5_a_cooldown_only_this_worker_holds_survives_another_workers_5xx() {
    let env = TestEnv::new().await;
    let writer = migrated_store(&env).await;
    let reader = migrated_store(&env).await;
    let mut db = env.db().await;
    sqlx::raw_sql(
        "CREATE FUNCTION review5_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.cooldown_until > now() + interval '100 seconds' THEN \
             RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER review5_refuse BEFORE INSERT OR UPDATE ON provider_state \
           FOR EACH ROW EXECUTE FUNCTION review5_refuse();",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(reader.clone().listen(shutdown.clone()));
    eventually("the listener is live", || async { reader.is_listening() }).await;
    reader.cool_down("q", cooldown(300, CooldownReason::RateLimited)).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_state WHERE provider = 'q'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(count, 0, "the database refused the cooldown");
    assert!(reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now()), "this worker keeps it");
    writer.record_server_error("q", "HTTP 503").await;
    eventually("the 5xx's notice arrives", || async { reader.known_server_errors("q") == 1 }).await;
    assert!(
        reader.known_cooldown("q").is_some_and(|c| c.until > SystemTime::now()),
        "another worker's 5xx wiped the cooldown this worker holds: {:?}",
        reader.known_cooldown("q")
    );
    shutdown.cancel();
    listening.await.unwrap();
}
