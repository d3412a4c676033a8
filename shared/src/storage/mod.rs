//! One trait for every storage backend, one module per backend.
//!
//! A backend implements "list one page", get (with a byte range), put,
//! delete and presign; pagination is the shared [`paginate`] helper, so every
//! listing is a stream of pages that never holds a whole bucket in memory, and
//! [`probe`] is the shared `validate` check. Each backend module also has a
//! `Descriptor` ([`Backend`]: secret names, key shape, URI scheme and
//! location, config validation, open). Adding a backend means: its module, a
//! variant of [`BackendKind`], and one line in [`backend`].
pub mod azure;
mod capped;
pub mod databricks;
mod filter;
pub mod gcs;
mod instrumented;
pub mod local;
mod opened;
pub mod redis;
pub mod retry;
pub mod s3;
pub mod spec;

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::BoxStream};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::kinds::BackendKind;
use crate::{
    Error, Result,
    db::entities::storage,
    security::{net::NetPolicy, secrets::SecretBox},
    task::AbortOnDrop,
};
pub use filter::Filter;

impl BackendKind {
    /// How the backend's keys must be checked ([`check_key`]).
    pub fn key_shape(self) -> KeyShape {
        backend(self).key_shape()
    }

    /// Whether its objects have task URIs of a scheme of their own
    /// (`s3://bucket/key`), which `/resolve` reads: not Redis. (Local
    /// files' URIs are the document root's; their keys come from a
    /// directory walk, which yields no `.` segment.)
    pub fn has_task_uris(self) -> bool {
        backend(self).uri_scheme().is_some()
    }

    /// The secret names the backend takes (docs/API.md, "Storages").
    pub fn secret_names(self) -> &'static [&'static str] {
        backend(self).secret_names()
    }

    /// See [`Backend::acts_as_the_server`].
    pub fn acts_as_the_server(self, secrets: &[&str]) -> bool {
        backend(self).acts_as_the_server(secrets)
    }
}

/// What labelsync needs of one backend beside the [`Storage`] it opens:
/// each backend module has one (`s3::Descriptor`, ...), and [`backend`] is
/// the one place that lists them, so adding a backend is its module, its
/// [`BackendKind`] name and one line there.
#[async_trait]
pub trait Backend: Sync {
    /// The secret names it takes (docs/API.md, "Storages").
    fn secret_names(&self) -> &'static [&'static str];

    /// Whether a storage holding only these secrets would act with the
    /// server's own identity (its disk, the default AWS chain, Google's
    /// application default credentials, Azure's fallback) instead of
    /// credentials its creator gave: such storages are for callers not held
    /// to projects, who are trusted with that identity.
    fn acts_as_the_server(&self, _secrets: &[&str]) -> bool {
        false
    }

    /// How its keys must be checked ([`check_key`]).
    fn key_shape(&self) -> KeyShape;

    /// Whether a key ending in `/` is a folder marker, not an object: the
    /// zero-byte placeholder a console's "Create folder" writes (S3, GCS).
    /// Syncs skip them, as Label Studio does; they still count as listed.
    fn folder_markers(&self) -> bool {
        false
    }

    /// Whether every object's value is task JSON whatever its key looks like
    /// (Redis, as Label Studio stores tasks there), for Tasks mode.
    fn values_are_task_json(&self) -> bool {
        false
    }

    /// The scheme of its task URIs (`s3://bucket/key`), if it has them.
    fn uri_scheme(&self) -> Option<&'static str> {
        None
    }

    /// The location task URIs name (bucket, container, volume; for local
    /// storages the directory under the document root) in a saved config.
    fn uri_location(&self, _config: &Value, _env: &StorageEnv) -> Option<String> {
        None
    }

    /// A URI's location and key, from what follows `scheme://`: by default
    /// the first segment is the location (`bucket/key`).
    fn split_uri<'u>(&self, rest: &'u str) -> Option<(String, &'u str)> {
        let (location, key) = rest.split_once('/')?;
        Some((location.to_owned(), key))
    }

    /// Where a config's objects are: the fields that decide which objects
    /// its keys name (bucket, container, endpoint, directory, key prefix),
    /// normalized, so that two configs with one place list the same objects
    /// and write to the same ones. Credentials, a region within its
    /// partition, encryption, TLS and addressing style are not part of it. `None` when the config does
    /// not parse: a change to or from it counts as a move.
    fn place(&self, config: &Value, env: &StorageEnv) -> Option<Value>;

    /// Checks a `config` for a create or update (syntax, required fields,
    /// the SSRF guard on endpoints); returns it normalized.
    async fn validate(&self, config: &Value, env: &StorageEnv) -> Result<Value>;

    /// Opens the backend from its config and plain secrets.
    async fn open(
        &self,
        config: &Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<Arc<dyn Storage>>;
}

