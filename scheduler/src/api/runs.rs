//! `/api/v1/runs`: job status, history, per-object errors, cancel.
use super::NoQuery;
use axum::{Extension, extract::State, http::StatusCode};
use labelsync::db::{
    entities::sync_run,
    runs::{self, RunFilter, RunKind, RunStatus},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Caller, Paging, limit, page,
};

/// The run, when it exists and the caller may see its project (else the
/// same 404 either way).
pub async fn find_for(state: &AppState, caller: &Caller, id: &str) -> ApiResult<sync_run::Model> {
    let run = runs::get(&state.db, id).await?;
    caller.check(run.project_id, || {
        ApiError::not_found(format!("run {id} not found"))
    })?;
    Ok(run)
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<ApiJson<Value>> {
    Ok(ApiJson(runs::to_json(
        &find_for(&state, &caller, &id).await?,
    )))
}

/// The filters and paging of `GET /api/v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    storage_id: Option<i64>,
    project_id: Option<i64>,
    /// Runs created (queued) after / before this time (RFC 3339).
    created_after: Option<chrono::DateTime<chrono::Utc>>,
    created_before: Option<chrono::DateTime<chrono::Utc>>,
    status: Option<String>,
    kind: Option<String>,
    limit: Option<u64>,
    /// A run id: runs older than it (the list is newest first).
    after: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<RunQuery>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let status = match &q.status {
        Some(status) => Some(RunStatus::parse(status).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                "status",
                "status must be one of queued, running, completed, completed_with_errors, failed, cancelled",
            )
        })?),
        None => None,
    };
    if let Some(kind) = &q.kind
        && RunKind::parse(kind).is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_kind",
            "kind",
            "kind must be one of import, export, delete",
        ));
    }
    check_times_and_cursor(&q)?;
    let filter = RunFilter {
        storage_id: q.storage_id,
        project_id: q.project_id,
        created_after: q.created_after,
        created_before: q.created_before,
        status,
        kind: q.kind.as_deref(),
        before: q.after.as_deref(),
        projects: caller.projects(),
    };
    let rows = runs::page(&state.db, filter, limit).await?;
    let last = rows.last().map(|r| r.id.clone());
    Ok(ApiJson(page(
        rows.iter().map(runs::to_json).collect(),
        limit,
        last,
    )))
}

/// `created_after`/`created_before` in the years 0 to 9999 (the two
/// databases compare others differently: `db::comparable_everywhere`), and
/// `after` a run id (anything else gave a page, silently, in an order of
/// the database's collation).
fn check_times_and_cursor(q: &RunQuery) -> ApiResult<()> {
    for (field, at) in [
        ("created_after", q.created_after),
        ("created_before", q.created_before),
    ] {
        if at.is_some_and(|at| !labelsync::db::comparable_everywhere(at)) {
            return Err(ApiError::bad_request(
                "invalid_query",
                field,
                format!("{field} must be a time in the years 0 to 9999"),
            ));
        }
    }
    match &q.after {
        Some(after) if ulid::Ulid::from_string(after).is_err() => Err(ApiError::bad_request(
            "invalid_query",
            "after",
            "after must be a run id (the next_after of a page)",
        )),
        _ => Ok(()),
    }
}

pub async fn errors(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    find_for(&state, &caller, &id).await?;
    let limit = limit(q.limit)?;
    let rows = runs::errors_page(&state.db, &id, q.after, limit).await?;
    let last = rows.last().map(|r| r.id);
    let items = rows
        .iter()
        .map(|e| json!({ "id": e.id, "key": e.object_key, "row_index": e.row_index, "error": e.error }))
        .collect();
    Ok(ApiJson(page(items, limit, last)))
}

pub async fn cancel(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<ApiJson<Value>> {
    find_for(&state, &caller, &id).await?;
    Ok(ApiJson(runs::to_json(&runs::cancel(&state.db, &id).await?)))
}

/// `POST /runs/{id}/retry`: a new import run of the run's storage that
/// reads again only the objects the run recorded errors for (`scope:
/// "retry"`, `retry_of`: the run). 409 when the run is not an ended import
/// run with failed objects, or when its storage has a live run.
pub async fn retry(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let run = find_for(&state, &caller, &id).await?;
    if run.kind != RunKind::Import.as_str() {
        return Err(conflict(
            "not_retryable",
            format!(
                "run {id} is an {} run; only import runs can be retried",
                run.kind
            ),
        ));
    }
    if RunStatus::parse(&run.status).is_some_and(RunStatus::is_live) {
        return Err(conflict(
            "run_live",
            format!(
                "run {id} is still {}; retry it once it has ended",
                run.status
            ),
        ));
    }
    if !runs::has_errors(&state.db, &id).await? {
        return Err(conflict(
            "nothing_to_retry",
            format!("run {id} has no failed objects"),
        ));
    }
    let (new, live) =
        labelsync::jobs::enqueue_retry(&state.db, &state.queue, &state.settings, &run).await?;
    if live {
        return Err(conflict(
            "run_live",
            format!(
                "storage {} has a live run ({}); retry once it has ended",
                run.storage_id, new.id
            ),
        ));
    }
    caller.note("run_id", new.id.clone());
    Ok((StatusCode::ACCEPTED, ApiJson(runs::to_json(&new))))
}

fn conflict(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}
