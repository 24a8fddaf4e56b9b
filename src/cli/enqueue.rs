//! `fallback-worker enqueue FILE.jsonl --out OUT.jsonl`: publish every line as a job (with
//! confirms), collect the results from a durable reply queue of its own, write them as they come.
//!
//! The reply queue's name derives from the output path, so a run that is interrupted and started
//! again reads the results that arrived meanwhile; lines already in the output are not sent again.
//!
//! A run always ends. Lines a worker would refuse and that can be known here (invalid, unknown
//! chain, over `amqp.max_message_bytes`) are never published; results are matched to their lines
//! by `correlation_id` alone (which the worker copies even onto results that carry no
//! `custom_id`, and which nobody who did not see the job can forge: [`super::correlation`]); and
//! when no result has come for the idle timeout, the run ends with exit 3 and lists the lines
//! still without one, instead of waiting for results that may never come (a job purged from the
//! queue, dropped by a broker policy, or answered somewhere else).

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backlog::{Line, Progress, conclude, open_backlog};
use super::correlation::CorrelationKey;
use crate::broker::{self, QueueRole, Topology};
use crate::config::{AmqpConfig, BrokerUrls, Config};
use crate::job::{ErrorCode, JobResult, Routing};
use crate::worker::{error_result, worker_id};

/// Added to the longest `max_wait` of the lines to make the default idle timeout: a job may first
/// queue behind others' and a worker may restart in between. Generous on purpose: the contract
/// says `enqueue` waits for all results, so giving up early must be rare.
pub const IDLE_MARGIN: Duration = Duration::from_secs(30 * 60);

/// How long a broker connection may take to open on one node (lapin's own connect has no
/// deadline); with several node URLs, each gets this long in turn.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the goodbyes at the end (deleting the empty reply queue, closing) may take: the
/// results are written by then, so a broker that does not answer must not hold the run.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many of the lines still without a result the idle timeout names (the rest are counted).
const LIST_UNANSWERED: usize = 20;

pub struct EnqueueOptions<'a> {
    /// The config file, named in errors about its settings.
    pub config: &'a Path,
    pub input: &'a Path,
    pub out: &'a Path,
    pub errors: Option<&'a Path>,
    /// End the run when no result has arrived for this long; `None` takes the default,
    /// [`default_idle_timeout`].
    pub idle_timeout: Option<Duration>,
}

