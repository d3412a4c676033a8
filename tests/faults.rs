//! Faults a fleet meets, with the invariant checked after each: a storage
//! that fails a share of requests (500, 503 SlowDown, responses cut off
//! mid-body, stalls) through a proxy in front of moto; a storage that refuses
//! (403); Redis and Postgres restarted mid-run (servers of the test's own).
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use labelsync::storage::{BackendKind, Storage};
use labelsync_tests::{
    AppOptions, TestApp,
    backends::{bucket_name, create_s3_bucket, endpoint, open},
    fault_proxy::{FaultProxy, Mode},
    spawn_app,
};
use serde_json::{Value, json};

fn private_endpoints() -> AppOptions {
    AppOptions::with_storages()
}

/// A new moto bucket: moto's endpoint, the bucket's name, the bucket.
async fn moto_bucket() -> (String, String, Arc<dyn Storage>) {
    let moto = endpoint("TEST_S3_ENDPOINT");
    let bucket = bucket_name();
    create_s3_bucket(&moto, "test", "test", &bucket).await;
    let s3 = open(
        BackendKind::S3,
        json!({ "bucket": bucket, "endpoint_url": moto }),
        json!({ "access_key_id": "test", "secret_access_key": "test" }),
    )
    .await;
    (moto, bucket, s3)
}

/// A moto bucket with `tasks` one-task JSON files and `images` images.
async fn bucket(tasks: usize, images: usize) -> (String, String) {
    let (moto, bucket, s3) = moto_bucket().await;
    for i in 0..tasks {
        let body =
            json!([{ "text": format!("task {i}") }, { "text": format!("task {i}b") }]).to_string();
        s3.put(&format!("tasks/t-{i:03}.json"), Bytes::from(body), None)
            .await
            .unwrap();
    }
    for i in 0..images {
        s3.put(
            &format!("images/{i:03}.jpg"),
            Bytes::from_static(b"jpeg"),
            None,
        )
        .await
        .unwrap();
    }
    (moto, bucket)
}

