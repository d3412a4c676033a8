//! Who may call what (docs/API.md, "Tokens and scopes").
//!
//! [`auth`] finds the caller: a bootstrap token (`LABELSYNC_API_TOKENS`,
//! admin of everything), a token of the database (looked up by the hash of
//! its secret on every request, so a revocation holds at once on every
//! replica), or, with no token anywhere, the open loopback mode. [`ROUTES`]
//! declares each route's [`Need`] in one place and [`check_scope`] enforces
//! it after routing. What a project-restricted token may see inside a route
//! is the handlers' part, through [`Caller::check`]: another project's
//! resource answers exactly as a missing one (404), so nothing can be
//! enumerated.
use std::sync::{Arc, Mutex};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use labelsync::{
    db::tokens,
    security::tokens::{self as secrets, Scope},
};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// What a route asks of the caller's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any caller let in (the API's own description).
    Any,
    /// Task data, annotations, storage configs: admin, write, read.
    Read,
    /// Changing them: admin, write.
    Write,
    /// Creating a project: admin, or a write token not held to projects
    /// (a restricted token could not see what it made).
    Create,
    /// Runs and their progress: every scope.
    Observe,
    /// Acting on runs (sync now, validate, cancel): admin, write, ops.
    Act,
    /// The fleet's queues and workers: admin, ops, not held to projects
    /// (they hold every project's jobs and runs).
    Fleet,
    /// Tokens and the audit trail.
    Admin,
}

impl Need {
    pub fn allows(self, scope: Scope, restricted: bool) -> bool {
        use Scope::{Admin, Ops, Read, Write};
        match self {
            Need::Any | Need::Observe => true,
            Need::Read => matches!(scope, Admin | Write | Read),
            Need::Write => matches!(scope, Admin | Write),
            Need::Create => matches!(scope, Admin | Write) && !restricted,
            Need::Act => matches!(scope, Admin | Write | Ops),
            Need::Fleet => matches!(scope, Admin | Ops) && !restricted,
            Need::Admin => scope == Admin,
        }
    }
}

/// Every route of `/api/v1` with its method and need; a route missing here
/// is refused to everyone (a test checks the OpenAPI document's operations
/// against this table).
pub const ROUTES: &[(&str, &str, Need)] = &[
    ("POST", "/projects", Need::Create),
    ("GET", "/projects", Need::Observe),
    ("GET", "/projects/{id}", Need::Observe),
    ("PATCH", "/projects/{id}", Need::Write),
    ("DELETE", "/projects/{id}", Need::Write),
    ("GET", "/projects/{id}/tasks", Need::Read),
    ("POST", "/storages", Need::Write),
    ("GET", "/storages", Need::Read),
    ("POST", "/storages/validate", Need::Write),
    ("GET", "/storages/{id}", Need::Read),
    ("PATCH", "/storages/{id}", Need::Write),
    ("DELETE", "/storages/{id}", Need::Write),
    ("POST", "/storages/{id}/validate", Need::Act),
    ("GET", "/storages/{id}/preview", Need::Read),
    ("POST", "/storages/{id}/sync", Need::Act),
    ("POST", "/storages/{id}/pause", Need::Act),
    ("POST", "/storages/{id}/resume", Need::Act),
    ("GET", "/runs", Need::Observe),
    ("GET", "/runs/{id}", Need::Observe),
    ("GET", "/runs/{id}/errors", Need::Observe),
    ("POST", "/runs/{id}/cancel", Need::Act),
    ("POST", "/runs/{id}/retry", Need::Act),
    ("GET", "/runs/{id}/events", Need::Observe),
    ("GET", "/events", Need::Observe),
    ("GET", "/tasks/{id}", Need::Read),
    ("GET", "/tasks/{id}/annotations", Need::Read),
    ("POST", "/tasks/{id}/annotations", Need::Write),
    ("GET", "/annotations/{id}", Need::Read),
    ("PATCH", "/annotations/{id}", Need::Write),
    ("DELETE", "/annotations/{id}", Need::Write),
    ("POST", "/webhooks", Need::Write),
    ("GET", "/webhooks", Need::Read),
    ("GET", "/webhooks/{id}", Need::Read),
    ("PATCH", "/webhooks/{id}", Need::Write),
    ("DELETE", "/webhooks/{id}", Need::Write),
    ("POST", "/webhooks/{id}/test", Need::Write),
    ("GET", "/webhooks/{id}/deliveries", Need::Read),
    ("GET", "/webhooks/{id}/deliveries/{delivery_id}", Need::Read),
    (
        "POST",
        "/webhooks/{id}/deliveries/{delivery_id}/redeliver",
        Need::Write,
    ),
    ("GET", "/queues", Need::Fleet),
    ("POST", "/queues/dead/requeue", Need::Fleet),
    ("POST", "/queues/dead/discard", Need::Fleet),
    ("GET", "/workers", Need::Fleet),
    ("GET", "/resolve", Need::Read),
    ("GET", "/openapi.json", Need::Any),
    ("POST", "/tokens", Need::Admin),
    ("GET", "/tokens", Need::Admin),
    ("GET", "/tokens/{id}", Need::Admin),
    ("DELETE", "/tokens/{id}", Need::Admin),
    ("GET", "/audit", Need::Admin),
];

