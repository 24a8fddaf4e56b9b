//! The glue for one delivery: decode → ledger → chain → publish → ack.
//!
//! Order matters for the delivery guarantees (contract §4): the result is stored, then
//! published and confirmed, and only then is the job acked. A crash anywhere before the ack
//! leaves the message with the broker, and its redelivery is answered from the ledger.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use tracing::Instrument;

use crate::broker::{Ack, DeliveryHandler, Incoming, Outgoing, Publisher, Routed, Topology, headers};
use crate::chain::{self, Chain, HoldPolicy, JobProgress, Verdict};
use crate::job::{ErrorCode, ErrorEnvelope, InvalidJob, Job, JobResult, ResponseEnvelope, Routing};
use crate::observability;
use crate::routing::Attempt;
use crate::state::{LedgerEntry, ProviderState, ResultLedger};

/// The most attempts carried along a parked job (older ones are dropped).
const MAX_CARRIED_ATTEMPTS: usize = 50;

/// Rules for handling deliveries, from the config.
#[derive(Debug, Clone)]
pub struct HandlerRules {
    pub topology: Topology,
    pub reply_to_allow: Vec<glob::Pattern>,
    pub max_message_bytes: usize,
    pub hold_limit: Duration,
    pub delivery_deadline: Duration,
    pub max_deliveries: u32,
}

/// Handles job deliveries for one worker process.
pub struct JobHandler {
    pub chains: HashMap<String, Arc<Chain>>,
    pub state: Arc<dyn ProviderState>,
    pub ledger: Arc<dyn ResultLedger>,
    pub rules: HandlerRules,
    /// `host:pid`, written into every result's `routing.worker`.
    pub worker_id: String,
    /// Copies of one job in this process are worked one after the other.
    pub key_locks: KeyLocks,
}

/// One lock per idempotency key being worked in this process: a second copy of a job that
/// arrives meanwhile waits for the first, then is answered from the ledger instead of calling a
/// provider again.
#[derive(Default)]
pub struct KeyLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = self.0.lock().unwrap().entry(key.to_string()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        KeyGuard { locks: self, key: key.to_string(), lock, guard: Some(guard) }
    }
}

struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.0.lock().unwrap();
        // Only the map and this guard hold the lock: nobody waits, forget the key.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.key);
        }
    }
}

/// What to do with a delivery once it has been looked at.
enum Disposition {
    /// Publish this result to `target`, then ack.
    Answer { target: String, reply: Reply },
    /// Dead-letter the message with `reason`, send the error result to `target`, then ack.
    Poison { target: String, reason: String, reply: Reply },
    /// Put the job in a delay queue until `until`, then ack.
    Park { until: SystemTime, attempts: Vec<Attempt> },
}

#[async_trait::async_trait]
impl DeliveryHandler for JobHandler {
    async fn handle(&self, incoming: Incoming, publisher: &Publisher, ack: Ack) -> Result<(), String> {
        // Every log line of this delivery carries the job's identity (filled in once parsed).
        let span = tracing::info_span!("job", custom_id = tracing::field::Empty, chain = tracing::field::Empty);
        async {
            let disposition = self.decide(&incoming).await;
            self.carry_out(disposition, &incoming, publisher).await?;
            ack.ack().await
        }
        .instrument(span)
        .await
    }
}

