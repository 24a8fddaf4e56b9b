//! The queues the service owns, declared idempotently at every (re)connect.
//!
//! ```text
//! poison ──(copied with a fallback-reason header)──► llm.jobs.dead ◄── llm.jobs.dlx (fanout, for
//!                                                    policies and operators' own bindings)
//! llm.jobs.wait.<tier> ──(TTL)──► llm.jobs          (parked jobs come back by themselves)
//! llm.results
//! ```
//!
//! With `amqp.queue_type = "quorum"` every one of these queues is a quorum queue, replicated
//! across the nodes of a cluster. Two more things change then, both for a node that dies:
//! - the delay queues dead-letter their expired jobs back *at least once*
//!   (`x-dead-letter-strategy = at-least-once`, which needs `x-overflow = reject-publish`): the
//!   default, at-most-once, drops a parked job if the node doing the move fails mid-way;
//! - the jobs queue carries the broker's own delivery limit (`x-delivery-limit`) as a backstop
//!   above `worker.max_deliveries`, dead-lettering through `llm.jobs.dlx` at least once: the
//!   service's own count (in the ledger) decides first; the broker's catches a message that
//!   kills the worker process while the ledger is unreachable, which nothing else counts. (It
//!   also pins the limit: RabbitMQ 4 gives quorum queues a default of 20 that *drops* the
//!   message when no dead-letter exchange is set.)
//!
//! Classic declarations are exactly what they were before quorum queues existed, so an
//! existing deployment sees no "inequivalent arguments" refusal.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};

use crate::config::{AmqpConfig, QueueType, WorkerConfig};

/// Delay-queue tiers: a parked job goes to the longest tier not beyond its wake-up time.
/// Fixed TTLs per queue avoid per-message TTL's head-of-line blocking.
pub const WAIT_TIERS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// The broker's delivery limit on a quorum jobs queue for a service that answers a job
/// `internal_error` after `max_deliveries`: twice that, and at least 20 (RabbitMQ 4's own
/// default), so the service's count always decides first and the broker's only catches what
/// the service could not count.
pub fn delivery_limit_backstop(max_deliveries: u32) -> u32 {
    max_deliveries.saturating_mul(2).max(20)
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub results: String,
    /// The type of every queue below (`amqp.queue_type`).
    pub queue_type: QueueType,
    /// Quorum only: the jobs queue's `x-delivery-limit` ([`delivery_limit_backstop`]).
    pub jobs_delivery_limit: u32,
}

/// What a queue is for, which decides its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Jobs,
    Results,
    Dead,
    /// A delay queue with this TTL.
    Wait(Duration),
    /// A queue the service declares for its own replies (`enqueue`'s).
    Reply,
}

impl Topology {
    /// Classic queues with these names.
    pub fn new(jobs: &str, results: &str) -> Self {
        Self {
            jobs: jobs.to_string(),
            results: results.to_string(),
            queue_type: QueueType::Classic,
            jobs_delivery_limit: delivery_limit_backstop(WorkerConfig::default().max_deliveries),
        }
    }

    /// The same names as quorum queues, for a service that answers `internal_error` after
    /// `max_deliveries`.
    pub fn quorum(self, max_deliveries: u32) -> Self {
        Self { queue_type: QueueType::Quorum, jobs_delivery_limit: delivery_limit_backstop(max_deliveries), ..self }
    }

