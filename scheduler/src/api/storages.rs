//! `/api/v1/storages`: create, read, patch, delete, validate, preview, sync.
use super::NoQuery;
use std::sync::Arc;

use axum::{Extension, extract::State, http::StatusCode};
use futures::StreamExt;
use labelsync::{
    Error,
    db::{
        self,
        entities::{storage, sync_run},
        runs,
        storages::{self, StorageFilter},
    },
    jobs,
    storage::{
        Filter, ListOptions, Role, Storage,
        spec::{self, StorageSpec},
    },
};
use sea_orm::ConnectionTrait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, AppState, Caller, limit, page, projects,
};

/// The storage, when it exists and the caller may see its project (else
/// the same 404 either way).
async fn find(db: &impl ConnectionTrait, caller: &Caller, id: i64) -> ApiResult<storage::Model> {
    let missing = || ApiError::not_found(format!("storage {id} not found"));
    let model = storages::find(db, id).await?.ok_or_else(missing)?;
    caller.check(model.project_id, missing)?;
    Ok(model)
}

fn with_last_run(model: &storage::Model, last: Option<&sync_run::Model>) -> Value {
    let mut value = spec::to_json(model);
    value["last_run"] = last.map_or(Value::Null, runs::to_json);
    value
}

/// A token held to projects brings its own credentials (docs/API.md,
/// "Tokens and scopes"): a storage that would act with the server's own
/// identity (its disk, its cloud credentials) could reach any tenant's
/// data, so only callers not held to projects may make one. Checked on the
/// body as given, before it is validated: validating a local path asks the
/// server's disk, and its answers would tell such a caller what is there.
fn check_own_credentials(
    caller: &Caller,
    spec: &StorageSpec,
    current: Option<&storage::Model>,
) -> ApiResult<()> {
    if caller.projects().is_none() {
        return Ok(());
    }
    // An unknown backend is the validation's to answer.
    let Ok(kind) = labelsync::storage::BackendKind::parse(&spec.backend) else {
        return Ok(());
    };
    let names = secret_names_after(current, spec.secrets.as_ref());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if !kind.acts_as_the_server(&names) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "server_credentials",
        "secrets",
        format!(
            "a token held to projects cannot use a {} storage that acts with the server's own identity (its disk or its cloud credentials); give the storage's own credentials in secrets, or ask an admin to set it up",
            kind.as_str()
        ),
    ))
}

/// Secrets were given for the config and prefix they were saved with: a
/// PATCH that changes any of them (`moved`: where they are sent, which
/// bucket, role or part of a bucket they open) must give each kept secret
/// again, or remove it. Otherwise anyone who may edit the storage could
/// point its endpoint at a host of theirs and receive a token an admin
/// set, or open another bucket (or another tenant's prefix of a shared
/// one) with the admin's keys.
fn check_secrets_follow(
    current: &storage::Model,
    moved: &[String],
    given: Option<&labelsync::storage::Secrets>,
) -> ApiResult<()> {
    if moved.is_empty() {
        return Ok(());
    }
    let kept: Vec<String> = secret_names_after(Some(current), None)
        .into_iter()
        .filter(|name| given.is_none_or(|g| !g.as_map().contains_key(name)))
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    let fields = |names: &[String], prefix: &str| {
        names
            .iter()
            .map(|n| format!("{prefix}.{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ApiError::bad_request(
        "secrets_required",
        "secrets",
        format!(
            "changing {} needs the storage's secrets again ({}): they were given for its \
             old settings; send them in the same request, or remove them with \"\"",
            moved.join(", "),
            fields(&kept, "secrets"),
        ),
    ))
}

/// The names of the secrets a storage holds once `given` is applied to
/// `current`'s (an empty value removes one).
fn secret_names_after(
    current: Option<&storage::Model>,
    given: Option<&serde_json::Map<String, Value>>,
) -> Vec<String> {
    let mut names: Vec<String> = current
        .and_then(|c| c.secrets_set.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for (name, value) in given.cloned().unwrap_or_default() {
        names.retain(|n| *n != name);
        if value.as_str().is_some_and(|v| !v.is_empty()) {
            names.push(name);
        }
    }
    names
}

/// A storage body of the API: `project` (a project by title) is for the
/// CLI's spec files; the API names projects by `project_id` on every route.
fn spec_of(body: Value) -> ApiResult<StorageSpec> {
    let spec = StorageSpec::from_json(body)?;
    if spec.project.is_some() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "project",
            "give project_id, not project",
        ));
    }
    Ok(spec)
}

pub async fn create(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let spec = spec_of(body)?;
    let project_id = spec.project_id.ok_or_else(|| {
        ApiError::bad_request("missing_field", "project_id", "project_id is required")
    })?;
    projects::find_named(&state.db, &caller, project_id).await?;
    check_own_credentials(&caller, &spec, None)?;
    let valid = spec.validate(&state.storage_env).await?;
    let model = spec::save(
        &state.db,
        &spec,
        &valid,
        project_id,
        None,
        &state.storage_env,
    )
    .await?;
    state.storage_cache.forget();
    caller.note("storage_id", model.id);
    Ok((StatusCode::CREATED, ApiJson(with_last_run(&model, None))))
}

