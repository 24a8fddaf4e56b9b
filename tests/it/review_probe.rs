//! Review of b74683e (a lost probe claim re-read the row into the worker's view): races between
//! that re-read, the listener's notices and the prober's outcome, and a claim that finds the
//! circuit replaced by another worker's 429. Fixed by keeping what a lost claim reads for its
//! own call only (`ProbeClaim::Held`), never in the view, and by reading the row on every lost
//! claim.
//!
//! The worker under test ("the loser") sends its pool through a [`Trap`] (a relay that holds
//! back the one answer carrying the circuit's detail text: the re-read's row) and its LISTEN
//! session through the support [`Relay`] (whose `hold` stops every notice). The other worker
//! ("the prober") talks to Postgres directly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fallback_worker::routing::CooldownReason;
use fallback_worker::state::postgres::PgStore;
use fallback_worker::state::{Admission, Ask, Cooldown, ProbeClaim, ProviderState};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::relay::Relay;
use crate::support::*;

/// The text the circuit carries: it is in every row read of the provider (the re-read, a
/// reload), and in no answer of the claim statement (two booleans).
const DETAIL: &str = "review-probe: 3 server errors in a row";

const ASK: Ask<'static> = Ask { provider: "p", limits: &[], pools: &[], tokens: 1, flight: Duration::from_secs(7) };

fn circuit(until: SystemTime) -> Cooldown {
    Cooldown { until, reason: CooldownReason::Circuit, detail: DETAIL.into() }
}

/// A relay that, once armed, holds back the first chunk from the service containing `pattern`
/// (and everything after it on that connection) until released.
struct Trap {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    caught: watch::Receiver<bool>,
    release: watch::Sender<bool>,
    accept: JoinHandle<()>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Trap {
    async fn start(upstream: SocketAddr, pattern: &'static [u8]) -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed: Arc<AtomicBool> = Arc::default();
        let (caught_tx, caught) = watch::channel(false);
        let caught_tx = Arc::new(caught_tx);
        let (release, released) = watch::channel(false);
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (armed2, tasks2) = (armed.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (armed, caught_tx, mut released) = (armed2.clone(), caught_tx.clone(), released.clone());
                let task = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_service, mut to_service) = outbound.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_service);
                    let down = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from_service.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let chunk = &buffer[..n];
                            if chunk.windows(pattern.len()).any(|w| w == pattern) && armed.swap(false, Ordering::SeqCst)
                            {
                                caught_tx.send_replace(true);
                                if released.wait_for(|r| *r).await.is_err() {
                                    return;
                                }
                            }
                            if to_client.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        () = down => {}
                    }
                });
                tasks2.lock().unwrap().push(task);
            }
        });
        Trap { addr, armed, caught, release, accept, tasks }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    async fn until_caught(&self) {
        let mut caught = self.caught.clone();
        tokio::time::timeout(Duration::from_secs(10), caught.wait_for(|c| *c))
            .await
            .expect("no answer carrying the circuit's row within 10 s: does a lost claim still re-read the row?")
            .unwrap();
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.release.send_replace(true);
        self.accept.abort();
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

struct Setup {
    env: TestEnv,
    /// In front of the loser's LISTEN session.
    relay: Relay,
    /// In front of the loser's pool.
    trap: Trap,
    loser: PgStore,
    prober: PgStore,
    stop: CancellationToken,
    listening: JoinHandle<()>,
}

/// Both workers know of an expired circuit of "p" (it ended a moment ago, for real).
async fn setup() -> Setup {
    let env = TestEnv::new().await;
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let relay = Relay::start(upstream).await;
    let trap = Trap::start(upstream, DETAIL.as_bytes()).await;
    let pool_url = env.database_url.replace("127.0.0.1:5432", &trap.addr.to_string());
    let listen_url = env.database_url.replace("127.0.0.1:5432", &relay.addr.to_string());
    let loser = PgStore::connect_lazy(&pool_url, 2).unwrap().with_listen_url(&listen_url).unwrap();
    loser.migrate().await.unwrap();
    let prober = PgStore::connect_lazy(&env.database_url, 4).unwrap();
    prober.migrate().await.unwrap();
    let stop = CancellationToken::new();
    let listening = tokio::spawn(loser.clone().listen(stop.clone()));
    eventually("the loser's listener is live", || async { loser.is_listening() }).await;
    let expired = SystemTime::now() + Duration::from_millis(300);
    for _ in 0..3 {
        prober.record_server_error("p", "HTTP 503").await;
    }
    prober.cool_down("p", circuit(expired)).await;
    eventually("the loser hears of the circuit", || async {
        loser.known_cooldown("p").is_some_and(|c| c.reason == CooldownReason::Circuit)
    })
    .await;
    tokio::time::sleep(expired.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(20)).await;
    Setup { env, relay, trap, loser, prober, stop, listening }
}

impl Setup {
    async fn end(self) {
        self.relay.hold(false);
        self.trap.release();
        self.stop.cancel();
        self.listening.await.unwrap();
        drop(self.env);
    }
}

/// The circuit closed well before the loser's re-read answer was applied; yet the stale answer
/// (the probe's hold) is applied over the newer notice and the loser skips the provider for
/// the whole hold (here 7 s, in production the job's timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_read_answered_before_the_probes_success_but_applied_after_it_does_not_hold_the_provider() {
    let s = setup().await;
    let (loser, prober) = (&s.loser, &s.prober);
    // The loser's notices lag: the prober's claim is not heard yet.
    s.relay.hold(true);
    let now = SystemTime::now();
    assert!(prober.claim_probe("p", now, Duration::from_secs(7)).await.is_call(), "the prober takes the probe");
    assert!(matches!(loser.admit(ASK, now).await, Admission::Granted(_)), "the loser's view is expired");
    s.trap.arm();
    let claiming = {
        let loser = loser.clone();
        tokio::spawn(async move { loser.claim_probe("p", now, Duration::from_secs(7)).await })
    };
    // The re-read has run in the database (it saw the hold); its answer is on its way.
    s.trap.until_caught().await;
    // The probe answers at once: the circuit is closed, and the loser hears it.
    prober.record_success("p").await;
    s.relay.hold(false);
    eventually("the loser hears the circuit close", || async {
        loser.known_cooldown("p").is_none_or(|c| c.reason != CooldownReason::Circuit)
    })
    .await;
    s.trap.release();
    assert!(!claiming.await.unwrap().is_call(), "the prober had the probe");
    let later = SystemTime::now();
    match loser.admit(ASK, later).await {
        Admission::Granted(_) => {}
        other => panic!(
            "the circuit closed before the re-read's answer was applied, yet the loser skips the provider: {other:?} \
             (the table says {:?})",
            table_cooldown(&s.env).await
        ),
    }
    s.end().await;
}

