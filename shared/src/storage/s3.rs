//! Amazon S3 and S3-compatible servers, through `aws-sdk-s3`.
//!
//! Credentials, in order: static keys from the storage's secrets (with an
//! optional session token); else the default AWS chain (environment, web
//! identity / IRSA, instance profile). With `role_arn`, either is the base
//! for an STS AssumeRole (with `external_id`) whose credentials the SDK's
//! identity cache refreshes before they expire.
//!
//! Retries are the SDK's standard mode (exponential backoff with jitter on
//! 5xx, throttling such as `SlowDown`, timeouts and resets), set to
//! [`retry::MAX_ATTEMPTS`] attempts. The data-plane HTTP client resolves names
//! through the SSRF guard.
//!
//! GETs and listing pages leave the SDK once it has resolved the bucket's
//! endpoint for a request on a key or a listing: they are signed and sent
//! by [`signed_get`], with the same endpoint, credentials and error
//! classes, and the retries of the other hand-written HTTP backends.
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::{
    Client,
    config::{
        Credentials, SharedCredentialsProvider, SharedHttpClient,
        endpoint::{Endpoint, Params as EndpointParams},
        http::HttpResponse,
    },
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    presigning::PresigningConfig,
    primitives::ByteStream as AwsBody,
    types::{EncodingType, ServerSideEncryption},
};
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::endpoint::EndpointFuture;
use bytes::Bytes;
use chrono::DateTime;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use super::{
    BackendKind, Children, GetRange, KeyShape, ListOptions, Object, ObjectMeta, Page, Secrets,
    Storage, StorageEnv, check_key, check_location, paginate, parse_config, retry,
};
use crate::{
    Error, Result,
    security::net::{GuardedResolver, Kept, NetPolicy, parse_endpoint},
};

mod bounded;
mod error_codes;
mod list_xml;
mod signed_get;
use error_codes::by_code;
use list_xml::Listed;
use signed_get::{ListQuery, SignedGets};

/// The `config` object of a `s3` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Defaults to true with a custom endpoint (most S3-compatible servers
    /// want path-style), false on AWS.
    #[serde(default)]
    pub force_path_style: Option<bool>,
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub sse_kms_key_id: Option<String>,
}

impl S3Config {
    pub async fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let mut config: S3Config = parse_config(BackendKind::S3, config)?;
        config.endpoint_url = check_location(
            "config.bucket",
            &config.bucket,
            config.endpoint_url.take(),
            env,
        )
        .await?;
        // The region becomes part of the AWS host names (s3.<region>.amazonaws.com).
        if let Some(region) = &config.region
            && (region.is_empty()
                || region.len() > 63
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(Error::invalid(
                "invalid_config",
                Some("config.region"),
                "config.region must be a region name such as eu-west-1 (lowercase letters, digits and '-')",
            ));
        }
        if config.external_id.is_some() && config.role_arn.is_none() {
            return Err(Error::invalid(
                "invalid_config",
                Some("config.external_id"),
                "config.external_id only applies with config.role_arn",
            ));
        }
        Ok(config)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One bucket on AWS S3 or an S3-compatible server. Presigns SigV4 GET URLs;
/// puts use SSE-KMS when the storage names a key.
#[derive(Debug)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    sse_kms_key_id: Option<String>,
    /// The requests signed by hand, shared with the listing streams.
    signing: Arc<Signing>,
}

/// What the requests signed by hand ([`SignedGets`]) are made from.
#[derive(Debug)]
struct Signing {
    /// The SDK's endpoint answers, shared with its client.
    endpoints: EndpointsByBucket,
    /// The storages' shared HTTP client ([`StorageEnv::http_client`]), which
    /// [`SignedGets`] send with; `None` when it could not be made (GETs
    /// and listings then stay with the SDK).
    http: Option<reqwest::Client>,
    /// The client's credentials (the SDK's config does not give them back).
    credentials: Option<SharedCredentialsProvider>,
    /// Longest wait for the next bytes of a download, or for a
    /// credentials fetch.
    idle_timeout: Duration,
    /// Set at the first GET or listing page after the SDK resolved the
    /// bucket's endpoint; `None` inside when they stay with the SDK.
    signed: OnceLock<Option<SignedGets>>,
}