/// The backend of a kind: the registration line of each backend.
pub fn backend(kind: BackendKind) -> &'static dyn Backend {
    match kind {
        BackendKind::S3 => &s3::Descriptor,
        BackendKind::Gcs => &gcs::Descriptor,
        BackendKind::Azure => &azure::Descriptor,
        BackendKind::Redis => &redis::Descriptor,
        BackendKind::Local => &local::Descriptor,
        BackendKind::Databricks => &databricks::Descriptor,
    }
}

/// The backend whose task URIs use `scheme`.
pub fn backend_of_scheme(scheme: &str) -> Option<BackendKind> {
    BackendKind::ALL
        .into_iter()
        .find(|kind| backend(*kind).uri_scheme() == Some(scheme))
}

/// Whether a storage is read (source) or written (target); `check` tests the
/// permissions the role needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    /// The role of a saved storage (the column only ever holds the two names).
    pub fn of(model: &storage::Model) -> Self {
        if model.role == Role::Target.as_str() {
            Role::Target
        } else {
            Role::Source
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub key: String,
    pub size: Option<i64>,
    pub last_modified: Option<DateTime<Utc>>,
    pub etag: Option<String>,
}

/// A page of a listing, in key order.
#[derive(Debug, Default)]
pub struct Page {
    pub objects: Vec<ObjectMeta>,
    /// Parts of the listing that could not be read (an unreadable
    /// directory): reported as per-object errors of the run, while the rest
    /// of the listing goes on. A page may carry errors and no objects.
    pub errors: Vec<ListError>,
}

/// A part of a listing that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    /// The key (or key prefix, ending in `/`, for a directory) it concerns.
    pub key: String,
    pub message: String,
    /// Keys may be missing from the listing because of it (an unreadable
    /// directory), so none counts as deleted; false for an entry that
    /// could never be a key (a local file name that is not UTF-8).
    pub incomplete: bool,
}

#[derive(Debug, Clone)]
/// What a listing covers and where it starts.
pub struct ListOptions {
    /// Only keys starting with this string.
    pub prefix: String,
    /// When false, only keys with no `/` after the prefix.
    pub recursive: bool,
    /// Resume: only keys after this one (in the backend's listing order).
    pub start_after: Option<String>,
    pub page_size: usize,
}

/// One level of a storage's key tree (see [`Storage::list_children`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Children {
    /// Each ends with `/` and starts with the prefix asked about.
    pub prefixes: Vec<String>,
    /// The keys directly under the prefix (no `/` after it), in key order,
    /// with the metadata [`Storage::list`] gives them.
    pub objects: Vec<ObjectMeta>,
    /// Set when the level has more pages than were read (`prefixes` and
    /// `objects` then hold only its beginning): where a further call goes
    /// on (the backend's page token, opaque).
    pub next: Option<String>,
}

impl Children {
    /// Whether the pages read hold the whole (rest of the) level.
    pub fn complete(&self) -> bool {
        self.next.is_none()
    }

    /// Adds the `/`-ended prefixes one page of a delimiter listing of
    /// `under` gave, in key order: only those strictly below `under`, and a
    /// prefix some servers repeat at a page boundary once.
    pub fn push_prefixes<'a>(&mut self, under: &str, found: impl IntoIterator<Item = &'a str>) {
        for p in found {
            let below = p.len() > under.len() && p.starts_with(under) && p.ends_with('/');
            if below && self.prefixes.last().is_none_or(|last| last != p) {
                self.prefixes.push(p.to_owned());
            }
        }
    }
}

/// A byte range of an object, as HTTP `Range` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetRange {
    /// `bytes=start-end` (both inclusive).
    Bounded { start: u64, end: u64 },
    /// `bytes=start-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl GetRange {
    /// Parses a `Range` header of one byte range; `None` for anything else
    /// (several ranges, other units, bad syntax), which HTTP lets a server
    /// answer with the whole object.
    pub fn parse(header: &str) -> Option<GetRange> {
        let spec = header.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        match (a.is_empty(), b.is_empty()) {
            (true, false) => b.parse().ok().map(GetRange::Suffix),
            (false, true) => a.parse().ok().map(GetRange::From),
            (false, false) => {
                let (start, end) = (a.parse().ok()?, b.parse().ok()?);
                (start <= end).then_some(GetRange::Bounded { start, end })
            }
            (true, true) => None,
        }
    }

    /// The same range, at most `max` bytes long (open and long ranges are
    /// cut at `max` bytes from their start; a long suffix keeps its end).
    pub fn cap(self, max: u64) -> GetRange {
        let max = max.max(1);
        match self {
            GetRange::From(start) => GetRange::Bounded {
                start,
                end: start.saturating_add(max - 1),
            },
            GetRange::Bounded { start, end } if end - start >= max => GetRange::Bounded {
                start,
                end: start + max - 1,
            },
            GetRange::Suffix(n) => GetRange::Suffix(n.min(max)),
            other => other,
        }
    }

    /// Whether the range starts past the end of any object a storage can
    /// hold (an offset no signed 64-bit size reaches): answered 416 without
    /// asking the storage, whose arithmetic it could overflow.
    pub fn past_any_object(self) -> bool {
        match self {
            GetRange::Bounded { start, .. } | GetRange::From(start) => start > i64::MAX as u64,
            GetRange::Suffix(_) => false,
        }
    }

    /// The `Range` header value.
    pub fn header(self) -> String {
        match self {
            GetRange::Bounded { start, end } => format!("bytes={start}-{end}"),
            GetRange::From(start) => format!("bytes={start}-"),
            GetRange::Suffix(n) => format!("bytes=-{n}"),
        }
    }

    /// The inclusive byte span this range covers in an object of `size`
    /// bytes, or `None` when it covers nothing (HTTP 416).
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        let (start, end) = match self {
            GetRange::Bounded { start, end } => (start, end.min(size.checked_sub(1)?)),
            GetRange::From(start) => (start, size.checked_sub(1)?),
            GetRange::Suffix(0) => return None,
            GetRange::Suffix(n) => (size.saturating_sub(n), size.checked_sub(1)?),
        };
        (start <= end).then_some((start, end))
    }
}

