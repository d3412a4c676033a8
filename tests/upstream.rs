//! What upstream apps build on: webhooks (signed, delivered at least once,
//! in order per run, through outages and restarts) and idempotent POSTs.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use labelsync_tests::{
    AppOptions, TestApp, spawn_app, spawn_ready_worker, spawn_replica, webhook_receiver::Receiver,
    write_files,
};
use serde_json::{Value, json};

const RUN_EVENTS: [&str; 3] = ["run.queued", "run.started", "run.completed"];

/// A project with a local source of `files` images, and an endpoint of
/// that project subscribed to every event; returns (storage, webhook with
/// its secret).
async fn project_with_webhook(app: &TestApp, receiver: &Receiver, files: usize) -> (Value, Value) {
    write_files(&app.doc_root.path().join("data"), files, "jpg");
    let project = app.project("hooks").await;
    let (status, hook) = app
        .post(
            "/api/v1/webhooks",
            json!({ "url": receiver.url, "events": ["*"], "project_id": project }),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let storage = app.local_storage(project, json!({})).await;
    (storage, hook)
}

async fn deliveries(app: &TestApp, hook: &Value) -> Vec<Value> {
    let (status, page) = app
        .get(&format!("/api/v1/webhooks/{}/deliveries", hook["id"]))
        .await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().expect("items").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_events_are_signed_and_verify_with_the_reference_library_on_postgres() {
    signed_run_events(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_events_are_signed_and_verify_with_the_reference_library_on_sqlite() {
    signed_run_events(true).await;
}

async fn signed_run_events(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::with_storages()
    })
    .await;
    let receiver = Receiver::start().await;
    let (storage, hook) = project_with_webhook(&app, &receiver, 20).await;
    let secret = hook["secret"].as_str().expect("the secret, shown once");
    assert!(secret.starts_with("whsec_"), "{hook}");
    the_secret_is_never_shown_or_stored_again(&app, &hook, secret).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let run_id = run["id"].as_str().expect("run id");
    receiver
        .wait_until(Duration::from_secs(30), |_| {
            receiver.accepted_types_of_run(run_id).len() >= 3
        })
        .await;
    assert_eq!(receiver.accepted_types_of_run(run_id), RUN_EVENTS);
    let last = receiver.accepted().last().expect("an event").clone();
    let event = last.json();
    assert_eq!(last.headers["webhook-id"], event["id"].as_str().unwrap());
    assert_eq!(event["data"]["run"]["counters"]["created"], 20, "{event}");
    assert_eq!(event["data"]["project_id"], hook["project_id"], "{event}");
    assert_eq!(receiver.verify_with_reference_library(secret), 3);
    the_delivery_log_shows_each_attempt(&app, &hook).await;
    a_test_send_reaches_the_endpoint(&app, &hook, &receiver).await;
    app.stop().await;
}

/// Neither GET, the list, nor the database shows the secret.
async fn the_secret_is_never_shown_or_stored_again(app: &TestApp, hook: &Value, secret: &str) {
    let key = secret.trim_start_matches("whsec_");
    let (_, one) = app.get(&format!("/api/v1/webhooks/{}", hook["id"])).await;
    let (_, list) = app.get("/api/v1/webhooks").await;
    assert_eq!(one["url"], hook["url"], "{one}");
    for shown in [one, list] {
        assert!(!shown.to_string().contains(key), "secret shown: {shown}");
    }
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    use sea_orm::ConnectionTrait;
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT secret FROM webhooks",
        ))
        .await
        .expect("webhooks");
    let stored: String = rows[0].try_get("", "secret").expect("secret column");
    assert!(
        stored.starts_with("v1.") && !stored.contains(key),
        "{stored}"
    );
}