/// The need of `method` on `route` (a template relative to `/api/v1`).
pub fn need_of(method: &Method, route: &str) -> Option<Need> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
        .map(|(_, _, need)| *need)
}

/// The name of the caller of the open loopback mode, and of a bootstrap
/// token's (in audit rows).
pub const OPEN: &str = "open";
pub const BOOTSTRAP: &str = "bootstrap";

/// The caller of a request, put in its extensions by [`auth`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` for a bootstrap token and the open mode.
    pub token_id: Option<i64>,
    pub name: String,
    /// Who this is for per-caller limits (rate, streams, downloads): a
    /// database token's id, a bootstrap token's hash (each bootstrap token
    /// its own caller, by header or console session alike), or the open
    /// mode's one caller.
    pub key: String,
    pub scope: Scope,
    /// `None`: every project.
    projects: Option<Arc<[i64]>>,
    /// What the handler touched, for the audit row.
    note: Arc<Mutex<Note>>,
}

/// What the audit layer and the handler share about one request: the
/// project and resource ids it touched, the row the layer drafted before
/// the handler ran, and whether the handler already wrote it in its own
/// transaction.
#[derive(Debug, Default, Clone)]
pub struct Note {
    pub project_id: Option<i64>,
    pub ids: Map<String, Value>,
    pub draft: Option<labelsync::db::audit::Entry>,
    pub written: bool,
}

impl Caller {
    fn new(token_id: Option<i64>, name: &str, scope: Scope, projects: Option<Vec<i64>>) -> Self {
        let key = match token_id {
            Some(id) => format!("token:{id}"),
            None => name.to_owned(),
        };
        Caller {
            token_id,
            name: name.to_owned(),
            key,
            scope,
            projects: projects.map(Arc::from),
            note: Arc::default(),
        }
    }

    /// A bootstrap token's caller: admin, keyed by the token's hash (each
    /// bootstrap token its own caller).
    fn bootstrap(given: &str) -> Self {
        let hash = labelsync::security::sha256_hex(&[given.as_bytes()]);
        Caller {
            key: format!("bootstrap:{hash}"),
            ..Caller::new(None, BOOTSTRAP, Scope::Admin, None)
        }
    }

    /// The projects the caller is held to (`None`: all).
    pub fn projects(&self) -> Option<&[i64]> {
        self.projects.as_deref()
    }

    pub fn sees(&self, project_id: i64) -> bool {
        self.projects().is_none_or(|ids| ids.contains(&project_id))
    }

    /// `Ok` when the caller may touch `project_id`, else the answer for a
    /// resource that does not exist (`hidden`), so another project's ids
    /// cannot be told from missing ones. Notes the project for the audit.
    pub fn check(
        &self,
        project_id: i64,
        hidden: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        if !self.sees(project_id) {
            return Err(hidden());
        }
        self.lock_note().project_id.get_or_insert(project_id);
        Ok(())
    }

    /// Records a resource id the request named or created (audit rows).
    pub fn note(&self, key: &str, id: impl Into<Value>) {
        self.lock_note().ids.insert(key.to_owned(), id.into());
    }

    pub fn noted(&self) -> Note {
        self.lock_note().clone()
    }

