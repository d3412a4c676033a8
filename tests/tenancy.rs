//! Tenancy: scoped tokens kept in the database, isolation between
//! projects, the audit trail. (A module of the `upstream` test binary.)
use std::time::Duration;

use labelsync::security::tokens::Scope;
use labelsync_scheduler::api::access::need_of;
use labelsync_tests::{AppOptions, TestApp, spawn_app, spawn_replica, write_files};
use reqwest::Method;
use serde_json::{Value, json};

const BOOT: &str = "bootstrap-token-for-tenancy";

async fn tenancy_app() -> TestApp {
    let mut opts = AppOptions::with_storages();
    opts.token = Some(BOOT.into());
    opts.env
        .push(("LOCAL_FILES_SERVING_ENABLED", "true".into()));
    spawn_app(opts).await
}

/// Sends a request with `token`; returns the status and the JSON body
/// (Null for an event stream, whose body is not read).
async fn call(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = app
        .client
        .request(method.clone(), format!("{}{path}", app.base))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "text/event-stream");
    if stream {
        return (status, Value::Null);
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Creates a token through the API with the bootstrap token; returns the
/// token's JSON (with its secret).
async fn token(app: &TestApp, scope: &str, projects: Option<&[i64]>) -> Value {
    let body = json!({ "name": format!("{scope} test"), "scope": scope, "projects": projects });
    let (status, token) = call(app, BOOT, Method::POST, "/api/v1/tokens", Some(&body)).await;
    assert_eq!(status, 201, "{token}");
    token
}

fn secret(token: &Value) -> String {
    token["secret"].as_str().expect("secret").to_owned()
}

/// A bearer that cannot be one of our tokens (not `lsk_` and 43 base64url
/// characters), and a request with none once a token was made, are refused
/// with no query: with the tokens table locked they are answered at once
/// (each waited on the lock before, a query per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_real_token_are_refused_without_a_query() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = spawn_app(AppOptions::default()).await;
    let body = json!({ "name": "first", "scope": "admin" });
    let (status, made) = app.post("/api/v1/tokens", body).await;
    assert_eq!(status, 201, "{made}");
    let url = format!("{}/api/v1/projects", app.base);
    let first = app.client.get(&url).send().await.expect("answered");
    assert_eq!(first.status(), 401, "open after a token was made");

    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let lock = db.begin().await.expect("begin");
    let locked = lock
        .execute_unprepared("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
        .await;
    locked.expect("lock");
    for bearer in [None, Some("nonsense"), Some("lsk_short"), Some(BOOT)] {
        let mut req = app.client.get(&url).timeout(Duration::from_secs(3));
        if let Some(bearer) = bearer {
            req = req.bearer_auth(bearer);
        }
        let resp = req.send().await;
        let resp = resp.unwrap_or_else(|e| panic!("{bearer:?} with the table locked: {e}"));
        assert_eq!(resp.status(), 401, "{bearer:?}");
    }
    lock.rollback().await.expect("rollback");
    let (status, _) = call(&app, &secret(&made), Method::GET, "/api/v1/projects", None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// One project's resources: every kind a route can name.
#[derive(Debug, Clone, Copy)]
struct Owned {
    project: i64,
    storage: i64,
    task: i64,
    annotation: i64,
    webhook: i64,
    delivery: i64,
}

struct World {
    runs: [String; 2],
    owned: [Owned; 2],
    uris: [String; 2],
}

/// Two projects, `a` and `b`, each with a synced local storage (so a run and
/// a task), an annotation, a webhook and a delivery of it.
async fn world(app: &TestApp) -> World {
    let mut owned = Vec::new();
    let mut runs = Vec::new();
    let mut uris = Vec::new();
    for dir in ["a", "b"] {
        write_files(&app.doc_root.path().join(dir), 1, "jpg");
        let body = json!({ "title": dir });
        let (_, project) = call(app, BOOT, Method::POST, "/api/v1/projects", Some(&body)).await;
        let project = project["id"].as_i64().unwrap();
        let body = json!({ "project_id": project, "role": "source", "backend": "local", "config": { "path": dir } });
        let (status, storage) =
            call(app, BOOT, Method::POST, "/api/v1/storages", Some(&body)).await;
        assert_eq!(status, 201, "{storage}");
        let path = format!("/api/v1/storages/{}/sync", storage["id"]);
        let (_, started) = call(app, BOOT, Method::POST, &path, Some(&json!({}))).await;
        let run_id = started["run"]["id"].as_str().unwrap().to_owned();
        wait_run(app, &run_id).await;
        let path = format!("/api/v1/projects/{project}/tasks");
        let (_, tasks) = call(app, BOOT, Method::GET, &path, None).await;
        let task = tasks["items"][0].clone();
        uris.push(task["data"]["image"].as_str().unwrap().to_owned());
        let path = format!("/api/v1/tasks/{}/annotations", task["id"]);
        let body = json!({ "result": [] });
        let (_, annotation) = call(app, BOOT, Method::POST, &path, Some(&body)).await;
        let body =
            json!({ "url": "http://127.0.0.1:9/hook", "events": ["*"], "project_id": project });
        let (_, hook) = call(app, BOOT, Method::POST, "/api/v1/webhooks", Some(&body)).await;
        let path = format!("/api/v1/webhooks/{}/test", hook["id"]);
        let (_, delivery) = call(app, BOOT, Method::POST, &path, Some(&json!({}))).await;
        runs.push(run_id);
        owned.push(Owned {
            project,
            storage: storage["id"].as_i64().unwrap(),
            task: task["id"].as_i64().unwrap(),
            annotation: annotation["id"].as_i64().unwrap(),
            webhook: hook["id"].as_i64().unwrap(),
            delivery: delivery["id"].as_i64().unwrap(),
        });
    }
    World {
        runs: [runs[0].clone(), runs[1].clone()],
        owned: [owned[0], owned[1]],
        uris: [uris[0].clone(), uris[1].clone()],
    }
}

async fn wait_run(app: &TestApp, run_id: &str) -> Value {
    let path = format!("/api/v1/runs/{run_id}");
    for _ in 0..600 {
        let (_, run) = call(app, BOOT, Method::GET, &path, None).await;
        if run["status"] != "queued" && run["status"] != "running" {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {run_id} did not end");
}

/// A fresh resource of the kind `route` deletes, in `project` (so a
/// DELETE that is let through destroys nothing the walk still needs).
async fn throwaway(app: &TestApp, route: &str, project: i64, task: i64) -> i64 {
    let (path, body) = match route {
        "/projects/{id}" => ("/api/v1/projects".to_owned(), json!({ "title": "spare" })),
        "/storages/{id}" => (
            "/api/v1/storages".to_owned(),
            json!({ "project_id": project, "role": "source", "backend": "local", "config": { "path": "a" } }),
        ),
        "/annotations/{id}" => (
            format!("/api/v1/tasks/{task}/annotations"),
            json!({ "result": [] }),
        ),
        "/webhooks/{id}" => (
            "/api/v1/webhooks".to_owned(),
            json!({ "url": "http://127.0.0.1:9/spare", "events": ["*"], "project_id": project }),
        ),
        "/tokens/{id}" => (
            "/api/v1/tokens".to_owned(),
            json!({ "name": "spare", "scope": "read" }),
        ),
        other => panic!("no throwaway for {other}"),
    };
    let (status, made) = call(app, BOOT, Method::POST, &path, Some(&body)).await;
    assert_eq!(status, 201, "{made}");
    made["id"].as_i64().unwrap()
}

/// The path (with query) and body of one operation aimed at `of`'s
/// resources.
fn request_for(
    route: &str,
    method: &Method,
    of: &Owned,
    run: &str,
    uri: &str,
) -> (String, Option<Value>) {
    let first = route.split('/').nth(1).unwrap_or_default();
    let id = match first {
        "projects" => of.project.to_string(),
        "storages" => of.storage.to_string(),
        "runs" => run.to_owned(),
        "tasks" => of.task.to_string(),
        "annotations" => of.annotation.to_string(),
        "webhooks" => of.webhook.to_string(),
        _ => "1".to_owned(),
    };
    let mut path = format!(
        "/api/v1{}",
        route
            .replace("{id}", &id)
            .replace("{delivery_id}", &of.delivery.to_string())
    );
    let query = match (method.as_str(), route) {
        ("GET", "/resolve") => format!("?project_id={}&uri={}", of.project, urlencode(uri)),
        ("GET", "/events" | "/storages" | "/webhooks") => format!("?project_id={}", of.project),
        ("GET", "/runs") => format!("?storage_id={}", of.storage),
        _ => String::new(),
    };
    path.push_str(&query);
    let storage_body = json!({ "project_id": of.project, "role": "source", "backend": "local", "config": { "path": "a" } });
    let body = match (method.as_str(), route) {
        ("GET" | "DELETE", _) => None,
        ("POST", "/projects") => Some(json!({ "title": "new" })),
        ("POST", "/storages" | "/storages/validate") => Some(storage_body),
        ("POST", "/tasks/{id}/annotations") => Some(json!({ "result": [] })),
        ("POST", "/webhooks") => Some(
            json!({ "url": "http://127.0.0.1:9/h", "events": ["*"], "project_id": of.project }),
        ),
        ("POST", "/tokens") => Some(json!({ "name": "walk", "scope": "read" })),
        _ => Some(json!({})),
    };
    (path, body)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Storage bodies and changes a token held to projects may not make: the
/// walk's storages are `local` (the server's disk), for admins only.
fn acts_as_the_server(method: &Method, route: &str) -> bool {
    matches!(
        (method.as_str(), route),
        ("POST", "/storages" | "/storages/validate") | ("PATCH", "/storages/{id}")
    )
}

/// Routes whose answer to another project is a filtered list, a refused
/// body, or the same as for one's own (they name no project).
fn other_project_answer(method: &Method, route: &str) -> Option<u16> {
    match (method.as_str(), route) {
        ("GET", "/projects" | "/storages" | "/runs" | "/webhooks") => Some(200),
        ("POST", "/storages" | "/webhooks") => Some(400),
        (
            _,
            "/storages/validate"
            | "/queues"
            | "/queues/dead/requeue"
            | "/queues/dead/discard"
            | "/workers"
            | "/openapi.json"
            | "/tokens"
            | "/tokens/{id}"
            | "/audit",
        ) => None,
        _ => Some(404),
    }
}

/// Every operation of the OpenAPI document, by each scope (admin not held
/// to projects; write, read and ops held to project a), against project
/// a's resources and project b's: 403 where the route's declared scopes
/// leave the token out, else what a caller sees of its own project (2xx)
/// and of another (404, a refused body, or a list without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_each_scope_as_its_table_says() {
    let app = tenancy_app().await;
    let w = world(&app).await;
    let (a, b) = (w.owned[0], w.owned[1]);
    let (_, doc) = call(&app, BOOT, Method::GET, "/api/v1/openapi.json", None).await;
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let Some(route) = path.strip_prefix("/api/v1") else {
            continue;
        };
        for method in ["get", "post", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let need = need_of(&method, route).unwrap_or_else(|| {
                panic!("{method} {route} is documented but has no scope in access::ROUTES")
            });
            let documented: Vec<&str> = op["x-labelsync-scopes"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {route} documents no x-labelsync-scopes"))
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect();
            let allowed: Vec<&str> = Scope::ALL
                .into_iter()
                .filter(|s| need.allows(*s, false))
                .map(Scope::as_str)
                .collect();
            assert_eq!(
                documented, allowed,
                "{method} {route}: the document and the table differ"
            );
            operations.push((method, route.to_owned()));
        }
    }
    assert_eq!(
        operations.len(),
        labelsync_scheduler::api::access::ROUTES.len(),
        "every route is documented"
    );

    let mut callers = vec![(Scope::Admin, secret(&token(&app, "admin", None).await))];
    for scope in [Scope::Write, Scope::Read, Scope::Ops] {
        callers.push((
            scope,
            secret(&token(&app, scope.as_str(), Some(&[a.project])).await),
        ));
    }
    let mut checked = 0;
    for (scope, key) in &callers {
        let restricted = *scope != Scope::Admin;
        for (method, route) in &operations {
            let allowed = need_of(method, route).unwrap().allows(*scope, restricted);
            for (side, of) in [(0, a), (1, b)] {
                let (mut path, body) =
                    request_for(route, method, &of, &w.runs[side], &w.uris[side]);
                let mut bearer = key.clone();
                if allowed && *method == Method::DELETE && (side == 0 || !restricted) {
                    let spare = throwaway(&app, route, of.project, of.task).await;
                    path = path.replacen(
                        &format!("/{}", path.rsplit('/').next().unwrap()),
                        &format!("/{spare}"),
                        1,
                    );
                    if route == "/projects/{id}" && restricted {
                        // A restricted token can only see a project it was given.
                        bearer = secret(&token(&app, scope.as_str(), Some(&[spare])).await);
                    }
                }
                let (status, answer) =
                    call(&app, &bearer, method.clone(), &path, body.as_ref()).await;
                let what = format!(
                    "{} {method} {path} ({})",
                    scope.as_str(),
                    if side == 0 { "own" } else { "other" }
                );
                checked += 1;
                if !allowed {
                    assert_eq!(status, 403, "{what}: {answer}");
                    assert_eq!(answer["error"]["code"], "forbidden", "{what}");
                    continue;
                }
                let expected = match (side, restricted) {
                    (1, true) => other_project_answer(method, route),
                    _ => None,
                };
                if restricted
                    && acts_as_the_server(method, route)
                    && expected.is_none_or(|c| c != 404)
                {
                    assert_eq!(status, 400, "{what}: {answer}");
                    let code = &answer["error"]["code"];
                    assert!(
                        code == "server_credentials" || code == "unknown_project",
                        "{what}: {answer}"
                    );
                    continue;
                }
                match expected {
                    // The walk's runs failed on nothing: there is nothing to retry.
                    None if route == "/runs/{id}/retry" => {
                        assert_eq!(status, 409, "{what}: {answer}");
                        assert_eq!(answer["error"]["code"], "nothing_to_retry", "{what}");
                    }
                    None => assert!((200..300).contains(&status), "{what}: {status} {answer}"),
                    Some(200) => {
                        assert_eq!(status, 200, "{what}: {answer}");
                        let items = answer["items"].as_array().unwrap();
                        assert!(
                            items
                                .iter()
                                .all(|i| i["id"] != b.project || route != "/projects"),
                            "{what} lists the other project: {answer}"
                        );
                        if route != "/projects" {
                            assert!(
                                items.is_empty(),
                                "{what} shows the other project's items: {answer}"
                            );
                        }
                    }
                    Some(400) => {
                        assert_eq!(status, 400, "{what}: {answer}");
                        assert_eq!(answer["error"]["code"], "unknown_project", "{what}");
                    }
                    Some(code) => {
                        assert_eq!(status, code, "{what}: {answer}");
                        assert_eq!(answer["error"]["code"], "not_found", "{what}");
                    }
                }
            }
        }
    }
    assert!(checked > 300, "{checked} requests checked");
    app.stop().await;
}

/// The 404 for another project's resource says exactly what it says for
/// a resource that does not exist, and a restricted write token can move
/// nothing into another project.
/// One token holds at most 16 event streams at once (a stream holds its
/// connection, and `/events` never ends): the 17th is `429
/// too_many_streams`, another token still gets one, and a closed stream
/// gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_16_event_streams() {
    let app = tenancy_app().await;
    // Bounded: a stream that is never given back must fail the test, not
    // hold it.
    tokio::time::timeout(
        std::time::Duration::from_secs(90),
        sixteen_streams_and_no_more(&app),
    )
    .await
    .expect("the streams test finished within 90 s");
    app.stop().await;
}

async fn sixteen_streams_and_no_more(app: &TestApp) {
    let reader = secret(&token(app, "read", None).await);
    let open = |key: &str| {
        app.client
            .get(format!("{}/api/v1/events", app.base))
            .bearer_auth(key)
            .send()
    };
    let mut held = Vec::new();
    for _ in 0..16 {
        let stream = open(&reader).await.expect("a stream");
        assert_eq!(stream.status(), 200);
        held.push(stream);
    }
    let refused = open(&reader).await.expect("an answer");
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"30"[..]),
        "a refused stream says when to try again"
    );
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    let other = secret(&token(app, "read", None).await);
    assert_eq!(open(&other).await.expect("a stream").status(), 200);
    // Each bootstrap token is a caller of its own: they shared one count.
    let mut boot = Vec::new();
    for _ in 0..16 {
        let stream = open(BOOT).await.expect("a stream");
        assert_eq!(stream.status(), 200);
        boot.push(stream);
    }
    assert_eq!(open("other-token").await.expect("a stream").status(), 200);
    drop(boot);
    drop(held.pop());
    // The server sees the closed connection at its next write (at most a
    // keep-alive, 15 s, later).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let again = open(&reader).await.expect("an answer");
        if again.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not given back"
        );
        drop(again);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    drop(held);
}

/// A stopping scheduler ends its event streams (which never end by
/// themselves) as the stop begins, so their clients reconnect at once, to
/// another replica, and it stops within seconds: it waited for them
/// forever, then for its whole drain time (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_stops_with_event_streams_open() {
    let app = tenancy_app().await;
    let reader = secret(&token(&app, "read", None).await);
    let mut ends = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut stream = app
            .client
            .get(format!("{}/api/v1/events", app.base))
            .bearer_auth(&reader)
            .send()
            .await
            .expect("a stream");
        assert_eq!(stream.status(), 200);
        // Read to its end; when it ended.
        ends.spawn(async move {
            while let Ok(Some(_)) = stream.chunk().await {}
            std::time::Instant::now()
        });
    }
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(40), app.stop()).await;
    assert!(stopped.is_ok(), "still stopping after 40 s");
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "stopped in {took:?}"
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), ends.join_all())
        .await
        .expect("every stream ended");
    for end in ended {
        let after = end.duration_since(started);
        assert!(
            after < std::time::Duration::from_secs(5),
            "a stream ended after {after:?}"
        );
    }
}

