//! Export end to end: annotations created, updated and deleted through the
//! API reach local and S3 (s3s-fs) targets with the right bytes; deletes only
//! where `can_delete_objects`; a sync counts `exported` / `unchanged`; an
//! upload that fails is a per-object error and a later sync exports it; an
//! export sync through every remote backend.
#![allow(clippy::unwrap_used)]

use std::{path::Path, sync::Arc};

use labelsync::storage::{BackendKind, Storage};
use labelsync_tests::{
    AppOptions, TestApp,
    backends::{
        AZURITE_ACCOUNT, AZURITE_KEY, DatabricksFake, bucket_name, create_azure_container,
        create_gcs_bucket, create_s3_bucket, endpoint, open, read_object,
    },
    eventually, spawn_app,
};
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use serde_json::{Value, json};

fn options() -> AppOptions {
    AppOptions::with_storages()
}

/// A project with `n` tasks, imported from a JSONL file on a local source.
async fn project_with_tasks(app: &TestApp, n: usize) -> (i64, Vec<i64>) {
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: Vec<String> = (0..n)
        .map(|i| json!({ "text": format!("task {i}") }).to_string())
        .collect();
    std::fs::write(data.join("tasks.jsonl"), lines.join("\n")).unwrap();
    let project = app.project("export").await;
    let source = app
        .local_storage(project, json!({ "import_method": "tasks" }))
        .await;
    let run = app.sync(&source["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let ids = app
        .all_tasks(project)
        .await
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    (project, ids)
}

async fn local_target(app: &TestApp, project: i64, prefix: &str, can_delete: bool) -> Value {
    std::fs::create_dir_all(app.doc_root.path().join("export")).unwrap();
    let (status, storage) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": "local", "prefix": prefix,
                "can_delete_objects": can_delete, "config": { "path": "export" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{storage}");
    storage
}

async fn annotate(app: &TestApp, task: i64, label: &str) -> i64 {
    let (status, a) = app
        .post(
            &format!("/api/v1/tasks/{task}/annotations"),
            json!({
                "result": [{ "type": "choices", "value": { "choices": [label] } }],
                "completed_by": { "id": 7, "email": "ann@example.com" }, "lead_time": 2.5,
            }),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    a["id"].as_i64().unwrap()
}

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn label(doc: &Value) -> &str {
    doc["result"][0]["value"]["choices"][0]
        .as_str()
        .unwrap_or_default()
}

/// Every run of a storage has ended.
async fn idle(app: &TestApp, storage: &Value) -> bool {
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", storage["id"]))
        .await;
    runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["status"] != "queued" && r["status"] != "running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_events_reach_local_and_s3_targets() {
    let app = spawn_app(options()).await;
    let (project, tasks) = project_with_tasks(&app, 3).await;
    let local = local_target(&app, project, "ann/", true).await;
    let (s3, bucket_view) = an_s3_target_that_keeps_deleted_objects(&app, project).await;
    let s3_doc = |id: i64| read_s3_doc(bucket_view.clone(), id);

    // Create: both targets get the Label Studio-shaped JSON.
    let id = annotate(&app, tasks[0], "cat").await;
    let file = app.doc_root.path().join(format!("export/ann/{id}.json"));
    eventually("the local export", || async { read_json(&file).is_some() }).await;
    eventually("the S3 export", || async { s3_doc(id).await.is_some() }).await;
    for doc in [read_json(&file).unwrap(), s3_doc(id).await.unwrap()] {
        has_the_label_studio_shape(&doc, id, tasks[0]);
    }

    // Update: exported again.
    let (status, _) = app
        .patch(
            &format!("/api/v1/annotations/{id}"),
            json!({ "result": [{ "value": { "choices": ["dog"] } }] }),
        )
        .await;
    assert_eq!(status, 200);
    eventually("the local update", || async {
        read_json(&file).is_some_and(|d| label(&d) == "dog")
    })
    .await;
    eventually("the S3 update", || async {
        s3_doc(id).await.is_some_and(|d| label(&d) == "dog")
    })
    .await;

    // Delete: removed where can_delete_objects, kept elsewhere.
    let (status, _) = app.delete(&format!("/api/v1/annotations/{id}")).await;
    assert_eq!(status, 204);
    eventually("the local delete", || async { !file.exists() }).await;
    // The file goes before its run commits the counters read below.
    eventually("the local target's runs", || idle(&app, &local)).await;
    eventually("the S3 target's runs", || idle(&app, &s3)).await;
    assert_eq!(
        s3_doc(id).await.map(|d| label(&d).to_owned()),
        Some("dog".into()),
        "kept: can_delete_objects is off"
    );
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", local["id"]))
        .await;
    let deleted: i64 = runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["counters"]["deleted"].as_i64().unwrap())
        .sum();
    assert_eq!(deleted, 1, "{runs}");

    app.stop().await;
}

/// A target moved to another place (its `config`) gets every annotation
/// at its next export: the links said where each annotation was written
/// by its key alone, which the new place shares, so annotations exported
/// before were counted unchanged and never written there. A config that
/// names the same place another way (`export/` for `export`) keeps them:
/// it was a move too, and every annotation was written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_keeps_its_links_until_it_moves_elsewhere() {
    let app = spawn_app(options()).await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    let target = local_target(&app, project, "moved", false).await;
    let id = annotate(&app, tasks[0], "cat").await;
    let old = app.doc_root.path().join(format!("export/moved/{id}.json"));
    eventually("the first export", || async { read_json(&old).is_some() }).await;
    eventually("the target's runs", || idle(&app, &target)).await;
    let path = format!("/api/v1/storages/{}", target["id"]);
    let (status, body) = app
        .patch(&path, json!({ "config": { "path": "./export/" } }))
        .await;
    assert_eq!(status, 200, "{body}");
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["counters"]["exported"], 0, "the same place: {run}");
    std::fs::create_dir_all(app.doc_root.path().join("elsewhere")).unwrap();
    let (status, body) = app
        .patch(&path, json!({ "config": { "path": "elsewhere" } }))
        .await;
    assert_eq!(status, 200, "{body}");
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["counters"]["exported"], 1, "{run}");
    let new = app
        .doc_root
        .path()
        .join(format!("elsewhere/moved/{id}.json"));
    assert_eq!(
        read_json(&new).map(|d| label(&d).to_owned()),
        Some("cat".into())
    );
    app.stop().await;
}

