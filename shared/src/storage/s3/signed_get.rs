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
/// ones from STS or the instance profile last an hour or more).
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// The most of an error response read for its code and message.
const ERROR_BODY_BYTES: usize = 8 * 1024;

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
    /// `None` when that endpoint needs more than plain SigV4.
    pub(super) fn new(
        endpoint: &Endpoint,
        credentials: SharedCredentialsProvider,
        http: reqwest::Client,
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
            keys: Keys::new(credentials),
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
        let url = format!("{}/{}", self.base, utf8_percent_encode(key, KEY_PATH));
        let mut object = retry::retry(what, || self.attempt(&url, range, what)).await?;
        object.etag = object.etag.map(|e| e.trim_matches('"').to_owned());
        Ok(object)
    }

    async fn attempt(&self, url: &str, range: Option<GetRange>, what: &str) -> Result<Object> {
        let mut request = self.http.get(url);
        for (name, value) in self.signature(url).await? {
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
    /// payload's hash, the session token if any, and the authorization.
    async fn signature(&self, url: &str) -> Result<Vec<(&'static str, String)>> {
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
        Ok(headers
            .into_iter()
            .map(|h| (h.name(), h.value().to_owned()))
            .collect())
    }
}

/// The error of a GET answered with a status other than 2xx: S3's code
/// and message from the XML body (its first [`ERROR_BODY_BYTES`]) when it
/// has them, classified as the SDK path classifies them.
async fn error_of(mut response: reqwest::Response, what: &str) -> Error {
    let status = response.status();
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES)]);
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
/// or an assumed role), kept until [`REFRESH_BEFORE`] their expiry; one
/// caller fetches while the others wait for its answer.
#[derive(Debug)]
struct Keys {
    provider: SharedCredentialsProvider,
    current: RwLock<Option<Credentials>>,
    fetching: tokio::sync::Mutex<()>,
}

impl Keys {
    fn new(provider: SharedCredentialsProvider) -> Self {
        Keys {
            provider,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
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
        let keys = self.provider.provide_credentials().await.map_err(|e| {
            Error::Unauthenticated(format!(
                "cannot load S3 credentials: {}",
                retry::error_chain(&e)
            ))
        })?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(keys.clone());
        Ok(keys)
    }

    fn fresh(&self) -> Option<Credentials> {
        let keys = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        match keys.expiry() {
            Some(at) if at <= SystemTime::now() + REFRESH_BEFORE => None,
            _ => Some(keys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
