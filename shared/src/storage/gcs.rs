//! Google Cloud Storage: credentials from `google-cloud-auth`, data plane
//! on the JSON API over our reqwest client.
//!
//! The four calls (list, get with Range, upload, delete) and V4 URL signing
//! are written here; Google's own auth crate supplies tokens and signatures.
//! Why no GCS client crate: see docs/DECISIONS.md (GCS: google-cloud-auth and
//! the JSON API by hand).
//!
//! Credentials: `credentials_json` (a service-account key, or an
//! `external_account` WIF config reading its subject token from a URL);
//! else, on Google's endpoint, Application Default Credentials
//! (`GOOGLE_APPLICATION_CREDENTIALS`, metadata server); with a custom
//! `endpoint_url` and no JSON, requests are anonymous
//! (emulators). Signed URLs need a signer: a service-account key signs
//! locally, ADC on GCE signs through IAM; WIF has no signer, so those
//! storages are proxied instead of presigned.
use std::{fmt::Write, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use google_cloud_auth::{
    credentials::{self, CacheableResource, Credentials},
    signer::Signer,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Client, Method, RequestBuilder, Response, Url, header};
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, Children, GetRange, KeyShape, ListOptions, Object, ObjectMeta, Page, Secrets,
    Storage, StorageEnv, check_key, check_location, paginate, parse_config,
    retry::{
        at_most_a_page, error_body, error_chain, json_page, object_of, retry, status_error,
        transport_error,
    },
};
use crate::{Error, Result, security::net::parse_endpoint};

mod external_account;

const GOOGLE: &str = "https://storage.googleapis.com";
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// RFC 3986 unreserved characters stay; everything else is escaped (object
/// names in JSON API paths escape `/` too).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `config` object of a `gcs` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    #[serde(default)]
    pub project_id: Option<String>,
    /// An emulator or private endpoint, e.g. `http://127.0.0.1:4443`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

