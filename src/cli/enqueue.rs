//! `fallback-worker enqueue FILE.jsonl --out OUT.jsonl`: publish every line as a job (with
//! confirms), collect the results from a durable reply queue of its own, write them as they come.
//!
//! The reply queue's name derives from the output path, so a run that is interrupted and started
//! again reads the results that arrived meanwhile; lines already in the output are not sent again.

use std::collections::HashSet;
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
use tokio_util::sync::CancellationToken;

use super::backlog::{Output, Progress, conclude, read_input};
use crate::broker;
use crate::config::Config;
use crate::job::JobResult;

pub struct EnqueueOptions<'a> {
    pub input: &'a Path,
    pub out: &'a Path,
    pub errors: Option<&'a Path>,
}

/// The reply queue for an output file: the same on every run for the same file.
pub fn reply_queue_for(out: &Path) -> String {
    let absolute = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let digest = Sha256::digest(absolute.to_string_lossy().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("fallback.enqueue.{hex}")
}

pub async fn run(
    config: &Config,
    options: EnqueueOptions<'_>,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let mut output = Output::open(options.out, options.errors)?;
    let chains = config.chains.keys().cloned().collect();
    let backlog = read_input(options.input, output.done(), &chains, Some(config.amqp.max_message_bytes))?;
    let reply_queue = reply_queue_for(options.out);
    let conn = broker::connect(&config.amqp.url, "fallback-worker enqueue").await.map_err(anyhow::Error::msg)?;
    wait_for_jobs_queue(&conn, &config.amqp.jobs_queue, &shutdown).await?;
    let channel = conn.create_channel().await?;
    channel.queue_declare(reply_queue.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
    channel.basic_qos(256, BasicQosOptions::default()).await?;
    let mut results = channel
        .basic_consume(reply_queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;

    let mut waiting: HashSet<String> = backlog.pending.iter().map(|l| l.job.custom_id.clone()).collect();
    let total = waiting.len();
    let publisher = tokio::spawn(publish_all(
        config.amqp.url.clone(),
        config.amqp.jobs_queue.clone(),
        reply_queue.clone(),
        backlog.pending.iter().map(|l| (l.job.custom_id.clone(), l.raw.clone())).collect(),
    ));
    let mut progress = Progress::new(total);
    let mut publisher = Some(publisher);
    while !waiting.is_empty() {
        tokio::select! {
            () = shutdown.cancelled() => {
                progress.finish();
                eprintln!("interrupted: {} of {total} results written; run the same command again to resume", total - waiting.len());
                return Ok(ExitCode::from(1));
            }
            published = async { publisher.as_mut().expect("polled only while running").await }, if publisher.is_some() => {
                publisher = None;
                published.context("the publisher stopped")??;
            }
            delivery = results.next() => {
                let delivery = delivery.context("the reply queue's consumer ended")??;
                if let Ok(result) = serde_json::from_slice::<JobResult>(&delivery.data) {
                    let id = result.custom_id.clone().unwrap_or_default();
                    if waiting.remove(&id) {
                        output.write(&result)?;
                    }
                }
                delivery.ack(BasicAckOptions::default()).await?;
                progress.update(total - waiting.len(), output.failed);
            }
        }
    }
    progress.finish();
    let _ = channel
        .queue_delete(reply_queue.as_str().into(), QueueDeleteOptions { if_empty: true, ..Default::default() })
        .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(conclude(&backlog, &output))
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

/// Publishes every job with confirms (pipelined in batches) on a connection of its own.
async fn publish_all(
    url: String,
    jobs_queue: String,
    reply_queue: String,
    lines: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let conn = broker::connect(&url, "fallback-worker enqueue (publish)").await.map_err(anyhow::Error::msg)?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    for chunk in lines.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (custom_id, raw) in chunk {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_reply_to(reply_queue.as_str().into())
                .with_correlation_id(custom_id.as_str().into());
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
