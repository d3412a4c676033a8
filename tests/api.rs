//! The HTTP API against real Postgres and Redis (and, for the embedded mode,
//! SQLite with the embedded queue), through a scheduler on a random port;
//! with them, the limits of the HTTP listeners (slow clients), the
//! classification of database errors, the metrics a fresh scheduler lists
//! and the CLI's message for a spec naming a missing project.
//!
//! Tests use the multi-thread runtime, as the binaries do: see
//! docs/DECISIONS.md (Multi-thread runtime only).
//!
//! The ops console's pages are tested in `console.rs`, a module of this
//! binary.
#[path = "console.rs"]
mod console;

use std::time::Duration;

use labelsync_tests::{AppOptions, TestApp, spawn_app, write_files};
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn local_source(project_id: i64, path: &str) -> Value {
    json!({
        "project_id": project_id,
        "role": "source",
        "backend": "local",
        "title": "images",
        "regex_filter": ".*\\.jpg$",
        "recursive": true,
        "import_method": "files",
        "config": { "path": path },
    })
}

async fn storage_count(app: &TestApp) -> usize {
    let (status, list) = app.get("/api/v1/storages").await;
    assert_eq!(status, 200, "{list}");
    list["items"].as_array().expect("items").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_sync_end_to_end() {
    let app = spawn_app(AppOptions::default()).await;
    write_2501_images_and_30_notes(&app);
    let project = app.project("cats").await;
    let id = create_and_validate_the_source(&app, project).await;
    preview_lists_the_first_keys_in_order(&app, id).await;
    let run = first_sync_imports_every_matching_file(&app, id).await;
    tasks_point_at_their_files(&app, project, id).await;
    let rerun = a_resync_creates_nothing_and_counts_what_exists(&app, project, id).await;
    history_lists_runs_newest_first_without_errors(&app, id, &run, &rerun).await;
    app.stop().await;
}

/// 2,500 matching objects over three listing pages, plus files the regex
/// skips, plus one top-level image with a space in its name.
fn write_2501_images_and_30_notes(app: &TestApp) {
    let data = app.doc_root.path().join("data");
    write_files(&data, 2500, "jpg");
    write_files(&data.join("notes"), 30, "txt");
    std::fs::write(data.join("top level.jpg"), b"x").expect("write");
}

async fn create_and_validate_the_source(app: &TestApp, project: i64) -> i64 {
    let (status, storage) = app
        .post("/api/v1/storages", local_source(project, "data"))
        .await;
    assert_eq!(status, 201, "{storage}");
    let id = storage["id"].as_i64().expect("id");
    assert_eq!(storage["secrets_set"], json!([]));
    assert_eq!(storage["last_run"], Value::Null);
    let (status, ok) = app
        .post(&format!("/api/v1/storages/{id}/validate"), json!({}))
        .await;
    assert_eq!((status, &ok), (200, &json!({ "ok": true })));
    id
}

async fn preview_lists_the_first_keys_in_order(app: &TestApp, id: i64) {
    let (status, preview) = app
        .get(&format!("/api/v1/storages/{id}/preview?limit=3"))
        .await;
    assert_eq!(status, 200, "{preview}");
    let keys: Vec<&str> = preview["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["key"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        [
            "part-000/obj-000000.jpg",
            "part-000/obj-000001.jpg",
            "part-000/obj-000002.jpg"
        ]
    );
    assert_eq!(preview["items"][0]["size"], 1);
}

async fn first_sync_imports_every_matching_file(app: &TestApp, id: i64) -> Value {
    let (status, started) = app
        .post(&format!("/api/v1/storages/{id}/sync"), json!({}))
        .await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["already_running"], false);
    let run = app
        .wait_run(started["run"]["id"].as_str().expect("run id"), RUN_TIMEOUT)
        .await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["kind"], "import");
    assert_eq!(run["counters"]["listed"], 2531);
    assert_eq!(run["counters"]["matched"], 2501);
    assert_eq!(run["counters"]["created"], 2501);
    assert_eq!(run["counters"]["existed"], 0);
    assert_eq!(run["attempts"], 1);
    assert!(run["finished_at"].is_string() && run["heartbeat_at"].is_string());
    run
}

async fn tasks_point_at_their_files(app: &TestApp, project: i64, id: i64) {
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 2501);
    let with_space = tasks
        .iter()
        .find(|t| t["source"]["key"] == "top level.jpg")
        .expect("task of the top-level file");
    assert_eq!(
        with_space["data"]["image"],
        "/data/local-files/?d=data/top%20level.jpg"
    );
    assert_eq!(with_space["source"]["storage_id"], id);
    assert_eq!(with_space["source"]["row_index"], 0);
    let (status, project_view) = app.get(&format!("/api/v1/projects/{project}")).await;
    assert_eq!(
        (status, project_view["task_count"].as_i64()),
        (200, Some(2501))
    );
    let (status, one) = app
        .get(&format!("/api/v1/tasks/{}", with_space["id"]))
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["annotations"], json!([]));
    assert_eq!(one["predictions"], json!([]));
}

async fn a_resync_creates_nothing_and_counts_what_exists(
    app: &TestApp,
    project: i64,
    id: i64,
) -> Value {
    let (_, again) = app
        .post(&format!("/api/v1/storages/{id}/sync"), json!({}))
        .await;
    assert_eq!(again["already_running"], false);
    let rerun = app
        .wait_run(again["run"]["id"].as_str().expect("run id"), RUN_TIMEOUT)
        .await;
    assert_eq!(rerun["status"], "completed", "{rerun}");
    assert_eq!(rerun["counters"]["created"], 0);
    assert_eq!(rerun["counters"]["existed"], 2501);
    assert_eq!(app.all_tasks(project).await.len(), 2501);
    rerun
}

/// History: newest first, filterable; the storage shows its last run.
async fn history_lists_runs_newest_first_without_errors(
    app: &TestApp,
    id: i64,
    run: &Value,
    rerun: &Value,
) {
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={id}&status=completed"))
        .await;
    let ids: Vec<&Value> = runs["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| &r["id"])
        .collect();
    assert_eq!(ids, [&rerun["id"], &run["id"]]);
    let (_, storage) = app.get(&format!("/api/v1/storages/{id}")).await;
    assert_eq!(storage["last_run"]["id"], rerun["id"]);
    let (status, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!((status, &errors["items"]), (200, &json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_accepts_a_folder_in_the_document_root_and_refuses_one_outside() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("top level.jpg"), b"x").expect("write");
    let project = app.project("cats").await;
    let (status, ok) = app
        .post("/api/v1/storages/validate", local_source(project, "data"))
        .await;
    assert_eq!((status, &ok), (200, &json!({ "ok": true })));
    let outside = app
        .doc_root
        .path()
        .parent()
        .expect("parent")
        .display()
        .to_string();
    let (status, err) = app
        .post("/api/v1/storages/validate", local_source(project, &outside))
        .await;
    assert!((400..500).contains(&status), "{status} {err}");
    assert_eq!(err["error"]["code"], "path_outside_document_root", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("message")
            .contains("outside the document root")
    );
    let mut by_title = local_source(project, "data");
    by_title["project"] = json!({ "title": "cats" });
    let (status, err) = app.post("/api/v1/storages/validate", by_title).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_body")),
        "the API names projects by id: {err}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sync_while_one_is_live_returns_it() {
    // No worker: the run stays queued, which is "live" just like running.
    let app = spawn_app(AppOptions::without_workers()).await;
    write_files(&app.doc_root.path().join("data"), 5, "jpg");
    let project = app.project("p").await;
    let (_, storage) = app
        .post("/api/v1/storages", local_source(project, "data"))
        .await;
    let path = format!("/api/v1/storages/{}/sync", storage["id"]);

    let (status, first) = app.post(&path, json!({})).await;
    assert_eq!((status, &first["already_running"]), (202, &json!(false)));
    assert_eq!(first["run"]["status"], "queued");
    let (status, second) = app.post(&path, json!({})).await;
    assert_eq!((status, &second["already_running"]), (202, &json!(true)));
    assert_eq!(second["run"]["id"], first["run"]["id"]);

    let (status, queues) = app.get("/api/v1/queues").await;
    assert_eq!(status, 200, "{queues}");
    let queue = &queues["items"][0];
    assert_eq!(
        queue["queue"],
        format!("{}:runs", app.vars["LABELSYNC_QUEUE_NAMESPACE"])
    );
    assert_eq!(
        (
            queue["pending"].as_u64(),
            queue["running"].as_u64(),
            queue["dead"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{queues}"
    );

    let run_id = first["run"]["id"].as_str().expect("id");
    let cancelled = app.cancel(run_id).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let (_, third) = app.post(&path, json!({})).await;
    assert_eq!(third["already_running"], false);
    assert_ne!(third["run"]["id"], first["run"]["id"]);
    app.stop().await;
}

/// An app with one project and its `data` folder, and a valid local source
/// body for that project: the starting point the bad-input tests change one
/// field of.
async fn app_with_a_valid_source_body() -> (TestApp, Value) {
    let app = spawn_app(AppOptions::default()).await;
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("mkdir");
    let project = app.project("p").await;
    let good = local_source(project, "data");
    (app, good)
}

/// A storage PATCH writes over the storage as it read it, or not at all. A
/// pause that landed while it ran stays (every column was written back from
/// its read: the storage unpaused, or secrets just rotated put back), and
/// a PATCH that landed meanwhile makes it a conflict (409), not a lost
/// update; a delete, a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_patch_does_not_undo_what_landed_while_it_ran() {
    use labelsync::db::storages;
    let (app, good) = app_with_a_valid_source_body().await;
    let (status, created) = app.post("/api/v1/storages", good).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().expect("id");
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let read = storages::find(&db, id)
        .await
        .expect("find")
        .expect("the storage");
    let path = format!("/api/v1/storages/{id}");
    let (status, paused) = app.post(&format!("{path}/pause"), json!({})).await;
    assert_eq!(status, 200, "{paused}");

    // What a PATCH that read the storage before the pause writes.
    let mut renamed = read.clone();
    renamed.title = "renamed".into();
    let saved = storages::replace(&db, renamed.clone(), read.updated_at, true)
        .await
        .expect("replace")
        .expect("written");
    assert_eq!(saved.title, "renamed");
    assert!(
        saved.schedule_paused_at.is_some(),
        "the pause stays: {saved:?}"
    );

    let (status, patched) = app.patch(&path, json!({ "title": "patched" })).await;
    assert_eq!(status, 200, "{patched}");
    let late = storages::replace(&db, renamed.clone(), saved.updated_at, true).await;
    assert!(
        late.expect("replace").is_none(),
        "written over a newer PATCH"
    );
    let (_, now) = app.get(&path).await;
    assert_eq!(now["title"], "patched", "{now}");

    // Deleted meanwhile: not found (404), not changed (409).
    let (status, _) = app.delete(&path).await;
    assert_eq!(status, 204);
    let gone = storages::replace(&db, renamed, saved.updated_at, true).await;
    assert!(
        matches!(gone, Err(labelsync::Error::NotFound(_))),
        "{gone:?}"
    );
    app.stop().await;
}

/// A storage saved before the length bounds, with a longer title and
/// prefix, can still be changed: a PATCH that keeps those fields passes,
/// one that gives a new value past a bound is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_saved_before_the_length_bounds_can_still_be_changed() {
    use labelsync::db::storages;
    let (app, good) = app_with_a_valid_source_body().await;
    let (status, created) = app.post("/api/v1/storages", good).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().expect("id");
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let mut old = storages::find(&db, id).await.expect("find").expect("row");
    let read_at = old.updated_at;
    (old.title, old.prefix) = ("t".repeat(1_500), "p/".repeat(600));
    storages::replace(&db, old, read_at, true)
        .await
        .expect("replace")
        .expect("written");

    let path = format!("/api/v1/storages/{id}");
    let (status, patched) = app
        .patch(&path, json!({ "sync_interval_seconds": 3600 }))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["title"].as_str().map(str::len), Some(1_500));
    let (status, patched) = app.patch(&path, json!({ "title": "short" })).await;
    assert_eq!(status, 200, "{patched}");
    let longer = "t".repeat(1_001);
    let (status, refused) = app.patch(&path, json!({ "title": longer })).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!("invalid_title"))
    );
    app.stop().await;
}

/// A storage's config and secrets are bounded in bytes like its text
/// fields (a config of megabytes was saved, and shown in every list of
/// storages; a write token made a list of gigabytes); a storage whose
/// config is kept by a PATCH passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_configs_and_secrets_are_bounded_in_bytes() {
    let app = spawn_app(AppOptions::with_storages()).await;
    let project = app.project("p").await;
    let s3 = |config: Value, secret: &str| {
        json!({
            "project_id": project, "role": "source", "backend": "s3",
            "config": config,
            "secrets": { "access_key_id": "x", "secret_access_key": secret },
        })
    };
    let endpoint = "http://127.0.0.1:19000";
    let (status, made) = app
        .post(
            "/api/v1/storages",
            s3(json!({ "bucket": "b", "endpoint_url": endpoint }), "y"),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let long = "k".repeat(20_000);
    let big = json!({ "bucket": "b", "endpoint_url": endpoint, "sse_kms_key_id": long });
    let (status, refused) = app.post("/api/v1/storages", s3(big, "y")).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!("invalid_config")),
        "{refused}"
    );
    let small = json!({ "bucket": "b", "endpoint_url": endpoint });
    let (status, refused) = app.post("/api/v1/storages", s3(small, &long)).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!("invalid_secrets")),
        "{refused}"
    );
    assert!(!refused.to_string().contains("kkkk"), "{refused}");
    let (status, page) = app.get("/api/v1/storages").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    app.stop().await;
}

