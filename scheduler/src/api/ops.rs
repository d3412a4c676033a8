//! Probes for orchestrators: `/healthz` (the process answers) and `/readyz`
//! (the database is migrated and it and the queue answer);
//! `/api/v1/queues` for ops.
use axum::{Json, extract::State, http::StatusCode};
use serde_json::{Value, json};

use labelsync::jobs::dead::DeadAction;

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

/// `GET /api/v1/queues`: the backlog of each queue, and how long its
/// oldest waiting job has waited.
pub async fn queues(
    State(state): State<AppState>,
    _: super::NoQuery,
) -> super::ApiResult<Json<Value>> {
    let (depth, age) = tokio::join!(state.queue.depth(), state.queue.oldest_waiting_age());
    let mut item =
        serde_json::to_value(depth?).map_err(|e| labelsync::Error::Internal(e.to_string()))?;
    item["oldest_pending_age_seconds"] = json!(age?);
    Ok(Json(json!({ "items": [item] })))
}

/// `?limit=` of the dead-job actions (1 to 10000, default 1000).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadQuery {
    limit: Option<u64>,
}

const MAX_DEAD_PER_CALL: u64 = 10_000;

/// `POST /api/v1/queues/dead/requeue`: dead jobs back on the queue.
pub async fn requeue_dead(
    State(state): State<AppState>,
    super::ApiQuery(q): super::ApiQuery<DeadQuery>,
) -> super::ApiResult<super::ApiJson<Value>> {
    dead(&state, q, DeadAction::Requeue).await
}

/// `POST /api/v1/queues/dead/discard`: dead jobs deleted.
pub async fn discard_dead(
    State(state): State<AppState>,
    super::ApiQuery(q): super::ApiQuery<DeadQuery>,
) -> super::ApiResult<super::ApiJson<Value>> {
    dead(&state, q, DeadAction::Discard).await
}

async fn dead(
    state: &AppState,
    q: DeadQuery,
    action: DeadAction,
) -> super::ApiResult<super::ApiJson<Value>> {
    let limit = match q.limit {
        None => 1000,
        Some(n) if (1..=MAX_DEAD_PER_CALL).contains(&n) => n,
        Some(n) => {
            return Err(super::ApiError::bad_request(
                "invalid_limit",
                "limit",
                format!("limit must be between 1 and {MAX_DEAD_PER_CALL}, got {n}"),
            ));
        }
    };
    let jobs = state.queue.dead_jobs(action, limit).await?;
    let depth = state.queue.depth().await?;
    let action = match action {
        DeadAction::Requeue => "requeue",
        DeadAction::Discard => "discard",
    };
    Ok(super::ApiJson(
        json!({ "queue": depth.queue, "action": action, "jobs": jobs, "dead": depth.dead }),
    ))
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
    let (now, gone) = (labelsync::clock::now(), gone_after(&state.settings));
    let items = rows
        .iter()
        .map(|w| labelsync::db::workers::to_json(w, now, gone))
        .collect();
    let last = rows.last().map(|w| w.name.clone());
    Ok(super::ApiJson(super::page(items, limit, last)))
}
