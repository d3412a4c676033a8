//! The ops console at `/ui/` (a module of the `api` test binary): pages
//! render what a caller may see, actions are calls of the API carried by
//! the session cookie and refused without the page's CSRF token, read-only
//! tokens get no buttons.
#![allow(clippy::unwrap_used)]
use labelsync_tests::{AppOptions, TestApp, spawn_app, write_files};
use reqwest::{Method, redirect::Policy};
use serde_json::{Value, json};

const BOOT: &str = "console-bootstrap-token";

/// A client that keeps no cookies and follows no redirects, so each answer
/// is seen as the server gave it.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

async fn api(app: &TestApp, method: Method, path: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .request(method, format!("{}{path}", app.base))
        .bearer_auth(BOOT)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Logs in through the form; returns the session cookie (`name=value`).
async fn log_in(app: &TestApp, token: &str) -> String {
    let resp = client()
        .post(format!("{}/ui/login", app.base))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "a valid token logs in");
    assert_eq!(resp.headers()["location"], "/ui/");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    cookie.split(';').next().unwrap().to_owned()
}

/// A bootstrap token holding `;` (which the API takes as a bearer) is
/// refused at the console's login with why: it logged in, its cookie was
/// cut at the `;`, and every page sent the user back to the login form.
async fn cookie_breaking_tokens_are_refused_at_login(app: &TestApp) {
    // Refused for its characters before it is looked up, valid or not.
    const SEMI: &str = "console;bootstrap";
    let refused = client()
        .post(format!("{}/ui/login", app.base))
        .form(&[("token", SEMI)])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    let page = refused.text().await.unwrap();
    assert!(page.contains("session cookie cannot"), "{page}");
}

