//! # Layout
//! Architecture: docs/DESIGN.md; measured decisions: docs/DECISIONS.md.
//!
//! Everything the scheduler and worker binaries share, as layers: each
//! module uses only modules of the layers below it (`layering.rs` checks
//! that no `use` points back up).
//!
//! 1. [`error`] (the crate error every module maps into), [`kinds`] (run
//!    kinds and backend names), [`security`] (path confinement, the SSRF
//!    guard, secret sealing), [`clock`] (the database's time, which every
//!    lease and heartbeat is on).
//! 2. [`config`] (typed settings, parsed once from the environment),
//!    [`metrics`] (OpenTelemetry instruments and their Prometheus text),
//!    [`telemetry`] (tracing and OTLP setup), [`http`] (the HTTP server of
//!    both binaries, with header and body timeouts and a connection cap).
//! 3. [`db`]: SeaORM entities (`db::entities`) and every query (`db::runs`
//!    the run lifecycle, `db::links` import links, `db::tasks` tasks with
//!    their links, annotations and predictions, `db::batches`
//!    fan-out batches, `db::outbox` annotation events, `db::webhooks`
//!    webhook endpoints, events and deliveries).
//! 4. [`storage`]: the [`storage::Storage`] trait, one module per backend,
//!    the instrumented wrapper every backend is opened in, the key filter.
//! 5. [`attempt`]: what one attempt of a run shares ([`attempt::Outcome`],
//!    the stop flag).
//! 6. [`ingest`] (the import pipeline; fan-out through its
//!    [`ingest::FanOut`] port), [`export`] (the export pipeline) and
//!    [`webhooks`] (signing and delivering webhook events).
//! 7. [`jobs`]: job payloads, the queue (Redis or embedded SQLite, which
//!    implements `FanOut`) and the handler both binaries register.
//! 8. [`lifecycle`]: shutdown signal, readiness, `/metrics`, the worker's
//!    probe listener and process loop; [`reseal`]: the sealed secrets
//!    counted by the key that opens them, and sealed again under a new
//!    `LABELSYNC_SECRET_KEY`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod attempt;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod export;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod json;
pub mod kinds;
pub mod lifecycle;
pub mod metrics;
pub mod reseal;
pub mod security;
pub mod storage;
pub mod task;
pub mod telemetry;
pub mod webhooks;

pub use error::{Error, Result};

#[cfg(test)]
mod layering;
