//! The import engine on real Postgres and Redis: Tasks mode in every format
//! and shape, per-object errors among good files, prefixes, unicode keys,
//! change awareness on re-sync, and what `on_missing` does with the tasks of
//! deleted objects (on Postgres and SQLite).
use std::{collections::BTreeMap, path::Path};

use labelsync_tests::{
    AppOptions, TestApp, peak_rss, spawn_app, spawn_ready_worker, write_nested_parquet,
    write_parquet, write_parquet_bomb, write_parquet_delta_count, write_parquet_gzip_bomb,
    write_parquet_wide_bomb,
};
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

/// The per-object errors of `run` (its first page).
async fn run_errors(app: &TestApp, run: &Value) -> Vec<Value> {
    let (status, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, 200, "{errors}");
    errors["items"].as_array().expect("items").clone()
}

/// The message of the error among `errors` for `key` at `row`.
fn error_message(errors: &[Value], key: &str, row: &Value) -> String {
    errors
        .iter()
        .find(|e| e["key"] == key && e["row_index"] == *row)
        .unwrap_or_else(|| panic!("no error for {key} {row}: {errors:?}"))["error"]
        .as_str()
        .expect("message")
        .to_owned()
}

/// Task files in every format and shape, good and bad, under `data/`: 12
/// objects, 21 tasks and 5 failures (one of them a bad line among good ones).
fn write_task_files_of_every_format(data: &Path) {
    write(data, "one.json", br#"{"text": "single"}"#);
    write(
        data,
        "array.json",
        br#"[{"text": "a0"}, {"text": "a1"}, {"text": "a2"}]"#,
    );
    write(
        data,
        "full.json",
        br#"[{"data": {"text": "f0"}, "meta": {"source": "crm"},
              "annotations": [{"result": [{"value": {"choices": ["pos"]}}], "lead_time": 3.5,
                               "completed_by": {"id": 7, "email": "a@b.c"}, "ground_truth": true}],
              "predictions": [{"result": [{"value": 1}], "model_version": "m-2", "score": 0.75}]},
             {"data": {"text": "f1"}}]"#,
    );
    write(data, "bom.json", "\u{feff}{\"text\": \"bom\"}".as_bytes());
    write(
        data,
        "lines.jsonl",
        b"{\"text\": \"l0\"}\n\n{\"text\": \"l1\"}\nthis is not json\r\n{\"text\": \"l3\"}\n",
    );
    write(
        data,
        "sp ace/ünï cødé.ndjson",
        "{\"text\": \"u0\"}\n{\"text\": \"u1\"}\n".as_bytes(),
    );
    write_parquet(&data.join("table.parquet"), 5, 2);
    write(
        data,
        "broken.json",
        br#"[{"text": "b0"}, {"text": "b1"}, {"text": "#,
    );
    write(
        data,
        "mixed.json",
        br#"[{"text": "m0"}, {"data": {"text": "m1"}}]"#,
    );
    write(data, "notes.txt", b"not a task file");
    write(
        data,
        "deep.json",
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes(),
    );
    write(data, "fake.parquet", b"PAR1 but not really");
}