/// A request target longer than 32 KiB is a 414 before anything reads it:
/// a caller, even a refused one, wrote an audit row of its whole path
/// (tens of KB, which hyper takes in a request's head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_targets_are_refused_before_the_audit_trail() {
    use sea_orm::{EntityTrait, PaginatorTrait};
    let app = spawn_app(AppOptions::default()).await;
    // (Past 64 KB, hyper itself refuses the head.)
    let long = "A".repeat(60_000);
    for path in [
        format!("/api/v1/runs/{long}/cancel"),
        format!("/api/v1/projects?after={long}"),
    ] {
        let (status, body) = app.post(&path, json!({})).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (414, &json!("uri_too_long")),
            "{body}"
        );
    }
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let rows = labelsync::db::entities::audit_event::Entity::find()
        .count(&db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "nothing recorded");
    let (status, _) = app.post("/api/v1/runs/short/cancel", json!({})).await;
    assert_eq!(status, 404, "a short unknown id is still looked up");
    app.stop().await;
}

/// A page of large tasks ends at 32 MiB of JSON, with `next_after` set,
/// whatever `limit` asks: three tasks of 12 MB come as two pages (one page
/// of 36 MB before; 1,000 tasks of 16 MiB were a 16 GB answer held whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_large_tasks_is_cut_at_its_byte_budget() {
    let app = spawn_app(AppOptions::default()).await;
    let dir = app.doc_root.path().join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    for i in 0..3 {
        let task = json!({ "text": format!("{i}{}", "x".repeat(12_000_000)) });
        std::fs::write(dir.join(format!("big-{i}.json")), task.to_string()).expect("write");
    }
    let project = app.project("big tasks").await;
    let storage = app
        .local_storage(project, json!({ "import_method": "tasks" }))
        .await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["counters"]["created"], 3, "{run}");
    let tasks = format!("/api/v1/projects/{project}/tasks?limit=100");
    let (status, first) = app.get(&tasks).await;
    assert_eq!(status, 200);
    let items = first["items"].as_array().expect("items");
    assert_eq!(
        items.len(),
        2,
        "two tasks of 12 MB fit 32 MiB, three do not"
    );
    let after = first["next_after"]
        .as_i64()
        .expect("next_after set on a cut page");
    assert_eq!(Some(after), items[1]["id"].as_i64());
    let (_, rest) = app.get(&format!("{tasks}&after={after}")).await;
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest["next_after"], Value::Null);
    a_task_shows_the_annotations_it_has_room_for(&app, after).await;
    let first = items[0]["id"].as_i64().expect("id");
    a_thousand_annotations_are_all_shown_and_one_more_is_named(&app, first).await;
    app.stop().await;
}

/// A task with exactly 1,000 small annotations shows them all and names no
/// rest; with one more, the rest begins after the 1,000th.
async fn a_thousand_annotations_are_all_shown_and_one_more_is_named(app: &TestApp, task: i64) {
    use sea_orm::ConnectionTrait;
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let add = |n: i64| {
        format!(
            "INSERT INTO annotations (task_id, project_id, result, was_cancelled, ground_truth, created_at, updated_at) \
             SELECT t.id, t.project_id, '[]'::jsonb, false, false, now(), now() \
             FROM tasks t, generate_series(1, {n}) WHERE t.id = {task}"
        )
    };
    db.execute_unprepared(&add(1000)).await.expect("insert");
    let (_, shown) = app.get(&format!("/api/v1/tasks/{task}")).await;
    assert_eq!(shown["annotations"].as_array().map(Vec::len), Some(1000));
    assert_eq!(
        shown["annotations_next_after"],
        Value::Null,
        "every one is shown"
    );
    db.execute_unprepared(&add(1)).await.expect("insert");
    let (_, shown) = app.get(&format!("/api/v1/tasks/{task}")).await;
    let last_shown = shown["annotations"][999]["id"].clone();
    assert_eq!(
        shown["annotations_next_after"], last_shown,
        "one more is named"
    );
}

/// Twenty annotations of 1.9 MB: `GET /tasks/{id}` shows those within
/// 32 MiB and says where the rest begin (it held them all before);
/// `GET /tasks/{id}/annotations` pages through every one.
async fn a_task_shows_the_annotations_it_has_room_for(app: &TestApp, task: i64) {
    let path = format!("/api/v1/tasks/{task}/annotations");
    for i in 0..20 {
        let text = format!("{i}{}", "y".repeat(1_900_000));
        let body = json!({ "result": [{ "type": "textarea", "value": { "text": [text] } }] });
        let (status, saved) = app.post(&path, body).await;
        assert_eq!(status, 201, "{saved}");
    }
    let (status, shown) = app.get(&format!("/api/v1/tasks/{task}")).await;
    assert_eq!(status, 200);
    let embedded = shown["annotations"].as_array().expect("annotations").len();
    assert!((1..20).contains(&embedded), "{embedded} of 20 shown");
    let mut after = shown["annotations_next_after"]
        .as_i64()
        .expect("the rest named");
    let mut seen = embedded;
    loop {
        let (status, page) = app.get(&format!("{path}?after={after}")).await;
        assert_eq!(status, 200);
        seen += page["items"].as_array().expect("items").len();
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, 20);
}

/// Storage bodies each with one thing wrong: what it is, the body, and the
/// status and error code it must get.
fn bad_storage_bodies(good: &Value) -> Vec<(&'static str, Value, u16, &'static str)> {
    let mut cases: Vec<(&str, Value, u16, &str)> = Vec::new();
    let mut bad_regex = good.clone();
    bad_regex["regex_filter"] = json!("(unclosed");
    cases.push(("invalid regex", bad_regex, 400, "invalid_regex"));
    // Text shown in every list of storages has a bound.
    for (field, value, code) in [
        ("title", "t".repeat(1_001), "invalid_title"),
        ("prefix", "p".repeat(1_025), "invalid_prefix"),
        ("regex_filter", "a".repeat(4_097), "invalid_regex"),
    ] {
        let mut long = good.clone();
        long[field] = json!(value);
        cases.push(("a long text field", long, 400, code));
    }
    cases.extend(prefixes_with_an_empty_segment(good));
    let mut unknown_backend = good.clone();
    unknown_backend["backend"] = json!("ftp");
    cases.push(("unknown backend", unknown_backend, 400, "unknown_backend"));
    let mut no_path = good.clone();
    no_path["config"] = json!({});
    cases.push(("missing config field", no_path, 400, "invalid_config"));
    let mut unknown_field = good.clone();
    unknown_field["colour"] = json!("blue");
    cases.push(("unknown field", unknown_field, 400, "invalid_body"));
    cases.extend(paths_outside_the_root(good));
    let mut no_project = good.clone();
    no_project["project_id"] = json!(999_999);
    cases.push(("unknown project", no_project, 400, "unknown_project"));
    let mut secrets = good.clone();
    secrets["secrets"] = json!({ "password": "hunter2" });
    cases.push((
        "secrets for a backend without any",
        secrets,
        400,
        "invalid_secrets",
    ));
    let mut bad_role = good.clone();
    bad_role["role"] = json!("sink");
    cases.push(("bad role", bad_role, 400, "invalid_body"));
    for (what, value) in [
        ("unknown on_missing", json!("delete")),
        ("on_missing of another case", json!("Keep")),
        ("on_missing not a string", json!(true)),
        ("on_missing null", Value::Null),
    ] {
        let mut bad = good.clone();
        bad["on_missing"] = value;
        cases.push((what, bad, 400, "invalid_on_missing"));
    }
    let mut target = good.clone();
    target["role"] = json!("target");
    target["on_missing"] = json!("delete_unlabeled");
    cases.push(("on_missing on a target", target, 400, "invalid_on_missing"));
    let mut by_title = good.clone();
    by_title["project"] = json!({ "title": "p" });
    cases.push(("a project by title", by_title, 400, "invalid_body"));
    // serde would read an array as the fields in order.
    let array = json!([good["project_id"], "source", "local"]);
    cases.push(("an array", array, 400, "invalid_body"));
    cases
}

/// Local paths that leave the document root, refused before anything is
/// read there.
fn paths_outside_the_root(good: &Value) -> Vec<(&'static str, Value, u16, &'static str)> {
    let mut cases = Vec::new();
    let mut outside = good.clone();
    outside["config"] = json!({ "path": "/etc" });
    cases.push((
        "path outside the root",
        outside,
        400,
        "path_outside_document_root",
    ));
    let mut dotdot = good.clone();
    dotdot["config"] = json!({ "path": "data/../.." });
    cases.push(("path with ..", dotdot, 400, "path_outside_document_root"));
    // Refused before the disk is asked (a missing path was `invalid_path`,
    // an existing one outside, `path_outside_document_root`).
    let mut missing_above = good.clone();
    missing_above["config"] = json!({ "path": "../no-such-dir-anywhere" });
    cases.push((
        "a missing path above the root",
        missing_above,
        400,
        "path_outside_document_root",
    ));
    cases
}

