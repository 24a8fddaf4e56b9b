//! The glue for one delivery: decode → ledger → chain → publish → ack.
//!
//! Order matters for the delivery guarantees (contract §4): the result is stored in the ledger
//! and published (confirmed) at the same time, and only when both are done is the job acked. A
//! crash anywhere before the ack leaves the message with the broker, and its redelivery is
//! answered from the ledger (or, if the store had not finished, the job runs again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::broker::headers::{self, HeaderKey, Parked, ParkedState};
use crate::broker::{
    ConnectionLost, DeliveryHandler, Incoming, Outgoing, PublishError, Publisher, Routed, Settlement, Topology,
};
use crate::chain::{self, Chain, HoldPolicy, JobProgress, SystemClock, Verdict};
use crate::job::{ErrorCode, ErrorEnvelope, InvalidJob, Job, JobIdentity, JobResult, ResponseEnvelope, Routing};
use crate::observability;
use crate::routing::Attempt;
use crate::state::{LedgerEntry, ProviderState, Receipt, ResultLedger};

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
    /// Authenticates the state parked jobs carry in their headers.
    pub header_key: HeaderKey,
    /// Internal failures per delivery, counted here while the ledger is unreachable.
    pub local_failures: LocalFailures,
}

/// One lock per idempotency key being worked in this process: a second copy of a job that
/// arrives meanwhile waits for the first, then is answered from the ledger instead of calling a
/// provider again.
#[derive(Default)]
pub struct KeyLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone();
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
        let mut locks = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this guard hold the lock: nobody waits, forget the key.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.key);
        }
    }
}

/// Internal failures counted in this process (bounded: forgotten all at once when full, which
/// only ever allows a few more retries).
#[derive(Default)]
pub struct LocalFailures(Mutex<HashMap<String, u32>>);

impl LocalFailures {
    const MAX_KEYS: usize = 10_000;

    fn count(&self, key: &str) -> u32 {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= Self::MAX_KEYS && !counts.contains_key(key) {
            counts.clear();
        }
        let count = counts.entry(key.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }
}

/// What to do with a delivery once it has been looked at.
enum Disposition<'a> {
    /// Publish this result to `target` (and record it in the ledger at the same time), then ack.
    Answer { target: String, reply: Reply, record: Option<LedgerRecord<'a>> },
    /// Copy the message to the dead-letter queue with `reason`, send the error result to
    /// `target`, then ack.
    DeadLetter { target: String, reason: String, reply: Reply },
    /// Put the job in a delay queue until `until`, carrying its authenticated state, then ack.
    Park { until: SystemTime, state: ParkedState, identity: String },
}

#[async_trait::async_trait]
impl DeliveryHandler for JobHandler {
    async fn handle(&self, incoming: &Incoming, publisher: &Publisher) -> Result<Settlement, ConnectionLost> {
        // Every log line of this delivery carries the job's identity (filled in once parsed).
        let span = tracing::info_span!("job", custom_id = tracing::field::Empty, chain = tracing::field::Empty);
        // A `traceparent` in the job's headers makes this span part of the publisher's trace.
        observability::trace::continue_trace(&span, &incoming.headers);
        async {
            let disposition = self.decide(incoming).await;
            self.carry_out(disposition, incoming, publisher).await
        }
        .instrument(span)
        .await
    }