/// An app whose Tasks-mode storage has synced the files of
/// [`write_task_files_of_every_format`]: (app, project, storage, run).
async fn synced_task_files_of_every_format() -> (TestApp, i64, Value, Value) {
    let app = spawn_app(AppOptions::default()).await;
    write_task_files_of_every_format(&app.doc_root.path().join("data"));
    let project = app.project("tasks").await;
    let storage = storage(&app, project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    (app, project, storage, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_mode_counts_tasks_and_failures_of_every_format() {
    let (app, _, _, run) = synced_task_files_of_every_format().await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    // 1 + 3 + 2 + 1 + 3 (jsonl) + 2 (ndjson) + 5 (parquet) + 2 (broken, kept) + 2 (mixed)
    assert_eq!(run["counters"]["created"], 21, "{run}");
    // The bad line, broken.json, notes.txt, deep.json, fake.parquet.
    assert_eq!(run["counters"]["failed"], 5, "{run}");
    assert_eq!(run["counters"]["listed"], 12, "{run}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_mode_records_why_each_bad_object_failed() {
    let (app, _, _, run) = synced_task_files_of_every_format().await;
    let errors = run_errors(&app, &run).await;
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
    // A plain row and a full task in one file, each read as itself (the
    // file broke off at the second, as Label Studio does not).
    assert!(
        errors.iter().all(|e| e["key"] != "mixed.json"),
        "{errors:?}"
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
            .contains("more than 128 levels deep")
    );
    assert!(
        error_of("fake.parquet")["error"]
            .as_str()
            .expect("msg")
            .contains("Parquet")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_mode_reads_the_data_of_every_format() {
    let (app, project, _, _) = synced_task_files_of_every_format().await;
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 21);
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
    assert_eq!(
        task_by_source(&tasks, "mixed.json", 1)["data"],
        json!({ "text": "m1" })
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_mode_imports_meta_annotations_and_predictions_of_full_tasks() {
    let (app, project, _, _) = synced_task_files_of_every_format().await;
    let tasks = app.all_tasks(project).await;
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
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_mode_resync_imports_nothing_twice_and_rereads_only_failed_objects() {
    let (app, project, storage, _) = synced_task_files_of_every_format().await;
    // A re-sync imports nothing twice; objects that produced no task are read
    // (and fail) again, the others are not re-read.
    let rerun = app.sync(&storage["id"]).await;
    assert_eq!(rerun["counters"]["created"], 0, "{rerun}");
    // broken.json broke after its first rows: it is read (and fails)
    // again too, its 2 rows not counted as existing.
    assert_eq!(rerun["counters"]["existed"], 19, "{rerun}");
    assert_eq!(rerun["counters"]["failed"], 4, "{rerun}");
    assert_eq!(app.all_tasks(project).await.len(), 21);
    app.stop().await;
}

/// A small file that breaks after its first rows keeps them, like a big
/// one, and like a big one it is read again by every sync until it is
/// whole: reported again while it is broken, its missing rows added once
/// it is fixed (and, where the storage re-reads changed objects, its
/// first rows' tasks updated), then imported like any other. The fixed
/// file is read by a sync, or by a retry of the run that failed on it
/// (`retry_the_fix`).
async fn a_small_file_that_broke_half_way_is_read_again_until_it_is_whole(
    options: AppOptions,
    reimport_changed: bool,
    retry_the_fix: bool,
) {
    let app = spawn_app(options).await;
    let data = app.doc_root.path().join("data");
    write(
        &data,
        "broken.json",
        br#"[{"text": "b0"}, {"text": "b1"}, {"text": "#,
    );
    let project = app.project("tasks").await;
    let fields = json!({ "reimport_changed": reimport_changed });
    let storage = storage(&app, project, fields).await;
    let counters = |run: &Value| {
        let c = &run["counters"];
        [&c["created"], &c["existed"], &c["changed"], &c["failed"]].map(|n| n.as_i64())
    };
    let first = app.sync(&storage["id"]).await;
    assert_eq!(counters(&first), [2, 0, 0, 1].map(Some), "{first}");
    let again = app.sync(&storage["id"]).await;
    assert_eq!(counters(&again), [0, 0, 0, 1].map(Some), "{again}");
    let errors = run_errors(&app, &again).await;
    assert!(error_message(&errors, "broken.json", &Value::Null).contains("truncated"));

    write(
        &data,
        "broken.json",
        br#"[{"text": "b0, fixed"}, {"text": "b1"}, {"text": "b2"}]"#,
    );
    let fixed = if retry_the_fix {
        let retry = format!("/api/v1/runs/{}/retry", again["id"].as_str().expect("id"));
        let (code, started) = app.post(&retry, json!({})).await;
        assert_eq!(code, 202, "{started}");
        let id = started["id"].as_str().expect("id");
        app.wait_run(id, std::time::Duration::from_secs(60)).await
    } else {
        app.sync(&storage["id"]).await
    };
    let (existed, changed) = if reimport_changed { (2, 1) } else { (0, 0) };
    assert_eq!(
        counters(&fixed),
        [1, existed, changed, 0].map(Some),
        "{fixed}"
    );
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 3);
    assert_eq!(
        task_by_source(&tasks, "broken.json", 2)["data"]["text"],
        "b2"
    );
    let b0 = if reimport_changed { "b0, fixed" } else { "b0" };
    assert_eq!(task_by_source(&tasks, "broken.json", 0)["data"]["text"], b0);
    let whole = app.sync(&storage["id"]).await;
    assert_eq!(counters(&whole), [0, 3, 0, 0].map(Some), "{whole}");
    assert_eq!(
        app.count("SELECT count(*) AS n FROM partial_objects").await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_that_broke_half_way_is_read_again_until_it_is_whole_on_postgres() {
    a_small_file_that_broke_half_way_is_read_again_until_it_is_whole(
        AppOptions::default(),
        false,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_that_broke_half_way_is_read_again_until_it_is_whole_on_sqlite() {
    let options = AppOptions {
        embedded: true,
        ..AppOptions::default()
    };
    a_small_file_that_broke_half_way_is_read_again_until_it_is_whole(options, false, false).await;
}

/// As above, on a storage that re-reads changed objects: the fixed file is
/// read again as a changed one, by a sync or by a retry run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_that_broke_half_way_and_changed_updates_its_first_rows() {
    for retry_the_fix in [false, true] {
        a_small_file_that_broke_half_way_is_read_again_until_it_is_whole(
            AppOptions::default(),
            true,
            retry_the_fix,
        )
        .await;
    }
}

/// A page's link lookup first looks for any link between its least and
/// greatest key, and skips the per-key probes when there is none (a first
/// sync's pages): still exact whatever order the keys come in, at the
/// range's ends, and with links inside the range that were not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_lookups_find_every_linked_key_whatever_the_page_holds() {
    use std::collections::BTreeSet;

    use labelsync::db::links::known_objects;
    let app = spawn_app(AppOptions::with_storages()).await;
    let storage = app.files_storage("lookups", 3).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    let id = storage["id"].as_i64().expect("storage id");
    let linked: Vec<String> = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT object_key FROM import_links WHERE storage_id = {id} ORDER BY object_key"
            ),
        ))
        .await
        .expect("links")
        .iter()
        .map(|row| row.try_get::<String>("", "object_key").expect("key"))
        .collect();
    assert_eq!(linked.len(), 3);
    let (least, middle, greatest) = (&linked[0], &linked[1], &linked[2]);
    let found = async |keys: &[&str]| -> BTreeSet<String> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let known = known_objects(&db, id, "another-run", &keys)
            .await
            .expect("lookup");
        known.into_keys().collect()
    };
    let after = |key: &str| format!("{key}~");
    let set = |keys: &[&String]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
    // The least linked key listed second, the greatest first.
    assert_eq!(found(&[&after(least), least]).await, set(&[least]));
    assert_eq!(
        found(&[greatest, &after(middle), ""]).await,
        set(&[greatest])
    );
    assert_eq!(
        found(&[middle, greatest, least]).await,
        set(&[least, middle, greatest])
    );
    // A linked key inside the range, not asked for; and no link in range.
    assert_eq!(found(&[&after(least), &after(greatest)]).await, set(&[]));
    assert_eq!(found(&[&after(greatest), "\u{10FFFF}"]).await, set(&[]));
    assert_eq!(found(&[]).await, set(&[]));
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
    let (app, db, run_id) = a_queued_run_and_the_database().await;
    a_live_lease_keeps_a_second_attempt_out(&db, &run_id).await;
    a_stale_lease_is_taken_over_and_only_the_holder_writes(&db, &run_id).await;
    an_ended_run_starts_no_attempt(&db, &run_id).await;
    app.stop().await;
}

/// A storage's save holds its row while it checks that no run of it has
/// started (a change of what a started run lists is refused): an attempt
/// starting meanwhile waits for the save to commit, so it reads the
/// storage as saved, or the save sees it started. It did not wait: a run
/// started between the save's check and its commit went on in a listing
/// that had moved under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_waits_for_a_save_of_its_storage_in_progress() {
    use labelsync::db::{self, runs, storages};
    let (app, db, run_id) = a_queued_run_and_the_database().await;
    let storage_id = runs::get(&db, &run_id).await.expect("run").storage_id;
    let save = db::begin_write(&db).await.expect("begin");
    storages::lock(&save, storage_id).await.expect("lock");
    let start = tokio::spawn({
        let (db, run_id) = (db.clone(), run_id.clone());
        async move { runs::begin_attempt(&db, &run_id, "attempt-a", LEASE_TTL).await }
    });
    // The attempt's query waits on a lock (not merely not run yet).
    let waiting = "SELECT COUNT(*) AS n FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query ILIKE '%FOR KEY SHARE%'";
    labelsync_tests::eventually("the attempt waiting on the storage's row", || async {
        start.is_finished() || app.count(waiting).await >= 1
    })
    .await;
    assert!(
        !start.is_finished(),
        "the attempt started while its storage's save was in progress"
    );
    save.commit().await.expect("commit");
    let started = tokio::time::timeout(std::time::Duration::from_secs(10), start)
        .await
        .expect("the attempt starts once the save commits")
        .expect("join")
        .expect("begin");
    assert!(matches!(started, runs::Attempt::Started(_)), "{started:?}");
    app.stop().await;
}

const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A checkpoint's counters: one object listed.
fn one_listed() -> labelsync::db::runs::Counters {
    labelsync::db::runs::Counters {
        listed: 1,
        ..labelsync::db::runs::Counters::default()
    }
}

/// An app without workers, so the run its sync queues stays queued, with a
/// connection to its database: (app, database, run id).
async fn a_queued_run_and_the_database() -> (TestApp, sea_orm::DatabaseConnection, String) {
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
    let run_id = started["run"]["id"].as_str().expect("run id").to_owned();
    let db = labelsync::db::connect(&app.database_url)
        .await
        .expect("connect");
    (app, db, run_id)
}

async fn a_live_lease_keeps_a_second_attempt_out(db: &sea_orm::DatabaseConnection, run_id: &str) {
    use labelsync::db::runs::{self, Attempt};
    let (ttl, one) = (LEASE_TTL, one_listed());
    let first = runs::begin_attempt(db, run_id, "attempt-a", ttl)
        .await
        .expect("begin");
    assert!(
        matches!(first, Attempt::Started(ref r) if r.attempts == 1),
        "{first:?}"
    );
    let second = runs::begin_attempt(db, run_id, "attempt-b", ttl)
        .await
        .expect("begin");
    assert!(
        matches!(second, Attempt::Busy),
        "a live lease keeps a duplicate out: {second:?}"
    );
    assert!(
        !runs::checkpoint(db, run_id, &one, Some("k"), Some("attempt-b"))
            .await
            .expect("checkpoint")
    );
    assert!(
        runs::checkpoint(db, run_id, &one, Some("k"), Some("attempt-a"))
            .await
            .expect("checkpoint")
    );
}

/// Once the lease is stale (a dead worker), another attempt takes over and
/// the old one can no longer write.
async fn a_stale_lease_is_taken_over_and_only_the_holder_writes(
    db: &sea_orm::DatabaseConnection,
    run_id: &str,
) {
    use std::time::Duration;

    use labelsync::db::runs::{self, Attempt};
    let one = one_listed();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let takeover = runs::begin_attempt(db, run_id, "attempt-b", Duration::from_millis(10))
        .await
        .expect("begin");
    assert!(
        matches!(takeover, Attempt::Started(ref r) if r.attempts == 2),
        "{takeover:?}"
    );
    assert!(
        !runs::checkpoint(db, run_id, &one, Some("k2"), Some("attempt-a"))
            .await
            .expect("checkpoint")
    );
    assert!(
        !runs::finish(
            db,
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
            db,
            run_id,
            runs::RunStatus::Completed,
            None,
            Some("attempt-b")
        )
        .await
        .expect("finish")
    );
    let run = runs::get(db, run_id).await.expect("run");
    assert_eq!(
        (run.listed, run.status.as_str()),
        (1, "completed"),
        "only the lease holder's page counted"
    );
}

async fn an_ended_run_starts_no_attempt(db: &sea_orm::DatabaseConnection, run_id: &str) {
    use labelsync::db::runs::{self, Attempt};
    let ttl = LEASE_TTL;
    let ended = runs::begin_attempt(db, run_id, "attempt-c", ttl)
        .await
        .expect("begin");
    assert!(matches!(ended, Attempt::Ended), "{ended:?}");
}

/// `reimport_changed`: an overwritten task file updates its tasks in place
/// (same ids, annotations kept) and adds its new rows; without the option the
/// change is only counted. On Postgres and on the embedded SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_task_files_are_reimported_when_the_storage_opts_in_on_postgres() {
    changed_task_files_are_reimported_when_the_storage_opts_in(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_task_files_are_reimported_when_the_storage_opts_in_on_sqlite() {
    changed_task_files_are_reimported_when_the_storage_opts_in(true).await;
}

async fn changed_task_files_are_reimported_when_the_storage_opts_in(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let (project, opted, first_id) = three_tasks_synced_and_the_first_annotated(&app).await;
    an_overwritten_file_updates_its_tasks_in_place(&app, project, &opted, &first_id).await;
    an_unchanged_file_is_not_reread(&app, &opted).await;
    app.stop().await;
}

/// `reimport_changed`: a changed file that cannot be read again (here, now
/// over `LABELSYNC_MAX_OBJECT_BYTES`) keeps its old etag, so the next sync
/// tries it again: its new etag was stored, and it was taken as up to date
/// for good, with its tasks stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_that_failed_to_reimport_is_tried_again() {
    let app = spawn_app(AppOptions {
        env: vec![("LABELSYNC_MAX_OBJECT_BYTES", "4096".into())],
        ..AppOptions::default()
    })
    .await;
    let (project, opted, _) = three_tasks_synced_and_the_first_annotated(&app).await;
    let words: Vec<String> = (0..500).map(|i| format!("word {i}")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let data = app.doc_root.path().join("data");
    write(&data, "tasks.jsonl", task_lines(&words).as_bytes());
    for sync in ["first", "second"] {
        let run = app.sync(&opted["id"]).await;
        let c = &run["counters"];
        assert_eq!(
            (c["changed"].as_i64(), c["failed"].as_i64()),
            (Some(1), Some(1)),
            "the {sync} sync after the change: {run}"
        );
    }
    assert_eq!(app.all_tasks(project).await.len(), 3);
    app.stop().await;
}

/// One task per word, as JSON lines.
fn task_lines(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| json!({ "text": w }).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `tasks.jsonl` of three tasks, synced by a storage with
/// `reimport_changed`, and an annotation on its first task: (project,
/// storage, first task's id).
async fn three_tasks_synced_and_the_first_annotated(app: &TestApp) -> (i64, Value, Value) {
    let data = app.doc_root.path().join("data");
    write(
        &data,
        "tasks.jsonl",
        task_lines(&["one", "two", "three"]).as_bytes(),
    );
    let project = app.project("reimport").await;
    let opted = storage(
        app,
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
    (project, opted, first_id)
}

async fn an_overwritten_file_updates_its_tasks_in_place(
    app: &TestApp,
    project: i64,
    opted: &Value,
    first_id: &Value,
) {
    let data = app.doc_root.path().join("data");
    write(
        &data,
        "tasks.jsonl",
        task_lines(&["ONE", "TWO", "THREE", "four"]).as_bytes(),
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
    assert_eq!(first_after["id"], *first_id, "updated in place");
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
}

/// A third sync: nothing changed, nothing re-read.
async fn an_unchanged_file_is_not_reread(app: &TestApp, opted: &Value) {
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

/// Issue 14 (1, 2, 7, 13): a Parquet file of 2,000 nested lists aborted every
/// process that read it (stack overflow); 200 levels imported but could not
/// be read back (500); one row with `\u0000` failed its 30 neighbours on
/// Postgres; Label Studio's extension-less task keys were "unsupported".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_are_their_own_errors_and_stored_tasks_read_back() {
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    write_nested_parquet(&data.join("deep-2000.parquet"), 2000);
    write_nested_parquet(&data.join("deep-200.parquet"), 200);
    write_nested_parquet(&data.join("deep-40.parquet"), 40);
    for i in 0..30 {
        write(
            &data,
            &format!("good-{i:02}.json"),
            format!("{{\"text\": \"t{i}\"}}").as_bytes(),
        );
    }
    write(&data, "nul.json", br#"{"text": "bad\u0000"}"#);
    let deep = format!("{{\"d\": {}1{}}}", "[".repeat(100), "]".repeat(100));
    write(
        &data,
        "rows.jsonl",
        format!(
            "{{\"text\": \"r0\"}}\n{deep}\n{{\"text\": \"r2\\u0000\"}}\n{{\"text\": \"r3\"}}\n"
        )
        .as_bytes(),
    );
    write(
        &data,
        "ls-task-1",
        br#"{"image": "http://example.com/1.jpg"}"#,
    );
    write_odd_parquet(&data);

    let project = app.project("hostile").await;
    let storage = storage(&app, project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    // 30 good files, deep-40, r0, r3, ls-task-1, rows 0 and 2 of
    // infinity.parquet, row 0 of latin-1.parquet.
    assert_eq!(run["counters"]["created"], 37, "{run}");
    // deep-2000, deep-200, nul.json, rows 1 and 2 of rows.jsonl, and one
    // row or whole file of each of write_odd_parquet's five.
    assert_eq!(run["counters"]["failed"], 10, "{run}");

    let errors = run_errors(&app, &run).await;
    let message = |key: &str, row: Value| error_message(&errors, key, &row);
    assert!(message("deep-2000.parquet", Value::Null).contains("Parquet schema nests more than"));
    assert!(message("deep-200.parquet", Value::Null).contains("Parquet schema nests more than"));
    assert!(message("nul.json", json!(0)).contains("NUL"));
    assert!(message("rows.jsonl", json!(1)).contains("levels deep"));
    assert!(message("rows.jsonl", json!(2)).contains("NUL"));
    let infinity = message("infinity.parquet", json!(1));
    assert!(
        infinity.contains("column at: the timestamp 9223372036854775807"),
        "{infinity}"
    );
    let decimal = message("wide-decimal.parquet", json!(0));
    assert!(decimal.contains("DECIMAL(20000000, 10000000)"), "{decimal}");
    let latin = message("latin-1.parquet", Value::Null);
    assert!(
        latin.starts_with("row 1: ") && latin.contains("not UTF-8"),
        "{latin}"
    );
    assert!(latin.ends_with("the rows after it are not read"), "{latin}");
    let interval = message("interval.parquet", Value::Null);
    assert!(interval.contains("its reader failed on it"), "{interval}");
    let nul_name = message("nul-name.parquet", json!(0));
    assert!(nul_name.contains("column a\\0b: "), "{nul_name}");

    // Everything stored reads back, one by one and as a list.
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 37);
    for task in &tasks {
        let (status, body) = app.get(&format!("/api/v1/tasks/{}", task["id"])).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut nested = &task_by_source(&tasks, "deep-40.parquet", 0)["data"]["nested"];
    for _ in 0..40 {
        nested = &nested[0];
    }
    assert_eq!(*nested, json!(7));
    assert_eq!(
        task_by_source(&tasks, "ls-task-1", 0)["data"],
        json!({ "image": "http://example.com/1.jpg" })
    );
    app.stop().await;
}

/// A key serde_json reserves (`$serde_json::private::RawValue`) makes its
/// `Value` read the JSON text in the key's string instead of the key: a
/// row of a JSON or JSONL file was stored as another row, and a Parquet
/// column of that name broke the messages between the reader's child and
/// the worker. Each is now that row's error, the rest of its file imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_a_key_serde_json_reserves_are_row_errors() {
    use parquet::{basic::Type as Physical, data_type::Int64Type, schema::types::Type};
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    let raw = r#"{"$serde_json::private::RawValue": "{\"text\": \"swapped\"}"}"#;
    let inner = r#"{"text": "t", "meta": {"$serde_json::private::RawValue": "1"}}"#;
    let jsonl = format!("{raw}\n{inner}\n{{\"text\": \"kept\"}}\n");
    write(&data, "rows.jsonl", jsonl.as_bytes());
    let json = format!("[{raw}, {{\"text\": \"kept too\"}}]");
    write(&data, "rows.json", json.as_bytes());
    let column = Type::primitive_type_builder("$serde_json::private::RawValue", Physical::INT64)
        .with_repetition(parquet::basic::Repetition::REQUIRED);
    write_parquet_column::<Int64Type>(&data.join("column.parquet"), column, &[7]);

    let project = app.project("reserved").await;
    let storage = storage(&app, project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    let errors = run_errors(&app, &run).await;
    for (key, row) in [
        ("rows.jsonl", 0),
        ("rows.jsonl", 1),
        ("rows.json", 0),
        ("column.parquet", 0),
    ] {
        let message = error_message(&errors, key, &json!(row));
        assert!(message.contains("is reserved"), "{key} {row}: {message}");
    }
    assert_eq!(run["counters"]["failed"], 4, "{run}");
    let mut texts: Vec<String> = app
        .all_tasks(project)
        .await
        .iter()
        .map(|t| t["data"].to_string())
        .collect();
    texts.sort();
    assert_eq!(texts, [r#"{"text":"kept too"}"#, r#"{"text":"kept"}"#]);
    app.stop().await;
}

/// Writes Parquet files of values the `parquet` crate could not write as
/// JSON (it panicked, failing the file's whole batch, or took hours): a
/// timestamp of `i64::MAX` microseconds (Postgres' `infinity`) between two
/// good ones, a decimal of scale 10,000,000, text in Latin-1 between two
/// good rows (its error quoted every byte, and every later row of its group
/// failed too), an INTERVAL column (the crate's reader panics on it), and a
/// timestamp out of range in a column whose name holds a NUL (which
/// Postgres refuses in an error).
fn write_odd_parquet(data: &Path) {
    use parquet::{
        basic::{ConvertedType, Type as Physical},
        data_type::{
            ByteArray, ByteArrayType, FixedLenByteArray, FixedLenByteArrayType, Int64Type,
        },
        schema::types::{PrimitiveTypeBuilder, Type},
    };
    fn column(
        name: &str,
        physical: Physical,
        converted: ConvertedType,
    ) -> PrimitiveTypeBuilder<'_> {
        Type::primitive_type_builder(name, physical)
            .with_repetition(parquet::basic::Repetition::REQUIRED)
            .with_converted_type(converted)
    }
    let micros = || column("at", Physical::INT64, ConvertedType::TIMESTAMP_MICROS);
    write_parquet_column::<Int64Type>(&data.join("infinity.parquet"), micros(), &[0, i64::MAX, 1]);
    let decimal = column("amount", Physical::BYTE_ARRAY, ConvertedType::DECIMAL)
        .with_precision(20_000_000)
        .with_scale(10_000_000);
    let one = ByteArray::from(vec![1u8]);
    write_parquet_column::<ByteArrayType>(&data.join("wide-decimal.parquet"), decimal, &[one]);
    let text = column("text", Physical::BYTE_ARRAY, ConvertedType::UTF8);
    let latin = [
        ByteArray::from("ok"),
        ByteArray::from(vec![0xe9; 100_000]),
        ByteArray::from("after"),
    ];
    write_parquet_column::<ByteArrayType>(&data.join("latin-1.parquet"), text, &latin);
    let interval = column(
        "took",
        Physical::FIXED_LEN_BYTE_ARRAY,
        ConvertedType::INTERVAL,
    )
    .with_length(12);
    let took = [FixedLenByteArray::from(vec![1u8; 12])];
    write_parquet_column::<FixedLenByteArrayType>(&data.join("interval.parquet"), interval, &took);
    let nul_name = column("a\0b", Physical::INT64, ConvertedType::TIMESTAMP_MICROS);
    write_parquet_column::<Int64Type>(&data.join("nul-name.parquet"), nul_name, &[i64::MIN]);
}

/// Writes a Parquet file of one column, `column`, holding `values`.
fn write_parquet_column<T: parquet::data_type::DataType>(
    path: &Path,
    column: parquet::schema::types::PrimitiveTypeBuilder<'_>,
    values: &[T::T],
) {
    use std::sync::Arc;

    use parquet::{
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::types::Type,
    };
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![Arc::new(column.build().expect("column"))])
        .build()
        .expect("schema");
    let file = std::fs::File::create(path).expect("create parquet file");
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    let mut col = group.next_column().expect("column").expect("a column");
    col.typed::<T>()
        .write_batch(values, None, None)
        .expect("values");
    col.close().expect("close column");
    group.close().expect("close group");
    writer.close().expect("close parquet file");
}

/// Writes a JSONL file: one line `{"a": [[],[],...]}` of about `bytes`
/// bytes (valid JSON, a row of millions of values), then `{"text": "after"}`.
fn write_wide_jsonl(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    out.write_all(b"{\"a\": [").expect("write");
    let block = "[],".repeat(4096);
    for _ in 0..bytes / block.len() {
        out.write_all(block.as_bytes()).expect("write");
    }
    out.write_all(b"[]]}\n{\"text\": \"after\"}\n")
        .expect("write");
    out.flush().expect("flush");
}

/// Writes a JSONL file whose first line is an array of `count` zeros (two
/// bytes each as text, 32 in memory, and the array's spare capacity), then
/// a good row.
fn write_zeros_jsonl(path: &Path, count: usize) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    out.write_all(b"[").expect("write");
    let block = "0,".repeat(4096);
    for _ in 0..count / 4096 {
        out.write_all(block.as_bytes()).expect("write");
    }
    out.write_all(b"0]\n{\"text\": \"after\"}\n")
        .expect("write");
    out.flush().expect("flush");
}

/// Issue 14 (3): a 200 MB JSONL line of `[],[],...` peaked at 9 GB, four
/// 10 KB zstd Parquet files holding a 300 MB string each at 7.2 GB (and a
/// GZIP page whose header understates it, 640 MB); eight
/// 12 MB lines (under the row limit as text, ~300 MB each while parsed)
/// parsed at once would take 2.4 GB, four 8 MB lines of `0,0,...` (256 MB
/// each) 1 GB. The worker (a process of its own, so its peak is its own)
/// stays under 430 MB with a 320 MB parse budget, and imports the good row
/// after each giant line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giant_rows_and_decompression_bombs_stay_within_a_memory_bound() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    write_wide_jsonl(&data.join("giant.jsonl"), 200 << 20);
    for i in 0..8 {
        write_wide_jsonl(&data.join(format!("wide-{i}.jsonl")), 12 << 20);
    }
    for i in 0..4 {
        write_zeros_jsonl(&data.join(format!("zeros-{i}.jsonl")), 1 << 22);
    }
    write_parquet_bomb(&data.join("bomb-0.parquet"), 300 << 20);
    let bomb_size = std::fs::metadata(data.join("bomb-0.parquet"))
        .expect("bomb")
        .len();
    assert!(bomb_size < 1 << 20, "the bomb is {bomb_size} bytes");
    for i in 1..4 {
        std::fs::copy(
            data.join("bomb-0.parquet"),
            data.join(format!("bomb-{i}.parquet")),
        )
        .expect("copy");
    }
    // Its page holds 640 MB, though the page header and footer say 1 MiB.
    write_parquet_gzip_bomb(&data.join("lying-page.parquet"), 640 << 20);
    // 720 MiB at once from 12 columns, none a bomb alone: over the budget.
    write_parquet_wide_bomb(&data.join("wide-bomb.parquet"), 12, 60 << 20);

    let project = app.project("giants").await;
    let storage = storage(&app, project, json!({})).await;
    let budget = (320 << 20).to_string();
    let worker = spawn_ready_worker(
        &app,
        "giants",
        &[("LABELSYNC_PARSE_BUDGET_BYTES", &budget), MEASURED_ARENAS],
    )
    .await;
    let run_id = app.start_sync(&storage["id"]).await;
    let run = app
        .wait_run(&run_id, std::time::Duration::from_secs(180))
        .await;
    let peak = peak_rss(worker.0.id());
    eprintln!("worker peak RSS: {} MB", peak >> 20);
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    // The line after each of the nine giant lines; each giant line and bomb.
    assert_eq!(run["counters"]["created"], 13, "{run}");
    assert_eq!(run["counters"]["failed"], 19, "{run}");
    // 205 MB here since a row stops being built at the limit (the wide
    // lines are over it); 333-349 MB when rows were built whole, 442-509
    // MB when a row was counted at 12 times its text.
    assert!(peak < 430 << 20, "the worker peaked at {} MB", peak >> 20);
    let (_, errors) = app.get(&format!("/api/v1/runs/{run_id}/errors")).await;
    let text = errors.to_string();
    assert!(text.contains("LABELSYNC_MAX_TASK_BYTES"), "{text}");
    assert!(text.contains("decompression bomb"), "{text}");
    assert!(
        text.contains("a GZIP page holds more than the"),
        "the lying page: {text}"
    );
    assert!(
        text.contains("row group 0 takes 7") && text.contains("LABELSYNC_PARSE_BUDGET_BYTES"),
        "the wide bomb: {text}"
    );
    app.stop().await;
}

/// The app's `data/` directory (the local storages' prefix), made.
fn data_dir(app: &TestApp) -> std::path::PathBuf {
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    data
}

/// `count` JSONL lines `{"n": N}`.
fn numbered_lines(count: usize) -> String {
    (0..count).map(|n| format!("{{\"n\": {n}}}\n")).collect()
}

/// `count` JSONL rows `{"n": N, "pad": "xxx..."}` of `pad` bytes of padding.
fn padded_lines(count: usize, pad: usize) -> String {
    let pad = "x".repeat(pad);
    (0..count)
        .map(|n| format!("{{\"n\": {n}, \"pad\": \"{pad}\"}}\n"))
        .collect()
}

/// The malloc arenas the peak-memory tests' figures were measured on:
/// glibc's default on these 2-core machines, before workers bounded their
/// arenas to two (`lifecycle::bound_malloc_arenas`). Pinned, so that each
/// test's "before" and "after" stay comparable; a default worker holds
/// less (`small_objects_are_parsed_within_the_parse_budget`).
const MEASURED_ARENAS: (&str, &str) = ("MALLOC_ARENA_MAX", "16");

/// Syncs `storage` on a worker process of its own started with `env` (the
/// budgets are one per process): the run, and the worker's peak RSS.
async fn sync_on_own_worker(
    app: &TestApp,
    storage: &Value,
    name: &str,
    env: &[(&str, &str)],
) -> (Value, u64) {
    let worker = spawn_ready_worker(app, name, env).await;
    let run = app.sync(&storage["id"]).await;
    let peak = peak_rss(worker.0.id());
    eprintln!("worker peak RSS: {} MB", peak >> 20);
    (run, peak)
}

/// Writes a JSONL file of `rows` rows `{"n": N, "a": [{},{},...]}` of
/// `values` empty objects each: three bytes of text a value, ten times that
/// in memory once parsed (a legitimate shape: a row of many small items).
fn write_many_values_jsonl(path: &Path, rows: usize, values: usize) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let items = vec!["{}"; values].join(",");
    for n in 0..rows {
        writeln!(out, "{{\"n\": {n}, \"a\": [{items}]}}").expect("write");
    }
    out.flush().expect("flush");
}

/// `files` copies of a JSONL file of `rows` rows of 300 KB of text, each
/// 4.2 MB in memory (`rows-<i>.jsonl` in `data`).
fn many_values_files(data: &Path, files: usize, rows: usize) {
    write_many_values_jsonl(&data.join("rows-0.jsonl"), rows, 100_000);
    for i in 1..files {
        let copy = data.join(format!("rows-{i}.jsonl"));
        std::fs::copy(data.join("rows-0.jsonl"), copy).expect("copy");
    }
}

/// Rows parsed and waiting for their transaction are held within a budget
/// (`LABELSYNC_ROWS_IN_FLIGHT_BYTES`), as rows being parsed are within the
/// parse budget. Each object being read held up to five chunks of 8 MiB of
/// rows (one being filled, two in the channel, two being committed) that
/// no budget counted, and a worker reads 64 objects at once at the
/// defaults: 24 files of legitimate large rows took the worker past a
/// gigabyte whatever its settings. Every row is still imported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_waiting_for_their_commit_stay_within_their_budget() {
    const FILES: usize = 24;
    const ROWS: usize = 16;
    let app = spawn_app(AppOptions::without_workers()).await;
    // 300 KB of text a row, 4.2 MB in memory: a chunk closes at two rows.
    many_values_files(&data_dir(&app), FILES, ROWS);
    let project = app.project("in-flight").await;
    let storage = storage(&app, project, json!({})).await;
    let (parse, in_flight) = ((128 << 20).to_string(), (64 << 20).to_string());
    let env = [
        ("LABELSYNC_PARSE_BUDGET_BYTES", &parse[..]),
        ("LABELSYNC_ROWS_IN_FLIGHT_BYTES", &in_flight),
        MEASURED_ARENAS,
    ];
    let (run, peak) = sync_on_own_worker(&app, &storage, "in-flight", &env).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], (FILES * ROWS) as i64, "{run}");
    // 287-297 MB here; 1,146 MB without the rows-in-flight budget, 457-467
    // MB with it at 256 MiB.
    assert!(peak < 380 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// Small objects' rows (each object's within one chunk) wait for a
/// transaction shared with other small objects, committed a chunk's worth
/// at a time, two at once. They waited outside the rows-in-flight budget,
/// so a job whose database lagged held every small file of its batch or
/// page in memory (up to 64 of 8 MiB at the defaults; a page of 1,000
/// where nothing fans out). They keep their share of the budget now, and
/// go whole chunk or not once a parse waits for room. Updates of the run's
/// row are slowed (a trigger sleeping 0.2 s), so commits lag the reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_waiting_for_a_lagging_database_stay_within_the_budget() {
    const FILES: usize = 64;
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 500 rows of 4 KB: 2.5 MB in memory, one chunk; lines too short to
    // reserve any of the parse budget.
    let rows = padded_lines(500, 4_000);
    for i in 0..FILES {
        write(&data, &format!("small-{i:02}.jsonl"), rows.as_bytes());
    }
    app.slow_run_updates(0.2).await;
    let project = app.project("small-in-flight").await;
    let storage = storage(&app, project, json!({})).await;
    // One job slot reading 16 objects at once: about 40 MB of rows, a
    // little over the budget, so most objects are small ones and a parse
    // waits for room now and then.
    let in_flight = (32 << 20).to_string();
    let env = [
        ("LABELSYNC_ROWS_IN_FLIGHT_BYTES", &in_flight[..]),
        ("LABELSYNC_WORKER_CONCURRENCY", "1"),
        ("LABELSYNC_FETCH_CONCURRENCY", "16"),
        MEASURED_ARENAS,
    ];
    let (run, peak) = sync_on_own_worker(&app, &storage, "small-in-flight", &env).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], (FILES * 500) as i64, "{run}");
    assert!(peak < 250 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// A worker inside the scheduler (`LABELSYNC_EMBEDDED_WORKERS`) imports on
/// a database pool of its own. On the API's, an import's commits, each
/// held while the database lagged, took every connection, and API requests
/// queued behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_in_the_schedulers_worker_leaves_the_api_its_connections() {
    const FILES: usize = 16;
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    // Two chunks a file: committed two at a time, each holding a connection.
    let rows = numbered_lines(4_500);
    for i in 0..FILES {
        write(&data, &format!("big-{i:02}.jsonl"), rows.as_bytes());
    }
    let project = app.project("own-pool").await;
    let storage = storage(&app, project, json!({})).await;
    app.slow_run_updates(0.2).await;
    let run_id = app.start_sync(&storage["id"]).await;
    // The worker's commits queue on the run's row from the first second
    // (an API request waited 3.3 s behind them on the API's pool).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..10 {
        let asked = std::time::Instant::now();
        let (status, body) = app.get(&format!("/api/v1/projects/{project}")).await;
        assert_eq!(status, 200, "{body}");
        slowest = slowest.max(asked.elapsed());
    }
    // The requests were measured while the import ran.
    let (_, during) = app.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(during["status"], "running", "{during}");
    let run = app
        .wait_run(&run_id, std::time::Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], (FILES * 4_500) as i64, "{run}");
    assert!(
        slowest < std::time::Duration::from_millis(1500),
        "an API request waited {slowest:?} during the import"
    );
    app.stop().await;
}

/// Rows of a few small values take several times their JSON text in
/// memory (a map of one entry is a 640-byte node), and a task waiting for
/// its transaction more again: the rows in flight are counted as they take
/// memory, not as the values' 32 bytes each plus their text, or a worker
/// holding a budget's worth of such rows held four or five times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_small_values_are_counted_as_what_they_take_in_memory() {
    const FILES: usize = 500;
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 1,000 rows of 62 bytes a file: each file a small one.
    let rows = padded_lines(1_000, 40);
    for i in 0..FILES {
        write(&data, &format!("medium-{i:03}.jsonl"), rows.as_bytes());
    }
    let project = app.project("small-values").await;
    let storage = storage(&app, project, json!({})).await;
    let in_flight = (32 << 20).to_string();
    let env = [
        ("LABELSYNC_ROWS_IN_FLIGHT_BYTES", &in_flight[..]),
        MEASURED_ARENAS,
    ];
    let (run, peak) = sync_on_own_worker(&app, &storage, "small-values", &env).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], (FILES * 1_000) as i64, "{run}");
    assert!(peak < 180 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// Small objects take many times their text in memory while parsed
/// (`{"a":0}` is 7 bytes of text and about 700 in memory): a JSON element
/// of them far over the row limit was built whole before it was refused,
/// and JSONL lines of them under the limit took nearly three times the 32
/// times their text their parse reserved. The element now stops being
/// built at the limit (its error, and the next element imported), and a
/// line reserves for its objects too, so the worker stays near its budgets:
/// on one malloc arena, and on the two a worker bounds itself to by default
/// (glibc's default arenas keep what each parsing thread freed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_objects_are_parsed_within_the_parse_budget() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 3 MiB of text: under the 4 MiB limit as text, about 38 MB by the
    // row limit's measure and 280 MB in memory.
    let element = small_objects(3 << 20);
    let json = format!("[{{\"big\": [{element}]}}, {{\"text\": \"after\"}}]");
    write(&data, "big-element.json", json.as_bytes());
    // 320 KiB of text a line: 3.9 MiB by the measure (a task), 29 MB in
    // memory; 10 MiB of it reserved before.
    let line = format!("{{\"a\": [{}]}}\n", small_objects(320 << 10));
    for i in 0..SMALL_OBJECT_LINES {
        write(&data, &format!("line-{i:02}.jsonl"), line.as_bytes());
    }
    // One arena: glibc's per-thread arenas keep what each thread's parses
    // freed, so the peak would measure how many threads parsed rather
    // than what the budgets hold. 180 MB here; 302 MB before (291 with
    // the lines alone, 295 with the element alone).
    let peak = sync_small_objects(&app, "one-arena", &[("MALLOC_ARENA_MAX", "1")]).await;
    assert!(peak < 240 << 20, "the worker peaked at {} MB", peak >> 20);
    // As a worker runs by default (`lifecycle::bound_malloc_arenas`): on
    // two arenas, 260-320 MB; on glibc's default (16 on 2 cores) it was
    // 510-570 MB, and would be more on a machine of more cores.
    let peak = sync_small_objects(&app, "default-arenas", &[]).await;
    assert!(peak < 360 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// Syncs the files of [`small_objects_are_parsed_within_the_parse_budget`]
/// into a project of its own on a worker of its own with the test's budgets
/// and `env`; checks the run, and returns the worker's peak RSS.
async fn sync_small_objects(app: &TestApp, title: &str, env: &[(&str, &str)]) -> u64 {
    let limit = (4 << 20).to_string();
    let mut env = env.to_vec();
    env.push(("LABELSYNC_MAX_TASK_BYTES", &limit[..]));
    let (run, peak) = sync_new_source(app, title, 64 << 20, &env).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(
        run["counters"]["created"],
        (SMALL_OBJECT_LINES + 1) as i64,
        "{run}"
    );
    assert_eq!(run["counters"]["failed"], 1, "{run}");
    let errors = run_errors(app, &run).await;
    let message = error_message(&errors, "big-element.json", &json!(0));
    assert!(message.contains("LABELSYNC_MAX_TASK_BYTES"), "{message}");
    peak
}

/// A JSON file is parsed as a stream, so its parse reserves before its text
/// is read: it reserved 32 times the file, and a file of small objects
/// takes up to about 90 times (`{"a":0}` is 7 bytes, about 700 in memory).
/// Such files, each one task under the row limit, took a worker far past
/// its budgets (64 files of 1 MiB at the default settings: 2.7 GB); a
/// stream now reserves what one element may take
/// (`parse::stream_reservation`): by the file's text (here more than the
/// budget: one file at a time), and by a lower row limit (over which each
/// element is, built up to it: four files at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_files_of_small_objects_are_parsed_within_the_parse_budget() {
    const FILES: usize = 16;
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 512 KiB of text, about 45 MB in memory: one task each.
    let json = format!("{{\"a\": [{}]}}", small_objects(512 << 10));
    for i in 0..FILES {
        write(&data, &format!("objects-{i:02}.json"), json.as_bytes());
    }
    // One arena: what the budgets hold, not how many arenas kept it.
    let one_arena = ("MALLOC_ARENA_MAX", "1");
    let (run, peak) = sync_new_source(&app, "json-objects", 128 << 20, &[one_arena]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], FILES as i64, "{run}");
    // 216-218 MB; 476-486 MB before.
    assert!(peak < 300 << 20, "the worker peaked at {} MB", peak >> 20);
    // 512 KiB of `{"a":0}` is about 6 MB by the row limit's measure: over
    // 2 MiB, each element is built up to it (about 20 MB) and is its
    // file's error; 26 MiB is reserved for it (16 MiB before).
    let limit = (2 << 20).to_string();
    let env = [("LABELSYNC_MAX_TASK_BYTES", &limit[..]), one_arena];
    let (run, peak) = sync_new_source(&app, "json-objects-limited", 128 << 20, &env).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["failed"], FILES as i64, "{run}");
    // 90-91 MB (the first sync already failed before).
    assert!(peak < 150 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// A JSONL line is read whole before it is parsed, and a long line's parse
/// reserves 32 times its text, so long lines are parsed a few at a time:
/// the others waited holding their text outside every budget (64 files of
/// one 15 MiB line peaked a default worker at 1.3 GB). A long line's text
/// is now held under the parse budget as it is read
/// (`budget::Growing`), so lines waiting for their parse take no more than
/// the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_wait_for_their_parse_within_the_parse_budget() {
    const FILES: usize = 64;
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 3 MiB of text a line (its read takes 4 MiB), 96 MiB reserved for
    // its parse: under a 16 MiB budget, one line is parsed at a time.
    let line = format!("{{\"text\": \"{}\"}}\n", "x".repeat(3 << 20));
    for i in 0..FILES {
        write(&data, &format!("line-{i:02}.jsonl"), line.as_bytes());
    }
    let limit = (4 << 20).to_string();
    let env = [
        ("LABELSYNC_MAX_TASK_BYTES", &limit[..]),
        ("MALLOC_ARENA_MAX", "1"),
    ];
    let (run, peak) = sync_new_source(&app, "long-lines", 16 << 20, &env).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], FILES as i64, "{run}");
    let stored = app
        .count("SELECT count(*) AS n FROM tasks WHERE length(data->>'text') = 3145728")
        .await;
    assert_eq!(stored, FILES as i64, "every line imported whole");
    // 145-158 MB; 276-299 MB before, the lines waiting for their parse
    // holding their text outside the budget.
    assert!(peak < 220 << 20, "the worker peaked at {} MB", peak >> 20);
    app.stop().await;
}

