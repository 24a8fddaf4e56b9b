//! Publishing that only counts once the broker has confirmed it.
//!
//! A refusal of one message stays with that message: a nack (a full queue with
//! `reject-publish`), or a channel the broker closed over it (a queue the user may not write
//! to), is returned as [`PublishError::Refused`] and the channel is reopened for the next
//! message. Only a connection that is gone (or a broker that stops confirming) breaks the
//! session.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

/// A message to publish on the default exchange.
pub struct Outgoing<'a> {
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// Where a confirmed message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Stored in a queue.
    Queued,
    /// No queue of that name: the broker returned it (we publish `mandatory`, so nothing is
    /// silently dropped).
    Unroutable,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker refused this message alone; the publisher is usable for the next one.
    #[error("the broker refused the message: {0}")]
    Refused(String),
    /// The connection failed, or the broker stopped confirming (a resource alarm): the
    /// session must be rebuilt.
    #[error("the broker connection is unusable: {0}")]
    ConnectionLost(String),
}

/// A confirm-mode channel on the publishing connection (kept apart from the consuming one: a
/// broker under a memory alarm blocks publishers, and must not stall our acks).
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Channel>>,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens a confirm-mode channel on `connection`.
    pub async fn new(connection: Arc<Connection>, confirm_timeout: Duration) -> lapin::Result<Publisher> {
        let channel = open_confirm_channel(&connection).await?;
        Ok(Publisher { connection, channel: Arc::new(Mutex::new(channel)), confirm_timeout })
    }

    /// Publishes persistently and `mandatory`, and waits for the broker's confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<Routed, PublishError> {
        let channel = self.usable_channel().await?;
        let properties = message.properties.with_delivery_mode(2);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let sent =
            channel.basic_publish("".into(), message.routing_key.into(), options, message.body, properties).await;
        let confirm = match sent {
            Ok(confirm) => confirm,
            Err(e) => return Err(self.judge(&e)),
        };
        let confirmation = match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Err(_) => {
                let timeout = self.confirm_timeout;
                let why = format!("no confirm within {timeout:?} (is the broker blocked by a resource alarm?)");
                return Err(PublishError::ConnectionLost(why));
            }
            Ok(Err(e)) => return Err(self.judge(&e)),
            Ok(Ok(confirmation)) => confirmation,
        };
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Routed::Queued),
            Confirmation::Ack(Some(_returned)) => Ok(Routed::Unroutable),
            Confirmation::Nack(_) => {
                // A channel that published to a quorum queue whose leader died can keep nacking
                // after a new leader is elected: the next message goes out on a fresh channel.
                self.renew(&channel).await;
                Err(PublishError::Refused(
                    "nack (a full queue that rejects publishes, or a queue changing leader?)".into(),
                ))
            }
        }
    }

    /// The current channel, or a new one when the broker closed the last over one message.
    async fn usable_channel(&self) -> Result<Channel, PublishError> {
        let current = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if current.status().connected() {
            return Ok(current);
        }
        if !self.connection.status().connected() {
            return Err(PublishError::ConnectionLost("the publishing connection is closed".into()));
        }
        let fresh = open_confirm_channel(&self.connection)
            .await
            .map_err(|e| PublishError::ConnectionLost(format!("cannot reopen the publishing channel: {e}")))?;
        tracing::info!("reopened the publishing channel after the broker closed it over one message");
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// Replaces `stale` with a fresh confirm channel, unless another task already did.
    async fn renew(&self, stale: &Channel) {
        if self.channel.lock().unwrap_or_else(|p| p.into_inner()).id() != stale.id() {
            return;
        }
        let Ok(fresh) = open_confirm_channel(&self.connection).await else { return };
        let (old, renewed) = {
            let mut current = self.channel.lock().unwrap_or_else(|p| p.into_inner());
            if current.id() == stale.id() { (std::mem::replace(&mut *current, fresh), true) } else { (fresh, false) }
        };
        if !renewed {
            // Another task renewed it first: this one was never used.
            let _ = tokio::time::timeout(Duration::from_secs(2), old.close(200, "renewed".into())).await;
            return;
        }
        tracing::info!("renewed the publishing channel after a nack");
        // Publishes still waiting on the old channel get their confirms before it closes:
        // closed at once, it lost the confirms of messages the broker had already taken, and
        // their retries on the new channel published them twice (a black-box run: other jobs'
        // results duplicated by one reply queue that rejects publishes).
        let linger = self.confirm_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), old.close(200, "renewed".into())).await;
        });
    }

    /// A publish error is the message's own while the connection still stands.
    fn judge(&self, error: &lapin::Error) -> PublishError {
        if self.connection.status().connected() {
            PublishError::Refused(error.to_string())
        } else {
            PublishError::ConnectionLost(error.to_string())
        }
    }
}

async fn open_confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    Ok(channel)
}
