//! Azure Blob Storage, through `object_store`'s Azure client.
//!
//! Why `object_store`: see docs/DECISIONS.md (Azure: object_store, not
//! azure_storage_blob).
//!
//! Credentials, in order: `account_key` from the secrets; a service principal
//! (`tenant_id` + `client_id` + `client_secret`); `AZURE_BLOB_ACCOUNT_NAME` /
//! `AZURE_BLOB_ACCOUNT_KEY` from the server's environment; else workload or
//! managed identity (object_store reads the `AZURE_*` variables AKS injects).
//! Retries: object_store's backoff with jitter, [`retry::MAX_ATTEMPTS`] tries.
//! HTTP goes through our client, so the SSRF guard resolves every name.
use std::{borrow::Cow, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
    RetryConfig,
    azure::{MicrosoftAzure, MicrosoftAzureBuilder},
    client::{HttpClient, HttpConnector},
    list::{PaginatedListOptions, PaginatedListResult, PaginatedListStore},
    path::Path,
    signer::Signer,
};
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, Children, GetRange, KeyShape, ListOptions, Object, ObjectMeta, Page, Secrets,
    Storage, StorageEnv, Tokens, check_key, check_location, paginate, parse_config, retry,
    within_page,
};
use crate::{
    Error, Result,
    security::net::{HttpClients, NetPolicy, parse_endpoint},
};

mod bounded;

/// The `config` object of a `azure` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// Falls back to `AZURE_BLOB_ACCOUNT_NAME`.
    #[serde(default)]
    pub account_name: Option<String>,
    pub container: String,
    /// Account URL for Azurite or sovereign clouds, e.g.
    /// `http://127.0.0.1:10000/devstoreaccount1`; default
    /// `https://<account>.blob.core.windows.net`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
}