/// Local keys are paths: a prefix with an empty segment, or a `..`
/// between `\` separators, prefixes no key they can hold.
fn prefixes_with_an_empty_segment(good: &Value) -> Vec<(&'static str, Value, u16, &'static str)> {
    [
        "a//b",
        "a//",
        "a/b//c/",
        "a\\..\\b/",
        "a/..\\b",
        "a/%5c..%5cb/",
    ]
    .into_iter()
    .map(|prefix| {
        let mut doubled = good.clone();
        doubled["prefix"] = json!(prefix);
        (
            "a prefix with an empty segment",
            doubled,
            400,
            "invalid_prefix",
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_storage_bodies_get_400_with_code_and_message_and_write_nothing() {
    let (app, good) = app_with_a_valid_source_body().await;
    for (what, body, status, code) in bad_storage_bodies(&good) {
        let (got, err) = app.post("/api/v1/storages", body).await;
        assert_eq!(got, status, "{what}: {err}");
        assert_eq!(err["error"]["code"], code, "{what}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: no message in {err}");
        assert!(
            !message.contains("hunter2"),
            "{what}: secret echoed in {err}"
        );
    }
    let (status, err) = app
        .post_raw("/api/v1/storages", "{\"project_id\": 1, ")
        .await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_json")),
        "{err}"
    );
    let mut long_period = good.clone();
    long_period["sync_interval_seconds"] = json!(9_000_000_000_000_000_i64);
    let (status, err) = app.post("/api/v1/storages", long_period).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_sync_interval")),
        "{err}"
    );
    assert_eq!(
        storage_count(&app).await,
        0,
        "a rejected body must write nothing"
    );
    let mut one_slash = good.clone();
    one_slash["prefix"] = json!("a/b/");
    let (status, made) = app.post("/api/v1/storages", one_slash).await;
    assert_eq!(
        status, 201,
        "one '/' at the end is no empty segment: {made}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_for_secrets_is_refused_without_echoing_it() {
    let (app, good) = app_with_a_valid_source_body().await;
    let mut secret_string = good.clone();
    secret_string["secrets"] = json!("AKIAEXAMPLESECRET");
    let (status, err) = app.post("/api/v1/storages", secret_string).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_secrets")),
        "{err}"
    );
    assert!(
        !err.to_string().contains("AKIAEXAMPLESECRET"),
        "secret echoed: {err}"
    );
    assert_eq!(
        storage_count(&app).await,
        0,
        "a rejected body must write nothing"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_and_path_parameters_get_4xx_with_code() {
    let app = spawn_app(AppOptions::default()).await;
    // A value of the wrong type gets its field's own code, as one out of
    // range does (it was the generic invalid_query / invalid_body, with no
    // field); an unknown one the generic code, naming it.
    let (status, err) = app.get("/api/v1/projects?limit=abc").await;
    assert_eq!(
        (status, &err["error"]["code"], &err["error"]["field"]),
        (400, &json!("invalid_limit"), &json!("limit")),
        "{err}"
    );
    let (status, err) = app.get("/api/v1/storages?colour=blue").await;
    assert_eq!(
        (status, &err["error"]["code"], &err["error"]["field"]),
        (400, &json!("invalid_query"), &json!("colour")),
        "{err}"
    );
    for (path, body, code, field) in [
        (
            "/api/v1/tokens",
            json!({ "name": "t", "scope": "read", "expires_at": 5 }),
            "invalid_expires_at",
            "expires_at",
        ),
        (
            "/api/v1/tasks/1/annotations",
            json!({ "result": [], "lead_time": "slow" }),
            "invalid_lead_time",
            "lead_time",
        ),
        (
            "/api/v1/webhooks",
            json!({ "url": "http://example.com/", "events": "run.finished" }),
            "invalid_events",
            "events",
        ),
        (
            "/api/v1/tokens",
            json!({ "name": "t", "scope": "read", "projects": [1, "two"] }),
            "invalid_projects",
            "projects",
        ),
        (
            "/api/v1/webhooks",
            json!({ "events": ["run.finished"] }),
            "missing_field",
            "url",
        ),
        (
            "/api/v1/projects",
            json!({ "title": "t", "colour": "blue" }),
            "invalid_body",
            "colour",
        ),
    ] {
        let (status, err) = app.post(path, body).await;
        assert_eq!(
            (status, &err["error"]["code"], &err["error"]["field"]),
            (400, &json!(code), &json!(field)),
            "{path}: {err}"
        );
    }
    let (status, err) = app.get("/api/v1/projects/abc").await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_path")),
        "{err}"
    );
    let (status, err) = app.get("/api/v1/projects?limit=5000").await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_limit")),
        "{err}"
    );
    let (status, err) = app.get("/api/v1/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (404, &json!("not_found")),
        "{err}"
    );
    let (status, err) = app.get("/api/v1/runs?status=bogus").await;
    assert_eq!(
        (status, &err["error"]["field"]),
        (400, &json!("status")),
        "{err}"
    );
    app.stop().await;
}

/// Every route of the document refuses a query parameter it does not
/// have, with or without a query of its own: routes without one ignored it
/// (`POST /storages/1/sync?full=true` was a plain sync, said nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_a_query_parameter_it_does_not_have() {
    let app = spawn_app(AppOptions::default()).await;
    let (status, project) = app
        .post("/api/v1/projects", json!({ "title": "kept" }))
        .await;
    assert_eq!(status, 201, "{project}");
    let (_, document) = app.get("/api/v1/openapi.json").await;
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (template, operations) in paths {
        // The probes and the scrape answer whatever URL an orchestrator or
        // a scrape config was given.
        if !template.starts_with("/api/v1/") {
            continue;
        }
        let path = template
            .replace("{id}", &project["id"].to_string())
            .replace("{delivery_id}", "1");
        for method in operations.as_object().expect("operations").keys() {
            let method = match method.as_str() {
                "get" => reqwest::Method::GET,
                "post" => reqwest::Method::POST,
                "patch" => reqwest::Method::PATCH,
                "delete" => reqwest::Method::DELETE,
                _ => continue,
            };
            let body =
                matches!(method, reqwest::Method::POST | reqwest::Method::PATCH).then(|| json!({}));
            let url = format!("{path}?unexpected=1");
            let (status, err) = app.request(method.clone(), &url, body).await;
            assert_eq!(
                (status, &err["error"]["code"], &err["error"]["field"]),
                (400, &json!("invalid_query"), &json!("unexpected")),
                "{method} {url}: {err}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 45, "only {checked} operations in the document");
    let (status, kept) = app
        .get(&format!("/api/v1/projects/{}", project["id"]))
        .await;
    assert_eq!((status, &kept["title"]), (200, &json!("kept")), "{kept}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_storage_sync_starts_an_export_run() {
    let (app, good) = app_with_a_valid_source_body().await;
    let mut target = good.clone();
    target["role"] = json!("target");
    let (status, target) = app.post("/api/v1/storages", target).await;
    assert_eq!(status, 201, "{target}");
    // A target's sync is an export run (it used to be refused before export
    // was built).
    let (status, started) = app
        .post(
            &format!("/api/v1/storages/{}/sync", target["id"]),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, &started["run"]["kind"]),
        (202, &json!("export")),
        "{started}"
    );
    let (status, _) = app
        .delete(&format!("/api/v1/storages/{}", target["id"]))
        .await;
    assert_eq!(status, 204);
    assert_eq!(storage_count(&app).await, 0, "the deleted target is gone");
    app.stop().await;
}

/// Posts a 3 MB project body and returns the server's answer. The server
/// answers 413 before reading the whole body and closes the connection, so
/// the client may see its upload cut instead of the answer (the close
/// resets the connection while the body is still coming, and the reset can
/// discard the answer); tries, a moment apart, get the answer itself. Five
/// were once not enough with the whole suite running on two cores.
async fn post_a_3_mb_project_body(app: &TestApp) -> Option<(u16, Value)> {
    let huge = json!({ "title": "x".repeat(3 << 20) });
    for _ in 0..20 {
        // Its own client: the connection the server closes must not be
        // pooled and reused by the requests after this one.
        let sent = reqwest::Client::new()
            .post(format!("{}/api/v1/projects", app.base))
            .json(&huge)
            .send()
            .await;
        if let Ok(resp) = sent {
            return Some((
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Sends only the headers of a 100 MB project body and returns the start of
/// the answer the server gives without reading any of the body.
async fn send_the_headers_of_a_100_mb_project_body(app: &TestApp) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/projects HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        100 << 20
    );
    conn.write_all(head.as_bytes()).await.expect("send headers");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("an answer without the body")
        .expect("read");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_project_bodies_get_4xx_with_code_and_create_nothing() {
    let (app, _) = app_with_a_valid_source_body().await;
    let (status, err) = post_a_3_mb_project_body(&app)
        .await
        .expect("a 413 answer in five tries");
    assert_eq!(
        (status, &err["error"]["code"]),
        (413, &json!("body_too_large")),
        "{err}"
    );
    // A 100 MB body is refused from its Content-Length, before any of it is
    // read: headers alone get the 413.
    let answer = send_the_headers_of_a_100_mb_project_body(&app).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    let (status, err) = app.post_raw("/api/v1/projects", "not json").await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_json")),
        "{err}"
    );
    let (status, err) = app
        .post("/api/v1/projects", json!({ "data_key": "image" }))
        .await;
    assert_eq!(
        (status, &err["error"]["field"]),
        (400, &json!("title")),
        "{err}"
    );
    // serde would read an array as the fields in order: a project "t".
    let (status, err) = app.post_raw("/api/v1/projects", r#"["t", null]"#).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_body")),
        "{err}"
    );
    // ASCII only, as the document's pattern says.
    let (status, err) = app
        .post(
            "/api/v1/projects",
            json!({ "title": "t", "data_key": "bild_ü" }),
        )
        .await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_data_key")),
        "{err}"
    );
    // A title shown in every list has a bound.
    let long = json!({ "title": "t".repeat(1_001), "data_key": "image" });
    let (status, err) = app.post("/api/v1/projects", long).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_title")),
        "{err}"
    );
    // Only the fixture's own project.
    let (_, projects) = app.get("/api/v1/projects").await;
    assert_eq!(projects["items"].as_array().expect("items").len(), 1);
    app.stop().await;
}

/// The periodic tick takes at most 100 due storages: the longest overdue
/// come first, so storages due again at every tick (a 1 s period) cannot
/// take every place and starve one that waited an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_overdue_storages_are_taken_first() {
    let mut opts = AppOptions::without_workers();
    // The tick fires once at the start, then not within the test.
    opts.env
        .push(("LABELSYNC_SCHEDULE_TICK_MS", "3600000".into()));
    let app = spawn_app(opts).await;
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("mkdir");
    let project = app.project("periods").await;
    let mut ids = Vec::new();
    for _ in 0..101 {
        let mut body = local_source(project, "data");
        body["sync_interval_seconds"] = json!(3600);
        let (status, created) = app.post("/api/v1/storages", body).await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_i64().expect("id"));
    }
    let db = labelsync::db::connect(&app.database_url)
        .await
        .expect("the test database");
    let last = *ids.last().expect("ids");
    // Updated last, the overdue row is last in the table's storage order.
    for (sql, id) in [
        ("now() - interval '1 second'", None),
        ("now() - interval '1 hour'", Some(last)),
    ] {
        let which = id.map_or(format!("id <> {last}"), |id| format!("id = {id}"));
        let update = format!("UPDATE storages SET next_sync_at = {sql} WHERE {which}");
        sea_orm::ConnectionTrait::execute_unprepared(&db, &update)
            .await
            .expect("update");
    }
    let due = labelsync::db::storages::due_for_sync(&db, chrono::Utc::now(), 100)
        .await
        .expect("due storages");
    assert_eq!(due.len(), 100);
    assert_eq!(due[0].0, last, "the hour-overdue storage first: {due:?}");
    app.stop().await;
}

/// A PATCH that changes a storage's config must give its kept secrets
/// again: whoever may edit the storage cannot send keys an admin set to an
/// endpoint of theirs (or open another bucket with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_needs_the_kept_secrets_again() {
    let app = spawn_app(AppOptions::with_storages()).await;
    let project = app.project("moved").await;
    let home = "http://127.0.0.1:19000";
    let (status, created) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": "s3",
                "config": { "bucket": "media", "endpoint_url": home },
                "secrets": { "access_key_id": "admin-key", "secret_access_key": "admin-secret" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let path = format!("/api/v1/storages/{}", created["id"]);
    let away = json!({ "endpoint_url": "http://127.0.0.1:9" });
    let (status, err) = app.patch(&path, json!({ "config": away })).await;
    assert_eq!(
        (status, &err["error"]["code"], &err["error"]["field"]),
        (400, &json!("secrets_required"), &json!("secrets")),
        "{err}"
    );
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("config.endpoint_url")
            && message.contains("secrets.access_key_id")
            && message.contains("secrets.secret_access_key"),
        "{message}"
    );
    let (_, stored) = app.get(&path).await;
    assert_eq!(stored["config"]["endpoint_url"], home, "nothing written");
    // One secret given again: the other is still named.
    let (status, err) = app
        .patch(
            &path,
            json!({ "config": { "bucket": "other" }, "secrets": { "access_key_id": "k2" } }),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("config.bucket")
            && message.contains("secrets.secret_access_key")
            && !message.contains("secrets.access_key_id"),
        "{message}"
    );
    // So does the prefix: tenants of one bucket are told apart by it.
    let (status, err) = app.patch(&path, json!({ "prefix": "others/" })).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("secrets_required")),
        "{err}"
    );
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("changing prefix"), "{message}");
    // The same values again, or other fields, change nothing.
    let (status, same) = app
        .patch(
            &path,
            json!({ "config": { "endpoint_url": home }, "title": "renamed" }),
        )
        .await;
    assert_eq!(status, 200, "{same}");
    // With every secret given again the move is taken.
    let (status, moved) = app
        .patch(
            &path,
            json!({
                "config": away,
                "secrets": { "access_key_id": "own-key", "secret_access_key": "own-secret" },
            }),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["config"]["endpoint_url"], "http://127.0.0.1:9");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_merges_and_refuses_backend_changes() {
    let app = spawn_app(AppOptions::default()).await;
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("mkdir");
    let project = app.project("p").await;
    let (_, storage) = app
        .post("/api/v1/storages", local_source(project, "data"))
        .await;
    let path = format!("/api/v1/storages/{}", storage["id"]);

    let (status, patched) = app
        .patch(
            &path,
            json!({ "regex_filter": ".*\\.png$", "title": "pngs" }),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["regex_filter"], ".*\\.png$");
    assert_eq!(patched["title"], "pngs");
    assert_eq!(
        patched["config"],
        json!({ "path": "data" }),
        "omitted fields are kept"
    );
    assert_eq!(patched["recursive"], true);

    let (status, err) = app.patch(&path, json!({ "backend": "s3" })).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("immutable_field")),
        "{err}"
    );
    let (status, err) = app.patch(&path, json!({ "regex_filter": "[" })).await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_regex")),
        "{err}"
    );
    let (_, unchanged) = app.get(&path).await;
    assert_eq!(
        unchanged["regex_filter"], ".*\\.png$",
        "a refused PATCH changes nothing"
    );

    // Deleting the project takes its storages with it.
    let (status, _) = app.delete(&format!("/api/v1/projects/{project}")).await;
    assert_eq!(status, 204);
    let (status, _) = app.get(&path).await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// `on_missing`: shown (`flag` unless given), changed by PATCH like other
/// fields; a bad value is `400 invalid_on_missing` naming the allowed
/// values and changes nothing; a target takes only the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_missing_is_shown_patched_and_checked() {
    let (app, good) = app_with_a_valid_source_body().await;
    let (status, source) = app.post("/api/v1/storages", good.clone()).await;
    assert_eq!(
        (status, &source["on_missing"]),
        (201, &json!("flag")),
        "{source}"
    );
    let path = format!("/api/v1/storages/{}", source["id"]);
    let (status, patched) = app
        .patch(&path, json!({ "on_missing": "delete_unlabeled" }))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["on_missing"], "delete_unlabeled");
    assert_eq!(patched["regex_filter"], good["regex_filter"], "others kept");

    let (status, err) = app.patch(&path, json!({ "on_missing": "purge" })).await;
    assert_eq!(
        (status, &err["error"]["code"], &err["error"]["field"]),
        (400, &json!("invalid_on_missing"), &json!("on_missing")),
        "{err}"
    );
    let message = err["error"]["message"].as_str().unwrap_or_default();
    for allowed in ["\"keep\"", "\"flag\"", "\"delete_unlabeled\""] {
        assert!(message.contains(allowed), "{allowed} not named in {err}");
    }
    let (_, unchanged) = app.get(&path).await;
    assert_eq!(unchanged["on_missing"], "delete_unlabeled", "{unchanged}");

    let mut target = good.clone();
    target["role"] = json!("target");
    target["on_missing"] = json!("flag");
    let (status, target) = app.post("/api/v1/storages", target).await;
    assert_eq!(
        (status, &target["on_missing"]),
        (201, &json!("flag")),
        "{target}"
    );
    let target_path = format!("/api/v1/storages/{}", target["id"]);
    let (status, err) = app
        .patch(&target_path, json!({ "on_missing": "keep" }))
        .await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("invalid_on_missing")),
        "{err}"
    );
    app.stop().await;
}