    /// Lends the audit layer's draft row to the handler (see `audit::write_in`).
    pub fn set_draft(&self, draft: labelsync::db::audit::Entry) {
        self.lock_note().draft = Some(draft);
    }

    /// The handler's transaction holding the audit row has committed: the
    /// layer writes none.
    pub fn audited(&self) {
        self.lock_note().written = true;
    }

    fn lock_note(&self) -> std::sync::MutexGuard<'_, Note> {
        self.note.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bearer token of a request ("" when there is none).
pub fn bearer(req: &Request) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim())
}

/// Finds the caller and puts it in the request's extensions; 401 when a
/// token is needed and the request has no valid one. Without an
/// `Authorization` header the ops console's session cookie is read instead
/// (the console's actions are calls of this API): then a request that
/// changes something must carry the session's CSRF token
/// (`X-CSRF-Token`). A change a browser sends from another site
/// (`Sec-Fetch-Site: cross-site`) is refused whatever it carries, and in
/// the open mode one from any other origin.
pub async fn auth(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes && cross_site(&req) {
        return Err(forbidden(
            "a browser on another site cannot change anything here",
        ));
    }
    let from_header = bearer(&req);
    let caller = if from_header.is_empty()
        && let Some(session) = session_token(req.headers())
    {
        if changes && !csrf_holds(req.headers(), session) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "a change made with the console's session needs its X-CSRF-Token header",
            ));
        }
        caller_of(&state, session, req.headers()).await?
    } else {
        caller_of(&state, from_header, req.headers()).await?
    };
    // The open mode has no credential a page must hold: any page of this
    // machine (another port of localhost) could change things otherwise.
    if changes && caller.name == OPEN && from_elsewhere(req.headers()) {
        return Err(forbidden(
            "with no token made yet, a browser page of another origin cannot change anything here",
        ));
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The console's session cookie: the caller's token, HttpOnly and
/// SameSite=Strict (set by `/ui/login`).
pub const SESSION_COOKIE: &str = "labelsync_session";
/// The session cookie's name behind TLS: a browser takes a `__Host-`
/// cookie only from this very host, `Secure`, for `Path=/`, so another
/// site of the same domain (or a network attacker on plain HTTP) cannot
/// set one to shadow the user's session with its own.
pub const SECURE_SESSION_COOKIE: &str = "__Host-labelsync_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// TLS is terminated in front of labelsync: the proxy says so, in
/// `X-Forwarded-Proto` or `Forwarded` (RFC 7239). Their first entry is the
/// client's side (each proxy on the way appends its own): `https, http`
/// came over TLS (it was read as plain, and the token's cookie went out
/// without `Secure`).
pub fn behind_tls(headers: &header::HeaderMap) -> bool {
    let first = |name: &str| {
        let value = headers.get(name)?.to_str().ok()?;
        Some(value.split(',').next()?.trim().to_owned())
    };
    let forwarded_proto = first("forwarded").and_then(|entry| {
        entry.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            key.eq_ignore_ascii_case("proto")
                .then(|| value.trim_matches('"').to_owned())
        })
    });
    [first("x-forwarded-proto"), forwarded_proto]
        .iter()
        .flatten()
        .any(|proto| proto.eq_ignore_ascii_case("https"))
}

/// The token in the request's session cookie, if any: behind TLS
/// ([`behind_tls`]) the `__Host-` one only (a plain one there may be
/// another site's of the domain, set for `/ui` before the user logged
/// in, or after they logged out); else the plain one, and two of those
/// (one set for a longer path by another site, sent first) are no
/// session, not the first one's.
pub fn session_token(headers: &header::HeaderMap) -> Option<&str> {
    let named = |wanted: &'static str| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(move |(name, _)| *name == wanted)
            .map(|(_, value)| value)
    };
    let wanted = if behind_tls(headers) {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    };
    let mut found = named(wanted);
    match (found.next(), found.next()) {
        (Some(value), None) => Some(value).filter(|value| !value.is_empty()),
        _ => None,
    }
}

/// The CSRF token of a session: derived from its token, so only a page that
/// was given it (the console's, same origin) can send it; the same on
/// every replica.
pub fn csrf_of(session: &str) -> String {
    labelsync::security::sha256_hex(&[b"labelsync-console-csrf\n", session.as_bytes()])
}

