//! Partitioned listing (`ingest::partitions`) on the s3s-fs emulator (and
//! one layout on fake-gcs-server and Azurite): the
//! partitions a layout splits into, exact counters and missing objects, a
//! worker SIGKILLed in the middle of a partition, a partition that keeps
//! failing, objects added while the run lists, and layouts that do not
//! split. (A module of the `fleet` test binary.)
use std::time::{Duration, Instant};

use labelsync::storage::BackendKind;
use labelsync_tests::{
    AppOptions, TestApp,
    backends::{
        AZURITE_ACCOUNT, AZURITE_KEY, bucket_name, create_azure_container, create_gcs_bucket,
        create_s3_bucket, endpoint, open,
    },
    fault_proxy::{FaultProxy, Mode},
    spawn_app, spawn_worker,
    synthetic_s3::Latency,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};

use super::count;

const KEY: &str = "labelsync-test";
const SECRET: &str = "labelsync-test-secret";

pub(super) fn s3s() -> String {
    endpoint("TEST_S3S_ENDPOINT")
}

fn client() -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(s3s())
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            KEY, SECRET, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Writes each key (a one-task JSON file), 32 at a time.
async fn put_keys(bucket: &str, keys: &[String]) {
    use futures::StreamExt;
    let s3 = client();
    futures::stream::iter(keys)
        .for_each_concurrent(32, |key| {
            let s3 = s3.clone();
            async move {
                let body = json!({ "image": format!("s3://{bucket}/{key}") }).to_string();
                s3.put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(body.into_bytes().into())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
            }
        })
        .await;
}

/// A new bucket holding `keys`.
pub(super) async fn bucket_with(keys: &[String]) -> String {
    let bucket = bucket_name();
    create_s3_bucket(&s3s(), KEY, SECRET, &bucket).await;
    put_keys(&bucket, keys).await;
    bucket
}

/// `per` keys under each of `prefixes` top-level prefixes `p0/`, `p1/`, ...
fn spread(prefixes: usize, per: usize) -> Vec<String> {
    (0..prefixes)
        .flat_map(|p| (0..per).map(move |i| format!("p{p}/{i:04}.json")))
        .collect()
}

/// A source storage of `bucket` reached through `endpoint_url`.
pub(super) async fn s3_storage(
    app: &TestApp,
    bucket: &str,
    endpoint_url: &str,
    extra: Value,
) -> Value {
    let project = app.project("partitions").await;
    let mut body = json!({
        "project_id": project, "role": "source", "backend": "s3",
        "config": { "bucket": bucket, "endpoint_url": endpoint_url },
        "secrets": { "access_key_id": KEY, "secret_access_key": SECRET },
    });
    for (key, value) in extra.as_object().expect("object") {
        body[key] = value.clone();
    }
    let (status, storage) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{storage}");
    storage
}

/// A scheduler whose storages may reach the emulators, with `env`.
pub(super) async fn app_with(workers: bool, env: &[(&'static str, &str)]) -> TestApp {
    spawn_app(AppOptions {
        workers,
        ..options_with(env)
    })
    .await
}

/// A server's options: storages allowed, and `env`.
fn options_with(env: &[(&'static str, &str)]) -> AppOptions {
    let mut opts = AppOptions::with_storages();
    opts.env
        .extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    opts
}

/// The run's partitions: (prefix, recursive, done, attempts), in order.
async fn partitions(db: &DatabaseConnection, run_id: &str) -> Vec<(String, bool, bool, i64)> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT prefix, recursive, done, attempts FROM sync_partitions WHERE run_id = '{run_id}' ORDER BY id"),
        ))
        .await
        .expect("partitions");
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "prefix").expect("prefix"),
                r.try_get("", "recursive").expect("recursive"),
                r.try_get("", "done").expect("done"),
                r.try_get("", "attempts").expect("attempts"),
            )
        })
        .collect()
}