/// As for the other HTTP backends (`security::net::http_client`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl S3Storage {
    pub async fn open(config: S3Config, secrets: &Secrets, env: &StorageEnv) -> Result<Self> {
        let region = Region::new(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
        let base = base_config(&config, secrets, region.clone()).await?;
        let http = guarded_http_client(env);
        let sdk_config = match &config.role_arn {
            None => base,
            Some(arn) => assume_role(base, arn, config.external_id.as_deref(), region, &http).await,
        };
        let endpoints = EndpointsByBucket::default();
        let credentials = sdk_config.credentials_provider();
        let s3_config = client_config(&sdk_config, &config, http, endpoints.clone(), env);
        Ok(S3Storage {
            client: Client::from_conf(s3_config),
            bucket: config.bucket,
            sse_kms_key_id: config.sse_kms_key_id,
            signing: Arc::new(Signing {
                endpoints,
                http: env
                    .http_client()
                    .inspect_err(|err| tracing::warn!(error = %err, "S3 GETs and listings stay with the SDK"))
                    .ok(),
                credentials,
                idle_timeout: env.request_timeout,
                signed: OnceLock::new(),
            }),
        })
    }

    /// A GET through the SDK's pipeline.
    async fn sdk_get(&self, key: &str, range: Option<GetRange>, what: &str) -> Result<Object> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(range.map(GetRange::header))
            .send()
            .await
            .map_err(|e| classify(e, what))?;
        // `Content-Range: bytes a-b/total` carries the whole size of a range read.
        let size = match out.content_range() {
            Some(cr) => cr.rsplit('/').next().and_then(|t| t.parse().ok()),
            None => out.content_length().and_then(|n| u64::try_from(n).ok()),
        };
        let etag = out.e_tag().map(|e| e.trim_matches('"').to_owned());
        let content_type = out.content_type().map(str::to_owned);
        let whole = out.content_range().is_none();
        let mut body: super::ByteStream =
            Box::pin(idle_limited(out.body, self.signing.idle_timeout));
        // A range answered with the whole object is cut to it (see
        // `retry::object_of`).
        if let (Some(range), Some(size), true) = (range, size, whole) {
            body = retry::window(body, range, size);
        }
        Ok(Object {
            body,
            size,
            etag,
            content_type,
        })
    }
}

impl Signing {
    /// The signed path, once the SDK has resolved this bucket's endpoint for
    /// a request on a key or a listing (so both paths use the same one);
    /// `None` before that, and for good when that endpoint needs the SDK
    /// (see [`SignedGets::new`]) or the client has no credentials provider.
    fn signed_gets(&self) -> Option<&SignedGets> {
        if let Some(signed) = self.signed.get() {
            return signed.as_ref();
        }
        let endpoint = self.endpoints.of_bucket()?;
        let signed = self.signed.get_or_init(|| {
            let credentials = self.credentials.clone()?;
            SignedGets::new(
                &endpoint,
                credentials,
                self.http.clone()?,
                self.idle_timeout,
            )
        });
        signed.as_ref()
    }
}

/// Pays before any job what a process's first S3 storage pays at its first
/// use: the system's CA certificates read and parsed (the SDK's client at
/// its build, the signed GETs' client at its first request), and the SDK's
/// endpoint rules and signing set up. A fresh worker's first batches did it
/// while they started together, 15-30 ms before their first read on the
/// busy benchmark machine. Nothing is sent: the storage opened is a
/// made-up bucket with made-up keys, and a presigned URL is computed
/// locally. Best effort: a failure is only logged.
pub async fn warm_up(env: &StorageEnv) {
    if let Err(err) = warm_up_steps(env).await {
        tracing::warn!(error = %err, "S3 client set-up not warmed up");
    }
}

