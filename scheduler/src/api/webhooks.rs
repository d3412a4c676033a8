//! `/api/v1/webhooks`: endpoints that receive signed events, their
//! delivery log, test sends and redelivery (docs/API.md, "Webhooks").
use super::NoQuery;
use axum::{Extension, extract::State, http::StatusCode};
use labelsync::{
    db::{
        entities::{webhook, webhook_attempt, webhook_delivery},
        webhooks::{self, NewWebhook},
    },
    security::secrets::Reseal,
    webhooks::{Sender, generate_secret, seal_secret, secret_key},
};
use sea_orm::{ActiveValue::Set, IntoActiveModel};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Caller, Paging, limit, page,
    projects,
};

/// The longest URL an endpoint may have.
const MAX_URL_LEN: usize = 2048;

/// The endpoint, when it exists and the caller may see it (else the same
/// 404 either way). An endpoint of every project is only for callers not
/// held to projects.
async fn find(state: &AppState, caller: &Caller, id: i64) -> ApiResult<webhook::Model> {
    let missing = || ApiError::not_found(format!("webhook {id} not found"));
    let hook = webhooks::find(&state.db, id).await?.ok_or_else(missing)?;
    match hook.project_id {
        Some(project_id) => caller.check(project_id, missing)?,
        None if caller.projects().is_some() => return Err(missing()),
        None => {}
    }
    Ok(hook)
}

/// An endpoint as the API shows it: never its secret.
fn to_json(hook: &webhook::Model) -> Value {
    json!({
        "id": hook.id,
        "project_id": hook.project_id,
        "url": hook.url,
        "events": webhooks::decode_events(&hook.events),
        "enabled": hook.enabled,
        "disabled_reason": hook.disabled_reason,
        "failing_since": hook.failing_since,
        "previous_secret_expires_at": labelsync::webhooks::previous_signs_until(hook),
        "created_at": hook.created_at,
        "updated_at": hook.updated_at,
    })
}

/// The body of `POST /webhooks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    project_id: Option<i64>,
    #[serde(default)]
    secret: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let secrets = state.storage_env.secret_box()?;
    let events = check_events(&body.events)?;
    let secret = match body.secret {
        Some(secret) => {
            secret_key(&secret)?;
            secret
        }
        None => generate_secret()?,
    };
    match body.project_id {
        Some(project_id) => check_project(&state, &caller, project_id).await?,
        None if caller.projects().is_some() => {
            return Err(ApiError::bad_request(
                "missing_field",
                "project_id",
                "a token held to projects must give project_id: an endpoint of every project would receive other projects' events",
            ));
        }
        None => {}
    }
    // Last: it may resolve the host name.
    let url = check_url(&state, &body.url).await?;
    let new = NewWebhook {
        project_id: body.project_id,
        url,
        events,
    };
    let most = state.settings.max_webhooks_per_project;
    let hook =
        webhooks::create(&state.db, new, most, |id| seal_secret(secrets, id, &secret)).await?;
    caller.note("webhook_id", hook.id);
    let mut shown = to_json(&hook);
    // The only time the secret is shown: receivers verify with it.
    shown["secret"] = secret.into();
    Ok((StatusCode::CREATED, ApiJson(shown)))
}

/// An endpoint URL: http(s), no credentials, and an address the SSRF guard
/// lets webhooks reach (`LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS`).
async fn check_url(state: &AppState, raw: &str) -> ApiResult<String> {
    // Characters, as the document's maxLength counts them (not bytes).
    if raw.chars().count() > MAX_URL_LEN {
        return Err(ApiError::bad_request(
            "invalid_url",
            "url",
            format!("url must be at most {MAX_URL_LEN} characters"),
        ));
    }
    let url = labelsync::security::net::parse_endpoint(raw, "url")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::bad_request(
            "invalid_url",
            "url",
            "url must not hold credentials (they would be shown to every API user); receivers authenticate labelsync by the webhook signature",
        ));
    }
    Ok(state
        .settings
        .webhook_policy
        .check_url(raw, "url")
        .await?
        .to_string())
}

