//! Annotations: created on a task, updated and deleted by upstream apps.
//!
//! Each write records, all or nothing with the change, one outbox event per
//! target storage of the project (`db::outbox`) and its audit row; then
//! export runs are started for those storages. If that start fails (Redis
//! down), the events wait in the outbox and the scheduler's tick starts the
//! runs later: an annotation saved is an annotation exported.
use super::NoQuery;
use axum::{Extension, extract::State, http::StatusCode};
use labelsync::{
    db::{
        self,
        annotations::{self, AnnotationFields},
        entities::annotation,
        outbox,
    },
    jobs,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiPath, ApiResult, AppState, Caller, audit};

pub fn to_json(a: &annotation::Model) -> Value {
    json!({
        "id": a.id, "task_id": a.task_id, "project_id": a.project_id,
        "result": a.result, "completed_by": a.completed_by, "lead_time": a.lead_time,
        "was_cancelled": a.was_cancelled, "ground_truth": a.ground_truth,
        "created_at": a.created_at, "updated_at": a.updated_at,
    })
}

/// The fields a create or a PATCH may give (a PATCH keeps what it omits).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationBody {
    result: Option<Value>,
    /// `null` clears it (read as there: see [`present`]).
    #[serde(default, deserialize_with = "present")]
    completed_by: Option<Value>,
    lead_time: Option<f64>,
    was_cancelled: Option<bool>,
    ground_truth: Option<bool>,
}

/// A field given, `null` included: `Option<Value>` reads a `null` as an
/// absent field, so `PATCH {"completed_by": null}` kept the completer the
/// docs said it cleared.
fn present<'de, D: serde::Deserializer<'de>>(field: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(field).map(Some)
}

impl AnnotationBody {
    fn check(&self) -> ApiResult<()> {
        if self.result.as_ref().is_some_and(|r| !r.is_array()) {
            return Err(ApiError::bad_request(
                "invalid_result",
                "result",
                "result must be a JSON array of regions (Label Studio's annotation result)",
            ));
        }
        if self
            .completed_by
            .as_ref()
            .is_some_and(|c| !c.is_object() && !c.is_null())
        {
            return Err(ApiError::bad_request(
                "invalid_completed_by",
                "completed_by",
                "completed_by must be an object such as {\"id\": 1, \"email\": \"a@b.c\"}",
            ));
        }
        if self.lead_time.is_some_and(|t| !t.is_finite() || t < 0.0) {
            return Err(ApiError::bad_request(
                "invalid_lead_time",
                "lead_time",
                "lead_time must be a number of seconds, 0 or more",
            ));
        }
        Ok(())
    }

    /// The fields besides `result`, for the db functions.
    fn fields(&self) -> AnnotationFields {
        AnnotationFields {
            completed_by: self.completed_by.clone(),
            lead_time: self.lead_time,
            was_cancelled: self.was_cancelled,
            ground_truth: self.ground_truth,
        }
    }
}

/// The annotation, when it exists and the caller may see its project
/// (else the same 404 either way).
async fn find(state: &AppState, caller: &Caller, id: i64) -> ApiResult<annotation::Model> {
    let missing = || ApiError::not_found(format!("annotation {id} not found"));
    let found = annotations::find(&state.db, id)
        .await?
        .ok_or_else(missing)?;
    caller.check(found.project_id, missing)?;
    Ok(found)
}

/// Starts export runs for the storages an event was recorded for. Failures
/// are logged only: the events are safe in the outbox.
async fn dispatch(state: &AppState, storages: Vec<i64>) {
    for storage_id in storages {
        if let Err(err) =
            jobs::enqueue_events(&state.db, &state.queue, &state.settings, storage_id).await
        {
            tracing::warn!(storage_id, error = %err, "export run not started; the scheduler will");
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(task_id): ApiPath<i64>,
    ApiJson(body): ApiJson<AnnotationBody>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    body.check()?;
    let Some(result) = body.result.clone() else {
        return Err(ApiError::bad_request(
            "missing_field",
            "result",
            "result is required",
        ));
    };
    // The task is read by the insert itself, which writes nothing for a
    // task the caller may not see: the same 404 as a missing one.
    let recorded = annotations::Recorded {
        visible: caller.projects().map(<[i64]>::to_vec),
        audit: audit::entry(&caller, StatusCode::CREATED),
    };
    let created =
        annotations::create_recorded(&state.point_db, task_id, result, body.fields(), recorded)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("task {task_id} not found")))?;
    caller.audited();
    dispatch(&state, created.targets).await;
    Ok((StatusCode::CREATED, ApiJson(to_json(&created.annotation))))
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    Ok(ApiJson(to_json(&find(&state, &caller, id).await?)))
}

pub async fn update(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<AnnotationBody>,
) -> ApiResult<ApiJson<Value>> {
    body.check()?;
    let current = find(&state, &caller, id).await?;
    let fields = body.fields();
    let txn = db::begin_write(&state.db).await?;
    let saved = annotations::update(&txn, current, body.result, fields).await?;
    let targets = outbox::record(&txn, saved.project_id, saved.id, outbox::UPSERT).await?;
    audit::write_in(&caller, &txn, StatusCode::OK).await?;
    txn.commit().await?;
    caller.audited();
    dispatch(&state, targets).await;
    Ok(ApiJson(to_json(&saved)))
}

pub async fn delete(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    let current = find(&state, &caller, id).await?;
    let txn = db::begin_write(&state.db).await?;
    // The outbox first: it keeps the keys of the links the delete drops,
    // read once an export commit in flight has written them.
    annotations::lock(&txn, id).await?;
    let targets = outbox::record(&txn, current.project_id, id, outbox::DELETE).await?;
    annotations::delete(&txn, id).await?;
    audit::write_in(&caller, &txn, StatusCode::NO_CONTENT).await?;
    txn.commit().await?;
    caller.audited();
    dispatch(&state, targets).await;
    Ok(StatusCode::NO_CONTENT)
}