impl AzureConfig {
    pub async fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let mut config: AzureConfig = parse_config(BackendKind::Azure, config)?;
        config.endpoint_url = check_location(
            "config.container",
            &config.container,
            config.endpoint_url.take(),
            env,
        )
        .await?;
        if config.account_name.is_none() && env.azure_account_name.is_none() {
            return Err(Error::invalid(
                "missing_field",
                Some("config.account_name"),
                "config.account_name is required (or set AZURE_BLOB_ACCOUNT_NAME on the server)",
            ));
        }
        if let Some(name) = &config.account_name {
            check_account_name(name, "config.account_name")?;
        }
        Ok(config)
    }

    /// The account to use, checked: the config's, else the server's
    /// `AZURE_BLOB_ACCOUNT_NAME`.
    fn account(&self, env: &StorageEnv) -> Result<String> {
        match (&self.account_name, &env.azure_account_name) {
            (Some(name), _) => {
                check_account_name(name, "config.account_name").map(|()| name.clone())
            }
            (None, Some(name)) => {
                check_account_name(name, "AZURE_BLOB_ACCOUNT_NAME").map(|()| name.clone())
            }
            (None, None) => Err(Error::invalid(
                "missing_field",
                Some("config.account_name"),
                "config.account_name is required (or set AZURE_BLOB_ACCOUNT_NAME on the server)",
            )),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Azure storage account names are 3-24 lowercase letters and digits. The
/// name becomes the host `<account>.blob.core.windows.net`, so anything else
/// could make that host something else: `127.0.0.1:18999/x?` would connect to
/// a literal address, which no DNS resolver (and so no SSRF guard) sees.
pub fn check_account_name(name: &str, field: &'static str) -> Result<()> {
    let valid = (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if valid {
        return Ok(());
    }
    Err(Error::invalid(
        "invalid_config",
        Some(field),
        format!(
            "{field} must be an Azure storage account name: 3 to 24 lowercase letters and digits"
        ),
    ))
}

/// Hands object_store our guarded reqwest client (the storages' shared
/// clients, policy, read timeout), its answers bounded
/// ([`bounded::BoundedAnswers`]).
#[derive(Debug)]
struct GuardedConnector(HttpClients, NetPolicy, Duration);

impl HttpConnector for GuardedConnector {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let client = self
            .0
            .get(&self.1, self.2)
            .map_err(|e| object_store::Error::Generic {
                store: "azure",
                source: e.to_string().into(),
            })?;
        Ok(HttpClient::new(bounded::BoundedAnswers(client)))
    }
}

/// One Azure Blob container. Presigns SAS URLs: a service SAS with an
/// account key, a user-delegation SAS with token credentials.
#[derive(Debug)]
pub struct AzureStorage {
    store: Arc<MicrosoftAzure>,
    container: String,
    /// The most one listing page may take, retries included.
    page_deadline: Duration,
}

/// How long `object_store` goes on retrying one request.
const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

impl AzureStorage {
    pub fn open(config: AzureConfig, secrets: &Secrets, env: &StorageEnv) -> Result<Self> {
        // Checked again here: a row saved before the check existed (or the
        // server's setting) may hold anything.
        let account = config.account(env)?;
        let service_principal = match (
            &config.tenant_id,
            &config.client_id,
            secrets.get("client_secret"),
        ) {
            (Some(t), Some(c), Some(s)) => Some((t, c, s)),
            (None, None, None) => None,
            _ => {
                return Err(Error::invalid(
                    "invalid_config",
                    Some("config.tenant_id"),
                    "a service principal needs config.tenant_id, config.client_id and secrets.client_secret",
                ));
            }
        };
        let mut builder = if let Some(key) = secrets.get("account_key") {
            MicrosoftAzureBuilder::new().with_access_key(key)
        } else if let Some((tenant, client, secret)) = service_principal {
            MicrosoftAzureBuilder::new().with_client_secret_authorization(client, secret, tenant)
        } else if let Some(key) = env.azure_account_key.as_ref().filter(|_| {
            config.account_name.is_none() || config.account_name == env.azure_account_name
        }) {
            MicrosoftAzureBuilder::new().with_access_key(key.expose())
        } else {
            // Workload identity (AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID,
            // AZURE_TENANT_ID) or the managed identity endpoint.
            MicrosoftAzureBuilder::from_env()
        };
        builder = builder
            .with_account(&account)
            .with_container_name(&config.container)
            .with_http_connector(GuardedConnector(
                env.http.clone(),
                env.net.clone(),
                env.request_timeout,
            ))
            .with_retry(RetryConfig {
                max_retries: retry::MAX_ATTEMPTS as usize - 1,
                retry_timeout: RETRY_TIMEOUT,
                ..RetryConfig::default()
            });
        if let Some(url) = &config.endpoint_url {
            let parsed = parse_endpoint(url, "config.endpoint_url")?;
            builder = builder
                .with_endpoint(url.trim_end_matches('/').to_owned())
                .with_allow_http(parsed.scheme() == "http");
        }
        let store = builder
            .build()
            .map_err(|e| Error::invalid("invalid_config", Some("config"), format!("azure: {e}")))?;
        Ok(AzureStorage {
            store: Arc::new(store),
            container: config.container,
            // Our client's read timeout bounds a pause, not an answer sent a
            // byte at a time.
            page_deadline: RETRY_TIMEOUT + env.request_timeout,
        })
    }

    fn lister(&self, prefix: &str) -> Lister {
        Lister {
            store: Arc::clone(&self.store),
            what: format!("list azure-blob://{}/{prefix}", self.container),
            deadline: self.page_deadline,
        }
    }
}

/// Classifies an object_store error; Azure's error code in the body tells a
/// bad key from a missing permission (both are HTTP 403).
fn classify(err: object_store::Error, what: &str) -> Error {
    let text = retry::error_chain(&err);
    let msg = format!("{what}: {text}");
    if text.contains("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS") {
        return Error::invalid("endpoint_not_allowed", Some("config"), msg);
    }
    if text.contains(super::capped::TOO_BIG) {
        return Error::invalid("storage_answer_too_big", None, msg);
    }
    // Azure says AuthenticationFailed, Azurite "Server failed to authenticate
    // the request"; both with 403, like a missing permission.
    let auth_failed = [
        "AuthenticationFailed",
        "InvalidAuthenticationInfo",
        "failed to authenticate",
        "NoAuthenticationInformation",
        // Microsoft's login service refusing a client secret's token
        // request (an unknown tenant or application).
        "AADSTS",
    ]
    .iter()
    .any(|c| text.contains(c));
    // Listing errors come back as `Generic` with the status in the text.
    let status = |code: &str| text.contains(&format!("status code: {code}"));
    match err {
        object_store::Error::NotFound { .. } => Error::NotFound(msg),
        object_store::Error::Unauthenticated { .. } => Error::Unauthenticated(msg),
        object_store::Error::PermissionDenied { .. } if auth_failed => Error::Unauthenticated(msg),
        object_store::Error::PermissionDenied { .. } => Error::PermissionDenied(msg),
        object_store::Error::InvalidPath { .. } => Error::invalid("invalid_key", None, msg),
        _ if auth_failed || status("401") => Error::Unauthenticated(msg),
        _ if status("403") => Error::PermissionDenied(msg),
        _ if status("404") => Error::NotFound(msg),
        // By the status, not any "416" (the text holds the key and the
        // time taken: `frames/00416.jpg`, `1.416s`).
        _ if status("416") || text.contains("InvalidRange") => {
            Error::invalid("range_not_satisfiable", Some("range"), msg)
        }
        // Another refusal of the request itself (a name Azure calls
        // `InvalidUri`, one past 1,024 characters) is the request's to
        // mend, as for the other backends (it was a 503: "retry later").
        _ if refused_request(&text) => Error::invalid("storage_rejected", None, msg),
        // Anything else already went through object_store's retries.
        _ => Error::Transient(msg),
    }
}

/// Whether object_store's text reports an HTTP 4xx status other than 408
/// and 429, 409 and 412 (moments, not refusals: a lease held, a blob
/// being rehydrated).
fn refused_request(text: &str) -> bool {
    const SAID: &str = "status code: ";
    text.match_indices(SAID).any(|(at, _)| {
        let code = text.get(at + SAID.len()..at + SAID.len() + 3).unwrap_or("");
        code.len() == 3
            && code.starts_with('4')
            && code.bytes().all(|b| b.is_ascii_digit())
            && !["408", "409", "412", "429"].contains(&code)
    })
}

/// The blob named exactly `key`. `Path::from` would escape `%`, non-ASCII
/// and other characters into the name it sends, so a blob another tool
/// wrote under its plain name could not be reached (nor one listed).
fn blob(key: &str) -> Result<Path> {
    check_key(key, KeyShape::Path)?;
    Path::parse(key).map_err(|e| {
        Error::invalid(
            "invalid_key",
            Some("key"),
            format!("object key {key:?} cannot name a blob: {e}"),
        )
    })
}

fn to_meta(meta: object_store::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        key: meta.location.as_ref().to_owned(),
        size: i64::try_from(meta.size).ok(),
        last_modified: Some(meta.last_modified),
        etag: meta.e_tag.map(|e| e.trim_matches('"').to_owned()),
    }
}

/// Whether a SAS URL `object_store` makes for the blob is accepted: it
/// signs the escaped path of the URL where Azure checks the plain name,
/// so a name that escaping changes (a space, `%`, `#`, non-ASCII) gets a
/// signature Azure refuses (403).
fn signable(path: &Path) -> bool {
    let Ok(mut url) = reqwest::Url::parse("http://blob/") else {
        return false;
    };
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.extend(path.parts());
    }
    url.path().strip_prefix('/') == Some(path.as_ref())
}