/// Syncs `data/` into a new project `title` on a worker of its own with a
/// parse budget of `parse` bytes, 32 MiB of rows in flight and `env`: the
/// run, and the worker's peak RSS.
async fn sync_new_source(
    app: &TestApp,
    title: &str,
    parse: usize,
    env: &[(&str, &str)],
) -> (Value, u64) {
    let project = app.project(title).await;
    let storage = storage(app, project, json!({})).await;
    let (parse, in_flight) = (parse.to_string(), (32 << 20).to_string());
    let mut env = env.to_vec();
    env.extend([
        ("LABELSYNC_PARSE_BUDGET_BYTES", &parse[..]),
        ("LABELSYNC_ROWS_IN_FLIGHT_BYTES", &in_flight[..]),
    ]);
    sync_on_own_worker(app, &storage, title, &env).await
}

/// The JSONL files of [`small_objects_are_parsed_within_the_parse_budget`].
const SMALL_OBJECT_LINES: usize = 16;

/// About `bytes` of text of objects `{"a":0}`, comma-separated.
fn small_objects(bytes: usize) -> String {
    let mut text = "{\"a\":0},".repeat(bytes / 8);
    text.pop();
    text
}

/// Budgets so tight that a chunk is cut short at nearly every row slow an
/// import but neither stop it nor lose a row: a JSON file's parse holds the
/// whole parse budget while its rows wait for room, JSONL rows of 64 KiB
/// wait for the parse budget, and an object whose first chunk was cut short
/// is committed as a large one (a first chunk used to be the whole object
/// unless it was full). The order of waits that could deadlock is forced in
/// `task_files`' unit test `a_parse_never_waits_for_the_parse_budget_holding_rows_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_budgets_slow_an_import_but_never_stop_it() {
    const FILES: usize = 6;
    const ROWS: usize = 20;
    const SMALL_FILES: usize = 24;
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    // 66 KB of text a row, 1 MB in memory: with what it takes as a task,
    // more than the 1 MiB of rows in flight, so each row goes alone.
    write_many_values_jsonl(&data.join("rows-0.jsonl"), ROWS, 22_000);
    let lines = std::fs::read_to_string(data.join("rows-0.jsonl")).expect("read");
    let array = format!("[{}]", lines.trim_end().replace('\n', ","));
    for i in 0..FILES {
        if i > 0 {
            std::fs::write(data.join(format!("rows-{i}.jsonl")), &lines).expect("write");
        }
        std::fs::write(data.join(format!("array-{i}.json")), &array).expect("write");
    }
    // And small files, 300 KB each: a few fill the budget while they wait
    // for a commit of small files' rows that, far from a chunk's worth,
    // goes only because parses wait for room.
    let small = padded_lines(100, 3_000);
    for i in 0..SMALL_FILES {
        write(&data, &format!("small-{i:02}.jsonl"), small.as_bytes());
    }
    let project = app.project("tight").await;
    let storage = storage(&app, project, json!({})).await;
    let (parse, in_flight) = ((8 << 20).to_string(), (1 << 20).to_string());
    let env = [
        ("LABELSYNC_PARSE_BUDGET_BYTES", &parse[..]),
        ("LABELSYNC_ROWS_IN_FLIGHT_BYTES", &in_flight),
    ];
    let _worker = spawn_ready_worker(&app, "tight", &env).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        run["counters"]["created"],
        (2 * FILES * ROWS + SMALL_FILES * 100) as i64,
        "{run}"
    );
    app.stop().await;
}