async fn s3_source(
    app: &TestApp,
    project: i64,
    bucket: &str,
    endpoint: &str,
    prefix: &str,
    method: &str,
) -> Value {
    let (status, storage) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": "s3", "prefix": prefix,
                "import_method": method,
                "config": { "bucket": bucket, "endpoint_url": endpoint },
                "secrets": { "access_key_id": "test", "secret_access_key": "test" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{storage}");
    storage
}

/// Syncs the `bucket(files, images)` objects through `endpoint` as a Tasks
/// source and a Files source; both runs complete, with one task per (key,
/// row): files x 2 rows and the images, no duplicate.
async fn sync_every_object_once(
    app: &TestApp,
    project: i64,
    bucket: &str,
    endpoint: &str,
    files: usize,
    images: usize,
) {
    let tasks = s3_source(app, project, bucket, endpoint, "tasks/", "tasks").await;
    let run = app.sync(&tasks["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], files as i64 * 2, "{run}");
    let images_source = s3_source(app, project, bucket, endpoint, "images/", "files").await;
    let run = app.sync(&images_source["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], images as i64, "{run}");

    let all = app.all_tasks(project).await;
    assert_eq!(all.len(), files * 2 + images);
    assert_eq!(
        distinct_sources(&all),
        files * 2 + images,
        "one task per (key, row)"
    );
}

/// How many distinct (object key, row) the tasks come from.
fn distinct_sources(tasks: &[Value]) -> usize {
    let sources: std::collections::HashSet<(&str, i64)> = tasks
        .iter()
        .map(|t| {
            (
                t["source"]["key"].as_str().unwrap(),
                t["source"]["row_index"].as_i64().unwrap(),
            )
        })
        .collect();
    sources.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_storage_requests_are_retried_and_nothing_is_lost() {
    let (moto, bucket) = bucket(40, 30).await;
    let proxy = FaultProxy::start(&moto, Mode::Flaky { every: 4 }).await;
    let app = spawn_app(private_endpoints()).await;
    let project = app.project("flaky").await;

    // Every object once: 40 files x 2 rows, 30 images, no duplicate.
    sync_every_object_once(&app, project, &bucket, &proxy.url, 40, 30).await;
    let (requests, faults) = proxy.counts();
    assert!(
        faults >= 10,
        "the proxy injected faults: {faults} of {requests}"
    );
    app.stop().await;
}

/// A fan-out batch given up after its attempts says why: the last error
/// of the attempts before it (here the storage's 503s), as a run given up
/// does. The bad files are the first page's batch, and the listing goes on
/// only once one of them was read, so that batch's own job has begun
/// before the run waits for it (a run's job takes over only batches no job
/// has begun).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_given_up_names_its_last_error() {
    batch_given_up_names_its_last_error(&[]).await;
}

/// A batch its run's own job runs (here every one: the worker has one
/// slot, which that job holds while it waits) and that keeps failing is
/// given up as its queued job would give it up, not the run: the batch's
/// error failed the job's own attempt, and so the whole run ("gave up
/// after 1 attempts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_its_runs_job_runs_is_given_up_not_the_run() {
    batch_given_up_names_its_last_error(&[("LABELSYNC_WORKER_CONCURRENCY", "1")]).await;
}

async fn batch_given_up_names_its_last_error(env: &[(&'static str, &str)]) {
    let (moto, bucket, s3) = moto_bucket().await;
    for (name, count) in [("a-bad", 10), ("b-ok", 20)] {
        for i in 0..count {
            let body = Bytes::from(json!({ "text": format!("{name} {i}") }).to_string());
            let key = format!("tasks/{name}-{i:02}.json");
            s3.put(&key, body, None).await.unwrap();
        }
    }
    let proxy = FaultProxy::start(&moto, Mode::FailReadsUnder("tasks/a-bad-")).await;
    let mut options = private_endpoints();
    options.env.extend([
        ("LABELSYNC_PAGE_SIZE", "10".to_owned()),
        ("LABELSYNC_MAX_ATTEMPTS", "1".to_owned()),
    ]);
    options
        .env
        .extend(env.iter().map(|(name, value)| (*name, (*value).to_owned())));
    let app = spawn_app(options).await;
    let project = app.project("batch-give-up").await;
    let source = s3_source(&app, project, &bucket, &proxy.url, "tasks/", "tasks").await;
    let run = app.sync(&source["id"]).await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counters"]["created"], 20, "{run}");
    assert_eq!(run["counters"]["failed"], 10, "{run}");
    let (status, errors) = app
        .get(&format!(
            "/api/v1/runs/{}/errors",
            run["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200, "{errors}");
    let errors = errors["items"].as_array().expect("items");
    assert_eq!(errors.len(), 10, "{errors:?}");
    for error in errors {
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("gave up after 1 attempts; last error: "),
            "{error}"
        );
        assert!(message.contains("SlowDown"), "{error}");
    }
    app.stop().await;
}

/// Task files cut off mid-body after the part read before parsing starts
/// (the first 16 KiB; small files cut within it are the flaky test's):
/// a JSON array of about 90 KB (its rows kept back with other small
/// files' until it is read whole) and a JSONL of 8,000 rows whose first
/// 4,000-row chunk is committed before the cut. Each is read again and
/// every row is imported once; a small file beside them is read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_files_cut_off_mid_body_are_read_again_and_imported_once() {
    let (moto, bucket, s3) = moto_bucket().await;
    let row = |i: usize| json!({ "text": format!("row {i} {}", "x".repeat(80)) });
    let array = Value::Array((0..800).map(row).collect()).to_string();
    let lines = "{\"a\":1}\n".repeat(8000);
    let cut_after = 40 * 1024;
    // The cut leaves more than a 4,000-row chunk of the JSONL before it.
    assert!(array.len() > cut_after && cut_after / 8 > 4000 && lines.len() > cut_after);
    for (key, body) in [
        ("tasks/big.json", array),
        ("tasks/many.jsonl", lines),
        ("tasks/small.json", json!({ "text": "small" }).to_string()),
    ] {
        s3.put(key, Bytes::from(body), None).await.unwrap();
    }
    let proxy = FaultProxy::start(&moto, Mode::CutBodiesAfter(cut_after)).await;
    let app = spawn_app(private_endpoints()).await;
    let project = app.project("cut-off").await;

    let tasks = s3_source(&app, project, &bucket, &proxy.url, "tasks/", "tasks").await;
    let run = app.sync(&tasks["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let expected = 800 + 8000 + 1;
    assert_eq!(run["counters"]["created"], expected, "{run}");
    assert_eq!(run["counters"]["failed"], 0, "{run}");
    let all = app.all_tasks(project).await;
    assert_eq!(all.len(), expected as usize, "no task twice");
    assert_eq!(
        distinct_sources(&all),
        expected as usize,
        "one task per (key, row)"
    );
    let (_, faults) = proxy.counts();
    assert_eq!(faults, 2, "both large files were cut once");
    app.stop().await;
}

/// A storage server that stops answering without closing the connection
/// (before a response, or halfway through an object's body): each such
/// request gives up after `LABELSYNC_STORAGE_TIMEOUT_SECS` and is retried,
/// and both syncs complete with every object once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_storage_requests_time_out_and_are_retried() {
    let (moto, bucket) = bucket(30, 30).await;
    let proxy = FaultProxy::start(&moto, Mode::Hanging { every: 5 }).await;
    let mut opts = private_endpoints();
    opts.env
        .push(("LABELSYNC_STORAGE_TIMEOUT_SECS", "1".into()));
    let app = spawn_app(opts).await;
    let project = app.project("hanging").await;

    sync_every_object_once(&app, project, &bucket, &proxy.url, 30, 30).await;
    let (requests, faults) = proxy.counts();
    assert!(
        faults >= 6,
        "the proxy hung {faults} of {requests} requests"
    );
    app.stop().await;
}

/// `/resolve` through a storage that refuses: an admin reads the storage's
/// own words; a token held to the project gets the code and a message of
/// ours (the words can name the identity the credentials act as: an IAM
/// role's ARN and account; they were passed on as they came).
async fn resolve_refusals_are_told_by_their_code(
    app: &TestApp,
    project: i64,
    bucket: &str,
    endpoint: &str,
) {
    let body = json!({
        "project_id": project, "role": "source", "backend": "s3", "prefix": "refused/",
        "presign": false,
        "config": { "bucket": bucket, "endpoint_url": endpoint },
        "secrets": { "access_key_id": "test", "secret_access_key": "test" },
    });
    let (status, storage) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{storage}");
    let path = format!("/api/v1/resolve?project_id={project}&uri=s3://{bucket}/refused/0.jpg");
    // Before any token is made, the open mode's caller is unrestricted.
    let (status, admin) = app.get(&path).await;
    assert_eq!(
        (status, &admin["error"]["code"]),
        (403, &json!("permission_denied")),
        "{admin}"
    );
    assert!(
        admin["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("AccessDenied"),
        "{admin}"
    );
    let (status, token) = app
        .post(
            "/api/v1/tokens",
            json!({ "name": "tenant", "scope": "read", "projects": [project] }),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let resp = app
        .client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token["secret"].as_str().expect("secret"))
        .send()
        .await
        .expect("resolve");
    assert_eq!(resp.status().as_u16(), 403);
    let tenant: Value = resp.json().await.expect("an error body");
    assert_eq!(tenant["error"]["code"], "permission_denied", "{tenant}");
    let said = tenant["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !said.contains("AccessDenied") && !said.contains(bucket),
        "{tenant}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_storage_fails_the_run_without_pointless_retries() {
    let (moto, bucket) = bucket(0, 3).await;
    let proxy = FaultProxy::start(&moto, Mode::Forbidden).await;
    let app = spawn_app(private_endpoints()).await;
    let project = app.project("forbidden").await;
    let storage = s3_source(&app, project, &bucket, &proxy.url, "images/", "files").await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("AccessDenied"), "a clear error: {run}");
    assert_eq!(run["attempts"], 1, "a 403 is not retried: {run}");
    let (requests, _) = proxy.counts();
    assert_eq!(requests, 1, "one listing request, no retries");
    // validate says the same, with its code.
    let (status, body) = app
        .post(
            &format!("/api/v1/storages/{}/validate", storage["id"]),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("no_list_permission")),
        "{body}"
    );

    // A key that may read but not write: fine as a source, not as a target.
    let read_only = FaultProxy::start(&moto, Mode::ReadOnly).await;
    for (role, expected) in [("source", None), ("target", Some("no_write_permission"))] {
        let (status, body) = app
            .post(
                "/api/v1/storages/validate",
                json!({
                    "project_id": project, "role": role, "backend": "s3",
                    "config": { "bucket": bucket, "endpoint_url": read_only.url },
                    "secrets": { "access_key_id": "test", "secret_access_key": "test" },
                }),
            )
            .await;
        match expected {
            None => assert_eq!(status, 200, "{role}: {body}"),
            Some(code) => assert_eq!(
                (status, body["error"]["code"].as_str()),
                (422, Some(code)),
                "{role}: {body}"
            ),
        }
    }
    // Last: the token it makes closes the open mode the requests above use.
    resolve_refusals_are_told_by_their_code(&app, project, &bucket, &proxy.url).await;
    app.stop().await;
}

/// A Redis server of this test's own, so it can be stopped and started.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.up();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is needed (tests/run.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// A Redis storage whose server restarted connects again at its next
/// command, instead of failing every command on the dead connection until
/// the worker opens the storage again (the client never reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_storage_connects_again_after_its_server_restarts() {
    let mut redis = OwnRedis::start();
    let config = json!({ "host": "127.0.0.1", "port": redis.port, "path": "restart:" });
    let storage = open(BackendKind::Redis, config, json!({})).await;
    storage
        .put("k", Bytes::from_static(b"before"), None)
        .await
        .unwrap();
    redis.down();
    redis.up();
    let put = storage.put("k", Bytes::from_static(b"after"), None).await;
    put.expect("a put after the restart");
    let read = labelsync_tests::backends::read_object(&*storage, "k").await;
    assert_eq!(read.expect("a read after the restart"), b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_the_run_completes_and_readyz_recovers() {
    let mut redis = OwnRedis::start();
    let app = spawn_app(AppOptions {
        env: vec![("REDIS_URL", redis.url())],
        ..AppOptions::default()
    })
    .await;
    labelsync_tests::write_files(&app.doc_root.path().join("data"), 20_000, "jpg");
    let project = app.project("redis restart").await;
    let storage = app.local_storage(project, json!({})).await;
    // Once the run is under way, take Redis away.
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    redis.down();
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(
        (status, ready["queue"].as_bool()),
        (503, Some(false)),
        "{ready}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.up();

    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 20_000, "{run}");
    assert_eq!(
        app.all_tasks(project).await.len(),
        20_000,
        "no duplicate, none missing"
    );
    let mut ok = false;
    for _ in 0..100 {
        let (status, _) = app.get("/readyz").await;
        if status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "/readyz recovers once Redis is back");
    app.stop().await;
}

/// A Redis that forgets its jobs (restarted with no persistence, failed
/// over to an empty replica, flushed) held the only copy of the queued
/// runs' jobs: the scheduler notices at its next tick (a key of its own is
/// gone, and so is every job) and pushes them again at once, rather than
/// after `LABELSYNC_REQUEUE_AFTER_SECS` (120 s by default). A Redis that
/// only lacks the key (this version's first start on a Redis in use) gets
/// no second copy of the jobs it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_runs_are_pushed_again_when_redis_forgets_its_jobs() {
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::default()
    })
    .await;
    labelsync_tests::write_files(&app.doc_root.path().join("data"), 10, "jpg");
    let project = app.project("forgotten").await;
    let storage = app.local_storage(project, json!({})).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let namespace = &app.vars["LABELSYNC_QUEUE_NAMESPACE"];
    let tick = Duration::from_secs(1); // several of the tests' 200 ms ticks
    forget_keys(&format!("{namespace}:memory")).await;
    tokio::time::sleep(tick).await;
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["pending"], 1, "no second copy: {queues}");

    forget_keys(&format!("*{namespace}*")).await;
    let _worker = labelsync_tests::spawn_ready_worker(&app, "after-the-loss", &[]).await;
    let run = app.wait_run(&run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 10, "{run}");
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["dead"], 0, "{queues}");
    app.stop().await;
}

/// More queued runs than one tick pushes (1,000) when Redis forgets its
/// jobs: every one is pushed again within a few ticks, each once, rather
/// than the rest after `LABELSYNC_REQUEUE_AFTER_SECS` (120 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_queued_runs_than_a_tick_pushes_are_all_pushed_again_when_redis_forgets() {
    use futures::StreamExt;
    const RUNS: u64 = 1_050;
    let owned = spawn_app(AppOptions {
        workers: false,
        env: vec![("LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT", "0".into())],
        ..AppOptions::default()
    })
    .await;
    let app = &owned;
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("mkdir");
    let project = app.project("many forgotten").await;
    futures::stream::iter(0..RUNS)
        .for_each_concurrent(8, |i| async move {
            let title = json!({ "title": format!("storage {i}") });
            let storage = app.local_storage(project, title).await;
            app.start_sync(&storage["id"]).await;
        })
        .await;
    let pending = || async {
        let (_, queues) = app.get("/api/v1/queues").await;
        queues["items"][0]["pending"].as_u64().expect("pending")
    };
    assert_eq!(pending().await, RUNS);

    forget_keys(&format!("*{}*", app.vars["LABELSYNC_QUEUE_NAMESPACE"])).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending().await < RUNS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {RUNS} runs back in the queue after 10 s",
            pending().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // several ticks more
    assert_eq!(pending().await, RUNS, "each run pushed once");
    owned.stop().await;
}

/// The runs that were running when Redis forgot its jobs: their workers
/// exit (a worker whose Redis goes away does) and Redis holds no copy of
/// their jobs to hand out again, so for a while after it forgot, the
/// scheduler pushes a running run again as soon as its lease is stale,
/// not after `LABELSYNC_REQUEUE_AFTER_SECS` (120 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_runs_resume_soon_after_redis_forgets_its_jobs() {
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::default()
    })
    .await;
    labelsync_tests::write_files(&app.doc_root.path().join("data"), 20_000, "jpg");
    let project = app.project("forgotten while running").await;
    let storage = app.local_storage(project, json!({})).await;
    let mut first = labelsync_tests::spawn_ready_worker(&app, "before-the-loss", &[]).await;
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    forget_keys(&format!("*{}*", app.vars["LABELSYNC_QUEUE_NAMESPACE"])).await;
    first.kill();
    let _second = labelsync_tests::spawn_ready_worker(&app, "after-the-loss", &[]).await;
    let run = app.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 20_000, "{run}");
    let (_, queues) = app.get("/api/v1/queues").await;
    assert_eq!(queues["items"][0]["dead"], 0, "{queues}");
    app.stop().await;
}

