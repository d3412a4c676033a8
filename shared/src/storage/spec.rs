//! The storage create body of docs/API.md, shared by the API and the one-shot CLI:
//! parsing, validation (nothing is written until all of it passes) and the
//! conversion to and from the `storages` row.
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Filter;
use super::{
    BackendKind, KeyShape, Role, Secrets, StorageEnv, secrets_context, secrets_of, validate_config,
};
use crate::{
    Error, Result,
    db::{entities::storage, exports, runs, storages},
};

/// Providers cap signed URLs at 7 days (SigV4, GCS V4).
pub const MAX_PRESIGN_TTL: i64 = 7 * 24 * 3600;
/// A period shorter than a second is surely a mistake (milliseconds?).
pub const MIN_SYNC_INTERVAL: i64 = 1;
/// One year: longer periods are surely a mistake too.
pub const MAX_SYNC_INTERVAL: i64 = 365 * 24 * 3600;
/// The longest title of a storage or a project, in characters.
pub const MAX_TITLE_CHARS: usize = 1_000;
/// The longest prefix (an S3 key is at most 1,024 bytes) and regex
/// filter, in characters.
pub const MAX_PREFIX_CHARS: usize = 1_024;
pub const MAX_REGEX_CHARS: usize = 4_096;
/// The most JSON a storage's `config` may take: its longest real values
/// (a bucket, an endpoint, a role ARN, a KMS key id) are a few hundred
/// bytes together.
pub const MAX_CONFIG_BYTES: usize = 16 << 10;
/// The longest secret value, in characters (a GCS service-account key,
/// the largest, is about 2,500).
pub const MAX_SECRET_CHARS: usize = 16_384;

/// How a source's objects become tasks: `files` (one task per object) or
/// `tasks` (each object is a file of tasks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportMethod {
    #[default]
    Files,
    Tasks,
}

impl ImportMethod {
    /// The method of a saved storage (the column only ever holds the two
    /// names; anything else reads as the default).
    pub fn of(model: &storage::Model) -> Self {
        if model.import_method == ImportMethod::Tasks.as_str() {
            ImportMethod::Tasks
        } else {
            ImportMethod::Files
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ImportMethod::Files => "files",
            ImportMethod::Tasks => "tasks",
        }
    }
}

/// What an import run does with the objects it did not list that the
/// storage had imported before (they left the bucket). Every mode counts
/// them as the run's `missing`; docs/API.md ("Storages") is the contract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// Links left as they are: every later run counts the objects again,
    /// until they come back.
    Keep,
    /// Links flagged `object_exists = false` (counted by the run that flags
    /// them only); tasks stay.
    #[default]
    Flag,
    /// Flagged, and the tasks whose every link is flagged and that have no
    /// annotation are deleted (with their predictions).
    DeleteUnlabeled,
}

impl OnMissing {
    pub const ALL: [OnMissing; 3] = [OnMissing::Keep, OnMissing::Flag, OnMissing::DeleteUnlabeled];

    /// The mode of a saved storage (the column only ever holds the three
    /// names; anything else reads as the default).
    pub fn of(model: &storage::Model) -> Self {
        Self::parse(&model.on_missing).unwrap_or_default()
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnMissing::Keep => "keep",
            OnMissing::Flag => "flag",
            OnMissing::DeleteUnlabeled => "delete_unlabeled",
        }
    }

    /// `400 invalid_on_missing`, naming the values allowed.
    fn invalid(what: &str) -> Error {
        let allowed: Vec<String> = Self::ALL
            .iter()
            .map(|m| format!("{:?}", m.as_str()))
            .collect();
        Error::invalid(
            "invalid_on_missing",
            Some("on_missing"),
            format!("on_missing {what}; use one of {}", allowed.join(", ")),
        )
    }

    /// Checks a body's `on_missing` before serde does, so a bad value gets
    /// its own code and the list of allowed values.
    fn check_json(value: Option<&Value>) -> Result<()> {
        match value {
            None => Ok(()),
            Some(Value::String(s)) if Self::parse(s).is_some() => Ok(()),
            Some(Value::String(s)) => Err(Self::invalid(&format!("{s:?} is not a mode"))),
            Some(_) => Err(Self::invalid("must be a string")),
        }
    }
}

