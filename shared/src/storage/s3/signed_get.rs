//! GetObject without the SDK's request pipeline: one SigV4-signed GET on
//! the storage's guarded reqwest client.
//!
//! Reads are most of a sync's requests (one per task file, one per media
//! object proxied by `/resolve`), and for small objects the SDK's
//! per-request machinery (config layering, interceptors, endpoint and auth
//! resolution, response deserialisation) cost a third of a worker's CPU
//! (docs/DECISIONS.md, "GetObject signed by hand"). This path keeps what a
//! GET needs: the bucket's URL from the SDK's own endpoint rules (its
//! answer for the storage's first object request), a SigV4 signature by `aws-sigv4` (the SDK's signer) with
//! the credentials of the SDK's provider chain (cached until shortly
//! before they expire), the retry policy of the other hand-written HTTP
//! backends ([`retry::retry`]), and S3's error codes classified by the same
//! table as the SDK's errors ([`by_code`]).
//!
//! Endpoints that need more than SigV4 (S3 Express sessions, multi-region
//! access points' SigV4a, endpoint-specific headers) keep the SDK path:
//! [`SignedGets::new`] declines them.
use std::{
    sync::RwLock,
    time::{Duration, SystemTime},
};

use aws_sdk_s3::config::{
    Credentials, ProvideCredentials, SharedCredentialsProvider, endpoint::Endpoint,
};
use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode, sign,
    },
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header;

use super::error_codes::by_code;
use crate::{
    Error, Result,
    storage::{GetRange, Object, retry},
};

/// What S3 leaves unescaped in a key's path: the unreserved characters and
/// `/`. The path is signed exactly as sent (no second encoding, no dot
/// folding: `check_key` refuses `.` and `..` segments before this).
const KEY_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Credentials are fetched again this long before they expire (temporary
/// ones from STS or the instance profile last an hour or more); a failed
/// fetch keeps using them until they do.
const REFRESH_BEFORE: Duration = Duration::from_secs(60);

/// Credentials without an expiry (a profile file, a `credential_process`)
/// are fetched again after this long, so a rotated file is read again (as
/// the SDK's own cache does).
const NO_EXPIRY_KEPT: Duration = Duration::from_secs(15 * 60);

/// Signed GETs of one bucket.
#[derive(Debug)]
pub(super) struct SignedGets {
    http: reqwest::Client,
    /// The bucket's URL (path-style or virtual-hosted), no trailing `/`.
    base: String,
    signing_region: String,
    signing_name: String,
    keys: Keys,
}

impl SignedGets {
    /// Signed GETs at `endpoint` (the SDK's answer for this bucket), or
    /// `None` when that endpoint needs more than plain SigV4; a
    /// credentials fetch may take up to `idle`.
    pub(super) fn new(
        endpoint: &Endpoint,
        credentials: SharedCredentialsProvider,
        http: reqwest::Client,
        idle: Duration,
    ) -> Option<Self> {
        if endpoint.headers().next().is_some() {
            return None;
        }
        let scheme = endpoint.auth_schemes().first()?;
        if scheme.name() != "sigv4" {
            return None;
        }
        let text = |name: &str| scheme.get(name)?.as_string().map(str::to_owned);
        Some(SignedGets {
            http,
            base: endpoint.url().trim_end_matches('/').to_owned(),
            signing_region: text("signingRegion")?,
            signing_name: text("signingName").unwrap_or_else(|| "s3".into()),
            keys: Keys::new(credentials, idle),
        })
    }

    /// The object at `key` (or its `range`), retried as the other HTTP
    /// backends retry; `what` names it in errors.
    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<GetRange>,
        what: &str,
    ) -> Result<Object> {
        // Parsed once, and what is signed is what is sent: URL parsing
        // lowercases the host and rewrites IPv6 literals of the endpoint.
        let raw = format!("{}/{}", self.base, utf8_percent_encode(key, KEY_PATH));
        let url = reqwest::Url::parse(&raw)
            .map_err(|e| Error::Internal(format!("{what}: URL {raw:?}: {e}")))?;
        let mut object = retry::retry(what, || self.attempt(&url, range, what)).await?;
        object.etag = object.etag.map(|e| e.trim_matches('"').to_owned());
        Ok(object)
    }

    async fn attempt(
        &self,
        url: &reqwest::Url,
        range: Option<GetRange>,
        what: &str,
    ) -> Result<Object> {
        let mut request = self.http.get(url.clone());
        for (name, value) in self.signature(url.as_str()).await? {
            request = request.header(name, value);
        }
        if let Some(range) = range {
            request = request.header(header::RANGE, range.header());
        }
        let response = request
            .send()
            .await
            .map_err(|e| retry::transport_error(&e, what))?;
        if response.status().is_success() {
            return Ok(retry::object_of(response, &[header::ETAG]));
        }
        Err(error_of(response, what).await)
    }

    /// The headers that sign a GET of `url` now: the date, the empty
    /// payload's hash, the session token if any, and the authorization
    /// (those two marked sensitive, so no debug output shows them).
    async fn signature(&self, url: &str) -> Result<Vec<(&'static str, header::HeaderValue)>> {
        let identity = Identity::from(self.keys.current().await?);
        let mut settings = SigningSettings::default();
        // S3's rules: the path signed as sent, the payload hash in a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.signing_region)
            .name(&self.signing_name)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| Error::Internal(format!("S3 signing parameters: {e}")))?
            .into();
        let unsigned =
            SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(&[]))
                .map_err(|e| Error::Internal(format!("S3 request to sign ({url}): {e}")))?;
        let (instructions, _) = sign(unsigned, &params)
            .map_err(|e| Error::Internal(format!("signing an S3 request: {e}")))?
            .into_parts();
        let (headers, _) = instructions.into_parts();
        headers
            .into_iter()
            .map(|h| {
                let mut value = header::HeaderValue::from_str(h.value()).map_err(|e| {
                    Error::Internal(format!("S3 signature header {}: {e}", h.name()))
                })?;
                value.set_sensitive(h.sensitive() || h.name() == "authorization");
                Ok((h.name(), value))
            })
            .collect()
    }
}

