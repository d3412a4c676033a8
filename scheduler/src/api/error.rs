//! The API's error body, `{"error": {"code", "message", "field"}}`, and the
//! JSON extractor that turns a malformed body into a 4xx with that shape
//! instead of axum's plain-text rejection.
use axum::{
    Json,
    body::{Body, Bytes},
    extract::{
        FromRequest, FromRequestParts, Path, Request,
        rejection::{BytesRejection, FailedToBufferBody, JsonRejection},
    },
    http::StatusCode,
    http::request::Parts,
    response::{IntoResponse, Response},
};
use labelsync::Error;
use serde::de::DeserializeOwned;
use serde_json::json;
use serde_path_to_error::Segment;
use std::borrow::Cow;

/// What a caller who sent a NUL character is told.
const NUL_IN_TEXT: &str = "text must not contain the NUL character (\\u0000 in JSON, %00 in a URL); remove it and send the request again";

/// An API error response: `status` with the body
/// `{"error": {"code", "message", "field"}}` (docs/API.md, "Errors").
/// `code` is stable for programs; `message` never carries database text.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<Cow<'static, str>>,
    /// The seconds its `Retry-After` header asks the caller to wait, when
    /// waiting helps; a `503` always has one.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// The same error, asking its caller to wait `seconds` first.
    pub fn retry_after(self, seconds: u32) -> Self {
        ApiError {
            retry_after: Some(seconds),
            ..self
        }
    }

    pub fn bad_request(
        code: &'static str,
        field: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            field: Some(Cow::Borrowed(field)),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    /// A NUL character in text: refused on every database alike (Postgres
    /// cannot store it), before anything is written.
    pub fn invalid_text() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_text", NUL_IN_TEXT)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// For `validate`: any failure, whatever its kind, is the storage's answer (422).
    pub fn unprocessable(err: Error) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            ..ApiError::from(err)
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        if err.is_database() && err.is_transient() {
            // The driver's text goes to the log; the caller learns what to do.
            tracing::warn!(error = %err, "database unavailable");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable or busy; retry later",
            );
        }
        match err {
            Error::NotFound(message) => ApiError::not_found(message),
            Error::Invalid {
                code,
                message,
                field,
            } => ApiError {
                field: field.map(Cow::Borrowed),
                ..ApiError::new(StatusCode::BAD_REQUEST, code, message)
            },
            // Storage credentials, not the caller's: the request was fine,
            // the storage it describes is not.
            Error::Unauthenticated(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_credentials", message)
            }
            Error::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Error::PermissionDenied(message) => {
                ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message)
            }
            Error::Transient(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            Error::Internal(message) => {
                // The detail goes to the log, not to the caller.
                tracing::error!(%message, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        Error::from(err).into()
    }
}

/// The seconds a `503 unavailable` (a database, storage or queue that
/// cannot be reached) asks its caller to wait (`Retry-After`): about what
/// an API request waits for a database connection before it is refused
/// (`db::connect_api`).
const RETRY_UNAVAILABLE_SECS: u32 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({ "error": { "code": self.code, "message": self.message, "field": self.field } });
        let mut response = (self.status, Json(body)).into_response();
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_UNAVAILABLE_SECS));
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

/// What every handler returns.
pub type ApiResult<T> = Result<T, ApiError>;

/// `Json<T>` with API-shaped rejections.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// The body is read once and refused if it has a key serde_json
    /// reserves (its `Value` fields read such a key's string as JSON text:
    /// what is stored would not be what was sent, and reading it back would
    /// change it again; `labelsync::json`); then parsed by axum's `Json`,
    /// and refused if a string in it holds `\u0000` (see
    /// [`has_escaped_nul`]) or if it is not a JSON object: every request
    /// body of the API is one, and serde would otherwise read an array as a
    /// struct's fields in order (`[null, null]` as an empty PATCH).
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(body_error)?;
        // Before the parse: its `Value` fields read a reserved key by
        // serde_json's rule, which answers with other errors (or none).
        if let Some(key) = labelsync::json::reserved_key_in(&bytes) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                labelsync::json::reserved_key_error(&key),
            ));
        }
        let req = Request::from_parts(parts, Body::from(bytes.clone()));
        let Json(value) = Json::<T>::from_request(req, state)
            .await
            .map_err(|rejection| match rejection {
                // A NUL is refused as such wherever it is, an unknown
                // field's name included.
                JsonRejection::JsonDataError(_) if has_escaped_nul(&bytes) => {
                    ApiError::invalid_text()
                }
                JsonRejection::JsonDataError(_) => misfit_body::<T>(&bytes),
                other => json_error(other),
            })?;
        if has_escaped_nul(&bytes) {
            return Err(ApiError::invalid_text());
        }
        if !is_json_object(&bytes) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the request body must be a JSON object ({...})",
            ));
        }
        Ok(ApiJson(value))
    }
}

/// The byte that opens a JSON object, as a constant so brace counters
/// reading this file stay balanced.
const OBJECT_OPEN: u8 = 0x7b;

/// Whether a valid JSON text is an object: its first character after JSON
/// whitespace opens an object.
fn is_json_object(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == OBJECT_OPEN)
}