/// [`warm_up`]'s steps: a client built (and with it the storages' shared
/// HTTP client the signed GETs use), a URL presigned.
async fn warm_up_steps(env: &StorageEnv) -> Result<()> {
    let config = S3Config {
        bucket: "labelsync-warm-up".into(),
        region: None,
        endpoint_url: None,
        force_path_style: None,
        role_arn: None,
        external_id: None,
        sse_kms_key_id: None,
    };
    let mut keys = serde_json::Map::new();
    keys.insert("access_key_id".into(), "warm-up".into());
    keys.insert("secret_access_key".into(), "warm-up".into());
    let s3 = S3Storage::open(config, &Secrets::new(keys), env).await?;
    s3.presign("warm-up", Duration::from_secs(60)).await?;
    Ok(())
}

/// `body`, cut off after `idle` without a byte. The attempt timeout ends
/// with the response headers; a body that stops arriving fails here (the
/// reader sees an I/O error, as on a reset, and the object is read again by
/// a retried attempt).
fn idle_limited(
    body: AwsBody,
    idle: Duration,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body: AwsBody = body?;
        match tokio::time::timeout(idle, body.try_next()).await {
            Ok(Ok(Some(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some((Err(std::io::Error::other(e)), None)),
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no data for {} s (LABELSYNC_STORAGE_TIMEOUT_SECS)",
                        idle.as_secs()
                    ),
                )),
                None,
            )),
        }
    })
}

/// The SDK config before any role is assumed: the region, the (checked)
/// endpoint, and the storage's static keys or else the default chain.
async fn base_config(config: &S3Config, secrets: &Secrets, region: Region) -> Result<SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
    if let Some(url) = &config.endpoint_url {
        parse_endpoint(url, "config.endpoint_url")?;
        loader = loader.endpoint_url(url);
    }
    if let Some(credentials) = static_credentials(secrets)? {
        loader = loader.credentials_provider(credentials);
    }
    Ok(loader.load().await)
}

/// Both keys (and the optional session token) from the secrets; `None` when
/// neither key is given (the default AWS chain); one key alone is refused.
fn static_credentials(secrets: &Secrets) -> Result<Option<Credentials>> {
    match (
        secrets.get("access_key_id"),
        secrets.get("secret_access_key"),
    ) {
        (Some(id), Some(key)) => {
            let token = secrets.get("session_token").map(str::to_owned);
            Ok(Some(Credentials::new(id, key, token, None, "labelsync")))
        }
        (None, None) => Ok(None),
        _ => Err(Error::invalid(
            "invalid_secrets",
            Some("secrets"),
            "give both access_key_id and secret_access_key, or neither (to use the default AWS chain)",
        )),
    }
}

/// The HTTP client of every request to the user's endpoint, STS calls
/// included: it resolves names through the SSRF guard, and bounds what an
/// answer read whole may hold (`bounded`) (the default chain's
/// own credential sources, such as the instance metadata service, keep the
/// SDK's client: they are the server's, not the user's). One per guard
/// policy for the storages opened with `env` (see [`SdkClients`]).
fn guarded_http_client(env: &StorageEnv) -> SharedHttpClient {
    env.s3_http.get(&env.net)
}

/// The AWS SDK's HTTP clients of one process's S3 storages, one per guard
/// policy: as for the other backends' clients
/// (`security::net::HttpClients`), storages on one endpoint and a storage
/// opened again share the connections (and handshakes) of its listings,
/// puts and first GETs. Kept by the storages' settings (`StorageEnv`).
pub type SdkClients = Kept<NetPolicy, SharedHttpClient>;

impl SdkClients {
    /// The client for `policy`, made at the first ask.
    fn get(&self, policy: &NetPolicy) -> SharedHttpClient {
        let Ok(client) = self.get_or_make(policy, || {
            let guarded = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .build_with_resolver(GuardedResolver::new(policy.clone()));
            Ok::<_, std::convert::Infallible>(SharedHttpClient::new(bounded::BoundedClient(
                guarded,
            )))
        });
        client
    }
}