/// Deletes the Redis keys matching `pattern` (there must be some), as a
/// Redis that lost its data would have none.
async fn forget_keys(pattern: &str) {
    let mut conn = labelsync_tests::redis_connection().await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        keys.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert!(!keys.is_empty(), "no key matches {pattern}");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}

/// A worker process whose Redis goes away exits non-zero within a heartbeat
/// or two, so its orchestrator restarts it (rather than a worker that looks
/// alive and takes no jobs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_redis_dies_exits_non_zero() {
    let mut redis = OwnRedis::start();
    let app = spawn_app(AppOptions {
        workers: false,
        env: vec![("REDIS_URL", redis.url())],
        ..AppOptions::default()
    })
    .await;
    // The app's settings hold this test's Redis, namespace and 1 s heartbeat.
    let mut worker = labelsync_tests::spawn_worker(&app, "redis-victim", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker runs while Redis is up"
    );
    redis.down();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            panic!("the worker kept running for 60 s without Redis");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "exits non-zero: {status:?}");
    app.stop().await;
}

/// A Postgres server of this test's own (initdb into a temp dir), so it can
/// be stopped the hard way and started again while a sync runs.
struct OwnPostgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl OwnPostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                dirs.filter_map(|d| d.ok().map(|d| d.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect("PostgreSQL's server binaries are needed in /usr/lib/postgresql/*/bin (tests/run.sh installs them)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres {
            port,
            dir: tempfile::tempdir().unwrap(),
            bin,
        };
        if is_root() {
            // The server refuses to run as root: hand it the folder.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the data folder to postgres");
        }
        let data = pg.data();
        pg.pg(
            "initdb",
            &["-A", "trust", "-U", "postgres", "--no-sync", "-D", &data],
        );
        pg.up();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one of the server's programs (as `postgres` when we are root).
    fn pg(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn up(&self) {
        let (data, port) = (self.data(), self.port.to_string());
        let socket_dir = self.dir.path().display().to_string();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {socket_dir} -c fsync=off -c max_connections=100"
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
    }

    /// An immediate shutdown: every backend is killed at once and the next
    /// start runs crash recovery, as after a power cut.
    fn crash(&self) {
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let path = self.bin.join("pg_ctl");
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The Postgres server itself crashes mid-sync and comes back after a few
/// seconds: `/readyz` says the database is down meanwhile, the attempt that
/// lost its connections is retried from the last committed page, and the run
/// completes with every object exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_the_run_completes() {
    const FILES: usize = 20_000;
    let postgres = OwnPostgres::start();
    let app = spawn_app(AppOptions {
        postgres_admin: Some(postgres.admin_url()),
        ..AppOptions::default()
    })
    .await;
    labelsync_tests::write_files(&app.doc_root.path().join("data"), FILES, "jpg");
    let project = app.project("pg restart").await;
    let storage = app.local_storage(project, json!({})).await;
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    postgres.crash();
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(
        (status, ready["database"].as_bool()),
        (503, Some(false)),
        "{ready}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    postgres.up();

    let run = app
        .wait_run_through_outage(&run_id, Duration::from_secs(180))
        .await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], FILES as i64, "{run}");
    assert_eq!(
        app.all_tasks(project).await.len(),
        FILES,
        "every object once"
    );
    let mut ready = false;
    for _ in 0..100 {
        if app.get("/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz recovers once Postgres is back");
    app.stop().await;
}

/// A database that loses commits it had acknowledged (a crash with
/// `synchronous_commit` off, a failover to a replica behind) takes the
/// run's cursor back under a running attempt, which must not go on from
/// where it was: the pages lost would never be listed again (a Postgres
/// crash under the suite's asynchronous commits left 744 of 20,000 objects
/// out once). Emulated by taking back the last pages' tasks and the cursor
/// while a Files-mode sync runs: the run still ends with every object once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_taken_back_under_a_running_attempt_loses_no_object() {
    use sea_orm::ConnectionTrait;
    const FILES: usize = 3_000;
    let app = spawn_app(AppOptions::without_workers()).await;
    let (project, storage) = app.numbered_files_source("taken back", FILES).await;
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    // Pages of 100 (the spawned worker's), each checkpoint slowed: the sync
    // takes a few seconds.
    app.slow_run_updates(0.1).await;
    let _worker = labelsync_tests::spawn_ready_worker(&app, "taken-back", &[]).await;
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, run) = app.get(&format!("/api/v1/runs/{run_id}")).await;
        if run["counters"]["created"].as_i64().unwrap_or(0) >= 500 {
            assert_eq!(run["status"], "running", "the sync ended too soon: {run}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.execute_unprepared(&format!(
        "BEGIN; \
         WITH gone AS (DELETE FROM import_links WHERE object_key > 'obj-00199.jpg' RETURNING task_id) \
         DELETE FROM tasks WHERE id IN (SELECT task_id FROM gone); \
         UPDATE sync_runs SET cursor = 'obj-00199.jpg' WHERE id = '{run_id}'; COMMIT;"
    ))
    .await
    .expect("take back");
    let partitions = format!("SELECT count(*) AS n FROM sync_partitions WHERE run_id = '{run_id}'");
    assert_eq!(app.count(&partitions).await, 0, "listed in partitions");
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        app.all_tasks(project).await.len(),
        FILES,
        "every object once"
    );
    app.stop().await;
}

