//! # Layout
//! Everything the scheduler and worker binaries share.
//!
//! - [`config`]: typed settings, parsed once from the environment.
//! - [`db`]: SeaORM entities (`db::entities`) and the queries behind them
//!   (`db::runs` for the run lifecycle, `db::links` for import links).
//! - [`storage`]: the [`storage::Storage`] trait and one module per backend.
//! - [`ingest`]: the import pipeline (listing filter, Files mode, batching).
//! - [`export`]: the export pipeline (annotation JSON, change detection,
//!   uploads and deletes, the outbox of annotation events).
//! - [`jobs`]: job payloads, queue wiring (Redis or embedded SQLite) and the handler
//!   both the worker binary and the embedded mode register.
//! - [`security`]: local-path confinement.
//! - [`lifecycle`]: shutdown signal and the worker process loop.
//! - [`http`]: the HTTP server of both binaries, with header and body
//!   timeouts and a connection cap.
//! - [`telemetry`]: tracing setup; [`metrics`]: OpenTelemetry instruments
//!   and their Prometheus text.
//! - [`error`]: the small crate error every module maps into.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod db;
pub mod error;
pub mod export;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod security;
pub mod storage;
pub mod telemetry;

pub use error::{Error, Result};