/// The filters and paging of `GET /api/v1/storages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageQuery {
    project_id: Option<i64>,
    role: Option<Role>,
    limit: Option<u64>,
    after: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<ApiJson<Value>> {
    let limit = limit(q.limit)?;
    let filter = StorageFilter {
        project_id: q.project_id,
        role: q.role.map(Role::as_str),
        after: q.after,
        projects: caller.projects(),
    };
    let found = storages::page(&state.db, filter, limit).await?;
    let ids: Vec<i64> = found.iter().map(|s| s.id).collect();
    let last = runs::newest_of(&state.db, &ids).await?;
    let items = found
        .iter()
        .map(|s| with_last_run(s, last.get(&s.id)))
        .collect();
    Ok(ApiJson(page(items, limit, ids.last())))
}

pub async fn get_one(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let model = find(&state.db, &caller, id).await?;
    let last = runs::newest_of(&state.db, &[id]).await?;
    Ok(ApiJson(with_last_run(&model, last.get(&id))))
}

/// PATCH merges: top-level fields replace, `config` merges key by key,
/// omitted fields (and secrets) are kept. The merged whole is validated again
/// before anything is written.
pub async fn update(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<ApiJson<Value>> {
    let current = find(&state.db, &caller, id).await?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "PATCH body must be a JSON object",
        ));
    };
    let (merged, moved) = merge_patch(&current, patch)?;
    let spec = spec_of(merged)?;
    // Before the storage is checked (which may take the storage's time);
    // the save checks again, with the run locked.
    let moves = spec.moves(&current, &spec.config, &state.storage_env);
    spec::refuse_moving_a_started_run(&state.db, &current, moves)
        .await
        .map_err(|err| match err {
            Error::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "run_live", message),
            other => other.into(),
        })?;
    let stored = StorageSpec::of_model(&current)?;
    check_own_credentials(&caller, &spec, Some(&current))?;
    let valid = spec.validate_update(&state.storage_env, &stored).await?;
    check_secrets_follow(&current, &moved, valid.secrets.as_ref())?;
    let model = spec::save(
        &state.db,
        &spec,
        &valid,
        current.project_id,
        Some(&current),
        &state.storage_env,
    )
    .await?;
    state.storage_cache.forget();
    let last = runs::newest_of(&state.db, &[id]).await?;
    Ok(ApiJson(with_last_run(&model, last.get(&id))))
}

/// `current`'s spec with `patch` merged in (see [`update`]), and the fields
/// the patch moves the storage by: each changed `config.*`, and `prefix`.
fn merge_patch(
    current: &storage::Model,
    patch: serde_json::Map<String, Value>,
) -> ApiResult<(Value, Vec<String>)> {
    let mut merged = serde_json::to_value(StorageSpec::of_model(current)?)
        .map_err(|e| labelsync::Error::Internal(e.to_string()))?;
    let mut moved = Vec::new();
    for (key, value) in patch {
        match key.as_str() {
            "project_id" | "role" | "backend" => {
                if merged.get(&key) != Some(&value) {
                    let field = match key.as_str() {
                        "project_id" => "project_id",
                        "role" => "role",
                        _ => "backend",
                    };
                    return Err(ApiError::bad_request(
                        "immutable_field",
                        field,
                        format!("{key} cannot be changed; create a new storage instead"),
                    ));
                }
            }
            "config" => match (merged.get_mut("config"), value) {
                (Some(Value::Object(config)), Value::Object(changes)) => {
                    moved.extend(
                        changes
                            .iter()
                            .filter(|(k, v)| config.get(k.as_str()) != Some(v))
                            .map(|(k, _)| format!("config.{k}")),
                    );
                    config.extend(changes);
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_config",
                        "config",
                        "config must be a JSON object",
                    ));
                }
            },
            _ => {
                // The prefix bounds what the secrets reach as much as the
                // bucket does (tenants of one bucket are told apart by it).
                if key == "prefix" && merged.get("prefix") != Some(&value) {
                    moved.push(key.clone());
                }
                merged[key.as_str()] = value;
            }
        }
    }
    Ok((merged, moved))
}

pub async fn delete(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    find(&state.db, &caller, id).await?;
    let txn = db::begin_write(&state.db).await?;
    if !storages::delete(&txn, id).await? {
        return Err(ApiError::not_found(format!("storage {id} not found")));
    }
    txn.commit().await?;
    state.storage_cache.forget();
    Ok(StatusCode::NO_CONTENT)
}

