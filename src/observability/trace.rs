//! Distributed tracing across the queue: the W3C trace context (`traceparent`, `tracestate`)
//! travels in AMQP message headers, in both directions.
//!
//! - In: a job whose headers carry a `traceparent` continues that trace: the worker's `job`
//!   span becomes a child of the publisher's span ([`continue_trace`]).
//! - Out: every message the worker publishes while handling a job (its result, a parked or
//!   retried copy, a dead-letter copy) carries the `traceparent` of the job's span
//!   ([`with_trace_context`]), so the caller's consumer and the job's next delivery stay in the
//!   same trace.
//! - Each provider call is a child span of the job (`provider_call`, with the provider's name,
//!   the HTTP status and the attempt's outcome: [`Traced`]).
//!
//! All of this only means something when spans are exported (`telemetry` installs the
//! OpenTelemetry layer when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Without it the spans have no
//! OpenTelemetry context: nothing is read from the headers' trace context and nothing is written.
//!
//! The headers come from whoever can publish to the queue, so they are hostile input: a value
//! that is not exactly a W3C `traceparent` is ignored (the job starts a trace of its own), an
//! over-long `tracestate` is dropped, and nothing here can panic or change how the job is
//! served (contract §2: headers never do).

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::job::ChatBody;
use crate::providers::{ChatProvider, Completion, Failure};
use crate::routing::AttemptOutcome;

/// The W3C header that names the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendors' trace state; only read along with a valid `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// A `tracestate` longer than this is dropped whole (W3C asks propagators to carry at least 512
/// characters; 32 members of the longest legal size are far longer, and nobody sends that).
const MAX_TRACESTATE_BYTES: usize = 1024;

/// The trace context a job's headers carry, or `None` when they carry none or a malformed one.
pub fn parent_from(headers: &FieldTable) -> Option<Context> {
    let carrier = HeaderCarrier::read(headers)?;
    let context = TraceContextPropagator::new().extract(&carrier);
    let valid = context.span().span_context().is_valid();
    valid.then_some(context)
}

/// Makes `span` (a job's span, not yet entered) a child of the trace in `headers`, if any.
pub fn continue_trace(span: &tracing::Span, headers: &FieldTable) {
    if let Some(parent) = parent_from(headers) {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// The trace-context header entries for `span`: empty when it has no OpenTelemetry context
/// (spans are not exported).
pub fn inject(span: &tracing::Span) -> Vec<(ShortString, AMQPValue)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut entries = Entries::default();
    TraceContextPropagator::new().inject_context(&context, &mut entries);
    entries.0
}

/// `properties` with the current span's trace context in their headers, replacing any the
/// message had (a copy of a job carries the worker's span, not the publisher's).
pub fn with_trace_context(properties: BasicProperties) -> BasicProperties {
    let entries = inject(&tracing::Span::current());
    if entries.is_empty() {
        return properties;
    }
    let mut table = properties.headers().as_ref().map(|headers| headers.inner().clone()).unwrap_or_default();
    // The new `traceparent` replaces the old one; a `tracestate` is only written when non-empty.
    table.remove(TRACESTATE);
    table.extend(entries);
    properties.with_headers(FieldTable::from(table))
}

/// Reads the two W3C headers from an AMQP table, accepting only text values of sane size.
struct HeaderCarrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl<'a> HeaderCarrier<'a> {
    fn read(headers: &'a FieldTable) -> Option<HeaderCarrier<'a>> {
        let text = |name: &str| match headers.inner().get(name)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        };
        let traceparent = text(TRACEPARENT).filter(|value| well_formed_traceparent(value))?;
        let tracestate = text(TRACESTATE).filter(|value| value.len() <= MAX_TRACESTATE_BYTES);
        Some(HeaderCarrier { traceparent, tracestate })
    }
}

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent),
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = vec![TRACEPARENT];
        keys.extend(self.tracestate.map(|_| TRACESTATE));
        keys
    }
}

/// The W3C `traceparent` grammar, checked before any parser sees the value:
/// `version-traceid-parentid-flags` in lowercase hex of 2, 32, 16 and 2 digits; version `ff` is
/// invalid; version `00` has nothing after the flags, a later version may have `-` and more
/// (which is ignored). An all-zero trace or span id is rejected by the propagator.
pub fn well_formed_traceparent(value: &str) -> bool {
    const LEN: usize = 55;
    let bytes = value.as_bytes();
    let Some(head) = bytes.get(..LEN) else { return false };
    let hex = |range: std::ops::Range<usize>| {
        head.get(range).is_some_and(|part| part.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)))
    };
    let dashes = [2, 35, 52].iter().all(|&i| head.get(i) == Some(&b'-'));
    let version = head.get(..2);
    let tail_ok = match bytes.get(LEN) {
        None => true,
        Some(b'-') => version != Some(b"00"),
        Some(_) => false,
    };
    dashes && hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55) && version != Some(b"ff") && tail_ok
}

