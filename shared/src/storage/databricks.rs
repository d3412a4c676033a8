//! Databricks Unity Catalog volumes, through the Files API (no crate exists;
//! these four calls are all we need):
//! - `GET /api/2.0/fs/directories{path}` (paged with `page_token`),
//! - `GET /api/2.0/fs/files{path}` (with `Range`),
//! - `PUT /api/2.0/fs/files{path}?overwrite=true`,
//! - `DELETE /api/2.0/fs/files{path}`,
//!
//! each with a personal access token. Objects are files under
//! `/Volumes/<catalog>/<schema>/<volume>/`. The API lists one directory at a
//! time in no promised order, so the listing walks directories depth-first,
//! each one sorted (one directory's names in memory at a time), which gives
//! the key order a resumed run's `start_after` relies on. No presigning: the
//! API proxies these objects.
use std::{path::Path, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::DateTime;
use futures::stream::BoxStream;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode, Url, header};
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, GetRange, KeyShape, ListError, ListOptions, Object, ObjectMeta, Page, Secrets,
    Storage, StorageEnv, check_key, paginate, parse_config,
    retry::{
        at_most_a_page, error_body, json_page, object_of, retry, status_error, transport_error,
    },
};
use crate::{Error, Result};

/// The longest directory path a recursive listing goes into: a server that
/// nests directories without end would otherwise be walked forever, one
/// request a level.
const MAX_DIR_KEY_BYTES: usize = 4096;

/// Path segments keep unreserved characters; the rest is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `config` object of a `databricks` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabricksConfig {
    /// Workspace URL, e.g. `https://adb-123.4.azuredatabricks.net` (a bare
    /// host means https).
    pub host: String,
    pub catalog: String,
    pub schema: String,
    pub volume: String,
}

/// The workspace URL a `host` names: a bare host means https; no
/// trailing `/`.
fn workspace_url(host: &str) -> String {
    let url = if host.contains("://") {
        host.to_owned()
    } else {
        format!("https://{host}")
    };
    url.trim_end_matches('/').to_owned()
}

impl DatabricksConfig {
    pub async fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let mut config: DatabricksConfig = parse_config(BackendKind::Databricks, config)?;
        config.host = workspace_url(&config.host);
        for (field, value) in [
            ("config.catalog", &config.catalog),
            ("config.schema", &config.schema),
            ("config.volume", &config.volume),
        ] {
            if value.contains('/') || check_key(value, KeyShape::Path).is_err() {
                return Err(Error::invalid(
                    "invalid_config",
                    Some(field),
                    format!("{field} must be a single name (not '.' or '..', no '/')"),
                ));
            }
        }
        env.net.check_url(&config.host, "config.host").await?;
        Ok(config)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One Unity Catalog volume, through the Databricks Files API. Listings walk
/// directories depth-first, each directory sorted; no
/// presign.
#[derive(Debug, Clone)]
pub struct DatabricksStorage {
    http: Client,
    /// The longest a directory page's answer may take whole.
    page_deadline: std::time::Duration,
    host: Url,
    /// `/Volumes/<catalog>/<schema>/<volume>`, escaped.
    root: String,
    /// The same, as users write it in `dbx://` URIs.
    plain_root: String,
    token: String,
}

impl DatabricksStorage {
    pub fn open(config: DatabricksConfig, secrets: &Secrets, env: &StorageEnv) -> Result<Self> {
        let token = secrets.get("token").ok_or_else(|| {
            Error::invalid(
                "missing_secret",
                Some("secrets.token"),
                "the databricks backend needs secrets.token (a personal access token)",
            )
        })?;
        let host = Url::parse(&config.host).map_err(|e| {
            Error::invalid(
                "invalid_config",
                Some("config.host"),
                format!("config.host: {e}"),
            )
        })?;
        let names = [&config.catalog, &config.schema, &config.volume];
        let root = names.iter().fold("/Volumes".to_owned(), |acc, n| {
            format!("{acc}/{}", utf8_percent_encode(n, SEGMENT))
        });
        let plain_root = format!(
            "Volumes/{}/{}/{}",
            config.catalog, config.schema, config.volume
        );
        Ok(DatabricksStorage {
            http: env.http_client()?,
            page_deadline: env.request_timeout,
            host,
            root,
            plain_root,
            token: token.to_owned(),
        })
    }

    /// The API URL of a file or directory (`kind` is `files` or
    /// `directories`; a directory key is empty or ends in `/`). Every URL the
    /// token is sent to is built here, from a checked key whose segments are
    /// percent-encoded one by one, so it stays inside the volume: a `..`
    /// would otherwise be folded by the URL and reach any workspace API.
    fn url(&self, kind: &str, key: &str) -> Result<Url> {
        let key = match kind {
            "directories" => key.strip_suffix('/').unwrap_or(key),
            _ => key,
        };
        if !(key.is_empty() && kind == "directories") {
            check_key(key, KeyShape::Path)?;
        }
        let mut path = format!("api/2.0/fs/{kind}{}", self.root);
        for segment in key.split('/').filter(|s| !s.is_empty()) {
            path.push('/');
            path.extend(utf8_percent_encode(segment, SEGMENT));
        }
        if kind == "directories" {
            path.push('/');
        }
        self.host
            .join(&path)
            .map_err(|e| Error::Internal(format!("databricks url: {e}")))
    }