/// The error of a GET answered with a status other than 2xx: S3's code
/// and message from the XML body ([`retry::error_body`]) when it has them,
/// classified as the SDK path classifies them.
async fn error_of(response: reqwest::Response, what: &str) -> Error {
    let status = response.status();
    let body = retry::error_body(response).await;
    let code = element(&body, "Code");
    let message = element(&body, "Message");
    let detail = match (&code, &message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        _ => format!("HTTP {status}"),
    };
    let msg = format!("{what}: {detail}");
    by_code(code.as_deref().unwrap_or_default(), status.as_u16(), &msg)
        .unwrap_or(Error::Transient(msg))
}

/// The text of the first `<name>` element of an S3 error document, its
/// five predefined XML entities decoded.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    let text = xml[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(text.chars().take(300).collect())
}

/// The credentials of the SDK's provider (static keys, the default chain,
/// or an assumed role), kept until [`REFRESH_BEFORE`] their expiry (or
/// [`NO_EXPIRY_KEPT`] when they have none); one caller fetches while the
/// others wait for its answer.
#[derive(Debug)]
struct Keys {
    provider: SharedCredentialsProvider,
    current: RwLock<Option<Kept>>,
    fetching: tokio::sync::Mutex<()>,
    /// The longest a fetch may take (an STS endpoint that never answers
    /// must not hold every GET of the storage).
    timeout: Duration,
}

#[derive(Debug, Clone)]
struct Kept {
    keys: Credentials,
    /// When they are to be fetched again.
    refresh_at: SystemTime,
}

impl Keys {
    fn new(provider: SharedCredentialsProvider, timeout: Duration) -> Self {
        Keys {
            provider,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
            timeout,
        }
    }

    async fn current(&self) -> Result<Credentials> {
        if let Some(keys) = self.fresh() {
            return Ok(keys);
        }
        let _one = self.fetching.lock().await;
        if let Some(keys) = self.fresh() {
            return Ok(keys);
        }
        match self.fetch().await {
            Ok(keys) => {
                let refresh_at = match keys.expiry() {
                    Some(at) => at.checked_sub(REFRESH_BEFORE).unwrap_or(at),
                    None => SystemTime::now() + NO_EXPIRY_KEPT,
                };
                let kept = Kept {
                    keys: keys.clone(),
                    refresh_at,
                };
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(kept);
                Ok(keys)
            }
            // Keys due for a refresh may still be good for a while.
            Err(err) => self.unexpired().ok_or(err),
        }
    }

    async fn fetch(&self) -> Result<Credentials> {
        match tokio::time::timeout(self.timeout, self.provider.provide_credentials()).await {
            Ok(Ok(keys)) => Ok(keys),
            Ok(Err(e)) => Err(Error::Unauthenticated(format!(
                "cannot load S3 credentials: {}",
                retry::error_chain(&e)
            ))),
            Err(_) => Err(Error::Transient(format!(
                "loading S3 credentials took over {} s",
                self.timeout.as_secs()
            ))),
        }
    }