fn csrf_holds(headers: &header::HeaderMap, session: &str) -> bool {
    let given = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    bool::from(same_secret(given.as_bytes(), csrf_of(session).as_bytes()))
}

/// Whether a request was sent by a page of any other origin: another site
/// or a sibling name of this one (another port of localhost), as
/// `Sec-Fetch-Site` says; from a browser too old to send it, an `Origin`
/// that is not this server's `Host` (not compared otherwise: a proxy may
/// rewrite `Host`). A client that sends neither is taken at its word.
pub fn from_elsewhere(headers: &header::HeaderMap) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        return !matches!(site, "same-origin" | "none");
    }
    text(header::ORIGIN).is_some_and(|origin| {
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        authority.is_none() || authority != text(header::HOST)
    })
}

/// Whether a browser says the request comes from another site.
pub fn cross_site(req: &Request) -> bool {
    req.headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
}

/// The caller a token (or no token: "") stands for, in a request with
/// `headers`; 401 when a token is needed and this one is not valid now.
pub async fn caller_of(
    state: &AppState,
    given: &str,
    headers: &header::HeaderMap,
) -> Result<Caller, ApiError> {
    if !given.is_empty() {
        if bootstrap(&state.settings.api_tokens, given) {
            return Ok(Caller::bootstrap(given));
        }
        if let Some(caller) = stored(state, given).await? {
            return Ok(caller);
        }
    }
    // Open only while no token was ever made (loopback, checked at start).
    if open_mode(state).await? {
        if !addressed_to_loopback(headers) {
            return Err(forbidden(
                "with no token made yet the server answers only requests addressed to \
                 localhost, 127.0.0.1 or [::1] (Host); make a token to use another name",
            ));
        }
        return Ok(Caller::new(None, OPEN, Scope::Admin, None));
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing, invalid, expired or revoked bearer token (Authorization: Bearer <token>)",
    ))
}

/// Whether the API is open: no token configured and none ever made. Once
/// one is made it stays so (revoking does not open the API again), so the
/// answer is kept from then on: a request with no token costs no query.
async fn open_mode(state: &AppState) -> Result<bool, ApiError> {
    use std::sync::atomic::Ordering;
    if !state.settings.api_tokens.is_empty() || state.tokens_made.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let made = tokens::any_made(&state.db).await?;
    if made {
        // Only ever set: an older, slower look must not clear it.
        state.tokens_made.store(true, Ordering::Relaxed);
    }
    Ok(!made)
}