    /// The topology a config describes.
    pub fn from_config(amqp: &AmqpConfig, worker: &WorkerConfig) -> Self {
        let topology = Self::new(&amqp.jobs_queue, &amqp.results_queue);
        match amqp.queue_type {
            QueueType::Classic => topology,
            QueueType::Quorum => topology.quorum(worker.max_deliveries),
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.jobs)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.jobs)
    }

    pub fn wait_queue(&self, tier: Duration) -> String {
        format!("{}.wait.{}", self.jobs, humantime::format_duration(tier))
    }

    /// The tier to park a job in for a wait of `wait`: the longest not beyond it (at least the
    /// shortest, so a job always comes back).
    pub fn tier_for(wait: Duration) -> Duration {
        WAIT_TIERS.iter().rev().copied().find(|tier| *tier <= wait).unwrap_or(WAIT_TIERS[0])
    }

    /// The declaration arguments of the queue for `role`.
    pub fn arguments(&self, role: QueueRole) -> FieldTable {
        let mut args = FieldTable::default();
        let quorum = self.queue_type == QueueType::Quorum;
        let mut set = |key: &str, value: AMQPValue| {
            args.insert(key.into(), value);
        };
        if quorum {
            set("x-queue-type", text("quorum"));
        }
        match role {
            QueueRole::Wait(tier) => {
                set("x-message-ttl", AMQPValue::LongLongInt(i64::try_from(tier.as_millis()).unwrap_or(i64::MAX)));
                set("x-dead-letter-exchange", text(""));
                set("x-dead-letter-routing-key", text(&self.jobs));
                if quorum {
                    set("x-dead-letter-strategy", text("at-least-once"));
                    set("x-overflow", text("reject-publish"));
                }
            }
            QueueRole::Jobs if quorum => {
                set("x-delivery-limit", AMQPValue::LongLongInt(i64::from(self.jobs_delivery_limit)));
                set("x-dead-letter-exchange", text(&self.dead_letter_exchange()));
                set("x-dead-letter-strategy", text("at-least-once"));
                set("x-overflow", text("reject-publish"));
            }
            QueueRole::Jobs | QueueRole::Results | QueueRole::Dead | QueueRole::Reply => {}
        }
        args
    }

    /// Declares everything; safe to repeat. A queue that another service (or an earlier
    /// version of this one, or the other `queue_type`) declared first with other arguments is
    /// used as it is rather than fought over, with a warning that says what differs.
    pub async fn declare(&self, conn: &Connection) -> lapin::Result<()> {
        let dlx = self.dead_letter_exchange();
        let dead = self.dead_letter_queue();
        declare_or_accept(conn, &dead, self.arguments(QueueRole::Dead)).await?;
        let channel = conn.create_channel().await?;
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "declared".into()).await;
        for tier in WAIT_TIERS {
            declare_or_accept(conn, &self.wait_queue(tier), self.arguments(QueueRole::Wait(tier))).await?;
        }
        declare_or_accept(conn, &self.jobs, self.arguments(QueueRole::Jobs)).await?;
        declare_or_accept(conn, &self.results, self.arguments(QueueRole::Results)).await?;
        Ok(())
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// Declares `queue` durable with `args`, or accepts the existing one when it was declared
/// differently (the broker then refuses our declare with PRECONDITION_FAILED, which closes
/// that channel, and a passive declare on a fresh one finds the queue).
pub async fn declare_or_accept(conn: &Connection, queue: &str, args: FieldTable) -> lapin::Result<()> {
    let channel = conn.create_channel().await?;
    match channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(refused) => {
            let probe = conn.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            probe.queue_declare(queue.into(), passive, FieldTable::default()).await.map_err(|_| refused.clone())?;
            tracing::warn!(
                queue,
                refusal = %refused,
                "the queue exists with other arguments; using it as it is (to change its type, \
                 drain and delete it: the next worker start declares it anew)"
            );
            let _ = probe.close(200, "probed".into()).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_never_overshoot_a_wait() {
        assert_eq!(Topology::tier_for(Duration::from_millis(300)), Duration::from_secs(1));
        assert_eq!(Topology::tier_for(Duration::from_secs(7)), Duration::from_secs(5));
        assert_eq!(Topology::tier_for(Duration::from_secs(59)), Duration::from_secs(30));
        assert_eq!(Topology::tier_for(Duration::from_secs(3600)), Duration::from_secs(600));
    }

    #[test]
    fn names_stay_inside_the_jobs_namespace() {
        let t = Topology::new("llm.jobs", "llm.results");
        assert_eq!(t.dead_letter_queue(), "llm.jobs.dead");
        assert_eq!(t.wait_queue(Duration::from_secs(120)), "llm.jobs.wait.2m");
        assert!(t.wait_queue(Duration::from_secs(1)).starts_with("llm.jobs"));
    }

    fn keys(args: &FieldTable) -> Vec<String> {
        let mut keys: Vec<String> = args.inner().keys().map(|k| k.as_str().to_string()).collect();
        keys.sort();
        keys
    }

    fn value(args: &FieldTable, key: &str) -> Option<String> {
        match args.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn classic_declarations_are_unchanged() {
        let t = Topology::new("llm.jobs", "llm.results");
        for role in [QueueRole::Jobs, QueueRole::Results, QueueRole::Dead, QueueRole::Reply] {
            assert!(t.arguments(role).inner().is_empty(), "{role:?} stays a plain durable queue");
        }
        let wait = t.arguments(QueueRole::Wait(Duration::from_secs(5)));
        assert_eq!(keys(&wait), ["x-dead-letter-exchange", "x-dead-letter-routing-key", "x-message-ttl"]);
        assert_eq!(value(&wait, "x-message-ttl").as_deref(), Some("5000"));
        assert_eq!(value(&wait, "x-dead-letter-routing-key").as_deref(), Some("llm.jobs"));
    }

    #[test]
    fn quorum_makes_every_queue_a_quorum_queue() {
        let t = Topology::new("llm.jobs", "llm.results").quorum(10);
        let roles = [
            QueueRole::Jobs,
            QueueRole::Results,
            QueueRole::Dead,
            QueueRole::Reply,
            QueueRole::Wait(Duration::from_secs(1)),
        ];
        for role in roles {
            assert_eq!(value(&t.arguments(role), "x-queue-type").as_deref(), Some("quorum"), "{role:?}");
        }
    }

    #[test]
    fn quorum_delay_queues_dead_letter_back_at_least_once() {
        let t = Topology::new("llm.jobs", "llm.results").quorum(10);
        let wait = t.arguments(QueueRole::Wait(Duration::from_secs(30)));
        assert_eq!(value(&wait, "x-dead-letter-strategy").as_deref(), Some("at-least-once"));
        assert_eq!(value(&wait, "x-overflow").as_deref(), Some("reject-publish"), "at-least-once requires it");
        assert_eq!(value(&wait, "x-message-ttl").as_deref(), Some("30000"));
        assert_eq!(value(&wait, "x-dead-letter-routing-key").as_deref(), Some("llm.jobs"));
        assert_eq!(value(&wait, "x-delivery-limit"), None, "nobody consumes a delay queue");
    }

    #[test]
    fn the_brokers_delivery_limit_is_a_backstop_above_the_services_own() {
        for max_deliveries in [1, 3, 10, 50, u32::MAX] {
            let limit = delivery_limit_backstop(max_deliveries);
            assert!(limit > max_deliveries || max_deliveries == u32::MAX, "{max_deliveries} → {limit}");
            assert!(limit >= 20, "never below RabbitMQ 4's own default");
        }
        let config = crate::config::WorkerConfig { max_deliveries: 15, ..Default::default() };
        let amqp = AmqpConfig { queue_type: QueueType::Quorum, ..Default::default() };
        let t = Topology::from_config(&amqp, &config);
        let jobs = t.arguments(QueueRole::Jobs);
        assert_eq!(value(&jobs, "x-delivery-limit").as_deref(), Some("30"));
        assert_eq!(value(&jobs, "x-dead-letter-exchange").as_deref(), Some("llm.jobs.dlx"));
        assert_eq!(value(&jobs, "x-dead-letter-strategy").as_deref(), Some("at-least-once"));
        for role in [QueueRole::Results, QueueRole::Dead, QueueRole::Reply] {
            assert_eq!(keys(&t.arguments(role)), ["x-queue-type"], "{role:?}: read by others, no limit of ours");
        }
    }

    #[test]
    fn the_config_decides_the_type() {
        let classic = Topology::from_config(&AmqpConfig::default(), &Default::default());
        assert_eq!(classic.queue_type, QueueType::Classic);
        let amqp = AmqpConfig { queue_type: QueueType::Quorum, ..Default::default() };
        assert_eq!(Topology::from_config(&amqp, &Default::default()).queue_type, QueueType::Quorum);
    }
}