/// `base` with its credentials replaced by those of an STS AssumeRole of
/// `arn` (made with `base`'s credentials, over the guarded client).
async fn assume_role(
    base: SdkConfig,
    arn: &str,
    external_id: Option<&str>,
    region: Region,
    http: &SharedHttpClient,
) -> SdkConfig {
    let mut role = aws_config::sts::AssumeRoleProvider::builder(arn)
        .session_name("labelsync")
        .region(region)
        .configure(&base.to_builder().http_client(http.clone()).build());
    if let Some(id) = external_id {
        role = role.external_id(id);
    }
    let provider = role.build().await;
    base.into_builder()
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
        .build()
}

/// The S3 client's config: the guarded client, path style (by default with
/// a custom endpoint), standard retries and the attempt timeouts.
fn client_config(
    sdk_config: &SdkConfig,
    config: &S3Config,
    http: SharedHttpClient,
    endpoints: EndpointsByBucket,
    env: &StorageEnv,
) -> aws_sdk_s3::Config {
    aws_sdk_s3::config::Builder::from(sdk_config)
        .http_client(http)
        .endpoint_resolver(endpoints)
        .force_path_style(
            config
                .force_path_style
                .unwrap_or(config.endpoint_url.is_some()),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(retry::MAX_ATTEMPTS))
        .retry_classifier(bounded::NoRetryOfTooBig)
        // The SDK sets no limit on how long a request may wait for its
        // response: a server that accepts the connection and never
        // answers would hold the worker for good. A timed-out attempt
        // is retried like any transient failure.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(env.request_timeout)
                .build(),
        )
        .build()
}

/// The SDK's S3 endpoint rules, run once per bucket and operation shape
/// instead of once per request: they took a twentieth of a worker's CPU in a
/// Tasks-mode sync of small files (docs/DECISIONS.md, S3 endpoints resolved
/// once per bucket). The SDK keeps the last answer only for the very same
/// parameters, the object key included, so every GET of a new key ran the
/// rules again. The rules bind the key and the listing prefix but never read
/// them (a test checks that two keys resolve alike), so the answers here are
/// kept per parameters without those two. Clones share their answers: the
/// storage keeps one to learn the endpoint of its signed GETs and listings.
#[derive(Debug, Default, Clone)]
struct EndpointsByBucket {
    rules: Arc<aws_sdk_s3::config::endpoint::DefaultResolver>,
    /// A handful at most: one client's operations differ in a few flags.
    known: Arc<std::sync::Mutex<Vec<(EndpointParams, Endpoint)>>>,
    /// The first answer for an object request (a key and no copy source:
    /// GetObject, PutObject, DeleteObject) or a listing (a prefix:
    /// ListObjectsV2), which resolve alike: the bucket's URL.
    bucket: Arc<OnceLock<Endpoint>>,
}

/// How many endpoint answers [`EndpointsByBucket`] keeps.
const KNOWN_ENDPOINTS: usize = 16;

impl EndpointsByBucket {
    fn known(&self, params: &EndpointParams) -> Option<Endpoint> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .iter()
            .find(|(seen, _)| same_but_key(seen, params))
            .map(|(_, endpoint)| endpoint.clone())
    }

    fn remember(&self, params: &EndpointParams, endpoint: &Endpoint) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.iter().any(|(seen, _)| same_but_key(seen, params)) {
            return; // a concurrent miss got here first
        }
        if known.len() >= KNOWN_ENDPOINTS {
            known.clear();
        }
        known.push((params.clone(), endpoint.clone()));
    }

    /// The endpoint of object requests and listings, once the SDK
    /// resolved one.
    fn of_bucket(&self) -> Option<Endpoint> {
        self.bucket.get().cloned()
    }

    /// Keeps `endpoint` as the bucket's when `params` are an object
    /// request's or a listing's (on a hit too).
    fn note_bucket(&self, params: &EndpointParams, endpoint: &Endpoint) {
        let on_bucket = params.key().is_some() || params.prefix().is_some();
        if self.bucket.get().is_none() && on_bucket && params.copy_source().is_none() {
            let _ = self.bucket.set(endpoint.clone());
        }
    }
}