/// Checks the run's partitions are `expected` (prefix, recursive), in
/// order, and all done.
async fn assert_all_done(db: &DatabaseConnection, run_id: &str, expected: &[(&str, bool)]) {
    let found: Vec<(String, bool)> = partitions(db, run_id)
        .await
        .into_iter()
        .map(|(prefix, recursive, done, _)| {
            assert!(done, "{prefix} done");
            (prefix, recursive)
        })
        .collect();
    let expected: Vec<(String, bool)> = expected
        .iter()
        .map(|(p, r)| ((*p).to_owned(), *r))
        .collect();
    assert_eq!(found, expected);
}

/// Every task's object key, once each (a key twice fails).
async fn task_keys(app: &TestApp, project: &Value) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    for task in app.all_tasks(project.as_i64().expect("project id")).await {
        let uri = task["data"]["image"].as_str().expect("image").to_owned();
        assert!(keys.insert(uri.clone()), "{uri} has two tasks");
    }
    keys
}

fn uris(bucket: &str, keys: &[String]) -> std::collections::BTreeSet<String> {
    keys.iter().map(|k| format!("s3://{bucket}/{k}")).collect()
}

/// Keys directly under the root and under a prefix split one level
/// further: the partitions hold each key once, the counters are exact, and
/// objects deleted later are counted missing by the next (partitioned) run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_with_prefixes_is_listed_by_partitions_exactly() {
    listed_by_partitions_exactly(false).await;
}

/// The same in the embedded mode (SQLite and its in-process queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_with_prefixes_is_listed_by_partitions_exactly_on_sqlite() {
    listed_by_partitions_exactly(true).await;
}

async fn listed_by_partitions_exactly(embedded: bool) {
    let mut keys: Vec<String> = vec![
        "top-0.jpg".into(),
        "top-1.jpg".into(),
        "b/direct.jpg".into(),
    ];
    keys.extend((0..40).map(|i| format!("a/{i:03}.jpg")));
    keys.extend((0..25).map(|i| format!("b/x/{i:03}.jpg")));
    keys.extend((0..25).map(|i| format!("b/y/deep/{i:03}.jpg")));
    let bucket = bucket_with(&keys).await;
    let app = spawn_app(AppOptions {
        embedded,
        ..options_with(&[("LABELSYNC_PAGE_SIZE", "7")])
    })
    .await;
    let storage = s3_storage(&app, &bucket, &s3s(), json!({ "on_missing": "flag" })).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let n = keys.len() as i64;
    assert_eq!(run["counters"]["listed"], n, "{run}");
    assert_eq!(run["counters"]["created"], n, "{run}");
    let db = Database::connect(&app.database_url).await.expect("connect");
    let expected = [
        ("", false),
        ("a/", true),
        ("b/", false),
        ("b/x/", true),
        ("b/y/deep/", true),
    ];
    assert_all_done(&db, run["id"].as_str().expect("id"), &expected).await;
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &keys)
    );

    let gone = ["top-1.jpg", "a/007.jpg", "b/direct.jpg", "b/y/deep/024.jpg"];
    for key in gone {
        client()
            .delete_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .expect("delete");
    }
    let again = app.sync(&storage["id"]).await;
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(again["counters"]["missing"], gone.len(), "{again}");
    assert_eq!(
        again["counters"]["existed"],
        n - gone.len() as i64,
        "{again}"
    );
    assert_eq!(again["counters"]["created"], 0, "{again}");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) AS n FROM import_links WHERE object_exists = false"
        )
        .await,
        gone.len() as i64
    );
    app.stop().await;
}

/// A level whose first discovery page (1,000 keys) is flat and which has
/// sub-prefixes after it: the run commits that page (its batches go out)
/// while discovery reads on, then lists the rest by partitions, the
/// root's flat partition starting after the committed keys. Every key
/// once, in Tasks mode; a re-sync after deleting a key of the first page
/// and one of the flat rest counts exactly those two missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_first_page_is_committed_and_the_rest_still_partitioned() {
    flat_first_page_then_partitions(false).await;
}

/// The same in the embedded mode (SQLite and its in-process queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_first_page_is_committed_and_the_rest_still_partitioned_on_sqlite() {
    flat_first_page_then_partitions(true).await;
}

