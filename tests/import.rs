//! The import engine on real Postgres and Redis: Tasks mode in every format
//! and shape, per-object errors among good files, prefixes, unicode keys, and
//! change awareness on re-sync.
use std::path::Path;

use labelsync_tests::{AppOptions, TestApp, spawn_app, write_parquet};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

fn write(root: &Path, key: &str, body: &[u8]) {
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, body).expect("write");
}

/// A Tasks-mode local storage on `data/`.
async fn storage(app: &TestApp, project: i64, extra: Value) -> Value {
    let mut fields = json!({ "import_method": "tasks" });
    for (k, v) in extra.as_object().expect("object") {
        fields[k] = v.clone();
    }
    app.local_storage(project, fields).await
}

fn task_by_source<'a>(tasks: &'a [Value], key: &str, row: i64) -> &'a Value {
    tasks
        .iter()
        .find(|t| t["source"]["key"] == key && t["source"]["row_index"] == row)
        .unwrap_or_else(|| panic!("no task for {key} row {row}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_mode_reads_every_format_and_records_bad_objects() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    write(&data, "one.json", br#"{"text": "single"}"#);
    write(
        &data,
        "array.json",
        br#"[{"text": "a0"}, {"text": "a1"}, {"text": "a2"}]"#,
    );
    write(
        &data,
        "full.json",
        br#"[{"data": {"text": "f0"}, "meta": {"source": "crm"},
              "annotations": [{"result": [{"value": {"choices": ["pos"]}}], "lead_time": 3.5,
                               "completed_by": {"id": 7, "email": "a@b.c"}, "ground_truth": true}],
              "predictions": [{"result": [{"value": 1}], "model_version": "m-2", "score": 0.75}]},
             {"data": {"text": "f1"}}]"#,
    );
    write(&data, "bom.json", "\u{feff}{\"text\": \"bom\"}".as_bytes());
    write(
        &data,
        "lines.jsonl",
        b"{\"text\": \"l0\"}\n\n{\"text\": \"l1\"}\nthis is not json\r\n{\"text\": \"l3\"}\n",
    );
    write(
        &data,
        "sp ace/ünï cødé.ndjson",
        "{\"text\": \"u0\"}\n{\"text\": \"u1\"}\n".as_bytes(),
    );
    write_parquet(&data.join("table.parquet"), 5, 2);
    write(
        &data,
        "broken.json",
        br#"[{"text": "b0"}, {"text": "b1"}, {"text": "#,
    );
    write(
        &data,
        "mixed.json",
        br#"[{"text": "m0"}, {"data": {"text": "m1"}}]"#,
    );
    write(&data, "notes.txt", b"not a task file");
    write(
        &data,
        "deep.json",
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes(),
    );
    write(&data, "fake.parquet", b"PAR1 but not really");

    let project = app.project("tasks").await;
    let storage = storage(&app, project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    // 1 + 3 + 2 + 1 + 3 (jsonl) + 2 (ndjson) + 5 (parquet) + 2 (broken, kept) + 1 (mixed, kept)
    assert_eq!(run["counters"]["created"], 20, "{run}");
    // The bad line, broken.json, mixed.json, notes.txt, deep.json, fake.parquet.
    assert_eq!(run["counters"]["failed"], 6, "{run}");
    assert_eq!(run["counters"]["listed"], 12, "{run}");

    let (status, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, 200);
    let errors = errors["items"].as_array().expect("items").clone();
    let error_of = |key: &str| {
        errors
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("no error for {key}: {errors:?}"))
            .clone()
    };
    assert_eq!(error_of("lines.jsonl")["row_index"], 2);
    assert!(
        error_of("lines.jsonl")["error"]
            .as_str()
            .expect("msg")
            .contains("not valid JSON")
    );
    assert!(
        error_of("broken.json")["error"]
            .as_str()
            .expect("msg")
            .contains("truncated")
    );
    assert!(
        error_of("mixed.json")["error"]
            .as_str()
            .expect("msg")
            .contains("must not mix")
    );
    assert!(
        error_of("notes.txt")["error"]
            .as_str()
            .expect("msg")
            .contains("unsupported file type")
    );
    assert!(
        error_of("deep.json")["error"]
            .as_str()
            .expect("msg")
            .contains("recursion limit")
    );
    assert!(
        error_of("fake.parquet")["error"]
            .as_str()
            .expect("msg")
            .contains("Parquet")
    );

    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 20);
    assert_eq!(
        task_by_source(&tasks, "one.json", 0)["data"],
        json!({ "text": "single" })
    );
    assert_eq!(
        task_by_source(&tasks, "array.json", 2)["data"],
        json!({ "text": "a2" })
    );
    assert_eq!(
        task_by_source(&tasks, "bom.json", 0)["data"],
        json!({ "text": "bom" })
    );
    assert_eq!(
        task_by_source(&tasks, "lines.jsonl", 3)["data"],
        json!({ "text": "l3" })
    );
    assert_eq!(
        task_by_source(&tasks, "sp ace/ünï cødé.ndjson", 1)["data"],
        json!({ "text": "u1" })
    );
    assert_eq!(
        task_by_source(&tasks, "table.parquet", 4)["data"],
        json!({ "id": 4, "text": "row 4" })
    );
    assert_eq!(
        task_by_source(&tasks, "broken.json", 1)["data"],
        json!({ "text": "b1" })
    );

    let full = task_by_source(&tasks, "full.json", 0);
    assert_eq!(full["data"], json!({ "text": "f0" }));
    assert_eq!(full["meta"], json!({ "source": "crm" }));
    let (_, full) = app.get(&format!("/api/v1/tasks/{}", full["id"])).await;
    assert_eq!(
        full["annotations"].as_array().expect("annotations").len(),
        1
    );
    assert_eq!(full["annotations"][0]["lead_time"], 3.5);
    assert_eq!(full["annotations"][0]["ground_truth"], true);
    assert_eq!(full["annotations"][0]["completed_by"]["email"], "a@b.c");
    assert_eq!(
        full["annotations"][0]["result"][0]["value"]["choices"][0],
        "pos"
    );
    assert_eq!(full["predictions"][0]["model_version"], "m-2");
    assert_eq!(full["predictions"][0]["score"], 0.75);
    let (_, plain) = app
        .get(&format!(
            "/api/v1/tasks/{}",
            task_by_source(&tasks, "full.json", 1)["id"]
        ))
        .await;
    assert_eq!(plain["annotations"], json!([]));

    // A re-sync imports nothing twice; objects that produced no task are read
    // (and fail) again, the others are not re-read.
    let rerun = app.sync(&storage["id"]).await;
    assert_eq!(rerun["counters"]["created"], 0, "{rerun}");
    assert_eq!(rerun["counters"]["existed"], 20, "{rerun}");
    assert_eq!(rerun["counters"]["failed"], 3, "{rerun}");
    assert_eq!(app.all_tasks(project).await.len(), 20);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_with_and_without_trailing_slash() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    write(&data, "batch/a.json", br#"{"n": 1}"#);
    write(&data, "batch/sub/b.json", br#"{"n": 2}"#);
    write(&data, "batch-2/c.json", br#"{"n": 3}"#);
    write(&data, "other/d.json", br#"{"n": 4}"#);
    let project = app.project("prefixes").await;
    for (prefix, expected) in [("batch/", 2), ("batch", 3)] {
        let storage = storage(&app, project, json!({ "prefix": prefix, "title": prefix })).await;
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(
            run["counters"]["matched"], expected,
            "prefix {prefix:?}: {run}"
        );
    }
    let flat = storage(
        &app,
        project,
        json!({ "prefix": "batch/", "recursive": false, "title": "flat" }),
    )
    .await;
    let run = app.sync(&flat["id"]).await;
    assert_eq!(
        run["counters"]["matched"], 1,
        "non-recursive lists batch/a.json only: {run}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_reports_deleted_and_overwritten_objects() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    for i in 0..5 {
        write(&data, &format!("img-{i}.jpg"), b"x");
    }
    let project = app.project("changes").await;
    let (_, storage) = app
        .post(
            "/api/v1/storages",
            json!({ "project_id": project, "role": "source", "backend": "local", "config": { "path": "data" } }),
        )
        .await;
    let first = app.sync(&storage["id"]).await;
    assert_eq!(first["counters"]["created"], 5, "{first}");

    std::fs::remove_file(data.join("img-1.jpg")).expect("delete");
    write(
        &data,
        "img-3.jpg",
        b"a longer body: the etag changes with the size",
    );
    write(&data, "img-9.jpg", b"x");
    let second = app.sync(&storage["id"]).await;
    assert_eq!(second["status"], "completed", "{second}");
    let c = &second["counters"];
    assert_eq!(
        (c["created"].as_i64(), c["existed"].as_i64()),
        (Some(1), Some(4)),
        "{second}"
    );
    assert_eq!(
        (c["missing"].as_i64(), c["changed"].as_i64()),
        (Some(1), Some(1)),
        "{second}"
    );

    let db = Database::connect(&app.database_url).await.expect("connect");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT object_key FROM import_links WHERE object_exists = false".to_owned(),
        ))
        .await
        .expect("query")
        .expect("one missing object");
    assert_eq!(
        row.try_get::<String>("", "object_key").expect("key"),
        "img-1.jpg"
    );

    // Nothing changed since: nothing is missing or changed any more.
    let third = app.sync(&storage["id"]).await;
    let c = &third["counters"];
    assert_eq!(
        (
            c["missing"].as_i64(),
            c["changed"].as_i64(),
            c["existed"].as_i64()
        ),
        (Some(0), Some(0), Some(5))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_worked_by_one_attempt_at_a_time() {
    use std::time::Duration;

    use labelsync::db::runs::{self, Attempt, Counters};
    let app = spawn_app(AppOptions::without_workers()).await;
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("mkdir");
    let project = app.project("lease").await;
    let storage = storage(&app, project, json!({})).await;
    let (_, started) = app
        .post(
            &format!("/api/v1/storages/{}/sync", storage["id"]),
            json!({}),
        )
        .await;
    let run_id = started["run"]["id"].as_str().expect("run id");
    let db = labelsync::db::connect(&app.database_url)
        .await
        .expect("connect");
    let ttl = Duration::from_secs(60);
    let one = Counters {
        listed: 1,
        ..Counters::default()
    };

    let first = runs::begin_attempt(&db, run_id, "attempt-a", ttl)
        .await
        .expect("begin");
    assert!(
        matches!(first, Attempt::Started(ref r) if r.attempts == 1),
        "{first:?}"
    );
    let second = runs::begin_attempt(&db, run_id, "attempt-b", ttl)
        .await
        .expect("begin");
    assert!(
        matches!(second, Attempt::Busy),
        "a live lease keeps a duplicate out: {second:?}"
    );
    assert!(
        !runs::checkpoint(&db, run_id, &one, Some("k"), Some("attempt-b"))
            .await
            .expect("checkpoint")
    );
    assert!(
        runs::checkpoint(&db, run_id, &one, Some("k"), Some("attempt-a"))
            .await
            .expect("checkpoint")
    );

    // Once the lease is stale (a dead worker), another attempt takes over and
    // the old one can no longer write.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let takeover = runs::begin_attempt(&db, run_id, "attempt-b", Duration::from_millis(10))
        .await
        .expect("begin");
    assert!(
        matches!(takeover, Attempt::Started(ref r) if r.attempts == 2),
        "{takeover:?}"
    );
    assert!(
        !runs::checkpoint(&db, run_id, &one, Some("k2"), Some("attempt-a"))
            .await
            .expect("checkpoint")
    );
    assert!(
        !runs::finish(
            &db,
            run_id,
            runs::RunStatus::Completed,
            None,
            Some("attempt-a")
        )
        .await
        .expect("finish")
    );
    assert!(
        runs::finish(
            &db,
            run_id,
            runs::RunStatus::Completed,
            None,
            Some("attempt-b")
        )
        .await
        .expect("finish")
    );
    let run = runs::get(&db, run_id).await.expect("run");
    assert_eq!(
        (run.listed, run.status.as_str()),
        (1, "completed"),
        "only the lease holder's page counted"
    );
    let ended = runs::begin_attempt(&db, run_id, "attempt-c", ttl)
        .await
        .expect("begin");
    assert!(matches!(ended, Attempt::Ended), "{ended:?}");
    app.stop().await;
}

/// `reimport_changed`: an overwritten task file updates its tasks in place
/// (same ids, annotations kept) and adds its new rows; without the option the
/// change is only counted. On Postgres and on the embedded SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_task_files_are_reimported_when_the_storage_opts_in() {
    for embedded in [false, true] {
        let app = spawn_app(AppOptions {
            embedded,
            ..AppOptions::default()
        })
        .await;
        let data = app.doc_root.path().join("data");
        let lines = |words: &[&str]| {
            words
                .iter()
                .map(|w| json!({ "text": w }).to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        write(
            &data,
            "tasks.jsonl",
            lines(&["one", "two", "three"]).as_bytes(),
        );
        let project = app.project("reimport").await;
        let opted = storage(
            &app,
            project,
            json!({ "import_method": "tasks", "reimport_changed": true }),
        )
        .await;
        assert_eq!(opted["reimport_changed"], true, "{opted}");
        let first = app.sync(&opted["id"]).await;
        assert_eq!(first["counters"]["created"], 3, "{first}");
        let before = app.all_tasks(project).await;
        let first_id = task_by_source(&before, "tasks.jsonl", 0)["id"].clone();
        let (status, _) = app
            .post(
                &format!("/api/v1/tasks/{first_id}/annotations"),
                json!({ "result": [{ "value": { "choices": ["kept"] } }] }),
            )
            .await;
        assert_eq!(status, 201);

        write(
            &data,
            "tasks.jsonl",
            lines(&["ONE", "TWO", "THREE", "four"]).as_bytes(),
        );
        let second = app.sync(&opted["id"]).await;
        assert_eq!(second["status"], "completed", "{second}");
        let c = &second["counters"];
        assert_eq!(
            (c["changed"].as_i64(), c["created"].as_i64()),
            (Some(1), Some(1)),
            "{second}"
        );
        let after = app.all_tasks(project).await;
        assert_eq!(after.len(), 4);
        let first_after = task_by_source(&after, "tasks.jsonl", 0);
        assert_eq!(first_after["id"], first_id, "updated in place");
        assert_eq!(first_after["data"]["text"], "ONE");
        assert_eq!(
            task_by_source(&after, "tasks.jsonl", 2)["data"]["text"],
            "THREE"
        );
        assert_eq!(
            task_by_source(&after, "tasks.jsonl", 3)["data"]["text"],
            "four"
        );
        let (_, task) = app.get(&format!("/api/v1/tasks/{first_id}")).await;
        assert_eq!(
            task["annotations"].as_array().map(Vec::len),
            Some(1),
            "{task}"
        );

        // A third sync: nothing changed, nothing re-read.
        let third = app.sync(&opted["id"]).await;
        let c = &third["counters"];
        assert_eq!(
            (
                c["changed"].as_i64(),
                c["created"].as_i64(),
                c["existed"].as_i64()
            ),
            (Some(0), Some(0), Some(4)),
            "{third}"
        );
        app.stop().await;
    }
}

/// A regex that backtracking engines take exponential time on, against the
/// key that triggers it, runs in linear time; keys with control characters
/// import with their URI escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catastrophic_looking_regex_and_control_characters_in_keys() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    let evil = format!("{}!.jpg", "a".repeat(200));
    for key in [evil.as_str(), "aaaa.jpg", "ctl\u{1}name.jpg"] {
        write(&data, key, b"x");
    }
    let project = app.project("regex").await;
    let started = std::time::Instant::now();
    let storage = app
        .local_storage(project, json!({ "regex_filter": "^(a+)+\\.jpg$" }))
        .await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        (
            run["counters"]["listed"].as_i64(),
            run["counters"]["matched"].as_i64()
        ),
        (Some(3), Some(1)),
        "{run}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "linear time"
    );

    let other = app.project("control characters").await;
    let storage = app.local_storage(other, json!({ "title": "all" })).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["counters"]["created"], 3, "{run}");
    let tasks = app.all_tasks(other).await;
    let ctl = task_by_source(&tasks, "ctl\u{1}name.jpg", 0);
    assert_eq!(
        ctl["data"]["image"], "/data/local-files/?d=data/ctl%01name.jpg",
        "{ctl}"
    );
    app.stop().await;
}

/// One directory the listing cannot read is one per-object error: the run
/// ends `completed_with_errors`, names the directory in its errors, and
/// imports everything else (#14). Tests run as root, whom permissions do not
/// stop; a directory whose absolute path is 4,095 bytes long stops anyone:
/// its own path fits PATH_MAX, but reading it as `<path>/` is one byte past
/// and fails with ENAMETOOLONG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_local_directory_is_one_object_error() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    write(&data, "a.jpg", b"a");
    write(&data, "z/z.jpg", b"z");
    let base = data.canonicalize().expect("canonical data dir");
    // The key of the unreadable directory: base + '/' + key is 4,095 bytes.
    let wanted = 4095 - base.as_os_str().len() - 1;
    let mut key = String::from("deep");
    // The rest is split into segments ("/ddd...") of about 200 bytes.
    let rest = wanted - key.len();
    let segments = rest.div_ceil(201);
    for i in 0..segments {
        let share = rest / segments + usize::from(i < rest % segments);
        key.push('/');
        key.push_str(&"d".repeat(share - 1));
    }
    let dir = base.join(&key);
    assert_eq!(dir.as_os_str().len(), 4095);
    std::fs::create_dir_all(&dir).expect("deep directory");
    assert!(
        std::fs::read_dir(format!("{}/", dir.display())).is_err(),
        "the directory must be unreadable for this test"
    );

    let project = app.project("unreadable").await;
    let storage = app.local_storage(project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["created"], 2, "{run}");
    assert_eq!(run["counters"]["failed"], 1, "{run}");
    let (status, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, 200, "{errors}");
    let items = errors["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{errors}");
    assert_eq!(items[0]["key"], format!("{key}/"), "{errors}");
    let message = items[0]["error"].as_str().expect("message");
    assert!(
        !message.contains(base.to_str().expect("utf-8")),
        "the message shows the server's path: {message}"
    );
    app.stop().await;
}