/// Every (method, path) the OpenAPI document lists, path parameters filled in.
async fn documented_routes(app: &TestApp) -> Vec<(reqwest::Method, String)> {
    let (status, doc) = app.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let filled = path.replace("{id}", "1").replace("{delivery_id}", "1");
        for method in ["get", "post", "patch", "delete"] {
            if item.get(method).is_some() {
                routes.push((
                    reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"),
                    filled.clone(),
                ));
            }
        }
    }
    assert!(routes.len() >= 20, "{routes:?}");
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_the_bearer_token() {
    let app = spawn_app(AppOptions {
        token: Some("s3cret-token".into()),
        ..AppOptions::default()
    })
    .await;
    let anonymous = reqwest::Client::new();
    let mut routes = documented_routes(&app).await;
    routes.push((reqwest::Method::GET, "/api/v1/no-such-route".into()));
    for (method, path) in routes.iter().filter(|(_, p)| p.starts_with("/api/")) {
        let url = format!("{}{path}", app.base);
        for auth in [None, Some("wrong-token"), Some("s3cret-token-but-longer")] {
            let mut req = anonymous.request(method.clone(), &url);
            if let Some(token) = auth {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
            let body: Value = resp.json().await.expect("json");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    let (status, _) = app.get("/api/v1/projects").await;
    assert_eq!(status, 200, "the right token is let through");
    let lowercase = anonymous
        .get(format!("{}/api/v1/projects", app.base))
        .header("authorization", "bearer s3cret-token")
        .send()
        .await
        .expect("request");
    assert_eq!(lowercase.status(), 200, "the scheme is case-insensitive");
    let health = anonymous
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200, "probes stay open");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_exists() {
    let app = spawn_app(AppOptions::default()).await;
    for (method, path) in documented_routes(&app).await {
        let resp = app
            .client
            .request(method.clone(), format!("{}{path}", app.base))
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        // An event stream does not end: its head is the answer.
        let stream = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "text/event-stream");
        let body: Value = match stream {
            true => Value::Null,
            false => resp.json().await.unwrap_or(Value::Null),
        };
        assert_ne!(status, 405, "{method} {path} is documented but not routed");
        assert_ne!(
            body["error"]["message"], "no such API route",
            "{method} {path} is documented but not routed"
        );
        assert!(status < 500, "{method} {path}: {status} {body}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_syncs_on_sqlite_with_no_redis() {
    let app = spawn_app(AppOptions {
        embedded: true,
        ..AppOptions::default()
    })
    .await;
    assert!(app.database_url.starts_with("sqlite:"));
    assert!(!app.vars.contains_key("REDIS_URL"));
    write_files(&app.doc_root.path().join("data"), 1200, "jpg");
    let project = app.project("embedded").await;
    let (_, storage) = app
        .post("/api/v1/storages", local_source(project, "data"))
        .await;
    let run_id = app.start_sync(&storage["id"]).await;
    let run = app.wait_run(&run_id, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 1200);
    annotations_save_on_sqlite(&app, project).await;
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(
        (status, &ready),
        (
            200,
            &json!({ "database": true, "migrated": true, "queue": true })
        )
    );
    app.stop().await;
}

/// An annotation saved on a task (one insert that reads the task) and read
/// back with its fields; one on a task that does not exist is a 404.
async fn annotations_save_on_sqlite(app: &TestApp, project: i64) {
    let task = app.all_tasks(project).await[0]["id"]
        .as_i64()
        .expect("task id");
    let body = json!({
        "result": [{ "type": "choices", "value": { "choices": ["cat"] } }],
        "completed_by": { "id": 7 }, "lead_time": 2.5, "ground_truth": true,
    });
    let (status, saved) = app
        .post(&format!("/api/v1/tasks/{task}/annotations"), body.clone())
        .await;
    assert_eq!(status, 201, "{saved}");
    let (status, read) = app
        .get(&format!("/api/v1/annotations/{}", saved["id"]))
        .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(
        (read["task_id"].as_i64(), read["project_id"].as_i64()),
        (Some(task), Some(project))
    );
    for field in ["result", "completed_by", "lead_time", "ground_truth"] {
        assert_eq!(read[field], body[field], "{field}: {read}");
    }
    assert_eq!(read["was_cancelled"], false, "{read}");
    // `null` clears the completer (a PATCH read it as absent and kept it).
    let path = format!("/api/v1/annotations/{}", saved["id"]);
    let (status, cleared) = app.patch(&path, json!({ "completed_by": null })).await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["completed_by"], Value::Null, "{cleared}");
    assert_eq!(cleared["lead_time"], 2.5, "the rest is kept: {cleared}");
    let (status, body) = app.post("/api/v1/tasks/999999999/annotations", body).await;
    assert_eq!(status, 404, "{body}");
}

/// The scheduler's `/metrics`: Prometheus text with the jobs its embedded
/// worker ran, the storage requests, resolve requests and the queue depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_serves_prometheus_metrics() {
    let app = spawn_app(AppOptions {
        env: vec![("LOCAL_FILES_SERVING_ENABLED", "true".into())],
        ..AppOptions::default()
    })
    .await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("a.jpg"), b"jpeg").expect("file");
    let project = app.project("metrics").await;
    let storage = app
        .local_storage(project, json!({ "presign": false }))
        .await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let resolved = app
        .client
        .get(format!("{}/api/v1/resolve", app.base))
        .query(&[
            ("project_id", project.to_string()),
            ("uri", "/data/local-files/?d=data/a.jpg".into()),
        ])
        .send()
        .await
        .expect("resolve");
    assert_eq!(resolved.status(), 200);
    assert_eq!(resolved.bytes().await.expect("body").as_ref(), b"jpeg");

    let resp = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/plain")
    );
    let text = resp.text().await.expect("text");
    for needle in [
        "# TYPE labelsync_jobs_finished_total counter",
        "labelsync_jobs_finished_total{kind=\"import\",outcome=\"completed\"",
        "# TYPE labelsync_job_duration_seconds histogram",
        "labelsync_storage_requests_total{backend=\"local\",operation=\"get\"",
        "labelsync_resolve_requests_total{backend=\"local\",mode=\"proxy\",status=\"200\"",
        "labelsync_resolve_bytes_total{backend=\"local\"",
        "labelsync_queue_jobs{",
        "state=\"pending\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    // Counters start at 0 for every known label set: what this test did
    // must have counted.
    for (name, labels) in [
        (
            "labelsync_jobs_finished_total",
            &[("kind", "import"), ("outcome", "completed")][..],
        ),
        (
            "labelsync_storage_requests_total",
            &[
                ("backend", "local"),
                ("operation", "list"),
                ("outcome", "ok"),
            ],
        ),
        ("labelsync_resolve_bytes_total", &[("backend", "local")]),
    ] {
        let counted = sample(&text, name, labels).unwrap_or_default();
        assert!(counted >= 1.0, "{name} {labels:?} is {counted}:\n{text}");
    }
    app.stop().await;
}

/// Slowloris (#14, item 9): hundreds of connections that never finish their
/// request headers, and one that never finishes its body, neither starve
/// other clients nor stay open: the server is capped at 32 connections here
/// and still answers a normal request at once (a connection still waiting
/// for its request makes room for a new one), closes the half-sent ones
/// after the header timeout, and answers a stalled body with 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_neither_starve_the_server_nor_stay_connected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SLOW_CLIENTS: usize = 200;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    let app = spawn_app(AppOptions {
        embedded: true,
        workers: false,
        env: vec![
            ("LABELSYNC_HEADER_TIMEOUT_SECS", "2".into()),
            ("LABELSYNC_BODY_TIMEOUT_SECS", "2".into()),
            ("LABELSYNC_MAX_CONNECTIONS", "32".into()),
        ],
        ..AppOptions::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..SLOW_CLIENTS {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!("GET /api/v1/projects HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
        conn.write_all(head.as_bytes())
            .await
            .expect("half a request");
        slow.push(conn);
    }
    let opened = tokio::time::Instant::now();

    let asked = std::time::Instant::now();
    let answer = reqwest::Client::new()
        .get(format!("{}/api/v1/projects", app.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("a normal request is answered while slow clients hold connections");
    assert_eq!(answer.status(), 200);
    assert!(
        asked.elapsed() < HEADER_TIMEOUT,
        "answered after {:?}: it waited for slow clients to time out",
        asked.elapsed()
    );

    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/projects HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"title\": "
    );
    stalled.write_all(head.as_bytes()).await.expect("send");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut reply))
        .await
        .expect("a stalled body is answered and closed within the body timeout")
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("body_timeout"), "{reply}");

    // Each half-sent connection is closed by the server (EOF or reset)
    // within the header timeout, plus slack for a loaded machine.
    let deadline = opened + HEADER_TIMEOUT + Duration::from_secs(5);
    for (i, mut conn) in slow.into_iter().enumerate() {
        let mut rest = Vec::new();
        tokio::time::timeout_at(deadline, conn.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("half-sent connection {i} still open"))
            .ok();
    }
    let (status, _) = app.get("/api/v1/projects").await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// Probes and scrapes on a listener of their own (`LABELSYNC_PROBE_BIND`)
/// are answered when every connection the API takes is busy inside a
/// request (slow uploads, media proxied to slow clients, streams): on the
/// API's port they wait for one to end, and a liveness probe that waits
/// restarts a scheduler that is only busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_on_their_own_port_when_the_api_is_full() {
    use tokio::io::AsyncWriteExt;
    let probes = labelsync_tests::free_local_addr();
    let app = spawn_app(AppOptions {
        embedded: true,
        workers: false,
        env: vec![
            ("LABELSYNC_BODY_TIMEOUT_SECS", "20".into()),
            ("LABELSYNC_MAX_CONNECTIONS", "2".into()),
            ("LABELSYNC_PROBE_BIND", probes.clone()),
        ],
        ..AppOptions::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /api/v1/projects HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"title\": "
        );
        conn.write_all(head.as_bytes()).await.expect("send");
        busy.push(conn);
    }
    // Their heads read, they are inside requests: the cap closes neither
    // to make room for the probe below.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = reqwest::Client::new();
    let probe = |base: String, path: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(format!("{base}{path}"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
        }
    };
    assert!(
        probe(app.base.clone(), "/healthz").await.is_err(),
        "the API's port answered with every connection busy: the test holds none"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = probe(format!("http://{probes}"), path)
            .await
            .unwrap_or_else(|e| panic!("{path} on the probe port: {e}"));
        assert_eq!(answer.status(), 200, "{path}");
        assert!(answer.headers().contains_key("x-request-id"), "{path}");
    }
    let other = probe(format!("http://{probes}"), "/api/v1/projects")
        .await
        .expect("answered");
    assert_eq!(
        other.status(),
        404,
        "the API is not served on the probe port"
    );
    drop(busy);
    app.stop().await;
}