/// A project named by title, for the CLI's spec files (`project` in place of
/// `project_id`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectRef {
    pub title: String,
    #[serde(default = "default_data_key")]
    pub data_key: String,
}

fn default_data_key() -> String {
    "image".into()
}
fn yes() -> bool {
    true
}
fn default_ttl() -> i64 {
    900
}
fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// A storage create body (docs/API.md, "Storages"), with the defaults
/// filled in; nothing in it is checked until [`StorageSpec::validate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectRef>,
    pub role: Role,
    pub backend: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub regex_filter: Option<String>,
    #[serde(default = "yes")]
    pub recursive: bool,
    #[serde(default)]
    pub import_method: ImportMethod,
    #[serde(default = "yes")]
    pub presign: bool,
    #[serde(default = "default_ttl")]
    pub presign_ttl_seconds: i64,
    #[serde(default)]
    pub can_delete_objects: bool,
    #[serde(default)]
    pub reimport_changed: bool,
    #[serde(default)]
    pub on_missing: OnMissing,
    #[serde(default)]
    pub sync_interval_seconds: Option<i64>,
    #[serde(default = "empty_object")]
    pub config: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Map<String, Value>>,
}

/// A spec that passed [`StorageSpec::validate`].
#[derive(Debug, Clone)]
pub struct ValidSpec {
    pub kind: BackendKind,
    pub config: Value,
    /// The secrets the spec gave, names checked; `None` when it gave none
    /// (an update then keeps the stored ones).
    pub secrets: Option<Secrets>,
}

impl StorageSpec {
    /// Parses a JSON body; serde's message names the offending field.
    pub fn from_json(value: Value) -> Result<Self> {
        // Checked before serde, whose messages quote the offending value: a
        // secret sent in the wrong shape must not come back in the error.
        match value.get("secrets") {
            None | Some(Value::Null) => {}
            Some(Value::Object(secrets)) => {
                if let Some((name, _)) = secrets.iter().find(|(_, v)| !v.is_string()) {
                    return Err(Error::invalid(
                        "invalid_secrets",
                        Some("secrets"),
                        format!("secret {name:?} must be a string"),
                    ));
                }
            }
            Some(_) => {
                return Err(Error::invalid(
                    "invalid_secrets",
                    Some("secrets"),
                    "secrets must be a JSON object",
                ));
            }
        }
        OnMissing::check_json(value.get("on_missing"))?;
        serde_json::from_value(value)
            .map_err(|e| Error::invalid("invalid_body", None, e.to_string()))
    }

