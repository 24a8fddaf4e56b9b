//! RabbitMQ at the edge: topology, confirmed publishing, and the consumer supervisor.
//!
//! Everything lapin-specific stays in this module; the worker sees an [`Incoming`] job, a
//! [`Publisher`] that only returns once the broker has confirmed, and an ack handle.

mod publisher;
mod supervisor;
mod topology;

pub use publisher::{Outgoing, PublishError, Publisher, Routed};
pub use supervisor::{Ack, DeliveryHandler, Session, run_consumer};
pub use topology::{Topology, WAIT_TIERS};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::routing::Attempt;
use crate::secrets::redact_url;

/// Our own headers (not `x-`: those belong to the broker, and 4.x ignores client-set ones).
pub mod headers {
    /// Why a message was dead-lettered.
    pub const REASON: &str = "fallback-reason";
    /// Epoch ms of the job's first receipt; `max_wait` counts from it across parks.
    pub const FIRST_SEEN_MS: &str = "fallback-first-seen-ms";
    /// How many times the job was parked in a delay queue.
    pub const PARKS: &str = "fallback-parks";
    /// The attempts made so far (JSON), so the final result tells the whole story.
    pub const ATTEMPTS: &str = "fallback-attempts";
    /// Where a result that could not reach its `reply_to` was meant to go.
    pub const UNDELIVERABLE_REPLY_TO: &str = "fallback-undeliverable-reply-to";
}

/// A delivery, translated out of lapin's types.
#[derive(Debug)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// The original properties, re-used when the message is parked or dead-lettered.
    pub properties: BasicProperties,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    /// From our header when the job was parked before; otherwise now.
    pub first_seen: SystemTime,
    /// When the sender published it (AMQP `timestamp`, seconds), if it said.
    pub published_at: Option<SystemTime>,
    pub parks: u32,
    pub previous_attempts: Vec<Attempt>,
}

impl Incoming {
    pub fn from_delivery(data: Vec<u8>, properties: BasicProperties) -> Incoming {
        let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
        let table = properties.headers().clone().unwrap_or_default();
        let first_seen = header_i64(&table, headers::FIRST_SEEN_MS)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
            .unwrap_or_else(SystemTime::now);
        let previous_attempts = header_text(&table, headers::ATTEMPTS)
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        Incoming {
            reply_to: text(properties.reply_to()),
            correlation_id: text(properties.correlation_id()),
            message_id: text(properties.message_id()),
            published_at: properties.timestamp().map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            first_seen,
            parks: header_i64(&table, headers::PARKS).unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32,
            previous_attempts,
            body: data,
            properties,
        }
    }
}

fn header_i64(table: &FieldTable, key: &str) -> Option<i64> {
    match table.inner().get(key)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

fn header_text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Opens a connection named for the management UI; errors never show the URL's password.
pub async fn connect(url: &str, name: &str) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties)
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ at {}: {e}", redact_url(url)))
}