/// An annotation event whose transaction commits after newer events were
/// read (ids are taken at insert, not at commit) is exported by the run
/// that is draining, not left for the next run: under a steady stream of
/// saves one run keeps going, and such an event waited as long as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_drained_by_the_live_run() {
    let app = spawn_app(options()).await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    let target = local_target(&app, project, "late", false).await;
    let storage = target["id"].as_i64().unwrap();
    let db = Database::connect(&app.database_url).await.unwrap();
    let insert_events = |ids: &str| {
        format!(
            "INSERT INTO export_outbox (storage_id, annotation_id, action, version, created_at) \
             SELECT {storage}, id, 'upsert', 1, now() FROM annotations WHERE {ids}"
        )
    };
    let insert_annotations = |n: usize| {
        format!(
            "INSERT INTO annotations (task_id, project_id, result, was_cancelled, ground_truth, \
             created_at, updated_at) SELECT {}, {project}, '[]', false, false, now(), now() \
             FROM generate_series(1, {n})",
            tasks[0]
        )
    };
    // The late event takes the lowest id and holds its commit.
    let late = db.begin().await.unwrap();
    late.execute_unprepared(&insert_annotations(1))
        .await
        .unwrap();
    late.execute_unprepared(&insert_events("id = (SELECT max(id) FROM annotations)"))
        .await
        .unwrap();
    // Five pages of newer events, then a save through the API starts the run.
    db.execute_unprepared(&insert_annotations(5000))
        .await
        .unwrap();
    db.execute_unprepared(&insert_events("true")).await.unwrap();
    annotate(&app, tasks[0], "go").await;
    let written = app.doc_root.path().join("export/late");
    eventually("the run's first uploads", || async {
        std::fs::read_dir(&written).is_ok_and(|mut d| d.next().is_some())
    })
    .await;
    late.commit().await.unwrap();

    eventually("the export", || idle(&app, &target)).await;
    assert_eq!(std::fs::read_dir(&written).unwrap().count(), 5002);
    let (_, runs) = app.get(&format!("/api/v1/runs?storage_id={storage}")).await;
    let runs = runs["items"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "one run drained every event: {runs:?}");
    assert_eq!(runs[0]["counters"]["exported"], 5002, "{:?}", runs[0]);
    app.stop().await;
}

