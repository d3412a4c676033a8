//! `Idempotency-Key` on every POST (docs/API.md, "Idempotent requests"):
//! the same key from the same caller with the same request within 24 h
//! gets the first answer again and does nothing; another request under the
//! key is a 422; a duplicate sent while the first is still being answered
//! waits for it.
use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    extract::{FromRequest, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use labelsync::{
    db::idempotency::{self, Claim},
    security::sha256_hex,
};

use super::{ApiError, ApiResult, AppState, access};

const HEADER: &str = "idempotency-key";
/// How long a key is remembered.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// A key claimed this long ago with no answer stored was abandoned (its
/// process died mid-request): the next request with it runs afresh.
/// Longer than any request may take (body timeout, then the handler).
const ABANDONED_AFTER: Duration = Duration::from_secs(120);
/// How long a duplicate waits for the first request's answer.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(30);
const MAX_KEY_LEN: usize = 255;
/// The largest answer kept for a replay: POST answers are one resource,
/// which may echo a whole request body (2 MiB) and a little more. A larger
/// one is kept as its status with a note (see [`remember`]).
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// The middleware. Requests other than POST, and POSTs without the
/// header, pass through untouched.
pub async fn idempotent(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(HEADER).cloned() else {
        return next.run(req).await;
    };
    match run_once(&state, key, req, next).await {
        Ok(response) | Err(response) => response,
    }
}

/// Claims the key, or answers from it; runs the request when claimed.
async fn run_once(
    state: &AppState,
    key: HeaderValue,
    req: Request,
    next: Next,
) -> Result<Response, Response> {
    let key = check_key(&key).map_err(IntoResponse::into_response)?;
    let caller = caller_of(&req);
    let (parts, body) = req.into_parts();
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), &())
        .await
        .map_err(|e| super::error::body_error(e).into_response())?;
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let hash = sha256_hex(&[
        parts.method.as_str().as_bytes(),
        b" ",
        target.as_bytes(),
        b"\n",
        &bytes,
    ]);
    let made = match settle(state, &caller, &key, &hash)
        .await
        .map_err(IntoResponse::into_response)?
    {
        Settled::Ours(made) => made,
        Settled::Answered(answer) => return Ok(answer),
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let claim = Claimed {
        caller: &caller,
        key: &key,
        made,
    };
    Ok(remember(state, &claim, response).await)
}

/// 1 to 255 visible ASCII characters (UUIDs, ULIDs, anything printable).
fn check_key(value: &HeaderValue) -> ApiResult<String> {
    let key = value.to_str().unwrap_or_default();
    let printable = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_KEY_LEN || !printable {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters (a UUID works)"
            ),
        ));
    }
    Ok(key.to_owned())
}

/// Whose key it is: the SHA-256 of the bearer token, or of the console
/// session's (the token itself is never stored); the empty string with
/// neither (the open loopback mode). Keys are answered before the route's
/// scope is checked, so callers must never share them: every session was
/// once the empty caller, and a reader replaying an admin's key and body
/// was given the admin's answer.
fn caller_of(req: &Request) -> String {
    let headers = req.headers();
    // As `access::auth` reads it: the token alone (`Bearer X`, `bearer X`
    // and `Bearer  X` are one caller: the whole header was hashed, and a
    // retry written another way ran the change again); an `Authorization`
    // that is not a bearer token (a proxy's Basic, the same for everyone)
    // names no caller.
    let token = access::bearer(req);
    if !token.is_empty() {
        return sha256_hex(&[b"Bearer ", token.as_bytes()]);
    }
    access::session_token(headers).map_or_else(String::new, |session| {
        sha256_hex(&[b"console session\n", session.as_bytes()])
    })
}

/// What [`settle`] found.
enum Settled {
    /// The key is ours (claimed at this time): run the request.
    Ours(chrono::DateTime<Utc>),
    /// The stored answer.
    Answered(Response),
}