impl GcsConfig {
    pub async fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let mut config: GcsConfig = parse_config(BackendKind::Gcs, config)?;
        config.endpoint_url = check_location(
            "config.bucket",
            &config.bucket,
            config.endpoint_url.take(),
            env,
        )
        .await?;
        Ok(config)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One Google Cloud Storage bucket, through the JSON API. Presigns V4 URLs
/// when its credentials can sign (a service-account key, or ADC through
/// IAM); otherwise `presign` answers `None` and the object is proxied.
pub struct GcsStorage {
    http: Client,
    /// The longest a listing page's answer may take whole.
    page_deadline: std::time::Duration,
    base: Url,
    bucket: String,
    token: Option<Credentials>,
    signer: Option<Signer>,
}

impl std::fmt::Debug for GcsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStorage")
            .field("base", &self.base.as_str())
            .field("bucket", &self.bucket)
            .field("authenticated", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

fn bad_credentials(e: impl std::fmt::Display) -> Error {
    Error::invalid(
        "bad_credentials",
        Some("secrets.credentials_json"),
        format!("credentials_json is not usable: {e}"),
    )
}

/// The URLs a credentials file makes the server call are user input like
/// `endpoint_url` (Google's auth crate calls them with its own client, which
/// the guarded resolver cannot reach, so they are checked here, before it
/// is built):
/// - an `external_account` config makes the server read a subject token
///   (only from a URL: see [`external_account`]) and send it to `token_url` and
///   `service_account_impersonation_url`: those must be Google's
///   (`https://*.googleapis.com`), or a config could send the server's own
///   identity anywhere;
/// - `credential_source.url` (and the AWS-flavoured metadata URLs), and a
///   service-account key's `token_uri` (which only ever receives the key's
///   own signed assertion), pass the SSRF guard like any endpoint.
async fn check_token_urls(json: &serde_json::Value, env: &StorageEnv) -> Result<()> {
    let refuse = |code: &'static str, field: &str, message: String| {
        Error::invalid(
            code,
            Some("secrets.credentials_json"),
            format!("credentials_json {field}: {message}"),
        )
    };
    let text = |path: &[&str]| {
        path.iter()
            .try_fold(json, |v, k| v.get(k))
            .and_then(|v| v.as_str())
    };
    for field in ["token_url", "service_account_impersonation_url"] {
        if let Some(url) = text(&[field]) {
            let google = Url::parse(url).is_ok_and(|u| {
                u.scheme() == "https"
                    && u.host_str()
                        .is_some_and(|h| h == "googleapis.com" || h.ends_with(".googleapis.com"))
            });
            if !google {
                return Err(refuse(
                    "endpoint_not_allowed",
                    field,
                    format!("{url:?} is not an https://*.googleapis.com URL"),
                ));
            }
        }
    }
    // (An AWS-flavoured config's regional_cred_verification_url is not
    // called by the server: Google's STS calls it.)
    let guarded: [&[&str]; 4] = [
        &["token_uri"],
        &["credential_source", "url"],
        &["credential_source", "region_url"],
        &["credential_source", "imdsv2_session_token_url"],
    ];
    for path in guarded {
        let Some(url) = text(path) else { continue };
        env.net
            .check_url(url, "secrets.credentials_json")
            .await
            .map_err(|e| match e {
                Error::Invalid { code, message, .. } => refuse(code, &path.join("."), message),
                other => other,
            })?;
    }
    Ok(())
}

/// The headers that authenticate a request (a fresh or cached token).
async fn auth_headers(token: &Credentials, what: &str) -> Result<header::HeaderMap> {
    let headers = token.headers(http::Extensions::new()).await.map_err(|e| {
        // The causes say why (ours for a subject token, Google's for the
        // exchange); the crate's own words are only that it failed.
        let why = error_chain(&e);
        if e.is_transient() {
            Error::Transient(format!("{what}: getting a token: {why}"))
        } else {
            Error::Unauthenticated(format!("{what}: getting a token: {why}"))
        }
    })?;
    match headers {
        CacheableResource::New { data, .. } => Ok(data),
        // Only asked for with an entity tag, which none of these requests has.
        CacheableResource::NotModified => Err(Error::Internal(format!(
            "{what}: the credentials answered \"not modified\" to a request without a tag"
        ))),
    }
}

impl GcsStorage {
    pub async fn open(config: GcsConfig, secrets: &Secrets, env: &StorageEnv) -> Result<Self> {
        let base = match &config.endpoint_url {
            Some(url) => parse_endpoint(url, "config.endpoint_url")?,
            None => Url::parse(GOOGLE).map_err(|e| Error::Internal(e.to_string()))?,
        };
        let (token, signer) = match secrets.get("credentials_json") {
            Some(raw) => {
                let json: serde_json::Value = serde_json::from_str(raw)
                    .map_err(|e| bad_credentials(format!("not JSON ({e})")))?;
                check_token_urls(&json, env).await?;
                match json.get("type").and_then(|t| t.as_str()) {
                    Some("service_account") => {
                        let builder = || credentials::service_account::Builder::new(json.clone());
                        let token: Credentials = builder()
                            .with_access_specifier(
                                credentials::service_account::AccessSpecifier::from_scopes([SCOPE]),
                            )
                            .build_access_token_credentials()
                            .map_err(bad_credentials)?
                            .into();
                        let signer = builder().build_signer().map_err(bad_credentials)?;
                        (Some(token), Some(signer))
                    }
                    Some("external_account") => {
                        let token = external_account::credentials(json, env.http_client()?)?;
                        (Some(token), None)
                    }
                    other => {
                        return Err(bad_credentials(format!(
                            "type must be \"service_account\" or \"external_account\", not {other:?}"
                        )));
                    }
                }
            }
            None if config.endpoint_url.is_some() => (None, None),
            None => {
                let token = credentials::Builder::default()
                    .with_scopes([SCOPE])
                    .build_access_token_credentials()
                    .map_err(|e| {
                        Error::Unauthenticated(format!(
                            "no credentials_json and no Application Default Credentials: {e}"
                        ))
                    })?;
                let signer = credentials::Builder::default().build_signer().ok();
                (Some(token.into()), signer)
            }
        };
        Ok(GcsStorage {
            http: env.http_client()?,
            page_deadline: env.request_timeout,
            base,
            bucket: config.bucket,
            token,
            signer,
        })
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .map_err(|e| Error::Internal(format!("gcs url {path}: {e}")))
    }

