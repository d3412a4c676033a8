//! The ops console at `/ui/`: server-rendered pages (maud) for the people
//! who run the fleet, with a small script for live counters (the API's
//! Server-Sent Events) and actions. Every action is a call of the public API
//! (`/api/v1`), so the page has no back door: the session cookie set by
//! `/ui/login` holds the caller's token (HttpOnly, SameSite=Strict, and
//! behind TLS Secure and `__Host-`), and the API takes it with the page's CSRF token
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
    access::{self, Need, SECURE_SESSION_COOKIE, SESSION_COOKIE},
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
        .layer(middleware::from_fn(refuse_nul_in_url))
        .layer(middleware::from_fn(security_headers))
}

/// A path or query holding a percent-encoded NUL is a 400 page, as the
/// API's is (a filter holding one read as "No runs.": the database refused
/// the query and the page said nothing of it).
async fn refuse_nul_in_url(req: Request, next: Next) -> Response {
    if crate::api::has_nul_in_url(req.uri()) {
        return layout::error_page(
            axum::http::StatusCode::BAD_REQUEST,
            "The address holds a NUL character (%00), which nothing stored can contain.",
        );
    }
    next.run(req).await
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
/// asked without a valid session goes to the login form, and one whose
/// session could not be checked (the database did not answer) is an error
/// page saying so: it went to the login form too, which then called the
/// token revoked.
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
        Err(refused) if refused.status.is_client_error() => {
            Redirect::to("/ui/login").into_response()
        }
        Err(failed) => layout::error_page(failed.status, &failed.message),
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
    let not_valid = || {
        layout::login(Some(
            "That token is not valid (or has expired or been revoked).",
        ))
    };
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return not_valid();
    }
    match access::caller_of(&state, token, &headers).await {
        Ok(_) => {}
        // The database did not answer: the token may well be good.
        Err(failed) if failed.status.is_server_error() => {
            return layout::error_page(failed.status, &failed.message);
        }
        Err(_) => return not_valid(),
    }
    // Behind TLS the cookie is `Secure` (it carries the token) and
    // `__Host-` (no other site of the domain can shadow it).
    let cookie = match access::behind_tls(&headers) {
        true => {
            format!("{SECURE_SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Secure")
        }
        false => format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
    };
    with_cookies(Redirect::to("/ui/").into_response(), &[&cookie])
}

/// `POST /ui/logout`: forgets the session cookies (not for another site).
async fn logout(headers: HeaderMap) -> Response {
    if access::from_elsewhere(&headers) {
        return from_another_site();
    }
    let plain = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    let secure =
        format!("{SECURE_SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Secure; Max-Age=0");
    with_cookies(
        Redirect::to("/ui/login").into_response(),
        &[&plain, &secure],
    )
}

/// A login or logout form sent from another site: 403, nothing set.
fn from_another_site() -> Response {
    let mut response = layout::login(Some(
        "A login or logout from another site is refused: use this form.",
    ));
    *response.status_mut() = axum::http::StatusCode::FORBIDDEN;
    response
}

fn with_cookies(mut response: Response, cookies: &[&str]) -> Response {
    for cookie in cookies {
        if let Ok(value) = HeaderValue::from_str(cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
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
    // Pages show settings, keys and errors: not kept by the browser after
    // a logout (its back button) or by a cache on the way. Assets say
    // their own.
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}