async fn settle(state: &AppState, caller: &str, key: &str, hash: &str) -> ApiResult<Settled> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    loop {
        let row = match idempotency::claim(&state.db, caller, key, hash).await? {
            Claim::Claimed(made) => return Ok(Settled::Ours(made)),
            Claim::Taken(row) => row,
        };
        let now = labelsync::clock::now();
        let age = (now - row.created_at).to_std().unwrap_or_default();
        if age >= KEEP {
            forget_row(state, &row).await?;
            continue;
        }
        // An abandoned claim is forgotten before it is compared: the
        // request that made it may never have run, so it does not hold
        // the key against another (that was a 422 until the claim aged a
        // day).
        if row.status.is_none() && age >= ABANDONED_AFTER {
            forget_row(state, &row).await?;
            continue;
        }
        if row.request_hash != hash {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request (another method, path or body); use a new key for a new request",
            ));
        }
        if let Some(status) = row.status {
            return Ok(Settled::Answered(replay(
                status,
                row.response.unwrap_or_default(),
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_progress",
                "a request with this Idempotency-Key is still being answered; send it again later",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes an expired or abandoned key's row, unless it was claimed anew
/// since it was read (then its `created_at` is another).
async fn forget_row(
    state: &AppState,
    row: &labelsync::db::entities::idempotency_key::Model,
) -> ApiResult<()> {
    idempotency::let_go(&state.db, &row.caller, &row.key, row.created_at).await?;
    Ok(())
}

/// The first answer, again, marked as a replay.
fn replay(status: i32, body: String) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// What is kept of an answer larger than [`MAX_ANSWER_BYTES`]: a replay
/// gets the first status and this note, with the resource's `Location`
/// when the answer had one.
fn too_large_to_keep(parts: &axum::http::response::Parts) -> String {
    let location = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok());
    serde_json::json!({
        "replayed": true,
        "note": "the first answer was too large to keep for a replay; read the resource to see it",
        "location": location,
    })
    .to_string()
}

/// The answer as kept: a `secret` shown once (a new token's or webhook's)
/// is kept as null, so no secret is stored; a replay shows the resource
/// without it.
fn without_secret(bytes: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(mut answer)) if answer.contains_key("secret") => {
            answer.insert("secret".into(), serde_json::Value::Null);
            serde_json::Value::Object(answer).to_string()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// A key this request claimed: whose, which, and when (the claim's
/// `created_at`, which tells it from a claim made since by another
/// request, or by a retry of this one, once this one was taken for
/// abandoned).
#[derive(Clone, Copy)]
struct Claimed<'a> {
    caller: &'a str,
    key: &'a str,
    made: chrono::DateTime<Utc>,
}

/// Stores the answer under the key, except server-side failures (5xx) and
/// 429: the key is let go so a retry runs the request again.
/// The answer is the handler's own, already in memory, so it is read
/// whole: a change that was made is never answered as a failure (a retry
/// would make it again). One too large to keep is kept as its status and a
/// note that says where the resource is read.
async fn remember(state: &AppState, claim: &Claimed<'_>, response: Response) -> Response {
    let Claimed { caller, key, made } = *claim;
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(err) => {
            // The handler's body failed mid-way: nothing was answered.
            tracing::warn!(error = %err, "an answer could not be read for its Idempotency-Key");
            let _ = idempotency::let_go(&state.db, caller, key, made).await;
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
            .into_response();
        }
    };
    let status = parts.status;
    let stored = if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        idempotency::let_go(&state.db, caller, key, made).await
    } else {
        let text = if bytes.len() > MAX_ANSWER_BYTES {
            too_large_to_keep(&parts)
        } else {
            without_secret(&bytes)
        };
        idempotency::complete(&state.db, caller, key, made, (status.as_u16(), &text)).await
    };
    if let Err(err) = stored {
        // The answer still goes out; the claim is treated as abandoned later.
        tracing::warn!(error = %err, "could not store the answer of an Idempotency-Key");
    }
    Response::from_parts(parts, Body::from(bytes))
}
