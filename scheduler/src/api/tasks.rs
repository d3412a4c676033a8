//! Tasks: a project's list (with the object each came from) and one task with
//! its annotations and predictions.
use std::collections::HashMap;

use axum::extract::State;
use labelsync::db::entities::{annotation, import_link, prediction, task};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Paging, limit, page, projects,
};

fn to_json(t: &task::Model, source: Option<&import_link::Model>) -> Value {
    json!({
        "id": t.id,
        "data": t.data,
        "meta": t.meta,
        "source": source.map(|l| json!({ "storage_id": l.storage_id, "key": l.object_key, "row_index": l.row_index })),
        "created_at": t.created_at,
    })
}

async fn sources(
    db: &sea_orm::DatabaseConnection,
    ids: &[i64],
) -> ApiResult<HashMap<i64, import_link::Model>> {
    let links = import_link::Entity::find()
        .filter(import_link::Column::TaskId.is_in(ids.iter().copied()))
        .all(db)
        .await?;
    Ok(links.into_iter().map(|l| (l.task_id, l)).collect())
}

pub async fn list(
    State(state): State<AppState>,
    ApiPath(project_id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    projects::find(&state.db, project_id).await?;
    let limit = limit(q.limit)?;
    let mut query = task::Entity::find()
        .filter(task::Column::ProjectId.eq(project_id))
        .order_by_asc(task::Column::Id)
        .limit(limit);
    if let Some(after) = q.after {
        query = query.filter(task::Column::Id.gt(after));
    }
    let tasks = query.all(&state.db).await?;
    let ids: Vec<i64> = tasks.iter().map(|t| t.id).collect();
    let links = sources(&state.db, &ids).await?;
    let items = tasks.iter().map(|t| to_json(t, links.get(&t.id))).collect();
    Ok(ApiJson(page(items, limit, ids.last())))
}

pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let t = task::Entity::find_by_id(id)
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
    let links = sources(&state.db, &[id]).await?;
    let annotations = annotation::Entity::find()
        .filter(annotation::Column::TaskId.eq(id))
        .order_by_asc(annotation::Column::Id)
        .all(&state.db)
        .await?;
    let predictions = prediction::Entity::find()
        .filter(prediction::Column::TaskId.eq(id))
        .order_by_asc(prediction::Column::Id)
        .limit(1000)
        .all(&state.db)
        .await?;
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
    value["predictions"] = predictions
        .iter()
        .map(|p| json!({ "id": p.id, "result": p.result, "model_version": p.model_version, "score": p.score, "created_at": p.created_at }))
        .collect();
    Ok(ApiJson(value))
}
