//! Logging and trace export, installed once by `main`.
//!
//! Logs: human-readable on a terminal, JSON lines otherwise (`LOG_FORMAT=json|text`
//! overrides); the level comes from `RUST_LOG` (default `info`).
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! the service's own spans (`job`, `provider_call`; see [`crate::observability::trace`]) are
//! exported with OTLP over HTTP/protobuf, in batches, from the SDK's own thread. When neither is
//! set (or `OTEL_SDK_DISABLED=true`) nothing is built: no exporter, no thread, no OpenTelemetry
//! layer, and the spans carry no trace context. The standard variables tune the rest:
//! `OTEL_SERVICE_NAME` (default `fallback-worker`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_TRACES_SAMPLER` (default: follow the parent's sampling
//! decision, sample new traces). `RUST_LOG` does not filter what is exported: the exported spans
//! are this crate's at `info`, whatever the log level.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The service name in exported traces unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "fallback-worker";

/// The most [`Telemetry::shutdown`] waits for the last spans to reach the collector: exit must
/// stay within the pod's termination grace period even when the collector is gone.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// What `init` installed that needs a word at exit.
#[must_use = "call shutdown() at exit, or the last batch of spans is lost"]
pub struct Telemetry {
    /// Present only while spans are exported.
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Exports the spans still queued (at most [`FLUSH_LIMIT`]) and stops the exporter. Call it
    /// outside the async runtime: the exporter's blocking HTTP client must not be dropped on it.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(e) = provider.shutdown_with_timeout(FLUSH_LIMIT)
        {
            tracing::warn!(error = %e, "the last spans may not have reached the trace collector");
        }
    }
}

/// lapin logs every message the broker returns (a result for a `reply_to` queue that does not
/// exist) at WARN with its whole body, as decimal bytes: an answer's content in the logs, six
/// times its size. The worker logs such a refusal itself; lapin's line stays out unless
/// `RUST_LOG` names its target.
const QUIET_TARGETS: &str = "lapin::returned_messages=error";

/// `RUST_LOG`'s filter (`info` without it, or when it does not parse), with [`QUIET_TARGETS`]
/// unless it names them itself.
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let asked = rust_log.filter(|spec| EnvFilter::try_new(spec).is_ok()).unwrap_or("info");
    if asked.contains("lapin::returned_messages") {
        return EnvFilter::new(asked);
    }
    EnvFilter::new(format!("{asked},{QUIET_TARGETS}"))
}

/// Installs the global subscriber (and the span exporter when configured); call once, from
/// `main`, before the async runtime starts.
pub fn init() -> Telemetry {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let json = match std::env::var("LOG_FORMAT").ok().as_deref() {
        Some("json") => true,
        Some("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json().flatten_event(true).with_current_span(true).with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let (tracer_provider, failure) = match otlp_endpoint() {
        Some(endpoint) => match tracer_provider() {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(format!("cannot export traces to `{endpoint}`: {e}"))),
        },
        None => (None, None),
    };
    // Only the service's own spans: the exporter's HTTP client and the SDK have spans and events
    // of their own, and exporting those would feed the exporter with itself.
    let spans = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO))
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    if let Some(failure) = failure {
        tracing::warn!("{failure}; spans are not exported");
    }
    Telemetry { tracer_provider }
}

/// The OTLP endpoint the environment names, if any (and unless the SDK is disabled).
fn otlp_endpoint() -> Option<String> {
    let set = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The OTLP/HTTP exporter behind a batch processor; the endpoint, headers, timeout and batch
/// settings come from the standard `OTEL_*` variables.
fn tracer_provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = SpanExporter::builder().with_http().build()?;
    let resource = match std::env::var("OTEL_SERVICE_NAME").ok().filter(|name| !name.is_empty()) {
        Some(_) => Resource::builder().build(),
        None => Resource::builder().with_service_name(SERVICE_NAME).build(),
    };
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with `log_filter(rust_log)` writes for a warning of `target`.
    fn written(rust_log: Option<&str>, target_is_lapins: bool) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_filter(log_filter(rust_log));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            if target_is_lapins {
                tracing::warn!(target: "lapin::returned_messages", "Server returned us a message");
            } else {
                tracing::warn!(target: "fallback_worker::broker", "a result was refused");
            }
        });
        String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lapins_copy_of_a_returned_message_stays_out_of_the_logs_unless_asked_for() {
        for rust_log in [None, Some("debug"), Some("warn,lapin=debug"), Some("not a [valid filter")] {
            assert_eq!(written(rust_log, true), "", "RUST_LOG={rust_log:?}");
            assert!(written(rust_log, false).contains("a result was refused"), "RUST_LOG={rust_log:?}");
        }
        assert!(written(Some("lapin::returned_messages=warn"), true).contains("returned us"));
    }
}
