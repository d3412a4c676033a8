//! GetObject and ListObjectsV2 without the SDK's request pipeline: GETs
//! signed with SigV4 and sent on the storage's guarded reqwest client.
//!
//! Reads are most of a sync's requests (one per task file, one per media
//! object proxied by `/resolve`), and for small objects the SDK's
//! per-request machinery (config layering, interceptors, endpoint and auth
//! resolution, response deserialisation) cost a third of a worker's CPU
//! (docs/DECISIONS.md, "GetObject signed by hand"); listing pages are a
//! Files-mode sync's requests, and the SDK's reading of their XML cost two
//! fifths ("ListObjectsV2 signed by hand"). This path keeps what a GET
//! needs: the bucket's URL from the SDK's own endpoint rules (its answer
//! for the storage's first object or listing request), a SigV4 signature
//! (the canonical request written here, aws-sigv4's HMACs, the day's
//! signing key kept: [`SignedGets::signature_at`]) with the credentials
//! of the SDK's provider chain (cached until shortly before they expire),
//! the retry policy of the other hand-written HTTP backends
//! ([`retry::retry`]), and S3's error codes classified by the same table
//! as the SDK's errors ([`by_code`]). A listing page is read by
//! [`list_xml`].
//!
//! A machine whose clock is off by more than S3 allows (15 minutes) has
//! its requests refused with `RequestTimeTooSkewed`; the offset to the
//! answer's `Date` is then kept and requests are signed at the server's
//! time, as the SDK does for its own ([`SignedGets::refused`]).
//!
//! Endpoints that need more than SigV4 (S3 Express sessions, multi-region
//! access points' SigV4a, endpoint-specific headers) keep the SDK path:
//! [`SignedGets::new`] declines them.
use std::{
    sync::{
        Mutex, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use aws_sdk_s3::config::{
    Credentials, ProvideCredentials, SharedCredentialsProvider, endpoint::Endpoint,
};
use aws_sigv4::sign::v4;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header;

use super::{
    error_codes::by_code,
    list_xml::{self, Listed},
};
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

/// What SigV4 leaves unescaped in a query's names and values: the
/// unreserved characters only.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The SHA-256 of an empty payload: a GET's `x-amz-content-sha256`.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

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
    /// The longest a listing page's answer may take whole (the storage's
    /// request timeout, as the SDK's attempt timeout).
    page_deadline: Duration,
    /// The bucket's URL (path-style or virtual-hosted), no trailing `/`.
    base: String,
    signing_region: String,
    signing_name: String,
    keys: Keys,
    /// The signing key of the day (see [`Self::day_key`]).
    day_key: Mutex<Option<DayKey>>,
    /// The server's clock minus this machine's, in ms, as the last
    /// `RequestTimeTooSkewed` answer showed; 0 until one comes.
    skew_ms: AtomicI64,
}

/// The largest clock offset to a storage taken from its `Date` (a day).
const MAX_SKEW_MS: i64 = 24 * 3_600_000;

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
            page_deadline: idle,
            base: endpoint.url().trim_end_matches('/').to_owned(),
            signing_region: text("signingRegion")?,
            signing_name: text("signingName").unwrap_or_else(|| "s3".into()),
            keys: Keys::new(credentials, idle),
            day_key: Mutex::new(None),
            skew_ms: AtomicI64::new(0),
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
        let url = self.url_of(key, what)?;
        let mut object = retry::retry(what, || self.attempt(&url, range, what)).await?;
        object.etag = object.etag.map(|e| e.trim_matches('"').to_owned());
        Ok(object)
    }

    /// The URL of `key`, parsed once: what is signed is what is sent (URL
    /// parsing lowercases the host and rewrites IPv6 literals of the
    /// endpoint).
    fn url_of(&self, key: &str, what: &str) -> Result<reqwest::Url> {
        let raw = format!("{}/{}", self.base, utf8_percent_encode(key, KEY_PATH));
        reqwest::Url::parse(&raw).map_err(|e| Error::Internal(format!("{what}: URL {raw:?}: {e}")))
    }

    /// One page of ListObjectsV2 for `query`, retried as [`Self::get`] is;
    /// `what` names the listing in errors. An answer that came but could
    /// not be read is the inner error, with the reason: asking again would
    /// not change it.
    pub(super) async fn list(
        &self,
        query: &ListQuery<'_>,
        what: &str,
    ) -> Result<std::result::Result<Listed, String>> {
        let url = self.list_url(query, what)?;
        retry::retry(what, || self.list_attempt(&url, what)).await
    }

    /// The bucket's URL (with the `/` the SDK sends) and the page's query,
    /// in SigV4's canonical form so that it is signed as sent.
    fn list_url(&self, query: &ListQuery<'_>, what: &str) -> Result<reqwest::Url> {
        let max_keys = query.max_keys.to_string();
        let mut pairs = vec![
            ("list-type", "2"),
            ("max-keys", max_keys.as_str()),
            ("prefix", query.prefix),
        ];
        pairs.extend(query.delimiter.map(|d| ("delimiter", d)));
        pairs.extend(query.token.map(|t| ("continuation-token", t)));
        pairs.extend(query.start_after.map(|a| ("start-after", a)));
        pairs.extend(query.url_encoded.then_some(("encoding-type", "url")));
        let raw = format!("{}/?{}", self.base, canonical_query(pairs));
        reqwest::Url::parse(&raw).map_err(|e| Error::Internal(format!("{what}: URL {raw:?}: {e}")))
    }

    async fn list_attempt(
        &self,
        url: &reqwest::Url,
        what: &str,
    ) -> Result<std::result::Result<Listed, String>> {
        let response = self.send(url, None, what).await?;
        if !response.status().is_success() {
            return Err(self.refused(response, what).await);
        }
        let body =
            retry::body_up_to(response, retry::MAX_PAGE_BYTES, self.page_deadline, what).await?;
        Ok(match std::str::from_utf8(&body) {
            Ok(xml) => list_xml::parse(xml),
            Err(e) => Err(format!("the listing is not UTF-8: {e}")),
        })
    }

    /// Sends a signed GET of `url` (of `range`, if any).
    async fn send(
        &self,
        url: &reqwest::Url,
        range: Option<GetRange>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let mut request = self.http.get(url.clone());
        for (name, value) in self.signature(url).await? {
            request = request.header(name, value);
        }
        if let Some(range) = range {
            request = request.header(header::RANGE, range.header());
        }
        request
            .send()
            .await
            .map_err(|e| retry::transport_error(&e, what))
    }

    async fn attempt(
        &self,
        url: &reqwest::Url,
        range: Option<GetRange>,
        what: &str,
    ) -> Result<Object> {
        let response = self.send(url, range, what).await?;
        if response.status().is_success() {
            return retry::object_of(response, &[header::ETAG], range);
        }
        Err(self.refused(response, what).await)
    }

    /// The error a refused request stands for. `RequestTimeTooSkewed`
    /// means this machine's clock is off: the offset to the answer's `Date`
    /// is kept for every later signature, and the error is transient so
    /// the request is tried again, signed at the server's time.
    async fn refused(&self, response: reqwest::Response, what: &str) -> Error {
        let server_time = response
            .headers()
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok());
        let (code, error) = error_of(response, what).await;
        let skew =
            server_time.map(|at| at.timestamp_millis() - chrono::Utc::now().timestamp_millis());
        match (code.as_deref(), skew) {
            // A server's clock more than a day off is not a clock to sign
            // by: kept, it would sign every later request of the backend at
            // that absurd time.
            (Some("RequestTimeTooSkewed"), Some(skew)) if skew.abs() > MAX_SKEW_MS => {
                Error::invalid(
                    "storage_rejected",
                    None,
                    format!(
                        "{what}: the storage refused the request's time (RequestTimeTooSkewed), \
                         and its own clock is {skew} ms from this machine's, more than a day: \
                         set the clock right on one of them"
                    ),
                )
            }
            (Some("RequestTimeTooSkewed"), Some(skew)) => {
                self.skew_ms.store(skew, Ordering::Relaxed);
                let why = format!(
                    "{what}: the storage refused the request's time (RequestTimeTooSkewed): \
                     its clock differs from this machine's by {skew} ms; requests are signed \
                     at its time from now on"
                );
                tracing::warn!(skew_ms = skew, "{why}");
                Error::Transient(why)
            }
            _ => error,
        }
    }

    /// The headers that sign a GET of `url` now: the date, the empty
    /// payload's hash, the session token if any, and the authorization
    /// (those two marked sensitive, so no debug output shows them).
    async fn signature(
        &self,
        url: &reqwest::Url,
    ) -> Result<Vec<(&'static str, header::HeaderValue)>> {
        let keys = self.keys.current().await?;
        let skew = self.skew_ms.load(Ordering::Relaxed);
        let now = SystemTime::now();
        // (Checked: the offset comes from a server's `Date`.)
        let at = match u64::try_from(skew) {
            Ok(ahead) => now.checked_add(Duration::from_millis(ahead)),
            Err(_) => now.checked_sub(Duration::from_millis(skew.unsigned_abs())),
        };
        self.signature_at(url, &keys, at.unwrap_or(now))
    }

    /// SigV4's "Authorization header" form for a GET with no body, as S3
    /// checks it: the path signed as sent (see [`KEY_PATH`]), and the query
    /// too, which must be in canonical form already ([`canonical_query`]
    /// makes it). The canonical request and the string to sign are written
    /// here, the HMACs are aws-sigv4's, and the day's signing key is kept
    /// (four of the five HMACs a request took). A test checks the headers
    /// against aws-sigv4's own signer.
    fn signature_at(
        &self,
        url: &reqwest::Url,
        keys: &Credentials,
        now: SystemTime,
    ) -> Result<Vec<(&'static str, header::HeaderValue)>> {
        let amz_date = chrono::DateTime::<chrono::Utc>::from(now)
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        let day = &amz_date[..8];
        let token = keys.session_token().map(str::trim);
        let (canonical, signed_headers) = canonical_request(url, &amz_date, token);
        let scope = format!(
            "{day}/{}/{}/aws4_request",
            self.signing_region, self.signing_name
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            crate::security::sha256_hex(&[canonical.as_bytes()])
        );
        let signature =
            v4::calculate_signature(self.day_key(keys, day, now), string_to_sign.as_bytes());
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            keys.access_key_id()
        );
        let mut headers = vec![
            ("x-amz-date", amz_date.as_str()),
            ("x-amz-content-sha256", EMPTY_SHA256),
        ];
        headers.extend(token.map(|t| ("x-amz-security-token", t)));
        headers.push(("authorization", authorization.as_str()));
        headers
            .into_iter()
            .map(|(name, value)| {
                let mut value = header::HeaderValue::from_str(value)
                    .map_err(|e| Error::Internal(format!("S3 signature header {name}: {e}")))?;
                value.set_sensitive(matches!(name, "authorization" | "x-amz-security-token"));
                Ok((name, value))
            })
            .collect()
    }

    /// The signing key of `day` (`YYYYMMDD`) for `keys`: made again when
    /// the day or the credentials change, else the one kept.
    fn day_key(&self, keys: &Credentials, day: &str, now: SystemTime) -> [u8; 32] {
        let mut kept = self.day_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kept.as_ref().filter(|k| k.day == day && k.keys == *keys) {
            return k.key;
        }
        let derived = v4::generate_signing_key(
            keys.secret_access_key(),
            now,
            &self.signing_region,
            &self.signing_name,
        );
        let mut key = [0; 32];
        key.copy_from_slice(derived.as_ref());
        *kept = Some(DayKey {
            day: day.to_owned(),
            keys: keys.clone(),
            key,
        });
        key
    }
}