async fn the_delivery_log_shows_each_attempt(app: &TestApp, hook: &Value) {
    let items = deliveries(app, hook).await;
    let types: Vec<&str> = items
        .iter()
        .map(|d| d["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["run.completed", "run.started", "run.queued"],
        "newest first"
    );
    for d in &items {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"][0]["status_code"], 200, "{d}");
        assert!(d["attempts"][0]["duration_ms"].is_i64(), "{d}");
    }
}

async fn a_test_send_reaches_the_endpoint(app: &TestApp, hook: &Value, receiver: &Receiver) {
    let (status, sent) = app
        .post(&format!("/api/v1/webhooks/{}/test", hook["id"]), json!({}))
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["status"], "delivered", "{sent}");
    assert_eq!(sent["event_type"], "webhook.test", "{sent}");
    let last = receiver.accepted().last().expect("the test event").json();
    assert_eq!(last["type"], "webhook.test", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhook_bodies_get_400_and_write_nothing() {
    let app = spawn_app(AppOptions {
        env: vec![(
            "LABELSYNC_SECRET_KEY",
            labelsync_tests::TEST_SECRET_KEY.into(),
        )],
        ..AppOptions::default()
    })
    .await;
    let project = app.project("hooks").await;
    let good = |patch: Value| {
        let mut body = json!({ "url": "https://hooks.example/in", "events": ["run.completed"] });
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, code) in [
        (
            good(json!({ "url": "http://127.0.0.1:9/in" })),
            "endpoint_not_allowed",
        ),
        (
            good(json!({ "url": "http://169.254.169.254/latest/meta-data" })),
            "endpoint_not_allowed",
        ),
        (
            good(json!({ "url": "http://[::ffff:127.0.0.1]/in" })),
            "endpoint_not_allowed",
        ),
        (
            good(json!({ "url": "ftp://hooks.example/in" })),
            "invalid_config",
        ),
        (
            good(json!({ "url": "https://me:hunter2@hooks.example/in" })),
            "invalid_url",
        ),
        (good(json!({ "events": [] })), "invalid_events"),
        (
            good(json!({ "events": ["run.exploded"] })),
            "invalid_events",
        ),
        (
            good(json!({ "events": ["*", "run.failed"] })),
            "invalid_events",
        ),
        (good(json!({ "secret": "hunter2" })), "invalid_secret"),
        (
            good(json!({ "secret": "whsec_c2hvcnQ=" })),
            "invalid_secret",
        ),
        (
            good(json!({ "project_id": project + 1000 })),
            "unknown_project",
        ),
    ] {
        let (status, answer) = app.post("/api/v1/webhooks", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
        assert!(!answer.to_string().contains("hunter2"), "echoed: {answer}");
    }
    let (status, answer) = app
        .post("/api/v1/webhooks", json!({ "events": ["*"] }))
        .await;
    assert!((400..500).contains(&status), "{answer}");
    let (_, list) = app.get("/api/v1/webhooks").await;
    assert_eq!(list["items"], json!([]), "{list}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_every_event_once_in_order_per_run() {
    let app = spawn_app(AppOptions::with_storages()).await;
    let receiver = Receiver::start().await;
    let (storage, hook) = project_with_webhook(&app, &receiver, 5).await;
    receiver.answer_with(503);
    let first = app.sync(&storage["id"]).await;
    let second = app.sync(&storage["id"]).await;
    receiver
        .wait_until(Duration::from_secs(20), |_| receiver.received().len() >= 2)
        .await;
    receiver.answer_with(200);
    receiver
        .wait_until(Duration::from_secs(60), |accepted| accepted.len() >= 6)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for run in [&first, &second] {
        let types = receiver.accepted_types_of_run(run["id"].as_str().unwrap());
        assert_eq!(types, RUN_EVENTS, "run {}", run["id"]);
    }
    let ids: Vec<Value> = receiver
        .accepted()
        .iter()
        .map(|r| r.json()["id"].clone())
        .collect();
    let unique: std::collections::HashSet<String> = ids.iter().map(Value::to_string).collect();
    assert_eq!(unique.len(), 6, "each event accepted once: {ids:?}");
    let oldest = deliveries(&app, &hook)
        .await
        .last()
        .cloned()
        .expect("a delivery");
    assert!(oldest["attempt_count"].as_i64().unwrap() >= 2, "{oldest}");
    assert_eq!(oldest["attempts"][0]["status_code"], 503, "{oldest}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_always_fails_is_disabled_until_patched() {
    let mut opts = AppOptions::with_storages();
    opts.env
        .push(("LABELSYNC_WEBHOOK_MAX_AGE_SECS", "2".into()));
    let app = spawn_app(opts).await;
    let receiver = Receiver::start().await;
    let (storage, hook) = project_with_webhook(&app, &receiver, 3).await;
    receiver.answer_with(500);
    app.sync(&storage["id"]).await;
    let shown = wait_disabled(&app, &hook).await;
    let reason = shown["disabled_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("LABELSYNC_WEBHOOK_MAX_AGE_SECS"), "{shown}");
    let log = deliveries(&app, &hook).await;
    assert!(log.iter().all(|d| d["status"] == "failed"), "{log:#?}");
    let tries = receiver.received().len();
    app.sync(&storage["id"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.received().len(),
        tries,
        "a disabled endpoint gets nothing"
    );
    assert_eq!(deliveries(&app, &hook).await.len(), log.len());
    receiver.answer_with(200);
    let path = format!("/api/v1/webhooks/{}", hook["id"]);
    let (status, enabled) = app.patch(&path, json!({ "enabled": true })).await;
    assert_eq!(
        (status, &enabled["disabled_reason"]),
        (200, &Value::Null),
        "{enabled}"
    );
    let completed = &log[0];
    let (status, queued) = app
        .post(
            &format!("{path}/deliveries/{}/redeliver", completed["id"]),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, &queued["status"]),
        (202, &json!("pending")),
        "{queued}"
    );
    receiver
        .wait_until(Duration::from_secs(20), |accepted| accepted.len() == 1)
        .await;
    assert_eq!(receiver.accepted()[0].json()["type"], "run.completed");
    app.stop().await;
}

async fn wait_disabled(app: &TestApp, hook: &Value) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, shown) = app.get(&format!("/api/v1/webhooks/{}", hook["id"])).await;
        if shown["enabled"] == false {
            return shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never disabled: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events are rows written with the run: a worker killed (SIGKILL) and a
/// scheduler replaced while the endpoint is down lose none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_worker_kill_and_a_scheduler_restart() {
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::with_storages()
    })
    .await;
    let receiver = Receiver::start().await;
    let (storage, _hook) = project_with_webhook(&app, &receiver, 5).await;
    receiver.answer_with(503);
    let mut worker = spawn_ready_worker(&app, "hooks-a", &[]).await;
    let run = app.sync(&storage["id"]).await;
    let run_id = run["id"].as_str().expect("run id").to_owned();
    receiver
        .wait_until(Duration::from_secs(20), |_| !receiver.received().is_empty())
        .await;
    worker.kill();
    let replica = spawn_replica(&app).await;
    app.stop().await;
    receiver.answer_with(200);
    let _worker = spawn_ready_worker(&replica, "hooks-b", &[]).await;
    receiver
        .wait_until(Duration::from_secs(90), |_| {
            receiver.accepted_types_of_run(&run_id).len() >= 3
        })
        .await;
    assert_eq!(receiver.accepted_types_of_run(&run_id), RUN_EVENTS);
    replica.stop().await;
}

/// `storage.objects_missing` says what the storage's `on_missing` did:
/// with `delete_unlabeled`, three of four images deleted and one of those
/// annotated, `data.missing` 3, `data.tasks_deleted` 2, `data.tasks_kept` 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_objects_missing_event_counts_the_tasks_deleted_and_kept() {
    let app = spawn_app(AppOptions::with_storages()).await;
    let receiver = Receiver::start().await;
    let (storage, _hook) = project_with_webhook(&app, &receiver, 4).await;
    let path = format!("/api/v1/storages/{}", storage["id"]);
    let (status, patched) = app
        .patch(&path, json!({ "on_missing": "delete_unlabeled" }))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(app.sync(&storage["id"]).await["counters"]["created"], 4);
    let tasks = app.all_tasks(storage["project_id"].as_i64().unwrap()).await;
    let (status, _) = app
        .post(
            &format!("/api/v1/tasks/{}/annotations", tasks[1]["id"]),
            json!({ "result": [] }),
        )
        .await;
    assert_eq!(status, 201);
    let data = app.doc_root.path().join("data");
    for task in &tasks[..3] {
        let key = task["source"]["key"].as_str().unwrap();
        std::fs::remove_file(data.join(key)).expect("delete");
    }
    let run = app.sync(&storage["id"]).await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    let event_of_run = |r: &[labelsync_tests::webhook_receiver::Received]| {
        r.iter()
            .map(|r| r.json())
            .find(|e| e["type"] == "storage.objects_missing" && e["data"]["run"]["id"] == run_id)
    };
    receiver
        .wait_until(Duration::from_secs(30), |r| event_of_run(r).is_some())
        .await;
    let event = event_of_run(&receiver.accepted()).unwrap();
    let d = &event["data"];
    assert_eq!(
        (&d["missing"], &d["tasks_deleted"], &d["tasks_kept"]),
        (&json!(3), &json!(2), &json!(1)),
        "{event}"
    );
    let counters = &d["run"]["counters"];
    assert_eq!(
        (&counters["deleted"], &counters["kept"]),
        (&json!(2), &json!(1))
    );
    app.stop().await;
}

/// A POST with an `Idempotency-Key` under `token`: (status, body, replayed).
async fn post_with_key(
    app: &TestApp,
    token: &str,
    path: &str,
    body: &Value,
    key: &str,
) -> (u16, Value, bool) {
    let resp = app
        .client
        .post(format!("{}{path}", app.base))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    (status, resp.json().await.unwrap_or(Value::Null), replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_posts_replay_the_first_answer_on_postgres() {
    idempotent_posts(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_posts_replay_the_first_answer_on_sqlite() {
    idempotent_posts(true).await;
}

async fn idempotent_posts(embedded: bool) {
    let token = "idempotency-test-token";
    let app = spawn_app(AppOptions {
        embedded,
        token: Some(token.into()),
        ..AppOptions::without_workers()
    })
    .await;
    let body = json!({ "title": "once", "data_key": "image" });
    let (status, first, replayed) =
        post_with_key(&app, token, "/api/v1/projects", &body, "k-1").await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, again, replayed) =
        post_with_key(&app, token, "/api/v1/projects", &body, "k-1").await;
    assert_eq!((status, replayed, &again), (201, true, &first));
    let other = json!({ "title": "twice", "data_key": "image" });
    let (status, reused, _) = post_with_key(&app, token, "/api/v1/projects", &other, "k-1").await;
    assert_eq!(status, 422, "{reused}");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");
    let (status, theirs, replayed) =
        post_with_key(&app, "other-token", "/api/v1/projects", &body, "k-1").await;
    assert_eq!(
        (status, replayed),
        (201, false),
        "another caller's key is its own: {theirs}"
    );
    let bad = json!({ "title": "", "data_key": "image" });
    for expect_replay in [false, true] {
        let (status, _, replayed) =
            post_with_key(&app, token, "/api/v1/projects", &bad, "k-bad").await;
        assert_eq!((status, replayed), (400, expect_replay));
    }
    let (status, refused, _) =
        post_with_key(&app, token, "/api/v1/projects", &body, &"k".repeat(256)).await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (400, &json!("invalid_idempotency_key"))
    );
    concurrent_duplicates_create_one(&app, token).await;
    keys_expire_after_a_day(&app, token, &body).await;
    let (_, list) = app.get("/api/v1/projects?limit=1000").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 4, "{list}");
    app.stop().await;
}

/// A key older than 24 hours is new again (the request runs), and the
/// scheduler's cleanup deletes such keys.
async fn keys_expire_after_a_day(app: &TestApp, token: &str, body: &Value) {
    use labelsync::db::entities::idempotency_key::{Column, Entity};
    use sea_orm::{EntityTrait, sea_query::Expr};
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let day_ago = chrono::Utc::now() - chrono::Duration::hours(25);
    Entity::update_many()
        .col_expr(Column::CreatedAt, Expr::value(day_ago))
        .exec(&db)
        .await
        .expect("age the keys");
    let (status, _, replayed) = post_with_key(app, token, "/api/v1/projects", body, "k-1").await;
    assert_eq!(
        (status, replayed),
        (201, false),
        "an expired key runs again"
    );
    let cutoff = chrono::Utc::now() - chrono::Duration::hours(24);
    let pruned = labelsync::db::idempotency::prune(&db, cutoff)
        .await
        .expect("prune");
    assert!(pruned >= 3, "the other aged keys are deleted: {pruned}");
}

/// Eight copies of one request at once: one project, eight equal answers.
async fn concurrent_duplicates_create_one(app: &TestApp, token: &str) {
    let body = json!({ "title": "raced", "data_key": "image" });
    let answers = futures::future::join_all(
        (0..8).map(|_| post_with_key(app, token, "/api/v1/projects", &body, "k-race")),
    )
    .await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(s, b, _)| format!("{s} {}", b["id"]))
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(_, _, replayed)| !replayed).count(),
        1
    );
}

