//! The audit trail: a row for every mutating request a caller was let in
//! for (docs/API.md, "Audit trail"), and `GET /api/v1/audit` for admins.
//!
//! A handler whose change is one transaction writes the row in it
//! ([`write_in`], with the status it is about to answer), so the change
//! and its row commit together or not at all. For every other request the
//! layer writes the row once the handler has answered, with the outcome (a
//! refused or failed request is recorded too). The row names the route, the
//! ids in the path and those the handler noted through [`Caller::note`] and
//! [`Caller::check`] (the project), never a body or a query string, so no
//! secret reaches it. Reads are not recorded, nor are idempotent replays
//! (they change nothing) or unauthenticated requests.
use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{Method, StatusCode},
    middleware::Next,
    response::Response,
};
use labelsync::db::audit::{self, AuditFilter, Entry};
use sea_orm::ConnectionTrait;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    ApiJson, ApiQuery, ApiResult, AppState,
    access::{self, Caller, Note},
    limit, page,
};

/// The most of a request's path an audit row keeps, in characters.
const PATH_KEPT: usize = 2048;

/// The middleware, outside the scope check (so refusals are recorded).
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mutation = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let Some(caller) = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .filter(|_| mutation)
    else {
        return next.run(req).await;
    };
    let route = access::route_of(&req);
    let mut entry = Entry {
        at: labelsync::clock::now(),
        token_id: caller.token_id,
        token_name: caller.name.clone(),
        // The column's width: longer (custom) methods are only ever 405s.
        method: req.method().as_str().chars().take(16).collect(),
        // The path as sent: inside the nested API router `uri()` lacks
        // its `/api/v1` (the route beside it has it).
        path: req
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or_else(|| req.uri().path(), |original| original.path())
            .chars()
            .take(PATH_KEPT)
            .collect(),
        resource: Value::Null,
        project_id: None,
        status: 0,
        request_id: super::request_id_of(req.headers()),
        client: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string()),
        route: format!("{}{route}", super::PREFIX),
    };
    entry.resource = Value::Object(ids_in_path(&route, &entry.path));
    caller.set_draft(entry);
    let response = next.run(req).await;
    let note = caller.noted();
    if note.written {
        return response;
    }
    let Some(entry) = completed(&note, response.status()) else {
        return response;
    };
    if let Err(err) = audit::record(&state.db, entry).await {
        tracing::error!(error = %err, "audit row not written");
    }
    response
}

/// The drafted row with what the handler noted and the answer's status.
fn completed(note: &Note, status: StatusCode) -> Option<Entry> {
    let mut entry = note.draft.clone()?;
    if let Value::Object(ids) = &mut entry.resource {
        ids.extend(note.ids.clone());
    }
    entry.project_id = note.project_id;
    entry.status = status.as_u16();
    Some(entry)
}

/// The request's audit row as answered with `status`, for a db function
/// that writes it with its change; after the commit the handler calls
/// [`Caller::audited`], as with [`write_in`].
pub fn entry(caller: &Caller, status: StatusCode) -> Option<Entry> {
    completed(&caller.noted(), status)
}

/// Writes the request's audit row in `txn`, the transaction of its change,
/// as answered with `status`; after the commit the handler calls
/// [`Caller::audited`] so the layer writes no second row. (If the commit
/// fails, the layer records the failure instead.)
pub async fn write_in(
    caller: &Caller,
    txn: &impl ConnectionTrait,
    status: StatusCode,
) -> ApiResult<()> {
    if let Some(entry) = entry(caller, status) {
        audit::record(txn, entry).await?;
    }
    Ok(())
}

/// The ids a path names, keyed by the segment before each: the route
/// `/storages/{id}` and the path `/api/v1/storages/5` give `{"storages": 5}`.
/// Each is percent-decoded, as the router decodes it: `/storages/%35`
/// deletes storage 5, and its row must say 5 (it said "%35", so a writer
/// could keep the rows from naming what it touched).
fn ids_in_path(route: &str, path: &str) -> Map<String, Value> {
    let path = path.strip_prefix(super::PREFIX).unwrap_or(path);
    let template: Vec<&str> = route.split('/').collect();
    let actual: Vec<&str> = path.split('/').collect();
    let mut ids = Map::new();
    for (i, segment) in template.iter().enumerate() {
        if !segment.starts_with('{') || i == 0 {
            continue;
        }
        let (Some(name), Some(value)) = (template.get(i - 1), actual.get(i)) else {
            continue;
        };
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        let value = value
            .parse::<i64>()
            .map_or_else(|_| Value::from(value.as_ref()), Value::from);
        ids.insert((*name).to_owned(), value);
    }
    ids
}

/// `?token_id=&project_id=&limit=&after=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    token_id: Option<i64>,
    project_id: Option<i64>,
    limit: Option<u64>,
    after: Option<i64>,
}

/// `GET /api/v1/audit`: oldest first, paged by id.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let filter = AuditFilter {
        token_id: q.token_id,
        project_id: q.project_id,
        after: q.after,
    };
    let rows = audit::page(&state.db, filter, limit).await?;
    let last = rows.last().map(|r| r.id);
    Ok(ApiJson(page(
        rows.iter().map(audit::to_json).collect(),
        limit,
        last,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_ids_are_named_by_the_segment_before() {
        let ids = ids_in_path(
            "/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            "/api/v1/webhooks/3/deliveries/9/redeliver",
        );
        assert_eq!(
            Value::Object(ids),
            serde_json::json!({"webhooks": 3, "deliveries": 9})
        );
        let ids = ids_in_path("/runs/{id}/cancel", "/api/v1/runs/01JABC/cancel");
        assert_eq!(Value::Object(ids), serde_json::json!({"runs": "01JABC"}));
        assert!(ids_in_path("/projects", "/api/v1/projects").is_empty());
        let ids = ids_in_path("/storages/{id}", "/api/v1/storages/%35");
        assert_eq!(Value::Object(ids), serde_json::json!({"storages": 5}));
    }
}