/// SigV4's canonical request for a GET of `url` (its query canonical
/// already, no body) at `amz_date`, and its signed headers: `host` as hyper
/// sends it (the port when it is not the scheme's), the empty payload's
/// hash, the date, and the session token when there is one.
fn canonical_request(
    url: &reqwest::Url,
    amz_date: &str,
    token: Option<&str>,
) -> (String, &'static str) {
    use std::fmt::Write;
    let signed_headers = match token {
        Some(_) => "host;x-amz-content-sha256;x-amz-date;x-amz-security-token",
        None => "host;x-amz-content-sha256;x-amz-date",
    };
    let mut canonical = String::with_capacity(320);
    let _ = write!(
        canonical,
        "GET\n{}\n{}\nhost:",
        url.path(),
        url.query().unwrap_or_default()
    );
    canonical.push_str(url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        let _ = write!(canonical, ":{port}");
    }
    let _ = write!(
        canonical,
        "\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{amz_date}\n"
    );
    if let Some(token) = token {
        let _ = writeln!(canonical, "x-amz-security-token:{token}");
    }
    let _ = write!(canonical, "\n{signed_headers}\n{EMPTY_SHA256}");
    (canonical, signed_headers)
}

/// What one ListObjectsV2 page asks for.
pub(super) struct ListQuery<'a> {
    pub prefix: &'a str,
    /// `/` for one level of the key tree; `None` for every key.
    pub delimiter: Option<&'a str>,
    pub max_keys: usize,
    /// The previous page's continuation token.
    pub token: Option<&'a str>,
    /// Only keys after this one (the first page of a resumed listing).
    pub start_after: Option<&'a str>,
    /// Asks for keys and prefixes URL-encoded (`encoding-type=url`).
    pub url_encoded: bool,
}