/// Where a listing is: one page of the service's at a time, each asked
/// with the token the last one gave.
struct Cursor {
    lister: Lister,
    opts: ListOptions,
    token: Option<String>,
    tokens: Tokens,
    /// Whether the blob named exactly as the prefix was looked for (it
    /// comes first: [`Lister::exact`]), and the service asked for a page.
    exact_done: bool,
    listed: bool,
}

impl Cursor {
    /// The next page of the listing: the names under the prefix after
    /// `start_after` (Azurite does not resume server-side, so they are
    /// filtered here too).
    async fn next_page(&mut self) -> Result<Page> {
        let opts = &self.opts;
        if !self.exact_done {
            self.exact_done = true;
            let after = opts.start_after.as_deref();
            if after.is_none_or(|a| opts.prefix.as_str() > a)
                && let Some(exact) = self.lister.exact(&opts.prefix).await?
            {
                return Ok(page_of(vec![exact]));
            }
        }
        self.listed = true;
        let options = PaginatedListOptions {
            // Blob Storage's `startFrom`, on the first page only.
            offset: self
                .token
                .is_none()
                .then(|| opts.start_after.clone())
                .flatten(),
            delimiter: (!opts.recursive).then_some(Cow::Borrowed("/")),
            max_keys: Some(opts.page_size.clamp(1, MAX_PAGE_KEYS)),
            page_token: self.token.clone(),
            ..PaginatedListOptions::default()
        };
        let page = self.lister.page(&opts.prefix, options).await?;
        let (prefix, after) = (&opts.prefix, opts.start_after.as_ref());
        let objects: Vec<ObjectMeta> = (page.result.objects.into_iter().map(to_meta))
            .filter(|m| listed_under(&m.key, prefix) && after.is_none_or(|a| m.key > *a))
            .collect();
        // Empty as listed: names outside the prefix are no progress.
        let empty = objects.is_empty() && page.result.common_prefixes.is_empty();
        let next = page.page_token;
        self.tokens.check(
            self.token.as_deref(),
            next.as_deref(),
            empty,
            &self.lister.what,
        )?;
        self.token = next;
        Ok(page_of(objects))
    }

