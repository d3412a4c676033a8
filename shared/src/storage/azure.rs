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
use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
    RetryConfig,
    azure::{MicrosoftAzure, MicrosoftAzureBuilder},
    client::{HttpClient, HttpConnector},
    path::Path,
    signer::Signer,
};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, GetRange, KeyShape, ListOptions, Object, ObjectMeta, Page, Secrets, Storage,
    StorageEnv, check_key, check_location, parse_config, retry,
};
use crate::{
    Error, Result,
    security::net::{HttpClients, NetPolicy, parse_endpoint},
};

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
/// clients, policy, read timeout).
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
        Ok(HttpClient::new(client))
    }
}

/// One Azure Blob container. Presigns SAS URLs: a service SAS with an
/// account key, a user-delegation SAS with token credentials.
#[derive(Debug)]
pub struct AzureStorage {
    store: Arc<MicrosoftAzure>,
    container: String,
}

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
                retry_timeout: Duration::from_secs(120),
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
        })
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
    // Azure says AuthenticationFailed, Azurite "Server failed to authenticate
    // the request"; both with 403, like a missing permission.
    let auth_failed = [
        "AuthenticationFailed",
        "InvalidAuthenticationInfo",
        "failed to authenticate",
        "NoAuthenticationInformation",
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
        _ if text.contains("416") || text.contains("InvalidRange") => {
            Error::invalid("range_not_satisfiable", Some("range"), msg)
        }
        // Anything else already went through object_store's retries.
        _ => Error::Transient(msg),
    }
}

fn to_meta(meta: object_store::ObjectMeta) -> ObjectMeta {
    // A `Path` keeps its name escaped (non-ASCII in delimiter listings, and
    // the characters `Path::from` escapes); the key is the name as given.
    let key = percent_decode_str(meta.location.as_ref())
        .decode_utf8()
        .map_or_else(|_| meta.location.to_string(), |k| k.into_owned());
    ObjectMeta {
        key,
        size: i64::try_from(meta.size).ok(),
        last_modified: Some(meta.last_modified),
        etag: meta.e_tag.map(|e| e.trim_matches('"').to_owned()),
    }
}

#[async_trait]
impl Storage for AzureStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Azure
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        // object_store lists by whole path segments: list the directory part
        // of the prefix and keep the names that start with the rest.
        let dir = opts
            .prefix
            .rfind('/')
            .map(|i| &opts.prefix[..i])
            .unwrap_or("");
        let dir = (!dir.is_empty()).then(|| Path::from(dir));
        let what = format!("list azure-blob://{}/{}", self.container, opts.prefix);
        let (prefix, after, page_size) = (
            opts.prefix.clone(),
            opts.start_after.clone(),
            opts.page_size.max(1),
        );
        let keep = move |meta: &ObjectMeta| {
            meta.key.starts_with(&prefix) && after.as_ref().is_none_or(|a| meta.key > *a)
        };
        let metas: BoxStream<'static, object_store::Result<object_store::ObjectMeta>> =
            if opts.recursive {
                match &opts.start_after {
                    // Resumes server-side where the service supports it (Azurite
                    // does not; `keep` filters either way).
                    Some(after) => self
                        .store
                        .list_with_offset(dir.as_ref(), &Path::from(after.as_str())),
                    None => self.store.list(dir.as_ref()),
                }
            } else {
                let store = Arc::clone(&self.store);
                futures::stream::once(async move { store.list_with_delimiter(dir.as_ref()).await })
                    .map_ok(|listing| futures::stream::iter(listing.objects.into_iter().map(Ok)))
                    .try_flatten()
                    .boxed()
            };
        metas
            .map(move |m| m.map(to_meta).map_err(|e| classify(e, &what)))
            .try_filter(move |m| futures::future::ready(keep(m)))
            .chunks(page_size)
            .map(|chunk| {
                chunk
                    .into_iter()
                    .collect::<Result<Vec<_>>>()
                    .map(|objects| Page {
                        objects,
                        errors: Vec::new(),
                    })
            })
            .boxed()
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        check_key(key, KeyShape::Path)?;
        let what = format!("get azure-blob://{}/{key}", self.container);
        let path = Path::from(key);
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
        check_key(key, KeyShape::Path)?;
        let mut attributes = Attributes::new();
        if let Some(ct) = content_type {
            attributes.insert(Attribute::ContentType, ct.to_owned().into());
        }
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&Path::from(key), PutPayload::from(body), options)
            .await
            .map_err(|e| classify(e, &format!("put azure-blob://{}/{key}", self.container)))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key, KeyShape::Path)?;
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(
                e,
                &format!("delete azure-blob://{}/{key}", self.container),
            )),
        }
    }

    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        check_key(key, KeyShape::Path)?;
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &Path::from(key), ttl)
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
