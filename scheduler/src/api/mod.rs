//! The HTTP API of `docs/API.md` (v1). One module per resource; this one
//! builds the router, the auth layer and the list conventions.
pub mod access;
mod annotations;
mod audit;
mod error;
mod events;
mod idempotency;
mod ops;
mod projects;
pub(crate) mod rate_limit;
mod resolve;
mod runs;
mod storage_cache;
mod storages;
mod streams;
mod tasks;
mod tokens;
mod webhooks;

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use labelsync::{config::Settings, jobs::Queue, storage::StorageEnv};
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use access::Caller;
pub use error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, NoQuery};
pub use idempotency::KEEP as IDEMPOTENCY_KEEP;
pub use ops::gone_after;
pub use storage_cache::{StorageCache, follow_changes};

/// Shared by every handler: cloned by each extractor and middleware of
/// every request, so a clone is one reference count (cloning the fields
/// themselves copied the storage settings' strings and the queue's
/// configuration several times a request).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub db: DatabaseConnection,
    /// The pool for point statements on hot paths (`db::point_pool`).
    pub point_db: DatabaseConnection,
    pub queue: Queue,
    pub settings: Arc<Settings>,
    pub storage_env: StorageEnv,
    pub limiter: Arc<rate_limit::RateLimiter>,
    /// Source storages for `/resolve`; changes call `forget` on it.
    pub storage_cache: Arc<StorageCache>,
    /// The event streams open now (see [`streams`]).
    pub streams: streams::Streams,
    /// The proxied `/resolve` bodies being sent now (see [`streams`]).
    pub proxied: streams::Streams,
    /// Whether a database token was ever made, once one is seen
    /// (`access::open_mode`).
    pub tokens_made: std::sync::atomic::AtomicBool,
}

impl AppState {
    pub fn new(
        db: DatabaseConnection,
        point_db: DatabaseConnection,
        queue: Queue,
        settings: Settings,
    ) -> Self {
        AppState(Arc::new(Shared {
            point_db,
            storage_env: StorageEnv::from_settings(&settings),
            limiter: Arc::new(rate_limit::RateLimiter::new(settings.rate_limit_per_minute)),
            storage_cache: Arc::new(StorageCache::new(settings.resolve_cache_ttl)),
            streams: streams::Streams::events(settings.http.max_connections),
            proxied: streams::Streams::proxied(settings.http.max_connections),
            tokens_made: std::sync::atomic::AtomicBool::new(false),
            db,
            queue,
            settings: Arc::new(settings),
        }))
    }
}

/// Request bodies larger than this are refused with 413 before parsing.
const MAX_BODY_BYTES: usize = 2 << 20;

/// The API under `/api/v1`, the probes, and `pages` (the ops console's
/// routes, under `/ui`) behind the same limits and tracing.
pub fn router(state: AppState, pages: Router<AppState>) -> Router {
    let detach_slots = Arc::new(Semaphore::new(state.settings.http.max_connections));
    let api = Router::new()
        .route("/projects", post(projects::create).get(projects::list))
        .route(
            "/projects/{id}",
            get(projects::get_one)
                .patch(projects::update)
                .delete(projects::delete),
        )
        .route("/projects/{id}/tasks", get(tasks::list))
        .route("/storages", post(storages::create).get(storages::list))
        .route("/storages/validate", post(storages::validate_new))
        .route(
            "/storages/{id}",
            get(storages::get_one)
                .patch(storages::update)
                .delete(storages::delete),
        )
        .route("/storages/{id}/validate", post(storages::validate_saved))
        .route("/storages/{id}/preview", get(storages::preview))
        .route("/storages/{id}/sync", post(storages::sync))
        .route("/storages/{id}/pause", post(storages::pause))
        .route("/storages/{id}/resume", post(storages::resume))
        .route("/runs", get(runs::list))
        .route("/runs/{id}", get(runs::get_one))
        .route("/runs/{id}/errors", get(runs::errors))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .route("/runs/{id}/retry", post(runs::retry))
        .route("/runs/{id}/events", get(events::run_events))
        .route("/events", get(events::project_events))
        .merge(task_routes())
        .merge(webhook_routes())
        .merge(admin_routes())
        .merge(fleet_routes())
        .route("/resolve", get(resolve::resolve))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such API route") })
        .method_not_allowed_fallback(method_not_allowed)
        // After routing, innermost first: the scope check, and around it
        // the audit row (so refusals are recorded).
        .route_layer(middleware::from_fn(access::check_scope))
        .route_layer(middleware::from_fn_with_state(state.clone(), audit::record))
        // Before routing, innermost first: a request is authenticated and
        // checked for NUL before its Idempotency-Key is claimed.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotent,
        ))
        .layer(middleware::from_fn(refuse_nul_in_url))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::limit,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), access::auth));
    Router::new()
        .nest(PREFIX, api)
        .merge(probe_routes())
        .merge(pages)
        .fallback(|| async {
            ApiError::not_found("no such path; the API is under /api/v1 (see /api/v1/openapi.json)")
        })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_declared_oversize))
        .layer(middleware::from_fn(refuse_long_uri))
        .layer(middleware::from_fn_with_state(
            detach_slots,
            run_changes_to_end,
        ))
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// A task, its annotations, and one annotation.
fn task_routes() -> Router<AppState> {
    Router::new()
        .route("/tasks/{id}", get(tasks::get_one))
        .route(
            "/tasks/{id}/annotations",
            get(tasks::annotations_of).post(annotations::create),
        )
        .route(
            "/annotations/{id}",
            get(annotations::get_one)
                .patch(annotations::update)
                .delete(annotations::delete),
        )
}