/// A query in SigV4's canonical form: names and values escaped but for
/// the unreserved characters, the pairs sorted. Sent as it is signed.
fn canonical_query(mut pairs: Vec<(&str, &str)>) -> String {
    pairs.sort_unstable();
    let escaped: Vec<String> = pairs
        .into_iter()
        .map(|(name, value)| {
            format!(
                "{}={}",
                utf8_percent_encode(name, QUERY_VALUE),
                utf8_percent_encode(value, QUERY_VALUE)
            )
        })
        .collect();
    escaped.join("&")
}

/// A day's SigV4 signing key and what it was made of.
struct DayKey {
    day: String,
    keys: Credentials,
    key: [u8; 32],
}

/// The key is derived from the secret (good for a day): never printed.
impl std::fmt::Debug for DayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DayKey")
            .field("day", &self.day)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// The error of a GET answered with a status other than 2xx, with S3's
/// code: the code and message from the XML body ([`retry::error_body`])
/// when it has them, classified as the SDK path classifies them.
async fn error_of(response: reqwest::Response, what: &str) -> (Option<String>, Error) {
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
    let error = by_code(code.as_deref().unwrap_or_default(), status.as_u16(), &msg)
        .unwrap_or(Error::Transient(msg));
    (code, error)
}

/// The text of the first `<name>` element of an S3 error document, its
/// references decoded as a listing's are ([`list_xml::unescape_into`];
/// as sent where one is not XML's).
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let raw = &xml[start..start + xml[start..].find(&format!("</{name}>"))?];
    let mut text = String::new();
    if list_xml::unescape_into(raw, &mut text).is_err() {
        text = raw.to_owned();
    }
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
        let url = reqwest::Url::parse("https://labels.s3.eu-west-1.amazonaws.com/a%20b.json");
        let headers = signed.signature(&url.unwrap()).await.unwrap();
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

    /// The headers aws-sigv4's own signer gives a GET of `url` at `now`,
    /// with S3's settings (what this module signed with before it wrote
    /// the canonical request itself).
    fn reference(url: &str, keys: &Credentials, region: &str, now: SystemTime) -> Vec<String> {
        use aws_sigv4::http_request::{
            PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
            SigningSettings, UriPathNormalizationMode, sign,
        };
        let identity = aws_smithy_runtime_api::client::identity::Identity::from(keys.clone());
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("s3")
            .time(now)
            .settings(settings)
            .build()
            .unwrap()
            .into();
        let request =
            SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(&[])).unwrap();
        let (instructions, _) = sign(request, &params).unwrap().into_parts();
        let mut headers: Vec<String> = instructions
            .into_parts()
            .0
            .into_iter()
            .map(|h| format!("{}: {}", h.name(), h.value()))
            .collect();
        headers.sort();
        headers
    }

    /// The URLs signed per endpoint: GETs of `keys` and listing pages.
    fn urls(signed: &SignedGets, keys: &[&str]) -> Vec<reqwest::Url> {
        let odd = "a b/ü+%2e/&=?#x~y_z-1";
        let pages = [
            (odd, Some("/"), None, Some(odd)),
            (
                "",
                None,
                Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="),
                None,
            ),
            ("tasks/", Some("/"), Some(odd), None),
        ];
        let lists = pages.map(|(prefix, delimiter, token, start_after)| {
            let query = ListQuery {
                prefix,
                delimiter,
                max_keys: 1000,
                token,
                start_after,
                url_encoded: token.is_some(),
            };
            signed.list_url(&query, "test").unwrap()
        });
        keys.iter()
            .map(|key| signed.url_of(key, "test").unwrap())
            .chain(lists)
            .collect()
    }

    #[test]
    fn listing_queries_are_canonical_and_sent_as_signed() {
        let signed = SignedGets {
            http: reqwest::Client::new(),
            page_deadline: Duration::from_secs(30),
            base: "http://127.0.0.1:9000/bucket".into(),
            signing_region: "us-east-1".into(),
            signing_name: "s3".into(),
            keys: Keys::new(
                SharedCredentialsProvider::new(Credentials::new("A", "s", None, None, "test")),
                Duration::from_secs(5),
            ),
            day_key: Mutex::new(None),
            skew_ms: AtomicI64::new(0),
        };
        let query = ListQuery {
            prefix: "a b/&+",
            delimiter: Some("/"),
            max_keys: 2,
            token: Some("t/=+"),
            start_after: Some("ü"),
            url_encoded: true,
        };
        let url = signed.list_url(&query, "test").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9000/bucket/?continuation-token=t%2F%3D%2B&delimiter=%2F\
             &encoding-type=url&list-type=2&max-keys=2&prefix=a%20b%2F%26%2B&start-after=%C3%BC"
        );
    }

    #[test]
    fn signatures_match_aws_sigv4_across_endpoints_keys_days_and_credentials() {
        let day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_930_000);
        let plain = Credentials::new("AKIDPLAIN", "secret/with+chars", None, None, "test");
        let session = Credentials::new("ASIATOKEN", "other", Some("tok/en+=".into()), None, "test");
        let bases = [
            ("https://labels.s3.eu-west-1.amazonaws.com", "eu-west-1"),
            ("http://127.0.0.1:9000/bucket", "us-east-1"),
            ("https://minio.example.com:8443/data", "us-east-1"),
            ("http://[::1]:9000/b", "auto"),
            ("https://acct.r2.cloudflarestorage.com:443/b", "auto"),
        ];
        let keys = [
            "tasks/t-0000001.json",
            "a b/ü+%2e/x~y_z-1.json",
            "deep/er/than/that/!$&'()*,;=@:.json",
            "x",
        ];
        for (base, region) in bases {
            let signed = SignedGets {
                http: reqwest::Client::new(),
                page_deadline: Duration::from_secs(30),
                base: base.to_owned(),
                signing_region: region.to_owned(),
                signing_name: "s3".to_owned(),
                keys: Keys::new(
                    SharedCredentialsProvider::new(plain.clone()),
                    Duration::from_secs(5),
                ),
                day_key: Mutex::new(None),
                skew_ms: AtomicI64::new(0),
            };
            // The kept key must follow the day and the credentials.
            for (creds, at) in [
                (&plain, day),
                (&plain, day + Duration::from_secs(3600)),
                (&plain, day + Duration::from_secs(86_400)),
                (&session, day + Duration::from_secs(86_400)),
                (&plain, day),
            ] {
                for url in urls(&signed, &keys) {
                    let mut ours: Vec<String> = signed
                        .signature_at(&url, creds, at)
                        .unwrap()
                        .into_iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .collect();
                    ours.sort();
                    assert_eq!(ours, reference(url.as_str(), creds, region, at), "{url}");
                }
            }
        }
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

    /// Hand-signed GETs of the bucket at `base` with `credentials`, signing
    /// `skew_ms` off this machine's clock.
    fn signed_gets(base: String, credentials: Credentials, skew_ms: i64) -> SignedGets {
        SignedGets {
            http: reqwest::Client::new(),
            page_deadline: Duration::from_secs(30),
            base,
            signing_region: "us-east-1".into(),
            signing_name: "s3".into(),
            keys: Keys::new(
                SharedCredentialsProvider::new(credentials),
                Duration::from_secs(5),
            ),
            day_key: Mutex::new(None),
            skew_ms: AtomicI64::new(skew_ms),
        }
    }

    /// A clock an hour behind the storage's: s3s-fs (which checks the time
    /// of a header signature, 15 minutes either way) refuses the GET as
    /// too skewed; the answer's `Date` sets the offset, and the retry
    /// signed at the storage's time gets the object.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clock_an_hour_off_is_set_right_by_the_storages_date() {
        use futures::TryStreamExt;
        let endpoint = std::env::var("TEST_S3S_ENDPOINT")
            .expect("TEST_S3S_ENDPOINT: s3s-fs, started by tests/emulators.sh");
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
        let credentials = Credentials::new(
            var("TEST_S3S_ACCESS_KEY", "labelsync-test"),
            var("TEST_S3S_SECRET_KEY", "labelsync-test-secret"),
            None,
            None,
            "test",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .credentials_provider(credentials.clone())
            .build();
        let client = aws_sdk_s3::Client::from_conf(config);
        let bucket = format!("skew-{:08x}", rand::random::<u32>());
        client.create_bucket().bucket(&bucket).send().await.unwrap();
        let body = aws_sdk_s3::primitives::ByteStream::from_static(b"tick");
        let put = client.put_object().bucket(&bucket).key("k").body(body);
        put.send().await.unwrap();
        let base = format!("{}/{bucket}", endpoint.trim_end_matches('/'));
        let signed = signed_gets(base, credentials, -3_600_000);
        let object = signed.get("k", None, "get k").await.unwrap();
        let chunks: Vec<bytes::Bytes> = object.body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"tick");
        let skew = signed.skew_ms.load(Ordering::Relaxed);
        assert!(skew.abs() < 5_000, "the offset kept: {skew} ms");
    }

    /// A storage that says RequestTimeTooSkewed with a `Date` in the year
    /// 9999 is refused as it is: its offset is not kept (every later
    /// request of the backend would have been signed eight millennia ahead).
    #[tokio::test]
    async fn an_absurd_server_date_is_not_signed_by() {
        let body = "<Error><Code>RequestTimeTooSkewed</Code><Message>skewed</Message></Error>";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\ndate: Fri, 31 Dec 9999 23:59:59 GMT\r\n\
             content-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let base = format!(
            "http://{}/b",
            crate::storage::answering_always(answer).await
        );
        let credentials = Credentials::new("k", "s", None, None, "test");
        let signed = signed_gets(base, credentials, 0);
        for _ in 0..2 {
            match signed.get("k", None, "get k").await {
                Err(Error::Invalid { message, .. }) => {
                    assert!(message.contains("more than a day"), "{message}");
                }
                other => panic!("{:?}", other.map(|o| o.size)),
            }
            assert_eq!(signed.skew_ms.load(Ordering::Relaxed), 0);
        }
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