/// One HTTP/1.1 response read off `conn` (headers and a JSON body).
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let complete = |a: &[u8]| {
        let text = String::from_utf8_lossy(a);
        text.contains("\r\n\r\n") && text.ends_with('}')
    };
    while !complete(&answer) {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Between requests a keep-alive connection may stay idle for the idle
/// timeout, longer than the header timeout (load balancers keep idle
/// upstream connections ~60 s and must not reuse one the server has just
/// closed); past it, the server closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_outlive_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(AppOptions {
        embedded: true,
        workers: false,
        env: vec![
            ("LABELSYNC_HEADER_TIMEOUT_SECS", "1".into()),
            ("LABELSYNC_IDLE_TIMEOUT_SECS", "4".into()),
        ],
        ..AppOptions::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    for round in 0..2 {
        conn.write_all(request.as_bytes()).await.expect("send");
        let answer = read_response(&mut conn).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {round}: {answer:?}"
        );
        if round == 0 {
            // Idle past the header timeout, within the idle timeout.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(4 + 5), conn.read_to_end(&mut rest))
        .await
        .expect("an idle connection is closed after the idle timeout")
        .ok();
    app.stop().await;
}

/// The worker's metrics and probe listener has the same header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_probe_listener_closes_half_sent_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(AppOptions::without_workers()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bind = format!("127.0.0.1:{port}");
    let _worker = labelsync_tests::spawn_worker(
        &app,
        "probes",
        &[
            ("LABELSYNC_METRICS_BIND", &bind),
            ("LABELSYNC_HEADER_TIMEOUT_SECS", "1"),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("http://{bind}/healthz"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = tokio::net::TcpStream::connect(&bind)
        .await
        .expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n")
        .await
        .expect("half a request");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(6), conn.read_to_end(&mut rest))
        .await
        .expect("the worker closes a half-sent request after its header timeout")
        .ok();
    let ready = reqwest::get(format!("http://{bind}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    // Unknown paths get the API's error body there too.
    let unknown = reqwest::get(format!("http://{bind}/no-such-path"))
        .await
        .expect("unknown path");
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    app.stop().await;
}

/// #14, item 10: a NUL character in text (JSON bodies, paths, queries) is
/// bad input, refused the same way on Postgres and SQLite: 400
/// `invalid_text`, nothing written, no database message echoed. Postgres
/// refuses NUL in text and `\u0000` in jsonb; SQLite would store both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_with_400_on_postgres() {
    nul_characters_are_refused_with_400(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_with_400_on_sqlite() {
    nul_characters_are_refused_with_400(true).await;
}

async fn nul_characters_are_refused_with_400(embedded: bool) {
    let (app, project, task) = app_with_one_synced_task(embedded).await;
    for (what, method, path, body) in requests_with_a_nul(project, &task) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let (status, err) = app.request(method, &path, body).await;
        let what = format!("{what} (embedded: {embedded})");
        assert_eq!(status, 400, "{what}: {err}");
        assert_eq!(err["error"]["code"], "invalid_text", "{what}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("NUL"), "{what}: {err}");
        for raw in ["0x00", "byte sequence", "database", "unsupported Unicode"] {
            assert!(!message.contains(raw), "{what}: database detail in {err}");
        }
    }
    // A backslash followed by "u0000" is text, not a NUL.
    let (status, saved) = app
        .post("/api/v1/projects", json!({ "title": "C:\\u0000" }))
        .await;
    assert_eq!(
        (status, &saved["title"]),
        (201, &json!("C:\\u0000")),
        "{saved}"
    );
    let (_, projects) = app.get("/api/v1/projects").await;
    assert_eq!(projects["items"].as_array().expect("items").len(), 2);
    assert_eq!(
        projects["items"][0]["title"], "p",
        "the PATCH wrote nothing"
    );
    assert_eq!(storage_count(&app).await, 1);
    let (_, one) = app.get(&format!("/api/v1/tasks/{task}")).await;
    assert_eq!(one["annotations"], json!([]), "{one}");
    app.stop().await;
}

/// A key serde_json reserves (`$serde_json::private::RawValue`) in a body
/// is refused with 400: serde_json's `Value` read the JSON text in its
/// string instead, so an annotation was stored as another one (201).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_serde_json_reserves_are_refused_with_400() {
    let (app, project, task) = app_with_one_synced_task(false).await;
    let mut storage_body = local_source(project, "data");
    storage_body["title"] = json!({ "$serde_json::private::RawValue": "\"images\"" });
    let annotations = format!("/api/v1/tasks/{task}/annotations");
    for (what, path, body) in [
        (
            "annotation",
            &annotations,
            json!({ "result": [{ "$serde_json::private::RawValue": "{\"v\": 1}" }] }),
        ),
        (
            "annotation value",
            &annotations,
            json!({ "result": [{ "value": { "$serde_json::private::RawValueX": 2 } }] }),
        ),
        // serde_json's rule answered these as JSON that breaks off, or of
        // the wrong type.
        (
            "annotation with a key after it",
            &annotations,
            json!({ "result": [{ "$serde_json::private::RawValue": "1", "x": 2 }] }),
        ),
        (
            "annotation with a number",
            &annotations,
            json!({ "result": [{ "$serde_json::private::RawValue": 2 }] }),
        ),
        (
            "storage title",
            &"/api/v1/storages".to_owned(),
            storage_body,
        ),
    ] {
        let (status, err) = app.post(path, body).await;
        assert_eq!(status, 400, "{what}: {err}");
        assert_eq!(err["error"]["code"], "invalid_body", "{what}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("is reserved"), "{what}: {err}");
    }
    let (_, one) = app.get(&format!("/api/v1/tasks/{task}")).await;
    assert_eq!(one["annotations"], json!([]), "nothing written: {one}");
    assert_eq!(storage_count(&app).await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_ends_of_the_f64_range_read_back_on_postgres() {
    numbers_at_the_ends_of_the_f64_range_read_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_ends_of_the_f64_range_read_back_on_sqlite() {
    numbers_at_the_ends_of_the_f64_range_read_back(true).await;
}

/// Any number a body may hold is stored and read back unchanged. Postgres
/// prints a jsonb number in full (309 digits for 1.7976931348623155e308),
/// and reading that back once rounded it to infinity: a 500 (found by
/// Schemathesis).
async fn numbers_at_the_ends_of_the_f64_range_read_back(embedded: bool) {
    let (app, _, task) = app_with_one_synced_task(embedded).await;
    let result = json!([{ "value": {
        "max": f64::MAX, "below_max": 1.797_693_134_862_315_5e308,
        "lowest": f64::MIN, "tiny": 5e-324, "big_int": u64::MAX,
    } }]);
    let (status, saved) = app
        .post(
            &format!("/api/v1/tasks/{task}/annotations"),
            json!({ "result": result }),
        )
        .await;
    assert_eq!((status, &saved["result"]), (201, &result), "{saved}");
    let (status, read) = app
        .get(&format!("/api/v1/annotations/{}", saved["id"]))
        .await;
    assert_eq!((status, &read["result"]), (200, &result), "{read}");
    app.stop().await;
}

/// An app (Postgres, or SQLite when `embedded`) with project "p", a local
/// source and the one task its sync imported: (app, project id, task id).
async fn app_with_one_synced_task(embedded: bool) -> (TestApp, i64, Value) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("a.jpg"), b"x").expect("write");
    let project = app.project("p").await;
    let storage = app.local_storage(project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let task = app.all_tasks(project).await[0]["id"].clone();
    (app, project, task)
}

/// Requests with a NUL in a JSON body, a path or a query: what each is,
/// method, path and body.
fn requests_with_a_nul(
    project: i64,
    task: &Value,
) -> Vec<(&'static str, &'static str, String, Option<Value>)> {
    let mut storage_body = local_source(project, "data");
    storage_body["title"] = json!("images\u{0}");
    vec![
        (
            "project title",
            "POST",
            "/api/v1/projects".to_owned(),
            Some(json!({ "title": "a\u{0}b" })),
        ),
        (
            "title patch",
            "PATCH",
            format!("/api/v1/projects/{project}"),
            Some(json!({ "title": "\u{0}" })),
        ),
        (
            "storage title",
            "POST",
            "/api/v1/storages".to_owned(),
            Some(storage_body),
        ),
        (
            "annotation value",
            "POST",
            format!("/api/v1/tasks/{task}/annotations"),
            Some(json!({ "result": [{ "value": { "text": ["a\u{0}"] } }] })),
        ),
        (
            "annotation key",
            "POST",
            format!("/api/v1/tasks/{task}/annotations"),
            Some(json!({ "result": [{ "a\u{0}": 1 }] })),
        ),
        ("run id", "GET", "/api/v1/runs/%00".to_owned(), None),
        (
            "run errors",
            "GET",
            "/api/v1/runs/x%00y/errors".to_owned(),
            None,
        ),
        (
            "run cursor",
            "GET",
            "/api/v1/runs?after=%00".to_owned(),
            None,
        ),
    ]
}

/// Only real busy / connection / conflict errors are transient: a Postgres
/// SQLSTATE that happens to end in 0x05 as a number (22021, a NUL in text)
/// is bad input, and raw database messages are not what the caller sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_are_classified_by_their_real_codes() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let db = labelsync::db::connect(&labelsync_tests::fresh_postgres().await)
        .await
        .expect("postgres");
    for (sqlstate, transient) in [
        ("22021", false),
        ("22P05", false),
        ("42P01", false),
        ("23505", false),
        ("40001", true),
        ("40P01", true),
        ("08006", true),
        ("57P01", true),
    ] {
        let raised = db
            .execute_unprepared(&format!(
                "DO $$ BEGIN RAISE EXCEPTION 'raw detail' USING ERRCODE = '{sqlstate}'; END $$"
            ))
            .await
            .expect_err("raised");
        let err = labelsync::Error::from(raised);
        assert_eq!(err.is_transient(), transient, "{sqlstate}: {err:?}");
    }
    let nul = db
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT $1::text",
            ["a\u{0}b".into()],
        ))
        .await
        .expect_err("Postgres refuses NUL in text");
    match labelsync::Error::from(nul) {
        labelsync::Error::Invalid { code, message, .. } => {
            assert_eq!(code, "invalid_text");
            assert!(!message.contains("0x00"), "{message}");
        }
        other => panic!("a NUL in text is bad input, not {other:?}"),
    }

    // SQLite: a write while another connection holds the write lock is
    // SQLITE_BUSY (5), transient.
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("busy.db").display());
    let holder = labelsync::db::connect(&url).await.expect("sqlite");
    holder
        .execute_unprepared("CREATE TABLE t (x INTEGER)")
        .await
        .expect("create");
    let txn = holder.begin().await.expect("begin");
    txn.execute_unprepared("INSERT INTO t VALUES (1)")
        .await
        .expect("take the write lock");
    let mut opts = sea_orm::ConnectOptions::new(url);
    opts.sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::ZERO));
    let other = sea_orm::Database::connect(opts).await.expect("sqlite");
    let busy = other
        .execute_unprepared("INSERT INTO t VALUES (2)")
        .await
        .expect_err("the file is locked");
    let err = labelsync::Error::from(busy);
    assert!(err.is_transient(), "{err:?}");
    txn.rollback().await.expect("rollback");
}

/// #14, item 12: unknown paths and methods answer with the API's error
/// body, like every other API error (they used to be empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_with_the_api_error_shape() {
    let app = spawn_app(AppOptions {
        embedded: true,
        workers: false,
        ..AppOptions::default()
    })
    .await;
    for (method, path, status, code) in [
        ("GET", "/no-such-page", 404, "not_found"),
        ("GET", "/api/v1/no-such-route", 404, "not_found"),
        ("DELETE", "/api/v1/projects", 405, "method_not_allowed"),
        (
            "PUT",
            "/api/v1/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
            405,
            "method_not_allowed",
        ),
        ("POST", "/healthz", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),
    ] {
        let resp = app
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                format!("{}{path}", app.base),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        if status == 405 {
            assert!(
                resp.headers().contains_key("allow"),
                "{method} {path}: no Allow"
            );
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{method} {path}: {body}"
        );
    }
    app.stop().await;
}

/// #14, item 12: `sync --spec` naming a project that does not exist says so
/// in one line, on SQLite and on Postgres, instead of a foreign-key error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sync_with_an_unknown_project_id_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"project_id": 4242, "role": "source", "backend": "local", "config": {"path": "images"}}"#,
    )
    .expect("write spec");
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("cli.db").display());
    for database in [sqlite, labelsync_tests::fresh_postgres().await] {
        let out = cli_sync_quietly(dir.path(), &spec, &database);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{database}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{database}: {stderr}");
        assert!(stderr.contains("project 4242"), "{database}: {stderr}");
        assert!(
            !stderr.to_lowercase().contains("foreign key"),
            "{database}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{database}");
    }
}

/// `sync --spec` creating a project holds its `data_key` to the API's rule:
/// every Files-mode task has that key, and one serde_json reserves made
/// every task of the project unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sync_holds_a_new_projects_data_key_to_the_apis_rule() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"project": {"title": "p", "data_key": "$serde_json::private::RawValue"},
            "role": "source", "backend": "local", "config": {"path": "images"}}"#,
    )
    .expect("write spec");
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("cli.db").display());
    let out = cli_sync_quietly(dir.path(), &spec, &sqlite);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("data_key must be"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// `labelsync-scheduler sync --quiet --spec spec` in `dir` on `database`,
/// with the bundled examples as the local document root.
fn cli_sync_quietly(
    dir: &std::path::Path,
    spec: &std::path::Path,
    database: &str,
) -> std::process::Output {
    std::process::Command::new(labelsync_tests::binary("labelsync-scheduler"))
        .current_dir(dir)
        .env_clear()
        .env("DATABASE_URL", database)
        .env(
            "LOCAL_FILES_DOCUMENT_ROOT",
            labelsync_tests::repo_root().join("examples/data"),
        )
        .args(["sync", "--quiet", "--spec"])
        .arg(spec)
        .output()
        .expect("run labelsync-scheduler sync")
}

/// The value of the first sample of `name` carrying every label of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    labelsync_tests::metric_samples(text, name, labels).next()
}

/// #14, item 14: a fresh scheduler lists its counters at 0 for every known
/// label set, so dashboards show 0 rather than "No data" until the first
/// event. A scheduler process of its own (SQLite in a temporary directory):
/// the metrics of this test process may have counted other tests' work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_scheduler_metrics_list_counters_at_zero() {
    let (_dir, _server, text) = start_a_scheduler_of_its_own_and_read_its_metrics().await;
    job_counters_are_listed_at_zero(&text);
    storage_counters_are_listed_at_zero(&text);
}

