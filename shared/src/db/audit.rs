//! The audit trail (`audit_events`): one row per mutating API request,
//! written by the API's audit layer, read by `GET /api/v1/audit`, pruned by
//! the scheduler's tick after `LABELSYNC_AUDIT_RETENTION_DAYS`.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::entities::audit_event::{self, Column as C};
use crate::Result;

/// One request's row, as the audit layer fills it.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub token_id: Option<i64>,
    pub token_name: String,
    pub method: String,
    pub route: String,
    pub path: String,
    pub project_id: Option<i64>,
    pub resource: serde_json::Value,
    pub status: u16,
    pub request_id: String,
    pub client: Option<String>,
}

pub async fn record(db: &impl ConnectionTrait, entry: Entry) -> Result<()> {
    let row = audit_event::ActiveModel {
        at: Set(entry.at),
        token_id: Set(entry.token_id),
        token_name: Set(entry.token_name),
        method: Set(entry.method),
        route: Set(entry.route),
        path: Set(entry.path),
        project_id: Set(entry.project_id),
        resource: Set(entry.resource.to_string()),
        status: Set(i32::from(entry.status)),
        request_id: Set(entry.request_id),
        client: Set(entry.client),
        ..Default::default()
    };
    audit_event::Entity::insert(row)
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The filters of [`page`] (`None`: any).
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditFilter {
    pub token_id: Option<i64>,
    pub project_id: Option<i64>,
    /// Rows with ids above this one.
    pub after: Option<i64>,
}

/// Up to `limit` rows matching `filter`, oldest first.
pub async fn page(
    db: &impl ConnectionTrait,
    filter: AuditFilter,
    limit: u64,
) -> Result<Vec<audit_event::Model>> {
    let mut query = audit_event::Entity::find().order_by_asc(C::Id).limit(limit);
    if let Some(token_id) = filter.token_id {
        query = query.filter(C::TokenId.eq(token_id));
    }
    if let Some(project_id) = filter.project_id {
        query = query.filter(C::ProjectId.eq(project_id));
    }
    if let Some(after) = filter.after {
        query = query.filter(C::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Deletes the rows older than `before`; returns how many.
pub async fn prune(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64> {
    Ok(audit_event::Entity::delete_many()
        .filter(C::At.lt(before))
        .exec(db)
        .await?
        .rows_affected)
}

pub fn to_json(row: &audit_event::Model) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "at": row.at,
        "token": { "id": row.token_id, "name": row.token_name },
        "method": row.method,
        "route": row.route,
        "path": row.path,
        "project_id": row.project_id,
        "resource": serde_json::from_str::<serde_json::Value>(&row.resource).unwrap_or_default(),
        "status": row.status,
        "request_id": row.request_id,
        "client": row.client,
    })
}