/// A read object (or the asked-for range of it).
pub struct Object {
    pub body: ByteStream,
    /// The whole object's size, when the backend says.
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub content_type: Option<String>,
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object")
            .field("size", &self.size)
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

/// One storage location (a bucket, container, volume, directory or Redis key
/// prefix) that labelsync lists, reads and writes by key.
///
/// What every implementation promises:
/// - keys are strings relative to the location; user-given keys are checked
///   with [`check_key`] first, and no request reaches outside the location;
/// - [`list`](Storage::list) yields pages in the backend's key order, stable
///   between calls, each key once, never the whole listing in memory;
///   `start_after` resumes after a key in that order; a part that cannot be
///   read is a [`ListError`] in its page, not the end of the stream;
/// - `get` of a missing key is [`Error::NotFound`]; a range outside the object
///   is [`Error::Invalid`] with the code `range_not_satisfiable`;
/// - `put` creates or replaces the whole object; `delete` of a missing key
///   succeeds; `presign` is `None` when the backend cannot sign;
/// - errors are classified: `Transient` only after the backend's own retries;
///   `Unauthenticated`, `PermissionDenied`, `NotFound` and `Invalid` are
///   never worth retrying;
/// - one value is shared (`Arc<dyn Storage>`) and used from many tasks at once.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Lists objects as a stream of pages in key order.
    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>>;

    /// What lies one level below `prefix`, from at most `max_pages` pages
    /// (at least one) of a delimiter listing (starting where an earlier
    /// call's [`Children::next`] left off, given as `from`): the distinct
    /// `/`-ended prefixes of the keys under it and the keys with no `/`
    /// after it, both in key order, and whether that is the rest of the
    /// level. `None` when the backend cannot list by delimiter: the caller
    /// then lists `prefix` as one sequence.
    async fn list_children(
        &self,
        _prefix: &str,
        _from: Option<&str>,
        _max_pages: usize,
    ) -> Result<Option<Children>> {
        Ok(None)
    }

    /// Reads an object, or a byte range of it, as a stream of chunks.
    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object>;

    /// Writes (creates or replaces) an object.
    async fn put(&self, key: &str, body: Bytes, content_type: Option<&str>) -> Result<()>;

    /// Deletes an object; deleting one that is not there succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// A URL anyone holding it can GET the object from until `ttl` passes;
    /// `None` for backends that cannot sign (the API proxies those).
    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>>;

    /// Checks that the storage exists and that we may do what `role` needs
    /// under `prefix`.
    async fn check(&self, role: Role, prefix: &str) -> Result<()> {
        probe(self, role, prefix).await
    }

    /// The URI a Files-mode task carries for this object.
    fn task_uri(&self, key: &str) -> String;

    /// The object as a local file, opened, for backends that have one:
    /// Parquet needs random access, and this spares it a copy. Blocking.
    fn local_file(&self, _key: &str) -> Option<Result<std::fs::File>> {
        None
    }
}

/// An object's bytes. Errors are `io::Error`s so the stream can feed a reader;
/// backends wrap their [`Error`] with `io::Error::other`.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// A whole body as a one-chunk stream.
pub fn bytes_stream(bytes: Bytes) -> ByteStream {
    futures::stream::once(async move { Ok(bytes) }).boxed()
}

/// The codes `validate` answers with, one per thing a user can fix.
pub mod check {
    pub const UNREACHABLE: &str = "endpoint_unreachable";
    pub const BAD_CREDENTIALS: &str = "bad_credentials";
    pub const NOT_FOUND: &str = "bucket_not_found";
    pub const NO_LIST: &str = "no_list_permission";
    pub const NO_WRITE: &str = "no_write_permission";
}

