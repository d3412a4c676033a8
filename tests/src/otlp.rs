//! A small OTLP/HTTP collector for the tests: it accepts the protobuf
//! `POST /v1/traces` and `/v1/metrics` requests the exporters send, decodes
//! them with the OpenTelemetry protocol types, and keeps the spans and metric
//! names it saw.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, KeyValue, any_value::Value as Any},
    resource::v1::Resource,
};
use prost::Message;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct SpanSeen {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

/// What the collector received so far.
#[derive(Debug, Default)]
pub struct Received {
    pub spans: Vec<SpanSeen>,
    /// (service, metric name)
    pub metrics: Vec<(String, String)>,
}

pub struct Collector {
    pub endpoint: String,
    pub received: Arc<Mutex<Received>>,
}

impl Collector {
    /// Listens on 127.0.0.1:0 until the test ends.
    pub async fn start() -> Self {
        let listener = labelsync::http::listen(crate::LOOPBACK).expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/metrics", post(metrics))
            .with_state(received.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { endpoint, received }
    }

    pub fn spans(&self) -> Vec<SpanSeen> {
        self.received.lock().expect("lock").spans.clone()
    }

    pub fn metrics(&self) -> Vec<(String, String)> {
        self.received.lock().expect("lock").metrics.clone()
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// The `service.name` of an exporter's resource.
fn service_name(resource: Option<Resource>) -> String {
    resource
        .map(|r| attributes(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
    let mut received = received.lock().expect("lock");
    for resource in request.resource_spans {
        let service = service_name(resource.resource);
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.spans.push(SpanSeen {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    ""
}

async fn metrics(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let request = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics request");
    let mut received = received.lock().expect("lock");
    for resource in request.resource_metrics {
        let service = service_name(resource.resource);
        for scope in resource.scope_metrics {
            for metric in scope.metrics {
                received.metrics.push((service.clone(), metric.name));
            }
        }
    }
    ""
}