/// A task file gives at most `LABELSYNC_MAX_ROWS_PER_OBJECT` rows, in
/// every format: its first rows are imported, and the object has an error
/// naming the setting. Nothing bounded the rows of one object (a Parquet
/// run of 2^31 equal values is two billion tasks from a hundred bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_gives_at_most_the_rows_an_object_may_have() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    let lines = numbered_lines(30);
    write(&data, "many.jsonl", lines.as_bytes());
    let array = format!("[{}]", lines.trim_end().replace('\n', ","));
    write(&data, "many.json", array.as_bytes());
    write_parquet(&data.join("many.parquet"), 30, 4);
    for (key, rows) in [("few.jsonl", 10), ("exactly.jsonl", 25)] {
        let some: String = lines.split_inclusive('\n').take(rows).collect();
        write(&data, key, some.as_bytes());
    }

    let project = app.project("rows-per-object").await;
    let storage = storage(&app, project, json!({})).await;
    let _worker = spawn_ready_worker(
        &app,
        "rows-per-object",
        &[("LABELSYNC_MAX_ROWS_PER_OBJECT", "25")],
    )
    .await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["created"], 4 * 25 + 10, "{run}");
    assert_eq!(run["counters"]["failed"], 3, "{run}");
    let errors = run_errors(&app, &run).await;
    for key in ["many.jsonl", "many.json", "many.parquet"] {
        // The error of the first row not read.
        let message = error_message(&errors, key, &json!(25));
        assert!(
            message.contains("more than 25 rows")
                && message.contains("LABELSYNC_MAX_ROWS_PER_OBJECT"),
            "{key}: {message}"
        );
    }
    let tasks = app.all_tasks(project).await;
    for key in ["many.jsonl", "many.json", "many.parquet"] {
        task_by_source(&tasks, key, 24);
        assert!(
            !tasks
                .iter()
                .any(|t| t["source"]["key"] == key && t["source"]["row_index"] == 25),
            "{key} gave a 26th row"
        );
    }
    app.stop().await;
}