/// One Server-Sent Event: when it arrived, its name, its data.
type Sse = (std::time::Instant, String, Value);

/// Reads a Server-Sent Events stream until it ends, `until` holds of what
/// arrived, or `timeout` passes.
async fn read_sse(
    app: &TestApp,
    path: &str,
    timeout: Duration,
    until: impl Fn(&[Sse]) -> bool,
) -> Vec<Sse> {
    let mut resp = app
        .client
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .expect("GET events");
    assert_eq!(resp.status(), 200, "{path}");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (mut events, mut buf) = (Vec::new(), String::new());
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, resp.chunk()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            if let (Some(name), Some(data)) = (field("event:"), field("data:")) {
                let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                events.push((std::time::Instant::now(), name, data));
            }
        }
        if until(&events) {
            break;
        }
    }
    events
}

/// The scheduler that streams the run is not the one that started it, and
/// the run's worker is another process: the run row carries it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_progress_streams_from_a_replica_that_did_not_start_the_run() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let replica = spawn_replica(&app).await;
    write_files(&app.doc_root.path().join("data"), 3000, "jpg");
    let project = app.project("live").await;
    let other_project = app.project("elsewhere").await;
    let storage = app.local_storage(project, json!({})).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let run_path = format!("/api/v1/runs/{run_id}/events");
    let ended = |events: &[Sse]| {
        events
            .iter()
            .any(|(_, name, run)| name == "run" && run["status"] == "completed")
    };
    let mine = format!("/api/v1/events?project_id={project}");
    let theirs = format!("/api/v1/events?project_id={other_project}");
    let (run_events, project_events, other_events, _worker) = tokio::join!(
        read_sse(&replica, &run_path, Duration::from_secs(120), |_| false),
        read_sse(&replica, &mine, Duration::from_secs(120), ended),
        read_sse(&replica, &theirs, Duration::from_secs(8), |_| false),
        async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            spawn_ready_worker(&app, "live", &[]).await
        },
    );
    the_run_stream_shows_progress_then_ends(&run_events, &run_id);
    let statuses: Vec<&str> = project_events
        .iter()
        .filter(|(_, _, run)| run["id"] == run_id.as_str())
        .map(|(_, _, run)| run["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.first(), Some(&"queued"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"completed"), "{statuses:?}");
    assert!(
        other_events.is_empty(),
        "another project's stream: {other_events:?}"
    );
    let (status, _) = replica.get("/api/v1/runs/01NOSUCHRUN/events").await;
    assert_eq!(status, 404);
    let (status, _) = replica
        .get(&format!("/api/v1/events?project_id={}", project + 1000))
        .await;
    assert_eq!(status, 404);
    replica.stop().await;
    app.stop().await;
}

fn the_run_stream_shows_progress_then_ends(events: &[Sse], run_id: &str) {
    let names: Vec<&str> = events.iter().map(|(_, name, _)| name.as_str()).collect();
    let (last, progress) = names.split_last().expect("events");
    assert_eq!(*last, "finished", "{names:?}");
    assert!(
        progress.len() >= 2 && progress.iter().all(|n| *n == "progress"),
        "{names:?}"
    );
    assert_eq!(
        events[0].2["status"], "queued",
        "connected before a worker took it"
    );
    let done = &events[events.len() - 1].2;
    assert_eq!(
        (&done["id"], &done["status"]),
        (&json!(run_id), &json!("completed"))
    );
    assert_eq!(done["counters"]["created"], 3000, "{done}");
    let created: Vec<i64> = events
        .iter()
        .map(|(_, _, r)| r["counters"]["created"].as_i64().unwrap())
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] <= w[1]),
        "counters never go back: {created:?}"
    );
    for pair in events.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(400),
            "events at most every 500 ms: {gap:?}"
        );
    }
}