    /// Text fields (and the config) are shown in every list of storages
    /// and held by `/resolve`'s cache, secrets by the storage cache: each
    /// has a bound, so a caller cannot make those answers gigabytes. A field an update keeps as `stored` has it passes:
    /// storages saved before the bounds can still be paused or moved.
    fn check_lengths(&self, stored: Option<&StorageSpec>) -> Result<()> {
        let kept = |field: fn(&StorageSpec) -> Option<&str>| {
            stored.is_some_and(|stored| field(stored) == field(self))
        };
        if self.title.chars().count() > MAX_TITLE_CHARS && !kept(|s| Some(&s.title)) {
            return Err(Error::invalid(
                "invalid_title",
                Some("title"),
                format!("title must be at most {MAX_TITLE_CHARS} characters"),
            ));
        }
        if self.prefix.chars().count() > MAX_PREFIX_CHARS && !kept(|s| Some(&s.prefix)) {
            return Err(Error::invalid(
                "invalid_prefix",
                Some("prefix"),
                format!("prefix must be at most {MAX_PREFIX_CHARS} characters"),
            ));
        }
        if self.config.to_string().len() > MAX_CONFIG_BYTES
            && !stored.is_some_and(|stored| stored.config == self.config)
        {
            return Err(Error::invalid(
                "invalid_config",
                Some("config"),
                format!("config must be at most {MAX_CONFIG_BYTES} bytes of JSON"),
            ));
        }
        let mut secrets = self.secrets.iter().flatten();
        if let Some((name, _)) =
            secrets.find(|(_, v)| v.as_str().map_or(0, |v| v.chars().count()) > MAX_SECRET_CHARS)
        {
            return Err(Error::invalid(
                "invalid_secrets",
                Some("secrets"),
                format!("secret {name:?} must be at most {MAX_SECRET_CHARS} characters"),
            ));
        }
        if self
            .regex_filter
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REGEX_CHARS)
            && !kept(|s| s.regex_filter.as_deref())
        {
            return Err(Error::invalid(
                "invalid_regex",
                Some("regex_filter"),
                format!("regex_filter must be at most {MAX_REGEX_CHARS} characters"),
            ));
        }
        Ok(())
    }

    /// A local storage's path given anew (not one a PATCH keeps) with a `..`
    /// part is refused before validation asks the disk (see
    /// `paths::refuse_parent_parts`).
    fn check_new_local_path(&self, kind: BackendKind, stored: Option<&StorageSpec>) -> Result<()> {
        let path_of = |spec: &StorageSpec| {
            (spec.config.get("path").and_then(Value::as_str)).map(str::to_owned)
        };
        let path = path_of(self);
        if kind != BackendKind::Local || stored.is_some_and(|s| path_of(s) == path) {
            return Ok(());
        }
        crate::security::paths::refuse_parent_parts(path.as_deref().unwrap_or_default())
    }

    /// On a backend whose keys are paths, a prefix with an empty segment (a
    /// doubled `/`, or more than one at its end) or a `.` or `..` between
    /// `\` or encoded separators prefixes no key it can hold (`storage::check_key`
    /// refuses them): a source would list nothing, and a target would fail
    /// every export. Checked when a prefix is set, not when a PATCH keeps
    /// one saved before the rule.
    fn check_path_prefix(&self, kind: BackendKind) -> Result<()> {
        // No prefix is fine; "/" was refused as absolute before.
        let trimmed = self.prefix.strip_suffix('/').unwrap_or(&self.prefix);
        let empty_segment = !trimmed.is_empty() && trimmed.split('/').any(str::is_empty);
        let dot_segment = trimmed.split('/').any(|segment| {
            let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
            super::dot_segment(&decoded, KeyShape::Path)
        });
        if kind.key_shape() != KeyShape::Path || !(empty_segment || dot_segment) {
            return Ok(());
        }
        Err(Error::invalid(
            "invalid_prefix",
            Some("prefix"),
            format!(
                "on a {} storage keys are paths: the prefix must not have an empty segment (a doubled '/', or more than one at its end), nor a '.' or '..' between '\\' separators or encoded ones (%2f, %5c)",
                self.backend
            ),
        ))
    }

    /// Checks everything a create needs, touching nothing (but DNS, for the
    /// SSRF guard on endpoints).
    pub async fn validate(&self, env: &StorageEnv) -> Result<ValidSpec> {
        self.validate_beside(env, None).await
    }

    /// [`Self::validate`] for an update of `stored`, whose text fields are
    /// taken as they are where the update keeps them.
    pub async fn validate_update(
        &self,
        env: &StorageEnv,
        stored: &StorageSpec,
    ) -> Result<ValidSpec> {
        self.validate_beside(env, Some(stored)).await
    }

    async fn validate_beside(
        &self,
        env: &StorageEnv,
        stored: Option<&StorageSpec>,
    ) -> Result<ValidSpec> {
        let kind = BackendKind::parse(&self.backend)?;
        self.check_lengths(stored)?;
        self.check_new_local_path(kind, stored)?;
        Filter::new(self.regex_filter.as_deref())?;
        // Listings build URLs and paths from the prefix as from keys: the
        // same segments are refused (see `storage::check_key`).
        let folded = |seg: &str| {
            let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
            decoded == "." || decoded == ".."
        };
        if self.prefix.starts_with('/')
            || self.prefix.split('/').any(folded)
            || self.prefix.contains('\0')
        {
            return Err(Error::invalid(
                "invalid_prefix",
                Some("prefix"),
                "prefix must be relative and must not contain '.' or '..' segments (plain or percent-encoded) or NUL characters",
            ));
        }
        if stored.is_none_or(|stored| stored.prefix != self.prefix) {
            self.check_path_prefix(kind)?;
        }
        if !(1..=MAX_PRESIGN_TTL).contains(&self.presign_ttl_seconds) {
            return Err(Error::invalid(
                "invalid_presign_ttl",
                Some("presign_ttl_seconds"),
                format!("presign_ttl_seconds must be between 1 and {MAX_PRESIGN_TTL} (7 days)"),
            ));
        }
        if self
            .sync_interval_seconds
            .is_some_and(|s| !(MIN_SYNC_INTERVAL..=MAX_SYNC_INTERVAL).contains(&s))
        {
            return Err(Error::invalid(
                "invalid_sync_interval",
                Some("sync_interval_seconds"),
                format!(
                    "sync_interval_seconds must be between {MIN_SYNC_INTERVAL} and {MAX_SYNC_INTERVAL} (or null)"
                ),
            ));
        }
        if self.role == Role::Target && self.on_missing != OnMissing::default() {
            return Err(Error::invalid(
                "invalid_on_missing",
                Some("on_missing"),
                "on_missing applies to source storages only; leave it out of a target (or give \"flag\", the default)",
            ));
        }
        let config = validate_config(kind, &self.config, env).await?;
        let secrets = self.secrets.clone().map(Secrets::new);
        if let Some(secrets) = &secrets {
            secrets.check_names(kind)?;
        }
        Ok(ValidSpec {
            kind,
            config,
            secrets,
        })
    }

    /// The row a validated spec describes (id 0: not saved).
    pub fn to_model(&self, project_id: i64, valid: &ValidSpec) -> storage::Model {
        let now = crate::clock::now();
        storage::Model {
            id: 0,
            project_id,
            role: self.role.as_str().into(),
            backend: valid.kind.as_str().into(),
            title: self.title.clone(),
            config: valid.config.clone(),
            secrets: None,
            secrets_set: Value::Array(Vec::new()),
            prefix: self.prefix.clone(),
            regex_filter: self.regex_filter.clone().filter(|r| !r.is_empty()),
            recursive: self.recursive,
            import_method: self.import_method.as_str().into(),
            presign: self.presign,
            presign_ttl_seconds: self.presign_ttl_seconds,
            can_delete_objects: self.can_delete_objects,
            reimport_changed: self.reimport_changed,
            on_missing: self.on_missing.as_str().into(),
            sync_interval_seconds: self.sync_interval_seconds,
            next_sync_at: None,
            schedule_paused_at: None,
            validated_at: None,
            validation_error: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether saving this spec, its config as `config`, over `current`
    /// changes what a run of it works on: for a source, what it lists (its
    /// place, prefix, recursion, import method); for a target, where it
    /// writes (its place: a prefix changes the keys, which its links
    /// follow).
    pub fn moves(&self, current: &storage::Model, config: &Value, env: &StorageEnv) -> bool {
        self.moves_place(current, config, env)
            || (self.role == Role::Source
                && (self.prefix != current.prefix
                    || self.recursive != current.recursive
                    || self.import_method != ImportMethod::of(current)))
    }

    /// Whether `config` names another place than `current`'s config
    /// ([`Backend::place`]): another backend, bucket, endpoint or directory.
    /// A change of credentials, region or encryption is not a move.
    pub fn moves_place(&self, current: &storage::Model, config: &Value, env: &StorageEnv) -> bool {
        if self.backend != current.backend {
            return true;
        }
        let Ok(kind) = BackendKind::parse(&current.backend) else {
            return true;
        };
        let backend = super::backend(kind);
        match (
            backend.place(config, env),
            backend.place(&current.config, env),
        ) {
            (Some(new), Some(old)) => new != old,
            _ => true,
        }
    }

    /// The spec a saved row was made from (secrets are not recoverable and are
    /// left out: a PATCH that omits them keeps the stored ones).
    pub fn of_model(model: &storage::Model) -> Result<Self> {
        let role = Role::of(model);
        let import_method = match model.import_method.as_str() {
            "tasks" => ImportMethod::Tasks,
            _ => ImportMethod::Files,
        };
        Ok(StorageSpec {
            project_id: Some(model.project_id),
            project: None,
            role,
            backend: model.backend.clone(),
            title: model.title.clone(),
            prefix: model.prefix.clone(),
            regex_filter: model.regex_filter.clone(),
            recursive: model.recursive,
            import_method,
            presign: model.presign,
            presign_ttl_seconds: model.presign_ttl_seconds,
            can_delete_objects: model.can_delete_objects,
            reimport_changed: model.reimport_changed,
            on_missing: OnMissing::of(model),
            sync_interval_seconds: model.sync_interval_seconds,
            config: model.config.clone(),
            secrets: None,
        })
    }
}

/// Inserts a new storage (`current` is `None`) or replaces `current` with
/// the spec, in one transaction with its sealed secrets. Secrets given in the
/// spec are merged into the stored ones name by name (an empty string removes
/// one); the sealed blob is bound to the row's id.
pub async fn save(
    db: &DatabaseConnection,
    spec: &StorageSpec,
    valid: &ValidSpec,
    project_id: i64,
    current: Option<&storage::Model>,
    env: &StorageEnv,
) -> Result<storage::Model> {
    let mut secrets = stored_secrets(current, valid, env)?;
    let changed = valid.secrets.as_ref().is_some_and(|given| {
        for (name, value) in given.as_map() {
            match value.as_str() {
                Some("") | None => secrets.remove(name),
                Some(_) => secrets.insert(name.clone(), value.clone()),
            };
        }
        true
    });
    let key = if changed && !secrets.is_empty() {
        Some(env.secret_box()?)
    } else {
        None
    };
    // Written at once (SQLite: a deferred transaction that reads first can
    // fail to write after another's commit).
    let txn = crate::db::begin_write(db).await?;
    if let Some(current) = current {
        // The storage, then its live run, then its links: the order a
        // storage's delete takes them in (no deadlock between the two).
        storages::lock(&txn, current.id).await?;
        let moves = spec.moves(current, &valid.config, env);
        refuse_moving_a_started_run(&txn, current, moves).await?;
        // A target moved elsewhere holds none of the annotations yet.
        if spec.role == Role::Target && spec.moves_place(current, &valid.config, env) {
            exports::forget_links(&txn, current.id).await?;
        }
    }
    let mut model = spec.to_model(project_id, valid);
    let row = match current {
        Some(current) => {
            model.id = current.id;
            // A new period starts now (the next sync unset); an unchanged
            // one keeps its schedule. validated_at stays unset: the last
            // check was of the settings this save replaces.
            let same_period = current.sync_interval_seconds == spec.sync_interval_seconds;
            storages::replace(&txn, model, current.updated_at, same_period)
                .await?
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "storage {} was changed by another request while this one ran; read it again and send the change again",
                        current.id
                    ))
                })?
        }
        None => storages::insert(&txn, model).await?,
    };
    let row = if changed {
        let sealed = match key {
            Some(key) => Some(key.seal(&secrets_context(row.id), &secrets)?),
            None => None,
        };
        let names: Vec<Value> = secrets.keys().cloned().map(Value::String).collect();
        storages::set_secrets(&txn, row, sealed, Value::Array(names)).await?
    } else {
        row
    };
    txn.commit().await?;
    Ok(row)
}

