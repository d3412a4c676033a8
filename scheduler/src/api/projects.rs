//! `/api/v1/projects`.
use std::collections::HashMap;

use axum::{extract::State, http::StatusCode};
use chrono::Utc;
use labelsync::db::entities::{project, task};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Paging, limit, page};

/// The body of a project create or PATCH (unknown fields are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectBody {
    pub title: Option<String>,
    pub data_key: Option<String>,
}

fn check_fields(body: &ProjectBody) -> ApiResult<()> {
    if body.title.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "invalid_title",
            "title",
            "title must not be empty",
        ));
    }
    if let Some(key) = &body.data_key
        && (key.is_empty()
            || key.len() > 100
            || !key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(ApiError::bad_request(
            "invalid_data_key",
            "data_key",
            "data_key must be 1-100 letters, digits, '_' or '-' (the task field a Files-mode object fills)",
        ));
    }
    Ok(())
}

pub fn to_json(p: &project::Model, task_count: i64) -> Value {
    json!({
        "id": p.id,
        "title": p.title,
        "data_key": p.data_key,
        "task_count": task_count,
        "created_at": p.created_at,
    })
}

/// Task counts of several projects in one grouped query.
async fn task_counts(db: &impl ConnectionTrait, ids: &[i64]) -> ApiResult<HashMap<i64, i64>> {
    let rows: Vec<(i64, i64)> = task::Entity::find()
        .select_only()
        .column(task::Column::ProjectId)
        .column_as(task::Column::Id.count(), "n")
        .filter(task::Column::ProjectId.is_in(ids.iter().copied()))
        .group_by(task::Column::ProjectId)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

pub async fn find(db: &impl ConnectionTrait, id: i64) -> ApiResult<project::Model> {
    project::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {id} not found")))
}

pub async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ProjectBody>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    check_fields(&body)?;
    let title = body
        .title
        .clone()
        .ok_or_else(|| ApiError::bad_request("missing_field", "title", "title is required"))?;
    let now = Utc::now();
    let model = project::ActiveModel {
        title: Set(title),
        data_key: Set(body.data_key.clone().unwrap_or_else(|| "image".into())),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&state.db)
    .await?;
    Ok((StatusCode::CREATED, ApiJson(to_json(&model, 0))))
}

pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let mut query = project::Entity::find()
        .order_by_asc(project::Column::Id)
        .limit(limit);
    if let Some(after) = q.after {
        query = query.filter(project::Column::Id.gt(after));
    }
    let projects = query.all(&state.db).await?;
    let ids: Vec<i64> = projects.iter().map(|p| p.id).collect();
    let counts = task_counts(&state.db, &ids).await?;
    let items = projects
        .iter()
        .map(|p| to_json(p, counts.get(&p.id).copied().unwrap_or(0)))
        .collect();
    Ok(ApiJson(page(items, limit, ids.last())))
}

pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let p = find(&state.db, id).await?;
    let counts = task_counts(&state.db, &[id]).await?;
    Ok(ApiJson(to_json(&p, counts.get(&id).copied().unwrap_or(0))))
}

pub async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ProjectBody>,
) -> ApiResult<ApiJson<Value>> {
    check_fields(&body)?;
    let mut model = find(&state.db, id).await?.into_active_model();
    if let Some(title) = body.title {
        model.title = Set(title);
    }
    if let Some(key) = body.data_key {
        model.data_key = Set(key);
    }
    model.updated_at = Set(Utc::now());
    let p = model.update(&state.db).await?;
    let counts = task_counts(&state.db, &[id]).await?;
    Ok(ApiJson(to_json(&p, counts.get(&id).copied().unwrap_or(0))))
}

/// Deletes the project; its storages, tasks, links and runs go with it
/// (ON DELETE CASCADE).
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    let res = project::Entity::delete_by_id(id).exec(&state.db).await?;
    if res.rows_affected == 0 {
        return Err(ApiError::not_found(format!("project {id} not found")));
    }
    Ok(StatusCode::NO_CONTENT)
}