/// A non-empty list of known event types (or `["*"]`: every type), stored
/// without duplicates.
fn check_events(events: &[String]) -> ApiResult<String> {
    let mut list: Vec<String> = Vec::new();
    for event in events {
        let known = event == "*" || webhooks::EVENT_TYPES.contains(&event.as_str());
        if !known {
            return Err(ApiError::bad_request(
                "invalid_events",
                "events",
                format!(
                    "unknown event type {event:?}; events must be \"*\" or among {}",
                    webhooks::EVENT_TYPES.join(", ")
                ),
            ));
        }
        if !list.contains(event) {
            list.push(event.clone());
        }
    }
    if list.is_empty() || (list.len() > 1 && list.iter().any(|e| e == "*")) {
        return Err(ApiError::bad_request(
            "invalid_events",
            "events",
            "events must list at least one event type, or be [\"*\"] alone for every type",
        ));
    }
    Ok(webhooks::encode_events(&list))
}

async fn check_project(state: &AppState, caller: &Caller, project_id: i64) -> ApiResult<()> {
    projects::find_named(&state.db, caller, project_id).await?;
    Ok(())
}

/// The filters and paging of `GET /api/v1/webhooks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookQuery {
    project_id: Option<i64>,
    limit: Option<u64>,
    after: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<WebhookQuery>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let rows = webhooks::page(&state.db, q.project_id, caller.projects(), q.after, limit).await?;
    let last = rows.last().map(|h| h.id);
    Ok(ApiJson(page(
        rows.iter().map(to_json).collect(),
        limit,
        last,
    )))
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    Ok(ApiJson(to_json(&find(&state, &caller, id).await?)))
}

/// The body of `PATCH /webhooks/{id}`: what is given replaces.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    url: Option<String>,
    events: Option<Vec<String>>,
    enabled: Option<bool>,
    secret: Option<String>,
    /// How long from now the secret replaced last still signs deliveries
    /// beside the current one: with `secret`, the one it replaces (default
    /// a day); 0 drops it at once.
    keep_previous_secret_seconds: Option<i64>,
}

/// How long a rotated webhook secret's predecessor still signs deliveries
/// unless the PATCH says otherwise.
const KEEP_PREVIOUS_SECRET: i64 = 86_400;
/// The longest a PATCH may keep it.
const KEEP_PREVIOUS_SECRET_MAX: i64 = 7 * 86_400;

pub async fn update(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<PatchBody>,
) -> ApiResult<ApiJson<Value>> {
    let hook = find(&state, &caller, id).await?;
    let read_at = hook.updated_at;
    let signing = labelsync::webhooks::previous_signs_until(&hook).is_some();
    let mut row = hook.into_active_model();
    if let Some(url) = body.url {
        row.url = Set(check_url(&state, &url).await?);
    }
    if let Some(events) = body.events {
        row.events = Set(check_events(&events)?);
    }
    let keep = body.keep_previous_secret_seconds;
    if let Some(secret) = &body.secret {
        rotate(&state, &mut row, secret)?;
    }
    if body.secret.is_some() || keep.is_some() {
        let keep = keep.unwrap_or(KEEP_PREVIOUS_SECRET);
        keep_previous_secret(&mut row, keep, body.secret.is_some() || signing)?;
    }
    if let Some(enabled) = body.enabled {
        row.enabled = Set(enabled);
        if enabled {
            // A fresh start: the failure clock runs from the next failure.
            row.disabled_reason = Set(None);
            row.failing_since = Set(None);
        } else {
            row.disabled_reason = Set(Some("disabled by request".into()));
        }
    }
    Ok(ApiJson(to_json(
        &webhooks::save(&state.db, row, read_at).await?,
    )))
}