    /// One page of the bucket's object listing with `query`, decoded.
    async fn list_page<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        let url = self.url(&format!(
            "storage/v1/b/{}/o",
            utf8_percent_encode(&self.bucket, UNRESERVED)
        ))?;
        let response = self
            .send(what, || self.http.get(url.clone()).query(query))
            .await?;
        json_page(response, self.page_deadline, what).await
    }

    fn object_path(&self, key: &str) -> String {
        format!(
            "storage/v1/b/{}/o/{}",
            utf8_percent_encode(&self.bucket, UNRESERVED),
            utf8_percent_encode(key, UNRESERVED)
        )
    }

    /// Sends a request with a fresh (cached) token, classifying failures;
    /// retried on transient ones.
    async fn send(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        retry(what, || async {
            let mut req = build();
            if let Some(token) = &self.token {
                req = req.headers(auth_headers(token, what).await?);
            }
            let resp = req.send().await.map_err(|e| transport_error(&e, what))?;
            if resp.status().is_success() {
                return Ok(resp);
            }
            let status = resp.status();
            let body = error_body(resp).await;
            let detail = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            Err(status_error(status, what, &detail))
        })
        .await
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listing {
    #[serde(default, deserialize_with = "at_most_a_page")]
    items: Vec<Item>,
    next_page_token: Option<String>,
}

/// One page of a delimiter listing: the prefixes one level down and the
/// names directly under the prefix.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Level {
    #[serde(default, deserialize_with = "at_most_a_page")]
    prefixes: Vec<String>,
    #[serde(default, deserialize_with = "at_most_a_page")]
    items: Vec<Item>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    name: String,
    size: Option<String>,
    updated: Option<DateTime<Utc>>,
    etag: Option<String>,
    generation: Option<String>,
}

/// The fields of [`Item`] a listing asks for.
const ITEM_FIELDS: &str = "items(name,size,updated,etag,generation)";

impl Item {
    fn meta(self) -> ObjectMeta {
        ObjectMeta {
            key: self.name,
            size: self.size.and_then(|s| s.parse().ok()),
            last_modified: self.updated,
            // The generation changes on every overwrite; the etag also on
            // metadata changes.
            etag: self.generation.or(self.etag),
        }
    }
}

struct Cursor {
    storage: std::sync::Arc<GcsStorage>,
    opts: ListOptions,
    token: Option<String>,
    tokens: super::Tokens,
}

#[async_trait]
impl Storage for GcsStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Gcs
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let storage = std::sync::Arc::new(GcsStorage {
            http: self.http.clone(),
            page_deadline: self.page_deadline,
            base: self.base.clone(),
            bucket: self.bucket.clone(),
            token: self.token.clone(),
            signer: None,
        });
        let cursor = Cursor {
            storage,
            opts,
            token: None,
            tokens: super::Tokens::default(),
        };
        paginate(Some(cursor), |cursor: Option<Cursor>| async move {
            let Some(mut cursor) = cursor else {
                return Ok(None);
            };
            let s = &cursor.storage;
            let opts = &cursor.opts;
            let what = format!("list gs://{}/{}", s.bucket, opts.prefix);
            let mut query: Vec<(&str, String)> = vec![
                ("prefix", opts.prefix.clone()),
                ("maxResults", opts.page_size.to_string()),
                ("fields", format!("{ITEM_FIELDS},nextPageToken")),
            ];
            if !opts.recursive {
                query.push(("delimiter", "/".into()));
            }
            if let Some(token) = &cursor.token {
                query.push(("pageToken", token.clone()));
            } else if let Some(after) = &opts.start_after {
                // startOffset is inclusive; the key itself is dropped below.
                query.push(("startOffset", after.clone()));
            }
            let listing: Listing = s.list_page(&what, &query).await?;
            // (Prefixes are not asked for: a page of only prefixes is empty.)
            let next = listing.next_page_token.as_deref().filter(|t| !t.is_empty());
            let empty = listing.items.is_empty();
            cursor
                .tokens
                .check(cursor.token.as_deref(), next, empty, &what)?;
            let after = opts.start_after.clone();
            let objects = listing
                .items
                .into_iter()
                .filter(|i| after.as_ref().is_none_or(|a| i.name > *a))
                .map(Item::meta)
                .collect();
            cursor.token = listing.next_page_token.filter(|t| !t.is_empty());
            let next = cursor.token.is_some().then_some(cursor);
            Ok(Some((
                Page {
                    objects,
                    errors: Vec::new(),
                },
                next,
            )))
        })
    }

    async fn list_children(
        &self,
        prefix: &str,
        from: Option<&str>,
        max_pages: usize,
    ) -> Result<Option<Children>> {
        let what = format!("list gs://{}/{prefix}", self.bucket);
        let mut children = Children::default();
        let mut token = from.map(str::to_owned);
        for _ in 0..max_pages.max(1) {
            let mut query: Vec<(&str, String)> = vec![
                ("prefix", prefix.to_owned()),
                ("delimiter", "/".into()),
                ("maxResults", "1000".into()),
                ("fields", format!("prefixes,{ITEM_FIELDS},nextPageToken")),
            ];
            if let Some(token) = &token {
                query.push(("pageToken", token.clone()));
            }
            let level: Level = self.list_page(&what, &query).await?;
            children
                .objects
                .extend(level.items.into_iter().map(Item::meta));
            children.push_prefixes(prefix, level.prefixes.iter().map(String::as_str));
            token = level.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        children.next = token;
        Ok(Some(children))
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        check_key(key, KeyShape::Name)?;
        let what = format!("get gs://{}/{key}", self.bucket);
        let mut url = self.url(&self.object_path(key))?;
        url.query_pairs_mut().append_pair("alt", "media");
        let resp = self
            .send(&what, || {
                let req = self.http.get(url.clone());
                match range {
                    Some(r) => req.header(header::RANGE, r.header()),
                    None => req,
                }
            })
            .await?;
        object_of(
            resp,
            &[
                header::HeaderName::from_static("x-goog-generation"),
                header::ETAG,
            ],
            range,
        )
    }

    async fn put(&self, key: &str, body: Bytes, content_type: Option<&str>) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        let what = format!("put gs://{}/{key}", self.bucket);
        let url = self.url(&format!(
            "upload/storage/v1/b/{}/o",
            utf8_percent_encode(&self.bucket, UNRESERVED)
        ))?;
        let content_type = content_type
            .unwrap_or("application/octet-stream")
            .to_owned();
        self.send(&what, || {
            self.http
                .post(url.clone())
                .query(&[("uploadType", "media"), ("name", key)])
                .header(header::CONTENT_TYPE, &content_type)
                .body(body.clone())
        })
        .await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        let what = format!("delete gs://{}/{key}", self.bucket);
        let url = self.url(&self.object_path(key))?;
        match self
            .send(&what, || self.http.request(Method::DELETE, url.clone()))
            .await
        {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        check_key(key, KeyShape::Name)?;
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let email = signer.client_email().await.map_err(|e| {
            Error::Unauthenticated(format!("presign gs://{}/{key}: {e}", self.bucket))
        })?;
        let v4 = V4Request::new(&self.base, &self.bucket, key, &email, ttl, Utc::now());
        let signature = signer
            .sign(v4.string_to_sign())
            .await
            .map_err(|e| Error::Transient(format!("presign gs://{}/{key}: {e}", self.bucket)))?;
        Ok(Some(v4.url(&crate::security::hex(&signature))))
    }

    fn task_uri(&self, key: &str) -> String {
        format!("gs://{}/{key}", self.bucket)
    }
}