/// A save that commits while the storage's events run is finishing (its
/// last page read, its end not yet committed) sees that run live and starts
/// none; the run's end must start the next one, not leave the event to the
/// scheduler's tick (a minute here). The end is held by a lock on a webhook
/// its `run.completed` event is delivered to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_saved_while_the_run_finishes_starts_the_next_run() {
    let mut opts = options();
    opts.env
        .push(("LABELSYNC_SCHEDULE_TICK_MS", "60000".into()));
    let app = spawn_app(opts).await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    let target = local_target(&app, project, "finishing", false).await;
    let body = json!({ "url": "http://127.0.0.1:9/hook", "events": ["run.completed"], "project_id": project });
    let (status, hook) = app.post("/api/v1/webhooks", body).await;
    assert_eq!(status, 201, "{hook}");
    let db = Database::connect(&app.database_url).await.unwrap();
    let written = app.doc_root.path().join("export/finishing");
    let exported = |id: i64| written.join(format!("{id}.json")).exists();

    let hold = db.begin().await.unwrap();
    hold.execute_unprepared(&format!(
        "SELECT id FROM webhooks WHERE id = {} FOR UPDATE",
        hook["id"]
    ))
    .await
    .unwrap();
    let first = annotate(&app, tasks[0], "first").await;
    eventually("the first export", || async { exported(first) }).await;
    eventually("the run's end to wait on the lock", || async {
        let waiting = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .unwrap()
            .unwrap();
        waiting.try_get::<i64>("", "n").unwrap() > 0
    })
    .await;
    let late = annotate(&app, tasks[0], "late").await;
    hold.commit().await.unwrap();

    eventually("the late event's export, long before the tick", || async {
        exported(late)
    })
    .await;
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", target["id"]))
        .await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 2, "{runs}");
    app.stop().await;
}

/// An S3 (s3s-fs) target on `labels` with `can_delete_objects` off, and a
/// view of its bucket.
async fn an_s3_target_that_keeps_deleted_objects(
    app: &TestApp,
    project: i64,
) -> (Value, Arc<dyn Storage>) {
    let (s3, bucket_view, _) = an_s3_target(app, project, false).await;
    (s3, bucket_view)
}

/// An S3 (s3s-fs) target on `labels`, a view of its bucket, and its
/// secrets.
async fn an_s3_target(
    app: &TestApp,
    project: i64,
    can_delete: bool,
) -> (Value, Arc<dyn Storage>, Value) {
    let (url, key, secret) = (
        endpoint("TEST_S3S_ENDPOINT"),
        std::env::var("TEST_S3S_ACCESS_KEY").unwrap_or_else(|_| "labelsync-test".into()),
        std::env::var("TEST_S3S_SECRET_KEY").unwrap_or_else(|_| "labelsync-test-secret".into()),
    );
    let bucket = bucket_name();
    create_s3_bucket(&url, &key, &secret, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    let secrets = json!({ "access_key_id": key, "secret_access_key": secret });
    let (status, s3) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": "s3", "prefix": "labels",
                "can_delete_objects": can_delete, "config": config, "secrets": secrets,
            }),
        )
        .await;
    assert_eq!(status, 201, "{s3}");
    let bucket_view = open(BackendKind::S3, config, secrets.clone()).await;
    (s3, bucket_view, secrets)
}