/// The fleet (queue depths, dead jobs, workers and the runs they hold)
/// is every project's: an ops token held to projects can neither see it
/// nor act on it (discarding every tenant's dead jobs); one not held can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_is_only_for_tokens_not_held_to_projects() {
    let app = tenancy_app().await;
    let project = json!({ "title": "fleet" });
    let (status, project) =
        call(&app, BOOT, Method::POST, "/api/v1/projects", Some(&project)).await;
    assert_eq!(status, 201, "{project}");
    let id = project["id"].as_i64().expect("id");
    let held = secret(&token(&app, "ops", Some(&[id])).await);
    let whole = secret(&token(&app, "ops", None).await);
    for (method, path) in [
        (Method::GET, "/api/v1/queues"),
        (Method::GET, "/api/v1/workers"),
        (Method::POST, "/api/v1/queues/dead/requeue"),
        (Method::POST, "/api/v1/queues/dead/discard"),
    ] {
        let (status, body) = call(&app, &held, method.clone(), path, None).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (403, &json!("forbidden")),
            "{method} {path}"
        );
        let (status, body) = call(&app, &whole, method.clone(), path, None).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_projects_ids_cannot_be_told_from_missing_ones() {
    let app = tenancy_app().await;
    let w = world(&app).await;
    let (a, b) = (w.owned[0], w.owned[1]);
    let writer = secret(&token(&app, "write", Some(&[a.project])).await);
    let missing = b.storage + 1000;
    let (s1, hidden) = call(
        &app,
        &writer,
        Method::GET,
        &format!("/api/v1/storages/{}", b.storage),
        None,
    )
    .await;
    let (s2, absent) = call(
        &app,
        &writer,
        Method::GET,
        &format!("/api/v1/storages/{missing}"),
        None,
    )
    .await;
    assert_eq!((s1, s2), (404, 404));
    let shape = |v: &Value, id: i64| v.to_string().replace(&id.to_string(), "N");
    assert_eq!(
        shape(&hidden, b.storage),
        shape(&absent, missing),
        "{hidden} vs {absent}"
    );

    let path = format!("/api/v1/storages/{}", a.storage);
    let (status, moved) = call(
        &app,
        &writer,
        Method::PATCH,
        &path,
        Some(&json!({ "project_id": b.project })),
    )
    .await;
    assert_eq!(status, 400, "{moved}");
    assert_eq!(moved["error"]["code"], "immutable_field");
    let body = json!({ "url": "http://127.0.0.1:9/all", "events": ["*"] });
    let (status, hook) = call(&app, &writer, Method::POST, "/api/v1/webhooks", Some(&body)).await;
    assert_eq!(
        status, 400,
        "an endpoint of every project is refused: {hook}"
    );
    let resolve = format!(
        "/api/v1/resolve?project_id={}&uri={}",
        a.project,
        urlencode(&w.uris[1])
    );
    let (status, answer) = call(&app, &writer, Method::GET, &resolve, None).await;
    assert_eq!(status, 404, "b's URI through a's project: {answer}");
    let (status, _) = call(
        &app,
        &writer,
        Method::GET,
        &format!("/api/v1/runs/{}", w.runs[1]),
        None,
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// Create (CLI), use, expire, revoke: a revoked token is refused at once
/// by every replica; the secret is printed once, alone on the first line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifecycle_from_the_cli_and_the_api() {
    let app = tenancy_app().await;
    let replica = spawn_replica(&app).await;
    let w = world(&app).await;
    let project = w.owned[0].project;
    let out = token_cli(
        &app,
        &[
            "create",
            "--name",
            "app-a",
            "--scope",
            "read",
            "--project",
            &project.to_string(),
            "--expires",
            "90d",
        ],
    );
    let mut lines = out.lines();
    let secret = lines.next().unwrap().to_owned();
    assert!(secret.starts_with("lsk_") && !secret.contains(' '), "{out}");
    let shown: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(shown["scope"], "read");
    assert_eq!(shown["projects"], json!([project]));
    assert!(shown["expires_at"].is_string(), "{shown}");
    assert!(shown.get("secret").is_none() && !out[secret.len()..].contains(&secret));

    for server in [&app, &replica] {
        let (status, page) = call(server, &secret, Method::GET, "/api/v1/projects", None).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            1,
            "only its project: {page}"
        );
    }
    let listed = token_cli(&app, &["list"]);
    assert!(
        listed.contains("\"app-a\"") && !listed.contains(&secret[4..]),
        "{listed}"
    );
    let id = shown["id"].as_i64().unwrap();
    let (_, read) = call(
        &app,
        BOOT,
        Method::GET,
        &format!("/api/v1/tokens/{id}"),
        None,
    )
    .await;
    assert!(read["last_used_at"].is_string(), "use is recorded: {read}");

    let (status, _) = call(
        &replica,
        BOOT,
        Method::DELETE,
        &format!("/api/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    for server in [&app, &replica] {
        let (status, answer) = call(server, &secret, Method::GET, "/api/v1/projects", None).await;
        assert_eq!(status, 401, "revoked at once on every replica: {answer}");
    }

    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let body = json!({ "name": "short", "scope": "ops", "expires_at": soon });
    let (status, short) = call(&app, BOOT, Method::POST, "/api/v1/tokens", Some(&body)).await;
    assert_eq!(status, 201, "{short}");
    let short_secret = short["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&app, &short_secret, Method::GET, "/api/v1/queues", None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        call(&replica, &short_secret, Method::GET, "/api/v1/queues", None)
            .await
            .0,
        401,
        "expired"
    );

    token_cli(&app, &["create", "--name", "twice", "--scope", "ops"]);
    let out = token_cli(&app, &["revoke", "twice"]);
    assert!(out.contains("revoked_at"), "{out}");
    let (_, rows) = call(&app, BOOT, Method::GET, "/api/v1/audit?limit=1000", None).await;
    let from_shell: Vec<&Value> = rows["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["token"]["name"] == "cli")
        .collect();
    let routes: Vec<&str> = from_shell
        .iter()
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert_eq!(
        routes,
        [
            "labelsync-scheduler token create",
            "labelsync-scheduler token create",
            "labelsync-scheduler token revoke"
        ],
        "the shell's changes are audited too"
    );
    for bad in [
        json!({ "name": "x", "scope": "root" }),
        json!({ "name": "", "scope": "read" }),
        json!({ "name": "x", "scope": "admin", "projects": [project] }),
        json!({ "name": "x", "scope": "read", "projects": [] }),
        json!({ "name": "x", "scope": "read", "projects": [project + 1000] }),
        json!({ "name": "x", "scope": "read", "expires_at": "2001-01-01T00:00:00Z" }),
        // Past the year 9999: SQLite compared chrono's `+10000-...` text
        // as before now, and the token made was refused for ever there.
        json!({ "name": "x", "scope": "read", "expires_at": "+10000-01-01T00:00:00Z" }),
    ] {
        let (status, answer) = call(&app, BOOT, Method::POST, "/api/v1/tokens", Some(&bad)).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    replica.stop().await;
    app.stop().await;
}

/// The token commands never make a database of their own, nor migrate one
/// they were told not to: with `DATABASE_URL` unset, `token create` made a
/// new `./labelsync.db`, put the token there and exited 0 (no server reads
/// it); with `LABELSYNC_RUN_MIGRATIONS=false` they migrated anyway. A bare
/// `--expires 90` was 90 seconds; a unit is needed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_make_and_migrate_no_database_of_their_own() {
    use sea_orm::{ConnectionTrait, Database};
    let cwd = tempfile::tempdir().expect("temp dir");
    let token = |env: &[(&str, &str)], args: &[&str]| {
        let out = std::process::Command::new(labelsync_tests::binary("labelsync-scheduler"))
            .arg("token")
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .current_dir(cwd.path())
            .output()
            .expect("run labelsync-scheduler token");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    };
    let (ok, stderr) = token(&[], &["create", "--name", "lost", "--scope", "read"]);
    assert!(!ok, "a token made where no server reads it");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("labelsync.db"),
        "{stderr}"
    );
    assert!(!cwd.path().join("labelsync.db").exists());

    let empty = labelsync_tests::fresh_postgres().await;
    let not_now = [
        ("DATABASE_URL", empty.as_str()),
        ("LABELSYNC_RUN_MIGRATIONS", "false"),
    ];
    let (ok, stderr) = token(&not_now, &["list"]);
    assert!(!ok, "listed tokens of a database with no tables: {stderr}");
    let db = Database::connect(&empty).await.expect("db");
    let tables = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public'",
        ))
        .await
        .expect("count")
        .expect("a row");
    assert_eq!(tables.try_get::<i64>("", "n").expect("n"), 0, "migrated");

    let migrating = [("DATABASE_URL", empty.as_str())];
    let args = ["create", "--name", "short", "--scope", "read", "--expires"];
    let (ok, stderr) = token(&migrating, &[&args[..], &["90"]].concat());
    assert!(!ok && stderr.contains("90d"), "{stderr}");
    let (ok, stderr) = token(&migrating, &[&args[..], &["90s"]].concat());
    assert!(ok, "{stderr}");
}