/// Replaces the endpoint's secret with `secret`, keeping the one it
/// replaces as the previous one ([`keep_previous_secret`] says for how
/// long). A rotation within that time keeps only the secret it replaced
/// (the one before goes).
fn rotate(state: &AppState, row: &mut webhook::ActiveModel, secret: &str) -> ApiResult<()> {
    secret_key(secret)?;
    let id = *row.id.as_ref();
    let secrets = state.storage_env.secret_box()?;
    let replaced = row.secret.as_ref().clone();
    row.secret = Set(seal_secret(secrets, id, secret)?);
    // Kept sealed under the key: one copied as read, sealed under a
    // fallback, would not open once the fallbacks go (`reseal` may have
    // sealed the row's copy again meanwhile). One that no longer opens
    // (sealed under a key given up: the very case a new secret mends)
    // signs nothing: not kept.
    let context = labelsync::webhooks::secret_context(id);
    row.previous_secret = Set(match secrets.reseal(&context, &replaced)? {
        Reseal::Current => Some(replaced),
        Reseal::Sealed(resealed) => Some(resealed),
        Reseal::Unopenable => None,
    });
    Ok(())
}

/// Has the previous secret sign deliveries beside the current one for
/// `keep` seconds from now, so receivers switched over meanwhile reject
/// none; 0 drops it at once (one that leaked, or every receiver switched).
/// `held`: there is one to keep, rotated out just now or still signing
/// (one whose time is up is not brought back).
fn keep_previous_secret(row: &mut webhook::ActiveModel, keep: i64, held: bool) -> ApiResult<()> {
    if !(0..=KEEP_PREVIOUS_SECRET_MAX).contains(&keep) {
        return Err(labelsync::Error::invalid(
            "invalid_body",
            Some("keep_previous_secret_seconds"),
            format!(
                "keep_previous_secret_seconds must be 0 to {KEEP_PREVIOUS_SECRET_MAX} (seven days)"
            ),
        )
        .into());
    }
    let kept = keep > 0 && held;
    let until = labelsync::clock::now() + chrono::Duration::seconds(keep);
    if !kept {
        row.previous_secret = Set(None);
    }
    row.previous_secret_until = Set(kept.then_some(until));
    Ok(())
}