/// The object of an annotation deleted after its target's prefix changed
/// is deleted where it was exported: the delete took the key the new
/// prefix gives (nothing there), and the exported object stayed for ever.
/// The new prefix's key is deleted too (an export under it may have
/// written it before the delete, with no link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_after_a_prefix_change_removes_the_exported_object_on_postgres() {
    delete_after_a_prefix_change(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_after_a_prefix_change_removes_the_exported_object_on_sqlite() {
    delete_after_a_prefix_change(true).await;
}

async fn delete_after_a_prefix_change(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..options()
    })
    .await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    let target = local_target(&app, project, "a", true).await;
    let id = annotate(&app, tasks[0], "cat").await;
    let file = app.doc_root.path().join(format!("export/a/{id}.json"));
    eventually("the export", || async { file.exists() }).await;
    eventually("the target's runs", || idle(&app, &target)).await;
    let path = format!("/api/v1/storages/{}", target["id"]);
    let (status, patched) = app.patch(&path, json!({ "prefix": "b" })).await;
    assert_eq!(status, 200, "{patched}");
    // As an export under the new prefix leaves it when the delete comes
    // between its upload and its commit (no link written).
    let moved = app.doc_root.path().join(format!("export/b/{id}.json"));
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::copy(&file, &moved).unwrap();
    let (status, _) = app.delete(&format!("/api/v1/annotations/{id}")).await;
    assert_eq!(status, 204);
    eventually(
        "the delete where it was exported, and under the new prefix",
        || async { !file.exists() && !moved.exists() },
    )
    .await;
    app.stop().await;
}