/// An object stopped at the row limit is reported once: committed chunk by
/// chunk, it kept its partial mark, so every sync read its ten million rows
/// again to report the same error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_row_limit_is_read_once() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let data = data_dir(&app);
    let lines = numbered_lines(6_000);
    write(&data, "many.jsonl", lines.as_bytes());
    let project = app.project("read-once").await;
    let storage = storage(&app, project, json!({})).await;
    // Over a chunk's 4,000 rows: the object is committed chunk by chunk.
    let _worker = spawn_ready_worker(
        &app,
        "read-once",
        &[("LABELSYNC_MAX_ROWS_PER_OBJECT", "5000")],
    )
    .await;
    for (sync, created, failed) in [(1, 5_000, 1), (2, 0, 0)] {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["counters"]["created"], created, "sync {sync}: {run}");
        assert_eq!(run["counters"]["failed"], failed, "sync {sync}: {run}");
    }
    assert_eq!(app.all_tasks(project).await.len(), 5_000);
    // Changed, where changed objects are read again: read once more, and
    // then not again (it kept its old etag for the limit's error, so every
    // sync read it and rewrote its 5,000 tasks).
    let (status, patched) = app
        .patch(
            &format!("/api/v1/storages/{}", storage["id"]),
            json!({ "reimport_changed": true }),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    write(
        &data,
        "many.jsonl",
        lines.replace("\"n\": 0}", "\"n\": -1}").as_bytes(),
    );
    for (sync, changed, failed) in [(3, 1, 1), (4, 0, 0)] {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["counters"]["changed"], changed, "sync {sync}: {run}");
        assert_eq!(run["counters"]["failed"], failed, "sync {sync}: {run}");
    }
    app.stop().await;
}