/// The shared `check`: lists one object under the prefix, and for targets
/// writes and deletes a probe object, translating each failure into the
/// `validate` code that says what to fix.
pub async fn probe<S: Storage + ?Sized>(storage: &S, role: Role, prefix: &str) -> Result<()> {
    let kind = storage.kind();
    let explain = |err: Error, denied: &'static str, action: &str| match err {
        Error::Invalid { .. } => err,
        Error::Transient(m) => Error::invalid(
            check::UNREACHABLE,
            Some("config"),
            format!("cannot reach the {kind} endpoint: {m}"),
        ),
        Error::Unauthenticated(m) => Error::invalid(
            check::BAD_CREDENTIALS,
            Some("secrets"),
            format!("the {kind} credentials were refused: {m}"),
        ),
        Error::NotFound(m) => Error::invalid(
            check::NOT_FOUND,
            Some("config"),
            format!("the {kind} bucket or container does not exist: {m}"),
        ),
        Error::PermissionDenied(m) => Error::invalid(
            denied,
            Some("secrets"),
            format!("the {kind} credentials may not {action}: {m}"),
        ),
        Error::Internal(m) | Error::Conflict(m) => Error::Internal(m),
    };
    let opts = ListOptions {
        prefix: prefix.to_owned(),
        recursive: false,
        start_after: None,
        page_size: 1,
    };
    if let Some(Err(e)) = storage.list(opts).next().await {
        return Err(explain(e, check::NO_LIST, "list objects"));
    }
    if role == Role::Target {
        let key = format!("{prefix}.labelsync-check-{}", ulid::Ulid::new());
        storage
            .put(
                &key,
                Bytes::from_static(b"labelsync write check"),
                Some("text/plain"),
            )
            .await
            .map_err(|e| explain(e, check::NO_WRITE, "write objects"))?;
        storage
            .delete(&key)
            .await
            .map_err(|e| explain(e, check::NO_WRITE, "delete objects"))?;
    }
    Ok(())
}

/// How a backend's keys are read by what it sends them to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyShape {
    /// Opaque names (S3, GCS, Redis): only `.` / `..` segments are refused,
    /// since a URL or a client may fold them.
    Name,
    /// Paths (local files, Databricks volumes, Azure through object_store):
    /// empty segments are folded too, so they are refused as well, and a
    /// `\` may be read as a `/` (Azure's service does).
    Path,
}

/// Checks an object key before any backend uses it: no `.` or `..` segment,
/// spelled plainly or percent-encoded (`%2e%2e`, which URL parsers fold like
/// `..`), no NUL (no file name can hold one), not empty; with
/// [`KeyShape::Path`], no empty segment either (a leading, doubled or
/// trailing `/`), and a `\` or an encoded `/` or `\` (`%2f`, `%5c`) counts
/// as a separator for the dot segments. A refused key is `invalid_key`
/// (HTTP 400), and no request is made: keys come from task URIs, so they
/// are user input.
pub fn check_key(key: &str, shape: KeyShape) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::invalid(
            "invalid_key",
            Some("key"),
            format!("object key {key:?} {why}"),
        ))
    };
    if key.is_empty() {
        return refuse("is empty");
    }
    if key.contains('\0') {
        return refuse("contains a NUL character");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            if shape == KeyShape::Path {
                return refuse("has an empty path segment (a leading, doubled or trailing '/')");
            }
            continue;
        }
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if dot_segment(&decoded, shape) {
            return refuse("has a '.' or '..' segment; keys name objects inside the storage");
        }
    }
    Ok(())
}

/// Whether a key's segment, percent-decoded, is a `.` or `..` segment, or
/// with [`KeyShape::Path`] holds one between `\` or decoded `/`
/// separators: Azure takes a `\` in a blob name for a `/`, and a path's
/// reader may split where a decoded `/` is.
fn dot_segment(decoded: &str, shape: KeyShape) -> bool {
    match shape {
        KeyShape::Name => decoded == "." || decoded == "..",
        KeyShape::Path => decoded
            .split(['/', '\\'])
            .any(|part| part == "." || part == ".."),
    }
}

/// Settings the backends need from the deployment.
#[derive(Debug, Clone)]
pub struct StorageEnv {
    pub document_root: Option<PathBuf>,
    /// Seals and opens stored secrets; without it storages cannot take secrets.
    pub secrets: Option<Arc<SecretBox>>,
    /// Which addresses user-given endpoints may point at.
    pub net: NetPolicy,
    /// The Azure account to fall back to (`AZURE_BLOB_ACCOUNT_NAME` / `_KEY`).
    pub azure_account_name: Option<String>,
    pub azure_account_key: Option<crate::config::Secret>,
    /// `LABELSYNC_STORAGE_TIMEOUT_SECS`: see [`crate::config::Settings::storage_timeout`].
    pub request_timeout: Duration,
    /// `LABELSYNC_MAX_OBJECT_BYTES`: the largest object taken. Backends
    /// that can only read an object whole (Redis) read no more than this.
    pub max_object_bytes: u64,
    /// Backends this process opened lately ([`open_shared`]).
    pub opened: opened::Opened,
    /// The backends' HTTP clients ([`Self::http_client`]).
    pub http: crate::security::net::HttpClients,
    /// The AWS SDK's HTTP clients of the S3 storages.
    pub s3_http: s3::SdkClients,
}