async fn flat_first_page_then_partitions(embedded: bool) {
    let mut keys: Vec<String> = (0..1100).map(|i| format!("mix/a-{i:04}.json")).collect();
    keys.extend((0..20).map(|i| format!("mix/p0/{i:03}.json")));
    keys.extend((0..20).map(|i| format!("mix/p1/x/{i:03}.json")));
    let bucket = bucket_with(&keys).await;
    let app = spawn_app(AppOptions {
        embedded,
        ..options_with(&[("LABELSYNC_PAGE_SIZE", "400")])
    })
    .await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let extra = json!({ "prefix": "mix/", "import_method": "tasks" });
    let storage = s3_storage(&app, &bucket, &s3s(), extra).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let n = keys.len() as i64;
    assert_eq!(run["counters"]["listed"], n, "{run}");
    assert_eq!(run["counters"]["created"], n, "{run}");
    let run_id = run["id"].as_str().expect("id");
    // p1/ holds only x/: discovery goes one level down there.
    let expected = [("mix/", false), ("mix/p0/", true), ("mix/p1/x/", true)];
    assert_all_done(&db, run_id, &expected).await;
    // The run's own cursor stopped at the first page's last key: the keys
    // up to it were committed before the partitions (which move only
    // their own cursors) were written.
    let sql = format!(
        "SELECT COUNT(*) AS n FROM sync_runs WHERE id = '{run_id}' AND cursor = 'mix/a-0999.json'"
    );
    assert_eq!(count(&db, &sql).await, 1, "the run's cursor");
    let tasks = count(&db, "SELECT COUNT(*) AS n FROM tasks").await;
    assert_eq!(tasks, n, "one task per file");
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await.len(),
        keys.len()
    );
    let gone = ["mix/a-0500.json", "mix/a-1050.json"];
    for key in gone {
        let deleted = client().delete_object().bucket(&bucket).key(key).send();
        deleted.await.expect("delete");
    }
    let again = app.sync(&storage["id"]).await;
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(again["counters"]["missing"], gone.len(), "{again}");
    assert_eq!(again["counters"]["existed"], n - 2, "{again}");
    assert_eq!(again["counters"]["created"], 0, "{again}");
    app.stop().await;
}

/// A partition is finished only where its last page left its cursor: a
/// database that lost that page's commit (a crash with asynchronous
/// commits, a failover to a replica behind) had the partition done
/// without the page's objects. The attempt fails instead, and the
/// partition is listed again from where the database has its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_last_page_was_lost_lists_it_again() {
    let keys: Vec<String> = (0..3)
        .flat_map(|p| (0..150).map(move |i| format!("p{p}/{i:04}.jpg")))
        .collect();
    let bucket = bucket_with(&keys).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "100")]).await;
    let storage = s3_storage(&app, &bucket, &s3s(), json!({})).await;
    app.lose_a_page_once("sync_partitions", "p1/0149.jpg").await;
    let run = app.sync(&storage["id"]).await;
    assert!(app.page_was_lost().await, "the page was not lost");
    assert_eq!(run["status"], "completed", "{run}");
    let db = Database::connect(&app.database_url).await.expect("connect");
    let sql = "SELECT max(attempts) AS n FROM sync_partitions WHERE prefix = 'p1/'";
    assert_eq!(count(&db, sql).await, 2, "p1/ listed twice");
    let run_id = run["id"].as_str().expect("id");
    let expected = [("p0/", true), ("p1/", true), ("p2/", true)];
    assert_all_done(&db, run_id, &expected).await;
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &keys)
    );
    app.stop().await;
}

/// Partitions are written only where discovery's first page left the
/// run's cursor: a database that lost that page's commit had partitions
/// listing only the keys after it, so the page's objects were never
/// listed. The attempt fails instead, and the next one lists from the
/// run's cursor as the database has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_after_a_lost_first_page_are_not_written() {
    let mut keys: Vec<String> = (0..1100).map(|i| format!("mix/a-{i:04}.jpg")).collect();
    keys.extend((0..20).map(|i| format!("mix/p0/{i:03}.jpg")));
    keys.extend((0..20).map(|i| format!("mix/p1/x/{i:03}.jpg")));
    let bucket = bucket_with(&keys).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "400")]).await;
    let storage = s3_storage(&app, &bucket, &s3s(), json!({ "prefix": "mix/" })).await;
    // Discovery's first page is 1,000 keys, committed in pages of 400: the
    // last of them (800 to 999) is lost.
    app.lose_a_page_once("sync_runs", "mix/a-0999.jpg").await;
    let run = app.sync(&storage["id"]).await;
    assert!(app.page_was_lost().await, "the page was not lost");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["attempts"], 2, "{run}");
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &keys)
    );
    app.stop().await;
}