/// Whether a JSON text holds the escape `\u0000` (a NUL in a string or a
/// key). In valid JSON a backslash only appears inside strings and starts
/// an escape of two characters or more, so escapes are skipped whole: the
/// text `\\u0000` (an escaped backslash, then `u0000`) is not a NUL.
fn has_escaped_nul(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// A body that could not be read: too large (413), too slow (408, the
/// server's body timeout), or cut off by the client (400).
pub(super) fn body_error(rejection: BytesRejection) -> ApiError {
    let timed_out = std::iter::successors(std::error::Error::source(&rejection), |e| e.source())
        .find_map(|e| e.downcast_ref::<labelsync::http::BodyTimeout>());
    if let Some(timeout) = timed_out {
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("{timeout}; send it faster or in a smaller request"),
        );
    }
    match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(e)) => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body could not be read: {}", e.body_text()),
            )
        }
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("request body could not be read: {}", other.body_text()),
        ),
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::BytesRejection(e) => body_error(e),
        other => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", other.body_text()),
    }
}

/// Why a JSON body did not fit the route's fields: it is read again, this
/// time keeping the path to the value serde refused (axum's rejection only
/// has it as text), so the error names the field.
fn misfit_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiError {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut json) {
        Err(e) => misfit("invalid_body", e.path(), e.inner().to_string()),
        Ok(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body does not fit this route's fields",
        ),
    }
}

/// The codes the docs give a field's bad values (docs/API.md, "Errors"):
/// a value of the wrong type (`"limit": "ten"`) is as bad as one out of
/// range and gets the same code.
const FIELD_CODES: &[(&str, &str)] = &[
    ("limit", "invalid_limit"),
    ("title", "invalid_title"),
    ("data_key", "invalid_data_key"),
    ("status", "invalid_status"),
    ("kind", "invalid_kind"),
    ("result", "invalid_result"),
    ("completed_by", "invalid_completed_by"),
    ("lead_time", "invalid_lead_time"),
    ("url", "invalid_url"),
    ("events", "invalid_events"),
    ("secret", "invalid_secret"),
    ("name", "invalid_name"),
    ("scope", "invalid_scope"),
    ("projects", "invalid_projects"),
    ("expires_at", "invalid_expires_at"),
    ("uri", "invalid_uri"),
];

/// A body or query that parsed but does not fit the route's fields, told
/// by what serde refused: a missing field is `missing_field`, a field
/// with a bad value gets its code from [`FIELD_CODES`], an unknown field or
/// anything else `generic`. `field` names the field in every case where
/// serde named one. serde tells missing and unknown fields only in its
/// message, whose start it fixes (`missing field `x``, `unknown field `x``).
fn misfit(generic: &'static str, path: &serde_path_to_error::Path, said: String) -> ApiError {
    let named = |start: &str| {
        said.strip_prefix(start)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
    };
    let (code, field) = if let Some(name) = named("missing field `") {
        ("missing_field", Some(name))
    } else if let Some(name) = named("unknown field `") {
        (generic, Some(name))
    } else {
        let name = match path.iter().next() {
            Some(Segment::Map { key }) => Some(key.clone()),
            _ => None,
        };
        let code = FIELD_CODES
            .iter()
            .find(|(field, _)| name.as_deref() == Some(*field))
            .map_or(generic, |(_, code)| *code);
        (code, name)
    };
    let message = match path.iter().next() {
        Some(_) => format!("{path}: {said}"),
        None => said,
    };
    ApiError {
        field: field.map(Cow::Owned),
        ..ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

/// `Query<T>` with API-shaped rejections (`?limit=abc` is `invalid_limit`,
/// an unknown parameter `invalid_query`; see [`misfit`]).
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// Read as axum's `Query` reads it (`serde_urlencoded`), keeping the
    /// path to the value serde refused.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(pairs)
            .map(ApiQuery)
            .map_err(|e| misfit("invalid_query", e.path(), e.inner().to_string()))
    }
}

/// The fields of a query on a route that takes none.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// For a route that takes no query: a query parameter is refused (`400
/// invalid_query`, naming it) rather than ignored, so that an option the
/// route does not have (`?force=true`) is not silently dropped.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        ApiQuery::<NoFields>::from_request_parts(parts, state)
            .await
            .map(|_| NoQuery)
    }
}

/// `Path<T>` with API-shaped rejections (`/projects/abc`).
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text()))
    }
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::{has_escaped_nul, is_json_object};

    #[test]
    fn only_objects_are_json_objects() {
        assert!(is_json_object(b"{}"));
        assert!(is_json_object(b" \r\n\t{\"a\": [1]}"));
        assert!(!is_json_object(b"[null, null]"));
        assert!(!is_json_object(b"\"{}\""));
        assert!(!is_json_object(b"null"));
        assert!(!is_json_object(b""));
    }

    #[test]
    fn escaped_nul_is_found_only_as_an_escape() {
        assert!(has_escaped_nul(br#"{"title": "a\u0000b"}"#));
        assert!(has_escaped_nul(br#"{"a\u0000": 1}"#));
        assert!(has_escaped_nul(br#"["\\\u0000"]"#));
        assert!(!has_escaped_nul(br#"{"title": "C:\\u0000"}"#));
        assert!(has_escaped_nul(br#"{"title": "\u00001"}"#));
        assert!(!has_escaped_nul(br#"{"title": "\u0001 u0000"}"#));
        assert!(!has_escaped_nul(br#"{"t": "\\"}"#));
    }
}
