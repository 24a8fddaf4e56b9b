//! The consumer supervisor: connect → declare → consume, and on any fault start over.
//!
//! lapin's own auto-recovery still receives fixes (see rust-ecosystem.md §1.3), so this loop
//! owns the connections: a broken session is dropped whole and rebuilt with jittered backoff.
//! With several node URLs (a cluster) it rebuilds on the next node at once, and backs off only
//! when every node failed in a row ([`NodeRotation`]).
//! Deliveries in flight when a session breaks cannot be acked any more; the broker redelivers
//! them and the result ledger answers them without a second provider call.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_lite::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{DeliveryTag, FieldTable};
use lapin::{Acker, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::acks::Acks;
use super::nodes::{NextTry, NodeRotation};
use super::{Incoming, Publisher, Topology, connect};
use crate::config::BrokerUrls;
use crate::secrets::redact_url;

/// What the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct Session {
    /// The broker, or the nodes of one cluster, tried in turn.
    pub urls: BrokerUrls,
    pub prefetch: u16,
    pub topology: Topology,
    pub confirm_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight jobs.
    pub drain_timeout: Duration,
    /// Shown in the management UI: `fallback-worker host:pid`.
    pub connection_name: String,
}

/// What becomes of a delivery once its handler is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Its outcome (a result, a parked or dead-lettered copy) is confirmed: ack it.
    Ack,
    /// Hand it back to the broker after a pause, to be tried again (by any worker).
    Requeue { after: Duration },
}

/// The session cannot go on (the connection failed): the supervisor rebuilds it, and the
/// broker redelivers what was in flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnectionLost(pub String);

/// Handles deliveries. A failure of one message is a [`Settlement`], never an `Err`: only a
/// broken connection is.
#[async_trait::async_trait]
pub trait DeliveryHandler: Send + Sync + 'static {
    async fn handle(&self, incoming: &Incoming, publisher: &Publisher) -> Result<Settlement, ConnectionLost>;

    /// The handling of `incoming` failed internally (it panicked, with `reason`): retry it, or
    /// after too many failures answer it `internal_error` and dead-letter it.
    async fn internal_failure(
        &self,
        incoming: &Incoming,
        reason: &str,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost>;
}

/// Handles one delivery inside a panic boundary: a panic is that message's internal failure,
/// never the process's or another job's.
async fn settle<H: DeliveryHandler>(
    handler: &H,
    incoming: &Incoming,
    publisher: &Publisher,
) -> Result<Settlement, ConnectionLost> {
    match AssertUnwindSafe(handler.handle(incoming, publisher)).catch_unwind().await {
        Ok(settled) => settled,
        Err(panic) => {
            let reason = panic_text(panic.as_ref());
            tracing::error!(%reason, "handling a job panicked; it is retried, then dead-lettered");
            let failure = handler.internal_failure(incoming, &reason, publisher);
            match AssertUnwindSafe(failure).catch_unwind().await {
                Ok(settled) => settled,
                Err(_) => Ok(Settlement::Requeue { after: PANIC_REQUEUE_DELAY }),
            }
        }
    }
}

/// The pause before a message whose failure handling itself failed goes back to the broker.
const PANIC_REQUEUE_DELAY: Duration = Duration::from_secs(5);

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("panic: {}", crate::providers::short_message(&text))
}

/// Acks (with the others settled meanwhile), or hands back after a pause.
async fn apply(acks: &Acks, acker: Acker, tag: DeliveryTag, settlement: Settlement) -> Result<(), String> {
    match settlement {
        Settlement::Ack => acks.ack(tag).await,
        Settlement::Requeue { after } => {
            tokio::time::sleep(after).await;
            let handed_back = acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            // Only once its own frame went out may a range of acks pass over it.
            acks.forget(tag);
            handed_back.map(|_| ()).map_err(|e| format!("handing a delivery back failed: {e}"))
        }
    }
}

enum SessionEnd {
    Shutdown,
    Broken(String),
}