/// A partitioned run finishes only where every partition it wrote is
/// there and done. A database that lost the commit writing them (a
/// failover) had the run find none pending and take every object for
/// gone: under `delete_unlabeled`, a re-sync deleted every task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_partitions_were_lost_as_written_deletes_nothing() {
    // The statement writing them loses its rows, once.
    lost_partitions_delete_nothing(
        "CREATE FUNCTION lose_partitions() RETURNS trigger AS $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM lost_partitions) THEN \
             INSERT INTO lost_partitions VALUES (1); \
             DELETE FROM sync_partitions WHERE id IN (SELECT id FROM written); \
           END IF; RETURN NULL; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER lose_partitions AFTER INSERT ON sync_partitions \
           REFERENCING NEW TABLE AS written \
           FOR EACH STATEMENT EXECUTE FUNCTION lose_partitions();",
    )
    .await;
}

/// The same when they are lost once listed: the run's last check finds
/// them gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_partitions_were_lost_once_listed_deletes_nothing() {
    // When the first is done, the run's partitions go, once: the others'
    // keys were not all listed.
    lost_partitions_delete_nothing(
        "CREATE FUNCTION lose_partitions() RETURNS trigger AS $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM lost_partitions) THEN \
             INSERT INTO lost_partitions VALUES (1); \
             DELETE FROM sync_partitions WHERE run_id = NEW.run_id; \
           END IF; RETURN NULL; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER lose_partitions AFTER UPDATE ON sync_partitions \
           FOR EACH ROW WHEN (NEW.done AND NOT OLD.done) \
           EXECUTE FUNCTION lose_partitions();",
    )
    .await;
}

/// Syncs a bucket of three prefixes under `delete_unlabeled`, makes the
/// database lose the next run's partitions by `trigger` (which marks
/// `lost_partitions` when it does), and syncs again: no task deleted.
async fn lost_partitions_delete_nothing(trigger: &str) {
    let keys: Vec<String> = (0..3)
        .flat_map(|p| (0..50).map(move |i| format!("p{p}/{i:04}.jpg")))
        .collect();
    let bucket = bucket_with(&keys).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "20")]).await;
    let extra = json!({ "on_missing": "delete_unlabeled" });
    let storage = s3_storage(&app, &bucket, &s3s(), extra).await;
    let first = app.sync(&storage["id"]).await;
    assert_eq!(first["status"], "completed", "{first}");
    let db = Database::connect(&app.database_url).await.expect("connect");
    db.execute_unprepared(&format!("CREATE TABLE lost_partitions (n int); {trigger}"))
        .await
        .expect("trigger");
    let again = app.sync(&storage["id"]).await;
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM lost_partitions").await,
        1,
        "not lost"
    );
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(again["counters"]["deleted"], 0, "{again}");
    assert_eq!(again["counters"]["missing"], 0, "{again}");
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &keys)
    );
    app.stop().await;
}

/// The same layout on fake-gcs-server: GCS answers discovery too, so its
/// buckets are listed by partitions, each key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gcs_bucket_with_prefixes_is_listed_by_partitions() {
    let gcs = endpoint("TEST_GCS_ENDPOINT");
    let bucket = bucket_name();
    create_gcs_bucket(&gcs, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": gcs });
    let uri = format!("gs://{bucket}/");
    listed_by_partitions_on(BackendKind::Gcs, config, json!({}), &uri).await;
}

/// And on Azurite: Azure answers discovery as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_container_with_prefixes_is_listed_by_partitions() {
    let account_url = endpoint("TEST_AZURITE_ENDPOINT");
    let container = bucket_name();
    create_azure_container(&account_url, &container).await;
    let config = json!({ "account_name": AZURITE_ACCOUNT, "container": container, "endpoint_url": account_url });
    let secrets = json!({ "account_key": AZURITE_KEY });
    let uri = format!("azure-blob://{container}/");
    listed_by_partitions_on(BackendKind::Azure, config, secrets, &uri).await;
}

