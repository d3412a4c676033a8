//! `/api/v1/tokens` (admin only): create a token (its secret is in the
//! answer and nowhere else, ever), list, read, revoke.
use super::NoQuery;
use axum::{extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use labelsync::{
    db::{
        self,
        tokens::{self, NewToken},
    },
    security::tokens::Scope,
};
use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Paging, access::Caller, audit,
    limit, page,
};

/// The body of `POST /tokens` (unknown fields are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    name: Option<String>,
    scope: Option<String>,
    projects: Option<Vec<i64>>,
    expires_at: Option<DateTime<Utc>>,
}

fn new_token(body: TokenBody) -> ApiResult<NewToken> {
    let name = body
        .name
        .ok_or_else(|| ApiError::bad_request("missing_field", "name", "name is required"))?;
    let scope = body
        .scope
        .as_deref()
        .and_then(Scope::parse)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_scope",
                "scope",
                "scope must be one of admin, write, read, ops",
            )
        })?;
    Ok(NewToken {
        name,
        scope,
        projects: body.projects,
        expires_at: body.expires_at,
    })
}

pub async fn create(
    State(state): State<AppState>,
    _: NoQuery,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(body): ApiJson<TokenBody>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let new = new_token(body)?;
    tokens::check(&state.db, &new).await?;
    let txn = db::begin_write(&state.db).await?;
    let (model, secret) = tokens::create(&txn, new).await?;
    caller.note("token_id", model.id);
    audit::write_in(&caller, &txn, StatusCode::CREATED).await?;
    txn.commit().await?;
    caller.audited();
    let mut value = tokens::to_json(&model);
    value["secret"] = Value::from(secret);
    Ok((StatusCode::CREATED, ApiJson(value)))
}

pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let rows = tokens::page(&state.db, q.after, limit).await?;
    let last = rows.last().map(|t| t.id);
    Ok(ApiJson(page(
        rows.iter().map(tokens::to_json).collect(),
        limit,
        last,
    )))
}

fn missing(id: i64) -> ApiError {
    ApiError::not_found(format!("token {id} not found"))
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let token = tokens::find(&state.db, id)
        .await?
        .ok_or_else(|| missing(id))?;
    Ok(ApiJson(tokens::to_json(&token)))
}

/// Revokes: the token is refused from now on, on every replica; its row
/// stays so the audit trail can name it.
pub async fn revoke(
    State(state): State<AppState>,
    _: NoQuery,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    let txn = db::begin_write(&state.db).await?;
    tokens::revoke(&txn, id).await?.ok_or_else(|| missing(id))?;
    audit::write_in(&caller, &txn, StatusCode::NO_CONTENT).await?;
    txn.commit().await?;
    caller.audited();
    Ok(StatusCode::NO_CONTENT)
}