/// Starts `labelsync-scheduler serve` (SQLite in a temporary directory) on a
/// free port and returns its directory, the process (killed when dropped,
/// like a worker) and the text of its first `/metrics` answer.
async fn start_a_scheduler_of_its_own_and_read_its_metrics()
-> (tempfile::TempDir, labelsync_tests::Worker, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let server = std::process::Command::new(labelsync_tests::binary("labelsync-scheduler"))
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("LABELSYNC_BIND", addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start labelsync-scheduler serve");
    let server = labelsync_tests::Worker(server, None);
    let mut text = None;
    for _ in 0..200 {
        if let Ok(resp) = reqwest::get(format!("http://{addr}/metrics")).await {
            text = Some(resp.text().await.expect("text"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = text.expect("the scheduler answers /metrics within 10 s");
    (dir, server, text)
}

fn job_counters_are_listed_at_zero(text: &str) {
    for kind in ["import", "export", "delete"] {
        for name in [
            "labelsync_jobs_started_total",
            "labelsync_objects_listed_total",
            "labelsync_tasks_created_total",
            "labelsync_annotations_exported_total",
            "labelsync_annotations_deleted_total",
            "labelsync_object_errors_total",
        ] {
            assert_eq!(
                sample(text, name, &[("kind", kind)]),
                Some(0.0),
                "{name} {kind}:\n{text}"
            );
        }
        for outcome in [
            "completed",
            "completed_with_errors",
            "failed",
            "retry",
            "stopped",
        ] {
            assert_eq!(
                sample(
                    text,
                    "labelsync_jobs_finished_total",
                    &[("kind", kind), ("outcome", outcome)]
                ),
                Some(0.0),
                "jobs_finished {kind} {outcome}:\n{text}"
            );
        }
    }
}

fn storage_counters_are_listed_at_zero(text: &str) {
    for backend in ["s3", "gcs", "azure", "redis", "local", "databricks"] {
        for outcome in ["ok", "transient", "permission_denied"] {
            assert_eq!(
                sample(
                    text,
                    "labelsync_storage_requests_total",
                    &[
                        ("backend", backend),
                        ("operation", "get"),
                        ("outcome", outcome)
                    ]
                ),
                Some(0.0),
                "storage_requests {backend} {outcome}:\n{text}"
            );
        }
        assert_eq!(
            sample(
                text,
                "labelsync_resolve_bytes_total",
                &[("backend", backend)]
            ),
            Some(0.0),
            "resolve_bytes {backend}:\n{text}"
        );
    }
}

/// `docs/API.md` and the OpenAPI document describe the same routes. Every
/// (method, path) of `scheduler/src/api/openapi.json` must have a heading
/// `### METHOD /path` in `docs/API.md` (the convention that file states),
/// and every such heading must be a route of the OpenAPI document. Needs no
/// server: both files are read from the repository.
#[test]
fn openapi_paths_match_docs_api_md() {
    use std::collections::BTreeSet;

    const METHODS: [&str; 8] = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE",
    ];
    let root = labelsync_tests::repo_root();
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    };
    let doc: Value = serde_json::from_str(&read("scheduler/src/api/openapi.json"))
        .expect("openapi.json is JSON");
    let mut in_openapi = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("openapi.json has paths") {
        for method in item.as_object().expect("a path item is an object").keys() {
            let upper = method.to_uppercase();
            if METHODS.contains(&upper.as_str()) {
                in_openapi.insert(format!("{upper} {path}"));
            }
        }
    }
    assert!(in_openapi.len() >= 20, "{in_openapi:?}");

    // A route heading: `### ` then an HTTP method, one space, a path.
    let mut in_docs = BTreeSet::new();
    for line in read("docs/API.md").lines() {
        let Some(heading) = line.strip_prefix("### ") else {
            continue;
        };
        let Some((method, path)) = heading.trim().split_once(' ') else {
            continue;
        };
        if METHODS.contains(&method) {
            assert!(
                path.starts_with('/') && !path.contains(char::is_whitespace),
                "docs/API.md: a route heading is `### METHOD /path`, got {line:?}"
            );
            assert!(
                in_docs.insert(format!("{method} {path}")),
                "docs/API.md: {line:?} appears twice"
            );
        }
    }
    let undocumented: Vec<_> = in_openapi.difference(&in_docs).collect();
    let unserved: Vec<_> = in_docs.difference(&in_openapi).collect();
    assert!(
        undocumented.is_empty(),
        "routes of openapi.json with no `### METHOD /path` heading in docs/API.md: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "route headings of docs/API.md that openapi.json does not list: {unserved:?}"
    );
}

/// Every response names its request: the caller's `X-Request-Id` when
/// usable, else a new ULID; errors and probes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_request_id() {
    let app = spawn_app(AppOptions {
        token: Some("request-id-token".into()),
        ..AppOptions::without_workers()
    })
    .await;
    let id_of = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-request-id")
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .unwrap_or_default()
    };
    let client = reqwest::Client::new();
    let mut made = std::collections::HashSet::new();
    for path in ["/healthz", "/api/v1/projects", "/nowhere"] {
        let resp = client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("GET");
        let id = id_of(&resp);
        assert_eq!(id.len(), 26, "{path} {}: a ULID, got {id:?}", resp.status());
        made.insert(id);
    }
    assert_eq!(made.len(), 3, "a new id per request");
    let send = |id: String| {
        client
            .get(format!("{}/api/v1/projects", app.base))
            .bearer_auth("request-id-token")
            .header("x-request-id", id)
            .send()
    };
    let given = send("lb-7f3a:trace-42".into()).await.expect("GET");
    assert_eq!(
        (given.status().as_u16(), id_of(&given)),
        (200, "lb-7f3a:trace-42".into())
    );
    for unusable in ["x".repeat(129), "has space".into()] {
        let resp = send(unusable.clone()).await.expect("GET");
        let id = id_of(&resp);
        assert!(
            id.len() == 26 && id != unusable,
            "{unusable:?} replaced: {id:?}"
        );
    }
    app.stop().await;
}

/// `LABELSYNC_RATE_LIMIT_PER_MINUTE`: a burst past the limit is 429 with
/// `Retry-After`, for that token only; probes are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_rate_limit_gets_429_with_retry_after() {
    let app = spawn_app(AppOptions {
        token: Some("limited-token".into()),
        env: vec![("LABELSYNC_RATE_LIMIT_PER_MINUTE", "30".into())],
        ..AppOptions::without_workers()
    })
    .await;
    let client = reqwest::Client::new();
    let get = |token: &'static str, path: &'static str| {
        client
            .get(format!("{}{path}", app.base))
            .bearer_auth(token)
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(
            get("limited-token", "/api/v1/projects")
                .await
                .expect("GET")
                .status()
                .as_u16(),
        );
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (30..=31).contains(&ok),
        "a minute's worth, then refused: {statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let refused = get("limited-token", "/api/v1/projects").await.expect("GET");
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&wait), "{wait}");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let other = get("other-token", "/api/v1/projects").await.expect("GET");
    assert_eq!(other.status(), 200, "another token has its own bucket");
    let probe = get("limited-token", "/healthz").await.expect("GET");
    assert_eq!(probe.status(), 200, "probes are not limited");
    app.stop().await;
}

// ---- The ops console's API (issue 18): pause/resume, retry, dead jobs ----

/// The bootstrap token of the ops tests.
const OPS_BOOT: &str = "ops-boot-token";

async fn ops_app(workers: bool) -> TestApp {
    spawn_app(AppOptions {
        token: Some(OPS_BOOT.into()),
        workers,
        ..AppOptions::default()
    })
    .await
}