    /// Whether a page follows the one just given.
    fn more(&self) -> bool {
        !self.listed || self.token.is_some()
    }
}

/// A name the service listed under `prefix` that the listing gives: one
/// under it, but not the name equal to it, which [`Lister::exact`] looked
/// up (a server answering other names is not believed).
fn listed_under(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix) && key != prefix
}

fn page_of(objects: Vec<ObjectMeta>) -> Page {
    Page {
        objects,
        errors: Vec::new(),
    }
}

/// The most names Blob Storage gives in one page.
const MAX_PAGE_KEYS: usize = 5000;

/// Asks a container for listing pages, each within a deadline and checked.
struct Lister {
    store: Arc<MicrosoftAzure>,
    what: String,
    deadline: Duration,
}

impl Lister {
    /// One page of the names under `prefix` (a plain string, not cut at
    /// `/`), with at most the entries `options` asks for.
    async fn page(
        &self,
        prefix: &str,
        options: PaginatedListOptions,
    ) -> Result<PaginatedListResult> {
        let what = &self.what;
        let most = options.max_keys.unwrap_or(MAX_PAGE_KEYS);
        let asked = self
            .store
            .list_paginated((!prefix.is_empty()).then_some(prefix), options);
        let mut page = tokio::time::timeout(self.deadline, asked)
            .await
            .map_err(|_| {
                Error::Transient(format!(
                    "{what}: no whole answer within {} s",
                    self.deadline.as_secs()
                ))
            })?
            .map_err(|e| classify(e, what))?;
        let entries = page.result.objects.len() + page.result.common_prefixes.len();
        within_page(entries, most, what)?;
        page.page_token = page.page_token.filter(|t| !t.is_empty());
        Ok(page)
    }

    /// The blob named exactly `prefix`, which a listing of it must hold
    /// (a retry run looks a key up so) and the service's leaves out
    /// (`object_store` drops names no longer than the prefix asked). Only a
    /// prefix that can be a blob's name is looked up.
    async fn exact(&self, prefix: &str) -> Result<Option<ObjectMeta>> {
        if prefix.is_empty() || prefix.ends_with('/') {
            return Ok(None);
        }
        let Ok(path) = Path::parse(prefix) else {
            return Ok(None);
        };
        match self.store.head(&path).await {
            Ok(meta) if meta.location.as_ref() == prefix => Ok(Some(to_meta(meta))),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(e, &self.what)),
        }
    }
}

#[async_trait]
impl Storage for AzureStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Azure
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let cursor = Cursor {
            lister: self.lister(&opts.prefix),
            opts,
            token: None,
            tokens: Tokens::default(),
            exact_done: false,
            listed: false,
        };
        paginate(Some(cursor), |cursor: Option<Cursor>| async move {
            let Some(mut cursor) = cursor else {
                return Ok(None);
            };
            let page = cursor.next_page().await?;
            Ok(Some((page, cursor.more().then_some(cursor))))
        })
    }

    async fn list_children(
        &self,
        prefix: &str,
        from: Option<&str>,
        max_pages: usize,
    ) -> Result<Option<Children>> {
        let lister = self.lister(prefix);
        let mut children = Children::default();
        if from.is_none() {
            children.objects.extend(lister.exact(prefix).await?);
        }
        let mut token = from.map(str::to_owned);
        for _ in 0..max_pages.max(1) {
            let options = PaginatedListOptions {
                delimiter: Some(Cow::Borrowed("/")),
                max_keys: Some(1000),
                page_token: token.take(),
                ..PaginatedListOptions::default()
            };
            let page = lister.page(prefix, options).await?;
            let level = page.result;
            let objects = level.objects.into_iter().map(to_meta);
            children
                .objects
                .extend(objects.filter(|m| listed_under(&m.key, prefix)));
            // A `Path` drops the `/` a prefix ends with.
            let found: Vec<String> = level
                .common_prefixes
                .iter()
                .map(|p| format!("{}/", p.as_ref()))
                .collect();
            children.push_prefixes(prefix, found.iter().map(String::as_str));
            token = page.page_token;
            if token.is_none() {
                break;
            }
        }
        children.next = token;
        Ok(Some(children))
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        let path = blob(key)?;
        let what = format!("get azure-blob://{}/{key}", self.container);
        let range = match range {
            None => None,
            Some(GetRange::Bounded { start, end }) => Some(object_store::GetRange::Bounded(
                start..end.saturating_add(1),
            )),
            Some(GetRange::From(start)) => Some(object_store::GetRange::Offset(start)),
            // Blob storage has no suffix ranges: the size first, then an offset.
            Some(GetRange::Suffix(n)) => {
                let size = self
                    .store
                    .head(&path)
                    .await
                    .map_err(|e| classify(e, &what))?
                    .size;
                Some(object_store::GetRange::Offset(size.saturating_sub(n)))
            }
        };
        let options = GetOptions {
            range,
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(|e| classify(e, &what))?;
        let content_type = result
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        let (size, etag) = (result.meta.size, result.meta.e_tag.clone());
        let body = result
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed();
        Ok(Object {
            body,
            size: Some(size),
            etag: etag.map(|e| e.trim_matches('"').to_owned()),
            content_type,
        })
    }

    async fn put(&self, key: &str, body: Bytes, content_type: Option<&str>) -> Result<()> {
        let path = blob(key)?;
        let mut attributes = Attributes::new();
        if let Some(ct) = content_type {
            attributes.insert(Attribute::ContentType, ct.to_owned().into());
        }
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&path, PutPayload::from(body), options)
            .await
            .map_err(|e| classify(e, &format!("put azure-blob://{}/{key}", self.container)))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&blob(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(
                e,
                &format!("delete azure-blob://{}/{key}", self.container),
            )),
        }
    }

    /// `None` (proxied) for a name its URL escapes: see [`signable`].
    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        let path = blob(key)?;
        if !signable(&path) {
            return Ok(None);
        }
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &path, ttl)
            .await
            .map_err(|e| classify(e, &format!("presign azure-blob://{}/{key}", self.container)))?;
        Ok(Some(url.to_string()))
    }

    fn task_uri(&self, key: &str) -> String {
        format!("azure-blob://{}/{key}", self.container)
    }
}