/// Syncs a storage holding keys at its root, under `a/`, directly under
/// `b/` and under `b/x/`: four partitions, each key one task (`uri` is how
/// a task names the storage's root).
async fn listed_by_partitions_on(kind: BackendKind, config: Value, secrets: Value, uri: &str) {
    let storage = open(kind, config.clone(), secrets.clone()).await;
    let mut keys: Vec<String> = vec!["top.jpg".into(), "b/direct.jpg".into()];
    keys.extend((0..20).map(|i| format!("a/{i:03}.jpg")));
    keys.extend((0..10).map(|i| format!("b/x/{i:03}.jpg")));
    for key in &keys {
        storage
            .put(key, bytes::Bytes::from_static(b"x"), None)
            .await
            .expect("put");
    }
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "7")]).await;
    let project = app.project(&format!("{kind} partitions")).await;
    let body = json!({
        "project_id": project, "role": "source", "backend": kind.to_string(),
        "config": config, "secrets": secrets,
    });
    let (status, source) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{source}");
    let run = app.sync(&source["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], keys.len(), "{run}");
    let db = Database::connect(&app.database_url).await.expect("connect");
    let found: Vec<(String, bool, bool)> = partitions(&db, run["id"].as_str().expect("id"))
        .await
        .into_iter()
        .map(|(prefix, recursive, done, _)| (prefix, recursive, done))
        .collect();
    let expected: Vec<(String, bool, bool)> =
        [("", false), ("a/", true), ("b/", false), ("b/x/", true)]
            .iter()
            .map(|(p, r)| ((*p).to_owned(), *r, true))
            .collect();
    assert_eq!(found, expected, "{kind}");
    let mut tasks = std::collections::BTreeSet::new();
    for task in app.all_tasks(project).await {
        let image = task["data"]["image"].as_str().expect("image").to_owned();
        assert!(tasks.insert(image.clone()), "{image} has two tasks");
    }
    let expected: std::collections::BTreeSet<String> =
        keys.iter().map(|k| format!("{uri}{k}")).collect();
    assert_eq!(tasks, expected, "{kind}");
    app.stop().await;
}

/// Waits until some partition of the run has committed a page and is not
/// done: the moment to kill its worker.
async fn wait_mid_partition(db: &DatabaseConnection, run_id: &str) {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM sync_partitions WHERE run_id = '{run_id}' AND cursor IS NOT NULL AND done = false"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(db, &sql).await == 0 {
        assert!(Instant::now() < deadline, "no partition started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Partitions listed behind a 40 ms round trip; the only worker is killed
/// (SIGKILL) with partitions half-listed, a new one finishes: each
/// partition resumes from its cursor, and every object has one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_partition_leaves_no_duplicates() {
    let keys = spread(6, 120);
    let bucket = bucket_with(&keys).await;
    let rtt = Latency {
        rtt: Duration::from_millis(40),
        bytes_per_second: None,
    };
    let proxy = FaultProxy::start(&s3s(), Mode::Latency(rtt)).await;
    let app = app_with(false, &[("LABELSYNC_PAGE_SIZE", "10")]).await;
    let storage = s3_storage(&app, &bucket, &proxy.url, json!({})).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let mut victim = spawn_worker(&app, "part-victim", &[]);
    let run_id = app.start_sync(&storage["id"]).await;
    wait_mid_partition(&db, &run_id).await;
    victim.kill();
    let (_, at_kill) = app.get(&format!("/api/v1/runs/{run_id}")).await;
    let listed = at_kill["counters"]["listed"].as_i64().expect("listed");
    assert!(
        listed < keys.len() as i64,
        "the run ended before the kill: {at_kill}"
    );
    let _next = spawn_worker(&app, "part-heir", &[]);
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["listed"], keys.len(), "{run}");
    assert_eq!(
        run["counters"]["created"],
        keys.len(),
        "{run} (at kill: {at_kill})"
    );
    assert_eq!(run["counters"]["existed"], 0, "{run}");
    let parts = partitions(&db, &run_id).await;
    assert_eq!(parts.len(), 6, "{parts:?}");
    assert!(parts.iter().all(|p| p.2), "{parts:?}");
    assert!(
        parts.iter().any(|p| p.3 >= 2),
        "some partition was taken over: {parts:?}"
    );
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &keys)
    );
    app.stop().await;
}

