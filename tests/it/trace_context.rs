//! Traces across the queue, end to end: a worker process exporting to an OTLP receiver that
//! runs in the test. The exporter is global per process, hence a process per test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::post;
use fallback_worker::mock::{MockOptions, MockProvider, Profile, RetryHint, Scenario};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support::*;

/// What the test publisher's own span would be: the job's parent.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN_ID: &str = "00f067aa0ba902b7";

/// A span as received, with the resource's service name.
#[derive(Debug, Clone)]
struct Received {
    service: Option<String>,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attribute(&self, key: &str) -> Option<Value> {
        self.span.attributes.iter().find(|kv| kv.key == key)?.value.clone()?.value
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP trace receiver on 127.0.0.1: `POST /v1/traces` with a protobuf body.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Received>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { endpoint, spans, _server: server }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until a span matches `wanted`, and returns it.
    async fn span(&self, what: &str, wanted: impl Fn(&Received) -> bool) -> Received {
        eventually(what, || async { self.spans().iter().any(&wanted) }).await;
        self.spans().into_iter().find(wanted).unwrap()
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let protobuf = [(header::CONTENT_TYPE, "application/x-protobuf")];
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, protobuf, Vec::new());
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans.resource.as_ref().and_then(|resource| {
            resource.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| {
                match kv.value.clone()?.value? {
                    Value::StringValue(name) => Some(name),
                    _ => None,
                }
            })
        });
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Received { service: service.clone(), span });
            }
        }
    }
    (StatusCode::OK, protobuf, ExportTraceServiceResponse::default().encode_to_vec())
}

/// A worker process exporting to `receiver`, with batches sent every `schedule_delay`.
fn exporting_worker(config: &std::path::Path, receiver: &Receiver, schedule_delay: Duration) -> WorkerProcess {
    let delay = schedule_delay.as_millis().to_string();
    WorkerProcess::spawn_with_env(
        config,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", delay.as_str())],
    )
}

fn traced_job(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), AMQPValue::LongString(traceparent.into()));
    headers.insert("tracestate".into(), AMQPValue::LongString("congo=t61rcWkgMzE".into()));
    BasicProperties::default().with_headers(headers)
}

/// The (trace id, span id) of a W3C `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent `{traceparent}`");
    (parts[1].to_string(), parts[2].to_string())
}