async fn page(app: &TestApp, cookie: &str, path: &str) -> (u16, String) {
    let resp = client()
        .get(format!("{}{path}", app.base))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    let start = html
        .find(r#"name="csrf-token" content=""#)
        .expect("csrf meta")
        + 27;
    html[start..start + 64].to_owned()
}

/// Two projects with a synced storage each; returns (project a, storage a,
/// run a, run b).
async fn two_projects(app: &TestApp) -> (i64, i64, String, String) {
    let mut out = Vec::new();
    for dir in ["a", "b"] {
        write_files(&app.doc_root.path().join(dir), 2, "jpg");
        let (_, project) = api(
            app,
            Method::POST,
            "/api/v1/projects",
            json!({ "title": dir }),
        )
        .await;
        let body = json!({ "project_id": project["id"], "role": "source", "backend": "local", "config": { "path": dir } });
        let (_, storage) = api(app, Method::POST, "/api/v1/storages", body).await;
        let path = format!("/api/v1/storages/{}/sync", storage["id"]);
        let (status, started) = api(app, Method::POST, &path, json!({})).await;
        assert_eq!(status, 202, "{started}");
        let run = started["run"]["id"].as_str().unwrap().to_owned();
        app.wait_run(&run, std::time::Duration::from_secs(60)).await;
        out.push((
            project["id"].as_i64().unwrap(),
            storage["id"].as_i64().unwrap(),
            run,
        ));
    }
    (out[0].0, out[0].1, out[0].2.clone(), out[1].2.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_runs_and_acts_through_the_api() {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    let (project_a, storage_a, run_a, run_b) = two_projects(&app).await;

    let (status, _) = page(&app, "", "/ui/").await;
    assert_eq!(status, 303, "no session: to the login form");
    let refused = client()
        .post(format!("{}/ui/login", app.base))
        .form(&[("token", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    cookie_breaking_tokens_are_refused_at_login(&app).await;
    let admin = log_in(&app, BOOT).await;
    let (status, overview) = page(&app, &admin, "/ui/").await;
    assert_eq!(status, 200, "{overview}");
    // Two runs of two objects each ended within the hour: the chart says 4.
    let charted = r#"aria-label="tasks created per minute: 4 in all"#;
    for shown in [
        "Queue",
        "Newest runs",
        run_a.as_str(),
        run_b.as_str(),
        "completed, last hour",
        charted,
        r#"aria-label="runs failed per hour: 0 in all"#,
        r#"aria-label="runs ended per hour: 2 in all"#,
    ] {
        assert!(overview.contains(shown), "overview lacks {shown}");
    }
    let (_, recent) = page(&app, &admin, "/ui/runs?since=1h&status=completed").await;
    assert!(
        recent.contains(&run_a) && recent.contains(r#"<option value="1h" selected>"#),
        "{recent}"
    );
    let (_, run_page) = page(&app, &admin, &format!("/ui/runs/{run_a}")).await;
    assert!(
        run_page.contains(r#"data-counter="created">2<"#),
        "{run_page}"
    );
    assert!(run_page.contains("Objects that failed"));
    assert!(
        overview.contains("Workers") && overview.contains("alive"),
        "the in-process worker"
    );
    let (_, storages) = page(&app, &admin, "/ui/storages").await;
    assert!(
        storages.contains(&format!("/api/v1/storages/{storage_a}/sync")),
        "{storages}"
    );

    // The page's action is the API's route, with the session and its CSRF token.
    let sync = format!("{}/api/v1/storages/{storage_a}/sync", app.base);
    let csrf = csrf_of(&storages);
    let without = client()
        .post(&sync)
        .header("cookie", &admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 403, "no CSRF token");
    let wrong = client()
        .post(&sync)
        .header("cookie", &admin)
        .header("x-csrf-token", "0".repeat(64))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let cross = client()
        .post(&sync)
        .header("cookie", &admin)
        .header("x-csrf-token", &csrf)
        .header("sec-fetch-site", "cross-site")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403, "a change from another site");
    let done = client()
        .post(&sync)
        .header("cookie", &admin)
        .header("x-csrf-token", &csrf)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 202);
    let started: Value = done.json().await.unwrap();
    let rows = api(&app, Method::GET, "/api/v1/audit?limit=1000", Value::Null)
        .await
        .1;
    assert!(
        rows["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["route"] == "/api/v1/storages/{id}/sync" && r["status"] == 202),
        "the console's action is audited like any call: {rows}"
    );
    app.wait_run(
        started["run"]["id"].as_str().unwrap(),
        std::time::Duration::from_secs(60),
    )
    .await;

    // A read-only token held to project a: its runs only, and no buttons.
    let body = json!({ "name": "viewer", "scope": "read", "projects": [project_a] });
    let (_, reader) = api(&app, Method::POST, "/api/v1/tokens", body).await;
    let viewer = log_in(&app, reader["secret"].as_str().unwrap()).await;
    let (_, overview) = page(&app, &viewer, "/ui/").await;
    assert!(
        overview.contains(&run_a) && !overview.contains(&run_b),
        "only its project's runs"
    );
    let (status, _) = page(&app, &viewer, &format!("/ui/runs/{run_b}")).await;
    assert_eq!(status, 404, "another project's run");
    let (_, detail) = page(&app, &viewer, &format!("/ui/storages/{storage_a}")).await;
    assert!(
        detail.contains("Settings") && detail.contains("seconds per run"),
        "{detail}"
    );
    let body = json!({ "name": "watcher", "scope": "ops" });
    let (_, ops) = api(&app, Method::POST, "/api/v1/tokens", body).await;
    let ops = log_in(&app, ops["secret"].as_str().unwrap()).await;
    let (_, detail) = page(&app, &ops, &format!("/ui/storages/{storage_a}")).await;
    assert!(!detail.contains("Settings"), "ops sees no storage config");
    assert!(detail.contains("Sync now"), "ops may act on the fleet");
    let (_, storages) = page(&app, &viewer, "/ui/storages").await;
    assert!(
        !storages.contains("Sync now") && !storages.contains("data-action"),
        "read-only: no actions"
    );

    let logout = client()
        .post(format!("{}/ui/logout", app.base))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    assert!(
        logout.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    app.stop().await;
}

/// A storage's last validation is kept (ok, or what was wrong), shown on
/// its page and in the list, and forgotten when its settings change; the
/// list filters by project and names each storage's project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storages_show_their_last_validation_and_project() {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    let (project_a, storage_a, _, _) = two_projects(&app).await;
    let admin = log_in(&app, BOOT).await;
    let path = format!("/api/v1/storages/{storage_a}");
    let (_, before) = api(&app, Method::GET, &path, Value::Null).await;
    assert_eq!(before["validated_at"], Value::Null, "{before}");
    let (_, detail) = page(&app, &admin, &format!("/ui/storages/{storage_a}")).await;
    assert!(detail.contains(">never<"), "{detail}");

    let validate = format!("{path}/validate");
    let (status, _) = api(&app, Method::POST, &validate, json!({})).await;
    assert_eq!(status, 200);
    let (_, ok) = api(&app, Method::GET, &path, Value::Null).await;
    assert!(ok["validated_at"].is_string(), "{ok}");
    assert_eq!(ok["validation_error"], Value::Null);
    let (_, detail) = page(&app, &admin, &format!("/ui/storages/{storage_a}")).await;
    assert!(detail.contains(r#"class="status-completed""#), "{detail}");

    std::fs::remove_dir_all(app.doc_root.path().join("a")).unwrap();
    let (status, refused) = api(&app, Method::POST, &validate, json!({})).await;
    assert_eq!(status, 422, "{refused}");
    let (_, failed) = api(&app, Method::GET, &path, Value::Null).await;
    assert_eq!(
        failed["validation_error"], refused["error"]["message"],
        "{failed}"
    );
    let (_, detail) = page(&app, &admin, &format!("/ui/storages/{storage_a}")).await;
    let shown = refused["error"]["message"]
        .as_str()
        .unwrap()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    assert!(
        detail.contains(&shown),
        "the page says what was wrong: {detail}"
    );
    let (_, list) = page(
        &app,
        &admin,
        &format!("/ui/storages?project_id={project_a}"),
    )
    .await;
    assert!(list.contains(">failed<") && list.contains(">a<"), "{list}");
    assert_eq!(
        list.matches(r#"href="/ui/storages/"#).count(),
        1,
        "one project's storages: {list}"
    );

    std::fs::create_dir(app.doc_root.path().join("a")).unwrap();
    let (status, patched) = api(&app, Method::PATCH, &path, json!({ "title": "renamed" })).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["validated_at"],
        Value::Null,
        "a check of the old settings says nothing of the new"
    );
    app.stop().await;
}

/// A console session is kept to this server's origin (no login or logout
/// from a page elsewhere) and to its own Idempotency-Keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_keep_to_their_origin_and_their_keys() {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    // A form on another site cannot log the user in under its token.
    let forged = client()
        .post(format!("{}/ui/login", app.base))
        .header("sec-fetch-site", "cross-site")
        .form(&[("token", BOOT)])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none());
    // Nor a sibling name of this site, nor (from an older browser) a page
    // whose Origin is not this server.
    for (name, value) in [
        ("sec-fetch-site", "same-site".to_owned()),
        ("origin", "http://sibling.example".to_owned()),
        ("origin", "null".to_owned()),
    ] {
        let forged = client()
            .post(format!("{}/ui/login", app.base))
            .header(name, &value)
            .form(&[("token", BOOT)])
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 403, "{name}: {value}");
        assert!(forged.headers().get("set-cookie").is_none());
    }

    let admin = log_in(&app, BOOT).await;
    let (_, home) = page(&app, &admin, "/ui/").await;
    let csrf = csrf_of(&home);
    let (_, project) = api(
        &app,
        Method::POST,
        "/api/v1/projects",
        json!({ "title": "a" }),
    )
    .await;
    let body = json!({ "name": "viewer", "scope": "read", "projects": [project["id"]] });
    let (_, reader) = api(&app, Method::POST, "/api/v1/tokens", body).await;
    let viewer = log_in(&app, reader["secret"].as_str().unwrap()).await;
    let (_, overview) = page(&app, &viewer, "/ui/").await;
    // Sessions keep their own Idempotency-Keys: the reader sending the
    // admin's key and body is not answered the admin's stored creation,
    // even behind a proxy that adds one Basic login for everyone.
    let create = |cookie: &str, csrf: &str| {
        client()
            .post(format!("{}/api/v1/projects", app.base))
            .header("authorization", "Basic cHJveHk6cHJveHk=")
            .header("cookie", cookie)
            .header("x-csrf-token", csrf)
            .header("idempotency-key", "console-key-1")
            .json(&json!({ "title": "keyed" }))
    };
    let made = create(&admin, &csrf).send().await.unwrap();
    assert_eq!(made.status(), 201);
    let viewer_csrf = csrf_of(&overview);
    let borrowed = create(&viewer, &viewer_csrf).send().await.unwrap();
    assert!(borrowed.headers().get("idempotent-replayed").is_none());
    assert_eq!(borrowed.status(), 403, "a reader creates nothing");
    let forged = client()
        .post(format!("{}/ui/logout", app.base))
        .header("cookie", &viewer)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403, "a logout from another site");
    assert!(forged.headers().get("set-cookie").is_none());
    app.stop().await;
}

/// Behind TLS (said by the proxy in a list, or in `Forwarded`) the session
/// cookie is `Secure` and `__Host-`: it was sent in clear unless
/// `X-Forwarded-Proto` was exactly `https`, and a plain cookie another
/// site of the domain set for `/ui` shadowed it. Pages are `no-store`; a
/// database that cannot answer is a 5xx page, not an empty list ("No
/// runs.") nor the login form (which then called a good token revoked);
/// a NUL in a filter is a 400 page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_behind_proxies_and_through_outages() {
    use sea_orm::{ConnectionTrait, Database};
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    for (name, value) in [
        ("x-forwarded-proto", "https, http"),
        (
            "forwarded",
            "for=192.0.2.1;proto=https, for=10.0.0.1;proto=http",
        ),
    ] {
        let resp = client()
            .post(format!("{}/ui/login", app.base))
            .header(name, value)
            .form(&[("token", BOOT)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 303, "{name}");
        let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            cookie.starts_with("__Host-labelsync_session=") && cookie.contains("; Secure"),
            "{name}: {value}: {cookie}"
        );
    }
    let body = json!({ "name": "viewer", "scope": "read" });
    let (_, made) = api(&app, Method::POST, "/api/v1/tokens", body).await;
    let secret = made["secret"].as_str().unwrap();
    let behind_tls = async |cookie: &str| {
        let resp = client()
            .get(format!("{}/ui/", app.base))
            .header("cookie", cookie)
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap();
        resp.status().as_u16()
    };
    // Behind TLS the __Host- cookie alone is read: a plain one there is
    // another site's of the domain (its own valid token, say).
    let shadowed = format!("labelsync_session={BOOT}; __Host-labelsync_session={secret}");
    assert_eq!(behind_tls(&shadowed).await, 200, "the __Host- session");
    let planted = format!("labelsync_session={BOOT}");
    assert_eq!(behind_tls(&planted).await, 303, "a plain cookie behind TLS");
    // On plain HTTP (no __Host- cookie there), two plain ones are none.
    // (Another site's valid token sent first, for a path of its choosing.)
    let two = format!("labelsync_session={BOOT}; labelsync_session=the-users-own");
    let (status, _) = page(&app, &two, "/ui/").await;
    assert_eq!(status, 303, "two plain sessions are none");
    let session = format!("labelsync_session={secret}");
    for (path, cache) in [
        ("/ui/runs", "no-store"),
        ("/ui/login", "no-store"),
        ("/ui/static/console.js", "public, max-age=300"),
    ] {
        let resp = client()
            .get(format!("{}{path}", app.base))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["cache-control"], cache, "{path}");
    }
    let (status, html) = page(&app, &session, "/ui/runs?before=%00").await;
    assert_eq!(status, 400, "{html}");

    let db = Database::connect(&app.database_url).await.unwrap();
    let rename = async |from: &str, to: &str| {
        db.execute_unprepared(&format!("ALTER TABLE {from} RENAME TO {to}"))
            .await
            .unwrap();
    };
    rename("sync_runs", "sync_runs_away").await;
    let (status, html) = page(&app, &session, "/ui/runs").await;
    let (_, overview) = page(&app, &session, "/ui/").await;
    rename("sync_runs_away", "sync_runs").await;
    assert_eq!(status, 503, "{html}");
    assert!(
        html.contains("did not answer") && !html.contains("No runs"),
        "{html}"
    );
    // The overview keeps what it could read and says what it could not.
    assert!(
        overview.contains("The newest runs could not be read") && !overview.contains("No runs"),
        "{overview}"
    );
    rename("api_tokens", "api_tokens_away").await;
    let (status, html) = page(&app, &session, "/ui/").await;
    rename("api_tokens_away", "api_tokens").await;
    assert!(
        (500..600).contains(&status),
        "not the login form: {status} {html}"
    );
    let (status, _) = page(&app, &session, "/ui/").await;
    assert_eq!(status, 200, "the session holds once the database answers");
    app.stop().await;
}

/// With no token made (the open loopback mode) there is no credential a
/// page must hold: a change sent by a page of another origin of this
/// machine (another port of localhost: `Sec-Fetch-Site: same-site`, or
/// its `Origin`) is refused, as one from another site always was; one
/// from the console's own pages, or from a client that is no browser, runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_mode_takes_no_change_from_a_page_of_another_origin() {
    let app = spawn_app(AppOptions::default()).await;
    let path = format!("{}/api/v1/projects", app.base);
    let own = app.base.clone();
    let cases = [
        (Some(("sec-fetch-site", "same-site".to_owned())), 403),
        (Some(("origin", "http://localhost:5173".to_owned())), 403),
        (Some(("sec-fetch-site", "same-origin".to_owned())), 201),
        (Some(("origin", own)), 201),
        (None, 201),
    ];
    for (header, expected) in cases {
        let mut request = client().post(&path).json(&json!({ "title": "t" }));
        if let Some((name, value)) = &header {
            request = request.header(*name, value);
        }
        let status = request.send().await.unwrap().status();
        assert_eq!(status, expected, "{header:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_send_a_strict_content_security_policy() {
    let app = spawn_app(AppOptions::default()).await;
    for path in [
        "/ui/",
        "/ui/runs",
        "/ui/storages",
        "/ui/login",
        "/ui/static/console.js",
    ] {
        let resp = client()
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} (open loopback mode: no login)");
        // A page of another site whose name it made resolve to 127.0.0.1
        // (DNS rebinding) still says that name: nothing for it.
        let rebound = client()
            .get(format!("{}{path}", app.base))
            .header("host", "rebind.example:80")
            .send()
            .await
            .unwrap();
        if path.starts_with("/ui/static") || path == "/ui/login" {
            assert_eq!(rebound.status(), 200, "{path}: no data");
        } else {
            assert_eq!(rebound.status(), 303, "{path}: to the login form");
        }
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(resp.headers()["x-frame-options"], "DENY");
    }
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    for (host, status) in [
        ("rebind.example:80".to_owned(), 403),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let resp = client()
            .get(format!("{}/api/v1/projects", app.base))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "the open mode's API, Host {host}");
    }
    let (status, html) = page(
        &app,
        "",
        "/ui/runs?status=bogus&kind=%3Cscript%3E&project_id=1&storage_id=x",
    )
    .await;
    assert_eq!(status, 200, "odd filters are ignored, not errors");
    let (status, _) = page(
        &app,
        "",
        "/ui/runs?project_id=&storage_id=&status=&kind=&since=",
    )
    .await;
    assert_eq!(status, 200, "the filter form's empty fields");
    assert!(!html.contains("<script>"), "nothing is echoed unescaped");
    let (status, _) = page(&app, "", "/ui/runs/01NOSUCHRUN").await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// The console in a real browser (Debian's chromium through chromedriver,
/// driven by selenium; tests/console/browser.py): log in, start a sync from
/// the storages page and watch its counters reach the end without a
/// reload, find a failed object on a run's page, cancel a running sync
/// with the page's button, and no serious accessibility violation (axe-core)
/// on any page. Screenshots of every page are written to target/console/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_drives_the_console() {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    let root = app.doc_root.path();
    write_files(&root.join("small"), 5, "jpg");
    write_files(&root.join("big"), 3_000, "jpg");
    std::fs::create_dir_all(root.join("tasks")).unwrap();
    std::fs::write(
        root.join("tasks/good.json"),
        r#"{"data": {"text": "fine"}}"#,
    )
    .unwrap();
    std::fs::write(root.join("tasks/broken.json"), "{ not json").unwrap();
    let (_, project) = api(
        &app,
        Method::POST,
        "/api/v1/projects",
        json!({ "title": "browser" }),
    )
    .await;
    let storage = |dir: &str, tasks: bool| {
        let mut body = json!({ "project_id": project["id"], "role": "source", "backend": "local", "config": { "path": dir } });
        if tasks {
            body["import_method"] = json!("tasks");
        }
        body
    };
    let (_, small) = api(
        &app,
        Method::POST,
        "/api/v1/storages",
        storage("small", false),
    )
    .await;
    let (_, big) = api(
        &app,
        Method::POST,
        "/api/v1/storages",
        storage("big", false),
    )
    .await;
    // A first complete sync of 3,000 objects: the run the browser cancels
    // (of 30,000) estimates its ETA from it.
    let first = format!("/api/v1/storages/{}/sync", big["id"]);
    let (_, first) = api(&app, Method::POST, &first, json!({})).await;
    app.wait_run(
        first["run"]["id"].as_str().unwrap(),
        std::time::Duration::from_secs(60),
    )
    .await;
    write_files(&root.join("big"), 30_000, "jpg");
    write_files(&app.doc_root.path().join("hourly"), 1, "jpg");
    let mut hourly = storage("hourly", false);
    hourly["sync_interval_seconds"] = json!(3600);
    let (_, scheduled) = api(&app, Method::POST, "/api/v1/storages", hourly).await;
    let (_, bad) = api(
        &app,
        Method::POST,
        "/api/v1/storages",
        storage("tasks", true),
    )
    .await;
    let (_, started) = api(
        &app,
        Method::POST,
        &format!("/api/v1/storages/{}/sync", bad["id"]),
        json!({}),
    )
    .await;
    let bad_run = started["run"]["id"].as_str().expect("run id").to_owned();
    let ended = app
        .wait_run(&bad_run, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(ended["counters"]["failed"], 1, "{ended}");

    let root = labelsync_tests::repo_root();
    let out = root.join("target/console");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let axe = root.join(".ci/browser/node_modules/axe-core/axe.min.js");
    assert!(
        axe.exists(),
        "{} is missing: run tests/browser-tools.sh (tests/run.sh does)",
        axe.display()
    );
    let output = tokio::process::Command::new(root.join(".ci/apivenv/bin/python"))
        .arg(root.join("tests/console/browser.py"))
        .args([&app.base, BOOT])
        .arg(small["id"].to_string())
        .arg(big["id"].to_string())
        .args([bad_run.as_str(), "broken.json", "5"])
        .arg(&out)
        .arg(&axe)
        .arg(scheduled["id"].to_string())
        .output()
        .await
        .expect("run tests/console/browser.py (tests/browser-tools.sh installs selenium)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser run failed (screenshots in {}):\n{stdout}\n{}",
        out.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    app.stop().await;
}

/// Page views count against their caller's rate like the API's calls (an
/// overview costs several queries, one of up to 20,000 runs): they were
/// not counted at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_count_against_the_rate_limit() {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        env: vec![("LABELSYNC_RATE_LIMIT_PER_MINUTE", "5".into())],
        ..AppOptions::default()
    })
    .await;
    let cookie = log_in(&app, BOOT).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(page(&app, &cookie, "/ui/").await.0);
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 200).count() <= 6,
        "{statuses:?}"
    );
    // Another bootstrap token's session has a bucket of its own: every
    // console session of a bootstrap token shared one (the bearer header's,
    // empty), so one admin's pages used up the others'.
    let other = log_in(&app, "other-token").await;
    assert_eq!(page(&app, &other, "/ui/").await.0, 200);
    app.stop().await;
}