/// One prefix's listing always fails: the run fails naming it once its
/// attempts are used up, and deletes nothing it did not list; with the
/// fault gone the next run completes with every task kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_keeps_failing_fails_the_run_and_deletes_nothing() {
    let keys = spread(3, 20);
    let bucket = bucket_with(&keys).await;
    let proxy = FaultProxy::start(&s3s(), Mode::FailListing("p1%2F")).await;
    let app = app_with(true, &[("LABELSYNC_MAX_ATTEMPTS", "2")]).await;
    let storage = s3_storage(
        &app,
        &bucket,
        &s3s(),
        json!({ "on_missing": "delete_unlabeled" }),
    )
    .await;
    let first = app.sync(&storage["id"]).await;
    assert_eq!(first["counters"]["created"], 60, "{first}");
    let path = format!("/api/v1/storages/{}", storage["id"]);
    // A new endpoint takes the storage's secrets again.
    let to = |url: &str| {
        json!({
            "config": { "bucket": bucket, "endpoint_url": url },
            "secrets": { "access_key_id": KEY, "secret_access_key": SECRET },
        })
    };
    assert_eq!(app.patch(&path, to(&proxy.url)).await.0, 200);

    let failed = app.sync(&storage["id"]).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("'p1/'") && error.contains("2 attempts"),
        "{failed}"
    );
    assert_eq!(failed["counters"]["deleted"], 0, "{failed}");
    assert!(
        proxy.counts().1 >= 2,
        "the fault was hit: {:?}",
        proxy.counts()
    );
    assert_eq!(
        app.all_tasks(storage["project_id"].as_i64().expect("id"))
            .await
            .len(),
        60
    );

    assert_eq!(app.patch(&path, to(&s3s())).await.0, 200);
    let healed = app.sync(&storage["id"]).await;
    assert_eq!(healed["status"], "completed", "{healed}");
    assert_eq!(healed["counters"]["existed"], 60, "{healed}");
    assert_eq!(healed["counters"]["missing"], 0, "{healed}");
    assert_eq!(healed["counters"]["deleted"], 0, "{healed}");
    app.stop().await;
}

/// Tasks mode behind a 40 ms round trip; while the partitions are being
/// listed, files are added under a listed prefix and under a new one. The
/// run imports what it lists once and counts nothing missing; the next
/// run imports the rest, and every file then has exactly one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_added_while_partitions_are_listed_are_imported_once() {
    let keys = spread(4, 40);
    let bucket = bucket_with(&keys).await;
    let rtt = Latency {
        rtt: Duration::from_millis(40),
        bytes_per_second: None,
    };
    let proxy = FaultProxy::start(&s3s(), Mode::Latency(rtt)).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "5")]).await;
    let extra = json!({ "import_method": "tasks", "on_missing": "delete_unlabeled" });
    let storage = s3_storage(&app, &bucket, &proxy.url, extra).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let run_id = app.start_sync(&storage["id"]).await;
    wait_mid_partition(&db, &run_id).await;
    let added: Vec<String> = (0..5)
        .flat_map(|i| {
            [
                format!("p0/zz-late-{i}.json"),
                format!("p3/zz-late-{i}.json"),
                format!("new/late-{i}.json"),
            ]
        })
        .collect();
    put_keys(&bucket, &added).await;
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["missing"], 0, "{run}");
    assert_eq!(run["counters"]["failed"], 0, "{run}");
    assert_eq!(
        run["counters"]["created"], run["counters"]["listed"],
        "{run}"
    );
    assert!(partitions(&db, &run_id).await.len() >= 4);

    let next = app.sync(&storage["id"]).await;
    assert_eq!(next["status"], "completed", "{next}");
    assert_eq!(next["counters"]["missing"], 0, "{next}");
    let all: Vec<String> = keys.iter().chain(&added).cloned().collect();
    let total = run["counters"]["created"].as_i64().expect("created")
        + next["counters"]["created"].as_i64().expect("created");
    assert_eq!(total, all.len() as i64, "{run} {next}");
    assert_eq!(
        task_keys(&app, &storage["project_id"]).await,
        uris(&bucket, &all)
    );
    app.stop().await;
}

