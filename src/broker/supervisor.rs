//! The consumer supervisor: connect → declare → consume, and on any fault start over.
//!
//! lapin's own auto-recovery still receives fixes (see rust-ecosystem.md §1.3), so this loop
//! owns the connections: a broken session is dropped whole and rebuilt with jittered backoff.
//! Deliveries in flight when a session breaks cannot be acked any more; the broker redelivers
//! them and the result ledger answers them without a second provider call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Incoming, Publisher, Topology, connect};

/// What the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct Session {
    pub url: String,
    pub prefetch: u16,
    pub topology: Topology,
    pub confirm_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight jobs.
    pub drain_timeout: Duration,
    /// Shown in the management UI: `fallback-worker host:pid`.
    pub connection_name: String,
}

/// Handles one delivery and acks it (through `ack`) once its outcome is confirmed.
#[async_trait::async_trait]
pub trait DeliveryHandler: Send + Sync + 'static {
    /// `Err` means the session is unusable (a publish failed): the supervisor reconnects.
    async fn handle(&self, incoming: Incoming, publisher: &Publisher, ack: Ack) -> Result<(), String>;
}

/// Acknowledges one delivery on the channel it came from.
pub struct Ack(Acker);

impl Ack {
    pub async fn ack(self) -> Result<(), String> {
        self.0.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(|e| format!("ack failed: {e}"))
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
    while !shutdown.is_cancelled() {
        // lapin's connect has no deadline of its own: a peer that accepts and then stalls the
        // handshake must not hold the worker forever.
        let opened = tokio::time::timeout(SETUP_TIMEOUT, open(&session))
            .await
            .unwrap_or_else(|_| Err(format!("no session after {SETUP_TIMEOUT:?}")));
        match opened {
            Ok(open) => {
                backoff = reconnect_backoff();
                ready.store(true, Ordering::Relaxed);
                tracing::info!(queue = %session.topology.jobs, prefetch = session.prefetch, "consuming jobs");
                let end = serve(&session, open, handler.clone(), &shutdown).await;
                ready.store(false, Ordering::Relaxed);
                match end {
                    SessionEnd::Shutdown => return,
                    SessionEnd::Broken(reason) => {
                        tracing::warn!(%reason, "broker session lost; reconnecting")
                    }
                }
            }
            Err(reason) => tracing::warn!(%reason, "cannot open a broker session; retrying"),
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
    publish_conn: Connection,
    consume_channel: lapin::Channel,
    consumer: lapin::Consumer,
    publisher: Publisher,
}

async fn open(session: &Session) -> Result<OpenSession, String> {
    let consume_conn = connect(&session.url, &format!("{} (consume)", session.connection_name)).await?;
    let publish_conn = connect(&session.url, &format!("{} (publish)", session.connection_name)).await?;
    let setup = async {
        session.topology.declare(&publish_conn).await?;
        let publish_channel = publish_conn.create_channel().await?;
        let publisher = Publisher::new(publish_channel, session.confirm_timeout).await?;
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
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break SessionEnd::Shutdown,
            () = broken.cancelled() => break SessionEnd::Broken("a publish or an ack failed".into()),
            next = open.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let incoming = Incoming::from_delivery(delivery.data, delivery.properties);
                    let ack = Ack(delivery.acker);
                    let (handler, publisher, broken) = (handler.clone(), open.publisher.clone(), broken.clone());
                    tracker.spawn(async move {
                        if let Err(reason) = handler.handle(incoming, &publisher, ack).await {
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
    close(&open.consume_conn).await;
    close(&open.publish_conn).await;
    end
}

async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
}