/// A console app (on Postgres, or SQLite when `embedded`) with a project
/// and a local storage to record runs of: (app, project, storage).
async fn app_with_a_storage(embedded: bool) -> (TestApp, i64, i64) {
    let app = spawn_app(AppOptions {
        token: Some(BOOT.into()),
        embedded,
        ..AppOptions::default()
    })
    .await;
    let project = app.project("charted").await;
    std::fs::create_dir_all(app.doc_root.path().join("data")).unwrap();
    let storage = app.local_storage(project, json!({})).await["id"]
        .as_i64()
        .unwrap();
    (app, project, storage)
}

/// Records an import run of `storage` (of `project`) that ended at `ended`
/// with `status`, having created `created` tasks.
async fn ended_run(
    db: &sea_orm::DatabaseConnection,
    (project, storage): (i64, i64),
    id: &str,
    (status, ended): (&str, chrono::DateTime<chrono::Utc>),
    created: i64,
) {
    use labelsync::db::entities::sync_run;
    use sea_orm::{ActiveModelTrait, Set};
    sync_run::ActiveModel {
        id: Set(id.into()),
        storage_id: Set(storage),
        project_id: Set(project),
        kind: Set("import".into()),
        status: Set(status.into()),
        queued_at: Set(ended - chrono::Duration::days(1)),
        finished_at: Set(Some(ended)),
        created: Set(created),
        ..Default::default()
    }
    .insert(db)
    .await
    .unwrap();
}

