//! The frame every console page shares, the login form and error pages.
use axum::{
    http::StatusCode,
    response::{Html, IntoResponse, Response},
};
use maud::{DOCTYPE, Markup, html};

use super::Viewer;

/// A whole page: header with navigation and the caller, then `body`.
pub fn page(title: &str, viewer: &Viewer, body: Markup) -> Response {
    let extra = html! {
        meta name="csrf-token" content=(viewer.csrf);
        script src="/ui/static/console.js" defer {}
    };
    let markup = document(
        title,
        extra,
        html! {
                    header {
                        span.brand { "labelsync" }
                        nav aria-label="Console" {
                            a href="/ui/" { "Overview" }
                            a href="/ui/runs" { "Runs" }
                            a href="/ui/storages" { "Storages" }
                        }
                        span.who {
                            (viewer.caller.name) " (" (viewer.caller.scope.as_str()) ")"
                        }
                        @if !viewer.csrf.is_empty() {
                            form method="post" action="/ui/logout" {
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        div #flash role="status" aria-live="polite" {}
                        (body)
                    }
        },
    );
    (StatusCode::OK, markup).into_response()
}

/// The document around every console page: its head (the stylesheet, and
/// `head` for what one page adds) and `body`.
fn document(title: &str, head: Markup, body: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · labelsync" }
                link rel="stylesheet" href="/ui/static/console.css";
                (head)
            }
            body { (body) }
        }
    };
    Html(markup.into_string())
}

/// The login form, with `problem` when a token was refused.
pub fn login(problem: Option<&str>) -> Response {
    let status = if problem.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let markup = document(
        "Log in",
        html! {},
        html! {
                    main {
                        form.login method="post" action="/ui/login" {
                            h1 { "labelsync console" }
                            @if let Some(problem) = problem {
                                p.status-failed role="alert" { (problem) }
                            }
                            label for="token" { "API token" }
                            input #token type="password" name="token" autocomplete="off" required;
                            button type="submit" { "Log in" }
                            p.muted { "The token is kept in an HttpOnly cookie for this browser session." }
                        }
                    }
        },
    );
    (status, markup).into_response()
}

/// A page that says what went wrong (the caller may have no session).
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let markup = document(
        &status.as_u16().to_string(),
        html! {},
        html! {
            main {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or_default()) }
                p { (message) }
                p { a href="/ui/" { "Back to the overview" } }
            }
        },
    );
    (status, markup).into_response()
}