/// Names of the threads of process `pid`, as the kernel shortens them (15 bytes).
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[tokio::test]
async fn a_jobs_traceparent_continues_through_its_provider_calls_and_back_on_the_result() {
    let env = TestEnv::new().await;
    let receiver = Receiver::start().await;
    let limited = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    limited.script([Scenario::RateLimited(RetryHint::RetryAfterSeconds(60.0))]);
    let answering = MockProvider::start(MockOptions::new(Profile::Cerebras)).await.unwrap();
    let config = env.config_file(
        &format!(
            "{}{}{}",
            provider("limited", &limited.base_url(), true, ""),
            provider("answering", &answering.base_url(), true, ""),
            chain("default", &["limited", "answering"], "")
        ),
        "",
    );
    let worker = exporting_worker(&config, &receiver, Duration::from_millis(100));
    env.wait_for_queues().await;
    assert!(
        thread_names(worker.child.id()).iter().any(|name| name.starts_with("OpenTelemetry")),
        "the batch exporter runs: {:?}",
        thread_names(worker.child.id())
    );

    env.publish(&job("traced"), traced_job(&format!("00-{TRACE_ID}-{PUBLISHER_SPAN_ID}-01"))).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    let traceparent = header(&properties, "traceparent").expect("the result carries the trace context");
    let (result_trace, job_span_id) = ids(&traceparent);
    assert_eq!(result_trace, TRACE_ID, "same trace as the job");
    assert_ne!(job_span_id, PUBLISHER_SPAN_ID, "the job span's own id, not its parent's");
    assert_eq!(header(&properties, "tracestate").as_deref(), Some("congo=t61rcWkgMzE"), "tracestate goes along");

    let job_span =
        receiver.span("the job span is exported", |s| s.span.name == "job" && s.trace_id() == TRACE_ID).await;
    assert_eq!(job_span.parent_span_id(), PUBLISHER_SPAN_ID, "the publisher's span is the job span's parent");
    assert_eq!(job_span.span_id(), job_span_id, "the result's traceparent names the job span");
    assert_eq!(job_span.service.as_deref(), Some("fallback-worker"));
    assert_eq!(job_span.attribute("custom_id"), Some(Value::StringValue("traced".into())));

    let calls = |provider: &'static str| {
        let job_span_id = job_span_id.clone();
        move |s: &Received| {
            s.span.name == "provider_call"
                && s.parent_span_id() == job_span_id
                && s.attribute("provider") == Some(Value::StringValue(provider.into()))
        }
    };
    let first = receiver.span("the rate-limited call's span", calls("limited")).await;
    assert_eq!(first.trace_id(), TRACE_ID);
    assert_eq!(first.attribute("status"), Some(Value::IntValue(429)));
    assert_eq!(first.attribute("outcome"), Some(Value::StringValue("rate_limited".into())));
    let second = receiver.span("the answering call's span", calls("answering")).await;
    assert_eq!(second.attribute("status"), Some(Value::IntValue(200)));
    assert_eq!(second.attribute("outcome"), Some(Value::StringValue("ok".into())));
    assert!(first.span.end_time_unix_nano <= second.span.start_time_unix_nano, "one attempt after the other");

    // A malformed traceparent is ignored: the job is served in a trace of its own.
    let garbage = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz";
    env.publish(&job("untraced"), traced_job(garbage)).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success(), "{result:?}");
    let (fresh_trace, fresh_span) = ids(&header(&properties, "traceparent").expect("a trace of its own"));
    assert_ne!(fresh_trace, TRACE_ID);
    let root = receiver.span("the job's own root span", |s| s.span.name == "job" && s.trace_id() == fresh_trace).await;
    assert_eq!(root.span_id(), fresh_span);
    assert!(root.span.parent_span_id.is_empty(), "a root: {:?}", root.parent_span_id());
}

#[tokio::test]
async fn spans_still_queued_at_sigterm_are_exported_before_the_process_exits() {
    let env = TestEnv::new().await;
    let receiver = Receiver::start().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config =
        env.config_file(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")), "");
    // No batch would leave on its own during the test: only the flush at exit sends them.
    let mut worker = exporting_worker(&config, &receiver, Duration::from_secs(600));
    env.wait_for_queues().await;
    env.publish(&job("last"), traced_job(&format!("00-{TRACE_ID}-{PUBLISHER_SPAN_ID}-01"))).await;
    assert!(env.next_result(&env.results).await.0.is_success());
    assert!(receiver.spans().is_empty(), "nothing exported before the schedule delay");

    worker.signal("TERM");
    assert!(worker.wait().await.success());
    let spans = receiver.spans();
    assert!(spans.iter().any(|s| s.span.name == "job" && s.trace_id() == TRACE_ID), "{spans:?}");
    assert!(spans.iter().any(|s| s.span.name == "provider_call" && s.trace_id() == TRACE_ID), "{spans:?}");
}

#[tokio::test]
async fn without_an_otlp_endpoint_nothing_is_exported_or_written() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config =
        env.config_file(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")), "");
    let worker = WorkerProcess::spawn(&config);
    env.wait_for_queues().await;
    let threads = thread_names(worker.child.id());
    assert!(!threads.iter().any(|name| name.starts_with("OpenTelemetry")), "no exporter thread: {threads:?}");
    env.publish(&job("plain"), traced_job(&format!("00-{TRACE_ID}-{PUBLISHER_SPAN_ID}-01"))).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success());
    assert_eq!(header(&properties, "traceparent"), None, "no trace context without export");
}