/// Small objects' rows are committed beside the other imports, not instead
/// of them. Their commit was awaited while the job's imports went unpolled:
/// an import whose transaction held the run's row (its checkpoint) and
/// waited to be polled to commit kept that commit waiting for the row, and
/// the two waited for ever, the run's heartbeat going on. Updates of the
/// run's row are slowed here (a trigger sleeping 50 ms) so that a large
/// file's chunk is often inside that window when small files fill a chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_beside_a_large_one_never_wait_on_each_other() {
    const SMALL_FILES: usize = 16;
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    let big = numbered_lines(60_000);
    write(&data, "big.jsonl", big.as_bytes());
    // 2,500 rows of 2 KB each (3 KB in memory): one chunk, committed with
    // the next file's rows, and slow enough to parse that they end while
    // the large file's chunks are being committed.
    let small = padded_lines(2_500, 2_000);
    for i in 0..SMALL_FILES {
        write(&data, &format!("small-{i:02}.jsonl"), small.as_bytes());
    }
    app.slow_run_updates(0.05).await;

    let project = app.project("side-by-side").await;
    let storage = storage(&app, project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        run["counters"]["created"],
        60_000 + 2_500 * SMALL_FILES as i64,
        "{run}"
    );
    app.stop().await;
}

/// A Parquet file the `parquet` crate does not survive is that file's
/// error: the worker goes on, the run's other files import, and the next
/// sync fails it the same way. A page that declares 2^40 values made the
/// crate ask for 4 TiB, which aborted the worker's process (and the next
/// one's, on every retry); 2^31 asks for 8 GiB, past what the reader may
/// take. Each is read in a child process now (`ingest::parquet_process`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_file_that_kills_its_reader_is_that_files_error() {
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    write_parquet_delta_count(&data.join("delta-4tib.parquet"), 1 << 40);
    write_parquet_delta_count(&data.join("delta-8gib.parquet"), 1 << 31);
    // The same file, true to its one value, reads.
    write_parquet_delta_count(&data.join("delta-one.parquet"), 1);
    write_parquet(&data.join("good.parquet"), 10, 4);
    write(&data, "good.json", br#"{"text": "fine"}"#);

    let project = app.project("crashing").await;
    let storage = storage(&app, project, json!({})).await;
    for (sync, created) in [(1, 12), (2, 0)] {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed_with_errors", "sync {sync}: {run}");
        assert_eq!(run["counters"]["created"], created, "sync {sync}: {run}");
        assert_eq!(run["counters"]["failed"], 2, "sync {sync}: {run}");
        let errors = run_errors(&app, &run).await;
        for (key, asked) in [
            ("delta-4tib.parquet", "4398046511104"),
            ("delta-8gib.parquet", "8589934592"),
        ] {
            let message = error_message(&errors, key, &Value::Null);
            assert!(
                message.contains(&format!("memory allocation of {asked} bytes failed"))
                    && message.contains("LABELSYNC_PARSE_BUDGET_BYTES"),
                "{key}: {message}"
            );
        }
    }
    let tasks = app.all_tasks(project).await;
    let one = task_by_source(&tasks, "delta-one.parquet", 0);
    assert_eq!(one["data"]["text"], "a".repeat(100), "{one}");
    app.stop().await;
}