/// The overview, whose named charts show these totals.
async fn overview_charts(app: &TestApp, totals: &[(&str, i64)]) {
    let cookie = log_in(app, BOOT).await;
    let (status, html) = page(app, &cookie, "/ui/").await;
    assert_eq!(status, 200);
    for (chart, total) in totals {
        let caption = format!("{chart} <span class=\"muted\">({total} in all)</span>");
        assert!(html.contains(&caption), "{caption} in {html}");
    }
}

/// The overview's charts count every run of the day, summed in the
/// database: they read the day's runs oldest first and at most 20,000 of
/// them, so on a busy day the last hour's charts were empty and the day's
/// stopped at 20,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_days_last_hour_is_charted() {
    use sea_orm::{ConnectionTrait, Database};
    let (app, project, storage) = app_with_a_storage(false).await;
    let db = Database::connect(&app.database_url).await.unwrap();
    // 25,000 runs that ended 2 to 16 hours ago; 10 in the last hour, 3 of
    // them failed, each having created 7 tasks.
    let runs = |n: u32, ended: &str, status: &str, created: u32, prefix: &str| {
        format!(
            "INSERT INTO sync_runs (id, storage_id, project_id, kind, status, queued_at, \
             finished_at, created) SELECT '{prefix}' || lpad(i::text, 8, '0'), {storage}, \
             {project}, 'import', {status}, now() - interval '1 day', {ended}, {created} \
             FROM generate_series(1, {n}) AS i"
        )
    };
    for sql in [
        runs(
            25_000,
            "now() - interval '2 hours' - i * interval '2 seconds'",
            "'completed'",
            1,
            "day-",
        ),
        runs(
            10,
            "now() - i * interval '5 minutes'",
            "CASE WHEN i <= 3 THEN 'failed' ELSE 'completed' END",
            7,
            "hour-",
        ),
    ] {
        db.execute_unprepared(&sql).await.unwrap();
    }
    overview_charts(
        &app,
        &[
            ("Runs ended per hour, last day", 25_010),
            ("Tasks created", 70),
            ("Runs failed per minute", 3),
        ],
    )
    .await;
    app.stop().await;
}