impl aws_sdk_s3::config::endpoint::ResolveEndpoint for EndpointsByBucket {
    fn resolve_endpoint<'a>(&'a self, params: &'a EndpointParams) -> EndpointFuture<'a> {
        if let Some(endpoint) = self.known(params) {
            self.note_bucket(params, &endpoint);
            return EndpointFuture::ready(Ok(endpoint));
        }
        EndpointFuture::new(async move {
            let endpoint = self.rules.resolve_endpoint(params).await?;
            self.remember(params, &endpoint);
            self.note_bucket(params, &endpoint);
            Ok(endpoint)
        })
    }
}

/// Whether `a` and `b` differ at most in their key and prefix. Lists every
/// other parameter of the SDK's `Params`; a test fails when the SDK adds one.
fn same_but_key(a: &EndpointParams, b: &EndpointParams) -> bool {
    a.bucket() == b.bucket()
        && a.region() == b.region()
        && a.use_fips() == b.use_fips()
        && a.use_dual_stack() == b.use_dual_stack()
        && a.endpoint() == b.endpoint()
        && a.force_path_style() == b.force_path_style()
        && a.accelerate() == b.accelerate()
        && a.use_global_endpoint() == b.use_global_endpoint()
        && a.use_object_lambda_endpoint() == b.use_object_lambda_endpoint()
        && a.copy_source() == b.copy_source()
        && a.disable_access_points() == b.disable_access_points()
        && a.disable_multi_region_access_points() == b.disable_multi_region_access_points()
        && a.use_arn_region() == b.use_arn_region()
        && a.use_s3_express_control_endpoint() == b.use_s3_express_control_endpoint()
        && a.disable_s3_express_session_auth() == b.disable_s3_express_session_auth()
}

/// Classifies an SDK error by its S3 error code and HTTP status.
fn classify<E>(err: SdkError<E, HttpResponse>, what: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code().map(str::to_owned);
    let message = err.message().map(str::to_owned);
    let status = match &err {
        SdkError::ServiceError(_) => err
            .raw_response()
            .map(|r| r.status().as_u16())
            .unwrap_or_default(),
        _ => 0,
    };
    let detail = match (&code, &message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        _ => retry::error_chain(&err),
    };
    let msg = format!("{what}: {detail}");
    if let Some(known) = by_code(code.as_deref().unwrap_or_default(), status, &msg) {
        return known;
    }
    // The detail, not `msg`: `what` holds a key, which could say anything.
    if detail.contains("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS") {
        return Error::invalid("endpoint_not_allowed", Some("config"), msg);
    }
    if detail.contains(super::capped::TOO_BIG) {
        return Error::invalid("storage_answer_too_big", None, msg);
    }
    // Credentials that could not be loaded at all (no chain, STS refused).
    if matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_)
    ) && detail.contains("credential")
    {
        return Error::Unauthenticated(msg);
    }
    Error::Transient(msg)
}

/// A listed object's metadata (`None` for an entry without a key).
fn meta_of(o: &aws_sdk_s3::types::Object) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        key: o.key()?.to_owned(),
        size: o.size(),
        last_modified: o.last_modified().and_then(to_utc),
        etag: o.e_tag().map(|e| e.trim_matches('"').to_owned()),
    })
}