/// Whether the request's `Host` names this machine's loopback. The open
/// mode listens only there, but a page of another site can have its own
/// name resolve to 127.0.0.1 (DNS rebinding) and then call the API as the
/// same origin: its requests still say their site's name in `Host`.
fn addressed_to_loopback(headers: &header::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // The name without its port: `[::1]:8080`, `localhost:8080`, `127.0.0.1`.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(inside, _)| inside),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a caller let in earlier may still be served (a long stream asks
/// again from time to time): a database token revoked or expired since is
/// not. `None` when the lookup failed: the caller decides how long it
/// goes on without an answer.
pub async fn still_valid(state: &AppState, caller: &Caller) -> Option<bool> {
    let Some(id) = caller.token_id else {
        return Some(true);
    };
    match tokens::find(&state.db, id).await {
        Ok(Some(token)) => Some(
            token.revoked_at.is_none()
                && token
                    .expires_at
                    .is_none_or(|at| at > labelsync::clock::now()),
        ),
        Ok(None) => Some(false),
        Err(_) => None,
    }
}

/// Whether `given` is one of the configured tokens, in constant time
/// against every one of them.
fn bootstrap(configured: &[labelsync::config::Secret], given: &str) -> bool {
    let mut ok = subtle::Choice::from(0);
    for token in configured {
        ok |= same_secret(given.as_bytes(), token.expose().as_bytes());
    }
    bool::from(ok)
}

/// The database's token with this secret, when usable now.
async fn stored(state: &AppState, given: &str) -> Result<Option<Caller>, ApiError> {
    if !secrets::well_formed(given) {
        return Ok(None);
    }
    let now = labelsync::clock::now();
    let hash = secrets::hash(given);
    let Some(token) = tokens::usable(&state.db, &hash, now).await? else {
        return Ok(None);
    };
    // The index found it; the comparison that decides is constant-time.
    if !bool::from(same_secret(hash.as_bytes(), token.secret_hash.as_bytes())) {
        return Ok(None);
    }
    let Some(scope) = tokens::scope_of(&token) else {
        return Ok(None);
    };
    tokens::touch(&state.db, &token, now).await?;
    Ok(Some(Caller::new(
        Some(token.id),
        &token.name,
        scope,
        tokens::projects_of(&token),
    )))
}

/// Compares in time that depends only on the expected value's length, not
/// on where the given one differs (nor on its length).
fn same_secret(given: &[u8], expected: &[u8]) -> subtle::Choice {
    let mut same = (given.len() as u64).ct_eq(&(expected.len() as u64));
    for (i, byte) in expected.iter().enumerate() {
        same &= given.get(i).copied().unwrap_or(0).ct_eq(byte);
    }
    same
}

/// The route's template relative to `/api/v1`.
pub fn route_of(req: &Request) -> String {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    matched
        .strip_prefix(super::PREFIX)
        .unwrap_or(matched)
        .to_owned()
}

/// After routing: 403 when the caller's scope does not cover the route.
pub async fn check_scope(req: Request, next: Next) -> Result<Response, ApiError> {
    let route = route_of(&req);
    let caller = req
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| ApiError::from(labelsync::Error::Internal("no caller".into())))?;
    let restricted = caller.projects().is_some();
    match need_of(req.method(), &route) {
        Some(need) if need.allows(caller.scope, restricted) => Ok(next.run(req).await),
        Some(Need::Create) if restricted => Err(forbidden(
            "a token held to some projects cannot create projects; use an unrestricted write or admin token",
        )),
        Some(_) => Err(forbidden(format!(
            "a {} token cannot {} {route}",
            caller.scope.as_str(),
            req.method()
        ))),
        // A method the route does not take (or a route missing from the
        // table: refused all the same, before any handler runs).
        None => Ok(not_allowed(req.method(), &route)),
    }
}

/// 405 with the API's error body and an `Allow` header from [`ROUTES`].
fn not_allowed(method: &Method, route: &str) -> Response {
    let allow: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, r, _)| *r == route)
        .map(|(m, _, _)| *m)
        .collect();
    let mut response = super::method_not_allowed_error(method).into_response();
    if let Ok(value) = header::HeaderValue::from_str(&allow.join(", ")) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        let with_host = |host: &str| {
            let mut headers = header::HeaderMap::new();
            headers.insert(header::HOST, host.parse().expect("a header value"));
            addressed_to_loopback(&headers)
        };
        for host in [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1:80",
            "127.9.9.9",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(with_host(host), "{host}");
        }
        for host in [
            "rebind.example:8080",
            "localhost.example",
            "127.0.0.1.example:80",
            "10.0.0.1",
            "[::2]:80",
            "",
        ] {
            assert!(!with_host(host), "{host}");
        }
        assert!(!addressed_to_loopback(&header::HeaderMap::new()), "no Host");
    }

    #[test]
    fn scopes_nest_as_documented() {
        for (method, route, need) in ROUTES {
            assert!(need.allows(Scope::Admin, false), "{method} {route}");
            if need.allows(Scope::Write, false) && *need != Need::Create {
                assert!(need.allows(Scope::Write, true), "{method} {route}");
            }
            if need.allows(Scope::Read, false) {
                assert!(
                    *method == "GET" || *need == Need::Any,
                    "read is GET only: {method} {route}"
                );
            }
        }
        assert!(
            !Need::Read.allows(Scope::Ops, false),
            "ops sees no task data"
        );
        assert!(!Need::Admin.allows(Scope::Write, false));
        assert_eq!(need_of(&Method::HEAD, "/runs"), Some(Need::Observe));
        assert_eq!(need_of(&Method::PUT, "/runs"), None);
    }

    #[test]
    fn bootstrap_tokens_match_exactly() {
        let configured = vec![labelsync::config::Secret::new("s3cret-token")];
        assert!(bootstrap(&configured, "s3cret-token"));
        assert!(!bootstrap(&configured, "s3cret-toke"));
        assert!(!bootstrap(&configured, "s3cret-token2"));
        assert!(!bootstrap(&[], ""));
    }
}