/// The orchestrator's probes and Prometheus' scrape (no token: they tell
/// nothing of any tenant's data).
fn probe_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
}

/// The routes of the probe listener (`LABELSYNC_PROBE_BIND`): the probes
/// and `/metrics` only, on connections of its own, so that they are
/// answered when every connection the API takes is busy.
pub fn probe_router(state: AppState) -> Router {
    probe_routes()
        .fallback(|| async {
            ApiError::not_found("no such path; this listener serves /healthz, /readyz and /metrics")
        })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// Where the API is mounted.
pub const PREFIX: &str = "/api/v1";

/// Tokens and the audit trail (admin only, see `access::ROUTES`).
fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/tokens", post(tokens::create).get(tokens::list))
        .route("/tokens/{id}", get(tokens::get_one).delete(tokens::revoke))
        .route("/audit", get(audit::list))
}

/// The fleet's queues and workers (admin and ops, see `access::ROUTES`).
fn fleet_routes() -> Router<AppState> {
    Router::new()
        .route("/queues", get(ops::queues))
        .route("/queues/dead/requeue", post(ops::requeue_dead))
        .route("/queues/dead/discard", post(ops::discard_dead))
        .route("/workers", get(ops::workers))
}

/// `/webhooks` and its delivery log.
fn webhook_routes() -> Router<AppState> {
    Router::new()
        .route("/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/webhooks/{id}",
            get(webhooks::get_one)
                .patch(webhooks::update)
                .delete(webhooks::delete),
        )
        .route("/webhooks/{id}/test", post(webhooks::test))
        .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/webhooks/{id}/deliveries/{delivery_id}",
            get(webhooks::delivery),
        )
        .route(
            "/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            post(webhooks::redeliver),
        )
}

/// One span per request, continuing the caller's trace when it sends a W3C
/// `traceparent`; jobs the request enqueues carry this span's context on.
/// The request id (the caller's `X-Request-Id` when it is a usable one,
/// else a new ULID) is on the span, so on every log line of the request,
/// and in the response's `X-Request-Id`.
async fn trace_request(mut req: Request, next: Next) -> Response {
    let request_id = request_id(req.headers());
    req.headers_mut().insert(REQUEST_ID, request_id.clone());
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        request_id = request_id.to_str().unwrap_or_default(),
        http.response.status_code = tracing::field::Empty,
    );
    labelsync::telemetry::set_parent(&span, &labelsync::telemetry::Headers(req.headers()));
    let mut response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response.headers_mut().insert(REQUEST_ID, request_id);
    response
}

/// Runs a request that changes something to its end on a task of its own.
/// hyper drops a request's future when its client goes away, and a change
/// cut off after its commit left its Idempotency-Key claimed with no answer
/// (a retry waited 30 s for a 409, and ran the change again once the claim
/// counted as abandoned) and its audit row unwritten. A read is dropped
/// with its client. A handler that panics answers 500. At most `slots`
/// (`LABELSYNC_MAX_CONNECTIONS`) run so at once: clients that send changes
/// and hang up cannot pile handlers up past the connection cap; past it a
/// change runs on its connection, as every request did before.
async fn run_changes_to_end(
    State(slots): State<Arc<Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let slot = if reads {
        None
    } else {
        slots.try_acquire_owned().ok()
    };
    let Some(slot) = slot else {
        return next.run(req).await;
    };
    let handled = next.run(req).instrument(tracing::Span::current());
    let detached = tokio::spawn(async move {
        let _slot = slot;
        handled.await
    });
    detached.await.unwrap_or_else(|err| {
        tracing::error!(error = %err, "a request's handler failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
        .into_response()
    })
}

const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The request id `trace_request` put on the request.
pub fn request_id_of(headers: &header::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The caller's request id if it is 1-128 visible ASCII characters (what
/// proxies and tracing tools send), else a new ULID.
fn request_id(headers: &header::HeaderMap) -> header::HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| (1..=128).contains(&v.len()) && v.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            header::HeaderValue::from_str(&ulid::Ulid::new().to_string())
                .unwrap_or(header::HeaderValue::from_static("unknown"))
        })
}