/// The end of a listing is committed only where its last page left the
/// run's cursor: a database that lost that page's commit (see above) had
/// the run completed without the page's objects, and `on_missing` could
/// then take objects that page had seen for gone. The attempt fails
/// instead, and the next one lists the page again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_whose_last_page_was_lost_lists_it_again() {
    const FILES: usize = 1_000;
    let app = spawn_app(AppOptions::without_workers()).await;
    let (project, storage) = app.numbered_files_source("last page lost", FILES).await;
    // Pages of 100 (the spawned worker's): the last one moves the cursor
    // to the last key.
    app.lose_a_page_once("sync_runs", "obj-00999.jpg").await;
    let _worker = labelsync_tests::spawn_ready_worker(&app, "last-page", &[]).await;
    let run = app.sync(&storage["id"]).await;
    assert!(app.page_was_lost().await, "the page was not lost");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["attempts"], 2, "the first attempt failed: {run}");
    assert_eq!(
        app.all_tasks(project).await.len(),
        FILES,
        "every object once"
    );
    app.stop().await;
}

/// A run's end commits with its listing's end, or neither does: the final
/// status failing once (a serialization failure, here from a trigger)
/// left the listing's end committed apart, and the next attempt applied
/// `on_missing` again: the missing object was counted twice (`keep`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_end_failed_once_counts_its_missing_objects_once() {
    use sea_orm::ConnectionTrait;
    let app = spawn_app(AppOptions::without_workers()).await;
    let (_, storage) = app.numbered_files_source("an end failed", 3).await;
    let path = format!("/api/v1/storages/{}", storage["id"]);
    let (status, patched) = app.patch(&path, json!({ "on_missing": "keep" })).await;
    assert_eq!(status, 200, "{patched}");
    let _worker = labelsync_tests::spawn_ready_worker(&app, "ends", &[]).await;
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    std::fs::remove_file(app.doc_root.path().join("data/obj-00001.jpg")).unwrap();
    // A sequence counts outside transactions: the first end fails, the
    // next passes.
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    db.execute_unprepared(
        "CREATE SEQUENCE ends_seen; \
         CREATE FUNCTION fail_an_end() RETURNS trigger AS $$ \
         BEGIN \
           IF OLD.status = 'running' AND NEW.status = 'completed' \
              AND nextval('ends_seen') = 1 THEN \
             RAISE EXCEPTION 'an end fails once' USING ERRCODE = '40001'; \
           END IF; \
           RETURN NEW; \
         END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER fail_an_end BEFORE UPDATE ON sync_runs \
         FOR EACH ROW EXECUTE FUNCTION fail_an_end();",
    )
    .await
    .expect("trigger");
    let run = app.sync(&storage["id"]).await;
    let seen = app.count("SELECT last_value AS n FROM ends_seen").await;
    assert_eq!(seen, 2, "one end failed, the next passed: {run}");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["missing"], 1, "{run}");
    app.stop().await;
}