/// Runs `labelsync-scheduler token ARGS` on the app's database; returns
/// its stdout (and fails the test when it fails).
fn token_cli(app: &TestApp, args: &[&str]) -> String {
    let out = std::process::Command::new(labelsync_tests::binary("labelsync-scheduler"))
        .arg("token")
        .args(args)
        .env_clear()
        .env("DATABASE_URL", &app.database_url)
        .output()
        .expect("run labelsync-scheduler token");
    assert!(
        out.status.success(),
        "token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every mutation leaves an audit row naming its token, route, ids,
/// outcome and request id; reads leave none; the rows can be filtered by
/// token and project, and the tick deletes rows past their retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_audited_and_reads_are_not() {
    let app = tenancy_app().await;
    let w = world(&app).await;
    let a = w.owned[0];
    let writer = token(&app, "write", Some(&[a.project])).await;
    let key = secret(&writer);
    let before = audit(&app, "").await.len();
    for _ in 0..3 {
        call(
            &app,
            &key,
            Method::GET,
            &format!("/api/v1/storages/{}", a.storage),
            None,
        )
        .await;
        call(&app, &key, Method::GET, "/api/v1/runs", None).await;
    }
    assert_eq!(audit(&app, "").await.len(), before, "reads leave no row");

    let path = format!("/api/v1/projects/{}", a.project);
    let path_of_patch = path.clone();
    let resp = app
        .client
        .patch(format!("{}{path}", app.base))
        .bearer_auth(&key)
        .header("x-request-id", "req-audit-1")
        .json(&json!({ "title": "renamed" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let endpoint =
        std::env::var("TEST_S3S_ENDPOINT").expect("TEST_S3S_ENDPOINT (tests/emulators.sh)");
    let body = json!({ "project_id": a.project, "role": "target", "backend": "s3",
                       "config": { "bucket": "audited", "endpoint_url": endpoint },
                       "secrets": { "access_key_id": "k", "secret_access_key": "s" } });
    let (status, storage) = call(&app, &key, Method::POST, "/api/v1/storages", Some(&body)).await;
    assert_eq!(status, 201, "{storage}");
    let other = format!("/api/v1/storages/{}", w.owned[1].storage);
    assert_eq!(call(&app, &key, Method::DELETE, &other, None).await.0, 404);
    // Written in the change's own transaction: one row, with the new id.
    let path = format!("/api/v1/tasks/{}/annotations", a.task);
    let (status, annotation) = call(
        &app,
        &key,
        Method::POST,
        &path,
        Some(&json!({ "result": [] })),
    )
    .await;
    assert_eq!(status, 201, "{annotation}");

    let id = writer["id"].as_i64().unwrap();
    let rows = audit(&app, &format!("token_id={id}")).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    let (patch, create, refused, annotated) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    assert_eq!(
        annotated["resource"]["annotation_id"], annotation["id"],
        "{annotated}"
    );
    assert_eq!(
        (&annotated["status"], &annotated["project_id"]),
        (&json!(201), &json!(a.project))
    );
    assert_eq!(patch["token"], json!({ "id": id, "name": "write test" }));
    assert_eq!(
        (
            &patch["method"],
            &patch["route"],
            &patch["status"],
            &patch["request_id"]
        ),
        (
            &json!("PATCH"),
            &json!("/api/v1/projects/{id}"),
            &json!(200),
            &json!("req-audit-1")
        )
    );
    assert_eq!(patch["resource"], json!({ "projects": a.project }));
    // The path as sent (it lacked its `/api/v1`, as the router nests it).
    assert_eq!(patch["path"], json!(path_of_patch), "{patch}");
    assert_eq!(patch["project_id"], a.project);
    assert_eq!(patch["client"], "127.0.0.1");
    assert_eq!(create["resource"]["storage_id"], storage["id"], "{create}");
    assert_eq!(create["project_id"], a.project);
    assert_eq!(
        (&refused["status"], &refused["project_id"]),
        (&json!(404), &Value::Null)
    );
    let of_project = audit(&app, &format!("project_id={}", a.project)).await;
    assert!(
        of_project.iter().any(|r| r["token"]["name"] == "bootstrap"),
        "setup rows are the bootstrap token's"
    );
    assert!(of_project.iter().all(|r| r["project_id"] == a.project));
    let all = serde_json::to_string(&audit(&app, "").await).unwrap();
    assert!(
        !all.contains(&key) && !all.contains(BOOT),
        "no secret in the audit trail"
    );

    let (status, answer) = call(&app, &key, Method::GET, "/api/v1/audit", None).await;
    assert_eq!(status, 403, "admins only: {answer}");
    expired_rows_are_pruned(&app, patch["id"].as_i64().unwrap()).await;
    app.stop().await;
}

/// Backdates one row past `LABELSYNC_AUDIT_RETENTION_DAYS` (90 by
/// default) and runs the tick's cleanup: that row goes, the rest stay.
async fn expired_rows_are_pruned(app: &TestApp, row_id: i64) {
    use sea_orm::ConnectionTrait;
    let state = labelsync_scheduler::app::state(labelsync_tests::settings(&app.vars))
        .await
        .unwrap();
    let old = chrono::Utc::now() - chrono::Duration::days(91);
    state
        .db
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "UPDATE audit_events SET at = $1 WHERE id = $2",
            [old.into(), row_id.into()],
        ))
        .await
        .unwrap();
    let before = audit(app, "").await.len();
    labelsync_scheduler::periodic::prune(&state).await;
    let after = audit(app, "").await;
    assert_eq!(after.len(), before - 1, "one row past retention");
    assert!(after.iter().all(|r| r["id"] != row_id));
}

/// Every audit row matching `filter` (a query string without `?`).
async fn audit(app: &TestApp, filter: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/api/v1/audit?limit=1000&{filter}{after}");
        let (status, page) = call(app, BOOT, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        rows.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_i64() {
            Some(next) => after = format!("&after={next}"),
            None => return rows,
        }
    }
}

/// A token held to projects brings its own credentials: it cannot make or
/// change a storage that would act as the server (its disk, its cloud
/// identity), which could reach any tenant's data; with its own keys it can.
/// And `/resolve` serves it only keys inside one of its storages' prefixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_token_cannot_borrow_the_servers_identity() {
    let app = tenancy_app().await;
    let w = world(&app).await;
    let a = w.owned[0];
    let writer = secret(&token(&app, "write", Some(&[a.project])).await);
    let endpoint =
        std::env::var("TEST_S3S_ENDPOINT").expect("TEST_S3S_ENDPOINT (tests/emulators.sh)");
    let s3 = |secrets: Value| {
        json!({ "project_id": a.project, "role": "source", "backend": "s3",
                "config": { "bucket": "tenant-a", "endpoint_url": endpoint }, "secrets": secrets })
    };
    for (body, why) in [
        (s3(json!({})), "the default AWS chain"),
        (
            s3(json!({ "access_key_id": "only-half" })),
            "half a key pair",
        ),
        (
            json!({ "project_id": a.project, "role": "source", "backend": "local", "config": { "path": "a" } }),
            "the server's disk",
        ),
        // Refused before the disk is asked: a path that exists outside the
        // root, one that does not, and one not a directory answered
        // differently, so such a caller could map the server's disk.
        (
            json!({ "project_id": a.project, "role": "source", "backend": "local", "config": { "path": "../" } }),
            "a directory outside the root",
        ),
        (
            json!({ "project_id": a.project, "role": "source", "backend": "local", "config": { "path": "../no-such-dir-anywhere" } }),
            "a missing path outside the root",
        ),
    ] {
        for path in ["/api/v1/storages", "/api/v1/storages/validate"] {
            let (status, answer) = call(&app, &writer, Method::POST, path, Some(&body)).await;
            assert_eq!(status, 400, "{why} through {path}: {answer}");
            assert_eq!(answer["error"]["code"], "server_credentials", "{answer}");
        }
    }
    let own =
        s3(json!({ "access_key_id": "tenant-a-key", "secret_access_key": "tenant-a-secret" }));
    let (status, storage) = call(&app, &writer, Method::POST, "/api/v1/storages", Some(&own)).await;
    assert_eq!(status, 201, "with its own keys: {storage}");
    let path = format!("/api/v1/storages/{}", storage["id"]);
    let strip = json!({ "secrets": { "access_key_id": "", "secret_access_key": "" } });
    let (status, answer) = call(&app, &writer, Method::PATCH, &path, Some(&strip)).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (400, &json!("server_credentials")),
        "{answer}"
    );
    let (status, answer) = call(&app, BOOT, Method::PATCH, &path, Some(&strip)).await;
    assert_eq!(status, 200, "an admin may: {answer}");

    // A storage of project c holds `sub/` of directory c; c/other.jpg lies
    // outside its prefix: an admin may resolve it, c's own token may not.
    write_files(&app.doc_root.path().join("c/sub"), 1, "jpg");
    std::fs::write(app.doc_root.path().join("c/other.jpg"), b"not yours").unwrap();
    let (_, c) = call(
        &app,
        BOOT,
        Method::POST,
        "/api/v1/projects",
        Some(&json!({ "title": "c" })),
    )
    .await;
    let body = json!({ "project_id": c["id"], "role": "source", "backend": "local", "config": { "path": "c" }, "prefix": "sub/" });
    let (status, made) = call(&app, BOOT, Method::POST, "/api/v1/storages", Some(&body)).await;
    assert_eq!(status, 201, "{made}");
    let reader = secret(&token(&app, "read", Some(&[c["id"].as_i64().unwrap()])).await);
    let uri = urlencode("/data/local-files/?d=c/other.jpg");
    let resolve = format!("/api/v1/resolve?project_id={}&uri={uri}", c["id"]);
    assert_eq!(call(&app, BOOT, Method::GET, &resolve, None).await.0, 200);
    let (status, answer) = call(&app, &reader, Method::GET, &resolve, None).await;
    assert_eq!(status, 404, "outside its storage's prefix: {answer}");
    app.stop().await;
}