impl JobHandler {
    async fn decide(&self, incoming: &Incoming) -> Disposition {
        let started = Instant::now();
        let origin = incoming.published_at.map_or(incoming.first_seen, |p| p.min(incoming.first_seen));
        let clock = Clock { origin, started };
        if incoming.body.len() > self.rules.max_message_bytes {
            let reason = format!(
                "the message has {} bytes, more than max_message_bytes ({})",
                incoming.body.len(),
                self.rules.max_message_bytes
            );
            return self.poison(incoming, None, reason, &clock);
        }
        let job = match Job::parse(&incoming.body) {
            Ok(job) => job,
            Err(InvalidJob { custom_id, message }) => {
                return self.poison(incoming, custom_id, message, &clock);
            }
        };
        let target = match self.reply_target(incoming.reply_to.as_deref()) {
            Ok(target) => target,
            Err(refusal) => return self.poison(incoming, Some(job.custom_id), refusal, &clock),
        };
        let Some(chain) = self.chains.get(&job.chain).cloned() else {
            let reason = format!("unknown chain `{}`", job.chain);
            return self.poison(incoming, Some(job.custom_id), reason, &clock);
        };
        let key = job.idempotency_key(incoming.message_id.as_deref());
        let span = tracing::Span::current();
        span.record("custom_id", job.custom_id.as_str());
        span.record("chain", job.chain.as_str());
        let _one_copy_at_a_time = self.key_locks.lock(&key).await;
        match self.open_ledger(&key).await {
            Some(LedgerEntry { result: Some(stored), .. }) => {
                if let Some(reply) = Reply::stored(stored) {
                    tracing::info!("answered from the result ledger, no provider call");
                    observability::record_from_ledger();
                    return Disposition::Answer { target, reply };
                }
            }
            Some(entry) if entry.deliveries.saturating_sub(incoming.parks) > self.rules.max_deliveries => {
                let reason = format!("delivered {} times without an answer (does it crash workers?)", entry.deliveries);
                return self.poison(incoming, Some(job.custom_id), reason, &clock);
            }
            _ => {}
        }
        let disposition = self.run_chain(&job, &chain, target, incoming, &clock).await;
        if let Disposition::Answer { reply, .. } = &disposition {
            self.store_result(&key, reply).await;
        }
        disposition
    }

    async fn run_chain(
        &self,
        job: &Job,
        chain: &Chain,
        target: String,
        incoming: &Incoming,
        clock: &Clock,
    ) -> Disposition {
        let max_wait = job.max_wait.unwrap_or(chain.max_wait);
        let mut progress = JobProgress::resume(incoming.first_seen, incoming.previous_attempts.clone());
        let carried = incoming.previous_attempts.len();
        let left = self.rules.delivery_deadline.saturating_sub(clock.started.elapsed());
        let hold = HoldPolicy::new(self.rules.hold_limit, SystemTime::now(), left);
        let run = chain::run(chain, &job.body, max_wait, &mut progress, self.state.as_ref(), hold, &chain::SystemClock);
        let verdict = match tokio::time::timeout(self.rules.delivery_deadline, run).await {
            Ok(verdict) => verdict,
            // The delivery's hard deadline: hand the job back through a short park.
            Err(_) => Verdict::Wait { until: SystemTime::now() },
        };
        let routing = self.routing(Some(&chain.name), progress.attempts.clone(), clock);
        let result = match result_of(&job.custom_id, verdict, routing) {
            Ok(result) => result,
            Err(until) => {
                observability::record_parked(&progress.attempts[carried..]);
                return Disposition::Park { until, attempts: progress.attempts };
            }
        };
        observability::record_result(&result, &progress.attempts[carried..]);
        Disposition::Answer { target, reply: Reply::of(&result) }
    }

    fn poison(&self, incoming: &Incoming, custom_id: Option<String>, reason: String, clock: &Clock) -> Disposition {
        tracing::warn!(custom_id = custom_id.as_deref().unwrap_or("?"), %reason, "poison message: dead-lettered");
        let target =
            self.reply_target(incoming.reply_to.as_deref()).unwrap_or_else(|_| self.rules.topology.results.clone());
        let routing = self.routing(None, Vec::new(), clock);
        let result = error_result(custom_id, ErrorCode::InvalidRequest, reason.clone(), routing);
        observability::record_result(&result, &[]);
        Disposition::Poison { target, reason, reply: Reply::of(&result) }
    }

