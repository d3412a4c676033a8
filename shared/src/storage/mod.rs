//! One trait for every storage backend, one module per backend.
//!
//! A backend implements "list one page", "check access" and "name an object";
//! pagination is the shared [`paginate`] helper, so every listing is a stream
//! of pages that never holds a whole bucket in memory. Adding a backend means:
//! its module, a variant of [`BackendKind`], and its arm in [`open`].
pub mod local;
pub mod spec;

use std::{fmt, path::PathBuf, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::BoxStream};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, db::entities::storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    S3,
    Gcs,
    Azure,
    Redis,
    Local,
    Databricks,
}

impl BackendKind {
    pub const ALL: [BackendKind; 6] = [
        BackendKind::S3,
        BackendKind::Gcs,
        BackendKind::Azure,
        BackendKind::Redis,
        BackendKind::Local,
        BackendKind::Databricks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::S3 => "s3",
            BackendKind::Gcs => "gcs",
            BackendKind::Azure => "azure",
            BackendKind::Redis => "redis",
            BackendKind::Local => "local",
            BackendKind::Databricks => "databricks",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s).ok_or_else(|| {
            Error::invalid(
                "unknown_backend",
                Some("backend"),
                format!("unknown backend {s:?}; expected one of s3, gcs, azure, redis, local, databricks"),
            )
        })
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
}

#[derive(Debug, Clone)]
pub struct ListOptions {
    /// Only keys starting with this string.
    pub prefix: String,
    /// When false, only keys with no `/` after the prefix.
    pub recursive: bool,
    /// Resume: only keys after this one (in the backend's listing order).
    pub start_after: Option<String>,
    pub page_size: usize,
}

#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Lists objects as a stream of pages in key order.
    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>>;

    /// Checks that the storage exists and that we may do what `role` needs.
    async fn check(&self, role: Role) -> Result<()>;

    /// The URI a Files-mode task carries for this object.
    fn task_uri(&self, key: &str) -> String;

    /// Reads a whole object as a stream of chunks.
    async fn get(&self, key: &str) -> Result<ByteStream>;

    /// The object as a local file, for backends that have one: Parquet needs
    /// random access, and this spares it a copy.
    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
}

/// An object's bytes. Errors are `io::Error`s so the stream can feed a reader;
/// backends wrap their [`Error`] with `io::Error::other`.
pub type ByteStream = BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// Settings the backends need from the deployment.
#[derive(Debug, Clone, Default)]
pub struct StorageEnv {
    pub document_root: Option<PathBuf>,
}

/// Validates a backend's `config` for a create or update; returns it normalized.
pub fn validate_config(
    kind: BackendKind,
    config: &serde_json::Value,
    env: &StorageEnv,
) -> Result<serde_json::Value> {
    match kind {
        BackendKind::Local => local::LocalConfig::parse(config, env).map(|c| c.to_json()),
        other => Err(unavailable(other)),
    }
}

/// Opens the backend behind a saved storage.
pub fn open(model: &storage::Model, env: &StorageEnv) -> Result<Arc<dyn Storage>> {
    match BackendKind::parse(&model.backend)? {
        BackendKind::Local => Ok(Arc::new(local::LocalStorage::new(
            local::LocalConfig::parse(&model.config, env)?,
            env,
        )?)),
        other => Err(unavailable(other)),
    }
}

fn unavailable(kind: BackendKind) -> Error {
    Error::invalid(
        "backend_unavailable",
        Some("backend"),
        format!("the {kind} backend is not available in this build yet; use \"local\""),
    )
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

/// Lists ahead: pulls up to `depth` pages into a buffer on its own task, so a
/// slow listing (a remote bucket) and the database writes of the previous page
/// overlap instead of taking turns. Dropping the stream stops the listing.
pub fn prefetch(
    mut pages: BoxStream<'static, Result<Page>>,
    depth: usize,
) -> BoxStream<'static, Result<Page>> {
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    let lister = tokio::spawn(async move {
        while let Some(page) = pages.next().await {
            if tx.send(page).await.is_err() {
                break;
            }
        }
    });
    // The channel closing means the listing ended, unless the lister died:
    // then say so, or the caller would take a partial listing for a whole one.
    futures::stream::unfold((rx, Some(lister)), |(mut rx, lister)| async move {
        if let Some(page) = rx.recv().await {
            return Some((page, (rx, lister)));
        }
        match lister?.await {
            Ok(()) => None,
            Err(e) => Some((
                Err(Error::Internal(format!("listing task failed: {e}"))),
                (rx, None),
            )),
        }
    })
    .boxed()
}