    async fn internal_failure(
        &self,
        incoming: &Incoming,
        reason: &str,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost> {
        observability::record_internal_failure();
        let key = delivery_key(incoming);
        let failures = match self.ledger.record_failure(&key, reason).await {
            Ok(count) => count,
            Err(_) => self.local_failures.count(&key),
        };
        if failures < self.rules.max_deliveries {
            let after = Duration::from_secs(1u64 << failures.min(5));
            tracing::warn!(failures, retry_in = ?after, "internal failure on a job; it is tried again later");
            return self.retry_later(incoming, after, publisher).await;
        }
        let custom_id = Job::parse(&incoming.body).ok().map(|job| job.custom_id);
        let reason = format!("the worker failed on this job {failures} times; last: {reason}");
        let timing = Timing::start(incoming);
        let disposition = self.dead_letter(incoming, custom_id, ErrorCode::InternalError, reason, &timing);
        self.carry_out(disposition, incoming, publisher).await
    }
}

/// Where a fresh result goes in the ledger. It holds the job's key lock until the result is
/// stored, so a second copy of the job in this process is answered from the ledger.
struct LedgerRecord<'a> {
    key: String,
    fingerprint: String,
    _one_copy_at_a_time: KeyGuard<'a>,
}

/// Identifies one message for counting its internal failures, whether or not it parses.
fn delivery_key(incoming: &Incoming) -> String {
    let mut hash = Sha256::new();
    let message_id = incoming.message_id.as_deref().unwrap_or("");
    hash.update((message_id.len() as u64).to_be_bytes());
    hash.update(message_id.as_bytes());
    hash.update(&incoming.body);
    let mut key = String::from("delivery:");
    crate::job::push_hex(&mut key, &hash.finalize());
    key
}

impl JobHandler {
    async fn decide(&self, incoming: &Incoming) -> Disposition<'_> {
        let timing = Timing::start(incoming);
        let invalid = |custom_id: Option<String>, reason: String| {
            self.dead_letter(incoming, custom_id, ErrorCode::InvalidRequest, reason, &timing)
        };
        if incoming.body.len() > self.rules.max_message_bytes {
            let (size, limit) = (incoming.body.len(), self.rules.max_message_bytes);
            return invalid(None, format!("the message has {size} bytes, more than max_message_bytes ({limit})"));
        }
        let job = match Job::parse(&incoming.body) {
            Ok(job) => job,
            Err(InvalidJob { custom_id, message }) => return invalid(custom_id, message),
        };
        let target = match self.reply_target(incoming.reply_to.as_deref()) {
            Ok(target) => target,
            Err(refusal) => return invalid(Some(job.custom_id), refusal),
        };
        let Some(chain) = self.chains.get(&job.chain).cloned() else {
            let reason = format!("unknown chain `{}`", job.chain);
            return invalid(Some(job.custom_id), reason);
        };
        let max_wait = match chain.max_wait_for(job.max_wait) {
            Ok(max_wait) => max_wait,
            Err(reason) => return invalid(Some(job.custom_id), reason),
        };
        let span = tracing::Span::current();
        span.record("custom_id", job.custom_id.as_str());
        span.record("chain", job.chain.as_str());
        let JobIdentity { key, fingerprint } = job.identity(incoming.message_id.as_deref());
        let identity = format!("{key}\n{fingerprint}");
        let parked = match headers::decode_parked(&self.header_key, &identity, &incoming.headers) {
            Parked::Authentic(state) => Some(state),
            Parked::Fresh => None,
            Parked::Forged => {
                tracing::warn!("ignoring parked-job headers the service did not write for this job");
                None
            }
        };
        let one_copy_at_a_time = self.key_locks.lock(&key).await;
        match self.open_ledger(&key, &fingerprint, Receipt::of(incoming.redelivered)).await {
            Some(entry) if entry.other_job => {
                let message_id = incoming.message_id.as_deref().unwrap_or_default();
                let reason = format!("message_id `{message_id}` already used by another job");
                return invalid(Some(job.custom_id), reason);
            }
            Some(LedgerEntry { result: Some(stored), .. }) => {
                if let Some(reply) = Reply::stored(stored) {
                    tracing::info!("answered from the result ledger, no provider call");
                    observability::record_from_ledger();
                    return Disposition::Answer { target, reply, record: None };
                }
            }
            // Only redeliveries count after the first receipt: a parked job coming back, or the
            // job published again, is no sign that it kills workers.
            Some(entry) if entry.deliveries > self.rules.max_deliveries => {
                let reason = format!("delivered {} times without an answer (does it crash workers?)", entry.deliveries);
                return self.dead_letter(incoming, Some(job.custom_id), ErrorCode::InternalError, reason, &timing);
            }
            _ => {}
        }
        let run = ChainRun { job: &job, chain: &chain, max_wait, parked, identity };
        match self.run_chain(run, target, incoming, &timing).await {
            Disposition::Answer { target, reply, .. } => {
                let record = LedgerRecord { key, fingerprint, _one_copy_at_a_time: one_copy_at_a_time };
                Disposition::Answer { target, reply, record: Some(record) }
            }
            other => other,
        }
    }