/// Issue 14 (6): cancelling a Tasks-mode run half-way through a file lost
/// the rest of the file: the next sync counted the object as imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cancelled_half_way_is_finished_by_the_next_sync() {
    use std::io::Write;
    const ROWS: i64 = 200_000;
    let app = spawn_app(AppOptions::default()).await;
    let data = data_dir(&app);
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(data.join("big.jsonl")).expect("create"));
    for n in 0..ROWS {
        writeln!(file, "{{\"n\": {n}}}").expect("write");
    }
    file.flush().expect("flush");
    drop(file);

    let project = app.project("cancelled").await;
    let storage = storage(&app, project, json!({})).await;
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    app.cancel(&run_id).await;
    let cancelled = app
        .wait_run(&run_id, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let first = cancelled["counters"]["created"].as_i64().expect("created");
    assert!(first < ROWS, "the run ended before the cancel: {cancelled}");

    let rerun = app.sync(&storage["id"]).await;
    assert_eq!(rerun["status"], "completed", "{rerun}");
    let db = Database::connect(&app.database_url).await.expect("db");
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
                .await
                .expect("query")
                .expect("row");
            row.try_get_by_index::<i64>(0).expect("count")
        }
    };
    assert_eq!(count("SELECT count(*) FROM tasks").await, ROWS);
    assert_eq!(
        count("SELECT count(DISTINCT row_index) FROM import_links").await,
        ROWS
    );
    assert_eq!(
        rerun["counters"]["created"].as_i64(),
        Some(ROWS - first),
        "{rerun}"
    );
    // Done: a third sync reads nothing again.
    let third = app.sync(&storage["id"]).await;
    assert_eq!(third["counters"]["created"], 0, "{third}");
    assert_eq!(third["counters"]["existed"], ROWS, "{third}");
    assert_eq!(count("SELECT count(*) FROM partial_objects").await, 0);
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
    let key = unreadable_dir(&data);
    let base = data.canonicalize().expect("canonical data dir");

    let project = app.project("unreadable").await;
    let storage = app.local_storage(project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["created"], 2, "{run}");
    assert_eq!(run["counters"]["failed"], 1, "{run}");
    let items = app.run_errors(run["id"].as_str().expect("id")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["key"], format!("{key}/"), "{items:?}");
    let message = items[0]["error"].as_str().expect("message");
    assert!(
        !message.contains(base.to_str().expect("utf-8")),
        "the message shows the server's path: {message}"
    );
    // A retry run reads that directory alone again: still unreadable, it is
    // the retry's one error, and the retry takes none of the objects it did
    // not read for missing.
    let retry = format!("/api/v1/runs/{}/retry", run["id"].as_str().expect("id"));
    let (code, started) = app.post(&retry, json!({})).await;
    assert_eq!(code, 202, "{started}");
    let id = started["id"].as_str().expect("id");
    let retried = app.wait_run(id, std::time::Duration::from_secs(60)).await;
    let errors = app.run_errors(id).await;
    assert_eq!(retried["status"], "completed_with_errors", "{retried}");
    assert_eq!(errors[0]["key"], format!("{key}/"), "{errors:?}");
    let c = &retried["counters"];
    assert_eq!(
        (
            c["failed"].as_i64(),
            c["listed"].as_i64(),
            c["missing"].as_i64()
        ),
        (Some(1), Some(0), Some(0)),
        "{retried}"
    );
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    let full = app.sync(&storage["id"]).await;
    assert_eq!(
        full["counters"]["missing"], 0,
        "nothing was flagged: {full}"
    );
    app.stop().await;
}

/// A file or directory name that is not UTF-8 cannot be a key: each one
/// the prefix and the filter take is one object error (shown with U+FFFD),
/// where they were skipped with only a log line; the listing stays
/// complete, so a file deleted later has its task deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_name_that_is_not_utf8_is_one_object_error() {
    use std::os::unix::ffi::OsStrExt;
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    write(&data, "a.jpg", b"a");
    write(&data, "sub/b.jpg", b"b");
    let odd = |name: &[u8]| data.join(std::ffi::OsStr::from_bytes(name));
    std::fs::write(odd(b"bad\xff.jpg"), b"x").expect("a non-UTF-8 file name");
    std::fs::write(odd(b"note\xff.txt"), b"x").expect("a non-UTF-8 file name");
    std::fs::create_dir_all(odd(b"dir\xfe")).expect("a non-UTF-8 directory");
    std::fs::write(odd(b"dir\xfe/c.jpg"), b"c").expect("a file under it");

    let project = app.project("not utf-8").await;
    let fields = json!({ "regex_filter": ".*\\.jpg$|^dir", "on_missing": "delete_unlabeled" });
    let storage = app.local_storage(project, fields).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["created"], 2, "{run}");
    assert_eq!(run["counters"]["failed"], 2, "{run}");
    let id = run["id"].as_str().expect("id");
    let items = app.run_errors(id).await;
    let mut keys: Vec<&str> = items.iter().filter_map(|e| e["key"].as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["bad\u{fffd}.jpg", "dir\u{fffd}"], "{items:?}");
    assert!(
        items
            .iter()
            .all(|e| e["error"].as_str().is_some_and(|m| m.contains("not UTF-8"))),
        "{items:?}"
    );
    // A retry run looks for them by the names shown, and finds them again.
    let (code, started) = app
        .post(&format!("/api/v1/runs/{id}/retry"), json!({}))
        .await;
    assert_eq!(code, 202, "{started}");
    let retry = started["id"].as_str().expect("id");
    let retried = app
        .wait_run(retry, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(retried["counters"]["failed"], 2, "{retried}");
    std::fs::remove_file(data.join("a.jpg")).expect("rm a.jpg");
    let again = app.sync(&storage["id"]).await;
    assert_eq!(again["counters"]["missing"], 1, "{again}");
    assert_eq!(
        again["counters"]["deleted"], 1,
        "a complete listing: {again}"
    );
    app.stop().await;
}

/// Makes a directory under `data` that a listing cannot read, even as
/// root: its absolute path is 4,095 bytes, so it fits PATH_MAX but `<path>/`
/// does not. Returns its key (under `deep/`).
fn unreadable_dir(data: &Path) -> String {
    let base = data.canonicalize().expect("canonical data dir");
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
    key
}

/// A non-recursive storage imports only the top level; a prefix limits the
/// import to the keys under it (Files mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursion_off_and_prefix_limit_what_is_imported() {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    labelsync_tests::write_files(&data, 1500, "jpg");
    for name in ["a.jpg", "b.jpg"] {
        std::fs::write(data.join(name), b"x").expect("write");
    }
    let project = app.project("p").await;
    let flat = app
        .local_storage(project, json!({ "recursive": false }))
        .await;
    let prefixed = app
        .local_storage(
            project,
            json!({ "prefix": "part-001", "title": "second part" }),
        )
        .await;
    for (storage, expected) in [(&flat, 2), (&prefixed, 500)] {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["counters"]["created"], expected, "{run}");
    }
    let tasks = app.all_tasks(project).await;
    assert_eq!(tasks.len(), 502);
    assert!(
        tasks
            .iter()
            .filter(|t| t["source"]["storage_id"] == prefixed["id"])
            .all(|t| t["source"]["key"]
                .as_str()
                .expect("key")
                .starts_with("part-001/"))
    );
    app.stop().await;
}

/// The task ids of a project by their object key (Files mode: one each).
async fn task_ids_by_key(app: &TestApp, project: i64) -> BTreeMap<String, Value> {
    app.all_tasks(project)
        .await
        .iter()
        .map(|t| {
            let key = t["source"]["key"].as_str().expect("key").to_owned();
            (key, t["id"].clone())
        })
        .collect()
}

/// Saves an annotation on a task; returns its id.
async fn annotate(app: &TestApp, task_id: &Value) -> Value {
    let (status, annotation) = app
        .post(
            &format!("/api/v1/tasks/{task_id}/annotations"),
            json!({ "result": [{ "value": { "choices": ["keep me"] } }] }),
        )
        .await;
    assert_eq!(status, 201, "{annotation}");
    annotation["id"].clone()
}

/// The object keys of the links flagged missing, in key order.
async fn flagged_keys(app: &TestApp) -> Vec<String> {
    let db = Database::connect(&app.database_url).await.expect("connect");
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT object_key FROM import_links WHERE object_exists = FALSE ORDER BY object_key",
        ))
        .await
        .expect("query");
    rows.iter()
        .map(|r| r.try_get::<String>("", "object_key").expect("key"))
        .collect()
}

/// A run's (missing, deleted, kept) counters.
fn gone_counters(run: &Value) -> (i64, i64, i64) {
    let c = &run["counters"];
    let n = |name: &str| {
        c[name]
            .as_i64()
            .unwrap_or_else(|| panic!("{name} in {run}"))
    };
    (n("missing"), n("deleted"), n("kept"))
}

/// Five images synced by a Files-mode source with `on_missing` (`None`:
/// left to its default), the tasks of img-1 and img-3 annotated, then img-0,
/// img-1 and img-2 deleted from the folder and the source synced again:
/// (project, source, task ids by key after the first sync, second run).
async fn three_of_five_files_deleted(
    app: &TestApp,
    on_missing: Option<&str>,
) -> (i64, Value, BTreeMap<String, Value>, Value) {
    let data = app.doc_root.path().join("data");
    for i in 0..5 {
        write(&data, &format!("img-{i}.jpg"), b"x");
    }
    let project = app.project("gone").await;
    let fields = on_missing.map_or(json!({}), |m| json!({ "on_missing": m }));
    let source = app.local_storage(project, fields).await;
    assert_eq!(
        source["on_missing"],
        on_missing.unwrap_or("flag"),
        "{source}"
    );
    let first = app.sync(&source["id"]).await;
    assert_eq!(first["counters"]["created"], 5, "{first}");
    let ids = task_ids_by_key(app, project).await;
    for key in ["img-1.jpg", "img-3.jpg"] {
        annotate(app, &ids[key]).await;
    }
    for key in ["img-0.jpg", "img-1.jpg", "img-2.jpg"] {
        std::fs::remove_file(data.join(key)).expect("delete");
    }
    let second = app.sync(&source["id"]).await;
    assert_eq!(second["status"], "completed", "{second}");
    (project, source, ids, second)
}