/// Checks a storage body without saving it: 200 `{"ok": true}`, or 422 with
/// what is wrong (a malformed body is still a 400).
pub async fn validate_new(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<ApiJson<Value>> {
    let spec = spec_of(body)?;
    check_own_credentials(&caller, &spec, None)?;
    let valid = spec
        .validate(&state.storage_env)
        .await
        .map_err(ApiError::unprocessable)?;
    let secrets = valid.secrets.clone().unwrap_or_default();
    let backend =
        labelsync::storage::open_with(valid.kind, &valid.config, &secrets, &state.storage_env)
            .await
            .map_err(ApiError::unprocessable)?;
    check(backend, spec.role, &spec.prefix).await
}

pub async fn validate_saved(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    let model = find(&state.db, &caller, id).await?;
    let checked = match labelsync::storage::open(&model, &state.storage_env).await {
        Ok(backend) => backend.check(Role::of(&model), &model.prefix).await,
        Err(err) => Err(err),
    };
    record_validation(&state, &model, &checked).await;
    checked.map_err(ApiError::unprocessable)?;
    Ok(ApiJson(json!({ "ok": true })))
}

/// Keeps the outcome of checking `model` as its last validation (its page
/// shows it): the storage's own answer, not this server's trouble (a
/// database or configuration fault is not the storage's), and at most
/// [`VALIDATION_ERROR_CHARS`] of it. Failing to keep it is logged: the
/// caller still gets the check's answer.
async fn record_validation(state: &AppState, model: &storage::Model, checked: &Result<(), Error>) {
    let error = match checked {
        Ok(()) => None,
        Err(err) if err.is_database() || matches!(err, Error::Internal(_)) => return,
        Err(err) => Some(err.to_string()),
    };
    let error = error.map(|e| match e.char_indices().nth(VALIDATION_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &e[..cut]),
        None => e,
    });
    let kept =
        storages::record_validation(&state.db, model.id, model.updated_at, error.as_deref()).await;
    if let Err(err) = kept {
        tracing::warn!(storage_id = model.id, error = %err, "could not keep the validation's outcome");
    }
}

/// The longest validation error kept (a backend's message can be long).
const VALIDATION_ERROR_CHARS: usize = 1000;

async fn check(backend: Arc<dyn Storage>, role: Role, prefix: &str) -> ApiResult<ApiJson<Value>> {
    backend
        .check(role, prefix)
        .await
        .map_err(ApiError::unprocessable)?;
    Ok(ApiJson(json!({ "ok": true })))
}

/// `?limit=` of a preview (1 to 1000, default 20).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    limit: Option<usize>,
}

/// Pages read at most for a preview, so a regex that matches nothing in a
/// huge bucket answers quickly (with what it found).
const PREVIEW_MAX_PAGES: usize = 10;

pub async fn preview(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<PreviewQuery>,
) -> ApiResult<ApiJson<Value>> {
    let want = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&want) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let model = find(&state.db, &caller, id).await?;
    let backend = labelsync::storage::open(&model, &state.storage_env).await?;
    let filter = Filter::from_storage(&model)?;
    let mut pages = backend
        .list(ListOptions {
            prefix: model.prefix.clone(),
            recursive: model.recursive,
            start_after: None,
            page_size: 1000,
        })
        .take(PREVIEW_MAX_PAGES);
    let mut items = Vec::new();
    'pages: while let Some(page) = pages.next().await {
        for object in page?.objects {
            if filter.matches(&object.key) {
                items.push(json!({ "key": object.key, "size": object.size, "last_modified": object.last_modified }));
                if items.len() == want {
                    break 'pages;
                }
            }
        }
    }
    Ok(ApiJson(json!({ "items": items })))
}

pub async fn sync(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<(StatusCode, ApiJson<Value>)> {
    let model = find(&state.db, &caller, id).await?;
    let (run, already_running) =
        jobs::enqueue_sync(&state.db, &state.queue, &state.settings, &model).await?;
    caller.note("run_id", run.id.clone());
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(json!({ "run": runs::to_json(&run), "already_running": already_running })),
    ))
}

/// `POST /storages/{id}/pause`: the periodic tick skips the storage until
/// it is resumed; a manual sync still runs. Pausing a paused storage
/// changes nothing.
pub async fn pause(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    set_paused(&state, &caller, id, Some(labelsync::clock::now())).await
}

/// `POST /storages/{id}/resume`: periodic syncs again (a period that came
/// round while paused syncs at the next tick).
pub async fn resume(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<ApiJson<Value>> {
    set_paused(&state, &caller, id, None).await
}

async fn set_paused(
    state: &AppState,
    caller: &Caller,
    id: i64,
    paused_at: Option<chrono::DateTime<chrono::Utc>>,
) -> ApiResult<ApiJson<Value>> {
    find(&state.db, caller, id).await?;
    let model = storages::set_schedule_paused(&state.db, id, paused_at)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("storage {id} not found")))?;
    let last = runs::newest_of(&state.db, &[id]).await?;
    Ok(ApiJson(with_last_run(&model, last.get(&id))))
}