/// A request with `token` instead of the app's own.
async fn as_token(app: &TestApp, token: &str, method: reqwest::Method, path: &str) -> (u16, Value) {
    let resp = app
        .client
        .request(method, format!("{}{path}", app.base))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A database token of `scope`, held to `projects` when given; its secret.
async fn scoped_token(app: &TestApp, scope: &str, projects: Option<&[i64]>) -> String {
    let mut body = json!({ "name": format!("ops {scope}"), "scope": scope });
    if let Some(projects) = projects {
        body["projects"] = json!(projects);
    }
    let (status, token) = app.post("/api/v1/tokens", body).await;
    assert_eq!(status, 201, "{token}");
    token["secret"].as_str().expect("secret").to_owned()
}

async fn runs_of(app: &TestApp, storage: &Value) -> Vec<Value> {
    let (status, list) = app
        .get(&format!("/api/v1/runs?storage_id={}", storage["id"]))
        .await;
    assert_eq!(status, 200, "{list}");
    list["items"].as_array().expect("items").clone()
}

/// A paused storage gets no periodic sync but a manual one; resumed, the
/// tick syncs it again. Pausing twice keeps the first time, a PATCH keeps
/// the pause and cannot set it; another project's storage is a 404, a read
/// token a 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_storage_syncs_only_on_demand_until_resumed() {
    let app = ops_app(true).await;
    write_files(&app.doc_root.path().join("data"), 3, "jpg");
    let project = app.project("paused").await;
    let other = app.project("other").await;
    let storage = app.local_storage(project, json!({})).await;
    assert_eq!(storage["schedule_paused"], false, "{storage}");
    assert_eq!(storage["schedule_paused_at"], Value::Null, "{storage}");
    let id = storage["id"].clone();
    let (status, paused) = app
        .post(&format!("/api/v1/storages/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["schedule_paused"], true, "{paused}");
    let since = paused["schedule_paused_at"].clone();
    assert!(since.is_string(), "{paused}");
    let (_, again) = app
        .post(&format!("/api/v1/storages/{id}/pause"), json!({}))
        .await;
    assert_eq!(
        again["schedule_paused_at"], since,
        "a second pause keeps the first time"
    );
    let (status, patched) = app
        .patch(
            &format!("/api/v1/storages/{id}"),
            json!({ "sync_interval_seconds": 1, "title": "renamed" }),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["schedule_paused"], true, "a PATCH keeps the pause");
    let (status, refused) = app
        .patch(
            &format!("/api/v1/storages/{id}"),
            json!({ "schedule_paused": false }),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_body", "{refused}");
    // Ticks every 200 ms with a 1 s period: paused, nothing starts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        runs_of(&app, &storage).await.is_empty(),
        "a paused storage synced"
    );
    let manual = app.sync(&id).await;
    assert_eq!(manual["status"], "completed", "{manual}");
    assert_eq!(manual["counters"]["created"], 3, "{manual}");

    let writer = scoped_token(&app, "write", Some(&[other])).await;
    let reader = scoped_token(&app, "read", Some(&[project])).await;
    let ops = scoped_token(&app, "ops", Some(&[project])).await;
    let resume = format!("/api/v1/storages/{id}/resume");
    let (status, hidden) = as_token(&app, &writer, reqwest::Method::POST, &resume).await;
    assert_eq!(
        (status, &hidden["error"]["code"]),
        (404, &json!("not_found")),
        "{hidden}"
    );
    let (status, denied) = as_token(&app, &reader, reqwest::Method::POST, &resume).await;
    assert_eq!(
        (status, &denied["error"]["code"]),
        (403, &json!("forbidden")),
        "{denied}"
    );
    let (status, missing) = app.post("/api/v1/storages/999999/pause", json!({})).await;
    assert_eq!(status, 404, "{missing}");
    let (status, bad) = app.post("/api/v1/storages/x/pause", json!({})).await;
    assert_eq!(status, 400, "{bad}");
    let (status, resumed) = as_token(&app, &ops, reqwest::Method::POST, &resume).await;
    assert_eq!(status, 200, "an ops token resumes: {resumed}");
    assert_eq!(resumed["schedule_paused"], false, "{resumed}");
    assert_eq!(resumed["schedule_paused_at"], Value::Null, "{resumed}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while runs_of(&app, &storage).await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no periodic sync after resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// A pause that commits between the periodic tick's claim of a period and
/// its run's insert: once `POST /pause` has answered, no periodic run of
/// the storage appears (before, the tick's run was made after the pause).
/// The test holds the tick's insert back with an uncommitted live version
/// of a cancelled run (the one-live-run index makes the insert wait for
/// it), pauses, and lets the insert go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_periodic_run_appears_after_a_pause_has_answered() {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};
    let app = ops_app(false).await;
    write_files(&app.doc_root.path().join("data"), 1, "jpg");
    let project = app.project("pause race").await;
    let storage = app.local_storage(project, json!({})).await;
    let id = storage["id"].clone();
    let manual = app.start_sync(&id).await;
    app.cancel(&manual).await;
    let db = Database::connect(&app.database_url).await.expect("db");
    let hold = db.begin().await.expect("begin");
    hold.execute_unprepared(&format!(
        "UPDATE sync_runs SET status = 'queued' WHERE id = '{manual}'"
    ))
    .await
    .expect("a live version of the cancelled run");
    let (status, patched) = app
        .patch(
            &format!("/api/v1/storages/{id}"),
            json!({ "sync_interval_seconds": 60 }),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    let waiting = |statement: &'static str| {
        let db = &db;
        move || async move {
            let sql = format!(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '{statement}%'"
            );
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    sql,
                ))
                .await
                .expect("pg_stat_activity")
                .expect("a row");
            row.try_get::<i64>("", "n").expect("n") > 0
        }
    };
    labelsync_tests::eventually(
        "the tick's insert to wait",
        waiting(r#"INSERT INTO "sync_runs""#),
    )
    .await;

    let path = format!("/api/v1/storages/{id}/pause");
    let ((status, paused), runs_at_answer) = {
        let pause = app.post(&path, json!({}));
        tokio::pin!(pause);
        let first = tokio::select! {
            answer = &mut pause => Some((answer, runs_of(&app, &storage).await.len())),
            () = labelsync_tests::eventually("the pause to wait", waiting(r#"UPDATE "storages""#)) => None,
        };
        hold.rollback().await.expect("rollback");
        match first {
            Some(answered) => answered,
            None => {
                let answer = (&mut pause).await;
                (answer, runs_of(&app, &storage).await.len())
            }
        }
    };
    assert_eq!(status, 200, "{paused}");
    labelsync_tests::eventually("the tick's insert to end", || async {
        !waiting(r#"INSERT INTO "sync_runs""#)().await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        runs_of(&app, &storage).await.len(),
        runs_at_answer,
        "a periodic run appeared after the pause answered"
    );
    app.stop().await;
}

/// Writes the Tasks-mode objects of the retry test: `good-<i>.json` and
/// two files that do not parse.
fn write_task_files_with_two_bad(data: &std::path::Path) {
    std::fs::create_dir_all(data).expect("mkdir");
    for i in 0..3 {
        std::fs::write(
            data.join(format!("good-{i}.json")),
            format!(r#"{{"text": "{i}"}}"#),
        )
        .expect("write");
    }
    std::fs::write(data.join("bad-a.json"), "{ not json").expect("write");
    std::fs::write(data.join("bad-b.json"), "not json at all").expect("write");
}

/// Ended runs past `LABELSYNC_RUN_RETENTION_DAYS` are deleted by the
/// tick's cleanup with their object errors, and a storage keeps at most
/// `LABELSYNC_RUNS_KEPT_PER_STORAGE` runs; a storage's newest ended run of
/// each kind stays however old, and so does a run whose errors a live
/// retry run reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_are_deleted_past_their_retention() {
    use sea_orm::ConnectionTrait;
    let app = spawn_app(AppOptions::without_workers()).await;
    write_task_files_with_two_bad(&app.doc_root.path().join("data"));
    let project = app.project("kept runs").await;
    let storage = app
        .local_storage(project, json!({ "import_method": "tasks" }))
        .await;
    let mut worker = labelsync_tests::spawn_ready_worker(&app, "retention", &[]).await;
    let mut runs = Vec::new();
    for _ in 0..6 {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed_with_errors", "{run}");
        runs.push(run["id"].as_str().expect("id").to_owned());
    }
    worker.kill();
    // A retry of the first run, left queued (no worker): it reads the first
    // run's errors when it starts.
    let (status, retry) = app
        .post(&format!("/api/v1/runs/{}/retry", runs[0]), json!({}))
        .await;
    assert_eq!(status, 202, "{retry}");
    let retry = retry["id"].as_str().expect("id").to_owned();

    let state = backdate(&app, &[&runs[0], &runs[1], &runs[5]]).await;
    let errors_of = async |run: &str| {
        let count = sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT COUNT(*) AS n FROM object_errors WHERE run_id = $1",
            [run.into()],
        );
        let row = state.db.query_one_raw(count).await.expect("count");
        row.expect("a row").try_get::<i64>("", "n").expect("n")
    };
    assert_eq!(errors_of(&runs[1]).await, 2);

    // Past the retention: the second run goes with its errors; the first
    // stays while its retry is live, the sixth as the newest ended run.
    prune_keeping(&app, None).await;
    found(
        &app,
        &[
            (&runs[0], 200),
            (&runs[1], 404),
            (&runs[2], 200),
            (&runs[5], 200),
        ],
    )
    .await;
    assert_eq!(errors_of(&runs[1]).await, 0, "deleted with their run");
    assert_eq!(errors_of(&runs[0]).await, 2, "the retry still reads them");

    // The retry ends (cancelled, so the newest ended run): both go.
    app.cancel(&retry).await;
    prune_keeping(&app, None).await;
    let after_retry = [
        (&runs[0], 404),
        (&runs[5], 404),
        (&runs[2], 200),
        (&retry, 200),
    ];
    found(&app, &after_retry).await;

    // At most two runs a storage: of runs 3, 4, 5 and the retry, the two
    // newest stay.
    prune_keeping(&app, Some("2")).await;
    let two_kept = [
        (&runs[2], 404),
        (&runs[3], 404),
        (&runs[4], 200),
        (&retry, 200),
    ];
    found(&app, &two_kept).await;
    a_full_pass_counts_quiet_storages_too(&app, &runs[4], &retry).await;
    app.stop().await;
}

/// One run a storage, on a storage that ended none lately (its last two,
/// `older` and `newer`, ended an hour ago): a regular pass leaves it be
/// (it is not growing); a full pass (a scheduler's first, then daily)
/// applies the count to every storage, so a lowered setting reaches it.
async fn a_full_pass_counts_quiet_storages_too(app: &TestApp, older: &String, newer: &String) {
    backdate_by(app, &[older, newer], chrono::Duration::hours(1)).await;
    prune_keeping(app, Some("1")).await;
    found(app, &[(older, 200), (newer, 200)]).await;
    let vars = with_kept(app, Some("1"));
    let state = labelsync_scheduler::app::state(labelsync_tests::settings(&vars))
        .await
        .expect("state");
    assert!(labelsync_scheduler::periodic::prune_all(&state).await);
    found(app, &[(older, 404), (newer, 200)]).await;
}

/// Sets these runs' end 91 days back, past the default retention; the
/// scheduler state the test reads the database with.
async fn backdate(app: &TestApp, runs: &[&String]) -> labelsync_scheduler::api::AppState {
    backdate_by(app, runs, chrono::Duration::days(91)).await
}

/// Sets these runs' end `ago` back.
async fn backdate_by(
    app: &TestApp,
    runs: &[&String],
    ago: chrono::Duration,
) -> labelsync_scheduler::api::AppState {
    use sea_orm::ConnectionTrait;
    let state = labelsync_scheduler::app::state(labelsync_tests::settings(&app.vars))
        .await
        .expect("state");
    let backend = state.db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => "UPDATE sync_runs SET finished_at = $1 WHERE id = $2",
        _ => "UPDATE sync_runs SET finished_at = ? WHERE id = ?",
    };
    let long_ago = chrono::Utc::now() - ago;
    for run in runs {
        let values = [long_ago.into(), run.as_str().into()];
        let statement = sea_orm::Statement::from_sql_and_values(backend, sql, values);
        state.db.execute_raw(statement).await.expect("backdate");
    }
    state
}

/// Runs the scheduler's cleanup, with `LABELSYNC_RUNS_KEPT_PER_STORAGE`
/// set to `kept` when given.
async fn prune_keeping(app: &TestApp, kept: Option<&str>) {
    let vars = with_kept(app, kept);
    let state = labelsync_scheduler::app::state(labelsync_tests::settings(&vars))
        .await
        .expect("state");
    labelsync_scheduler::periodic::prune(&state).await;
}

/// The app's settings, with `LABELSYNC_RUNS_KEPT_PER_STORAGE` set to
/// `kept` when given.
fn with_kept(app: &TestApp, kept: Option<&str>) -> std::collections::HashMap<&'static str, String> {
    let mut vars = app.vars.clone();
    if let Some(kept) = kept {
        vars.insert("LABELSYNC_RUNS_KEPT_PER_STORAGE", kept.to_owned());
    }
    vars
}

/// Asserts each run's `GET` status: 200 kept, 404 deleted.
async fn found(app: &TestApp, expected: &[(&String, u16)]) {
    for (run, status) in expected {
        let (got, body) = app.get(&format!("/api/v1/runs/{run}")).await;
        assert_eq!(got, *status, "{run}: {body}");
    }
}

/// The same rules on SQLite (embedded mode), whose SQL the cleanup's
/// subqueries must also be: a run past the age goes, the newest ended run
/// stays however old, and the count keeps the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_are_deleted_past_their_retention_on_sqlite() {
    let app = spawn_app(AppOptions {
        embedded: true,
        ..AppOptions::default()
    })
    .await;
    write_files(&app.doc_root.path().join("data"), 3, "jpg");
    let project = app.project("kept runs").await;
    let storage = app.local_storage(project, json!({})).await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        runs.push(run["id"].as_str().expect("id").to_owned());
    }
    backdate(&app, &[&runs[0], &runs[3]]).await;
    prune_keeping(&app, None).await;
    found(&app, &[(&runs[0], 404), (&runs[1], 200), (&runs[3], 200)]).await;
    prune_keeping(&app, Some("2")).await;
    found(&app, &[(&runs[1], 404), (&runs[2], 200), (&runs[3], 200)]).await;
    a_full_pass_counts_quiet_storages_too(&app, &runs[2], &runs[3]).await;
    app.stop().await;
}

/// A retry run reads again only the failed objects of a run (one fixed,
/// one still bad, one deleted since), with the usual counters, and never
/// flags or deletes the tasks of objects it did not read; refused (409)
/// while the storage has a live run, for a run with nothing failed, and
/// for an export run; 404 for another project, 403 for a read token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_run_reads_again_only_the_failed_objects() {
    let app = spawn_app(AppOptions {
        token: Some(OPS_BOOT.into()),
        ..AppOptions::without_workers()
    })
    .await;
    let data = app.doc_root.path().join("data");
    write_task_files_with_two_bad(&data);
    let project = app.project("retried").await;
    let storage = app
        .local_storage(
            project,
            json!({ "import_method": "tasks", "on_missing": "delete_unlabeled" }),
        )
        .await;
    let mut worker = labelsync_tests::spawn_ready_worker(&app, "retry", &[]).await;
    let first = app.sync(&storage["id"]).await;
    assert_eq!(first["status"], "completed_with_errors", "{first}");
    let (_, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            first["id"].as_str().expect("present")
        ))
        .await;
    assert_eq!(first["counters"]["failed"], 2, "{first} {errors}");
    assert_eq!(first["scope"], "full", "{first}");
    let first_id = first["id"].as_str().expect("id").to_owned();
    worker.kill();

    // A live run of the storage (no worker takes it): 409 run_live.
    let live = app.start_sync(&storage["id"]).await;
    let retry = format!("/api/v1/runs/{first_id}/retry");
    let (status, refused) = app.post(&retry, json!({})).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (409, &json!("run_live")),
        "{refused}"
    );
    let (status, _) = app
        .post(&format!("/api/v1/runs/{live}/retry"), json!({}))
        .await;
    assert_eq!(status, 409, "a live run cannot be retried");
    app.cancel(&live).await;

    // Fixed, still bad, and a good object gone (its task must stay).
    std::fs::write(data.join("bad-a.json"), r#"{"text": "fixed"}"#).expect("write");
    std::fs::remove_file(data.join("good-0.json")).expect("rm");
    let other = app.project("other").await;
    let stranger = scoped_token(&app, "write", Some(&[other])).await;
    let reader = scoped_token(&app, "read", Some(&[project])).await;
    let (status, hidden) = as_token(&app, &stranger, reqwest::Method::POST, &retry).await;
    assert_eq!(
        (status, &hidden["error"]["code"]),
        (404, &json!("not_found")),
        "{hidden}"
    );
    let (status, denied) = as_token(&app, &reader, reqwest::Method::POST, &retry).await;
    assert_eq!(status, 403, "{denied}");
    let (status, missing) = app
        .post("/api/v1/runs/01JZZZZZZZZZZZZZZZZZZZZZZZ/retry", json!({}))
        .await;
    assert_eq!(status, 404, "{missing}");
    let (status, started) = app.post(&retry, json!({})).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["scope"], "retry", "{started}");
    assert_eq!(started["retry_of"], first_id.as_str(), "{started}");
    assert_eq!(started["kind"], "import", "{started}");
    let _worker = labelsync_tests::spawn_ready_worker(&app, "retry2", &[]).await;
    let retried = app
        .wait_run(started["id"].as_str().expect("id"), RUN_TIMEOUT)
        .await;
    assert_eq!(retried["status"], "completed_with_errors", "{retried}");
    let c = &retried["counters"];
    assert_eq!(
        (c["listed"].as_i64(), c["created"].as_i64()),
        (Some(2), Some(1)),
        "{retried}"
    );
    assert_eq!(
        (
            c["failed"].as_i64(),
            c["missing"].as_i64(),
            c["deleted"].as_i64()
        ),
        (Some(1), Some(0), Some(0)),
        "{retried}"
    );
    let (_, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            retried["id"].as_str().expect("present")
        ))
        .await;
    let keys: Vec<&str> = errors["items"]
        .as_array()
        .expect("present")
        .iter()
        .map(|e| e["key"].as_str().expect("present"))
        .collect();
    assert!(keys.iter().all(|k| k.ends_with("bad-b.json")), "{errors}");
    let tasks = app.all_tasks(project).await;
    assert_eq!(
        tasks.len(),
        4,
        "3 good (one object gone, its task kept) + the fixed one: {tasks:?}"
    );

    // The object still failing is deleted: the next retry leaves it out,
    // and then nothing failed: 409 nothing_to_retry.
    std::fs::remove_file(data.join("bad-b.json")).expect("rm");
    let (status, again) = app
        .post(
            &format!(
                "/api/v1/runs/{}/retry",
                retried["id"].as_str().expect("present")
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{again}");
    let done = app
        .wait_run(again["id"].as_str().expect("present"), RUN_TIMEOUT)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counters"]["listed"], 0, "{done}");
    assert_eq!(app.all_tasks(project).await.len(), 4);
    let (status, nothing) = app
        .post(
            &format!(
                "/api/v1/runs/{}/retry",
                done["id"].as_str().expect("present")
            ),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, &nothing["error"]["code"]),
        (409, &json!("nothing_to_retry")),
        "{nothing}"
    );
    app.stop().await;
}

