//! Tasks: a project's list (with the object each came from) and one task with
//! its annotations and predictions.
use super::NoQuery;
use axum::{Extension, extract::State};
use labelsync::db::{
    annotations,
    entities::{import_link, task},
    tasks,
};
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Caller, Paging, limit, page_cut,
    projects,
};

/// Predictions shown with one task, at most.
const PREDICTIONS_SHOWN: u64 = 1000;
/// Annotations shown with one task, at most (and within the page budget);
/// the rest are listed by `GET /tasks/{id}/annotations`.
const ANNOTATIONS_SHOWN: u64 = 1000;

fn to_json(t: &task::Model, source: Option<&import_link::Model>) -> Value {
    json!({
        "id": t.id,
        "data": t.data,
        "meta": t.meta,
        "source": source.map(|l| json!({ "storage_id": l.storage_id, "key": l.object_key, "row_index": l.row_index })),
        "created_at": t.created_at,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(project_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    projects::find_for(&state.db, &caller, project_id).await?;
    let limit = limit(q.limit)?;
    let budget = super::PAGE_BUDGET_BYTES;
    let (found, cut) = tasks::page(&state.db, project_id, q.after, limit, budget).await?;
    let ids: Vec<i64> = found.iter().map(|t| t.id).collect();
    let links = tasks::sources(&state.db, &ids).await?;
    let items = found.iter().map(|t| to_json(t, links.get(&t.id))).collect();
    Ok(ApiJson(page_cut(items, limit, ids.last(), cut)))
}

/// The task, when it exists and the caller may see its project (else the
/// same 404 either way).
pub async fn find_for(state: &AppState, caller: &Caller, id: i64) -> ApiResult<task::Model> {
    let missing = || ApiError::not_found(format!("task {id} not found"));
    let t = tasks::find(&state.db, id).await?.ok_or_else(missing)?;
    caller.check(t.project_id, missing)?;
    Ok(t)
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let t = find_for(&state, &caller, id).await?;
    let links = tasks::sources(&state.db, &[id]).await?;
    // One more than shown: whether there are more is then known.
    let budget = super::PAGE_BUDGET_BYTES;
    let (mut annotations, cut) =
        annotations::of_task(&state.db, id, None, ANNOTATIONS_SHOWN + 1, budget).await?;
    let more = cut || annotations.len() as u64 > ANNOTATIONS_SHOWN;
    annotations.truncate(ANNOTATIONS_SHOWN as usize);
    let predictions = tasks::predictions_of(&state.db, id, PREDICTIONS_SHOWN).await?;
    let mut value = to_json(&t, links.get(&id));
    value["annotations"] = annotations
        .iter()
        .map(|a| {
            json!({
                "id": a.id, "result": a.result, "completed_by": a.completed_by, "lead_time": a.lead_time,
                "was_cancelled": a.was_cancelled, "ground_truth": a.ground_truth,
                "created_at": a.created_at, "updated_at": a.updated_at,
            })
        })
        .collect();
    value["annotations_next_after"] = json!(annotations.last().filter(|_| more).map(|a| a.id));
    value["predictions"] = predictions
        .iter()
        .map(|p| json!({ "id": p.id, "result": p.result, "model_version": p.model_version, "score": p.score, "created_at": p.created_at }))
        .collect();
    Ok(ApiJson(value))
}

/// The task's annotations, oldest first, a page at a time: all of them,
/// where `GET /tasks/{id}` shows those it has room for.
pub async fn annotations_of(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    find_for(&state, &caller, id).await?;
    let limit = limit(q.limit)?;
    let budget = super::PAGE_BUDGET_BYTES;
    let (found, cut) = annotations::of_task(&state.db, id, q.after, limit, budget).await?;
    let last = found.last().map(|a| a.id);
    let items = found.iter().map(super::annotations::to_json).collect();
    Ok(ApiJson(page_cut(items, limit, last, cut)))
}