    /// Where the result goes: `reply_to` when it is allowed, the results queue when absent.
    fn reply_target(&self, reply_to: Option<&str>) -> Result<String, String> {
        let Some(reply_to) = reply_to.filter(|r| !r.is_empty()) else {
            return Ok(self.rules.topology.results.clone());
        };
        if reply_to.starts_with(&self.rules.topology.jobs) {
            return Err(format!("reply_to `{reply_to}` is refused: it names the jobs queue or one of its own queues"));
        }
        if !self.rules.reply_to_allow.iter().any(|p| p.matches(reply_to)) {
            return Err(format!("reply_to `{reply_to}` is refused: it matches no reply_to_allow pattern"));
        }
        Ok(reply_to.to_string())
    }

    fn routing(&self, chain: Option<&str>, attempts: Vec<Attempt>, clock: &Clock) -> Routing {
        let now = SystemTime::now();
        let total = now.duration_since(clock.origin).unwrap_or_default();
        let working = clock.started.elapsed();
        Routing {
            chain: chain.map(str::to_string),
            provider: None,
            model: None,
            free: None,
            attempts,
            worker: self.worker_id.clone(),
            queued_ms: total.saturating_sub(working).as_millis() as u64,
            total_ms: total.as_millis() as u64,
        }
    }

    /// The ledger entry; a database that stays away for a few tries is worked around (the job
    /// is still answered, only its idempotency record is missing).
    async fn open_ledger(&self, key: &str) -> Option<LedgerEntry> {
        for delay_ms in [100, 500, 0] {
            match self.ledger.open(key).await {
                Ok(entry) => return Some(entry),
                Err(e) if delay_ms == 0 => {
                    tracing::warn!(error = %e, "result ledger unavailable; answering without it")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(delay_ms)).await,
            }
        }
        None
    }

    async fn store_result(&self, key: &str, reply: &Reply) {
        let json = std::str::from_utf8(&reply.body).expect("serde_json writes UTF-8");
        if let Err(e) = self.ledger.store(key, json).await {
            tracing::warn!(error = %e, "cannot store the result; a redelivery would call a provider again");
        }
    }

    async fn carry_out(
        &self,
        disposition: Disposition,
        incoming: &Incoming,
        publisher: &Publisher,
    ) -> Result<(), String> {
        match disposition {
            Disposition::Answer { target, reply } => self.publish_result(&target, &reply, incoming, publisher).await,
            Disposition::Poison { target, reason, reply } => {
                let properties = with_headers(
                    &incoming.properties,
                    [(headers::REASON, AMQPValue::LongString(reason.as_str().into()))],
                );
                let dead = self.rules.topology.dead_letter_queue();
                publish(publisher, &dead, &incoming.body, properties).await?;
                self.publish_result(&target, &reply, incoming, publisher).await
            }
            Disposition::Park { until, mut attempts } => {
                let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
                let queue = self.rules.topology.wait_queue(Topology::tier_for(wait));
                if attempts.len() > MAX_CARRIED_ATTEMPTS {
                    attempts.drain(..attempts.len() - MAX_CARRIED_ATTEMPTS);
                }
                let attempts = serde_json::to_string(&attempts).expect("attempts always serialize");
                let first_seen =
                    incoming.first_seen.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
                let properties = with_headers(
                    &incoming.properties,
                    [
                        (headers::FIRST_SEEN_MS, AMQPValue::LongLongInt(first_seen)),
                        (headers::PARKS, AMQPValue::LongLongInt(i64::from(incoming.parks) + 1)),
                        (headers::ATTEMPTS, AMQPValue::LongString(attempts.as_str().into())),
                    ],
                );
                tracing::debug!(%queue, wait_ms = wait.as_millis() as u64, "parking the job until a provider is usable");
                match publish(publisher, &queue, &incoming.body, properties).await? {
                    Routed::Queued => Ok(()),
                    Routed::Unroutable => Err(format!("delay queue `{queue}` is missing")),
                }
            }
        }
    }

