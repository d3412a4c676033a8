//! OpenTelemetry metrics, scraped as Prometheus text at `/metrics` (the
//! scheduler's API port, and each worker's small listener).
//!
//! One process-wide set of instruments ([`metrics`]), recorded where things
//! happen: jobs in `jobs::execute`, storage requests in the
//! `storage::Instrumented` wrapper every backend is opened in, resolve
//! requests in the API, queue depth read from Redis right before each scrape
//! (`lifecycle::metrics_response`; the apalis-redis 1.0 metrics calls fail:
//! docs/DECISIONS.md, "Queue depth read from Redis").
//! This module only holds the instruments and their label vocabularies: it
//! depends on nothing but `error` and `kinds`, so every layer can record. Names follow the
//! Prometheus conventions the exporter applies: counters end in `_total`,
//! durations are histograms in `_seconds`.
use std::{sync::OnceLock, time::Duration};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram, MeterProvider},
};
use opentelemetry_otlp::MetricExporter;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
};
use prometheus::{Encoder, TextEncoder};

use crate::{Error, Result};

/// Seconds buckets for jobs (a no-op job to an hour-long sync).
const JOB_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Seconds buckets for storage requests.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's OpenTelemetry instruments and the Prometheus registry they
/// render into; one per process, reached through [`metrics`].
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    pub jobs_started: Counter<u64>,
    pub jobs_finished: Counter<u64>,
    pub job_duration: Histogram<f64>,
    pub objects_listed: Counter<u64>,
    pub tasks_created: Counter<u64>,
    pub annotations_exported: Counter<u64>,
    pub annotations_deleted: Counter<u64>,
    pub object_errors: Counter<u64>,
    pub storage_requests: Counter<u64>,
    pub storage_duration: Histogram<f64>,
    pub resolve_requests: Counter<u64>,
    pub resolve_bytes: Counter<u64>,
    pub queue_jobs: Gauge<i64>,
    pub worker_slots: Gauge<u64>,
    pub runs_held: Gauge<u64>,
    pub secrets_sealed: Gauge<u64>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's instruments.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(None))
}

/// Sets the instruments up with a second reader (OTLP) beside the Prometheus
/// one; called by `telemetry::init` before anything records. Later calls,
/// or calls after the first use, change nothing.
pub fn install(otlp: Option<(PeriodicReader<MetricExporter>, Resource)>) {
    let _ = METRICS.set(Metrics::new(otlp));
}

impl Metrics {
    fn new(otlp: Option<(PeriodicReader<MetricExporter>, Resource)>) -> Self {
        let registry = prometheus::Registry::new();
        let mut builder = SdkMeterProvider::builder();
        if let Some((reader, resource)) = otlp {
            builder = builder.with_reader(reader).with_resource(resource);
        }
        // The exporter only fails on a registry clash, which a fresh registry
        // cannot have; without it the instruments still work, unexported.
        let provider = match opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
        {
            Ok(exporter) => builder.with_reader(exporter).build(),
            Err(e) => {
                tracing::error!(error = %e, "metrics exporter not available");
                builder.build()
            }
        };
        let metrics = Self::instruments(registry, provider);
        metrics.start_at_zero();
        metrics
    }

    /// Every instrument, made on `provider`'s meter.
    fn instruments(registry: prometheus::Registry, provider: SdkMeterProvider) -> Self {
        let meter = provider.meter("labelsync");
        let counter = |name: &'static str, help: &'static str| {
            meter.u64_counter(name).with_description(help).build()
        };
        let gauge = |name: &'static str, help: &'static str| {
            meter.u64_gauge(name).with_description(help).build()
        };
        Metrics {
            jobs_started: counter("labelsync.jobs.started", "Job attempts started, by kind"),
            jobs_finished: counter(
                "labelsync.jobs.finished",
                "Job attempts finished, by kind and outcome (completed, completed_with_errors, failed, retry, stopped)",
            ),
            job_duration: meter
                .f64_histogram("labelsync.job.duration")
                .with_unit("s")
                .with_description("Duration of job attempts, by kind and outcome")
                .with_boundaries(JOB_BUCKETS.to_vec())
                .build(),
            objects_listed: counter(
                "labelsync.objects.listed",
                "Objects listed by import runs, by run kind",
            ),
            tasks_created: counter(
                "labelsync.tasks.created",
                "Tasks created by import runs, by run kind",
            ),
            annotations_exported: counter(
                "labelsync.annotations.exported",
                "Annotations written to target storages, by run kind",
            ),
            annotations_deleted: counter(
                "labelsync.annotations.deleted",
                "Exported annotations deleted from target storages, by run kind",
            ),
            object_errors: counter(
                "labelsync.object.errors",
                "Per-object errors of runs, by run kind",
            ),
            storage_requests: counter(
                "labelsync.storage.requests",
                "Storage requests, by backend, operation and outcome (ok or the error class)",
            ),
            storage_duration: meter
                .f64_histogram("labelsync.storage.request.duration")
                .with_unit("s")
                .with_description("Storage request latency, by backend and operation")
                .with_boundaries(REQUEST_BUCKETS.to_vec())
                .build(),
            resolve_requests: counter(
                "labelsync.resolve.requests",
                "Media resolve requests, by backend, mode (redirect or proxy) and status",
            ),
            resolve_bytes: counter(
                "labelsync.resolve.bytes",
                "Bytes proxied by media resolve, by backend",
            ),
            queue_jobs: meter
                .i64_gauge("labelsync.queue.jobs")
                .with_description("Jobs in a queue, by queue and state (pending, running, dead)")
                .build(),
            worker_slots: gauge(
                "labelsync.worker.slots",
                "Jobs this worker process runs at once; one series per worker process",
            ),
            runs_held: gauge(
                "labelsync.runs.held",
                "Runs held in the database for their project's turn (LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT) or for room in the queue; recorded by the scheduler's tick",
            ),
            secrets_sealed: gauge(
                "labelsync.secrets.sealed",
                "Sealed storage and webhook secrets as the scheduler's last count found them, by state: current (LABELSYNC_SECRET_KEY opens them), fallback (only a LABELSYNC_SECRET_KEY_FALLBACKS key does: labelsync-scheduler reseal seals them again), unopenable (no key does: they must be given again)",
            ),
            registry,
            provider,
        }
    }