/// `delete_unlabeled`: the unannotated tasks of deleted files go, the
/// annotated one stays (flagged), the tasks of files still there are left
/// alone; a later sync deletes a kept task once its annotation is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_take_their_unlabeled_tasks_with_them_on_postgres() {
    deleted_files_take_their_unlabeled_tasks_with_them(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_take_their_unlabeled_tasks_with_them_on_sqlite() {
    deleted_files_take_their_unlabeled_tasks_with_them(true).await;
}

async fn deleted_files_take_their_unlabeled_tasks_with_them(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let (project, source, before, second) =
        three_of_five_files_deleted(&app, Some("delete_unlabeled")).await;
    assert_eq!(gone_counters(&second), (3, 2, 1), "{second}");
    let kept: BTreeMap<String, Value> = ["img-1.jpg", "img-3.jpg", "img-4.jpg"]
        .map(|k| (k.to_owned(), before[k].clone()))
        .into_iter()
        .collect();
    assert_eq!(task_ids_by_key(&app, project).await, kept);
    assert_eq!(flagged_keys(&app).await, ["img-1.jpg"]);
    let (_, task) = app
        .get(&format!("/api/v1/tasks/{}", before["img-1.jpg"]))
        .await;
    let annotation = task["annotations"][0]["id"].clone();
    assert!(
        annotation.is_i64(),
        "the kept task keeps its annotation: {task}"
    );

    let third = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&third), (0, 0, 0), "{third}");
    let (status, _) = app
        .delete(&format!("/api/v1/annotations/{annotation}"))
        .await;
    assert_eq!(status, 204);
    let fourth = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&fourth), (0, 1, 0), "{fourth}");
    let left: Vec<String> = task_ids_by_key(&app, project).await.into_keys().collect();
    assert_eq!(left, ["img-3.jpg", "img-4.jpg"]);
    assert_eq!(flagged_keys(&app).await, Vec::<String>::new());
    app.stop().await;
}

/// `flag` (the default): today's behaviour; nothing is deleted, the links
/// of the deleted files are flagged and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_are_flagged_by_default_on_postgres() {
    deleted_files_are_flagged_by_default(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_are_flagged_by_default_on_sqlite() {
    deleted_files_are_flagged_by_default(true).await;
}

async fn deleted_files_are_flagged_by_default(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let (project, source, before, second) = three_of_five_files_deleted(&app, None).await;
    assert_eq!(gone_counters(&second), (3, 0, 0), "{second}");
    assert_eq!(task_ids_by_key(&app, project).await, before);
    assert_eq!(
        flagged_keys(&app).await,
        ["img-0.jpg", "img-1.jpg", "img-2.jpg"]
    );
    let third = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&third), (0, 0, 0), "{third}");
    app.stop().await;
}

/// `keep`: the deleted files are counted, by every sync until they come
/// back, and nothing is flagged or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_are_only_counted_with_keep_on_postgres() {
    deleted_files_are_only_counted_with_keep(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_are_only_counted_with_keep_on_sqlite() {
    deleted_files_are_only_counted_with_keep(true).await;
}

async fn deleted_files_are_only_counted_with_keep(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let (project, source, before, second) = three_of_five_files_deleted(&app, Some("keep")).await;
    assert_eq!(gone_counters(&second), (3, 0, 0), "{second}");
    assert_eq!(task_ids_by_key(&app, project).await, before);
    assert_eq!(flagged_keys(&app).await, Vec::<String>::new());
    let third = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&third), (3, 0, 0), "{third}");
    write(&app.doc_root.path().join("data"), "img-0.jpg", b"x");
    let fourth = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&fourth), (2, 0, 0), "{fourth}");
    assert_eq!(fourth["counters"]["created"], 0, "{fourth}");
    assert_eq!(task_ids_by_key(&app, project).await, before);
    app.stop().await;
}

/// Tasks mode, `delete_unlabeled`: of two task lists, the deleted one's
/// unannotated tasks go (a prediction with its task), its annotated task
/// stays; the other list's tasks are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_task_list_takes_its_unlabeled_tasks_with_it_on_postgres() {
    a_deleted_task_list_takes_its_unlabeled_tasks_with_it(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_task_list_takes_its_unlabeled_tasks_with_it_on_sqlite() {
    a_deleted_task_list_takes_its_unlabeled_tasks_with_it(true).await;
}

async fn a_deleted_task_list_takes_its_unlabeled_tasks_with_it(embedded: bool) {
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    let data = app.doc_root.path().join("data");
    write(
        &data,
        "a.json",
        br#"[{"data": {"text": "a0"}, "predictions": [{"result": [{"value": 1}], "model_version": "m-1"}]},
             {"data": {"text": "a1"}}, {"data": {"text": "a2"}}]"#,
    );
    write(&data, "b.json", br#"[{"text": "b0"}, {"text": "b1"}]"#);
    let project = app.project("task lists").await;
    let source = storage(&app, project, json!({ "on_missing": "delete_unlabeled" })).await;
    let first = app.sync(&source["id"]).await;
    assert_eq!(first["counters"]["created"], 5, "{first}");
    let before = app.all_tasks(project).await;
    let id_of = |key: &str, row: i64| task_by_source(&before, key, row)["id"].clone();
    annotate(&app, &id_of("a.json", 1)).await;
    assert_eq!(app.count("SELECT COUNT(*) AS n FROM predictions").await, 1);

    std::fs::remove_file(data.join("a.json")).expect("delete");
    let second = app.sync(&source["id"]).await;
    assert_eq!(gone_counters(&second), (1, 2, 1), "{second}");
    let mut left: Vec<Value> = app
        .all_tasks(project)
        .await
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    left.sort_by_key(|id| id.as_i64());
    let mut expected = vec![id_of("a.json", 1), id_of("b.json", 0), id_of("b.json", 1)];
    expected.sort_by_key(|id| id.as_i64());
    assert_eq!(left, expected);
    assert_eq!(app.count("SELECT COUNT(*) AS n FROM predictions").await, 0);
    assert_eq!(flagged_keys(&app).await, ["a.json"]);
    let links = "SELECT COUNT(*) AS n FROM import_links";
    assert_eq!(
        app.count(links).await,
        3,
        "the deleted tasks' links go with them"
    );
    app.stop().await;
}

/// `delete_unlabeled` deletes only after a complete listing: while a
/// directory cannot be read, what the run did not list may still be there,
/// so the task of a deleted file is flagged, not deleted; the first sync
/// that reads everything deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_listing_deletes_no_task() {
    let (app, project, source) = a_synced_source_made_incomplete("incomplete").await;
    let before = task_ids_by_key(&app, project).await;
    let second = app.sync(&source["id"]).await;
    assert_eq!(second["status"], "completed_with_errors", "{second}");
    assert_eq!(gone_counters(&second), (1, 0, 0), "{second}");
    assert_eq!(task_ids_by_key(&app, project).await, before);
    assert_eq!(flagged_keys(&app).await, ["z/z.jpg"]);

    let data = app.doc_root.path().join("data");
    std::fs::remove_dir_all(data.join("deep")).expect("remove the deep directory");
    let third = app.sync(&source["id"]).await;
    assert_eq!(third["status"], "completed", "{third}");
    assert_eq!(gone_counters(&third), (0, 1, 0), "{third}");
    let left: Vec<String> = task_ids_by_key(&app, project).await.into_keys().collect();
    assert_eq!(left, ["a.jpg"]);
    app.stop().await;
}

/// The same when the database lost the run's flag of an incomplete
/// listing (a page of listing errors only moves no cursor, so the end's
/// check of the cursor cannot see its commit lost): the attempt that saw
/// the listing incomplete still deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_incomplete_as_the_attempt_saw_it_deletes_no_task() {
    let (app, project, source) = a_synced_source_made_incomplete("flag lost").await;
    let before = task_ids_by_key(&app, project).await;
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    db.execute_unprepared(
        "CREATE TABLE lost_flags (n int); \
         CREATE FUNCTION lose_flag() RETURNS trigger AS $$ BEGIN \
           IF NEW.listing_incomplete AND NOT OLD.listing_incomplete \
              AND NOT EXISTS (SELECT 1 FROM lost_flags) THEN \
             INSERT INTO lost_flags VALUES (1); \
             NEW.listing_incomplete := false; \
           END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER lose_flag BEFORE UPDATE ON sync_runs \
           FOR EACH ROW EXECUTE FUNCTION lose_flag();",
    )
    .await
    .expect("trigger");
    let second = app.sync(&source["id"]).await;
    let lost = app.count("SELECT count(*) AS n FROM lost_flags").await;
    assert_eq!(lost, 1, "the flag was not lost");
    assert_eq!(gone_counters(&second), (1, 0, 0), "{second}");
    assert_eq!(task_ids_by_key(&app, project).await, before);
    app.stop().await;
}

/// An app with a `delete_unlabeled` local source (in project `title`) whose
/// sync imported `a.jpg` and `z/z.jpg`, then `z/z.jpg` deleted and an
/// unreadable directory added: (app, project id, source).
async fn a_synced_source_made_incomplete(title: &str) -> (TestApp, i64, Value) {
    let app = spawn_app(AppOptions::default()).await;
    let data = app.doc_root.path().join("data");
    write(&data, "a.jpg", b"a");
    write(&data, "z/z.jpg", b"z");
    let project = app.project(title).await;
    let source = app
        .local_storage(project, json!({ "on_missing": "delete_unlabeled" }))
        .await;
    assert_eq!(app.sync(&source["id"]).await["counters"]["created"], 2);
    std::fs::remove_file(data.join("z/z.jpg")).expect("delete");
    unreadable_dir(&data);
    (app, project, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_after_a_config_change_reads_the_new_location() {
    // Workers keep the backends they opened for a storage; a changed
    // config must open a new one, not list the old location again.
    let app = spawn_app(AppOptions::default()).await;
    let root = app.doc_root.path();
    write(root, "data/a.jpg", b"a");
    write(root, "other/b.jpg", b"b");
    write(root, "other/c.jpg", b"c");
    let project = app.project("moved").await;
    let storage = app.local_storage(project, json!({})).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["counters"]["created"], 1, "{run}");
    let (status, changed) = app
        .patch(
            &format!("/api/v1/storages/{}", storage["id"]),
            json!({ "config": { "path": "other" } }),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["listed"], 2, "{run}");
    assert_eq!(run["counters"]["created"], 2, "{run}");
    app.stop().await;
}
