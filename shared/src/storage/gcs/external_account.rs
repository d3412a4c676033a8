//! A storage's `external_account` (Workload Identity Federation) file.
//!
//! Google's auth crate would read the file's subject token from wherever
//! `credential_source` says: a file on the server's disk, a program it
//! runs, the server's own AWS identity, or a URL fetched by its own HTTP
//! client (no SSRF guard, redirects followed), and it puts what it read
//! into its error messages when the token's field is missing. A storage's
//! credentials are user input, so only a URL source is taken, fetched here
//! through the storages' client (the guard, no redirects, a bounded
//! answer) and never quoted back; the token exchange itself is the crate's.
//! The server's own workload identity is configured for the process
//! instead, as Application Default Credentials (no `credentials_json`).
use std::{collections::HashMap, fmt, sync::Arc};

use google_cloud_auth::{
    credentials::{
        Credentials,
        external_account::ProgrammaticBuilder,
        subject_token::{Builder as SubjectTokenBuilder, SubjectToken, SubjectTokenProvider},
    },
    errors::SubjectTokenProviderError,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{SCOPE, bad_credentials};
use crate::Result;
use crate::storage::retry::body_up_to;

/// The longest subject-token answer read (OIDC and SAML tokens are a few
/// kilobytes).
const MAX_ANSWER: usize = 1 << 20;
/// The longest the subject token's answer may take whole.
const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The fields of an `external_account` file this server acts on.
#[derive(Deserialize)]
struct File {
    audience: String,
    subject_token_type: String,
    token_url: Option<String>,
    service_account_impersonation_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    workforce_pool_user_project: Option<String>,
    credential_source: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct UrlSource {
    url: String,
    #[serde(default)]
    headers: HashMap<String, String>,
    format: Option<Format>,
}

#[derive(Deserialize)]
struct Format {
    #[serde(rename = "type")]
    kind: String,
    subject_token_field_name: Option<String>,
}

/// Credentials for the `external_account` file `json` (its URLs already
/// checked by `check_token_urls`), whose subject token `client` fetches.
pub(super) fn credentials(json: serde_json::Value, client: reqwest::Client) -> Result<Credentials> {
    let file: File = serde_json::from_value(json).map_err(bad_credentials)?;
    let provider = UrlToken::new(&file.credential_source, client)?;
    let mut builder = ProgrammaticBuilder::new(Arc::new(provider))
        .with_audience(file.audience)
        .with_subject_token_type(file.subject_token_type)
        .with_scopes([SCOPE]);
    if let Some(url) = file.token_url {
        builder = builder.with_token_url(url);
    }
    if let Some(url) = file.service_account_impersonation_url {
        builder = builder.with_target_principal(impersonated(&url)?);
    }
    if let Some(id) = file.client_id {
        builder = builder.with_client_id(id);
    }
    if let Some(secret) = file.client_secret {
        builder = builder.with_client_secret(secret);
    }
    if let Some(project) = file.workforce_pool_user_project {
        builder = builder.with_workforce_pool_user_project(project);
    }
    builder.build().map_err(bad_credentials)
}

/// The service account a `service_account_impersonation_url` names
/// (`.../serviceAccounts/{account}:generateAccessToken`).
fn impersonated(url: &str) -> Result<String> {
    url.rsplit_once("/serviceAccounts/")
        .and_then(|(_, tail)| tail.strip_suffix(":generateAccessToken"))
        .filter(|account| !account.is_empty() && !account.contains('/'))
        .map(str::to_owned)
        .ok_or_else(|| {
            bad_credentials(format!(
                "service_account_impersonation_url {url:?} is not an IAM Credentials \
                 .../serviceAccounts/ACCOUNT:generateAccessToken URL"
            ))
        })
}

/// A subject token read from a URL, as `credential_source.url` says.
struct UrlToken {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    /// The JSON field holding the token; `None`: the whole answer is it.
    field: Option<String>,
}

impl fmt::Debug for UrlToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The headers may carry a credential.
        f.debug_struct("UrlToken")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl UrlToken {
    fn new(
        source: &serde_json::Map<String, serde_json::Value>,
        client: reqwest::Client,
    ) -> Result<Self> {
        for (field, what) in [
            ("file", "reads a file on the server"),
            ("executable", "runs a program on the server"),
            ("environment_id", "uses the server's own AWS identity"),
        ] {
            if source.contains_key(field) {
                return Err(bad_credentials(format!(
                    "credential_source.{field} {what}, which a storage's credentials may not \
                     do; give a credential_source.url, or have the operator set the server's \
                     own identity as Application Default Credentials and leave \
                     credentials_json out"
                )));
            }
        }
        let source: UrlSource = serde_json::from_value(serde_json::Value::Object(source.clone()))
            .map_err(|e| bad_credentials(format!("credential_source: {e}")))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &source.headers {
            let header = HeaderName::try_from(name.as_str());
            let (Ok(header), Ok(value)) = (header, HeaderValue::try_from(value.as_str())) else {
                return Err(bad_credentials(format!(
                    "credential_source.headers: {name:?} is not a valid HTTP header"
                )));
            };
            headers.insert(header, value);
        }
        let field = match source.format {
            None => None,
            Some(Format { kind, .. }) if kind == "text" => None,
            Some(Format {
                kind,
                subject_token_field_name: Some(name),
            }) if kind == "json" => Some(name),
            Some(_) => {
                return Err(bad_credentials(
                    "credential_source.format: give type \"text\", or type \"json\" with a \
                     subject_token_field_name",
                ));
            }
        };
        Ok(UrlToken {
            client,
            url: source.url,
            headers,
            field,
        })
    }

    /// The answer's body, refused past [`MAX_ANSWER`].
    async fn fetch(&self) -> std::result::Result<bytes::Bytes, TokenError> {
        let answer = self
            .client
            .get(&self.url)
            .headers(self.headers.clone())
            .send()
            .await
            // Without its URL, which may carry a key in its query.
            .map_err(|e| TokenError::new(format!("cannot reach it ({})", e.without_url()), true))?;
        let status = answer.status();
        if !status.is_success() {
            let transient = status.is_server_error() || status.as_u16() == 429;
            return Err(TokenError::new(format!("it answered {status}"), transient));
        }
        body_up_to(answer, MAX_ANSWER, ANSWER_DEADLINE, "reading it")
            .await
            .map_err(|e| TokenError::new(e.to_string(), e.is_transient()))
    }

    /// The token in `body`: the whole text, or the JSON field named. Nothing
    /// of the body goes into an error.
    fn token_in(&self, body: &[u8]) -> std::result::Result<String, TokenError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| TokenError::new("its answer is not UTF-8 text".to_owned(), false))?;
        let token = match &self.field {
            None => Some(text.trim().to_owned()),
            Some(field) => serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get(field)?.as_str().map(str::to_owned)),
        };
        token.filter(|t| !t.is_empty()).ok_or_else(|| {
            let want = self.field.as_ref().map_or("a token".to_owned(), |f| {
                format!("a JSON object with a string {f:?}")
            });
            TokenError::new(format!("its answer is not {want}"), false)
        })
    }
}

