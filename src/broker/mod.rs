//! RabbitMQ at the edge: topology, confirmed publishing, and the consumer supervisor.
//!
//! Everything lapin-specific stays in this module; the worker sees an [`Incoming`] job, a
//! [`Publisher`] that only returns once the broker has confirmed, and an ack handle.

mod acks;
pub mod frames;
pub mod headers;
mod nodes;
mod publisher;
mod supervisor;
mod topology;

pub use nodes::{NextTry, NodeRotation, STABLE_SESSION};
pub use publisher::{Outgoing, PublishError, Publisher, Routed};
pub use supervisor::{ConnectionLost, DeliveryHandler, Session, Settlement, run_consumer};
pub use topology::{QueueRole, Topology, WAIT_TIERS, declare_or_accept, delivery_limit_backstop};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::config::BrokerUrls;
use crate::secrets::redact_url;

/// A delivery, translated out of lapin's types. Building it never fails and never panics: every
/// property is only read here, and judged later by the worker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// Every header the publisher set; only the service's own authenticated ones are believed
    /// ([`headers::decode_parked`]).
    pub headers: FieldTable,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    /// The broker's word that an earlier delivery of this very message was not settled (a
    /// worker died, or gave it back): the receipts that count towards `max_deliveries`. A
    /// publisher cannot set it; a parked job coming back and a copy published again are new
    /// messages and do not carry it.
    pub redelivered: bool,
    /// When this worker received it.
    pub received_at: SystemTime,
    /// When the sender says it published it (AMQP `timestamp`, seconds): only for reporting
    /// `routing.queued_ms`, and only when it is a real instant not after `received_at`.
    pub published_at: Option<SystemTime>,
}

impl Incoming {
    pub fn from_delivery(
        data: Vec<u8>,
        properties: &BasicProperties,
        redelivered: bool,
        received_at: SystemTime,
    ) -> Incoming {
        let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
        let published_at = properties
            .timestamp()
            .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .filter(|at| *at <= received_at);
        Incoming {
            headers: properties.headers().clone().unwrap_or_default(),
            reply_to: text(properties.reply_to()),
            correlation_id: text(properties.correlation_id()),
            message_id: text(properties.message_id()),
            redelivered,
            received_at,
            published_at,
            body: data,
        }
    }

    /// The properties a copy of this job carries when the service republishes it (parked, or
    /// dead-lettered): only what names and routes the job. Nothing else the publisher set is
    /// copied: `user_id` or `expiration` would make the broker close the publishing channel,
    /// `CC`/`BCC` headers would route the copy to other queues, a priority or TTL would change
    /// how it is served.
    pub fn copy_properties(&self) -> BasicProperties {
        let mut properties = BasicProperties::default().with_content_type("application/json".into());
        if let Some(reply_to) = &self.reply_to {
            properties = properties.with_reply_to(reply_to.as_str().into());
        }
        if let Some(correlation_id) = &self.correlation_id {
            properties = properties.with_correlation_id(correlation_id.as_str().into());
        }
        if let Some(message_id) = &self.message_id {
            properties = properties.with_message_id(message_id.as_str().into());
        }
        properties
    }
}

/// Opens a connection named for the management UI; errors never show the URL's password.
pub async fn connect(url: &str, name: &str) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let failed = |why: String| format!("cannot connect to RabbitMQ at {}: {why}", redact_url(url));
    // The parser quotes the whole URL in some errors: never its password.
    let uri =
        url.parse().map_err(|e: String| failed(if e.contains(url) { "not a valid AMQP URL".into() } else { e }))?;
    Connection::connect_uri(frames::frame_max(uri), properties).await.map_err(|e| failed(e.to_string()))
}

/// Opens a connection to the first node of `urls` that accepts one within `per_node` (tools
/// such as `enqueue`, which need any node of the cluster). The error names every node tried,
/// passwords hidden.
pub async fn connect_any(urls: &BrokerUrls, name: &str, per_node: Duration) -> Result<Connection, String> {
    let mut failures = Vec::new();
    for url in urls.as_slice() {
        match tokio::time::timeout(per_node, connect(url, name)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push(format!(
                "RabbitMQ at {} did not accept a connection within {}",
                redact_url(url),
                humantime::format_duration(per_node)
            )),
        }
    }
    Err(failures.join("; "))
}