impl Default for StorageEnv {
    fn default() -> Self {
        StorageEnv {
            document_root: None,
            secrets: None,
            net: NetPolicy::default(),
            azure_account_name: None,
            azure_account_key: None,
            request_timeout: Duration::from_secs(60),
            max_object_bytes: 4 << 30,
            opened: opened::Opened::default(),
            http: Default::default(),
            s3_http: Default::default(),
        }
    }
}

impl StorageEnv {
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        StorageEnv {
            document_root: settings.document_root.clone(),
            secrets: settings.secret_box.clone(),
            net: settings.endpoint_policy.clone(),
            azure_account_name: settings.azure_account_name.clone(),
            azure_account_key: settings.azure_account_key.clone(),
            request_timeout: settings.storage_timeout,
            max_object_bytes: settings.worker.max_object_bytes,
            opened: opened::Opened::default(),
            http: Default::default(),
            s3_http: Default::default(),
        }
    }

    /// The HTTP client of this deployment's storage traffic (guarded DNS,
    /// `request_timeout` between bytes), shared by every backend opened with
    /// these settings: see [`crate::security::net::HttpClients`].
    pub fn http_client(&self) -> Result<reqwest::Client> {
        self.http.get(&self.net, self.request_timeout)
    }

    /// The key, or the error telling the operator how to set one.
    pub fn secret_box(&self) -> Result<&SecretBox> {
        self.secrets.as_deref().ok_or_else(|| {
            Error::invalid(
                "secrets_unavailable",
                Some("secrets"),
                "this server cannot store secrets: set LABELSYNC_SECRET_KEY (32 random bytes, base64) on the scheduler and workers",
            )
        })
    }
}

/// A backend's secrets, decrypted; plain strings by construction.
#[derive(Clone, Default)]
pub struct Secrets(Map<String, Value>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    pub fn new(map: Map<String, Value>) -> Self {
        Secrets(map)
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Checks every name is one the backend takes.
    pub fn check_names(&self, kind: BackendKind) -> Result<()> {
        let allowed = kind.secret_names();
        if let Some(name) = self.0.keys().find(|n| !allowed.contains(&n.as_str())) {
            let expected = if allowed.is_empty() {
                "it takes none".to_owned()
            } else {
                format!("expected {}", allowed.join(", "))
            };
            return Err(Error::invalid(
                "invalid_secrets",
                Some("secrets"),
                format!("the {kind} backend takes no secret {name:?}; {expected}"),
            ));
        }
        Ok(())
    }
}

/// The AEAD context binding a storage's sealed secrets to its row.
pub fn secrets_context(storage_id: i64) -> String {
    format!("storage:{storage_id}")
}

/// Decrypts a saved storage's secrets.
pub fn secrets_of(model: &storage::Model, env: &StorageEnv) -> Result<Secrets> {
    match &model.secrets {
        None => Ok(Secrets::default()),
        Some(sealed) => env
            .secret_box()?
            .open(&secrets_context(model.id), sealed)
            .map(Secrets::new),
    }
}

/// Validates a backend's `config` for a create or update (syntax, required
/// fields, the SSRF guard on endpoints); returns it normalized.
pub async fn validate_config(kind: BackendKind, config: &Value, env: &StorageEnv) -> Result<Value> {
    backend(kind).validate(config, env).await
}

pub use opened::open_shared;

/// Opens the backend behind a saved storage (or one about to be saved).
pub async fn open(model: &storage::Model, env: &StorageEnv) -> Result<Arc<dyn Storage>> {
    let secrets = secrets_of(model, env)?;
    open_with(
        BackendKind::parse(&model.backend)?,
        &model.config,
        &secrets,
        env,
    )
    .await
}

/// Opens a backend from its config and plain secrets.
pub async fn open_with(
    kind: BackendKind,
    config: &Value,
    secrets: &Secrets,
    env: &StorageEnv,
) -> Result<Arc<dyn Storage>> {
    crate::security::net::install_crypto_provider();
    let opened = backend(kind).open(config, secrets, env).await?;
    // Every request of every backend is counted and timed in one place.
    Ok(Arc::new(instrumented::Instrumented(opened)))
}

/// The checks every cloud config shares: a bucket (or container) name with
/// no path in it, and an optional endpoint that must pass the SSRF guard.
/// Returns the endpoint with an empty string taken as none.
pub async fn check_location(
    field: &'static str,
    name: &str,
    endpoint_url: Option<String>,
    env: &StorageEnv,
) -> Result<Option<String>> {
    // The name goes into a URL's host or path: nothing that could end or
    // reshape either (`?`, `#`, `@`, `:`, `%`, backslash, spaces) gets
    // through. Every cloud's bucket and container names fit this.
    let url_safe = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if name.is_empty() || name == "." || name == ".." || !name.chars().all(url_safe) {
        return Err(Error::invalid(
            "invalid_config",
            Some(field),
            format!(
                "{field} must be a single name of letters, digits, '-', '.' or '_' (no slashes; put paths in prefix)"
            ),
        ));
    }
    let endpoint_url = endpoint_url.filter(|u| !u.trim().is_empty());
    if let Some(url) = &endpoint_url {
        env.net.check_url(url, "config.endpoint_url").await?;
    }
    Ok(endpoint_url)
}

/// An endpoint URL as a part of a [`Backend::place`]: scheme and host in
/// lower case, a default port dropped, and a path of `/` alone dropped;
/// any other path kept as it is (a client joins its paths to the
/// endpoint's, where `gcs` and `gcs/` differ); none (or blank) is `null`,
/// the backend's own default.
pub fn endpoint_place(url: Option<&str>) -> Value {
    let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
        return Value::Null;
    };
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Value::String(url.to_owned());
    };
    let text = parsed.as_str();
    match (parsed.path(), parsed.query(), parsed.fragment()) {
        ("/", None, None) => Value::String(text.trim_end_matches('/').to_owned()),
        _ => Value::String(text.to_owned()),
    }
}