fn to_utc(t: &aws_sdk_s3::primitives::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Where a listing stream is.
struct Cursor {
    client: Client,
    signing: Arc<Signing>,
    bucket: String,
    opts: ListOptions,
    token: Option<String>,
    tokens: super::Tokens,
}

/// One ListObjectsV2 page: signed by hand once the bucket's endpoint is
/// known ([`Signing::signed_gets`]), else through the SDK (whose answer
/// makes it known).
///
/// A key with a character XML 1.0 cannot carry (a control character) makes
/// a plain answer unreadable, so such a page is asked for again with its
/// keys URL-encoded. Only then: a server that echoes `encoding-type=url`
/// without encoding (s3s-fs does) would have every key with a `%` or `+`
/// read wrong.
async fn list_page(
    client: &Client,
    signing: &Signing,
    bucket: &str,
    query: ListQuery<'_>,
) -> Result<Listed> {
    let what = format!("list s3://{bucket}/{}", query.prefix);
    let max_keys = query.max_keys;
    if let Ok(listed) = list_once(client, signing, bucket, &query, &what).await? {
        return within_max_keys(listed, max_keys, &what);
    }
    let encoded = ListQuery {
        url_encoded: true,
        ..query
    };
    let listed = list_once(client, signing, bucket, &encoded, &what)
        .await?
        .map_err(|why| Error::Transient(format!("{what}: an unreadable listing: {why}")))?;
    within_max_keys(listed, max_keys, &what)
}

/// A page holds at most the keys and prefixes asked for; S3 sends at most
/// 1,000 whatever is asked ([`super::within_page`]).
fn within_max_keys(listed: Listed, max_keys: usize, what: &str) -> Result<Listed> {
    let entries = listed.objects.len() + listed.prefixes.len();
    super::within_page(entries, max_keys.max(1000), what)?;
    Ok(listed)
}

/// One ListObjectsV2 page as asked; an answer that came but could not be
/// read is the inner error, with the reason.
async fn list_once(
    client: &Client,
    signing: &Signing,
    bucket: &str,
    query: &ListQuery<'_>,
    what: &str,
) -> Result<std::result::Result<Listed, String>> {
    if let Some(signed) = signing.signed_gets() {
        return signed.list(query, what).await;
    }
    let sent = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(query.prefix)
        .max_keys(i32::try_from(query.max_keys).unwrap_or(1000))
        .set_delimiter(query.delimiter.map(str::to_owned))
        .set_continuation_token(query.token.map(str::to_owned))
        .set_start_after(query.start_after.map(str::to_owned))
        .set_encoding_type(query.url_encoded.then_some(EncodingType::Url))
        .send()
        .await;
    let out = match sent {
        Ok(out) => out,
        // A success status whose body the SDK could not read.
        Err(SdkError::ServiceError(e)) if e.raw().status().is_success() => {
            return Ok(Err(DisplayErrorContext(e.err()).to_string()));
        }
        Err(e) => return Err(classify(e, what)),
    };
    let mut listed = Listed {
        objects: out.contents().iter().filter_map(meta_of).collect(),
        prefixes: out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_owned))
            .collect(),
        next: out
            .next_continuation_token()
            .filter(|_| out.is_truncated() == Some(true))
            .map(str::to_owned),
    };
    Ok(match out.encoding_type() {
        Some(EncodingType::Url) => list_xml::decode_keys(&mut listed).map(|()| listed),
        _ => Ok(listed),
    })
}

