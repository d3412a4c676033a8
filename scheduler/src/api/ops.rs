//! Probes for orchestrators: `/healthz` (the process answers) and `/readyz`
//! (the database is migrated and it and the queue answer);
//! `/api/v1/queues` for ops.
use axum::{Json, extract::State, http::StatusCode};
use serde_json::{Value, json};

use super::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    labelsync::lifecycle::readiness(&state.db, &state.queue).await
}

/// `GET /metrics`: every metric in the Prometheus text format, with the
/// queue depth read from the queue's backend just now.
pub async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    labelsync::lifecycle::metrics_response(&state.queue).await
}

/// `GET /api/v1/queues`: the backlog of each queue.
pub async fn queues(State(state): State<AppState>) -> super::ApiResult<Json<Value>> {
    let depth = state.queue.depth().await?;
    Ok(Json(json!({ "items": [depth] })))
}

/// `?limit=&after=` of `GET /api/v1/workers` (`after`: a worker's name).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerQuery {
    limit: Option<u64>,
    after: Option<String>,
}

/// How long a worker may miss heartbeats before it is shown as `gone`: the
/// queue's own limit (`LABELSYNC_HEARTBEAT_SECS` x
/// `LABELSYNC_MISSED_HEARTBEATS`), after which its jobs go to others.
pub fn gone_after(settings: &labelsync::config::Settings) -> std::time::Duration {
    let w = &settings.worker;
    w.heartbeat * u32::try_from(w.missed_heartbeats.max(1)).unwrap_or(u32::MAX)
}

/// `GET /api/v1/workers`: the registered workers, by name.
pub async fn workers(
    State(state): State<AppState>,
    super::ApiQuery(q): super::ApiQuery<WorkerQuery>,
) -> super::ApiResult<super::ApiJson<Value>> {
    let limit = super::limit(q.limit)?;
    let rows = labelsync::db::workers::page(&state.db, q.after.as_deref(), limit).await?;
    let (now, gone) = (chrono::Utc::now(), gone_after(&state.settings));
    let items = rows
        .iter()
        .map(|w| labelsync::db::workers::to_json(w, now, gone))
        .collect();
    let last = rows.last().map(|w| w.name.clone());
    Ok(super::ApiJson(super::page(items, limit, last)))
}