    async fn publish_result(
        &self,
        target: &str,
        reply: &Reply,
        incoming: &Incoming,
        publisher: &Publisher,
    ) -> Result<(), String> {
        let body = &reply.body;
        let correlation_id = incoming.correlation_id.clone().or_else(|| reply.custom_id.clone()).unwrap_or_default();
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_message_id(reply.id.as_str().into());
        if publish(publisher, target, body, properties.clone()).await? == Routed::Queued {
            return Ok(());
        }
        // The reply queue does not exist: keep the result rather than lose it.
        tracing::warn!(reply_to = target, "reply_to queue does not exist; result sent to the results queue");
        let properties =
            with_headers(&properties, [(headers::UNDELIVERABLE_REPLY_TO, AMQPValue::LongString(target.into()))]);
        match publish(publisher, &self.rules.topology.results, body, properties).await? {
            Routed::Queued => Ok(()),
            Routed::Unroutable => Err("the results queue is missing".into()),
        }
    }
}

/// A result ready to publish: serialized once, for the ledger and the broker alike.
struct Reply {
    body: Vec<u8>,
    /// For the default `correlation_id`.
    custom_id: Option<String>,
    /// The result's `id`, sent as the AMQP `message_id`.
    id: String,
}

impl Reply {
    fn of(result: &JobResult) -> Reply {
        let body = serde_json::to_vec(result).expect("results always serialize");
        Reply { body, custom_id: result.custom_id.clone(), id: result.id.clone() }
    }

    /// A result the ledger stored, published as it was stored.
    fn stored(text: String) -> Option<Reply> {
        let result: JobResult = serde_json::from_str(&text).ok()?;
        Some(Reply { custom_id: result.custom_id, id: result.id, body: text.into_bytes() })
    }
}

/// Time anchors of one delivery.
struct Clock {
    /// When the job entered the system (publish timestamp or first receipt).
    origin: SystemTime,
    /// When this delivery's processing started.
    started: Instant,
}

/// The result a verdict gives, or `Err(until)` when the job must wait until then.
pub fn result_of(custom_id: &str, verdict: Verdict, mut routing: Routing) -> Result<JobResult, SystemTime> {
    match verdict {
        Verdict::Wait { until } => Err(until),
        Verdict::Answered { provider, model, free, completion } => {
            tracing::info!(custom_id, provider = %provider, attempts = routing.attempts.len(), "answered");
            routing.provider = Some(provider);
            routing.model = Some(model);
            routing.free = Some(free);
            Ok(JobResult {
                id: JobResult::new_id(),
                custom_id: Some(custom_id.to_string()),
                response: Some(ResponseEnvelope {
                    status_code: completion.status,
                    request_id: completion.request_id,
                    body: completion.body,
                }),
                error: None,
                routing,
            })
        }
        Verdict::Failed { code, message } => {
            tracing::warn!(custom_id, code = ?code, %message, "job failed");
            Ok(error_result(Some(custom_id.to_string()), code, message, routing))
        }
    }
}

/// A failed job's result.
pub fn error_result(custom_id: Option<String>, code: ErrorCode, message: String, routing: Routing) -> JobResult {
    JobResult {
        id: JobResult::new_id(),
        custom_id,
        response: None,
        error: Some(ErrorEnvelope { code, message }),
        routing,
    }
}

async fn publish(
    publisher: &Publisher,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Routed, String> {
    publisher
        .publish(Outgoing { routing_key, body, properties })
        .await
        .map_err(|e| format!("publishing to `{routing_key}` failed: {e}"))
}

fn with_headers<const N: usize>(properties: &BasicProperties, extra: [(&str, AMQPValue); N]) -> BasicProperties {
    let mut table: FieldTable = properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        table.insert(key.into(), value);
    }
    properties.clone().with_headers(table)
}

/// `host:pid`, to tell workers apart in results.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}