/// The stored secrets a save merges the given ones into, opened; none
/// when it gives none (the sealed ones are then left as they are). Ones no
/// key opens (sealed under a key this server does not have) are replaced
/// by a save that gives each of them again, or removes it: the way to mend
/// them; one that leaves any out is refused, naming them.
fn stored_secrets(
    current: Option<&storage::Model>,
    valid: &ValidSpec,
    env: &StorageEnv,
) -> Result<Map<String, Value>> {
    let (Some(current), Some(given)) = (current, valid.secrets.as_ref()) else {
        return Ok(Map::new());
    };
    let err = match secrets_of(current, env) {
        Ok(secrets) => return Ok(secrets.as_map().clone()),
        // This server has no key at all: said as it is.
        Err(err @ Error::Invalid { .. }) => return Err(err),
        Err(err) => err,
    };
    let stored = current.secrets_set.as_array().cloned().unwrap_or_default();
    let left_out: Vec<String> = stored
        .iter()
        .filter_map(Value::as_str)
        .filter(|name| !given.as_map().contains_key(*name))
        .map(|name| format!("secrets.{name}"))
        .collect();
    if !left_out.is_empty() {
        return Err(Error::invalid(
            "secrets_required",
            Some("secrets"),
            format!(
                "the storage's stored secrets cannot be opened ({err}): give each of them again to replace them ({}), or remove it with \"\"",
                left_out.join(", ")
            ),
        ));
    }
    tracing::warn!(storage_id = current.id, error = %err, "the storage's stored secrets do not open; replaced by the ones given");
    Ok(Map::new())
}

