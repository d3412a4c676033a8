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