/// A directory a run could not list is listed again by its retry a page
/// of the storage's at a time, each page its own commit: it was one page,
/// the whole directory held in memory and written in one transaction. A
/// retry resumed with its cursor inside the directory goes on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_lists_a_failed_directory_a_page_at_a_time() {
    use sea_orm::{ConnectionTrait, Database};
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("top.jpg"), "top").expect("write");
    let project = app.project("directory retry").await;
    let storage = app.local_storage(project, json!({})).await;
    // Pages of 100 (the worker's setting in these tests).
    let mut worker = labelsync_tests::spawn_ready_worker(&app, "lister", &[]).await;
    let first = app.sync(&storage["id"]).await;
    assert_eq!(first["counters"]["created"], 1, "{first}");
    let first_id = first["id"].as_str().expect("id").to_owned();
    // The run could not list `part-000/` (its error, as a failed listing
    // leaves it), which holds 250 files, nor read `zz-late.jpg`.
    write_files(&data, 250, "jpg");
    std::fs::write(data.join("zz-late.jpg"), "late").expect("write");
    let db = Database::connect(&app.database_url).await.expect("db");
    let sql = [
        format!(
            "INSERT INTO object_errors (run_id, object_key, error, created_at) \
             VALUES ('{first_id}', 'part-000/', 'unreadable', now()), \
             ('{first_id}', 'zz-late.jpg', 'unreadable', now())"
        ),
        // Each transaction that inserts tasks, once per statement.
        "CREATE TABLE task_commits (tx bigint)".into(),
        "CREATE FUNCTION note_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO task_commits VALUES (txid_current()); RETURN NULL; END $$"
            .into(),
        "CREATE TRIGGER note_commit AFTER INSERT ON tasks \
         FOR EACH STATEMENT EXECUTE FUNCTION note_commit()"
            .into(),
    ];
    for statement in &sql {
        db.execute_unprepared(statement).await.expect("set up");
    }
    let retry = format!("/api/v1/runs/{first_id}/retry");
    let (status, started) = app.post(&retry, json!({})).await;
    assert_eq!(status, 202, "{started}");
    let retried = app
        .wait_run(started["id"].as_str().expect("id"), RUN_TIMEOUT)
        .await;
    assert_eq!(retried["status"], "completed", "{retried}");
    assert_eq!(retried["counters"]["created"], 251, "{retried}");
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(DISTINCT tx) AS n FROM task_commits",
        ))
        .await
        .expect("count")
        .expect("a row");
    let commits: i64 = row.try_get("", "n").expect("n");
    assert!(
        commits >= 3,
        "{commits} commits of 250 objects in pages of 100"
    );

    // A retry whose cursor is inside the directory (an attempt that
    // stopped there) lists the rest of it, and then what follows.
    worker.kill();
    let (status, started) = app.post(&retry, json!({})).await;
    assert_eq!(status, 202, "{started}");
    let resumed = started["id"].as_str().expect("id");
    db.execute_unprepared(&format!(
        "UPDATE sync_runs SET cursor = 'part-000/obj-000199.jpg' WHERE id = '{resumed}'"
    ))
    .await
    .expect("a cursor inside the directory");
    let _worker = labelsync_tests::spawn_ready_worker(&app, "resumer", &[]).await;
    let resumed = app.wait_run(resumed, RUN_TIMEOUT).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    let c = &resumed["counters"];
    assert_eq!(
        (c["listed"].as_i64(), c["existed"].as_i64()),
        (Some(51), Some(51)),
        "{resumed}"
    );
    app.stop().await;
}

/// A patch that changes what a source lists is refused while an import
/// run of it has started: the run's next attempt would go on from its
/// cursor in the new listing (a key before it never listed, and counted
/// missing). A run still queued lists the patched storage, and other
/// fields change whenever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_sync_keeps_its_source_listing_as_it_was() {
    use sea_orm::{ConnectionTrait, Database};
    let app = spawn_app(AppOptions::without_workers()).await;
    let storage = app.files_storage("relisted", 3).await;
    let path = format!("/api/v1/storages/{}", storage["id"]);
    let run_id = app.start_sync(&storage["id"]).await;
    let (status, queued) = app.patch(&path, json!({ "prefix": "part-000/" })).await;
    assert_eq!(status, 200, "a run not started yet: {queued}");
    let db = Database::connect(&app.database_url).await.expect("db");
    db.execute_unprepared(&format!(
        "UPDATE sync_runs SET status = 'running', started_at = now(), \
         cursor = 'part-000/obj-000001.jpg' WHERE id = '{run_id}'"
    ))
    .await
    .expect("a started run");
    for change in [
        json!({ "prefix": "" }),
        json!({ "recursive": false }),
        json!({ "config": { "path": "other" } }),
        json!({ "import_method": "tasks" }),
    ] {
        let (status, refused) = app.patch(&path, change.clone()).await;
        assert_eq!(
            (status, &refused["error"]["code"]),
            (409, &json!("run_live")),
            "{change}: {refused}"
        );
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&run_id),
            "{refused}"
        );
    }
    let (status, renamed) = app.patch(&path, json!({ "title": "renamed" })).await;
    assert_eq!(status, 200, "{renamed}");
    app.cancel(&run_id).await;
    let (status, moved) = app.patch(&path, json!({ "prefix": "" })).await;
    assert_eq!(status, 200, "{moved}");
    app.stop().await;
}

/// Dead jobs of the Redis queue are requeued (and then run) or discarded;
/// the queue reports the age of its oldest waiting job; a read token is
/// refused and a bad limit is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_are_requeued_or_discarded() {
    let app = ops_app(false).await;
    let queue = format!("{}:runs", app.vars["LABELSYNC_QUEUE_NAMESPACE"]);
    let client = redis::Client::open(app.vars["REDIS_URL"].as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // Two jobs pushed as the scheduler pushes them, then moved to the dead
    // set as the queue does after their last attempt.
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let settings = labelsync_tests::settings(&app.vars);
    let jobs = labelsync::jobs::Queue::open(&settings, &db)
        .await
        .expect("queue");
    for n in 0..2 {
        let job = labelsync::jobs::RunJob::for_run(ulid::Ulid::new().to_string());
        jobs.push(job, &format!("dead-{n}")).await.expect("push");
    }
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{queue}:scheduled"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("ZRANGE");
    assert_eq!(ids.len(), 2, "{ids:?}");
    for id in &ids {
        let _: () = redis::pipe()
            .cmd("ZREM")
            .arg(format!("{queue}:scheduled"))
            .arg(id)
            .cmd("SADD")
            .arg(format!("{queue}:dead"))
            .arg(id)
            .cmd("HSET")
            .arg(format!("{queue}:meta:{id}"))
            .arg("status")
            .arg("Killed")
            .query_async(&mut conn)
            .await
            .expect("kill the jobs");
    }
    // A third job due in an hour: scheduled, not pending.
    let later = labelsync::jobs::RunJob::for_run(ulid::Ulid::new().to_string());
    jobs.push(later, "later").await.expect("push");
    let hour = chrono::Utc::now().timestamp() + 3600;
    let moved: u64 = redis::cmd("ZADD")
        .arg(format!("{queue}:scheduled"))
        .arg("XX")
        .arg("CH")
        .arg(hour)
        .arg(
            redis::cmd("ZRANGE")
                .arg(format!("{queue}:scheduled"))
                .arg(0)
                .arg(0)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .expect("ZRANGE")
                .remove(0),
        )
        .query_async(&mut conn)
        .await
        .expect("ZADD");
    assert_eq!(moved, 1);
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["dead"], 2, "{queues}");
    assert_eq!(
        (
            &queues["items"][0]["pending"],
            &queues["items"][0]["scheduled"]
        ),
        (&json!(0), &json!(1)),
        "{queues}"
    );
    assert_eq!(
        queues["items"][0]["oldest_pending_age_seconds"],
        Value::Null,
        "{queues}"
    );
    let reader = scoped_token(&app, "read", None).await;
    let (status, _) = as_token(
        &app,
        &reader,
        reqwest::Method::POST,
        "/api/v1/queues/dead/requeue",
    )
    .await;
    assert_eq!(status, 403);
    let (status, bad) = app
        .post("/api/v1/queues/dead/requeue?limit=0", json!({}))
        .await;
    assert_eq!(
        (status, &bad["error"]["code"]),
        (400, &json!("invalid_limit")),
        "{bad}"
    );
    let (status, requeued) = app
        .post("/api/v1/queues/dead/requeue?limit=1", json!({}))
        .await;
    assert_eq!(status, 200, "{requeued}");
    assert_eq!(
        (
            requeued["action"].as_str(),
            requeued["jobs"].as_u64(),
            requeued["dead"].as_u64()
        ),
        (Some("requeue"), Some(1), Some(1)),
        "{requeued}"
    );
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["pending"], 1, "{queues}");
    assert!(
        queues["items"][0]["oldest_pending_age_seconds"]
            .as_u64()
            .is_some(),
        "{queues}"
    );
    let (status, discarded) = app.post("/api/v1/queues/dead/discard", json!({})).await;
    assert_eq!(status, 200, "{discarded}");
    assert_eq!(
        (discarded["jobs"].as_u64(), discarded["dead"].as_u64()),
        (Some(1), Some(0)),
        "{discarded}"
    );
    let left: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{queue}:data"))
        .query_async(&mut conn)
        .await
        .expect("HKEYS");
    assert_eq!(
        left.len(),
        2,
        "the discarded job's data is gone, the requeued and the scheduled one's stay: {left:?}"
    );
    // A worker takes the requeued job: a run that does not exist is done.
    let _worker = labelsync_tests::spawn_ready_worker(&app, "dead", &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, queues) = app.get("/api/v1/queues").await;
        let q = &queues["items"][0];
        if q["pending"] == 0 && q["running"] == 0 {
            assert_eq!(q["dead"], 0, "{queues}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requeued job not run: {queues}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// The embedded queue's dead jobs (status Killed) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_of_the_embedded_queue_are_requeued_or_discarded() {
    let app = spawn_app(AppOptions {
        embedded: true,
        workers: false,
        token: Some(OPS_BOOT.into()),
        ..AppOptions::default()
    })
    .await;
    let queue = format!("{}:runs", app.vars["LABELSYNC_QUEUE_NAMESPACE"]);
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("sqlite");
    use sea_orm::ConnectionTrait;
    for id in ["dead-1", "dead-2"] {
        db.execute_unprepared(&format!(
            "INSERT INTO Jobs (job, id, job_type, status, attempts) VALUES (X'7B7D', '{id}', '{queue}', 'Killed', 25)"
        ))
        .await
        .expect("plant a dead job");
    }
    let hour = chrono::Utc::now().timestamp() + 3600;
    db.execute_unprepared(&format!(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, run_at) VALUES (X'7B7D', 'later', '{queue}', 'Pending', 0, {hour})"
    ))
    .await
    .expect("plant a job due in an hour");
    // apalis-sqlite marks a job a worker took `Queued` (locked to it).
    db.execute_unprepared(&format!(
        "INSERT INTO Jobs (job, id, job_type, status, attempts) VALUES (X'7B7D', 'taken', '{queue}', 'Queued', 1)"
    ))
    .await
    .expect("plant a job a worker took");
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["dead"], 2, "{queues}");
    assert_eq!(
        (
            &queues["items"][0]["pending"],
            &queues["items"][0]["scheduled"]
        ),
        (&json!(0), &json!(1)),
        "a job due in an hour is scheduled, not pending: {queues}"
    );
    assert_eq!(
        queues["items"][0]["running"], 1,
        "a taken job is in flight: {queues}"
    );
    let (status, requeued) = app
        .post("/api/v1/queues/dead/requeue?limit=1", json!({}))
        .await;
    assert_eq!(status, 200, "{requeued}");
    assert_eq!(
        (requeued["jobs"].as_u64(), requeued["dead"].as_u64()),
        (Some(1), Some(1)),
        "{requeued}"
    );
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["pending"], 1, "{queues}");
    assert!(
        queues["items"][0]["oldest_pending_age_seconds"]
            .as_u64()
            .is_some(),
        "{queues}"
    );
    let (status, discarded) = app.post("/api/v1/queues/dead/discard", json!({})).await;
    assert_eq!(
        (
            status,
            discarded["jobs"].as_u64(),
            discarded["dead"].as_u64()
        ),
        (200, Some(1), Some(0)),
        "{discarded}"
    );
    app.stop().await;
}

/// `GET /runs` by project and creation time; a token held to one project
/// sees nothing of another's whatever it asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_by_project_and_creation_time() {
    let app = ops_app(true).await;
    write_files(&app.doc_root.path().join("data"), 2, "jpg");
    let (a, b) = (app.project("a").await, app.project("b").await);
    let mut ids = Vec::new();
    for project in [a, b] {
        let storage = app.local_storage(project, json!({})).await;
        ids.push(app.sync(&storage["id"]).await["id"].clone());
    }
    let listed = |list: &Value| -> Vec<Value> {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|r| r["id"].clone())
            .collect()
    };
    let (status, of_a) = app.get(&format!("/api/v1/runs?project_id={a}")).await;
    assert_eq!(status, 200, "{of_a}");
    assert_eq!(listed(&of_a), vec![ids[0].clone()], "{of_a}");
    let (_, future) = app
        .get("/api/v1/runs?created_after=2999-01-01T00:00:00Z")
        .await;
    assert!(listed(&future).is_empty(), "{future}");
    let (_, past) = app
        .get("/api/v1/runs?created_before=2999-01-01T00:00:00Z&created_after=2000-01-01T00:00:00Z")
        .await;
    assert_eq!(
        listed(&past),
        vec![ids[1].clone(), ids[0].clone()],
        "{past}"
    );
    let (_, none) = app
        .get("/api/v1/runs?created_before=2000-01-01T00:00:00Z")
        .await;
    assert!(listed(&none).is_empty(), "{none}");
    // Not a time, a year the two databases compare differently (SQLite
    // compares chrono's `+10000-...` text: it gave no run, Postgres all),
    // a cursor that is no run id (it gave a page, silently).
    for query in [
        "created_after=yesterday",
        "created_before=%2B10000-01-01T00:00:00Z",
        "after=zzz",
    ] {
        let (status, bad) = app.get(&format!("/api/v1/runs?{query}")).await;
        assert_eq!(
            (status, &bad["error"]["code"]),
            (400, &json!("invalid_query")),
            "{query}: {bad}"
        );
    }
    let reader = scoped_token(&app, "read", Some(&[a])).await;
    let (status, hidden) = as_token(
        &app,
        &reader,
        reqwest::Method::GET,
        &format!("/api/v1/runs?project_id={b}"),
    )
    .await;
    assert_eq!(status, 200, "{hidden}");
    assert!(listed(&hidden).is_empty(), "{hidden}");
    app.stop().await;
}
