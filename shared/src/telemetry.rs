//! Tracing setup for both binaries, and the trace context that travels with
//! jobs.
//!
//! Logs: `RUST_LOG` filters (default `info,sqlx=warn,sea_orm=warn,apalis=warn`) logs and exported spans alike;
//! `LABELSYNC_LOG_FORMAT=json` switches to JSON lines. Logs go to stderr so
//! the CLI's stdout stays machine-readable.
//!
//! OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans (through
//! `tracing-opentelemetry`) and the metrics of [`crate::metrics`] are also
//! exported over OTLP/HTTP (protobuf) to that collector (`/v1/traces`,
//! `/v1/metrics`); the SDK reads `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*` and `OTEL_METRIC_EXPORT_INTERVAL`
//! itself. Without it no OpenTelemetry span is made at all, so tracing costs
//! nothing extra.
//!
//! Trace context: a job pushed while a span is current carries that span's
//! W3C `traceparent` ([`current_context`]), and the worker's job span takes
//! it as its parent ([`set_parent`]), so an API request's trace continues
//! into the job it enqueued, on whichever worker runs it.
use std::collections::BTreeMap;

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource, metrics::PeriodicReader, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

/// What [`init`] set up; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use = "call shutdown() before the process exits, or the last spans are lost"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

/// Sets up logging, and OTLP export when `otlp_endpoint` is set.
/// `service` names the process in the exported resource.
///
/// One filter (`RUST_LOG`) for the whole stack, not one per layer: a
/// per-layer filter reads its decision from a thread-local that an
/// unrelated `enabled()` call (sqlx's query logger, through `tracing-log`)
/// can leave stale, and the next span of an always-enabled callsite is then
/// dropped from that layer (tokio-rs/tracing#2519). Seen here as an API
/// request's span missing from the OTLP export, and with it the trace
/// context of the job it enqueued.
pub fn init(json: bool, otlp_endpoint: Option<&str>, service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn,apalis=warn"));
    let logs = if json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let tracer = otlp_endpoint.and_then(|endpoint| match otlp(endpoint, service) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!("OTLP export to {endpoint} is off: {e}");
            None
        }
    });
    let otel = tracer
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("labelsync")));
    // `try_init`: tests call this once per spawned app; only the first one wins.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
    Telemetry { tracer }
}

/// The span and metric exporters. The signal paths are appended to the
/// endpoint as the OTLP specification says.
fn otlp(endpoint: &str, service: &'static str) -> Result<SdkTracerProvider, String> {
    let endpoint = endpoint.trim_end_matches('/');
    let resource = Resource::builder().with_service_name(service).build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .map_err(|e| e.to_string())?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .build()
        .map_err(|e| e.to_string())?;
    crate::metrics::install(Some((PeriodicReader::builder(metrics).build(), resource)));
    Ok(provider)
}

impl Telemetry {
    /// Exports what is still buffered (spans, and a last metrics report).
    /// The exporters block, so this runs on a blocking thread.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tracer) = self.tracer {
                if let Err(e) = tracer.shutdown() {
                    eprintln!("flushing spans: {e}");
                }
                crate::metrics::metrics().shutdown();
            }
        })
        .await;
    }
}

/// A W3C trace context (`traceparent`, `tracestate`) as carried by a job.
pub type TraceContext = BTreeMap<String, String>;

/// The current span's trace context; empty when nothing is traced.
pub fn current_context() -> TraceContext {
    let mut carrier = Carrier(TraceContext::new());
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.0
}

/// The current span's trace id (32 hex digits), or `None` when nothing is
/// traced (no OTLP endpoint, or no span).
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| span.trace_id().to_string())
}

/// Makes `span` a child of the trace in `context` (when there is one).
pub fn set_parent(span: &tracing::Span, context: &impl Extractor) {
    let parent = TraceContextPropagator::new().extract(context);
    let _ = span.set_parent(parent);
}

struct Carrier(TraceContext);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// A job's carried context, read back.
pub struct Carried<'a>(pub &'a TraceContext);

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// An HTTP request's headers, read for `traceparent`.
pub struct Headers<'a>(pub &'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