#[async_trait]
impl Storage for S3Storage {
    fn kind(&self) -> BackendKind {
        BackendKind::S3
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let cursor = Cursor {
            client: self.client.clone(),
            signing: self.signing.clone(),
            bucket: self.bucket.clone(),
            opts,
            token: None,
            tokens: super::Tokens::default(),
        };
        paginate(Some(cursor), |cursor: Option<Cursor>| async move {
            let Some(mut cursor) = cursor else {
                return Ok(None);
            };
            let opts = &cursor.opts;
            let query = ListQuery {
                prefix: &opts.prefix,
                delimiter: (!opts.recursive).then_some("/"),
                max_keys: opts.page_size,
                token: cursor.token.as_deref(),
                start_after: opts
                    .start_after
                    .as_deref()
                    .filter(|_| cursor.token.is_none()),
                url_encoded: false,
            };
            let listed = list_page(&cursor.client, &cursor.signing, &cursor.bucket, query).await?;
            let empty = listed.objects.is_empty() && listed.prefixes.is_empty();
            let what = format!("list s3://{}/{}", cursor.bucket, opts.prefix);
            let sent = cursor.token.as_deref();
            cursor
                .tokens
                .check(sent, listed.next.as_deref(), empty, &what)?;
            cursor.token = listed.next;
            let next = cursor.token.is_some().then_some(cursor);
            Ok(Some((
                Page {
                    objects: listed.objects,
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
        let mut children = Children::default();
        let mut token = from.map(str::to_owned);
        for _ in 0..max_pages.max(1) {
            let query = ListQuery {
                prefix,
                delimiter: Some("/"),
                max_keys: 1000,
                token: token.as_deref(),
                start_after: None,
                url_encoded: false,
            };
            let listed = list_page(&self.client, &self.signing, &self.bucket, query).await?;
            children.objects.extend(listed.objects);
            children.push_prefixes(prefix, listed.prefixes.iter().map(String::as_str));
            token = listed.next;
            if token.is_none() {
                break;
            }
        }
        children.next = token;
        Ok(Some(children))
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        check_key(key, KeyShape::Name)?;
        let what = format!("get s3://{}/{key}", self.bucket);
        match self.signing.signed_gets() {
            Some(signed) => signed.get(key, range, &what).await,
            None => self.sdk_get(key, range, &what).await,
        }
    }

    async fn put(&self, key: &str, body: Bytes, content_type: Option<&str>) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(AwsBody::from(body))
            .set_content_type(content_type.map(str::to_owned));
        if let Some(kms) = &self.sse_kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(kms);
        }
        req.send()
            .await
            .map_err(|e| classify(e, &format!("put s3://{}/{key}", self.bucket)))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key, KeyShape::Name)?;
        // S3 answers 204 for a missing key too.
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &format!("delete s3://{}/{key}", self.bucket)))?;
        Ok(())
    }

    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        check_key(key, KeyShape::Name)?;
        let config = PresigningConfig::expires_in(ttl).map_err(|e| {
            Error::invalid(
                "invalid_presign_ttl",
                Some("presign_ttl_seconds"),
                e.to_string(),
            )
        })?;
        let signed = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| classify(e, &format!("presign s3://{}/{key}", self.bucket)))?;
        Ok(Some(signed.uri().to_owned()))
    }

    fn task_uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

/// The AWS partition a region is in, as the SDK's endpoint rules name
/// them: by prefix for the partitions apart, `aws` for a region of the
/// commercial one (`us-east-1`, `eu-west-3`, ...), and the region's own
/// name for one not known here (a new partition counts as another place).
fn aws_partition(region: &str) -> &str {
    const APART: [(&str, &str); 7] = [
        ("cn-", "aws-cn"),
        ("us-gov-", "aws-us-gov"),
        ("us-isob-", "aws-iso-b"),
        ("us-isof-", "aws-iso-f"),
        ("us-iso-", "aws-iso"),
        ("eu-isoe-", "aws-iso-e"),
        ("eusc-", "aws-eusc"),
    ];
    const COMMERCIAL: [&str; 9] = ["us", "eu", "ap", "sa", "ca", "me", "af", "il", "mx"];
    if let Some((_, partition)) = APART.iter().find(|(prefix, _)| region.starts_with(prefix)) {
        return partition;
    }
    let parts: Vec<&str> = region.split('-').collect();
    let commercial = parts.len() >= 3
        && COMMERCIAL.contains(&parts[0])
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if commercial { "aws" } else { region }
}