impl SubjectTokenProvider for UrlToken {
    type Error = TokenError;

    async fn subject_token(&self) -> std::result::Result<SubjectToken, TokenError> {
        let body = self.fetch().await?;
        Ok(SubjectTokenBuilder::new(self.token_in(&body)?).build())
    }
}

/// Why no subject token was read (never quoting the answer).
#[derive(Debug)]
pub(super) struct TokenError {
    message: String,
    transient: bool,
}

impl TokenError {
    fn new(message: String, transient: bool) -> Self {
        TokenError { message, transient }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the subject token from credential_source.url: {}",
            self.message
        )
    }
}

impl std::error::Error for TokenError {}

impl SubjectTokenProviderError for TokenError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        value.as_object().unwrap().clone()
    }

    /// The token is the whole text answer, or the JSON field named; an
    /// answer without it is refused without being quoted.
    #[test]
    fn the_token_is_read_as_the_format_says() {
        let client = reqwest::Client::new();
        let url = "https://idp.example/token";
        let text =
            UrlToken::new(&source(serde_json::json!({ "url": url })), client.clone()).unwrap();
        assert_eq!(text.token_in(b"abc.def\n").unwrap(), "abc.def");
        let json = UrlToken::new(
            &source(serde_json::json!({
                "url": url,
                "headers": { "Metadata": "true" },
                "format": { "type": "json", "subject_token_field_name": "id_token" },
            })),
            client.clone(),
        )
        .unwrap();
        assert_eq!(json.headers["metadata"], "true");
        assert_eq!(json.token_in(br#"{"id_token":"t1"}"#).unwrap(), "t1");
        for body in [
            &br#"{"other":"SECRET"}"#[..],
            b"SECRET",
            b"{\"id_token\":7}",
            b"\xff",
        ] {
            let err = json.token_in(body).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{err}");
            assert!(
                err.contains("\"id_token\"") || err.contains("UTF-8"),
                "{err}"
            );
        }
        for bad in [
            serde_json::json!({ "url": url, "format": { "type": "json" } }),
            serde_json::json!({ "url": url, "format": { "type": "xml" } }),
            serde_json::json!({ "url": url, "headers": { "bad name": "x" } }),
            serde_json::json!({ "headers": {} }),
        ] {
            let refused = UrlToken::new(&source(bad.clone()), client.clone());
            assert!(refused.is_err(), "{bad}");
        }
    }

    /// A subject-token URL may carry a key in its query: an error
    /// reaching it does not quote the URL (reqwest's own text does).
    #[tokio::test]
    async fn an_unreachable_subject_token_url_is_not_quoted() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://127.0.0.1:{port}/token?key=SECRET");
        let token = UrlToken::new(
            &source(serde_json::json!({ "url": url })),
            reqwest::Client::new(),
        )
        .unwrap();
        let err = token.fetch().await.unwrap_err();
        assert!(err.transient, "{err}");
        let err = err.to_string();
        assert!(err.contains("cannot reach it"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn the_impersonated_account_is_read_from_its_url() {
        let url = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken";
        assert_eq!(impersonated(url).unwrap(), "sa@p.iam.gserviceaccount.com");
        for bad in [
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/:generateAccessToken",
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/a/b:generateAccessToken",
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sa",
        ] {
            assert!(impersonated(bad).is_err(), "{bad}");
        }
    }
}