/// While the database is down, an API request is a quick `503 unavailable`
/// with `Retry-After`: sqlx tries to connect again until its pool's acquire
/// timeout while the server refuses connections, and every request hung
/// for those 30 s. The API answers again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_request_while_the_database_is_down_is_a_quick_503() {
    use sea_orm::ConnectionTrait;
    let postgres = OwnPostgres::start();
    let app = spawn_app(AppOptions {
        postgres_admin: Some(postgres.admin_url()),
        ..AppOptions::without_workers()
    })
    .await;
    let project = app.project("outage").await;
    // Test databases commit without waiting for the WAL: flushed, the
    // project outlives the crash.
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    db.execute_unprepared("CHECKPOINT")
        .await
        .expect("checkpoint");
    drop(db);
    postgres.crash();
    let asked = std::time::Instant::now();
    let response = app
        .client
        .get(format!("{}/api/v1/projects/{project}", app.base))
        .send()
        .await
        .expect("an answer");
    let waited = asked.elapsed();
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = (response.status(), response.text().await.expect("body"));
    postgres.up();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"unavailable\""), "{body}");
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"5"[..]));
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    let mut back = 0;
    for _ in 0..100 {
        back = app.get(&format!("/api/v1/projects/{project}")).await.0;
        if back == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back, 200, "the API answers once Postgres is back");
    app.stop().await;
}

/// A request that names its project in its body, whose read of that
/// project fails for the database's sake, is `503 unavailable`, not told
/// that the project is unknown (`api::projects::find_named`): the read is
/// held on a lock and its backend terminated (SQLSTATE 57P01).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_read_the_database_fails_is_not_an_unknown_project() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = spawn_app(AppOptions::without_workers()).await;
    let project = app.project("locked").await;
    let db = sea_orm::Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    let lock = db.begin().await.expect("a transaction");
    lock.execute_unprepared("LOCK TABLE projects IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let storage = json!({
        "project_id": project, "role": "source", "backend": "local",
        "config": { "path": "data" },
    });
    let request = tokio::spawn({
        let (client, base) = (app.client.clone(), app.base.clone());
        async move {
            let response = client
                .post(format!("{base}/api/v1/storages"))
                .json(&storage)
                .send()
                .await
                .expect("an answer");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("a JSON body"))
        }
    });
    let terminate = "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
         AND query ILIKE '%FROM \"projects\"%'";
    let mut terminated = 0;
    for _ in 0..200 {
        terminated = app.count(terminate).await;
        if terminated > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("answered")
        .expect("the request");
    lock.rollback().await.expect("unlock");
    assert_eq!(terminated, 1, "the project's read waited on the lock");
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    app.stop().await;
}

/// A planted secret never shows: not in API responses, not in the server's
/// debug logs, not in run errors, not in the database file; nor does an API
/// token's secret once the answer that created it is read (used, audited,
/// revoked and refused meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_secret_appears_in_no_response_log_or_row() {
    const PLANTED: &str = "PLANTED-s3cr3t-9f8e7d";
    let dir = tempfile::tempdir().unwrap();
    let (mut server, base) = debug_logging_server(dir.path()).await;
    let mut api = RecordingClient {
        client: reqwest::Client::new(),
        base,
        seen: String::new(),
        bearer: None,
    };
    let id = planted_storage(&mut api, PLANTED).await;
    planted_webhook(&mut api, PLANTED_WEBHOOK).await;
    let run = sync_to_its_end(&mut api, &id).await;
    assert_eq!(
        run["status"], "failed",
        "the wrong key fails the sync: {run}"
    );
    let run_id = run["id"].as_str().unwrap();
    api.call(
        reqwest::Method::GET,
        &format!("/api/v1/runs/{run_id}/errors"),
        Value::Null,
    )
    .await;
    let token = token_used_and_revoked(&mut api).await;
    let _ = server.kill();
    let _ = server.wait();

    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("DEBUG"), "debug logging was on");
    for secret in [PLANTED, PLANTED_WEBHOOK, token.as_str()] {
        assert!(!api.seen.contains(secret), "a response carried {secret}");
        assert!(!log.contains(secret), "the log carried {secret}");
        assert_database_files_lack(dir.path(), secret);
    }
}

/// A webhook signing secret (the key part of `whsec_...`: base64 of
/// "PLANTED-webhook-key-0123456789").
const PLANTED_WEBHOOK: &str = "UExBTlRFRC13ZWJob29rLWtleS0wMTIzNDU2Nzg5";

/// Creates a webhook with `whsec_<planted>`, reads it, rotates to the same
/// secret, sends a test event (to a closed port) and reads the delivery log.
async fn planted_webhook(api: &mut RecordingClient, planted: &str) {
    use reqwest::Method;
    let secret = format!("whsec_{planted}");
    let body = json!({ "url": "http://127.0.0.1:9/hook", "events": ["*"], "secret": secret });
    let before = api.seen.len();
    let hook = api.call(Method::POST, "/api/v1/webhooks", body).await;
    assert_eq!(hook["secret"], secret, "{hook}");
    // The answer to the create shows the secret, once, by design: only that
    // answer is left out of what is searched.
    api.seen.truncate(before);
    let path = format!("/api/v1/webhooks/{}", hook["id"]);
    api.call(Method::GET, &path, Value::Null).await;
    api.call(Method::PATCH, &path, json!({ "secret": secret }))
        .await;
    let sent = api
        .call(Method::POST, &format!("{path}/test"), json!({}))
        .await;
    assert_eq!(
        sent["status"], "failed",
        "nothing listens on port 9: {sent}"
    );
    api.call(Method::GET, &format!("{path}/deliveries"), Value::Null)
        .await;
}