/// The re-read cannot be answered in time (the pool is slow): the loser keeps the provider back
/// itself "until the prober's notice replaces that hold". But the prober's notices already
/// arrived while the re-read waited; nothing will replace the hold, and the loser skips a
/// closed provider for the whole hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_hold_taken_after_the_probes_success_was_heard_does_not_hold_the_provider() {
    let s = setup().await;
    let (loser, prober) = (&s.loser, &s.prober);
    s.relay.hold(true);
    let now = SystemTime::now();
    assert!(prober.claim_probe("p", now, Duration::from_secs(7)).await.is_call(), "the prober takes the probe");
    s.trap.arm();
    let claiming = {
        let loser = loser.clone();
        tokio::spawn(async move { loser.claim_probe("p", now, Duration::from_secs(7)).await })
    };
    s.trap.until_caught().await;
    prober.record_success("p").await;
    s.relay.hold(false);
    eventually("the loser hears the circuit close", || async {
        loser.known_cooldown("p").is_none_or(|c| c.reason != CooldownReason::Circuit)
    })
    .await;
    // The re-read gives up after the state-call timeout (2 s) and the loser holds "p" itself.
    assert!(!claiming.await.unwrap().is_call(), "the prober had the probe");
    let later = SystemTime::now();
    match loser.admit(ASK, later).await {
        Admission::Granted(_) => {}
        other => panic!(
            "the circuit closed (and the loser heard it) before the re-read gave up, yet the loser skips the \
             provider: {other:?} (the table says {:?})",
            table_cooldown(&s.env).await
        ),
    }
    s.end().await;
}

/// The claim statement finds the circuit replaced by another worker's 429 (the probe itself was
/// answered 429, with a reset later than the hold). `(false, false)` reads as "no circuit any
/// more: call", and the worker whose notices lag calls the provider right after the 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_finds_another_workers_429_does_not_call() {
    let s = setup().await;
    let (loser, prober) = (&s.loser, &s.prober);
    s.relay.hold(true);
    let now = SystemTime::now();
    assert!(prober.claim_probe("p", now, Duration::from_secs(7)).await.is_call(), "the prober takes the probe");
    let limited = Cooldown {
        until: now + Duration::from_secs(60),
        reason: CooldownReason::RateLimited,
        detail: "HTTP 429".into(),
    };
    prober.cool_down("p", limited).await;
    assert_eq!(table_cooldown(&s.env).await.map(|(r, _)| r), Some("rate_limited".to_string()));
    // The loser has heard nothing of either: its view is the expired circuit.
    let permit = match loser.admit(ASK, now).await {
        Admission::Granted(permit) => permit,
        other => panic!("the loser's view is the expired circuit: {other:?}"),
    };
    match loser.claim_probe("p", now, Duration::from_secs(7)).await {
        ProbeClaim::Held(c) => assert_eq!(c.reason, CooldownReason::RateLimited, "skipped for the 429: {c:?}"),
        ProbeClaim::Call => panic!(
            "the database holds another worker's 429 until {:?}, and the loser is told to call the provider",
            table_cooldown(&s.env).await
        ),
    }
    loser.finish(permit, None, now).await;
    s.end().await;
}

/// The row's running cooldown, as the table holds it: reason and ms left.
async fn table_cooldown(env: &TestEnv) -> Option<(String, i64)> {
    sqlx::query_as::<_, (Option<String>, f64)>(
        "SELECT cooldown_reason, (extract(epoch FROM cooldown_until - now()) * 1000)::float8 FROM provider_state \
         WHERE provider = 'p'",
    )
    .fetch_optional(&mut env.db().await)
    .await
    .unwrap()
    .and_then(|(reason, left)| Some((reason?, left as i64)))
}