    /// The kept credentials while they are not due for a refresh.
    fn fresh(&self) -> Option<Credentials> {
        let kept = self.kept()?;
        (SystemTime::now() < kept.refresh_at).then_some(kept.keys)
    }

    /// The kept credentials while they have not expired.
    fn unexpired(&self) -> Option<Credentials> {
        let kept = self.kept()?;
        match kept.keys.expiry() {
            Some(at) if at <= SystemTime::now() => None,
            _ => Some(kept.keys),
        }
    }

    fn kept(&self) -> Option<Kept> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use aws_credential_types::{
        credential_fn::provide_credentials_fn, provider::error::CredentialsError,
    };
    use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};

    use super::*;

    async fn aws_endpoint(bucket: &str) -> Endpoint {
        let params = Params::builder()
            .bucket(bucket)
            .key("k")
            .region("eu-west-1")
            .build()
            .expect("endpoint parameters");
        DefaultResolver::new()
            .resolve_endpoint(&params)
            .await
            .expect("an endpoint")
    }

    fn gets(endpoint: &Endpoint, keys: Credentials) -> Option<SignedGets> {
        let http = reqwest::Client::new();
        let provider = SharedCredentialsProvider::new(keys);
        SignedGets::new(endpoint, provider, http, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn aws_buckets_are_signed_virtual_hosted_and_s3_express_stays_with_the_sdk() {
        let keys = Credentials::new("AKID", "secret", None, None, "test");
        let signed = gets(&aws_endpoint("labels").await, keys.clone()).expect("plain SigV4");
        assert_eq!(signed.base, "https://labels.s3.eu-west-1.amazonaws.com");
        assert_eq!(
            (signed.signing_region.as_str(), signed.signing_name.as_str()),
            ("eu-west-1", "s3")
        );
        let express = aws_endpoint("labels--euw1-az1--x-s3").await;
        assert!(gets(&express, keys).is_none(), "{express:?}");
    }

    #[tokio::test]
    async fn a_session_token_is_sent_signed_and_marked_sensitive() {
        let keys = Credentials::new("AKID", "secret", Some("the-token".into()), None, "test");
        let signed = gets(&aws_endpoint("labels").await, keys).expect("plain SigV4");
        let headers = signed
            .signature("https://labels.s3.eu-west-1.amazonaws.com/a%20b.json")
            .await
            .unwrap();
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        };
        let token = value("x-amz-security-token");
        assert_eq!(token, "the-token");
        assert!(token.is_sensitive());
        let auth = value("authorization");
        assert!(auth.is_sensitive());
        let auth = auth.to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/")
                && auth.contains("/eu-west-1/s3/aws4_request")
                && auth.contains(
                    "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
                ),
            "{auth}"
        );
        assert_eq!(
            value("x-amz-content-sha256"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_due_for_refresh_serve_while_a_refresh_fails_and_a_hung_fetch_times_out() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        // Good for 30 s more (within REFRESH_BEFORE), then the provider fails.
        let provider = provide_credentials_fn(move || {
            let call = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match call {
                    0 => Ok(Credentials::new(
                        "AKID",
                        "secret",
                        Some("t".into()),
                        Some(SystemTime::now() + Duration::from_secs(30)),
                        "test",
                    )),
                    _ => Err(CredentialsError::provider_error("STS is down")),
                }
            }
        });
        let keys = Keys::new(
            SharedCredentialsProvider::new(provider),
            Duration::from_secs(5),
        );
        assert_eq!(keys.current().await.unwrap().access_key_id(), "AKID");
        assert_eq!(keys.current().await.unwrap().access_key_id(), "AKID");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the second look tried a refresh"
        );

        let hung = provide_credentials_fn(std::future::pending);
        let keys = Keys::new(SharedCredentialsProvider::new(hung), Duration::from_secs(5));
        match keys.current().await {
            Err(Error::Transient(msg)) => assert!(msg.contains("over 5 s"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_are_escaped_as_s3_signs_them() {
        assert_eq!(
            utf8_percent_encode("a b/ü+%2e/x~y_z-1.json", KEY_PATH).to_string(),
            "a%20b/%C3%BC%2B%252e/x~y_z-1.json"
        );
    }

    #[test]
    fn error_documents_give_their_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code>\
                   <Message>The key &lt;a&amp;b&gt; does not exist</Message></Error>";
        assert_eq!(element(xml, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(
            element(xml, "Message").as_deref(),
            Some("The key <a&b> does not exist")
        );
        assert_eq!(element("<Error><Code>x", "Code"), None);
        assert_eq!(element("", "Message"), None);
    }
}