/// Creates an API token (the open server's caller is admin), then, with
/// it: lists tokens, reads the audit trail (which holds its requests),
/// creates a project, revokes itself and is refused. Returns its secret,
/// which after the create's answer must show nowhere.
async fn token_used_and_revoked(api: &mut RecordingClient) -> String {
    use reqwest::Method;
    let before = api.seen.len();
    let body = json!({ "name": "planted", "scope": "admin" });
    let token = api.call(Method::POST, "/api/v1/tokens", body).await;
    let secret = token["secret"].as_str().expect("secret").to_owned();
    // The create's answer shows the secret once, by design.
    api.seen.truncate(before);
    api.bearer = Some(secret.clone());
    api.call(Method::GET, "/api/v1/tokens", Value::Null).await;
    api.call(
        Method::POST,
        "/api/v1/projects",
        json!({ "title": "by token" }),
    )
    .await;
    let audit = api.call(Method::GET, "/api/v1/audit", Value::Null).await;
    assert!(
        audit["items"]
            .as_array()
            .is_some_and(|rows| rows.len() >= 2),
        "{audit}"
    );
    let path = format!("/api/v1/tokens/{}", token["id"]);
    api.call(Method::DELETE, &path, Value::Null).await;
    let refused = api.call(Method::GET, "/api/v1/tokens", Value::Null).await;
    assert_eq!(refused["error"]["code"], "unauthorized", "{refused}");
    secret
}

/// A bootstrap token short enough to guess is named at start, by its place
/// in the list and never by its text; a long one is not (nothing said so).
/// So is a secret key that is a placeholder (the compose file's default of
/// 32 zero bytes): nothing said so, and secrets were sealed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessable_bootstrap_token_is_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let long = "k".repeat(40);
    let zeros = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (mut server, _) = logging_server(
        dir.path(),
        &[
            ("LABELSYNC_API_TOKENS", &format!("{long},hunter2")),
            ("LABELSYNC_SECRET_KEY", zeros),
        ],
    )
    .await;
    server.kill().unwrap();
    server.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let warned: Vec<String> = log
        .lines()
        .filter(|l| l.contains("shorter than 32"))
        .map(without_colours)
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("place=2"), "{}", warned[0]);
    assert!(!log.contains("hunter2") && !log.contains(&long), "{log}");
    let placeholder = "LABELSYNC_SECRET_KEY is a placeholder";
    assert_eq!(log.matches(placeholder).count(), 1, "{log}");
    assert!(!log.contains(zeros), "{log}");
}

/// A log line without its terminal colour codes (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

/// `labelsync-scheduler serve` in `dir` (SQLite there), logging at debug
/// level to `dir/server.log`; returns it and its base URL once it answers.
async fn debug_logging_server(dir: &std::path::Path) -> (Child, String) {
    logging_server(dir, &[]).await
}

/// [`debug_logging_server`] with `env` besides.
async fn logging_server(dir: &std::path::Path, env: &[(&str, &str)]) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let server = Command::new(labelsync_tests::binary("labelsync-scheduler"))
        .arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LABELSYNC_BIND", format!("127.0.0.1:{port}"))
        .env("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS", "true")
        .env("LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS", "true")
        .env("LABELSYNC_SECRET_KEY", labelsync_tests::TEST_SECRET_KEY)
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base)
}

/// An API client that keeps every response body it read, to search them.
struct RecordingClient {
    client: reqwest::Client,
    base: String,
    seen: String,
    bearer: Option<String>,
}

impl RecordingClient {
    async fn call(&mut self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(&body);
        if let Some(bearer) = &self.bearer {
            req = req.bearer_auth(bearer);
        }
        let resp = req.send().await.unwrap();
        let text = resp.text().await.unwrap();
        self.seen.push_str(&text);
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

/// Validates, creates, reads and renames an S3 storage whose secret key is
/// `planted` (a wrong one); returns its id.
async fn planted_storage(api: &mut RecordingClient, planted: &str) -> Value {
    use reqwest::Method;
    let project = api
        .call(
            Method::POST,
            "/api/v1/projects",
            json!({ "title": "p", "data_key": "image" }),
        )
        .await;
    let body = json!({
        "project_id": project["id"], "role": "source", "backend": "s3",
        "config": { "bucket": bucket_name(), "endpoint_url": endpoint("TEST_S3S_ENDPOINT") },
        "secrets": { "access_key_id": "labelsync-test", "secret_access_key": planted },
    });
    let validated = api
        .call(Method::POST, "/api/v1/storages/validate", body.clone())
        .await;
    assert_eq!(validated["error"]["code"], "bad_credentials", "{validated}");
    let storage = api.call(Method::POST, "/api/v1/storages", body).await;
    let id = storage["id"].clone();
    assert_eq!(
        storage["secrets_set"],
        json!(["access_key_id", "secret_access_key"]),
        "{storage}"
    );
    api.call(Method::GET, &format!("/api/v1/storages/{id}"), Value::Null)
        .await;
    api.call(
        Method::PATCH,
        &format!("/api/v1/storages/{id}"),
        json!({ "title": "renamed" }),
    )
    .await;
    id
}

/// Starts a sync of storage `id` and polls its run until it ends (20 s at most).
async fn sync_to_its_end(api: &mut RecordingClient, id: &Value) -> Value {
    let path = format!("/api/v1/storages/{id}/sync");
    let started = api.call(reqwest::Method::POST, &path, json!({})).await;
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let mut run = Value::Null;
    for _ in 0..200 {
        run = api
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/runs/{run_id}"),
                Value::Null,
            )
            .await;
        if run["status"] != "queued" && run["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run
}

/// The SQLite file and its write-ahead log (recent writes live there) do not
/// hold `secret` in clear; at least one of them exists.
fn assert_database_files_lack(dir: &std::path::Path, secret: &str) {
    let mut files = 0;
    for name in ["labelsync.db", "labelsync.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            files += 1;
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{name} holds the secret in clear");
        }
    }
    assert!(files > 0, "the database file exists");
}

/// Postgres connections killed under a running sync (three times): the
/// attempts fail transiently, the job retries, the run completes with every
/// object once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_mid_run_the_run_completes() {
    use sea_orm::{ConnectionTrait, Database};
    const FILES: usize = 20_000;
    let app = spawn_app(AppOptions::default()).await;
    labelsync_tests::write_files(&app.doc_root.path().join("data"), FILES, "jpg");
    let project = app.project("pg kill").await;
    let storage = app.local_storage(project, json!({})).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    let admin = Database::connect(labelsync_tests::postgres_admin_url())
        .await
        .unwrap();
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let killed = admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{database}' AND pid <> pg_backend_pid()"
            ))
            .await
            .unwrap();
        kills += killed.rows_affected();
    }
    assert!(kills > 0, "connections were killed");
    let run = app
        .wait_run_through_outage(&run_id, Duration::from_secs(180))
        .await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], FILES as i64, "{run}");
    assert_eq!(
        app.all_tasks(project).await.len(),
        FILES,
        "every object once"
    );
    app.stop().await;
}

