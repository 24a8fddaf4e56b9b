//! Publishing that only counts once the broker has confirmed it.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

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

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the broker did not confirm within {0:?} (is it blocked by a resource alarm?)")]
    ConfirmTimeout(Duration),
}

/// A confirm-mode channel on the publishing connection (kept apart from the consuming one: a
/// broker under a memory alarm blocks publishers, and must not stall our acks).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Turns on publisher confirms for `channel`.
    pub async fn new(channel: Channel, confirm_timeout: Duration) -> lapin::Result<Publisher> {
        channel.confirm_select(Default::default()).await?;
        Ok(Publisher { channel, confirm_timeout })
    }

    /// Publishes persistently and `mandatory`, and waits for the broker's confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<Routed, PublishError> {
        let properties = message.properties.with_delivery_mode(2);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self
            .channel
            .basic_publish("".into(), message.routing_key.into(), options, message.body, properties)
            .await?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::ConfirmTimeout(self.confirm_timeout))??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Routed::Queued),
            Confirmation::Ack(Some(_returned)) => Ok(Routed::Unroutable),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}