/// 405 with the API's error body; axum adds the `Allow` header.
async fn method_not_allowed(method: Method) -> ApiError {
    method_not_allowed_error(&method)
}

fn method_not_allowed_error(method: &Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on this path; the Allow header lists the methods it takes"
        ),
    )
}

/// Refuses a path or query holding a percent-encoded NUL (`%00`) with 400
/// `invalid_text`: no stored text may contain NUL (Postgres refuses it), so
/// such a parameter is bad input on every database, caught before any query.
async fn refuse_nul_in_url(req: Request, next: Next) -> Response {
    if has_nul_in_url(req.uri()) {
        return ApiError::invalid_text().into_response();
    }
    next.run(req).await
}

/// Whether the path or query of `uri` holds a percent-encoded NUL.
pub fn has_nul_in_url(uri: &axum::http::Uri) -> bool {
    let has_nul = |s: &str| percent_encoding::percent_decode_str(s).any(|b| b == 0);
    has_nul(uri.path()) || uri.query().is_some_and(has_nul)
}

/// The longest path and query taken, in bytes: a storage key of 1,024
/// characters of 3 UTF-8 bytes each, percent-encoded (9 KB), or a local
/// path encoded twice, fits with room to spare; hyper refuses heads past
/// 64 KiB itself.
pub const MAX_URI_BYTES: usize = 32 << 10;

/// Answers 414 to a longer request target before anything reads it: the
/// audit trail keeps a request's path, and hyper reads heads of hundreds of
/// KB, so any caller (a refused one too) wrote rows that size.
async fn refuse_long_uri(req: Request, next: Next) -> Response {
    let uri = req.uri();
    let len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if len > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the path and query must be at most {MAX_URI_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

/// Answers 413 from the `Content-Length` header alone, so a client that
/// announces a huge body is refused before any of it is read (the body
/// limit above covers bodies without a declared length).
async fn refuse_declared_oversize(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

/// The OpenAPI document of the routes above, kept by hand beside them
/// (`api/openapi.json`); a test checks every route it lists answers.
async fn openapi(_: NoQuery) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// `?limit=&after=` of every list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paging {
    pub limit: Option<u64>,
    pub after: Option<i64>,
}

pub const DEFAULT_LIMIT: u64 = 100;
pub const MAX_LIMIT: u64 = 1000;

pub fn limit(requested: Option<u64>) -> ApiResult<u64> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_limit",
            "limit",
            format!("limit must be between 1 and {MAX_LIMIT}, got {n}"),
        )),
    }
}

/// `{"items": [...], "next_after": id|null}`: `next_after` is set when the page
/// is full, so a client pages until it is null.
pub fn page<T: serde::Serialize, K: serde::Serialize>(
    items: Vec<T>,
    limit: u64,
    last_key: Option<K>,
) -> serde_json::Value {
    page_cut(items, limit, last_key, false)
}

/// The most the items of one list answer of large things (tasks) hold as
/// JSON, whatever `limit` asks: a page ends early there, with `next_after`
/// set (docs/API.md, "Lists"). Without it a `limit` of 1,000 tasks of
/// 16 MiB each was a 16 GB answer, held in the scheduler first.
pub const PAGE_BUDGET_BYTES: usize = 32 << 20;

/// [`page`] of a list that may have been `cut` short at
/// [`PAGE_BUDGET_BYTES`]: `next_after` is set then too.
pub fn page_cut<T: serde::Serialize, K: serde::Serialize>(
    items: Vec<T>,
    limit: u64,
    last_key: Option<K>,
    cut: bool,
) -> serde_json::Value {
    let more = cut || items.len() as u64 == limit;
    serde_json::json!({ "items": items, "next_after": if more { last_key } else { None } })
}