/// Collects the propagator's output as AMQP header entries.
#[derive(Default)]
struct Entries(Vec<(ShortString, AMQPValue)>);

impl Injector for Entries {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` for a trace without one: leave it out.
        if !value.is_empty() {
            self.0.push((key.into(), AMQPValue::LongString(value.into())));
        }
    }
}

/// A provider whose every call is a `provider_call` span, child of the job's span: the trace
/// shows which providers a job tried, how long each took, and what came of it. Wrapping the
/// provider keeps the chain engine free of tracing concerns.
pub struct Traced {
    /// The provider's configured name (the span's `provider` field).
    name: String,
    inner: Arc<dyn ChatProvider>,
}

/// Wraps `provider` so that each of its calls is a span.
pub fn traced(name: &str, provider: Arc<dyn ChatProvider>) -> Arc<dyn ChatProvider> {
    Arc::new(Traced { name: name.to_string(), inner: provider })
}

#[async_trait::async_trait]
impl ChatProvider for Traced {
    /// The wrapped provider's answer: a wrapper must not widen what a provider carries.
    fn can_carry(&self, body: &ChatBody) -> Result<(), String> {
        self.inner.can_carry(body)
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, Failure> {
        let span = tracing::info_span!(
            "provider_call",
            provider = %self.name,
            status = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
        );
        let result = self.inner.complete(body).instrument(span.clone()).await;
        let (status, outcome) = match &result {
            Ok(completion) => (Some(completion.status), AttemptOutcome::Ok),
            Err(failure) => (failure.status, AttemptOutcome::from(failure.kind)),
        };
        if let Some(status) = status {
            // As i64: tracing-opentelemetry exports unsigned fields as text.
            span.record("status", i64::from(status));
        }
        span.record("outcome", outcome.as_str());
        if outcome != AttemptOutcome::Ok {
            span.record("otel.status_code", "error");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    //! The header codec on its own; the spans' way through a worker and an OTLP receiver is
    //! `tests/it/trace_context.rs`.

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use proptest::prelude::*;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(text.into())
    }

    #[test]
    fn a_valid_traceparent_gives_its_trace_and_parent_span() {
        let table = headers(&[(TRACEPARENT, long(PARENT)), (TRACESTATE, long("congo=t61rcWkgMzE"))]);
        let context = parent_from(&table).expect("valid");
        let span = context.span();
        let parent = span.span_context();
        assert_eq!(parent.trace_id(), TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap());
        assert_eq!(parent.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(parent.is_sampled());
        assert!(parent.is_remote());
        assert_eq!(parent.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn a_short_string_header_is_read_too() {
        let table = headers(&[(TRACEPARENT, AMQPValue::ShortString(PARENT.into()))]);
        assert!(parent_from(&table).is_some());
    }

    #[test]
    fn a_later_version_with_more_fields_is_read_by_its_first_four() {
        let table = headers(&[(TRACEPARENT, long(&format!("01{}-what-comes-next", &PARENT[2..])))]);
        assert!(parent_from(&table).is_some());
    }

    #[test]
    fn malformed_values_are_ignored() {
        let cases = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ];
        for case in cases {
            assert!(parent_from(&headers(&[(TRACEPARENT, long(case))])).is_none(), "{case:?}");
        }
        let not_text =
            [AMQPValue::LongLongInt(7), AMQPValue::Boolean(true), AMQPValue::FieldTable(FieldTable::default())];
        for value in not_text {
            assert!(parent_from(&headers(&[(TRACEPARENT, value.clone())])).is_none(), "{value:?}");
        }
        let not_utf8 = AMQPValue::LongString(vec![0xff; 55].into());
        assert!(parent_from(&headers(&[(TRACEPARENT, not_utf8)])).is_none());
        assert!(parent_from(&headers(&[(TRACESTATE, long("a=b"))])).is_none(), "tracestate alone is nothing");
    }

    #[test]
    fn an_over_long_or_broken_tracestate_is_dropped_and_the_parent_kept() {
        for tracestate in ["x".repeat(MAX_TRACESTATE_BYTES + 1), "not a list member".into()] {
            let table = headers(&[(TRACEPARENT, long(PARENT)), (TRACESTATE, long(&tracestate))]);
            let context = parent_from(&table).expect("the traceparent alone is enough");
            assert_eq!(context.span().span_context().trace_state().header(), "");
        }
    }

    #[test]
    fn injecting_writes_the_w3c_form_of_a_context() {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("congo", "t61rcWkgMzE")]).unwrap(),
        );
        let context = Context::new().with_remote_span_context(span_context);
        let mut entries = Entries::default();
        TraceContextPropagator::new().inject_context(&context, &mut entries);
        let table = headers(&entries.0.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>());
        let round_trip = parent_from(&table).expect("what we write we can read");
        assert_eq!(round_trip.span().span_context().span_id(), SpanId::from_hex("b7ad6b7169203331").unwrap());
        assert_eq!(
            entries.0.first().map(|(k, v)| (k.as_str().to_string(), v.clone())),
            Some((TRACEPARENT.into(), long("00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01")))
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_written() {
        let span = tracing::info_span!("job");
        assert!(inject(&span).is_empty());
        let properties = with_trace_context(BasicProperties::default());
        assert!(properties.headers().is_none());
    }

    #[test]
    fn a_copy_keeps_its_headers_and_gets_the_current_spans_trace_context() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        // Spans get OpenTelemetry contexts, and go nowhere: no exporter.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job");
            continue_trace(&span, &headers(&[(TRACEPARENT, long(PARENT))]));
            let _entered = span.enter();
            let copy = headers(&[
                ("fallback-parked", long("{}")),
                (TRACEPARENT, long("00-11111111111111111111111111111111-2222222222222222-01")),
                (TRACESTATE, long("stale=1")),
            ]);
            let properties = with_trace_context(BasicProperties::default().with_headers(copy));
            let table = properties.headers().clone().unwrap_or_default();
            assert_eq!(table.inner().get("fallback-parked"), Some(&long("{}")), "the service's own headers stay");
            assert_eq!(table.inner().get(TRACESTATE), None, "the job's trace has no tracestate");
            let written = parent_from(&table).expect("a traceparent of the job span");
            let written = written.span().span_context().clone();
            assert_eq!(written.trace_id(), TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap());
            assert_eq!(written.span_id(), span.context().span().span_context().span_id());
            assert_ne!(
                written.span_id(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                "the job's span, not its parent"
            );
        });
    }

    /// Header values as a publisher could send them: near-misses of the grammar, random text,
    /// bytes that are not UTF-8, other AMQP types.
    fn header_value() -> impl Strategy<Value = AMQPValue> {
        let near_miss = (0usize..55, any::<char>()).prop_map(|(at, c)| {
            let mut text: Vec<char> = PARENT.chars().collect();
            if let Some(slot) = text.get_mut(at) {
                *slot = c;
            }
            text.into_iter().collect::<String>()
        });
        prop_oneof![
            near_miss.prop_map(|s| AMQPValue::LongString(s.into())),
            "[0-9a-f-]{0,80}".prop_map(|s| AMQPValue::LongString(s.into())),
            any::<String>().prop_map(|s| AMQPValue::LongString(s.into())),
            proptest::collection::vec(any::<u8>(), 0..120).prop_map(|b| AMQPValue::LongString(b.into())),
            "[ -~]{0,255}".prop_map(|s| AMQPValue::ShortString(s.into())),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
        ]
    }

    proptest! {
        /// Whatever the headers hold, reading them never panics, and anything accepted is a
        /// valid context whose `traceparent` was well formed.
        #[test]
        fn any_header_values_are_read_without_panic(
            traceparent in proptest::option::of(header_value()),
            tracestate in proptest::option::of(prop_oneof![
                header_value(),
                "([a-z0-9_*/@-]{1,20}=[!-+--<>-~]{0,20},?){0,40}".prop_map(|s| AMQPValue::LongString(s.into())),
            ]),
        ) {
            let mut pairs = Vec::new();
            pairs.extend(traceparent.clone().map(|v| (TRACEPARENT, v)));
            pairs.extend(tracestate.map(|v| (TRACESTATE, v)));
            if let Some(context) = parent_from(&headers(&pairs)) {
                prop_assert!(context.span().span_context().is_valid());
                let text = match traceparent {
                    Some(AMQPValue::LongString(s)) => s.to_string(),
                    Some(AMQPValue::ShortString(s)) => s.to_string(),
                    other => return Err(TestCaseError::fail(format!("accepted {other:?}"))),
                };
                prop_assert!(well_formed_traceparent(&text));
            }
        }

        /// Every well-formed `traceparent` with non-zero ids is accepted, with its ids.
        #[test]
        fn every_well_formed_traceparent_is_accepted(
            trace in "[0-9a-f]{32}",
            span in "[0-9a-f]{16}",
            flags in "[0-9a-f]{2}",
        ) {
            prop_assume!(trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0'));
            let value = format!("00-{trace}-{span}-{flags}");
            let context = parent_from(&headers(&[(TRACEPARENT, long(&value))]));
            let context = context.ok_or_else(|| TestCaseError::fail(format!("refused {value}")))?;
            let span_ref = context.span();
            let parent = span_ref.span_context();
            prop_assert_eq!(parent.trace_id().to_string(), trace);
            prop_assert_eq!(parent.span_id().to_string(), span);
        }
    }
}