/// Keys all directly under the prefix, or all under one prefix with no
/// further split: no partitions, the listing runs as one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layouts_that_do_not_split_are_listed_in_one_sequence() {
    let keys: Vec<String> = (0..30)
        .map(|i| format!("{i:03}.json"))
        .chain((0..30).map(|i| format!("only/{i:03}.json")))
        .collect();
    let bucket = bucket_with(&keys).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "7")]).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    for (prefix, n) in [("only/", 30), ("only", 30)] {
        let storage = s3_storage(&app, &bucket, &s3s(), json!({ "prefix": prefix })).await;
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["counters"]["created"], n, "{prefix}: {run}");
        assert!(
            partitions(&db, run["id"].as_str().expect("id"))
                .await
                .is_empty(),
            "{prefix}"
        );
    }
    let storage = s3_storage(&app, &bucket, &s3s(), json!({ "recursive": false })).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(
        run["counters"]["created"], 30,
        "only the keys at the top: {run}"
    );
    let parts = partitions(&db, run["id"].as_str().expect("id")).await;
    assert!(
        parts.is_empty(),
        "a non-recursive storage is not split: {parts:?}"
    );
    app.stop().await;
}

/// A flat prefix: the pages discovery read are the listing's first pages,
/// so the run does not ask for them again. Counted through a proxy in
/// front of s3s-fs, with pages of 400 keys (discovery reads 1,000 a page,
/// at most 3 pages): 30 keys take one listing request (it was 2), 3,030
/// keys four (3 by discovery, then the rest after its last key; it was 11),
/// and a re-sync after two deletions counts them missing and the rest
/// existing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_prefix_is_listed_once_from_the_pages_discovery_read() {
    let small: Vec<String> = (0..30).map(|i| format!("small/{i:03}.json")).collect();
    let big: Vec<String> = (0..3030).map(|i| format!("big/{i:05}.json")).collect();
    let bucket = bucket_with(&[small.clone(), big.clone()].concat()).await;
    let proxy = FaultProxy::start(&s3s(), Mode::Latency(Latency::default())).await;
    let app = app_with(true, &[("LABELSYNC_PAGE_SIZE", "400")]).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let requests_of = async |storage: &Value| {
        let before = proxy.counts().0;
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        let parts = partitions(&db, run["id"].as_str().expect("id")).await;
        assert!(parts.is_empty(), "a flat prefix does not split: {parts:?}");
        (run, proxy.counts().0 - before)
    };
    for (prefix, keys, requests) in [("small/", &small, 1), ("big/", &big, 4)] {
        let storage = s3_storage(&app, &bucket, &proxy.url, json!({ "prefix": prefix })).await;
        let (run, made) = requests_of(&storage).await;
        assert_eq!(run["counters"]["listed"], keys.len(), "{prefix}: {run}");
        assert_eq!(run["counters"]["created"], keys.len(), "{prefix}: {run}");
        assert_eq!(made, requests, "{prefix}: listing requests");
        assert_eq!(
            task_keys(&app, &storage["project_id"]).await,
            uris(&bucket, keys),
            "{prefix}"
        );
        if prefix != "big/" {
            continue;
        }
        for key in ["big/00000.json", "big/03029.json"] {
            let deleted = client().delete_object().bucket(&bucket).key(key).send();
            deleted.await.expect("delete");
        }
        let (again, made) = requests_of(&storage).await;
        assert_eq!(again["counters"]["missing"], 2, "{again}");
        assert_eq!(again["counters"]["existed"], big.len() - 2, "{again}");
        assert_eq!(again["counters"]["created"], 0, "{again}");
        assert_eq!(made, 4, "a re-sync's listing requests");
    }
    app.stop().await;
}