/// Parses a backend's config object with serde, naming the backend in the error.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    kind: BackendKind,
    config: &Value,
) -> Result<T> {
    serde_json::from_value(config.clone()).map_err(|e| {
        Error::invalid(
            "invalid_config",
            Some("config"),
            format!("{kind} config: {e}"),
        )
    })
}

/// Builds a page stream from a "fetch the next page" function. `state` is
/// whatever the backend needs to continue (a continuation token, a directory
/// walker); `fetch` returns the page and the next state, or `None` at the end.
pub fn paginate<S, F, Fut>(state: S, fetch: F) -> BoxStream<'static, Result<Page>>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<(Page, S)>>> + Send + 'static,
{
    futures::stream::unfold((Some(state), fetch), |(state, fetch)| async move {
        let state = state?;
        match fetch(state).await {
            Ok(Some((page, next))) => Some((Ok(page), (Some(next), fetch))),
            Ok(None) => None,
            // An error ends the stream after it is reported.
            Err(err) => Some((Err(err), (None, fetch))),
        }
    })
    .boxed()
}

/// A loopback server for unit tests that gives every connection's first
/// request `answer` (a whole HTTP/1.1 response); its address.
#[cfg(test)]
pub(crate) async fn answering_always(answer: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.read(&mut [0; 4096]).await;
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    addr
}

/// Names a listing that must gather them whole before it can sort them
/// (a Redis storage's keys, one Databricks directory) holds at most: a
/// server that keeps answering new names must not grow it further (about
/// 100 MB of names at this many).
pub const MAX_GATHERED_NAMES: usize = 1_000_000;

/// The error of a listing that gathered more than [`MAX_GATHERED_NAMES`]:
/// `names` says which (`keys under "x"`), `why` why they are gathered, and
/// `advice` what the user can do.
pub fn too_many_names(what: &str, names: &str, why: &str, advice: &str) -> Error {
    Error::invalid(
        "storage_answer_too_big",
        None,
        format!(
            "{what}: more than {MAX_GATHERED_NAMES} {names}, which a listing holds at once \
             ({why}); {advice}"
        ),
    )
}

/// A listing page holds at most the entries (objects and prefixes) asked
/// for, `most`: a server that sends more, a million tiny entries in a page
/// within the body limit, would have each page (and those listed ahead)
/// take hundreds of megabytes.
pub fn within_page(entries: usize, most: usize, what: &str) -> Result<()> {
    if entries > most {
        return Err(Error::invalid(
            "storage_answer_too_big",
            None,
            format!(
                "{what}: the storage answered {entries} entries in a page; at most {most} were asked for"
            ),
        ));
    }
    Ok(())
}

/// Empty pages in a row, each saying more follow, after which a listing
/// gives up (a delimiter listing of a bucket of prefixes only can have
/// many; a server that answers nothing forever must not be asked forever).
const MAX_EMPTY_PAGES: u32 = 10_000;

/// Follows a listing's continuation tokens. A server that hands back the
/// token it was sent, goes round a cycle of tokens (A, B, A, ...), or keeps
/// answering empty pages that say more follow, would be asked forever, and
/// as an empty page commits nothing, not even a cancel of the run would be
/// seen.
#[derive(Debug, Default)]
pub struct Tokens {
    empty_in_a_row: u32,
    /// Hashes of the tokens answered so far (a token may be long; its hash
    /// takes 8 bytes a page), keyed anew for each listing so a server
    /// cannot pick tokens that collide.
    seen: std::collections::HashSet<u64>,
    keys: std::hash::RandomState,
}

