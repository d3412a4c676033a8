//! `/api/v1/projects`.
use super::NoQuery;
use axum::{Extension, extract::State, http::StatusCode};
use labelsync::db::{self, entities::project, projects};
use sea_orm::ConnectionTrait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Caller, Paging, audit, limit, page,
};

/// The body of a project create or PATCH (unknown fields are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectBody {
    pub title: Option<String>,
    pub data_key: Option<String>,
}

fn check_fields(body: &ProjectBody) -> ApiResult<()> {
    let max = labelsync::storage::spec::MAX_TITLE_CHARS;
    if body
        .title
        .as_deref()
        .is_some_and(|t| t.trim().is_empty() || t.chars().count() > max)
    {
        return Err(ApiError::bad_request(
            "invalid_title",
            "title",
            format!("title must not be empty, and at most {max} characters"),
        ));
    }
    if let Some(key) = &body.data_key
        && !projects::is_valid_data_key(key)
    {
        return Err(ApiError::bad_request(
            "invalid_data_key",
            "data_key",
            projects::DATA_KEY_RULE,
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

pub async fn find(db: &impl ConnectionTrait, id: i64) -> ApiResult<project::Model> {
    projects::find(db, id).await?.ok_or_else(|| missing(id))
}

/// A body naming a project that does not exist (or that the caller may
/// not see: the same answer).
pub fn unknown(id: i64) -> ApiError {
    ApiError::bad_request(
        "unknown_project",
        "project_id",
        format!("project {id} does not exist"),
    )
}

pub fn missing(id: i64) -> ApiError {
    ApiError::not_found(format!("project {id} not found"))
}

/// The project, when it exists and the caller may see it (else the same
/// 404 either way).
pub async fn find_for(
    db: &impl ConnectionTrait,
    caller: &Caller,
    id: i64,
) -> ApiResult<project::Model> {
    caller.check(id, || missing(id))?;
    find(db, id).await
}

/// [`find_for`] for the project a body names (`project_id`): one the caller
/// cannot see is `400 unknown_project`; any other failure (the database
/// unavailable: `503`) stays what it is.
pub async fn find_named(
    db: &impl ConnectionTrait,
    caller: &Caller,
    id: i64,
) -> ApiResult<project::Model> {
    find_for(db, caller, id).await.map_err(|err| {
        if err.status == StatusCode::NOT_FOUND {
            unknown(id)
        } else {
            err
        }
    })
}

pub async fn create(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<ProjectBody>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    check_fields(&body)?;
    let title = body
        .title
        .clone()
        .ok_or_else(|| ApiError::bad_request("missing_field", "title", "title is required"))?;
    let data_key = body.data_key.clone().unwrap_or_else(|| "image".into());
    let txn = db::begin_write(&state.db).await?;
    let model = projects::create(&txn, &title, &data_key).await?;
    caller.check(model.id, || missing(model.id))?;
    audit::write_in(&caller, &txn, StatusCode::CREATED).await?;
    txn.commit().await?;
    caller.audited();
    Ok((StatusCode::CREATED, ApiJson(to_json(&model, 0))))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let found = projects::page(&state.db, q.after, limit, caller.projects()).await?;
    let ids: Vec<i64> = found.iter().map(|p| p.id).collect();
    let counts = projects::task_counts(&state.db, &ids).await?;
    let items = found
        .iter()
        .map(|p| to_json(p, counts.get(&p.id).copied().unwrap_or(0)))
        .collect();
    Ok(ApiJson(page(items, limit, ids.last())))
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let p = find_for(&state.db, &caller, id).await?;
    let counts = projects::task_counts(&state.db, &[id]).await?;
    Ok(ApiJson(to_json(&p, counts.get(&id).copied().unwrap_or(0))))
}

pub async fn update(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ProjectBody>,
) -> ApiResult<ApiJson<Value>> {
    check_fields(&body)?;
    let current = find_for(&state.db, &caller, id).await?;
    let txn = db::begin_write(&state.db).await?;
    let p = projects::update(&txn, current, body.title, body.data_key).await?;
    audit::write_in(&caller, &txn, StatusCode::OK).await?;
    txn.commit().await?;
    caller.audited();
    let counts = projects::task_counts(&state.db, &[id]).await?;
    Ok(ApiJson(to_json(&p, counts.get(&id).copied().unwrap_or(0))))
}

/// Deletes the project; its storages, tasks, links and runs go with it
/// (ON DELETE CASCADE).
pub async fn delete(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    caller.check(id, || missing(id))?;
    let txn = db::begin_write(&state.db).await?;
    if !projects::delete(&txn, id).await? {
        return Err(missing(id));
    }
    audit::write_in(&caller, &txn, StatusCode::NO_CONTENT).await?;
    txn.commit().await?;
    state.storage_cache.forget();
    caller.audited();
    Ok(StatusCode::NO_CONTENT)
}