    async fn send(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        retry(what, || async {
            let resp = build()
                .bearer_auth(&self.token)
                .send()
                .await
                .map_err(|e| transport_error(&e, what))?;
            if resp.status().is_success() {
                return Ok(resp);
            }
            let status = resp.status();
            let body = error_body(resp).await;
            let detail = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            // Databricks answers a bad token with 401 or 403 "Invalid access token".
            if status == StatusCode::FORBIDDEN && detail.to_lowercase().contains("token") {
                return Err(Error::Unauthenticated(format!("{what}: {detail}")));
            }
            Err(status_error(status, what, &detail))
        })
        .await
    }

    /// Every entry of one directory (all pages), sorted by name. `held`:
    /// the entries the directories above it still hold for the walk, which
    /// count against the same limit (a server answering nearly the limit
    /// at every level, each with one subdirectory, held it many times
    /// over).
    async fn read_dir(&self, dir_key: &str, held: usize) -> Result<Vec<Entry>> {
        let url = self.url("directories", dir_key)?;
        let what = format!("list dbx://{}/{dir_key}", self.plain_root);
        let mut entries = Vec::new();
        let mut token: Option<String> = None;
        let mut tokens = super::Tokens::default();
        loop {
            let mut query = vec![("page_size", "1000".to_owned())];
            if let Some(t) = &token {
                query.push(("page_token", t.clone()));
            }
            let resp = match self
                .send(&what, || self.http.get(url.clone()).query(&query))
                .await
            {
                Ok(resp) => resp,
                // A prefix naming no directory lists nothing.
                Err(Error::NotFound(_)) if !dir_key.is_empty() => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let page: DirPage = json_page(resp, self.page_deadline, &what).await?;
            let next = page.next_page_token.filter(|t| !t.is_empty());
            let empty = page.contents.is_empty();
            tokens.check(token.as_deref(), next.as_deref(), empty, &what)?;
            entries.extend(page.contents);
            if entries.len() + held > super::MAX_GATHERED_NAMES {
                let why = "the Files API lists a directory unsorted, and a walk holds the rest of the directories above it";
                let advice = "split it into subdirectories";
                return Err(super::too_many_names(
                    &what,
                    "entries in one directory",
                    why,
                    advice,
                ));
            }
            token = next;
            if token.is_none() {
                break;
            }
        }
        entries.sort_by(|a, b| b.name.cmp(&a.name)); // descending: `pop` yields ascending
        Ok(entries)
    }
}

#[derive(Deserialize)]
struct DirPage {
    #[serde(default, deserialize_with = "at_most_a_page")]
    contents: Vec<Entry>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    #[serde(default)]
    is_directory: bool,
    file_size: Option<i64>,
    /// Milliseconds since the epoch.
    last_modified: Option<i64>,
}

struct Frame {
    dir_key: String,
    pending: Vec<Entry>,
}

struct Walk {
    storage: DatabricksStorage,
    opts: ListOptions,
    name_prefix: String,
    stack: Vec<Frame>,
    started: bool,
    /// Subdirectories the token may not read since the last page: they go
    /// out with the next one as per-object errors.
    errors: Vec<ListError>,
}

impl Walk {
    /// True when every key under `dir_key` sorts at or before `start_after`.
    /// Keys compare as the walk goes, a path component at a time
    /// (`d/a/x` before `d/a-b`), not byte by byte, where `d/a-b` comes
    /// first and a resumed walk skipped it.
    fn dir_done(&self, dir_key: &str) -> bool {
        self.opts.start_after.as_ref().is_some_and(|after| {
            Path::new(dir_key) < Path::new(after.as_str()) && !after.starts_with(dir_key)
        })
    }

    /// True when `key` sorts at or before `start_after`, in walk order.
    fn listed_already(&self, key: &str) -> bool {
        self.opts
            .start_after
            .as_ref()
            .is_some_and(|after| Path::new(key) <= Path::new(after.as_str()))
    }