    /// Adds 0 to every counter for each label set known in advance, so
    /// `/metrics` lists them from the start and dashboards show 0 rather
    /// than "No data" until the first event. Histograms are left out (a 0
    /// would be a sample), and so are resolve requests (their status label
    /// is open-ended).
    fn start_at_zero(&self) {
        use crate::kinds::{BackendKind, RunKind};
        for kind in RunKind::ALL.map(|k| KeyValue::new("kind", k.as_str())) {
            let labels = std::slice::from_ref(&kind);
            for counter in [
                &self.jobs_started,
                &self.objects_listed,
                &self.tasks_created,
                &self.annotations_exported,
                &self.annotations_deleted,
                &self.object_errors,
            ] {
                counter.add(0, labels);
            }
            for outcome in JOB_OUTCOMES {
                let labels = [kind.clone(), KeyValue::new("outcome", outcome)];
                self.jobs_finished.add(0, &labels);
            }
        }
        for backend in BackendKind::ALL.map(BackendKind::as_str) {
            self.resolve_bytes
                .add(0, &[KeyValue::new("backend", backend)]);
            for operation in STORAGE_OPERATIONS {
                for outcome in STORAGE_OUTCOMES {
                    let labels = [
                        KeyValue::new("backend", backend),
                        KeyValue::new("operation", operation),
                        KeyValue::new("outcome", outcome),
                    ];
                    self.storage_requests.add(0, &labels);
                }
            }
        }
    }

    /// Exports a last report to the OTLP reader, if any (it blocks).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "metrics shutdown");
        }
    }

    /// Records a queue's depth, read by the caller just before a scrape.
    pub fn record_queue(&self, queue: &str, pending: u64, running: u64, dead: u64) {
        for (state, n) in [("pending", pending), ("running", running), ("dead", dead)] {
            self.queue_jobs.record(
                i64::try_from(n).unwrap_or(i64::MAX),
                &[
                    KeyValue::new("queue", queue.to_owned()),
                    KeyValue::new("state", state),
                ],
            );
        }
    }

    /// Records what a pass over the sealed secrets found (`reseal::pass`).
    pub fn record_sealed(&self, current: u64, fallback: u64, unopenable: u64) {
        for (state, n) in [
            ("current", current),
            ("fallback", fallback),
            ("unopenable", unopenable),
        ] {
            self.secrets_sealed
                .record(n, &[KeyValue::new("state", state)]);
        }
    }

    /// Counts and times one storage request (`storage::Instrumented`).
    pub fn record_storage_request(
        &self,
        backend: &'static str,
        operation: &'static str,
        took: Duration,
        outcome: &'static str,
    ) {
        let backend = KeyValue::new("backend", backend);
        let op = KeyValue::new("operation", operation);
        self.storage_requests.add(
            1,
            &[
                backend.clone(),
                op.clone(),
                KeyValue::new("outcome", outcome),
            ],
        );
        self.storage_duration
            .record(took.as_secs_f64(), &[backend, op]);
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The outcome labels of `labelsync_jobs_finished_total`, as
/// `jobs::execute` records them.
const JOB_OUTCOMES: [&str; 5] = [
    "completed",
    "completed_with_errors",
    "failed",
    "retry",
    "stopped",
];

/// The operation labels of storage requests (`storage::Instrumented`).
pub const STORAGE_OPERATIONS: [&str; 6] = ["list", "get", "put", "delete", "presign", "check"];

/// Every value [`outcome`] gives.
pub const STORAGE_OUTCOMES: [&str; 7] = [
    "ok",
    "not_found",
    "unauthenticated",
    "permission_denied",
    "transient",
    "invalid",
    "internal",
];

/// The outcome label of a storage request.
pub fn outcome<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::NotFound(_)) => "not_found",
        Err(Error::Unauthenticated(_)) => "unauthenticated",
        Err(Error::PermissionDenied(_)) => "permission_denied",
        Err(Error::Transient(_)) => "transient",
        Err(Error::Invalid { .. }) => "invalid",
        // (A storage request never conflicts: that is the database's.)
        Err(Error::Internal(_) | Error::Conflict(_)) => "internal",
    }
}