/// The azure backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &["account_key", "client_secret"]
    }

    /// Without a key or a service principal's secret: the server's own
    /// credentials.
    fn acts_as_the_server(&self, secrets: &[&str]) -> bool {
        !secrets
            .iter()
            .any(|s| ["account_key", "client_secret"].contains(s))
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Path
    }

    fn uri_scheme(&self) -> Option<&'static str> {
        Some("azure-blob")
    }

    fn uri_location(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<String> {
        config.get("container")?.as_str().map(str::to_owned)
    }

    /// The account (the server's `AZURE_BLOB_ACCOUNT_NAME` when the
    /// config names none; no place without one), the container and the
    /// endpoint.
    fn place(&self, config: &serde_json::Value, env: &StorageEnv) -> Option<serde_json::Value> {
        let c: AzureConfig = parse_config(BackendKind::Azure, config).ok()?;
        let endpoint = super::endpoint_place(c.endpoint_url.as_deref());
        Some(serde_json::json!([
            c.account(env).ok()?,
            c.container,
            endpoint
        ]))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        AzureConfig::parse(config, env).await.map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(AzureStorage::open(
            AzureConfig::parse(config, env).await?,
            secrets,
            env,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passing failure is not taken for a refused range because the key
    /// or the time taken holds "416" (it was: the object's error was
    /// permanent, and `/resolve` answered 416 to a request with no range).
    #[test]
    fn a_416_in_the_key_or_the_time_is_not_a_refused_range() {
        let error = |text: &str| object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: Box::new(std::io::Error::other(text.to_owned())),
        };
        let busy = "Error performing GET http://127.0.0.1/c/frames/00416.jpg in 1.416s - \
                    Server returned non-2xx status code: 503 Service Unavailable: busy";
        assert!(matches!(classify(error(busy), "get"), Error::Transient(_)));
        let refused = "Error performing GET http://127.0.0.1/c/a.jpg in 5ms - \
                       Server returned non-2xx status code: 416 Range Not Satisfiable: ";
        assert!(matches!(
            classify(error(refused), "get"),
            Error::Invalid {
                code: "range_not_satisfiable",
                ..
            }
        ));
        // Another 4xx is the request's (a 503 before); 408 and 429 pass.
        let bad = "Error performing GET http://127.0.0.1/c/x in 3ms - \
                   Server returned non-2xx status code: 400 Bad Request: InvalidUri";
        assert!(matches!(
            classify(error(bad), "get"),
            Error::Invalid {
                code: "storage_rejected",
                ..
            }
        ));
        let slow = "Error performing GET http://127.0.0.1/c/x in 3ms - \
                    Server returned non-2xx status code: 429 Too Many Requests: ";
        assert!(matches!(classify(error(slow), "get"), Error::Transient(_)));
    }
}