    async fn next_page(&mut self) -> Result<Page> {
        if !self.started {
            self.started = true;
            let dir = self.stack[0].dir_key.clone();
            self.stack[0].pending = self.storage.read_dir(&dir, 0).await?;
        }
        let mut page = Page::default();
        while page.objects.len() < self.opts.page_size {
            let Some(frame) = self.stack.last_mut() else {
                break;
            };
            let Some(entry) = frame.pending.pop() else {
                self.stack.pop();
                continue;
            };
            let top = self.stack.len() == 1;
            if top && !entry.name.starts_with(&self.name_prefix) {
                continue;
            }
            let key = format!("{}{}", self.stack[self.stack.len() - 1].dir_key, entry.name);
            if entry.is_directory {
                let sub = format!("{key}/");
                if self.opts.recursive && sub.len() > MAX_DIR_KEY_BYTES && !self.dir_done(&sub) {
                    self.errors.push(ListError {
                        message: format!(
                            "directory path longer than {MAX_DIR_KEY_BYTES} bytes: not listed (directories nested without end?)"
                        ),
                        key: sub,
                        incomplete: true,
                    });
                    continue;
                }
                if self.opts.recursive && !self.dir_done(&sub) {
                    let held = self.stack.iter().map(|f| f.pending.len()).sum();
                    match self.storage.read_dir(&sub, held).await {
                        Ok(pending) => self.stack.push(Frame {
                            dir_key: sub,
                            pending,
                        }),
                        // A directory the token may not read is that
                        // directory's error, not the whole listing's; a
                        // transient failure or a refused token still fails
                        // the listing (and the run is retried).
                        Err(e @ (Error::PermissionDenied(_) | Error::Invalid { .. })) => {
                            self.errors.push(ListError {
                                key: sub,
                                message: e.to_string(),
                                incomplete: true,
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            if self.listed_already(&key) {
                continue;
            }
            page.objects.push(ObjectMeta {
                etag: Some(etag(
                    entry.last_modified.unwrap_or_default(),
                    entry.file_size.unwrap_or_default(),
                )),
                key,
                size: entry.file_size,
                last_modified: entry
                    .last_modified
                    .and_then(DateTime::from_timestamp_millis),
            });
        }
        page.errors = std::mem::take(&mut self.errors);
        Ok(page)
    }
}

#[async_trait]
impl Storage for DatabricksStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Databricks
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let (dir_key, name_prefix) = match opts.prefix.rfind('/') {
            Some(i) => (
                opts.prefix[..=i].to_owned(),
                opts.prefix[i + 1..].to_owned(),
            ),
            None => (String::new(), opts.prefix.clone()),
        };
        let walk = Walk {
            storage: self.clone(),
            opts,
            name_prefix,
            stack: vec![Frame {
                dir_key,
                pending: Vec::new(),
            }],
            started: false,
            errors: Vec::new(),
        };
        paginate(walk, |mut walk: Walk| async move {
            let page = walk.next_page().await?;
            let done = page.objects.is_empty() && page.errors.is_empty();
            Ok((!done).then_some((page, walk)))
        })
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        let what = format!("get dbx://{}/{key}", self.plain_root);
        let url = self.url("files", key)?;
        let resp = self
            .send(&what, || {
                let req = self.http.get(url.clone());
                match range {
                    Some(r) => req.header(header::RANGE, r.header()),
                    None => req,
                }
            })
            .await?;
        let modified = resp
            .headers()
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok());
        let mut object = object_of(resp, &[], range)?;
        // Of the listing's form (the time here to the second): the raw
        // `Last-Modified` held a comma, which `If-None-Match` lists are
        // split on, so `/resolve` never answered 304.
        let size = object.size.and_then(|size| i64::try_from(size).ok());
        object.etag = modified
            .zip(size)
            .map(|(at, size)| etag(at.timestamp_millis(), size));
        Ok(object)
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: Option<&str>) -> Result<()> {
        let what = format!("put dbx://{}/{key}", self.plain_root);
        let url = self.url("files", key)?;
        self.send(&what, || {
            self.http
                .put(url.clone())
                .query(&[("overwrite", "true")])
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let what = format!("delete dbx://{}/{key}", self.plain_root);
        let url = self.url("files", key)?;
        match self
            .send(&what, || self.http.request(Method::DELETE, url.clone()))
            .await
        {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn presign(&self, _key: &str, _ttl: Duration) -> Result<Option<String>> {
        Ok(None)
    }

    fn task_uri(&self, key: &str) -> String {
        format!("dbx://{}/{key}", self.plain_root)
    }
}

/// The databricks backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &["token"]
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Path
    }

    fn uri_scheme(&self) -> Option<&'static str> {
        Some("dbx")
    }

    fn uri_location(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<String> {
        let text = |field: &str| config.get(field)?.as_str();
        Some(format!(
            "{}/{}/{}",
            text("catalog")?,
            text("schema")?,
            text("volume")?
        ))
    }

    /// `dbx://Volumes/<catalog>/<schema>/<volume>/<key>`.
    fn split_uri<'u>(&self, rest: &'u str) -> Option<(String, &'u str)> {
        let mut parts = rest.strip_prefix("Volumes/")?.splitn(4, '/');
        let (c, s, v, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        Some((format!("{c}/{s}/{v}"), key))
    }

    fn place(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<serde_json::Value> {
        let c: DatabricksConfig = parse_config(BackendKind::Databricks, config).ok()?;
        let host = super::endpoint_place(Some(&workspace_url(c.host.trim())));
        Some(serde_json::json!([host, c.catalog, c.schema, c.volume]))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        DatabricksConfig::parse(config, env)
            .await
            .map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(DatabricksStorage::open(
            DatabricksConfig::parse(config, env).await?,
            secrets,
            env,
        )?))
    }
}
/// A file's etag: its modification time (milliseconds) and size, which
/// the Files API gives in listings and, to the second, in a download's
/// `Last-Modified`.
fn etag(modified_ms: i64, size: i64) -> String {
    format!("{modified_ms:x}-{size:x}")
}