/// The s3 backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &["access_key_id", "secret_access_key", "session_token"]
    }

    /// Without a key pair: the default chain (or a role assumed from it).
    fn acts_as_the_server(&self, secrets: &[&str]) -> bool {
        !(secrets.contains(&"access_key_id") && secrets.contains(&"secret_access_key"))
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Name
    }

    fn folder_markers(&self) -> bool {
        true
    }

    fn uri_scheme(&self) -> Option<&'static str> {
        Some("s3")
    }

    fn uri_location(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<String> {
        config.get("bucket")?.as_str().map(str::to_owned)
    }

    /// The bucket and the endpoint; on AWS (no endpoint) the region's
    /// partition too: a bucket name is unique within a partition only
    /// (`cn-north-1`'s `b` is not `us-east-1`'s).
    fn place(&self, config: &serde_json::Value, _env: &StorageEnv) -> Option<serde_json::Value> {
        let c: S3Config = parse_config(BackendKind::S3, config).ok()?;
        let endpoint = super::endpoint_place(c.endpoint_url.as_deref());
        let partition = match (&endpoint, c.region.as_deref()) {
            (serde_json::Value::Null, Some(region)) => aws_partition(region),
            // The default region: the commercial partition's.
            (serde_json::Value::Null, None) => "aws",
            _ => "",
        };
        Some(serde_json::json!([c.bucket, endpoint, partition]))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        S3Config::parse(config, env).await.map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        secrets: &Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(
            S3Storage::open(S3Config::parse(config, env).await?, secrets, env).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::config::endpoint::DefaultResolver;

    use super::*;

    /// The worker's warm-up needs no network and no credentials: every step
    /// is local (this machine reaches no AWS endpoint), and a failing step
    /// would leave a fresh worker's first batches paying for it again.
    #[tokio::test]
    async fn the_warm_up_succeeds_offline() {
        let env = StorageEnv::default();
        let warmed = tokio::time::timeout(Duration::from_secs(10), warm_up_steps(&env)).await;
        assert!(matches!(warmed, Ok(Ok(()))), "{warmed:?}");
    }

    fn params(bucket: &str, key: &str, endpoint: Option<&str>) -> EndpointParams {
        EndpointParams::builder()
            .bucket(bucket)
            .key(key)
            .region("eu-west-1")
            .set_endpoint(endpoint.map(str::to_owned))
            .force_path_style(endpoint.is_some())
            .build()
            .expect("endpoint parameters")
    }

    async fn url(
        resolver: &impl aws_sdk_s3::config::endpoint::ResolveEndpoint,
        p: &EndpointParams,
    ) -> String {
        resolver
            .resolve_endpoint(p)
            .await
            .expect("an endpoint")
            .url()
            .to_owned()
    }

    /// What the cache assumes of the SDK's rules: the object key does not
    /// change the endpoint (on AWS, virtual-hosted, and on a custom
    /// endpoint, path-style), and the cache answers what the rules answer,
    /// bucket by bucket.
    #[tokio::test]
    async fn endpoints_do_not_depend_on_the_key_and_are_kept_per_bucket() {
        let rules = DefaultResolver::new();
        let cached = EndpointsByBucket::default();
        for endpoint in [None, Some("http://127.0.0.1:9000")] {
            for bucket in ["one", "two"] {
                let first = params(bucket, "a/1.json", endpoint);
                let other = params(bucket, "b/../2 %.json", endpoint);
                assert_eq!(url(&rules, &first).await, url(&rules, &other).await);
                assert_eq!(url(&cached, &first).await, url(&rules, &first).await);
                assert_eq!(url(&cached, &other).await, url(&rules, &other).await);
            }
        }
        assert_eq!(
            url(&cached, &params("one", "k", None)).await,
            "https://one.s3.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            url(&cached, &params("two", "k", Some("http://127.0.0.1:9000"))).await,
            "http://127.0.0.1:9000/two"
        );
        assert_eq!(cached.known.lock().unwrap().len(), 4);
    }

    /// The parameters [`same_but_key`] compares, and the two it leaves out,
    /// are all the SDK's: a new endpoint parameter in an SDK upgrade fails
    /// here until it is compared there too.
    #[test]
    fn the_endpoint_cache_compares_every_parameter_but_the_key_and_prefix() {
        let debug = format!("{:?}", params("b", "k", None));
        let names: Vec<&str> = debug
            .trim_start_matches("Params {")
            .trim_end_matches('}')
            .split(", ")
            .filter_map(|field| field.trim().split_once(": ").map(|(name, _)| name))
            .collect();
        assert_eq!(
            names,
            [
                "bucket",
                "region",
                "use_fips",
                "use_dual_stack",
                "endpoint",
                "force_path_style",
                "accelerate",
                "use_global_endpoint",
                "use_object_lambda_endpoint",
                "key",
                "prefix",
                "copy_source",
                "disable_access_points",
                "disable_multi_region_access_points",
                "use_arn_region",
                "use_s3_express_control_endpoint",
                "disable_s3_express_session_auth",
            ]
        );
    }
}