/// The reply queue for an output file: the same on every run for the same file.
pub fn reply_queue_for(out: &Path) -> String {
    let absolute = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let digest = Sha256::digest(absolute.to_string_lossy().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("fallback.enqueue.{hex}")
}

/// The default idle timeout: the longest `max_wait` among the lines to do (a job's own, else its
/// chain's) plus [`IDLE_MARGIN`]. A job waiting for its providers is answered `deadline_exceeded`
/// once its `max_wait` is over, so a silence much longer than that means a result is not coming.
pub fn default_idle_timeout(lines: &[Line], config: &Config) -> Duration {
    let longest = lines
        .iter()
        .map(|line| line.job.max_wait.or_else(|| config.chains.get(&line.job.chain).map(|c| c.max_wait)))
        .max()
        .flatten()
        .unwrap_or_default();
    longest.saturating_add(IDLE_MARGIN)
}

/// Why a worker would refuse `reply_queue` as a `reply_to` under this config (the same rules as
/// the worker's, contract §4), if it would: its error results would then go to the results queue,
/// where this run would never see them.
pub fn reply_queue_refusal(amqp: &AmqpConfig, reply_queue: &str) -> Option<String> {
    if reply_queue.starts_with(&amqp.jobs_queue) {
        return Some(format!(
            "amqp.jobs_queue `{}` is a prefix of enqueue's reply queue `{reply_queue}`, which workers would refuse as a reply_to",
            amqp.jobs_queue
        ));
    }
    let allowed = amqp.reply_to_allow.iter().any(|p| glob::Pattern::new(p).is_ok_and(|p| p.matches(reply_queue)));
    (!allowed).then(|| {
        format!(
            "amqp.reply_to_allow matches no `fallback.enqueue.*` name: workers would refuse enqueue's reply queue `{reply_queue}`; add \"fallback.enqueue.*\""
        )
    })
}

/// The lines published and not answered yet, keyed by the `correlation_id` each was published
/// with.
///
/// The correlation id is the only key: the worker copies it onto every result, including an
/// `invalid_request` for a message it refused before reading (too large, not JSON), which has no
/// `custom_id`; and nobody who did not see the job can forge it. A result's own `custom_id` is
/// never trusted: anyone who may publish into the reply queue could name any line with it.
pub struct Awaited {
    /// `correlation_id` → the line's `custom_id` and number.
    lines: HashMap<String, (String, usize)>,
    /// `routing.worker` of a result this run writes itself (one it could not read).
    writer: String,
}

impl Awaited {
    pub fn new(lines: &[Line], key: &CorrelationKey) -> Awaited {
        Awaited {
            lines: lines
                .iter()
                .map(|l| (key.correlation_id(&l.job.custom_id), (l.job.custom_id.clone(), l.number)))
                .collect(),
            writer: format!("enqueue:{}", worker_id()),
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The result for one of the awaited lines, taken off the list, with that line's `custom_id`;
    /// `None` for a message that answers no awaited line (a duplicate, a stray from an earlier
    /// run into the same output, a forgery). A body that is not a result but bears an awaited
    /// line's correlation id becomes that line's `internal_error` result: the line was answered,
    /// with something unreadable, and waiting longer would not bring another answer.
    pub fn claim(&mut self, correlation_id: Option<&str>, body: &[u8]) -> Option<JobResult> {
        let (custom_id, _) = self.lines.remove(correlation_id?)?;
        Some(match serde_json::from_slice::<JobResult>(body) {
            Ok(mut result) => {
                result.custom_id = Some(custom_id);
                result
            }
            Err(e) => {
                let message = format!("the result a worker sent for this line is not a result line: {e}");
                error_result(Some(custom_id), ErrorCode::InternalError, message, self.routing())
            }
        })
    }

    /// The lines still without a result, in input order: (line number, `custom_id`).
    pub fn unanswered(&self) -> Vec<(usize, &str)> {
        let mut lines: Vec<(usize, &str)> = self.lines.values().map(|(id, n)| (*n, id.as_str())).collect();
        lines.sort_unstable();
        lines
    }

    fn routing(&self) -> Routing {
        Routing {
            chain: None,
            provider: None,
            model: None,
            free: None,
            attempts: Vec::new(),
            rejected: false,
            worker: self.writer.clone(),
            queued_ms: 0,
            total_ms: 0,
        }
    }
}

pub async fn run(
    config: &Config,
    options: EnqueueOptions<'_>,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let chains = config.chains.keys().cloned().collect();
    let limit = Some(config.amqp.max_message_bytes);
    let (mut output, backlog) =
        open_backlog(&shutdown, options.out, options.errors, options.input, chains, limit).await?;
    let reply_queue = reply_queue_for(options.out);
    if let Some(refusal) = reply_queue_refusal(&config.amqp, &reply_queue) {
        eprintln!("error: {}: {refusal}", options.config.display());
        return Ok(ExitCode::from(2));
    }
    let idle_timeout = options.idle_timeout.unwrap_or_else(|| default_idle_timeout(&backlog.pending, config));
    let (key, created) = CorrelationKey::load_or_create(options.out)?;
    if created && !output.done().is_empty() {
        // An earlier run wrote this output without a key (an older version, or the key file
        // was deleted): what it left in the reply queue cannot be told from a forgery.
        eprintln!(
            "note: a new key for {}: results an earlier run left in `{reply_queue}` are not recognised \
             and are dropped; their lines are published again (a worker answers a copy of an answered \
             job from its ledger)",
            options.out.display()
        );
    }
    let conn = connect(&config.amqp.url, "fallback-worker enqueue").await?;
    wait_for_jobs_queue(&conn, &config.amqp.jobs_queue, &shutdown).await?;
    // With `queue_type = "quorum"` the reply queue is a quorum queue too (contract §4: every
    // queue the service declares), so the results survive the node that held them; one left
    // by an earlier run of the other type is used as it is.
    let reply_args = Topology::from_config(&config.amqp, &config.worker).arguments(QueueRole::Reply);
    broker::declare_or_accept(&conn, &reply_queue, reply_args).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(256, BasicQosOptions::default()).await?;
    let mut results = channel
        .basic_consume(reply_queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;

    let mut awaited = Awaited::new(&backlog.pending, &key);
    let total = awaited.len();
    let publisher = tokio::spawn(publish_all(
        config.amqp.url.clone(),
        config.amqp.jobs_queue.clone(),
        reply_queue.clone(),
        backlog.pending.iter().map(|l| (key.correlation_id(&l.job.custom_id), l.raw.clone())).collect(),
    ));
    let mut progress = Progress::new(total);
    let mut publisher = Some(publisher);
    // Restarted by every sign of progress: the jobs all published, a result for one of them.
    let mut idle_deadline = deadline_after(idle_timeout);
    while !awaited.is_empty() {
        tokio::select! {
            () = shutdown.cancelled() => {
                progress.finish();
                eprintln!("interrupted: {} of {total} results written; run the same command again to resume", total - awaited.len());
                return Ok(ExitCode::from(1));
            }
            published = async { publisher.as_mut().expect("polled only while running").await }, if publisher.is_some() => {
                publisher = None;
                published.context("the publisher stopped")??;
                idle_deadline = deadline_after(idle_timeout);
            }
            () = tokio::time::sleep_until(idle_deadline) => {
                progress.finish();
                report_unanswered(options.input, &awaited, idle_timeout, &reply_queue);
                // The reply queue stays: results that come later are read by the next run.
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.close(200, "idle".into())).await;
                return Ok(conclude(&backlog, &output, awaited.len()));
            }
            delivery = results.next() => {
                let delivery = delivery.context("the reply queue's consumer ended")??;
                let correlation_id = delivery.properties.correlation_id().as_ref().map(|id| id.as_str());
                if let Some(result) = awaited.claim(correlation_id, &delivery.data) {
                    output.write(&result)?;
                    idle_deadline = deadline_after(idle_timeout);
                }
                delivery.ack(BasicAckOptions::default()).await?;
                progress.update(total - awaited.len(), output.failed);
            }
        }
    }
    progress.finish();
    let delete =
        channel.queue_delete(reply_queue.as_str().into(), QueueDeleteOptions { if_empty: true, ..Default::default() });
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, delete).await;
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, conn.close(200, "done".into())).await;
    Ok(conclude(&backlog, &output, 0))
}

/// `wait` from now; a wait too long to represent (a job's `max_wait` is the sender's to choose)
/// is as good as never, not a panic.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Names the lines the run gave up on, and what to do about them.
fn report_unanswered(input: &Path, awaited: &Awaited, idle_timeout: Duration, reply_queue: &str) {
    let unanswered = awaited.unanswered();
    eprintln!(
        "no result for {} line(s) after {} without one (--idle-timeout):",
        unanswered.len(),
        humantime::format_duration(idle_timeout)
    );
    for (number, custom_id) in unanswered.iter().take(LIST_UNANSWERED) {
        eprintln!("{}:{number}: no result for custom_id \"{custom_id}\"", input.display());
    }
    if unanswered.len() > LIST_UNANSWERED {
        eprintln!("… and {} more", unanswered.len() - LIST_UNANSWERED);
    }
    eprintln!(
        "is a worker running on this jobs queue? Results that arrive later wait in `{reply_queue}`: \
         run the same command again to collect them (it publishes the lines still missing again; \
         a worker answers a copy of an answered job from its ledger)"
    );
}

/// Opens a broker connection to the first node of `urls` that takes one, each tried for at most
/// [`CONNECT_TIMEOUT`].
async fn connect(urls: &BrokerUrls, name: &str) -> anyhow::Result<lapin::Connection> {
    broker::connect_any(urls, name, CONNECT_TIMEOUT).await.map_err(anyhow::Error::msg)
}

/// Workers declare the jobs queue; waits (up to two minutes) for one to have done so, rather
/// than publish into nothing.
async fn wait_for_jobs_queue(
    conn: &lapin::Connection,
    jobs_queue: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut told = false;
    loop {
        // A passive declare of a missing queue closes its channel: probe on a fresh one.
        let channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        if channel.queue_declare(jobs_queue.into(), passive, FieldTable::default()).await.is_ok() {
            let _ = channel.close(200, "probed".into()).await;
            return Ok(());
        }
        if !told {
            eprintln!("waiting for a worker to declare the jobs queue `{jobs_queue}`…");
            told = true;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the jobs queue `{jobs_queue}` does not exist: start a worker first");
        }
        tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("interrupted while waiting for the jobs queue"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Publishes every job (its correlation id, its line) with confirms (pipelined in batches) on a
/// connection of its own.
async fn publish_all(
    urls: BrokerUrls,
    jobs_queue: String,
    reply_queue: String,
    lines: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let conn = connect(&urls, "fallback-worker enqueue (publish)").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    for chunk in lines.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (correlation_id, raw) in chunk {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_reply_to(reply_queue.as_str().into())
                .with_correlation_id(correlation_id.as_str().into());
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            confirms.push(
                channel
                    .basic_publish("".into(), jobs_queue.as_str().into(), options, raw.as_bytes(), properties)
                    .await?,
            );
        }
        for confirm in confirms {
            match tokio::time::timeout(Duration::from_secs(60), confirm)
                .await
                .context("the broker did not confirm a job")??
            {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    anyhow::bail!("the jobs queue `{jobs_queue}` does not exist: start a worker first")
                }
                Confirmation::Nack(_) => anyhow::bail!("the broker refused a job"),
            }
        }
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnvOverrides;
    use crate::job::Job;

    fn line(number: usize, custom_id: &str, extra: &str) -> Line {
        let raw =
            format!(r#"{{"custom_id":"{custom_id}","body":{{"messages":[{{"role":"user","content":"x"}}]}}{extra}}}"#);
        Line { number, job: Job::parse(raw.as_bytes()).unwrap(), raw }
    }

    fn awaited(ids: &[&str]) -> (Awaited, CorrelationKey) {
        let lines: Vec<Line> = ids.iter().enumerate().map(|(i, id)| line(i + 1, id, "")).collect();
        let key = CorrelationKey::random();
        (Awaited::new(&lines, &key), key)
    }

    fn result_body(custom_id: Option<&str>, code: Option<ErrorCode>) -> Vec<u8> {
        let error = code.map(|code| crate::job::ErrorEnvelope { code, message: "m".into() });
        let result = JobResult {
            id: JobResult::new_id(),
            custom_id: custom_id.map(str::to_string),
            response: None,
            error,
            routing: Awaited::new(&[], &CorrelationKey::random()).routing(),
        };
        serde_json::to_vec(&result).unwrap()
    }

    #[test]
    fn a_poison_result_without_custom_id_is_claimed_by_its_correlation_id() {
        let (mut awaited, key) = awaited(&["a", "big"]);
        let body = result_body(None, Some(ErrorCode::InvalidRequest));
        let result = awaited.claim(Some(&key.correlation_id("big")), &body).expect("the line is matched");
        assert_eq!(result.custom_id.as_deref(), Some("big"), "the custom_id is filled in");
        assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::InvalidRequest), "the worker's verdict is kept");
        assert_eq!(awaited.unanswered(), vec![(1, "a")]);
    }

    #[test]
    fn a_result_that_names_a_line_only_by_what_a_stranger_can_guess_is_not_claimed() {
        let (mut awaited, key) = awaited(&["a", "b"]);
        let forged = result_body(Some("a"), None);
        assert!(awaited.claim(None, &forged).is_none(), "a custom_id alone answers nothing");
        assert!(awaited.claim(Some("a"), &forged).is_none(), "nor the custom_id as correlation id");
        let other_run = CorrelationKey::random();
        assert!(awaited.claim(Some(&other_run.correlation_id("a")), &forged).is_none(), "nor another key's id");
        assert_eq!(awaited.unanswered(), vec![(1, "a"), (2, "b")], "both lines still wait for their answers");
        assert!(awaited.claim(Some(&key.correlation_id("a")), &forged).is_some(), "the genuine id answers");
    }

    #[test]
    fn a_result_is_written_as_the_line_its_correlation_id_names() {
        let (mut awaited, key) = awaited(&["a", "b"]);
        let claimed = awaited.claim(Some(&key.correlation_id("a")), &result_body(Some("b"), None)).unwrap();
        assert_eq!(claimed.custom_id.as_deref(), Some("a"), "its own custom_id is not believed");
        assert_eq!(awaited.unanswered(), vec![(2, "b")]);
    }

    #[test]
    fn duplicates_and_strays_are_not_claimed() {
        let (mut awaited, key) = awaited(&["a"]);
        let a = key.correlation_id("a");
        assert!(awaited.claim(Some(&a), &result_body(Some("a"), None)).is_some());
        assert!(awaited.claim(Some(&a), &result_body(Some("a"), None)).is_none(), "a second copy is dropped");
        assert!(awaited.claim(Some(&key.correlation_id("z")), &result_body(Some("z"), None)).is_none());
        assert!(awaited.claim(None, &result_body(None, Some(ErrorCode::InvalidRequest))).is_none());
        assert!(awaited.claim(Some("z"), b"not json").is_none());
    }

    #[test]
    fn an_unreadable_result_for_an_awaited_line_ends_that_line() {
        let (mut awaited, key) = awaited(&["a", "b"]);
        let result = awaited.claim(Some(&key.correlation_id("b")), b"{\"truncated\":").expect("answered, unreadably");
        assert_eq!(result.custom_id.as_deref(), Some("b"));
        assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::InternalError));
        assert!(!result.routing.worker.is_empty());
        assert_eq!(awaited.len(), 1);
    }

    #[test]
    fn unanswered_lines_are_listed_in_input_order() {
        let lines = vec![line(9, "late", ""), line(2, "early", ""), line(5, "middle", "")];
        let awaited = Awaited::new(&lines, &CorrelationKey::random());
        assert_eq!(awaited.unanswered(), vec![(2, "early"), (5, "middle"), (9, "late")]);
    }

    proptest::proptest! {
        #[test]
        fn no_message_without_a_genuine_correlation_id_is_claimed(
            correlation_id in proptest::option::of(".{0,80}"),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let (mut awaited, _) = awaited(&["a", "b", "req-1"]);
            proptest::prop_assert!(awaited.claim(correlation_id.as_deref(), &body).is_none());
            proptest::prop_assert!(awaited.claim(correlation_id.as_deref(), &result_body(Some("a"), None)).is_none());
            proptest::prop_assert_eq!(awaited.len(), 3);
        }
    }

    fn config(amqp: &str) -> Config {
        let text = format!(
            "[amqp]\n{amqp}\n[[providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n\n\
             [chains.default]\nproviders = [\"p\"]\n\n[chains.slow]\nproviders = [\"p\"]\nmax_wait = \"3h\"\n"
        );
        Config::parse(&text, Path::new("test.toml"), &EnvOverrides::default()).unwrap()
    }

    #[test]
    fn the_default_idle_timeout_outlasts_the_longest_max_wait() {
        let config = config("");
        let default_chain = [line(1, "a", "")];
        assert_eq!(default_idle_timeout(&default_chain, &config), Duration::from_secs(600) + IDLE_MARGIN);
        let mixed = [line(1, "a", ""), line(2, "b", r#","chain":"slow""#), line(3, "c", r#","max_wait":"1h""#)];
        assert_eq!(default_idle_timeout(&mixed, &config), Duration::from_secs(3 * 3600) + IDLE_MARGIN);
        let own = [line(1, "a", r#","chain":"slow","max_wait":"5h""#)];
        assert_eq!(default_idle_timeout(&own, &config), Duration::from_secs(5 * 3600) + IDLE_MARGIN);
        assert_eq!(default_idle_timeout(&[], &config), IDLE_MARGIN);
    }

    #[test]
    fn an_idle_timeout_too_long_to_represent_is_far_off_not_a_panic() {
        assert!(deadline_after(Duration::MAX) > Instant::now() + Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn a_reply_queue_the_workers_would_refuse_is_caught_before_publishing() {
        let queue = reply_queue_for(Path::new("out.jsonl"));
        assert_eq!(reply_queue_refusal(&config("").amqp, &queue), None, "the default allows every name");
        let allowed = config(r#"reply_to_allow = ["app.*", "fallback.enqueue.*"]"#);
        assert_eq!(reply_queue_refusal(&allowed.amqp, &queue), None);
        let narrow = config(r#"reply_to_allow = ["app.*"]"#);
        assert!(reply_queue_refusal(&narrow.amqp, &queue).is_some_and(|m| m.contains("reply_to_allow")));
        let prefix = config(r#"jobs_queue = "fallback""#);
        assert!(reply_queue_refusal(&prefix.amqp, &queue).is_some_and(|m| m.contains("jobs_queue")));
    }
}