/// An annotation deleted while its export upload is in flight: the page's
/// commit drops its link instead of failing on the foreign key, the run
/// completes, and the delete event removes the uploaded object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotation_deleted_mid_upload_does_not_fail_the_export() {
    let (moto, bucket) = bucket(0, 0).await;
    let proxy = FaultProxy::start(&moto, Mode::SlowWrites(Duration::from_millis(1500))).await;
    let app = spawn_app(private_endpoints()).await;
    let (project, task) = a_task(&app).await;
    let annotation = annotate(&app, &task).await;
    let id = annotation["id"].clone();
    let target = a_target_through(&app, project, &proxy, &bucket).await;
    let run_id = app.start_sync(&target["id"]).await;
    // The upload waits in the proxy; delete the annotation meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = app.delete(&format!("/api/v1/annotations/{id}")).await;
    assert_eq!(status, 204);
    let run = app.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    // The delete event (drained by this run or the next) removes the object.
    let s3 = open(
        BackendKind::S3,
        json!({ "bucket": bucket, "endpoint_url": moto }),
        json!({ "access_key_id": "test", "secret_access_key": "test" }),
    )
    .await;
    let key = format!("out/{id}.json");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s3.get(&key, None).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} was not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// An export attempt whose lease another attempt took (it stalled past the
/// lease: here the lease is taken in the database) stops uploading within
/// a heartbeat: its uploads went on to the end of their page beside the
/// new attempt's, and an older body could land after a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_attempt_whose_lease_was_taken_stops_uploading() {
    use sea_orm::{ConnectionTrait, Database};
    const ANNOTATIONS: u64 = 120;
    let (moto, bucket) = bucket(0, 0).await;
    let proxy = FaultProxy::start(&moto, Mode::SlowWrites(Duration::from_millis(150))).await;
    let mut options = private_endpoints();
    options.env.push(("LABELSYNC_HEARTBEAT_SECS", "1".into()));
    options
        .env
        .push(("LABELSYNC_EXPORT_CONCURRENCY", "1".into()));
    let app = spawn_app(options).await;
    let (project, task) = a_task(&app).await;
    for _ in 0..ANNOTATIONS {
        annotate(&app, &task).await;
    }
    let target = a_target_through(&app, project, &proxy, &bucket).await;
    let run_id = app.start_sync(&target["id"]).await;
    labelsync_tests::eventually("the first uploads", || async { proxy.counts().0 >= 5 }).await;
    let db = Database::connect(&app.database_url).await.expect("db");
    db.execute_unprepared(&format!(
        // Renewed an hour ahead: no new attempt takes the run from the fake
        // owner while the old one is watched.
        "UPDATE sync_runs SET lease_owner = 'another attempt', \
         lease_at = now() + interval '1 hour' WHERE id = '{run_id}'"
    ))
    .await
    .expect("take the lease");
    // Within a heartbeat (1 s, and its query) the attempt stops: uploads
    // pause for 1.5 s within 10 s of the takeover, and none comes in the 3 s
    // after (before, one came every 150 ms to the end of the page).
    let mut stopped = proxy.counts().0;
    let mut quiet_since = tokio::time::Instant::now();
    let give_up = quiet_since + Duration::from_secs(10);
    while quiet_since.elapsed() < Duration::from_millis(1500) {
        assert!(tokio::time::Instant::now() < give_up, "uploads went on");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = proxy.counts().0;
        if now != stopped {
            (stopped, quiet_since) = (now, tokio::time::Instant::now());
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = proxy.counts().0 - stopped;
    assert_eq!(later, 0, "{later} uploads after a pause of 1.5 s");
    assert!(stopped < ANNOTATIONS, "the page was not done already");
    app.stop().await;
}

/// An export started after a cancel waits until the cancelled attempt
/// lets go of its run: that attempt went on uploading until its next
/// heartbeat, beside the next run's uploads, and an older body it had in
/// flight could land after the newer one (whose link then said the object
/// was up to date, so nothing wrote it again). Here the cancelled
/// attempt's first upload is held in the proxy while the annotation
/// changes and the next export runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_after_a_cancel_waits_for_the_cancelled_uploads() {
    let (moto, bucket, s3) = moto_bucket().await;
    let proxy = FaultProxy::start(&moto, Mode::HeldFirstWrite).await;
    let mut options = private_endpoints();
    // The cancelled attempt notices at its heartbeat: long after the next
    // run's end, which takes a second or two.
    options.env.push(("LABELSYNC_HEARTBEAT_SECS", "20".into()));
    let app = spawn_app(options).await;
    let (project, task) = a_task(&app).await;
    let target = a_target_through(&app, project, &proxy, &bucket).await;
    let annotation = annotate(&app, &task).await;
    labelsync_tests::eventually("the first body held", || async {
        proxy.held_writes().0 == 1
    })
    .await;
    let id = &annotation["id"];
    let newer = json!({ "result": [{ "type": "choices", "value": { "choices": ["newer"] } }] });
    let (status, body) = app.patch(&format!("/api/v1/annotations/{id}"), newer).await;
    assert_eq!(status, 200, "{body}");
    let (_, runs) = app
        .get(&format!("/api/v1/runs?storage_id={}", target["id"]))
        .await;
    let held = runs["items"].as_array().expect("items").iter();
    let held = held
        .filter(|r| r["status"] == "running")
        .collect::<Vec<_>>();
    assert_eq!(held.len(), 1, "{runs}");
    let held = held[0]["id"].clone();
    let (status, body) = app
        .post(
            &format!("/api/v1/runs/{}/cancel", held.as_str().expect("id")),
            json!({}),
        )
        .await;
    assert_eq!(body["status"], "cancelled", "{status} {body}");
    let next = app.start_sync(&target["id"]).await;
    assert_ne!(json!(next), held);
    let run = app.wait_run(&next, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    // Let the held body go, if its attempt still waits for it: it went
    // away before the next run began.
    proxy.release_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.held_writes(), (1, 0), "held, and never forwarded");
    let key = format!("out/{id}.json");
    let doc = labelsync_tests::backends::read_object(&*s3, &key)
        .await
        .expect("exported");
    let doc: Value = serde_json::from_slice(&doc).expect("json");
    assert_eq!(
        doc["result"][0]["value"]["choices"][0],
        "newer",
        "the older body landed last (held writes, forwarded: {:?})",
        proxy.held_writes()
    );
    app.stop().await;
}

/// A project with one task, imported from a local file: (project, task).
async fn a_task(app: &TestApp) -> (i64, Value) {
    let project = app.project("race").await;
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("t.json"), r#"{"text": "hello"}"#).unwrap();
    let source = app
        .local_storage(project, json!({ "import_method": "tasks" }))
        .await;
    assert_eq!(app.sync(&source["id"]).await["status"], "completed");
    let task = app.all_tasks(project).await[0]["id"].clone();
    (project, task)
}

