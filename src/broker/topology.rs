//! The queues the service owns, declared idempotently at every (re)connect.
//!
//! ```text
//! poison ──(copied with a fallback-reason header)──► llm.jobs.dead ◄── llm.jobs.dlx (fanout, for
//!                                                    policies and operators' own bindings)
//! llm.jobs.wait.<tier> ──(TTL)──► llm.jobs          (parked jobs come back by themselves)
//! llm.results
//! ```

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};

/// Delay-queue tiers: a parked job goes to the longest tier not beyond its wake-up time.
/// Fixed TTLs per queue avoid per-message TTL's head-of-line blocking.
pub const WAIT_TIERS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub results: String,
}

impl Topology {
    pub fn new(jobs: &str, results: &str) -> Self {
        Self { jobs: jobs.to_string(), results: results.to_string() }
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

    /// Declares everything; safe to repeat. The jobs and results queues are plain durable
    /// queues, and if another service declared one first with other arguments (a quorum queue,
    /// a length limit…) it is used as it is rather than fought over.
    pub async fn declare(&self, conn: &Connection) -> lapin::Result<()> {
        let channel = conn.create_channel().await?;
        let dlx = self.dead_letter_exchange();
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let dead = self.dead_letter_queue();
        channel.queue_declare(dead.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for tier in WAIT_TIERS {
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier.as_millis() as i64));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.jobs.as_str().into()));
            channel.queue_declare(self.wait_queue(tier).as_str().into(), QueueDeclareOptions::durable(), args).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        for queue in [&self.jobs, &self.results] {
            declare_or_accept(conn, queue).await?;
        }
        Ok(())
    }
}

/// Declares `queue` durable, or accepts the existing one when it was declared differently (the
/// broker then refuses our declare with PRECONDITION_FAILED and closes that channel).
async fn declare_or_accept(conn: &Connection, queue: &str) -> lapin::Result<()> {
    let channel = conn.create_channel().await?;
    match channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(refused) => {
            let probe = conn.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            probe.queue_declare(queue.into(), passive, FieldTable::default()).await.map_err(|_| refused)?;
            tracing::warn!(queue, "the queue exists with other arguments; using it as it is");
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
}