/// A delete the storage refuses for its credentials (a rotated secret,
/// `SignatureDoesNotMatch`) fails the run, as an upload does, and is sent
/// by the next sync once they work again: it was counted as a failed
/// object and its event dropped, so the object stayed for ever (its
/// annotation gone, no later sync could find it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_refused_for_its_credentials_is_sent_once_they_work() {
    let app = spawn_app(options()).await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    let (s3, bucket_view, secrets) = an_s3_target(&app, project, true).await;
    let id = annotate(&app, tasks[0], "cat").await;
    let s3_doc = || read_s3_doc(bucket_view.clone(), id);
    eventually("the S3 export", || async { s3_doc().await.is_some() }).await;
    eventually("the target's runs", || idle(&app, &s3)).await;
    let path = format!("/api/v1/storages/{}", s3["id"]);
    let wrong = json!({ "secret_access_key": "not-the-secret" });
    let (status, patched) = app.patch(&path, json!({ "secrets": wrong })).await;
    assert_eq!(status, 200, "{patched}");
    let (status, _) = app.delete(&format!("/api/v1/annotations/{id}")).await;
    assert_eq!(status, 204);
    eventually("a run that failed the delete", || async {
        let (_, runs) = app
            .get(&format!("/api/v1/runs?storage_id={}", s3["id"]))
            .await;
        let items = runs["items"].as_array().cloned().unwrap_or_default();
        items.iter().any(|r| r["status"] == "failed")
    })
    .await;
    assert!(s3_doc().await.is_some(), "the object is still there");
    let (status, patched) = app.patch(&path, json!({ "secrets": secrets })).await;
    assert_eq!(status, 200, "{patched}");
    // Events wait 5 minutes after a failed events run; a sync sends them.
    let run = app.sync(&s3["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["deleted"], 1, "{run}");
    assert!(s3_doc().await.is_none(), "the delete was sent");
    app.stop().await;
}

/// The exported document of annotation `id` in the S3 target's bucket.
async fn read_s3_doc(bucket_view: Arc<dyn Storage>, id: i64) -> Option<Value> {
    let bytes = read_object(&*bucket_view, &format!("labels/{id}.json"))
        .await
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()
}

/// An exported annotation `id` of task `task` as `annotate` made it.
fn has_the_label_studio_shape(doc: &Value, id: i64, task: i64) {
    assert_eq!(doc["id"], id);
    assert_eq!(label(doc), "cat");
    assert_eq!(doc["task"]["id"], task);
    assert_eq!(doc["task"]["data"]["text"], "task 0");
    assert_eq!(doc["completed_by"]["email"], "ann@example.com");
    assert_eq!(doc["lead_time"], 2.5);
    assert_eq!(doc["was_cancelled"], false);
    for field in ["created_at", "updated_at", "ground_truth"] {
        assert!(doc.get(field).is_some(), "{field} in {doc}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_are_refused() {
    let app = spawn_app(options()).await;
    let (_, tasks) = project_with_tasks(&app, 2).await;
    let (status, err) = app
        .post(
            &format!("/api/v1/tasks/{}/annotations", tasks[1]),
            json!({ "result": "cat" }),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_result")),
        "{err}"
    );
    let (status, _) = app
        .post("/api/v1/tasks/999999/annotations", json!({ "result": [] }))
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// An export holds at most `LABELSYNC_EXPORT_CONCURRENCY` bodies at once,
/// not a page's: each body copies its task's data, so 300 annotations of
/// one 4 MB task made 1.2 GB of bodies before the first upload (and a
/// larger task had the worker OOM-killed on every retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_a_few_bodies_at_once_not_a_page() {
    use futures::StreamExt;
    let app = spawn_app(AppOptions {
        workers: false,
        ..options()
    })
    .await;
    let worker = labelsync_tests::spawn_ready_worker(
        &app,
        "exporter",
        &[("LABELSYNC_EXPORT_CONCURRENCY", "4")],
    )
    .await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let big = json!({ "text": "x".repeat(4 << 20) }).to_string();
    std::fs::write(data.join("big.json"), big).unwrap();
    let project = app.project("big task").await;
    let source = app
        .local_storage(project, json!({ "import_method": "tasks" }))
        .await;
    let run = app.sync(&source["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let task = app.all_tasks(project).await[0]["id"].as_i64().unwrap();
    let app = &app;
    futures::stream::iter(0..300)
        .for_each_concurrent(8, |i| async move {
            annotate(app, task, &format!("label {i}")).await;
        })
        .await;
    let target = local_target(app, project, "out", false).await;
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["counters"]["exported"], 300, "{run}");
    let peak = labelsync_tests::peak_rss(worker.0.id());
    eprintln!("the exporting worker peaked at {} MB: {run}", peak >> 20);
    assert!(peak < 400 << 20, "the worker peaked at {} MB", peak >> 20);
}

/// `count` tasks of `project` whose `text` is its number and `mib` MiB of
/// `x`, written straight into the table (an import of them takes a minute).
async fn big_tasks(app: &TestApp, project: i64, count: usize, mib: usize) {
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(&app.database_url).await.expect("connect");
    db.execute_unprepared(&format!(
        "INSERT INTO tasks (project_id, data, created_at, updated_at) \
         SELECT {project}, jsonb_build_object('text', i || repeat('x', {mib} << 20)), now(), now() \
         FROM generate_series(1, {count}) AS i"
    ))
    .await
    .expect("insert the tasks");
    db.close().await.ok();
}

/// An export page holds at most 32 MiB of annotations and tasks, not a
/// page of annotations' tasks: 64 annotations of 64 distinct 8 MiB tasks
/// were one page (workers the tests start read pages of 100), every task
/// read at once: the worker peaked at 655 MB, 242 MB with the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_page_holds_its_budget_of_tasks_not_a_pages_worth() {
    use futures::StreamExt;
    const TASKS: usize = 64;
    let app = spawn_app(AppOptions {
        workers: false,
        ..options()
    })
    .await;
    let project = app.project("big tasks").await;
    big_tasks(&app, project, TASKS, 8).await;
    let tasks: Vec<i64> = app
        .all_tasks(project)
        .await
        .iter()
        .map(|t| t["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(tasks.len(), TASKS);
    let app = &app;
    futures::stream::iter(tasks)
        .for_each_concurrent(8, |task| async move {
            annotate(app, task, "cat").await;
        })
        .await;

    let exporter = labelsync_tests::spawn_ready_worker(
        app,
        "exporter",
        &[("LABELSYNC_EXPORT_CONCURRENCY", "2")],
    )
    .await;
    let target = local_target(app, project, "out", false).await;
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["counters"]["exported"], TASKS, "{run}");
    let peak = labelsync_tests::peak_rss(exporter.0.id());
    eprintln!("the exporting worker peaked at {} MB: {run}", peak >> 20);
    assert!(peak < 400 << 20, "the worker peaked at {} MB", peak >> 20);
}

/// A drain whose events' annotations and tasks pass the page budget takes
/// the events that fit and leaves the rest, which its next page sends: three
/// events of 12 MiB tasks waiting for a worker are two pages (as the page
/// functions say when asked directly), all sent, the outbox left empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_the_page_budget_sends_the_rest_in_its_next_page() {
    use sea_orm::{ConnectionTrait, Database};
    let app = spawn_app(AppOptions {
        workers: false,
        ..options()
    })
    .await;
    let project = app.project("big events").await;
    big_tasks(&app, project, 3, 12).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let target = local_target(&app, project, "events", false).await;
    let mut ids = Vec::new();
    for task in app.all_tasks(project).await {
        ids.push(annotate(&app, task["id"].as_i64().expect("id"), "cat").await);
    }

    let pages = labelsync::db::connect(&app.database_url).await.expect("db");
    let budget = labelsync::db::exports::Budget {
        bytes: 32 << 20,
        first_window: 1,
    };
    let (page, covered) = labelsync::db::exports::annotations_of(&pages, project, &ids, budget)
        .await
        .expect("a drain page");
    assert_eq!((page.taken, covered, page.tasks.len()), (2, 2, 2));
    let page = labelsync::db::exports::annotation_page(&pages, project, 0, 100, budget)
        .await
        .expect("a full pass page");
    assert_eq!((page.taken, page.next), (2, Some(ids[1])));

    let _worker = labelsync_tests::spawn_ready_worker(&app, "drainer", &[]).await;
    let dir = app.doc_root.path().join("export/events");
    for id in &ids {
        let file = dir.join(format!("{id}.json"));
        eventually("every event's object", || async { file.exists() }).await;
    }
    eventually("the target's runs", || idle(&app, &target)).await;
    let left = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) FROM export_outbox",
        ))
        .await
        .expect("count")
        .expect("a row")
        .try_get_by_index::<i64>(0)
        .expect("a count");
    assert_eq!(left, 0, "the outbox is drained");
    for id in ids {
        let doc = read_json(&dir.join(format!("{id}.json"))).expect("an exported document");
        assert_eq!(doc["id"], id);
        assert_eq!(
            doc["task"]["data"]["text"].as_str().map(str::len),
            Some((12 << 20) + 1)
        );
    }
}