/// A new empty annotation of `task`.
async fn annotate(app: &TestApp, task: &Value) -> Value {
    let (status, annotation) = app
        .post(
            &format!("/api/v1/tasks/{task}/annotations"),
            json!({ "result": [] }),
        )
        .await;
    assert_eq!(status, 201, "{annotation}");
    annotation
}

/// An S3 target of `project` on `bucket` through `proxy`, prefix `out`,
/// that deletes the objects of deleted annotations.
async fn a_target_through(app: &TestApp, project: i64, proxy: &FaultProxy, bucket: &str) -> Value {
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": "s3", "prefix": "out",
                "can_delete_objects": true,
                "config": { "bucket": bucket, "endpoint_url": proxy.url },
                "secrets": { "access_key_id": "test", "secret_access_key": "test" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{target}");
    target
}

/// An annotation saved while its target refuses writes (503, past the
/// client's retries) reaches it once the target is back: its event stays
/// and the run's attempt is retried. Before, the event went with its page
/// as a failed object, and only a full export sent the annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotation_saved_while_the_target_is_down_reaches_it() {
    let (moto, bucket, s3) = moto_bucket().await;
    let proxy = FaultProxy::start(&moto, Mode::WritesDownFor(8)).await;
    let app = spawn_app(private_endpoints()).await;
    let (project, task) = a_task(&app).await;
    a_target_through(&app, project, &proxy, &bucket).await;
    let annotation = annotate(&app, &task).await;
    let key = format!("out/{}.json", annotation["id"]);
    labelsync_tests::eventually("the annotation in the target", || async {
        s3.get(&key, None).await.is_ok()
    })
    .await;
    assert!(proxy.counts().1 >= 8, "the writes were refused first");
    app.stop().await;
}

/// A storage whose last events run failed gets no new one from the
/// scheduler's tick for five minutes: a target that fails every run at
/// once (its secrets do not open) failed one a tick for as long as its
/// events waited. (The run's failure is written here, a second and then
/// six minutes ago, on a target that works.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_of_a_failing_target_wait_before_the_next_run() {
    use labelsync::db::{entities::sync_run, outbox};
    use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, Set};
    let (moto, bucket) = bucket(0, 0).await;
    let proxy = FaultProxy::start(&moto, Mode::WritesDownFor(0)).await;
    let app = spawn_app(private_endpoints()).await;
    let (project, task) = a_task(&app).await;
    let target = a_target_through(&app, project, &proxy, &bucket).await;
    let annotation = annotate(&app, &task).await;
    let db = labelsync::db::connect(&app.database_url).await.expect("db");
    let target_id = target["id"].as_i64().expect("id");
    let runs = || {
        sync_run::Entity::find()
            .filter(sync_run::Column::StorageId.eq(target_id))
            .all(&db)
    };
    labelsync_tests::eventually("the save's events run to end", || async {
        runs()
            .await
            .expect("runs")
            .iter()
            .all(|r| r.finished_at.is_some())
    })
    .await;
    let first = runs().await.expect("runs").remove(0);
    let fail_at = |ago: chrono::Duration| {
        let mut failed = first.clone().into_active_model();
        failed.status = Set("failed".into());
        failed.finished_at = Set(Some(chrono::Utc::now() - ago));
        failed.update(&db)
    };
    fail_at(chrono::Duration::zero())
        .await
        .expect("fail the run");
    let annotation_id = annotation["id"].as_i64().expect("id");
    outbox::record(&db, project, annotation_id, outbox::UPSERT)
        .await
        .expect("an event waits");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs().await.expect("runs").len(), 1, "paused: no new run");
    fail_at(chrono::Duration::minutes(6))
        .await
        .expect("fail the run");
    labelsync_tests::eventually("a new events run", || async {
        runs().await.expect("runs").len() == 2
    })
    .await;
    app.stop().await;
}

/// Issue 14 (1): a run whose attempts kill their worker (an abort, an OOM
/// kill: here SIGKILL as soon as an attempt starts) is counted before each
/// attempt runs, so after `LABELSYNC_MAX_ATTEMPTS` such deaths it fails
/// instead of being handed to one worker after another; the next worker is
/// healthy and other runs complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_kills_its_workers_fails_after_max_attempts() {
    let app = spawn_app(AppOptions {
        workers: false,
        env: vec![("LABELSYNC_REQUEUE_AFTER_SECS", "2".into())],
        ..AppOptions::default()
    })
    .await;
    let root = app.doc_root.path();
    labelsync_tests::write_files(&root.join("poison"), 40_000, "jpg");
    labelsync_tests::write_files(&root.join("healthy"), 50, "jpg");
    let project = app.project("crashing").await;
    let poison = app
        .local_storage(project, json!({ "config": { "path": "poison" } }))
        .await;
    let healthy = app
        .local_storage(project, json!({ "config": { "path": "healthy" } }))
        .await;
    let env = [("LABELSYNC_MAX_ATTEMPTS", "2")];

    let run_id = app.start_sync(&poison["id"]).await;
    let mut deaths = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let run = loop {
        let (_, run) = app.get(&format!("/api/v1/runs/{run_id}")).await;
        if run["status"] != "queued" && run["status"] != "running" {
            break run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never ended: {run}"
        );
        assert!(deaths <= 4, "the run was handed out {deaths} times: {run}");
        let mut worker = labelsync_tests::spawn_worker(&app, &format!("victim-{deaths}"), &env);
        // Kill it the moment it starts an attempt on the run (or the run ends).
        loop {
            let (_, now) = app.get(&format!("/api/v1/runs/{run_id}")).await;
            let live = now["status"] == "queued" || now["status"] == "running";
            if !live {
                break;
            }
            if now["attempts"].as_i64() > Some(deaths) {
                // Mid-attempt (40,000 files take seconds), as a crash would
                // be; an attempt that only ends the run is done by then.
                tokio::time::sleep(Duration::from_millis(500)).await;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no attempt started: {now}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker.kill();
        deaths += 1;
    };
    assert_eq!(run["status"], "failed", "{run}");
    assert!(deaths <= 3, "{deaths} workers died for one run");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("gave up after 2 attempts"), "{run}");
    assert!(error.contains("died or was killed"), "{run}");

    let _worker = labelsync_tests::spawn_ready_worker(&app, "survivor", &env).await;
    let ok = app.sync(&healthy["id"]).await;
    assert_eq!(ok["status"], "completed", "{ok}");
    assert_eq!(ok["counters"]["created"], 50, "{ok}");
    app.stop().await;
}