/// Endpoints get only the event types they subscribed to, of their own
/// project (or of all, with no project).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_get_the_types_and_projects_they_subscribed_to() {
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::with_storages()
    })
    .await;
    let (mine, theirs, everyone) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    write_files(&app.doc_root.path().join("data"), 1, "jpg");
    let project = app.project("cancelled").await;
    let other = app.project("other").await;
    for (receiver, project_id) in [
        (&mine, json!(project)),
        (&theirs, json!(other)),
        (&everyone, Value::Null),
    ] {
        let body =
            json!({ "url": receiver.url, "events": ["run.cancelled"], "project_id": project_id });
        let (status, hook) = app.post("/api/v1/webhooks", body).await;
        assert_eq!(status, 201, "{hook}");
    }
    let storage = app.local_storage(project, json!({})).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let (status, run) = app
        .post(&format!("/api/v1/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, &run["status"]),
        (200, &json!("cancelled")),
        "{run}"
    );
    // No worker took the run: the one started now only delivers.
    let _worker = spawn_ready_worker(&app, "deliverer", &[]).await;
    for receiver in [&mine, &everyone] {
        receiver
            .wait_until(Duration::from_secs(30), |accepted| !accepted.is_empty())
            .await;
        assert_eq!(receiver.accepted_types_of_run(&run_id), ["run.cancelled"]);
        let event = receiver.accepted()[0].json();
        assert_eq!(
            event["data"]["run"]["error"], "cancelled by request",
            "{event}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        theirs.received().is_empty(),
        "another project's endpoint got {:?}",
        theirs.received()
    );
    assert_eq!(
        mine.received().len(),
        1,
        "run.queued and run.started were not subscribed to"
    );
    app.stop().await;
}
