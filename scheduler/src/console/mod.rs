//! The ops console at `/ui/`: server-rendered pages (maud) for the people
//! who run the fleet, with a small script for live counters (the API's
//! Server-Sent Events) and actions. Every action is a call of the public API
//! (`/api/v1`), so the page has no back door: the session cookie set by
//! `/ui/login` holds the caller's token (HttpOnly, SameSite=Strict, Secure
//! behind TLS), and the API takes it with the page's CSRF token
//! (`api::access`). Reads are rendered from the database with the caller's
//! scope and projects, as the API would answer them.
mod charts;
mod layout;
mod pages;
mod progress;

use axum::{
    Form, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::Deserialize;

use crate::api::{
    AppState, Caller,
    access::{self, Need, SESSION_COOKIE},
};

/// The console's routes, all under `/ui` (`/ui` and `/ui/` are the
/// overview).
pub fn router(state: AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route("/ui/runs", get(pages::runs))
        .route("/ui/runs/{id}", get(pages::run))
        .route("/ui/storages", get(pages::storages))
        .route("/ui/storages/{id}", get(pages::storage))
        // Innermost first: a page view counts against its caller's rate,
        // as the API's calls do (each overview costs several queries).
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::api::rate_limit::limit,
        ))
        .route_layer(middleware::from_fn_with_state(state, session));
    Router::new()
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/static/console.css", get(css))
        .route("/ui/static/console.js", get(js))
        .merge(pages)
        .layer(middleware::from_fn(security_headers))
}

/// Who is looking, and what they may do: put in the extensions of every
/// page request by [`session`].
#[derive(Clone)]
pub struct Viewer {
    pub caller: Caller,
    /// The CSRF token the page's actions send (empty in the open mode).
    pub csrf: String,
}

impl Viewer {
    /// Whether the caller's scope covers `need` (buttons are shown only
    /// then; the API checks again).
    pub fn may(&self, need: Need) -> bool {
        need.allows(self.caller.scope, self.caller.projects().is_some())
    }
}

/// Finds the caller from the session cookie (or the open mode); a page
/// asked without a valid session goes to the login form.
async fn session(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = access::session_token(req.headers())
        .unwrap_or_default()
        .to_owned();
    // Every scope sees the console; what it shows and offers follows the
    // scope (no task data, and no buttons the API would refuse).
    match access::caller_of(&state, &token, req.headers()).await {
        Ok(caller) => {
            let csrf = if token.is_empty() {
                String::new()
            } else {
                access::csrf_of(&token)
            };
            // The rate limiter counts by the caller, as for the API.
            req.extensions_mut().insert(caller.clone());
            req.extensions_mut().insert(Viewer { caller, csrf });
            next.run(req).await
        }
        Err(_) => Redirect::to("/ui/login").into_response(),
    }
}

/// `GET /ui/login`.
async fn login_form() -> Response {
    layout::login(None)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /ui/login`: a token the API accepts becomes the session. Not
/// from a form of another site, which could log a user in under a token of
/// its own (and read what they then enter).
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if access::from_elsewhere(&headers) {
        return from_another_site();
    }
    let token = form.token.trim();
    // A cookie value cannot hold these: the session would be cut at the
    // first one, and every page would send the user back here.
    if token.bytes().any(|b| b";,\"\\".contains(&b)) {
        return layout::login(Some(
            "That token holds a character a session cookie cannot (; , \" or \\): use it as a bearer token with the API, or log in with another.",
        ));
    }
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_graphic())
        && access::caller_of(&state, token, &headers).await.is_ok();
    if !valid {
        return layout::login(Some(
            "That token is not valid (or has expired or been revoked).",
        ));
    }
    let secure = if behind_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    with_cookie(Redirect::to("/ui/").into_response(), &cookie)
}

/// `POST /ui/logout`: forgets the session cookie (not for another site).
async fn logout(headers: HeaderMap) -> Response {
    if access::from_elsewhere(&headers) {
        return from_another_site();
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    with_cookie(Redirect::to("/ui/login").into_response(), &cookie)
}

/// A login or logout form sent from another site: 403, nothing set.
fn from_another_site() -> Response {
    let mut response = layout::login(Some(
        "A login or logout from another site is refused: use this form.",
    ));
    *response.status_mut() = axum::http::StatusCode::FORBIDDEN;
    response
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// TLS is terminated in front of labelsync: the proxy says so.
fn behind_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// No inline script or style, no framing, no referrer: what the pages need
/// and nothing else.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