/// A V4 signed GET URL (GOOG4-RSA-SHA256, `host` the only signed header):
/// <https://cloud.google.com/storage/docs/access-control/signing-urls-manually>.
pub struct V4Request {
    scheme: String,
    host: String,
    path: String,
    query: String,
    datetime: String,
    scope: String,
}

impl V4Request {
    pub fn new(
        base: &Url,
        bucket: &str,
        key: &str,
        email: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let host = match base.port() {
            Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
            None => base.host_str().unwrap_or_default().to_owned(),
        };
        let mut path = format!("/{}", utf8_percent_encode(bucket, UNRESERVED));
        for segment in key.split('/') {
            let _ = write!(path, "/{}", utf8_percent_encode(segment, UNRESERVED));
        }
        let datetime = now.format("%Y%m%dT%H%M%SZ").to_string();
        let scope = format!("{}/auto/storage/goog4_request", &datetime[..8]);
        let mut params = [
            ("X-Goog-Algorithm", "GOOG4-RSA-SHA256".to_owned()),
            ("X-Goog-Credential", format!("{email}/{scope}")),
            ("X-Goog-Date", datetime.clone()),
            ("X-Goog-Expires", ttl.as_secs().to_string()),
            ("X-Goog-SignedHeaders", "host".to_owned()),
        ];
        params.sort_by(|a, b| a.0.cmp(b.0));
        let query = params
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, UNRESERVED)))
            .collect::<Vec<_>>()
            .join("&");
        V4Request {
            scheme: base.scheme().to_owned(),
            host,
            path,
            query,
            datetime,
            scope,
        }
    }

    pub fn canonical_request(&self) -> String {
        format!(
            "GET\n{}\n{}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD",
            self.path, self.query, self.host
        )
    }

    pub fn string_to_sign(&self) -> String {
        let hash = crate::security::sha256_hex(&[self.canonical_request().as_bytes()]);
        format!(
            "GOOG4-RSA-SHA256\n{}\n{}\n{hash}",
            self.datetime, self.scope
        )
    }

    pub fn url(&self, signature_hex: &str) -> String {
        format!(
            "{}://{}{}?{}&X-Goog-Signature={signature_hex}",
            self.scheme, self.host, self.path, self.query
        )
    }
}