/// The runs of `storage` of `scope`.
async fn runs_of_scope(app: &TestApp, storage: &Value, scope: &str) -> Vec<Value> {
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", storage["id"]))
        .await;
    let runs = runs["items"].as_array().expect("items").clone();
    runs.into_iter().filter(|r| r["scope"] == scope).collect()
}

/// A target's period that comes while an export of saved annotations is
/// live starts its full export once that one ends (the period counted as
/// used: annotations saved all day long kept full exports out, period
/// after period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_export_waits_for_a_live_events_export() {
    let app = spawn_app(AppOptions {
        workers: false,
        ..options()
    })
    .await;
    let importer = labelsync_tests::spawn_ready_worker(&app, "importer", &[]).await;
    let (project, tasks) = project_with_tasks(&app, 1).await;
    drop(importer);
    let target = local_target(&app, project, "periodic", false).await;
    annotate(&app, tasks[0], "cat").await;
    eventually(
        "the annotation's events export, waiting for a worker",
        || async { !runs_of_scope(&app, &target, "events").await.is_empty() },
    )
    .await;
    let (status, patched) = app
        .patch(
            &format!("/api/v1/storages/{}", target["id"]),
            json!({ "sync_interval_seconds": 3600 }),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    // Ticks every 200 ms meet the live events export.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(runs_of_scope(&app, &target, "full").await.is_empty());
    let _worker = labelsync_tests::spawn_ready_worker(&app, "exporter", &[]).await;
    eventually("the period's full export", || async {
        !runs_of_scope(&app, &target, "full").await.is_empty()
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_export_counts_skips_unchanged_and_retries_failed_uploads() {
    let app = spawn_app(options()).await;
    let (ids, target) = fifty_annotations_then_a_local_target(&app).await;
    let blocked = block_the_uploads_of(&app, &ids[..2]);
    a_sync_exports_the_rest_and_records_the_blocked_uploads(&app, &target, &ids).await;
    // The obstacle goes; the next sync exports the two and skips the rest.
    for dir in &blocked {
        std::fs::remove_dir_all(dir).unwrap();
    }
    the_next_sync_exports_the_two_and_skips_the_rest(&app, &target).await;
    a_sync_with_nothing_changed_uploads_nothing(&app, &target, &ids).await;
    app.stop().await;
}

/// 50 annotated tasks, then a local target on `out` (created after the
/// annotations: only a sync exports them): (annotation ids, target).
async fn fifty_annotations_then_a_local_target(app: &TestApp) -> (Vec<i64>, Value) {
    let (project, tasks) = project_with_tasks(app, 50).await;
    let mut ids = Vec::new();
    for task in &tasks {
        ids.push(annotate(app, *task, "cat").await);
    }
    let target = local_target(app, project, "out", false).await;
    (ids, target)
}

/// Two uploads will fail: a directory sits where their files go. Returns
/// those directories.
fn block_the_uploads_of(app: &TestApp, ids: &[i64]) -> Vec<std::path::PathBuf> {
    let blocked: Vec<_> = ids
        .iter()
        .map(|id| app.doc_root.path().join(format!("export/out/{id}.json")))
        .collect();
    for dir in &blocked {
        std::fs::create_dir_all(dir.join("in-the-way")).unwrap();
    }
    blocked
}

async fn a_sync_exports_the_rest_and_records_the_blocked_uploads(
    app: &TestApp,
    target: &Value,
    ids: &[i64],
) {
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(
        (
            run["counters"]["exported"].as_i64(),
            run["counters"]["failed"].as_i64()
        ),
        (Some(48), Some(2)),
        "{run}"
    );
    let (_, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().unwrap()
        ))
        .await;
    let mut keys: Vec<&str> = errors["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    keys.sort();
    let mut expected: Vec<String> = ids[..2].iter().map(|id| format!("out/{id}.json")).collect();
    expected.sort();
    assert_eq!(keys, expected, "{errors}");
}

async fn the_next_sync_exports_the_two_and_skips_the_rest(app: &TestApp, target: &Value) {
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        (
            run["counters"]["exported"].as_i64(),
            run["counters"]["unchanged"].as_i64()
        ),
        (Some(2), Some(48)),
        "{run}"
    );
    let files = std::fs::read_dir(app.doc_root.path().join("export/out"))
        .unwrap()
        .count();
    assert_eq!(files, 50);
}

/// Nothing changed: nothing uploaded (the files keep their mtimes).
async fn a_sync_with_nothing_changed_uploads_nothing(app: &TestApp, target: &Value, ids: &[i64]) {
    let stamp = std::fs::metadata(
        app.doc_root
            .path()
            .join(format!("export/out/{}.json", ids[10])),
    )
    .unwrap()
    .modified()
    .unwrap();
    let run = app.sync(&target["id"]).await;
    assert_eq!(
        (
            run["counters"]["exported"].as_i64(),
            run["counters"]["unchanged"].as_i64()
        ),
        (Some(0), Some(50)),
        "{run}"
    );
    let after = std::fs::metadata(
        app.doc_root
            .path()
            .join(format!("export/out/{}.json", ids[10])),
    )
    .unwrap()
    .modified()
    .unwrap();
    assert_eq!(stamp, after);
}

/// An export through every remote backend, one test each: each target gets
/// the objects.
async fn export_sync_end_to_end(backend: &str, config: Value, secrets: Value) {
    let app = spawn_app(options()).await;
    let (project, tasks) = project_with_tasks(&app, 3).await;
    let mut ids = Vec::new();
    for task in &tasks {
        ids.push(annotate(&app, *task, "cat").await);
    }
    let target = a_validated_target(&app, project, backend, &config, &secrets).await;
    let run = app.sync(&target["id"]).await;
    assert_eq!(run["status"], "completed", "{backend}: {run}");
    assert_eq!(run["counters"]["exported"], 3, "{backend}: {run}");
    let storage = open(BackendKind::parse(backend).unwrap(), config, secrets).await;
    for id in &ids {
        let bytes = read_object(&*storage, &format!("exports/{id}.json"))
            .await
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        let doc: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (doc["id"].as_i64(), label(&doc)),
            (Some(*id), "cat"),
            "{backend}"
        );
    }
    app.stop().await;
}

/// A target on `exports/` whose validation (the write check) passes.
async fn a_validated_target(
    app: &TestApp,
    project: i64,
    backend: &str,
    config: &Value,
    secrets: &Value,
) -> Value {
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": backend, "prefix": "exports/",
                "config": config, "secrets": secrets,
            }),
        )
        .await;
    assert_eq!(status, 201, "{backend}: {target}");
    let (status, validated) = app
        .post(
            &format!("/api/v1/storages/{}/validate", target["id"]),
            json!({}),
        )
        .await;
    assert_eq!(
        status, 200,
        "{backend}: the target write check: {validated}"
    );
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sync_through_s3() {
    let moto = endpoint("TEST_S3_ENDPOINT");
    let s3_bucket = bucket_name();
    create_s3_bucket(&moto, "test", "test", &s3_bucket).await;
    export_sync_end_to_end(
        "s3",
        json!({ "bucket": s3_bucket, "endpoint_url": moto }),
        json!({ "access_key_id": "t", "secret_access_key": "t" }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sync_through_gcs() {
    let gcs_url = endpoint("TEST_GCS_ENDPOINT");
    let gcs_bucket = bucket_name();
    create_gcs_bucket(&gcs_url, &gcs_bucket).await;
    export_sync_end_to_end(
        "gcs",
        json!({ "bucket": gcs_bucket, "endpoint_url": gcs_url }),
        json!({}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sync_through_azure() {
    let azure_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&azure_url, &container).await;
    export_sync_end_to_end(
        "azure",
        json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": azure_url }),
        json!({ "account_key": AZURITE_KEY }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sync_through_redis() {
    let redis = reqwest::Url::parse(&labelsync_tests::require_redis().await).unwrap();
    export_sync_end_to_end(
        "redis",
        json!({ "host": redis.host_str().unwrap(), "port": redis.port().unwrap_or(6379), "path": format!("{}:", bucket_name()) }),
        json!({}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sync_through_databricks() {
    let fake = DatabricksFake::start().await;
    export_sync_end_to_end(
        "databricks",
        json!({ "host": fake.url, "catalog": "main", "schema": "raw", "volume": "labels" }),
        json!({ "token": fake.token }),
    )
    .await;
}