impl Tokens {
    /// Checks a page that came for token `sent` with token `next` (`empty`:
    /// no object and no prefix in it).
    pub fn check(
        &mut self,
        sent: Option<&str>,
        next: Option<&str>,
        empty: bool,
        what: &str,
    ) -> Result<()> {
        let refuse = |why: &str| {
            Error::invalid(
                "storage_rejected",
                None,
                format!("{what}: the storage {why}; the listing cannot go on"),
            )
        };
        if next.is_some() && next == sent {
            return Err(refuse("answered the continuation token it was sent"));
        }
        if let Some(next) = next
            && !self
                .seen
                .insert(std::hash::BuildHasher::hash_one(&self.keys, next))
        {
            return Err(refuse(
                "answered a continuation token it had answered before",
            ));
        }
        self.empty_in_a_row = if empty && next.is_some() {
            self.empty_in_a_row + 1
        } else {
            0
        };
        if self.empty_in_a_row > MAX_EMPTY_PAGES {
            return Err(refuse(&format!(
                "answered {MAX_EMPTY_PAGES} empty pages in a row, each saying more follow"
            )));
        }
        Ok(())
    }
}

/// Lists ahead: pulls up to `depth` pages into a buffer on its own task, so a
/// slow listing (a remote bucket) and the database writes of the previous page
/// overlap instead of taking turns. Dropping the stream stops the listing
/// (its task is aborted).
pub fn prefetch(
    mut pages: BoxStream<'static, Result<Page>>,
    depth: usize,
) -> BoxStream<'static, Result<Page>> {
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    // Aborted with the stream: a listing that gathers before it answers (a
    // Databricks directory) would otherwise go on after its reader is gone.
    let lister = AbortOnDrop(tokio::spawn(async move {
        while let Some(page) = pages.next().await {
            if tx.send(page).await.is_err() {
                break;
            }
        }
    }));
    // The channel closing means the listing ended, unless the lister died:
    // then say so, or the caller would take a partial listing for a whole one.
    futures::stream::unfold((rx, Some(lister)), |(mut rx, lister)| async move {
        if let Some(page) = rx.recv().await {
            return Some((page, (rx, lister)));
        }
        match (&mut lister?.0).await {
            Ok(()) => None,
            Err(e) => Some((
                Err(Error::Internal(format!("listing task failed: {e}"))),
                (rx, None),
            )),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A change of credentials, region, encryption or spelling leaves a
    /// storage where it was (a target's export links kept, a started run's
    /// source left alone); a bucket, endpoint, directory or key prefix
    /// moves it. Every config was compared as JSON, so each of the first
    /// kind counted as a move.
    #[test]
    fn a_place_is_where_the_objects_are_not_how_they_are_reached() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("data/sub")).expect("mkdir");
        std::os::unix::fs::symlink("data", root.path().join("link")).expect("symlink");
        let env = StorageEnv {
            document_root: Some(root.path().to_path_buf()),
            azure_account_name: Some("acct".into()),
            ..StorageEnv::default()
        };
        let place = |kind, config: Value| backend(kind).place(&config, &env);
        let same = [
            (
                BackendKind::S3,
                json!({"bucket": "b"}),
                json!({"bucket": "b", "region": "eu-west-1", "role_arn": "arn:aws:iam::1:role/r", "sse_kms_key_id": "k", "force_path_style": true}),
            ),
            (
                BackendKind::S3,
                json!({"bucket": "b", "endpoint_url": "http://127.0.0.1:9000"}),
                json!({"bucket": "b", "endpoint_url": "HTTP://127.0.0.1:9000/"}),
            ),
            (
                BackendKind::Gcs,
                json!({"bucket": "b"}),
                json!({"bucket": "b", "project_id": "p", "endpoint_url": " "}),
            ),
            (
                BackendKind::Azure,
                json!({"container": "c"}),
                json!({"container": "c", "tenant_id": "t", "client_id": "i", "account_name": "acct"}),
            ),
            (
                BackendKind::Gcs,
                json!({"bucket": "b", "endpoint_url": "http://h:1/"}),
                json!({"bucket": "b", "endpoint_url": "http://H:1"}),
            ),
            (
                BackendKind::Redis,
                json!({"host": "Cache.local"}),
                json!({"host": "cache.local", "port": 6379, "tls": true}),
            ),
            (
                BackendKind::Local,
                json!({"path": "data"}),
                json!({"path": "./data/"}),
            ),
            (
                BackendKind::Databricks,
                json!({"host": "adb-1.net", "catalog": "c", "schema": "s", "volume": "v"}),
                json!({"host": "https://ADB-1.net/", "catalog": "c", "schema": "s", "volume": "v"}),
            ),
        ];
        for (kind, a, b) in same {
            assert_eq!(
                place(kind, a.clone()),
                place(kind, b.clone()),
                "{kind}: {a} and {b}"
            );
            assert!(place(kind, a.clone()).is_some(), "{kind}: {a}");
        }
        let moved = [
            (
                BackendKind::S3,
                json!({"bucket": "b"}),
                json!({"bucket": "c"}),
            ),
            (
                BackendKind::S3,
                json!({"bucket": "b", "region": "us-east-1"}),
                json!({"bucket": "b", "region": "cn-north-1"}),
            ),
            (
                BackendKind::S3,
                json!({"bucket": "b"}),
                json!({"bucket": "b", "region": "eusc-de-east-1"}),
            ),
            (
                BackendKind::S3,
                json!({"bucket": "b"}),
                json!({"bucket": "b", "region": "xx-new-1"}),
            ),
            (
                BackendKind::Gcs,
                json!({"bucket": "b", "endpoint_url": "http://h/gcs"}),
                json!({"bucket": "b", "endpoint_url": "http://h/gcs/"}),
            ),
            (
                BackendKind::Local,
                json!({"path": "data"}),
                json!({"path": "link"}),
            ),
            (
                BackendKind::S3,
                json!({"bucket": "b"}),
                json!({"bucket": "b", "endpoint_url": "http://127.0.0.1:9000"}),
            ),
            (
                BackendKind::Gcs,
                json!({"bucket": "b", "endpoint_url": "http://a:1"}),
                json!({"bucket": "b", "endpoint_url": "http://a:2"}),
            ),
            (
                BackendKind::Azure,
                json!({"container": "c", "account_name": "acctx"}),
                json!({"container": "c", "account_name": "accty"}),
            ),
            (
                BackendKind::Redis,
                json!({"host": "h"}),
                json!({"host": "h", "db": 1}),
            ),
            (
                BackendKind::Redis,
                json!({"host": "h"}),
                json!({"host": "h", "path": "tasks:"}),
            ),
            (
                BackendKind::Local,
                json!({"path": "data"}),
                json!({"path": "data/sub"}),
            ),
            (
                BackendKind::Databricks,
                json!({"host": "h", "catalog": "c", "schema": "s", "volume": "v"}),
                json!({"host": "h", "catalog": "c", "schema": "s", "volume": "w"}),
            ),
        ];
        for (kind, a, b) in moved {
            assert_ne!(
                place(kind, a.clone()),
                place(kind, b.clone()),
                "{kind}: {a} and {b}"
            );
        }
        assert_eq!(place(BackendKind::S3, json!({"bucket": 1})), None);
    }

    /// A server going round a cycle of tokens with pages that are not
    /// empty was followed for ever (only a token sent straight back, or
    /// empty pages, stopped it).
    #[test]
    fn a_cycle_of_continuation_tokens_stops_the_listing() {
        let mut tokens = Tokens::default();
        let pages = [(None, "A"), (Some("A"), "B"), (Some("B"), "C")];
        for (sent, next) in pages {
            tokens
                .check(sent, Some(next), false, "list")
                .expect("a new token");
        }
        let refused = tokens.check(Some("C"), Some("A"), false, "list x");
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("list x: the storage answered a continuation token it had answered before")),
            "{refused:?}"
        );
        let sent_back = Tokens::default().check(Some("A"), Some("A"), false, "list");
        assert!(
            matches!(&sent_back, Err(e) if e.to_string().contains("the continuation token it was sent")),
            "{sent_back:?}"
        );
    }

    fn refused(key: &str, shape: KeyShape) -> bool {
        matches!(
            check_key(key, shape),
            Err(Error::Invalid {
                code: "invalid_key",
                ..
            })
        )
    }

    #[test]
    fn keys_with_dot_segments_or_nul_are_refused() {
        for shape in [KeyShape::Name, KeyShape::Path] {
            for bad in [
                "",
                "..",
                "../a",
                "a/../b",
                "a/..",
                "./a",
                "a/./b",
                "a/%2e%2e/b",
                "a/%2E%2e/b",
                "a/.%2e/b",
                "%2e/a",
                "a\0b",
            ] {
                assert!(refused(bad, shape), "{bad:?} ({shape:?})");
            }
            for good in [
                "a.jpg",
                "dir/a b.jpg",
                "...",
                "a..b/c",
                ".hidden/x",
                "%2e%2e%2e",
                "ctl\u{1}name.jpg",
            ] {
                assert!(check_key(good, shape).is_ok(), "{good:?} ({shape:?})");
            }
        }
        // A `\` or a decoded `/` separates a path's segments too (Azure
        // turns `\` into `/`); to S3, GCS and Redis they are characters.
        for key in [
            "a\\..\\b",
            "..\\a",
            "a\\.",
            "a/%5c..%5cb",
            "a%2f..%2fb",
            "a/..\\b",
        ] {
            assert!(refused(key, KeyShape::Path), "{key:?}");
            assert!(check_key(key, KeyShape::Name).is_ok(), "{key:?}");
        }
        for key in ["dir\\a.jpg", "a\\..b", "a%5cb", "a%2fb"] {
            assert!(check_key(key, KeyShape::Path).is_ok(), "{key:?}");
        }
        // Empty segments mean something to S3 and GCS, nothing to paths.
        for key in ["/a", "a//b", "a/"] {
            assert!(check_key(key, KeyShape::Name).is_ok(), "{key}");
            assert!(refused(key, KeyShape::Path), "{key}");
        }
    }
}