/// Consumes until `shutdown`, reconnecting after every fault; never returns an error.
/// `ready` tells `/readyz` whether a session is up.
pub async fn run_consumer<H: DeliveryHandler>(
    session: Session,
    handler: Arc<H>,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
) {
    let mut backoff = reconnect_backoff();
    let mut nodes = NodeRotation::new(&session.urls);
    while !shutdown.is_cancelled() {
        let url = nodes.current().to_string();
        let (position, of) = nodes.position();
        let node = format!("{} ({position} of {of})", redact_url(&url));
        // lapin's connect has no deadline of its own: a peer that accepts and then stalls the
        // handshake must not hold the worker forever.
        let opened = tokio::time::timeout(SETUP_TIMEOUT, open(&session, &url))
            .await
            .unwrap_or_else(|_| Err(format!("no session after {SETUP_TIMEOUT:?}")));
        let next = match opened {
            Ok(open) => {
                backoff = reconnect_backoff();
                ready.store(true, Ordering::Relaxed);
                tracing::info!(queue = %session.topology.jobs, prefetch = session.prefetch, %node, "consuming jobs");
                let started = Instant::now();
                let end = serve(&session, open, handler.clone(), &shutdown).await;
                ready.store(false, Ordering::Relaxed);
                match end {
                    SessionEnd::Shutdown => return,
                    SessionEnd::Broken(reason) => {
                        tracing::warn!(%reason, %node, "broker session lost; reconnecting");
                        nodes.session_broke(started.elapsed())
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, %node, "cannot open a broker session; retrying");
                nodes.cannot_open()
            }
        };
        if next == NextTry::Now {
            continue;
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Longest a connect-declare-consume sequence may take before it is abandoned and retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

struct OpenSession {
    consume_conn: Connection,
    publish_conn: Arc<Connection>,
    consume_channel: lapin::Channel,
    consumer: lapin::Consumer,
    publisher: Publisher,
}

/// Opens a session on the node at `url`: both connections go to the same node.
async fn open(session: &Session, url: &str) -> Result<OpenSession, String> {
    let consume_conn = connect(url, &format!("{} (consume)", session.connection_name)).await?;
    let publish_conn = match connect(url, &format!("{} (publish)", session.connection_name)).await {
        Ok(conn) => Arc::new(conn),
        Err(e) => {
            close(&consume_conn).await;
            return Err(e);
        }
    };
    let setup = async {
        session.topology.declare(&publish_conn).await?;
        let publisher = Publisher::new(publish_conn.clone(), session.confirm_timeout).await?;
        let consume_channel = consume_conn.create_channel().await?;
        consume_channel.basic_qos(session.prefetch, BasicQosOptions::default()).await?;
        let consumer = consume_channel
            .basic_consume(
                session.topology.jobs.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((publisher, consume_channel, consumer))
    };
    match setup.await {
        Ok((publisher, consume_channel, consumer)) => {
            Ok(OpenSession { consume_conn, publish_conn, consume_channel, consumer, publisher })
        }
        Err(e) => {
            close(&consume_conn).await;
            close(&publish_conn).await;
            Err(format!("cannot set up the topology or the consumer: {e}"))
        }
    }
}

async fn serve<H: DeliveryHandler>(
    session: &Session,
    mut open: OpenSession,
    handler: Arc<H>,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let tracker = TaskTracker::new();
    let broken = CancellationToken::new();
    let acks = Acks::start(open.consume_channel.clone());
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break SessionEnd::Shutdown,
            () = broken.cancelled() => break SessionEnd::Broken("the connection failed under a publish or an ack".into()),
            next = open.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let received_at = SystemTime::now();
                    let tag = delivery.delivery_tag;
                    acks.delivered(tag);
                    let (handler, publisher, broken, acks) =
                        (handler.clone(), open.publisher.clone(), broken.clone(), acks.clone());
                    tracker.spawn(async move {
                        let incoming = Incoming::from_delivery(delivery.data, &delivery.properties, delivery.redelivered, received_at);
                        let settled = settle(handler.as_ref(), &incoming, &publisher).await;
                        let applied = match settled {
                            Ok(settlement) => apply(&acks, delivery.acker, tag, settlement).await,
                            Err(ConnectionLost(reason)) => Err(reason),
                        };
                        if let Err(reason) = applied {
                            tracing::warn!(%reason, "job left unacked; the broker will redeliver it");
                            broken.cancel();
                        }
                    });
                }
                Some(Err(e)) => break SessionEnd::Broken(format!("consumer error: {e}")),
                None => break SessionEnd::Broken("the broker ended the consumer".into()),
            },
        }
    };
    if matches!(end, SessionEnd::Shutdown) {
        // Take no new jobs, let the ones in hand finish, then leave the rest to the broker.
        let tag = open.consumer.tag();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            open.consume_channel.basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
        tracker.close();
        tracing::info!(in_flight = tracker.len(), "draining in-flight jobs");
        if tokio::time::timeout(session.drain_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(left = tracker.len(), "drain timeout; unfinished jobs go back to the queue");
        }
    }
    acks.close();
    close(&open.consume_conn).await;
    close(&open.publish_conn).await;
    end
}

async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
}