/// Streams end when their token is revoked; replayed creates never show a
/// secret again, and none is kept with the answer; the rate limit counts
/// per token, however the header is spelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_streams_end_and_secrets_are_not_replayed() {
    let mut opts = AppOptions::with_storages();
    opts.token = Some(BOOT.into());
    // The bootstrap token makes 5 requests here: 8 leaves it room.
    opts.env
        .push(("LABELSYNC_RATE_LIMIT_PER_MINUTE", "8".into()));
    let app = spawn_app(opts).await;
    let send = |key: &'static str| {
        app.client
            .post(format!("{}/api/v1/tokens", app.base))
            .bearer_auth(BOOT)
            .header("idempotency-key", key)
            .json(&json!({ "name": "replayed", "scope": "ops" }))
    };
    let first: Value = send("k-1").send().await.unwrap().json().await.unwrap();
    let replay = send("k-1").send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    let shown = first["secret"].as_str().unwrap().to_owned();
    assert_eq!(replay["id"], first["id"]);
    assert_eq!(replay["secret"], Value::Null, "{replay}");
    let dump = std::process::Command::new("pg_dump")
        .arg(&app.database_url)
        .output()
        .expect("pg_dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&dump.stdout).contains(&shown[4..]),
        "the secret is in no table"
    );

    for _ in 0..8 {
        assert_eq!(
            call(&app, &shown, Method::GET, "/api/v1/queues", None)
                .await
                .0,
            200
        );
    }
    let lower = app
        .client
        .get(format!("{}/api/v1/queues", app.base))
        .header("authorization", format!("bearer   {shown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 429, "another spelling is the same caller");
    let other = secret(&token(&app, "ops", None).await);
    assert_eq!(
        call(&app, &other, Method::GET, "/api/v1/queues", None)
            .await
            .0,
        200,
        "its own bucket"
    );

    let stream = app
        .client
        .get(format!("{}/api/v1/events", app.base))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let id = call(&app, BOOT, Method::GET, "/api/v1/tokens", None)
        .await
        .1["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["prefix"].as_str().is_some_and(|p| other.starts_with(p)))
        .unwrap()["id"]
        .clone();
    let (status, _) = call(
        &app,
        BOOT,
        Method::DELETE,
        &format!("/api/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let started = std::time::Instant::now();
    let mut stream = stream;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

/// A stream whose token cannot be looked up any more (the database fails
/// that query) ends within half a minute of its token's last good check.
/// A failed lookup kept the stream until the next one: a token revoked
/// during an outage of its lookups was served for as long as it lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_token_cannot_be_checked_ends() {
    use sea_orm::ConnectionTrait;
    let app = tenancy_app().await;
    let watcher = secret(&token(&app, "ops", None).await);
    let mut stream = app
        .client
        .get(format!("{}/api/v1/events", app.base))
        .bearer_auth(&watcher)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let opened = std::time::Instant::now();
    // Its token's lookups fail from now on; the stream's own reads do not.
    let db = labelsync::db::connect(&app.database_url).await.unwrap();
    db.execute_unprepared("ALTER TABLE api_tokens RENAME TO api_tokens_away")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(70), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream went on without its token checked"
    );
    let after = opened.elapsed();
    assert!(
        (Duration::from_secs(20)..Duration::from_secs(50)).contains(&after),
        "ended {after:?} after it opened: one failed lookup is not the end"
    );
    app.stop().await;
}

/// A network opened to storages is not opened to webhooks: with
/// `LABELSYNC_ALLOW_PRIVATE_ENDPOINTS` set for an internal bucket, any
/// tenant could aim a webhook at the same addresses and read the answers
/// in its delivery log. Webhooks have their own allowlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_do_not_inherit_the_storages_private_networks() {
    let mut opts = AppOptions::with_storages();
    opts.env
        .retain(|(name, _)| *name != "LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS");
    let app = spawn_app(opts).await;
    let body = serde_json::json!({ "url": "http://127.0.0.1:9/hooks", "events": ["*"] });
    let (status, refused) = app.post("/api/v1/webhooks", body).await;
    assert_eq!(
        (
            status,
            &refused["error"]["code"],
            &refused["error"]["field"]
        ),
        (
            400,
            &serde_json::json!("endpoint_not_allowed"),
            &serde_json::json!("url")
        ),
        "{refused}"
    );
    // The message names the setting that would open it, not the storages'
    // (which it named: an operator following it opened private networks
    // to every tenant's storages, and not to the webhook).
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS"),
        "{refused}"
    );
    assert!(
        !message.contains("sets LABELSYNC_ALLOW_PRIVATE_ENDPOINTS"),
        "{refused}"
    );
    app.stop().await;
}