pub async fn delete(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    find(&state, &caller, id).await?;
    if !webhooks::delete(&state.db, id).await? {
        return Err(ApiError::not_found(format!("webhook {id} not found")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a `webhook.test` event to the endpoint now, once, and answers
/// with the delivery and its attempt (whatever the endpoint answered).
pub async fn test(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let hook = find(&state, &caller, id).await?;
    let keys = labelsync::webhooks::open_secrets(state.storage_env.secret_box()?, &hook)?;
    // Held for two attempts' time: this one, and its recording.
    let held = labelsync::webhooks::ATTEMPT_TIMEOUT * 2;
    let (delivery, event) = webhooks::record_test(&state.db, &hook, held).await?;
    let sender = Sender::new(&state.settings.webhook_policy)?;
    let log = sender.send(&hook.url, &keys, &event).await;
    let after = if log.error.is_none() {
        webhooks::AfterAttempt::Delivered
    } else {
        webhooks::AfterAttempt::GiveUp { disable: None }
    };
    let delivery =
        webhooks::record_attempt(&state.db, &delivery, &log, &after, webhooks::Sent::Test).await?;
    delivery_json(&state, delivery, webhooks::TEST_EVENT.into()).await
}

/// A delivery with its latest [`ATTEMPTS_SHOWN`] attempts.
async fn delivery_json(
    state: &AppState,
    delivery: webhook_delivery::Model,
    event_type: String,
) -> ApiResult<ApiJson<Value>> {
    let attempts = webhooks::latest_attempts_of(&state.db, &[delivery.id], ATTEMPTS_SHOWN).await?;
    let mut shown = delivery_to_json(&delivery, &event_type);
    shown["attempts"] = attempts.iter().map(attempt_to_json).collect();
    Ok(ApiJson(shown))
}

fn delivery_to_json(d: &webhook_delivery::Model, event_type: &str) -> Value {
    json!({
        "id": d.id,
        "webhook_id": d.webhook_id,
        "event_id": d.event_id,
        "event_type": event_type,
        "status": d.status,
        "attempt_count": d.attempts,
        "next_attempt_at": (d.status == webhooks::PENDING).then_some(d.next_attempt_at),
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": d.created_at,
        "finished_at": d.finished_at,
    })
}

fn attempt_to_json(a: &webhook_attempt::Model) -> Value {
    json!({
        "started_at": a.started_at,
        "status_code": a.status_code,
        "response_body": a.response_body,
        "error": a.error,
        "duration_ms": a.duration_ms,
    })
}

/// Attempts shown with each delivery of a list (`attempt_count` counts
/// them all).
const ATTEMPTS_LISTED: u64 = 10;
/// Attempts shown on one delivery's page: every one it had, unless it was
/// redelivered without end (each redelivery adds one, and the page was
/// built whole: a day of a looped redeliver made it a gigabyte).
const ATTEMPTS_SHOWN: u64 = 1000;

/// `GET /webhooks/{id}/deliveries`: newest first, each with its latest
/// attempts; `after` is a delivery id (the page holds older ones).
pub async fn deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<Paging>,
) -> ApiResult<ApiJson<Value>> {
    find(&state, &caller, id).await?;
    let limit = limit(q.limit)?;
    let rows = webhooks::deliveries_page(&state.db, id, q.after, limit).await?;
    let ids: Vec<i64> = rows.iter().map(|(d, _)| d.id).collect();
    let attempts = webhooks::latest_attempts_of(&state.db, &ids, ATTEMPTS_LISTED).await?;
    let items = rows
        .iter()
        .map(|(d, event_type)| {
            let mut shown = delivery_to_json(d, event_type);
            shown["attempts"] = attempts
                .iter()
                .filter(|a| a.delivery_id == d.id)
                .map(attempt_to_json)
                .collect();
            shown
        })
        .collect();
    Ok(ApiJson(page(items, limit, ids.last())))
}

async fn find_delivery(
    state: &AppState,
    caller: &Caller,
    webhook_id: i64,
    delivery_id: i64,
) -> ApiResult<webhook_delivery::Model> {
    find(state, caller, webhook_id).await?;
    webhooks::delivery(&state.db, webhook_id, delivery_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "delivery {delivery_id} of webhook {webhook_id} not found"
            ))
        })
}

pub async fn delivery(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath((id, delivery_id)): ApiPath<(i64, i64)>,
) -> ApiResult<ApiJson<Value>> {
    let delivery = find_delivery(&state, &caller, id, delivery_id).await?;
    let event_type = event_type_of(&state, &delivery).await?;
    delivery_json(&state, delivery, event_type).await
}

async fn event_type_of(state: &AppState, delivery: &webhook_delivery::Model) -> ApiResult<String> {
    let rows =
        webhooks::deliveries_page(&state.db, delivery.webhook_id, Some(delivery.id + 1), 1).await?;
    Ok(rows.into_iter().next().map(|(_, t)| t).unwrap_or_default())
}

/// Queues a delivery again (due now), whatever became of it; the endpoint
/// must be enabled for it to go out.
pub async fn redeliver(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath((id, delivery_id)): ApiPath<(i64, i64)>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let delivery = find_delivery(&state, &caller, id, delivery_id).await?;
    let event_type = event_type_of(&state, &delivery).await?;
    let delivery = webhooks::redeliver(&state.db, delivery).await?;
    if let Err(err) = labelsync::jobs::dispatch_redelivery(&state.queue, &delivery).await {
        tracing::debug!(error = %err, "webhook dispatch failed; the tick will");
    }
    let ApiJson(shown) = delivery_json(&state, delivery, event_type).await?;
    Ok((StatusCode::ACCEPTED, ApiJson(shown)))
}