/// A change of what `current`'s run works on (`moves`: see
/// [`StorageSpec::moves`]) while the run has started: a `Conflict` naming
/// the run. For a source, what it lists: the run's next attempt would go
/// on from where it got to in the old listing, in the new one, where a
/// key before that point is never listed, so counted missing (under
/// `delete_unlabeled`, its task deleted). For a target, where it writes:
/// the run would write links for the old place after they were forgotten
/// for the new one. In a transaction on Postgres the live run stays
/// locked until it ends, so that none starts in between; a run still
/// waiting reads the storage as saved.
pub async fn refuse_moving_a_started_run(
    db: &impl sea_orm::ConnectionTrait,
    current: &storage::Model,
    moves: bool,
) -> Result<()> {
    if !moves {
        return Ok(());
    }
    let Some(run) = runs::started_live(db, current.id).await? else {
        return Ok(());
    };
    let (id, run) = (current.id, run.id);
    Err(Error::Conflict(format!(
        "storage {id} has a run in progress (run {run}) that goes on where it got to with the storage as it is: cancel the run (POST /api/v1/runs/{run}/cancel) or let it end, then make this change"
    )))
}

/// The storage as the API shows it: the create fields without secrets, plus
/// `id`, `secrets_set` and `created_at` (`last_run` is added by the caller).
pub fn to_json(model: &storage::Model) -> Value {
    serde_json::json!({
        "id": model.id,
        "project_id": model.project_id,
        "role": model.role,
        "backend": model.backend,
        "title": model.title,
        "prefix": model.prefix,
        "regex_filter": model.regex_filter,
        "recursive": model.recursive,
        "import_method": model.import_method,
        "presign": model.presign,
        "presign_ttl_seconds": model.presign_ttl_seconds,
        "can_delete_objects": model.can_delete_objects,
        "reimport_changed": model.reimport_changed,
        "on_missing": model.on_missing,
        "sync_interval_seconds": model.sync_interval_seconds,
        "schedule_paused": model.schedule_paused_at.is_some(),
        "schedule_paused_at": model.schedule_paused_at,
        "validated_at": model.validated_at,
        "validation_error": model.validation_error,
        "config": model.config,
        "secrets_set": model.secrets_set,
        "created_at": model.created_at,
    })
}