/// The gcs backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &["credentials_json"]
    }

    /// Without a key file: application default credentials.
    fn acts_as_the_server(&self, secrets: &[&str]) -> bool {
        !secrets.contains(&"credentials_json")
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Name
    }

    fn folder_markers(&self) -> bool {
        true
    }

    fn uri_scheme(&self) -> Option<&'static str> {
        Some("gs")
    }

    fn uri_location(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<String> {
        config.get("bucket")?.as_str().map(str::to_owned)
    }

    fn place(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<serde_json::Value> {
        let c: GcsConfig = parse_config(BackendKind::Gcs, config).ok()?;
        let endpoint = super::endpoint_place(c.endpoint_url.as_deref());
        Some(serde_json::json!([c.bucket, endpoint]))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        GcsConfig::parse(config, env).await.map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(
            GcsStorage::open(GcsConfig::parse(config, env).await?, secrets, env).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::security::net::NetPolicy;

    /// A user's credentials file cannot send the server's identity off
    /// Google, nor make it read private or metadata addresses.
    #[tokio::test]
    async fn credential_files_are_held_to_google_and_the_guard() {
        let env = StorageEnv::default(); // public addresses only
        let wif = |token_url: &str, source: serde_json::Value| {
            serde_json::json!({
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": token_url,
                "credential_source": source,
            })
        };
        let sts = "https://sts.googleapis.com/v1/token";
        let file = serde_json::json!({ "file": "/var/run/secrets/token" });
        assert!(
            check_token_urls(&wif(sts, file.clone()), &env)
                .await
                .is_ok()
        );
        for bad in [
            wif("https://attacker.example/token", file.clone()),
            wif("http://sts.googleapis.com/v1/token", file.clone()),
            wif("https://sts.googleapis.com.attacker.example/", file),
            wif(
                sts,
                serde_json::json!({ "url": "http://169.254.169.254/latest/meta-data/iam" }),
            ),
            wif(
                sts,
                serde_json::json!({ "environment_id": "aws1", "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone" }),
            ),
            serde_json::json!({ "type": "service_account", "token_uri": "http://127.0.0.1:9/token" }),
        ] {
            let result = check_token_urls(&bad, &env).await;
            assert!(
                matches!(
                    result,
                    Err(Error::Invalid {
                        field: Some("secrets.credentials_json"),
                        ..
                    })
                ),
                "{bad}: {result:?}"
            );
        }
    }

    /// A loopback server giving every request `answer`; its token URL.
    async fn answering(answer: String) -> String {
        format!(
            "http://{}/token",
            super::super::answering_always(answer).await
        )
    }

    fn wif_secrets(source: serde_json::Value) -> Secrets {
        let file = serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": source,
        });
        let mut map = serde_json::Map::new();
        map.insert("credentials_json".into(), file.to_string().into());
        Secrets::new(map)
    }

    /// A WIF file cannot make the server read its own disk, run a program
    /// or use its own identity, nor follow a redirect; and what its URL
    /// answers is never quoted back (it could be anything the server can
    /// reach).
    #[tokio::test]
    async fn a_wif_file_reads_only_a_url_and_quotes_nothing() {
        let env = StorageEnv {
            net: NetPolicy::allow_all(),
            ..StorageEnv::default()
        };
        let config = GcsConfig {
            bucket: "b".into(),
            project_id: None,
            endpoint_url: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key.json");
        std::fs::write(&key_file, r#"{"private_key":"SECRET-KEY"}"#).unwrap();
        let json = serde_json::json!({ "type": "json", "subject_token_field_name": "id_token" });
        for source in [
            serde_json::json!({ "file": key_file, "format": json }),
            serde_json::json!({ "executable": { "command": "/bin/true" } }),
            serde_json::json!({ "environment_id": "aws1" }),
        ] {
            let opened = GcsStorage::open(config.clone(), &wif_secrets(source.clone()), &env).await;
            match opened {
                Err(Error::Invalid { code, message, .. }) => {
                    assert_eq!(code, "bad_credentials", "{message}");
                    assert!(message.contains("credential_source."), "{message}");
                }
                other => panic!("{source}: {other:?}"),
            }
        }
        let body = r#"{"private_key":"SECRET-KEY"}"#;
        let secret = answering(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let redirect = answering(format!(
            "HTTP/1.1 302 Found\r\nlocation: {secret}\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        for (url, why) in [(&secret, "is not a JSON object"), (&redirect, "302")] {
            let source = serde_json::json!({ "url": url, "format": json });
            let storage = GcsStorage::open(config.clone(), &wif_secrets(source), &env)
                .await
                .unwrap();
            let listed = storage
                .list(ListOptions {
                    prefix: String::new(),
                    recursive: true,
                    start_after: None,
                    page_size: 10,
                })
                .next()
                .await;
            let Some(Err(err)) = listed else {
                panic!("{url}: {listed:?}")
            };
            let text = err.to_string();
            assert!(!text.contains("SECRET-KEY"), "{text}");
            assert!(
                text.contains("credential_source.url") && text.contains(why),
                "{text}"
            );
        }
    }

    #[test]
    fn v4_canonical_request_shape() {
        let base = Url::parse("https://storage.googleapis.com").unwrap();
        let now = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .to_utc();
        let v4 = V4Request::new(
            &base,
            "b",
            "dir/a b.jpg",
            "sa@p.iam.gserviceaccount.com",
            Duration::from_secs(900),
            now,
        );
        assert_eq!(
            v4.canonical_request(),
            "GET\n/b/dir/a%20b.jpg\nX-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam.gserviceaccount.com%2F20261124%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Date=20261124T100000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host\nhost:storage.googleapis.com\n\nhost\nUNSIGNED-PAYLOAD"
        );
        assert!(v4.string_to_sign().starts_with(
            "GOOG4-RSA-SHA256\n20261124T100000Z\n20261124/auto/storage/goog4_request\n"
        ));
        assert!(
            v4.url("ab")
                .starts_with("https://storage.googleapis.com/b/dir/a%20b.jpg?X-Goog-Algorithm=")
        );
    }
}