    async fn run_chain(
        &self,
        run: ChainRun<'_>,
        target: String,
        incoming: &Incoming,
        timing: &Timing,
    ) -> Disposition<'static> {
        let (first_seen, parks, previous) = match run.parked {
            Some(state) => (state.first_seen(incoming.received_at), state.parks, state.attempts),
            None => (incoming.received_at, 0, Vec::new()),
        };
        let carried = previous.len();
        let mut progress = JobProgress::resume(first_seen, previous);
        let left = self.rules.delivery_deadline.saturating_sub(timing.started.elapsed());
        let hold = HoldPolicy::new(self.rules.hold_limit, SystemTime::now(), left);
        let state = self.state.as_ref();
        let chain_run = chain::run(run.chain, run.job, run.max_wait, &mut progress, state, hold, &SystemClock);
        let verdict = match tokio::time::timeout(self.rules.delivery_deadline, chain_run).await {
            Ok(verdict) => verdict,
            // The delivery's hard deadline: hand the job back through a short park.
            Err(_) => Verdict::Wait { until: SystemTime::now(), wake: chain::Wake::Spread },
        };
        let new_attempts = progress.attempts.get(carried..).unwrap_or_default();
        // A parked job's time counts from its first receipt, across its parks.
        let timing = Timing { origin: timing.origin.min(first_seen), started: timing.started };
        let routing = self.routing(Some(&run.chain.name), progress.attempts.clone(), &timing);
        match result_of(&run.job.custom_id, verdict, routing) {
            Ok(result) => {
                observability::record_result(&result, new_attempts);
                Disposition::Answer { target, reply: Reply::of(&result), record: None }
            }
            Err(until) => {
                observability::record_parked(new_attempts);
                let state = ParkedState::new(first_seen, parks.saturating_add(1), progress.attempts);
                Disposition::Park { until, state, identity: run.identity }
            }
        }
    }

    /// A message that is answered with an error and copied to the dead-letter queue.
    fn dead_letter(
        &self,
        incoming: &Incoming,
        custom_id: Option<String>,
        code: ErrorCode,
        reason: String,
        timing: &Timing,
    ) -> Disposition<'static> {
        tracing::warn!(custom_id = custom_id.as_deref().unwrap_or("?"), ?code, %reason, "dead-lettered");
        let target =
            self.reply_target(incoming.reply_to.as_deref()).unwrap_or_else(|_| self.rules.topology.results.clone());
        let routing = self.routing(None, Vec::new(), timing);
        let result = error_result(custom_id, code, reason.clone(), routing);
        observability::record_result(&result, &[]);
        Disposition::DeadLetter { target, reason, reply: Reply::of(&result) }
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

    fn routing(&self, chain: Option<&str>, attempts: Vec<Attempt>, timing: &Timing) -> Routing {
        let total = SystemTime::now().duration_since(timing.origin).unwrap_or_default();
        let working = timing.started.elapsed();
        Routing {
            chain: chain.map(str::to_string),
            provider: None,
            model: None,
            free: None,
            attempts,
            rejected: false,
            worker: self.worker_id.clone(),
            queued_ms: millis(total.saturating_sub(working)),
            total_ms: millis(total),
        }
    }

    /// The ledger entry, or `None` when the ledger cannot be reached: the job is then answered
    /// without it (a redelivery may call a provider again). The store answers at once while the
    /// database is known to be down, so this never holds a job on a dead pool.
    async fn open_ledger(&self, key: &str, fingerprint: &str, receipt: Receipt) -> Option<LedgerEntry> {
        match self.ledger.open(key, fingerprint, receipt).await {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::debug!(error = %e, "result ledger unavailable; answering without it");
                None
            }
        }
    }

    async fn store_result(&self, record: Option<LedgerRecord<'_>>, reply: &Reply) {
        let Some(record) = record else { return };
        if let Err(e) = self.ledger.store(&record.key, &record.fingerprint, &reply.body).await {
            tracing::debug!(error = %e, "cannot store the result; a redelivery would call a provider again");
        }
    }

    async fn carry_out(
        &self,
        disposition: Disposition<'_>,
        incoming: &Incoming,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost> {
        match disposition {
            Disposition::Answer { target, reply, record } => {
                // The ack waits for both; neither waits for the other.
                let stored = self.store_result(record, &reply);
                let (delivered, ()) = tokio::join!(self.deliver_result(&target, &reply, incoming, publisher), stored);
                match delivered? {
                    Delivery::Delivered => Ok(Settlement::Ack),
                    Delivery::Diverted { refusal } => {
                        let reason = format!("the result was refused by `{target}`: {refusal}");
                        self.copy_to_dead_letter(incoming, &reason, publisher).await
                    }
                    // Counted like any failure of the worker on this job, so it cannot loop.
                    Delivery::Failed => {
                        let reason = format!("no queue took the result (`{target}`, then the results queue)");
                        self.internal_failure(incoming, &reason, publisher).await
                    }
                }
            }
            Disposition::DeadLetter { target, reason, reply } => {
                if self.copy_to_dead_letter(incoming, &reason, publisher).await? != Settlement::Ack {
                    return Ok(Settlement::Requeue { after: REFUSED_REQUEUE_DELAY });
                }
                match self.deliver_result(&target, &reply, incoming, publisher).await? {
                    Delivery::Delivered | Delivery::Diverted { .. } => Ok(Settlement::Ack),
                    // The copy is kept: its error result is lost, the job is not.
                    Delivery::Failed => Ok(Settlement::Ack),
                }
            }
            Disposition::Park { until, state, identity } => {
                self.park(incoming, until, &state, &identity, publisher).await
            }
        }
    }

    async fn park(
        &self,
        incoming: &Incoming,
        until: SystemTime,
        state: &ParkedState,
        identity: &str,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost> {
        let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
        let queue = self.rules.topology.wait_queue(Topology::tier_for(wait));
        let properties =
            with_headers(incoming.copy_properties(), headers::encode_parked(&self.header_key, identity, state));
        tracing::debug!(%queue, wait_ms = millis(wait), "parking the job until a provider is usable");
        match publish_retrying(publisher, &queue, &incoming.body, properties).await? {
            Ok(Routed::Queued) => Ok(Settlement::Ack),
            // Our own delay queue is gone: rebuilding the session declares it again.
            Ok(Routed::Unroutable) => Err(ConnectionLost(format!("delay queue `{queue}` is missing"))),
            Err(refusal) => {
                tracing::warn!(%queue, %refusal, "the delay queue refused the job; it goes back to the jobs queue");
                Ok(Settlement::Requeue { after: Topology::tier_for(wait).min(REFUSED_REQUEUE_DELAY) })
            }
        }
    }

    /// Hands the job back through a delay queue (and acks this delivery), so a retry neither
    /// holds a prefetch slot while it waits nor comes straight back to this worker. The job's
    /// parked state, if any, goes along as it came (it is authenticated, or ignored).
    async fn retry_later(
        &self,
        incoming: &Incoming,
        after: Duration,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost> {
        let queue = self.rules.topology.wait_queue(Topology::tier_for(after));
        let mut carried = FieldTable::default();
        for name in [headers::PARKED_STATE, headers::PARKED_MAC] {
            if let Some(value) = incoming.headers.inner().get(name) {
                carried.insert(name.into(), value.clone());
            }
        }
        let properties = incoming.copy_properties().with_headers(carried);
        match publish_retrying(publisher, &queue, &incoming.body, properties).await? {
            Ok(Routed::Queued) => Ok(Settlement::Ack),
            Ok(Routed::Unroutable) | Err(_) => Ok(Settlement::Requeue { after: after.min(REFUSED_REQUEUE_DELAY) }),
        }
    }

    /// Copies the message to the dead-letter queue with `reason`.
    async fn copy_to_dead_letter(
        &self,
        incoming: &Incoming,
        reason: &str,
        publisher: &Publisher,
    ) -> Result<Settlement, ConnectionLost> {
        let dead = self.rules.topology.dead_letter_queue();
        let properties =
            with_headers(incoming.copy_properties(), [(headers::REASON, AMQPValue::LongString(reason.into()))]);
        match publish_retrying(publisher, &dead, &incoming.body, properties).await? {
            Ok(Routed::Queued) => Ok(Settlement::Ack),
            Ok(Routed::Unroutable) => Err(ConnectionLost(format!("dead-letter queue `{dead}` is missing"))),
            Err(refusal) => {
                tracing::warn!(%refusal, "the dead-letter queue refused a copy; the job goes back to the queue");
                Ok(Settlement::Requeue { after: REFUSED_REQUEUE_DELAY })
            }
        }
    }

    /// Publishes the result to `target`; one that `target` cannot take (missing, refusing)
    /// goes to the results queue with a header saying where it was meant to go.
    async fn deliver_result(
        &self,
        target: &str,
        reply: &Reply,
        incoming: &Incoming,
        publisher: &Publisher,
    ) -> Result<Delivery, ConnectionLost> {
        let correlation_id = result_correlation_id(incoming.correlation_id.as_deref(), reply.custom_id.as_deref());
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_message_id(reply.id.as_str().into());
        let refusal = match publish_retrying(publisher, target, reply.body.as_bytes(), properties.clone()).await? {
            Ok(Routed::Queued) => return Ok(Delivery::Delivered),
            Ok(Routed::Unroutable) => None,
            Err(refusal) => Some(refusal),
        };
        let results = &self.rules.topology.results;
        // Our own results queue is gone (deleted by hand while we run): rebuilding the session
        // declares it again, and the job, back from the broker, is answered from the ledger.
        let results_missing = || Err(ConnectionLost(format!("results queue `{results}` is missing")));
        if target == results {
            return if refusal.is_none() { results_missing() } else { Ok(Delivery::Failed) };
        }
        tracing::warn!(
            reply_to = target,
            refusal = refusal.as_deref(),
            "the result could not reach reply_to; sent to the results queue"
        );
        let note = [(headers::UNDELIVERABLE_REPLY_TO, AMQPValue::LongString(target.into()))];
        match publish_retrying(publisher, results, reply.body.as_bytes(), with_headers(properties, note)).await? {
            Ok(Routed::Queued) => Ok(refusal.map_or(Delivery::Delivered, |refusal| Delivery::Diverted { refusal })),
            Ok(Routed::Unroutable) => results_missing(),
            Err(_) => Ok(Delivery::Failed),
        }
    }
}

/// The pause before a job whose result or copy the broker refused goes back to the queue.
const REFUSED_REQUEUE_DELAY: Duration = Duration::from_secs(5);

/// How a result publish ended.
enum Delivery {
    /// At `reply_to` (or the results queue when that was the target).
    Delivered,
    /// `reply_to` refused it; it is in the results queue with a header.
    Diverted { refusal: String },
    /// No queue took it.
    Failed,
}

/// What one chain run needs beyond the delivery.
struct ChainRun<'a> {
    job: &'a Job,
    chain: &'a Chain,
    max_wait: Duration,
    /// The job's state from its previous deliveries, when authentic.
    parked: Option<ParkedState>,
    /// The job's key and fingerprint, which its parked state is bound to.
    identity: String,
}

/// A result ready to publish: serialized once, for the ledger and the broker alike.
struct Reply {
    /// The result's JSON text (the ledger stores text, the broker takes its bytes).
    body: String,
    /// For the default `correlation_id`.
    custom_id: Option<String>,
    /// The result's `id`, sent as the AMQP `message_id`.
    id: String,
}

impl Reply {
    fn of(result: &JobResult) -> Reply {
        // A JobResult is strings, numbers and JSON values: serializing it cannot fail.
        let body = serde_json::to_string(result).unwrap_or_default();
        Reply { body, custom_id: result.custom_id.clone(), id: result.id.clone() }
    }

    /// A result the ledger stored, published as it was stored.
    fn stored(text: String) -> Option<Reply> {
        // Checked whole: a row another worker wrote is only republished if it is a result.
        let result: JobResult = serde_json::from_str(&text).ok()?;
        Some(Reply { custom_id: result.custom_id, id: result.id, body: text })
    }
}

/// Time anchors of one delivery.
struct Timing {
    /// When the job entered the system (publish timestamp or receipt), for `queued_ms`.
    origin: SystemTime,
    /// When this delivery's processing started.
    started: Instant,
}

impl Timing {
    fn start(incoming: &Incoming) -> Timing {
        Timing { origin: incoming.published_at.unwrap_or(incoming.received_at), started: Instant::now() }
    }
}

/// The longest AMQP short string (a `correlation_id` is one). lapin checks it only in debug
/// builds (a panic there); a release build writes a malformed frame and loses the connection.
const SHORT_STRING_MAX: usize = 255;

/// The result's `correlation_id`: the job's own, else its `custom_id` (contract §3), unless
/// that is too long for the property (a `custom_id` has no length limit; the result's body
/// carries it whole), then none.
fn result_correlation_id(incoming: Option<&str>, custom_id: Option<&str>) -> String {
    incoming.or(custom_id).filter(|id| id.len() <= SHORT_STRING_MAX).unwrap_or_default().to_string()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The result a verdict gives, or `Err(until)` when the job must wait until then.
pub fn result_of(custom_id: &str, verdict: Verdict, mut routing: Routing) -> Result<JobResult, SystemTime> {
    match verdict {
        Verdict::Wait { until, .. } => Err(until),
        Verdict::Answered { provider, model, free, completion, rejected } => {
            tracing::info!(custom_id, provider = %provider, attempts = routing.attempts.len(), rejected, "answered");
            routing.rejected = rejected;
            routing.provider = Some(provider);
            let id = JobResult::new_id();
            // Every answer in the OpenAI form a client's SDK loads (contract §3), whatever an
            // OpenAI-compatible provider left out.
            let mut body = completion.body;
            let created = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            crate::providers::shape::complete_envelope(&mut body, &format!("chatcmpl-{id}"), &model, created);
            routing.model = Some(model);
            routing.free = Some(free);
            Ok(JobResult {
                id,
                custom_id: Some(custom_id.to_string()),
                response: Some(ResponseEnvelope {
                    status_code: completion.status,
                    request_id: completion.request_id,
                    body,
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

/// Publishes, retrying a refusal of this message a few times with backoff (a queue that is
/// full now may not be in a moment). `Err` only when the connection is gone; the inner `Err` is
/// this message's last refusal.
async fn publish_retrying(
    publisher: &Publisher,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Result<Routed, String>, ConnectionLost> {
    // Results and copies of the job carry the job span's trace context back out.
    let properties = observability::trace::with_trace_context(properties);
    let mut last_refusal = String::new();
    for delay_ms in [100, 400, 1600, 0] {
        let outgoing = Outgoing { routing_key, body, properties: properties.clone() };
        match publisher.publish(outgoing).await {
            Ok(routed) => return Ok(Ok(routed)),
            Err(PublishError::ConnectionLost(why)) => {
                return Err(ConnectionLost(format!("publishing to `{routing_key}`: {why}")));
            }
            Err(PublishError::Refused(why)) => {
                observability::record_refused_publish();
                last_refusal = why;
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
        }
    }
    Ok(Err(last_refusal))
}

fn with_headers<const N: usize>(properties: BasicProperties, extra: [(&str, AMQPValue); N]) -> BasicProperties {
    let mut table: FieldTable = properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        table.insert(key.into(), value);
    }
    properties.with_headers(table)
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

#[cfg(test)]
mod tests {
    //! Property tests over the whole decode path: whatever a publisher sends (body, properties,
    //! headers), the handler decides an answer, a dead-letter or a park, and never panics.

    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use lapin::types::{AMQPValue, FieldTable};
    use proptest::prelude::*;

    use super::*;
    use crate::chain::Member;
    use crate::job::ChatBody;
    use crate::providers::{ChatProvider, Completion, Failure};
    use crate::state::memory::MemoryStore;

    #[test]
    fn a_custom_id_too_long_for_a_short_string_is_not_the_results_correlation_id() {
        assert_eq!(result_correlation_id(Some("own"), Some("doc-1")), "own");
        assert_eq!(result_correlation_id(None, Some("doc-1")), "doc-1");
        let longest = "x".repeat(SHORT_STRING_MAX);
        assert_eq!(result_correlation_id(None, Some(&longest)), longest);
        assert_eq!(result_correlation_id(None, Some(&"é".repeat(128))), "", "256 bytes, 128 characters");
        assert_eq!(result_correlation_id(None, None), "");
    }

    struct Instant200;

    #[async_trait::async_trait]
    impl ChatProvider for Instant200 {
        async fn complete(&self, _body: &ChatBody) -> Result<Completion, Failure> {
            let body = serde_json::json!({"object": "chat.completion", "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]});
            Ok(Completion {
                status: 200,
                request_id: "r".into(),
                body,
                total_tokens: Some(3),
                exhausted_until: None,
                quota: Vec::new(),
            })
        }
    }

    fn handler() -> JobHandler {
        let member = Member {
            name: "p".into(),
            model: "m".into(),
            free: true,
            context_window: Some(1000),
            max_retries: 0,
            limits: vec![],
            pools: Default::default(),
            timeout: Duration::from_secs(1),
            pool_mates: vec![],
            timeouts: Default::default(),
            provider: Arc::new(Instant200),
        };
        let chain = Chain {
            name: "default".into(),
            members: vec![member],
            max_wait: Duration::from_secs(1),
            max_wait_limit: Duration::from_secs(3600),
            free_wait: Duration::ZERO,
            accept: Default::default(),
        };
        let store = Arc::new(MemoryStore::new());
        JobHandler {
            chains: HashMap::from([("default".to_string(), Arc::new(chain))]),
            state: store.clone(),
            ledger: store,
            rules: HandlerRules {
                topology: Topology::new("llm.jobs", "llm.results"),
                reply_to_allow: vec![glob::Pattern::new("reply.*").unwrap()],
                max_message_bytes: 4096,
                hold_limit: Duration::ZERO,
                delivery_deadline: Duration::from_secs(5),
                max_deliveries: 3,
            },
            worker_id: "test".into(),
            key_locks: KeyLocks::default(),
            header_key: HeaderKey::new(b"k".to_vec()),
            local_failures: LocalFailures::default(),
        }
    }

    fn amqp_value() -> impl Strategy<Value = AMQPValue> {
        prop_oneof![
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            any::<bool>().prop_map(AMQPValue::Boolean),
            ".{0,64}".prop_map(|s| AMQPValue::LongString(s.into())),
            "[0-9a-f]{0,70}".prop_map(|s| AMQPValue::LongString(s.into())),
        ]
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(headers::PARKED_STATE.to_string()),
            Just(headers::PARKED_MAC.to_string()),
            Just("fallback-first-seen-ms".to_string()),
            Just("fallback-attempts".to_string()),
            Just("x-death".to_string()),
            "[a-zA-Z-]{1,20}",
        ]
    }

    /// Bodies that are job-shaped often enough to reach the chain.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let field = prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([{"role": "user", "content": "hi"}])),
        ];
        let job = (".{0,8}", field.clone(), field.clone(), field, any::<bool>()).prop_map(
            |(custom_id, max_wait, max_tokens, chain, stream)| {
                serde_json::json!({"custom_id": custom_id, "max_wait": max_wait, "chain": chain,
                    "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens,
                             "stream": stream}})
                .to_string()
                .into_bytes()
            },
        );
        let wait = "[0-9]{1,25}(ms|s|m|h|d)".prop_map(|w| {
            serde_json::json!({"custom_id": "w", "max_wait": w,
                "body": {"messages": [{"role": "user", "content": "x"}]}})
            .to_string()
            .into_bytes()
        });
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..64), job, wait]
    }

    fn incoming() -> impl Strategy<Value = Incoming> {
        let pairs = proptest::collection::vec((header_name(), amqp_value()), 0..6);
        let text = proptest::option::of(".{0,20}");
        let timestamp = proptest::option::of(any::<u64>());
        (body(), pairs, timestamp, text.clone(), text.clone(), text, any::<bool>()).prop_map(
            |(body, pairs, timestamp, reply_to, message_id, correlation_id, redelivered)| {
                let mut table = FieldTable::default();
                for (name, value) in pairs {
                    table.insert(name.into(), value);
                }
                let mut properties = BasicProperties::default().with_headers(table);
                if let Some(t) = timestamp {
                    properties = properties.with_timestamp(t);
                }
                if let Some(r) = reply_to {
                    properties = properties.with_reply_to(r.as_str().into());
                }
                if let Some(m) = message_id {
                    properties = properties.with_message_id(m.as_str().into());
                }
                if let Some(c) = correlation_id {
                    properties = properties.with_correlation_id(c.as_str().into());
                }
                Incoming::from_delivery(body, &properties, redelivered, SystemTime::now())
            },
        )
    }

    proptest! {
        #[test]
        fn any_delivery_ends_in_an_answer_a_dead_letter_or_a_park(incoming in incoming()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let handler = handler();
            let disposition = runtime.block_on(handler.decide(&incoming));
            match disposition {
                Disposition::Answer { reply, .. } | Disposition::DeadLetter { reply, .. } => {
                    let result: JobResult = serde_json::from_str(&reply.body).unwrap();
                    prop_assert!(result.is_success() || result.error.is_some());
                }
                Disposition::Park { state, .. } => prop_assert!(state.parks >= 1),
            }
        }
    }
}
