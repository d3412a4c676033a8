//! Telemetry end to end: traces and metrics of a scheduler (this test
//! process) and a `labelsync-worker` process reach an OTLP collector run by
//! the test (`tests/src/otlp.rs`, decoding the protobuf).
use std::time::{Duration, Instant};

use labelsync_tests::{
    AppOptions, TestApp,
    otlp::{Collector, SpanSeen},
    spawn_app, spawn_worker,
};
use serde_json::{Value, json};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// Traces and metrics reach an OTLP collector. A sync started by an API
/// request that carries a W3C `traceparent` is one trace from the caller
/// through the scheduler's request span into the worker's job span (with
/// the run's ids, storage, backend and kind) and the job's storage requests;
/// the worker's metrics arrive over OTLP too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_reach_an_otlp_collector() {
    let collector = Collector::start().await;
    // This test process is the scheduler: its spans go to the collector too.
    let telemetry =
        labelsync::telemetry::init(false, Some(&collector.endpoint), "labelsync-scheduler");
    let app = spawn_app(AppOptions::without_workers()).await;
    let storage = app.files_storage("traced", 30).await;
    let _worker = spawn_worker(
        &app,
        "traced",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            // RUST_LOG filters exported spans too: the job spans are `info`.
            ("RUST_LOG", "info"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    );
    let run_id = sync_with_traceparent(&app, &storage).await;
    // Flushes this process's spans; the worker exports every 100 ms.
    telemetry.shutdown().await;

    let (request, job, spans) = wait_for_traced_job(&collector).await;
    assert_request_and_job(&request, &job, &run_id, &storage);
    assert_storage_request_under(&spans, &job);
    wait_for_worker_metrics(&collector).await;
    app.stop().await;
}

/// Starts a sync with the caller's `traceparent` and waits for it to
/// complete; returns the run id.
async fn sync_with_traceparent(app: &TestApp, storage: &Value) -> String {
    let response = app
        .client
        .post(format!(
            "{}/api/v1/storages/{}/sync",
            app.base, storage["id"]
        ))
        .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
        .json(&json!({}))
        .send()
        .await
        .expect("sync request");
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.expect("JSON");
    let run_id = started["run"]["id"].as_str().expect("run id").to_owned();
    let run = app.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["trace_id"], TRACE, "the run names its trace");
    let page = app
        .client
        .get(format!("{}/ui/runs/{run_id}", app.base))
        .send()
        .await
        .expect("run page")
        .text()
        .await
        .expect("HTML");
    assert!(
        page.contains(TRACE),
        "the console shows the trace id: {page}"
    );
    run_id
}

/// Whether `span` descends from the span `ancestor` (through the spans seen).
fn under(spans: &[SpanSeen], span: &SpanSeen, ancestor: &str) -> bool {
    let mut parent = span.parent_span_id.as_str();
    for _ in 0..spans.len() {
        if parent == ancestor {
            return true;
        }
        match spans.iter().find(|s| s.span_id == parent) {
            Some(next) => parent = &next.parent_span_id,
            None => return false,
        }
    }
    false
}

fn find(spans: &[SpanSeen], service: &str, name: &str) -> Option<SpanSeen> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && s.trace_id == TRACE)
        .cloned()
}

/// The scheduler's request span and the worker's job span of the trace,
/// once a storage request under the job has arrived too.
async fn wait_for_traced_job(collector: &Collector) -> (SpanSeen, SpanSeen, Vec<SpanSeen>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = collector.spans();
        if let (Some(request), Some(job)) = (
            find(&spans, "labelsync-scheduler", "http.request"),
            find(&spans, "labelsync-worker", "job"),
        ) && spans
            .iter()
            .any(|s| s.name == "storage.request" && under(&spans, s, &job.span_id))
        {
            return (request, job, spans);
        }
        assert!(
            Instant::now() < deadline,
            "no traced job reached the collector; spans seen: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_request_and_job(request: &SpanSeen, job: &SpanSeen, run_id: &str, storage: &Value) {
    assert_eq!(
        request.parent_span_id, CALLER,
        "the caller's span is the parent"
    );
    assert_eq!(
        request
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202")
    );
    assert_eq!(
        job.parent_span_id, request.span_id,
        "the job continues the request"
    );
    let attr = |k: &str| job.attributes.get(k).cloned().unwrap_or_default();
    assert_eq!(attr("run_id"), run_id);
    assert_eq!(attr("storage_id"), storage["id"].to_string());
    assert_eq!(attr("backend"), "local");
    assert_eq!(attr("kind"), "import");
    assert!(!attr("job_id").is_empty(), "job id: {job:?}");
}

fn assert_storage_request_under(spans: &[SpanSeen], job: &SpanSeen) {
    let listing = spans
        .iter()
        .find(|s| s.name == "storage.request" && under(spans, s, &job.span_id))
        .expect("a storage request under the job");
    assert_eq!(listing.trace_id, TRACE);
    assert_eq!(
        listing.attributes.get("backend").map(String::as_str),
        Some("local")
    );
    assert_eq!(
        listing.attributes.get("outcome").map(String::as_str),
        Some("ok")
    );
}

/// Waits for the worker's job duration histogram, not a counter: counters
/// are exported at 0 from the start, so only a sample proves the job recorded.
async fn wait_for_worker_metrics(collector: &Collector) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !collector
        .metrics()
        .iter()
        .any(|(service, name)| service == "labelsync-worker" && name == "labelsync.job.duration")
    {
        assert!(
            Instant::now() < deadline,
            "the worker's metrics did not arrive: {:?}",
            collector.metrics()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