/// The charts' sums are the same on SQLite (the embedded mode), where
/// times are stored as text: each end counts in its minute and hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_charts_count_alike_on_sqlite() {
    let (app, project, storage) = app_with_a_storage(true).await;
    let db = labelsync::db::connect(&app.database_url).await.unwrap();
    let now = chrono::Utc::now();
    for (minutes_ago, status) in [(5, "failed"), (30, "completed"), (120, "completed")] {
        let ended = now - chrono::Duration::minutes(minutes_ago);
        let id = format!("ended-{minutes_ago:04}");
        ended_run(&db, (project, storage), &id, (status, ended), 7).await;
    }
    overview_charts(
        &app,
        &[
            ("Runs ended per hour, last day", 3),
            ("Tasks created", 14),
            ("Runs failed per minute", 1),
        ],
    )
    .await;
    app.stop().await;
}

/// Each run's end counts in its span, `(start + i span, start + (i + 1)
/// span]`, on Postgres and on SQLite alike: an end on a span's upper
/// bound is in that span, one on the start or after `now` in none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_counts_in_its_span_on_both_databases() {
    use chrono::Duration;
    use labelsync::db::runs;
    for embedded in [false, true] {
        let (app, project, storage) = app_with_a_storage(embedded).await;
        let db = labelsync::db::connect(&app.database_url).await.unwrap();
        let now = chrono::Utc::now();
        let ends = [
            ("at-now", now, 1),
            ("a-minute-ago", now - Duration::minutes(1), 2),
            (
                "just-after-start",
                now - Duration::minutes(60) + Duration::milliseconds(1),
                4,
            ),
            ("at-start", now - Duration::minutes(60), 8),
            ("after-now", now + Duration::seconds(1), 16),
        ];
        for (id, ended, created) in ends {
            ended_run(&db, (project, storage), id, ("completed", ended), created).await;
        }
        let spans = runs::ended_per_span(&db, now, Duration::minutes(1), 60, Some(&[project]))
            .await
            .unwrap();
        let created: Vec<(usize, i64)> = spans
            .iter()
            .enumerate()
            .filter(|(_, s)| s.ended > 0)
            .map(|(i, s)| (i, s.created))
            .collect();
        assert_eq!(created, [(0, 4), (58, 2), (59, 1)], "embedded: {embedded}");
        app.stop().await;
    }
}
