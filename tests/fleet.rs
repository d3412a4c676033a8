//! Real processes: the worker binary on Redis (one killed with SIGKILL in the
//! middle of a sync) and the one-shot `labelsync-scheduler sync` CLI.
use std::{
    process::Command,
    time::{Duration, Instant},
};

#[path = "partitions.rs"]
mod partitions;

use labelsync_tests::{
    AppOptions, TestApp, binary, eventually_every,
    fault_proxy::{FaultProxy, Mode},
    repo_root, spawn_app, spawn_ready_worker, spawn_worker,
    synthetic_s3::Latency,
    write_files,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

async fn count(db: &impl ConnectionTrait, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .expect("query")
        .expect("row");
    row.try_get("", "n").expect("n")
}

/// Kills the worker running a sync once it has committed some tasks, then
/// the worker that took over once it has committed more, lets a third worker
/// finish, and checks every task exists exactly once.
async fn kill_mid_sync(
    import_method: &str,
    objects: i64,
    expected: i64,
    write: impl FnOnce(&std::path::Path),
) {
    const KILLS: usize = 2;
    let app = spawn_app(AppOptions::without_workers()).await;
    write(&app.doc_root.path().join("data"));
    let project = app.project("fleet").await;
    let storage = app
        .local_storage(project, json!({ "import_method": import_method }))
        .await;

    let mut victim = spawn_worker(&app, "victim-1", &[]);
    // Once the first worker has committed some tasks, kill it hard.
    let (run_id, progress) = app.start_sync_and_wait_for_progress(&storage).await;
    let created = progress["counters"]["created"].as_i64().unwrap_or(0);
    assert!(
        created < expected,
        "the sync finished before the kill; make it bigger: {progress}"
    );
    let (_, queues) = app.get("/api/v1/queues").await;
    let running = queues["items"][0]["running"].as_u64().unwrap_or(0);
    assert!(
        running >= 1,
        "the queue shows the jobs the first worker holds: {queues}"
    );
    let mut at_kill = progress;
    for kill in 1..=KILLS {
        let next = spawn_worker(&app, &format!("victim-{}", kill + 1), &[]);
        victim.kill();
        victim = next;
        at_kill = app.get(&format!("/api/v1/runs/{run_id}")).await.1;
        if kill == KILLS {
            break;
        }
        // The next worker takes the run over once the dead one's lease is
        // stale; kill it too as soon as it has committed more.
        let before = at_kill["counters"]["created"].as_i64().unwrap_or(0);
        wait_for_more_tasks(&app, &run_id, before, expected, kill + 1).await;
    }
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_resumed_with_every_task_once(&app, &run, objects, expected, &at_kill).await;
    app.stop().await;
}

/// Waits until the run has committed more than `before` tasks, failing if
/// it finishes first (kill number `kill` would come too late).
async fn wait_for_more_tasks(app: &TestApp, run_id: &str, before: i64, expected: i64, kill: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, run) = app.get(&format!("/api/v1/runs/{run_id}")).await;
        let now = run["counters"]["created"].as_i64().unwrap_or(0);
        assert!(
            now < expected && run["status"] == "running",
            "the sync finished before kill {kill}; make it bigger: {run}"
        );
        if now > before {
            return;
        }
        assert!(Instant::now() < deadline, "no worker took over: {run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The run completed, resumed (not restarted) after the kills, with every
/// expected task exactly once and linked.
async fn assert_resumed_with_every_task_once(
    app: &TestApp,
    run: &Value,
    objects: i64,
    expected: i64,
    at_kill: &Value,
) {
    assert_eq!(run["status"], "completed", "{run}");
    // (In Tasks mode the second victim may have been running fan-out batches
    // rather than the run itself, so only one resumption is certain.)
    assert!(
        run["attempts"].as_i64().expect("attempts") >= 2,
        "the run was resumed by a new attempt: {run}"
    );
    assert_eq!(
        run["counters"]["listed"], objects,
        "resumed from the cursor, not from the start: {run}"
    );
    assert_eq!(
        run["counters"]["created"], expected,
        "{run} (at kill: {at_kill})"
    );
    assert_eq!(run["counters"]["existed"], 0, "{run}");

    let db = Database::connect(&app.database_url).await.expect("connect");
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM tasks").await,
        expected
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM (SELECT DISTINCT object_key, row_index FROM import_links) AS k").await,
        expected
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM tasks t LEFT JOIN import_links l ON l.task_id = t.id WHERE l.id IS NULL").await,
        0,
        "every task has its link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_files_sync_the_run_resumes_without_duplicates() {
    const OBJECTS: usize = 40_000;
    kill_mid_sync("files", OBJECTS as i64, OBJECTS as i64, |dir| {
        write_files(dir, OBJECTS, "jpg")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_tasks_sync_the_run_resumes_without_duplicates() {
    // 400 JSONL files of 150 rows: rows commit per object, pages per 100 objects.
    kill_mid_sync("tasks", 400, 60_000, |dir| {
        std::fs::create_dir_all(dir).expect("mkdir");
        for f in 0..400 {
            let lines: String = (0..150)
                .map(|r| format!("{{\"file\": {f}, \"row\": {r}}}\n"))
                .collect();
            std::fs::write(dir.join(format!("part-{f:04}.jsonl")), lines).expect("write");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_redis_url_exits_with_a_reason() {
    let output = Command::new(binary("labelsync-worker"))
        .env_clear()
        .output()
        .expect("run labelsync-worker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs REDIS_URL"), "{stderr}");
}

fn cli_sync(dir: &std::path::Path, spec: &std::path::Path) -> std::process::Output {
    Command::new(binary("labelsync-scheduler"))
        .current_dir(dir)
        .env_clear()
        .env(
            "LOCAL_FILES_DOCUMENT_ROOT",
            repo_root().join("examples/data"),
        )
        .args(["sync", "--spec"])
        .arg(spec)
        .output()
        .expect("run labelsync-scheduler sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_cli_syncs_the_bundled_example() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = repo_root().join("examples/local-images.json");
    let first = cli_sync(dir.path(), &spec);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let run: Value = serde_json::from_slice(&first.stdout).expect("stdout is the run as JSON");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 10, "{run}");
    assert!(
        dir.path().join("labelsync.db").exists(),
        "the default database is a SQLite file"
    );

    let second = cli_sync(dir.path(), &spec);
    assert!(second.status.success());
    let run: Value = serde_json::from_slice(&second.stdout).expect("JSON");
    assert_eq!(
        (
            run["counters"]["created"].as_i64(),
            run["counters"]["existed"].as_i64()
        ),
        (Some(0), Some(10))
    );

    let listing = Command::new(binary("labelsync-scheduler"))
        .current_dir(dir.path())
        .env_clear()
        .env(
            "LOCAL_FILES_DOCUMENT_ROOT",
            repo_root().join("examples/data"),
        )
        .args(["list", "--spec"])
        .arg(&spec)
        .output()
        .expect("run labelsync-scheduler list");
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listing: Value = serde_json::from_slice(&listing.stdout).expect("JSON");
    assert_eq!(
        (listing["listed"].as_u64(), listing["matched"].as_u64()),
        (Some(11), Some(10)),
        "{listing}"
    );
    assert_eq!(listing["first_keys"][0], "cats/cat-0.png");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"project": {"title": "x"}, "role": "source", "backend": "local", "config": {"path": "/etc"}}"#)
        .expect("write");
    let failed = cli_sync(dir.path(), &bad);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("outside the document root"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line reason: {stderr}"
    );
    assert!(failed.stdout.is_empty());
}

/// The runs of `storage` once it has one, or none after `limit`.
async fn first_runs_within(app: &TestApp, storage: &Value, limit: Duration) -> Vec<Value> {
    let path = format!("/api/v1/runs?storage_id={}", storage["id"]);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (_, runs) = app.get(&path).await;
        let runs = runs["items"].as_array().expect("items").clone();
        if !runs.is_empty() || std::time::Instant::now() > deadline {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A period whose sync could not be enqueued (the run's insert failed) is
/// given back: the next tick enqueues it, not the next period (an hour
/// later here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_whose_sync_could_not_be_enqueued_is_tried_again_next_tick() {
    let app = spawn_app(AppOptions {
        env: vec![("LABELSYNC_SCHEDULE_TICK_MS", "200".into())],
        ..AppOptions::without_workers()
    })
    .await;
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    db.execute_unprepared(
        "CREATE TABLE refuse_runs (x int); INSERT INTO refuse_runs VALUES (1); \
         CREATE FUNCTION refuse_runs() RETURNS trigger AS $$ BEGIN \
         IF EXISTS (SELECT 1 FROM refuse_runs) THEN RAISE EXCEPTION 'refused'; END IF; \
         RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_runs BEFORE INSERT ON sync_runs \
         FOR EACH ROW EXECUTE FUNCTION refuse_runs();",
    )
    .await
    .expect("trigger");
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("data");
    let project = app.project("given back").await;
    let storage = app
        .local_storage(project, json!({ "sync_interval_seconds": 3600 }))
        .await;
    // Due at once: the first ticks claim the period and fail to enqueue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.execute_unprepared("DELETE FROM refuse_runs")
        .await
        .expect("let runs in");
    let runs = first_runs_within(&app, &storage, Duration::from_secs(10)).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    app.stop().await;
}

/// A scheduler killed between claiming a storage's period and making its
/// run loses no period: the claim holds the period for
/// `LABELSYNC_REQUEUE_AFTER_SECS` until the run is made, and another
/// scheduler syncs it then (the claim moved the storage on to its next
/// period, an hour later here, and the kill cost it that hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_claimed_by_a_killed_scheduler_is_synced_by_another() {
    use sea_orm::TransactionTrait;
    // The test's own scheduler ticks once an hour: the processes below
    // are the ones that tick.
    let app = spawn_app(AppOptions {
        env: vec![
            ("LABELSYNC_SCHEDULE_TICK_MS", "3600000".into()),
            ("LABELSYNC_REQUEUE_AFTER_SECS", "2".into()),
        ],
        ..AppOptions::without_workers()
    })
    .await;
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    // A run's insert waits at a gate the test holds.
    db.execute_unprepared(
        "CREATE TABLE gate (x int); INSERT INTO gate VALUES (1); \
         CREATE FUNCTION wait_at_gate() RETURNS trigger AS $$ BEGIN \
         PERFORM 1 FROM gate FOR UPDATE; RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER wait_at_gate BEFORE INSERT ON sync_runs \
         FOR EACH ROW EXECUTE FUNCTION wait_at_gate();",
    )
    .await
    .expect("gate");
    let gate = db.begin().await.expect("begin");
    gate.execute_unprepared("SELECT x FROM gate FOR UPDATE")
        .await
        .expect("hold the gate");
    std::fs::create_dir_all(app.doc_root.path().join("data")).expect("data");
    let project = app.project("killed mid-claim").await;
    let storage = app
        .local_storage(project, json!({ "sync_interval_seconds": 3600 }))
        .await;
    let mut first = scheduler_process(&app);
    labelsync_tests::eventually("the tick's run insert to wait at the gate", || async {
        let waiting = count(
            &db,
            "SELECT count(*)::int8 AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"sync_runs\"%'",
        )
        .await;
        waiting > 0
    })
    .await;
    first.kill().expect("SIGKILL the scheduler");
    first.wait().expect("reap it");
    gate.rollback().await.expect("open the gate");
    let _second = scheduler_process(&app);
    let runs = first_runs_within(&app, &storage, Duration::from_secs(15)).await;
    assert_eq!(
        runs.len(),
        1,
        "the period's sync, by the second scheduler: {runs:?}"
    );
    app.stop().await;
}

/// `labelsync-scheduler serve` on `app`'s database, queue and document
/// root, ticking every 200 ms, without workers; killed when dropped.
fn scheduler_process(app: &TestApp) -> KilledOnDrop {
    let mut cmd = Command::new(binary("labelsync-scheduler"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(app.vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("LABELSYNC_BIND", labelsync_tests::free_local_addr())
        .env("LABELSYNC_SCHEDULE_TICK_MS", "200")
        .env("LABELSYNC_EMBEDDED_WORKERS", "false")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    KilledOnDrop(cmd.spawn().expect("start labelsync-scheduler"))
}

/// A child process killed (and reaped) when dropped.
struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scheduler_replicas_enqueue_each_period_once() {
    let first = spawn_app(AppOptions::default()).await;
    let second = labelsync_tests::spawn_replica(&first).await;
    write_files(&first.doc_root.path().join("data"), 3, "jpg");
    let project = first.project("periodic").await;
    let storage = first
        .local_storage(project, json!({ "sync_interval_seconds": 2 }))
        .await;
    // Both replicas tick every 200 ms; a 2 s period over ~7 s allows 4 runs
    // (the first is due at once). Without the claim it would be dozens.
    tokio::time::sleep(Duration::from_millis(7000)).await;
    let (_, runs) = second
        .get(&format!("/api/v1/runs?storage_id={}", storage["id"]))
        .await;
    let runs = runs["items"].as_array().expect("items").clone();
    assert!(
        (3..=4).contains(&runs.len()),
        "{} runs in 7 s: {runs:?}",
        runs.len()
    );
    let queued: Vec<i64> = runs
        .iter()
        .map(|r| chrono_ms(r["queued_at"].as_str().expect("queued_at")))
        .collect();
    // Periods are claimed on the schedule (claim time + 2 s), and a run is
    // queued a moment after its claim: on a loaded machine that moment
    // varies by a few hundred ms. A period enqueued twice would put two
    // runs within one tick (200 ms) of each other.
    for pair in queued.windows(2) {
        assert!(
            pair[0] - pair[1] >= 1000,
            "two runs less than half a period apart: {runs:?}"
        );
    }
    for run in &runs {
        let done = second
            .wait_run(run["id"].as_str().expect("id"), Duration::from_secs(30))
            .await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(runs.last().expect("first run")["counters"]["created"], 3);
    second.stop().await;
    first.stop().await;
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn chrono_ms(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time)
        .expect("RFC 3339")
        .timestamp_millis()
}

/// A Tasks-mode storage of `files` one-task JSON files, synced by the given
/// worker processes; returns the finished run and the database.
async fn fan_out_sync(app: &TestApp, files: usize) -> (Value, sea_orm::DatabaseConnection) {
    let storage = fan_out_storage(app, files).await;
    let run = app.sync(&storage["id"]).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    (run, db)
}

/// A Tasks-mode storage of `files` one-task JSON files.
async fn fan_out_storage(app: &TestApp, files: usize) -> Value {
    let data = app.doc_root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    for i in 0..files {
        std::fs::write(
            data.join(format!("t-{i:05}.json")),
            format!("{{\"n\": {i}}}"),
        )
        .expect("write");
    }
    let project = app.project("fan-out").await;
    app.local_storage(project, json!({ "import_method": "tasks" }))
        .await
}

/// A Tasks-mode S3 storage (s3s) of `files` small JSON task files under
/// `prefix/`, read through a proxy that adds `rtt_ms` to every request
/// (keep the proxy while the storage is used).
async fn tasks_behind_latency(
    app: &TestApp,
    prefix: &str,
    files: usize,
    rtt_ms: u64,
) -> (Value, FaultProxy) {
    let rtt = Latency {
        rtt: Duration::from_millis(rtt_ms),
        bytes_per_second: None,
    };
    tasks_behind(app, prefix, files, Mode::Latency(rtt)).await
}

/// [`tasks_behind_latency`] through a proxy of any `mode`.
async fn tasks_behind(
    app: &TestApp,
    prefix: &str,
    files: usize,
    mode: Mode,
) -> (Value, FaultProxy) {
    let keys: Vec<String> = (0..files)
        .map(|i| format!("{prefix}/{i:04}.json"))
        .collect();
    let bucket = partitions::bucket_with(&keys).await;
    let proxy = FaultProxy::start(&partitions::s3s(), mode).await;
    let extra = json!({ "prefix": format!("{prefix}/"), "import_method": "tasks" });
    let storage = partitions::s3_storage(app, &bucket, &proxy.url, extra).await;
    (storage, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sync_fans_out_batches_across_workers() {
    let app = partitions::app_with(false, &[]).await;
    // "left" has one slot and takes the sync job, so it cannot run a batch
    // from the queue: every batch goes through Redis to "right", started
    // once the sync job runs, or is run by the waiting sync job itself
    // (newest first, as "sync-job"). The objects are read behind a 50 ms
    // round trip, so the sync job alone would take seconds over its
    // batches: "right" is up long before (on local files it once was not).
    let left = spawn_ready_worker(&app, "left", &[("LABELSYNC_WORKER_CONCURRENCY", "1")]).await;
    let (storage, _proxy) = tasks_behind_latency(&app, "fan", 600, 50).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.get(&format!("/api/v1/runs/{run_id}")).await.1["status"] == "queued" {
        assert!(Instant::now() < deadline, "the sync job was not taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let right = spawn_ready_worker(&app, "right", &[]).await;
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 600, "{run}");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM tasks").await, 600);
    // 600 objects in pages of 100 (the test workers') and batches of at
    // most 4 x 16 (the fetch concurrency): 2 batches a page, every one
    // finished.
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM sync_batches WHERE done").await,
        12
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM sync_batches WHERE NOT done").await,
        0
    );
    let on_right = count(
        &db,
        "SELECT COUNT(*) AS n FROM sync_batches WHERE worker LIKE 'right-%'",
    )
    .await;
    assert!(on_right >= 1, "no batch ran on the other worker");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) AS n FROM sync_batches WHERE worker LIKE 'left-%'"
        )
        .await,
        0,
        "the sync job's worker has no slot for a batch"
    );
    drop((left, right));
    app.stop().await;
}

/// A cancel stops the run's batches on other workers within a heartbeat,
/// as it stops the run's own job: they stopped only at their next commit,
/// so a batch of slow objects (a big file, a slow bucket) went on reading
/// for as long as its objects took after its run was cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_batches_other_workers_run() {
    let app = partitions::app_with(false, &[]).await;
    // As above: "left" (one slot, 4 reads) takes the sync job, so the
    // batches go to "right" through the queue, but the one the waiting
    // sync job runs itself.
    let one_slot = [
        ("LABELSYNC_WORKER_CONCURRENCY", "1"),
        ("LABELSYNC_FETCH_CONCURRENCY", "4"),
    ];
    let left = spawn_ready_worker(&app, "left", &one_slot).await;
    let slow = Mode::SlowReads(Duration::from_secs(60));
    let (storage, proxy) = tasks_behind(&app, "cancel", 128, slow).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let right = spawn_ready_worker(&app, "right", &[]).await;
    let every = Duration::from_millis(50);
    eventually_every("the other worker reading its batches", every, || {
        std::future::ready(proxy.reads().0 > 4)
    })
    .await;
    app.cancel(&run_id).await;
    let cancel = Instant::now();
    eventually_every("every read to stop", every, || {
        std::future::ready(proxy.reads().0 == 0)
    })
    .await;
    // A heartbeat is 1 s in tests.
    let took = cancel.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "reads went on {took:?} after the cancel"
    );
    let (_, ended) = proxy.reads();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.reads(), (0, ended), "objects read after the cancel");
    drop((left, right));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_on_a_single_slot_worker_does_not_deadlock() {
    let app = spawn_app(AppOptions::without_workers()).await;
    // One slot: the sync job holds it, so batches only run if it runs them.
    let worker = spawn_worker(&app, "lonely", &[("LABELSYNC_WORKER_CONCURRENCY", "1")]);
    let (run, db) = fan_out_sync(&app, 400).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 400, "{run}");
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM sync_batches WHERE NOT done").await,
        0
    );
    assert!(
        count(
            &db,
            "SELECT COUNT(*) AS n FROM sync_batches WHERE worker = 'sync-job'"
        )
        .await
            > 0
    );
    drop(worker);
    app.stop().await;
}

/// A worker opens a database connection per job slot and two more as it
/// starts, not when its first jobs need them (a fresh worker's first
/// batches each waited for a new Postgres backend), and names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_a_connection_per_slot_open_from_the_start() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let worker = spawn_ready_worker(&app, "warm", &[("LABELSYNC_WORKER_CONCURRENCY", "3")]).await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    let sql = "SELECT COUNT(*) AS n FROM pg_stat_activity \
               WHERE datname = current_database() AND application_name = 'labelsync-worker'";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open = count(&db, sql).await;
    while open < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = count(&db, sql).await;
    }
    assert_eq!(open, 5, "3 slots + 2: the worker's idle pool");
    drop(worker);
    app.stop().await;
}

/// Every pool labelsync opens on Postgres runs without JIT: once a storage
/// has many links, a page's link lookup is estimated past
/// `jit_above_cost`, and compiling it took longer than running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pool_runs_without_jit() {
    let url = labelsync_tests::fresh_postgres().await;
    let db = labelsync::db::connect(&url).await.expect("connect");
    labelsync::db::migrate(&db).await.expect("migrate");
    let worker = labelsync::db::connect_worker(&url, 1)
        .await
        .expect("a worker's pool");
    let point = labelsync::db::point_pool(&db, &url)
        .await
        .expect("the point pool");
    for (name, pool) in [("api", &db), ("worker", &worker), ("point", &point)] {
        let row = pool
            .query_one_raw(Statement::from_string(
                pool.get_database_backend(),
                "SELECT current_setting('jit') = 'off' AS off",
            ))
            .await
            .expect("query")
            .expect("row");
        assert!(row.try_get::<bool>("", "off").expect("off"), "{name}");
    }
}

/// A worker's kept connections have run a batch job's statements before
/// its first job (`db::connect_worker`): a fresh Postgres backend reads the
/// tables' catalog entries and sqlx prepares each statement on first use,
/// which made a fresh worker's first batches take 15-40 ms to their first
/// read. Each connection is asked for its own prepared statements while
/// all are held at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_warms_each_kept_connection_before_its_first_job() {
    let url = labelsync_tests::fresh_postgres().await;
    let migrated = labelsync::db::connect(&url).await.expect("connect");
    labelsync::db::migrate(&migrated).await.expect("migrate");
    migrated.close().await.ok();
    let db = labelsync::db::connect_worker(&url, 3)
        .await
        .expect("a worker's pool");
    let kept = 5;
    // The warm-up's connections go back to the pool in the background: a
    // connection asked for before then would be a new one.
    let pool = db.get_postgres_connection_pool();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.num_idle() < kept && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.size(), kept as u32, "the kept connections alone");
    let all_held = tokio::sync::Barrier::new(kept);
    let prepared = futures::future::join_all((0..kept).map(|_| async {
        let txn = sea_orm::TransactionTrait::begin(&db).await.expect("begin");
        all_held.wait().await;
        let n = count(&txn, "SELECT COUNT(*) AS n FROM pg_prepared_statements").await;
        // The task insert, whose parse alone took Postgres ~1 ms a connection
        // (the text split so that this query, prepared too, does not match).
        let insert = count(
            &txn,
            "SELECT COUNT(*) AS n FROM pg_prepared_statements \
             WHERE strpos(statement, 'INSERT INTO ' || 'tasks') > 0",
        )
        .await;
        txn.rollback().await.expect("rollback");
        (n, insert)
    }))
    .await;
    assert!(
        prepared.iter().all(|&(n, insert)| n >= 5 && insert >= 1),
        "statements, and of them the task insert, prepared on each kept connection: {prepared:?}"
    );
    db.close().await.ok();
}

/// A server that cannot give a worker a connection per slot (here a role
/// limited to 2) still gets a worker: it opens connections on demand, as
/// before the pool kept them, instead of failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starts_where_it_cannot_keep_a_connection_per_slot() {
    let url = labelsync_tests::fresh_postgres().await;
    let admin = Database::connect(&url).await.expect("connect");
    let role = format!("ls_two_{}", std::process::id());
    for sql in [
        format!("DROP ROLE IF EXISTS {role}"),
        format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 2"),
    ] {
        admin.execute_unprepared(&sql).await.expect("role");
    }
    let (base, db_name) = url.rsplit_once('/').expect("a database in the URL");
    let host = base.rsplit_once('@').map_or(base, |(_, host)| host);
    let limited = format!("postgres://{role}@{host}/{db_name}");
    let db = labelsync::db::connect_worker(&limited, 4)
        .await
        .expect("a worker's pool within the role's 2 connections");
    let one = count(&db, "SELECT 1::int8 AS n").await;
    assert_eq!(one, 1);
    db.close().await.ok();
    admin
        .execute_unprepared(&format!("DROP ROLE {role}"))
        .await
        .expect("drop role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_run_back_and_another_worker_finishes_it() {
    const OBJECTS: usize = 40_000;
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::with_storages()
    })
    .await;
    let storage = app.files_storage("drain", OBJECTS).await;
    // An endpoint of the project's run.started events (nobody answers
    // there: the events are counted where they are kept).
    let hook = json!({
        "url": "http://127.0.0.1:9/hook", "events": ["run.started"],
        "project_id": storage["project_id"],
    });
    let (status, made) = app.post("/api/v1/webhooks", hook).await;
    assert_eq!(status, 201, "{made}");
    let mut first = spawn_worker(&app, "draining", &[]);
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = first.0.wait().expect("wait for the drained worker");
    assert!(exit.success(), "SIGTERM exits 0, got {exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "drained in {:?}",
        signalled.elapsed()
    );
    let (_, handed_back) = app.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(handed_back["status"], "running", "{handed_back}");
    // Handed back, not failed: the attempt is not counted (five scale-ins
    // failed a long run).
    assert_eq!(handed_back["attempts"], 0, "{handed_back}");
    assert!(
        handed_back["error"]
            .as_str()
            .unwrap_or_default()
            .contains("shutting down"),
        "{handed_back}"
    );

    let _second = spawn_worker(&app, "successor", &[]);
    let run = app.wait_run(&run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["attempts"], 1, "{run}");
    // Started once, whatever the attempts counted: the successor's count
    // was 1 again, and the event went out twice.
    let db = Database::connect(app.database_url.as_str())
        .await
        .expect("database");
    let started = count(
        &db,
        "SELECT count(*)::int8 AS n FROM webhook_events WHERE event_type = 'run.started'",
    )
    .await;
    assert_eq!(started, 1, "run.started events");
    assert_eq!(run["counters"]["created"], OBJECTS as i64, "{run}");
    assert_eq!(
        run["counters"]["listed"], OBJECTS as i64,
        "resumed, not restarted: {run}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_keeps_runs_queued_until_there_is_room() {
    const STORAGES: usize = 100;
    // A tiny backlog limit stands in for apalis-redis' ~8,000 due-job crash
    // point: past it, runs wait in the database, not in Redis.
    // No per-project cap: the 100 runs of one project meet the backlog
    // limit, not the cap.
    let env = vec![
        ("LABELSYNC_QUEUE_BACKLOG_LIMIT", "20".to_owned()),
        ("LABELSYNC_REQUEUE_AFTER_SECS", "1".to_owned()),
        ("LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT", "0".to_owned()),
    ];
    let app = spawn_app(AppOptions {
        workers: false,
        env,
        ..AppOptions::default()
    })
    .await;
    write_files(&app.doc_root.path().join("data"), 3, "jpg");
    let project = app.project("backlog").await;
    for i in 0..STORAGES {
        let storage = app
            .local_storage(project, json!({ "title": format!("s{i}") }))
            .await;
        let (status, started) = app
            .post(
                &format!("/api/v1/storages/{}/sync", storage["id"]),
                json!({}),
            )
            .await;
        assert_eq!(status, 202, "{started}");
    }
    let (_, queues) = app.get("/api/v1/queues").await;
    let pending = queues["items"][0]["pending"].as_u64().expect("pending");
    assert!(pending <= 20, "the backlog stays at its limit: {queues}");

    let _workers = [
        spawn_worker(&app, "one", &[]),
        spawn_worker(&app, "two", &[]),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, done) = app.get("/api/v1/runs?status=completed&limit=1000").await;
        let done = done["items"].as_array().expect("items").len();
        if done == STORAGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {STORAGES} runs completed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let db = Database::connect(&app.database_url).await.expect("connect");
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM tasks").await,
        3 * STORAGES as i64
    );
    assert_eq!(
        count(&db, "SELECT MAX(attempts) AS n FROM sync_runs").await,
        1,
        "duplicates were turned away"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_queued_runs_all_run_without_a_worker_crash() {
    // Well past the ~8,000 due jobs that crash apalis-redis 1.0 workers: the
    // backlog guard keeps Redis under its limit and the sweep feeds it.
    const RUNS: i64 = 20_000;
    let env = vec![("LABELSYNC_REQUEUE_AFTER_SECS", "60".to_owned())];
    let app = spawn_app(AppOptions {
        workers: false,
        env,
        ..AppOptions::default()
    })
    .await;
    write_files(&app.doc_root.path().join("data"), 1, "jpg");
    let project = app.project("backlog").await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    // Made in bulk: 20,000 API calls would take longer than the runs.
    for sql in [
        format!(
            "INSERT INTO storages (project_id, role, backend, title, config, secrets_set, prefix, recursive, \
             import_method, presign, presign_ttl_seconds, can_delete_objects, created_at, updated_at) \
             SELECT {project}, 'source', 'local', 's' || g, '{{\"path\": \"data\"}}', '[]', '', true, 'files', \
             false, 900, false, now(), now() FROM generate_series(1, {RUNS}) g"
        ),
        // Admitted runs whose jobs were lost: the stalled-run sweep's to push.
        format!(
            "INSERT INTO sync_runs (id, storage_id, project_id, kind, status, queued_at, admitted_at) \
             SELECT lpad(id::text, 26, '0'), id, {project}, 'import', 'queued', now() - interval '1 hour', \
             now() - interval '1 hour' FROM storages"
        ),
    ] {
        db.execute_unprepared(&sql).await.expect("bulk insert");
    }
    let mut workers = [
        spawn_worker(&app, "one", &[]),
        spawn_worker(&app, "two", &[]),
    ];
    let deadline = Instant::now() + Duration::from_secs(480);
    loop {
        let done = count(
            &db,
            "SELECT COUNT(*) AS n FROM sync_runs WHERE status = 'completed'",
        )
        .await;
        if done == RUNS {
            break;
        }
        for worker in &mut workers {
            assert!(
                worker.0.try_wait().expect("worker status").is_none(),
                "a worker exited"
            );
        }
        assert!(Instant::now() < deadline, "{done} of {RUNS} runs completed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM tasks").await, RUNS);
    for worker in &mut workers {
        assert!(
            worker.0.try_wait().expect("worker status").is_none(),
            "a worker exited"
        );
    }
    app.stop().await;
}

/// Annotations saved while no worker runs wait in the outbox (and in queued
/// runs) and are exported once a worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_saved_while_no_worker_runs_are_exported_once_one_starts() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let project = app.project("outbox").await;
    // No worker to import with: the task goes straight into the table.
    let db = Database::connect(&app.database_url).await.expect("connect");
    db.execute_unprepared(&format!(
        "INSERT INTO tasks (project_id, data, created_at, updated_at) \
         VALUES ({project}, '{{\"text\": \"hello\"}}', now(), now())"
    ))
    .await
    .expect("insert a task");
    let task = count(&db, "SELECT max(id) AS n FROM tasks").await;
    std::fs::create_dir_all(app.doc_root.path().join("export")).expect("export dir");
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({ "project_id": project, "role": "target", "backend": "local", "config": { "path": "export" } }),
        )
        .await;
    assert_eq!(status, 201, "{target}");
    let mut ids = Vec::new();
    for label in ["a", "b", "c"] {
        let (status, a) = app
            .post(
                &format!("/api/v1/tasks/{task}/annotations"),
                json!({ "result": [{ "value": { "choices": [label] } }] }),
            )
            .await;
        assert_eq!(status, 201, "{a}");
        ids.push(a["id"].as_i64().expect("annotation id"));
    }
    // Edits of one annotation coalesce: still one event per annotation.
    for label in ["a2", "a3", "a4"] {
        let (status, a) = app
            .patch(
                &format!("/api/v1/annotations/{}", ids[0]),
                json!({ "result": [{ "value": { "choices": [label] } }] }),
            )
            .await;
        assert_eq!(status, 200, "{a}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let exported = |id: &i64| {
        app.doc_root
            .path()
            .join(format!("export/{id}.json"))
            .exists()
    };
    assert!(!ids.iter().any(exported), "nothing runs without a worker");
    assert_eq!(
        count(&db, "SELECT count(*) AS n FROM export_outbox").await,
        3
    );

    let _worker = spawn_worker(&app, "late", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ids.iter().all(exported) {
        assert!(
            Instant::now() < deadline,
            "annotations not exported after the worker started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The latest state was written.
    let first = std::fs::read(app.doc_root.path().join(format!("export/{}.json", ids[0])))
        .expect("exported");
    let first: serde_json::Value = serde_json::from_slice(&first).expect("json");
    assert_eq!(first["result"][0]["value"]["choices"][0], "a4", "{first}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&db, "SELECT count(*) AS n FROM export_outbox").await > 0 {
        assert!(Instant::now() < deadline, "the outbox was not drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// `/readyz` is 503 while the database lacks a migration this binary has
/// (a pod started with `LABELSYNC_RUN_MIGRATIONS=false` before the
/// migration Job ended), naming it, and 200 once it is applied; a worker
/// takes jobs only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_migrations() {
    use labelsync_migrations::{Migrator, MigratorTrait};
    let app = spawn_app(AppOptions::without_workers()).await;
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(
        (status, &ready),
        (
            200,
            &json!({ "database": true, "migrated": true, "queue": true })
        )
    );
    let db = Database::connect(&app.database_url).await.expect("connect");
    let last = Migrator::migrations()
        .last()
        .map(|m| m.name().to_owned())
        .expect("a migration");
    Migrator::down(&db, Some(1))
        .await
        .expect("roll back the last migration");
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(
        ready,
        json!({ "database": true, "migrated": false, "queue": true, "pending_migrations": [last] })
    );
    // A worker started now takes no job until the migration is applied
    // (it took them at once, against the older schema).
    write_files(&app.doc_root.path().join("data"), 2, "jpg");
    let project = app.project("migrating").await;
    let storage = app.local_storage(project, json!({})).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let _worker = spawn_worker(&app, "early", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, run) = app.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "queued", "taken before the migration: {run}");
    labelsync::db::migrate(&db).await.expect("migrate");
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let done = app.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(done["counters"]["created"], 2, "{done}");
    app.stop().await;
}

/// A worker's `/readyz` says 200 only once the worker has registered (so
/// whoever waited for it finds it in the fleet's list): while its
/// registration is held back by a lock on `fleet_workers`, it stays 503 and
/// says `"taking_jobs": false`. It said 200 from its listener's start,
/// before its S3 warm-up and registration, and a worker waited for was now
/// and then missing from the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_not_ready_before_it_registers() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let db = Database::connect(&app.database_url).await.expect("db");
    let txn = sea_orm::TransactionTrait::begin(&db).await.expect("begin");
    // Readers pass, the worker's registration (an upsert) waits.
    txn.execute_unprepared("LOCK TABLE fleet_workers IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let bind = labelsync_tests::free_local_addr();
    let _worker = spawn_worker(&app, "held", &[("LABELSYNC_METRICS_BIND", &bind)]);
    let client = reqwest::Client::new();
    let readyz = async || -> Option<(u16, Value)> {
        let resp = client
            .get(format!("http://{bind}/readyz"))
            .send()
            .await
            .ok()?;
        Some((resp.status().as_u16(), resp.json().await.ok()?))
    };
    let mut answered = None;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if let Some((status, body)) = readyz().await {
            assert_ne!(status, 200, "ready before it registered: {body}");
            answered = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = answered.expect("the worker's listener answered");
    assert_eq!(body["taking_jobs"], false, "{body}");
    assert_eq!(body["database"], true, "{body}");
    txn.commit().await.expect("unlock");
    let body = labelsync_tests::wait_ready(&bind, "held").await;
    assert_eq!(body["taking_jobs"], true, "{body}");
    let (_, list) = app.get("/api/v1/workers").await;
    let listed = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|w| w["name"].as_str().is_some_and(|n| n.starts_with("held-")));
    assert!(listed, "ready but not registered: {list}");
    app.stop().await;
}

/// A worker serves `/healthz`, `/readyz` and `/metrics` on its own listener;
/// its job metrics and the queue depth are there after it ran a sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_serves_probes_and_metrics() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let storage = app.files_storage("metrics", 20).await;
    let bind = labelsync_tests::free_local_addr();
    let _worker = spawn_worker(&app, "observed", &[("LABELSYNC_METRICS_BIND", &bind)]);
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("http://{bind}{path}")).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    let ready = get("/readyz").await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("a JSON body");
    assert_eq!(ready["taking_jobs"], true, "{ready}");
    let text = get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for needle in [
        "labelsync_jobs_started_total{kind=\"import\"",
        "labelsync_jobs_finished_total{kind=\"import\",outcome=\"completed\"",
        "labelsync_job_duration_seconds_bucket{",
        "labelsync_objects_listed_total{kind=\"import\"",
        "labelsync_tasks_created_total{kind=\"import\"",
        "labelsync_storage_requests_total{backend=\"local\",operation=\"list\"",
        "labelsync_storage_request_duration_seconds_bucket{backend=\"local\"",
        "labelsync_queue_jobs{",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("labelsync_tasks_created_total") && l.ends_with(" 20")),
        "20 tasks counted:\n{text}"
    );
    // Counters are listed at 0 from the start: these must have counted.
    for counted in [
        "labelsync_jobs_finished_total{kind=\"import\",outcome=\"completed\"",
        "labelsync_storage_requests_total{backend=\"local\",operation=\"list\",outcome=\"ok\"",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(counted) && !l.ends_with(" 0")),
            "{counted} not counted:\n{text}"
        );
    }
    app.stop().await;
}

/// A worker runs on `WORKER_MALLOC_ARENAS` of glibc's malloc arenas unless
/// its environment sets a limit (`lifecycle::bound_malloc_arenas`): it
/// starts itself again, in the same process, with `MALLOC_ARENA_MAX`; a
/// `MALLOC_ARENA_MAX` or `arena_max` tunable it was given is kept (an
/// empty one is not a bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_bounds_its_malloc_arenas_unless_given_a_bound() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let tunables = "glibc.malloc.tcache_count=16:glibc.malloc.arena_max=3";
    type Env<'a> = &'a [(&'a str, &'a str)];
    let ours = Some(labelsync::lifecycle::WORKER_MALLOC_ARENAS);
    let cases: [(Env, Option<&str>); 4] = [
        (&[], ours),
        // Set but empty: glibc would use its default.
        (&[("MALLOC_ARENA_MAX", "")], ours),
        (&[("MALLOC_ARENA_MAX", "3")], Some("3")),
        (&[("GLIBC_TUNABLES", tunables)], None),
    ];
    for (i, (env, arenas)) in cases.into_iter().enumerate() {
        let worker = spawn_ready_worker(&app, &format!("arenas-{i}"), env).await;
        let environ = std::fs::read(format!("/proc/{}/environ", worker.0.id()))
            .expect("the worker's environment");
        let set = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(b"MALLOC_ARENA_MAX="))
            .map(|value| String::from_utf8_lossy(value).into_owned());
        assert_eq!(set.as_deref(), arenas, "started with {env:?}");
    }
    app.stop().await;
}

/// An export run whose worker is SIGKILLed twice mid-way: a third worker
/// finishes it, and every annotation is exported exactly once (one file, one
/// link, counted once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_killed_twice_mid_run_exports_every_annotation_once() {
    const N: i64 = 6_000;
    let app = spawn_app(AppOptions::without_workers()).await;
    let project = app.project("export kills").await;
    let db = Database::connect(&app.database_url).await.expect("connect");
    db.execute_unprepared(&format!(
        "INSERT INTO tasks (project_id, data, created_at, updated_at) \
         SELECT {project}, jsonb_build_object('text', 'task ' || g), now(), now() FROM generate_series(1, {N}) g"
    ))
    .await
    .expect("tasks");
    db.execute_unprepared(&format!(
        "INSERT INTO annotations (task_id, project_id, result, was_cancelled, ground_truth, created_at, updated_at) \
         SELECT id, {project}, '[]'::jsonb, false, false, now(), now() FROM tasks"
    ))
    .await
    .expect("annotations");
    std::fs::create_dir_all(app.doc_root.path().join("export")).expect("export dir");
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({ "project_id": project, "role": "target", "backend": "local", "prefix": "out", "config": { "path": "export" } }),
        )
        .await;
    assert_eq!(status, 201, "{target}");
    let run_id = app.start_sync(&target["id"]).await;

    let mut kills = 0;
    for name in ["first", "second"] {
        let mut worker = spawn_worker(&app, name, &[]);
        let seen_before = count(&db, "SELECT COUNT(*) AS n FROM export_links").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Kill it once it has committed a page more than its predecessor.
        while count(&db, "SELECT COUNT(*) AS n FROM export_links").await <= seen_before {
            assert!(Instant::now() < deadline, "{name} worker made no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let exported = count(&db, "SELECT COUNT(*) AS n FROM export_links").await;
        if exported < N {
            worker.kill();
            kills += 1;
        }
    }
    assert!(
        kills >= 1,
        "the export finished before any kill; make it bigger"
    );
    let _last = spawn_worker(&app, "last", &[]);
    let run = app.wait_run(&run_id, Duration::from_secs(180)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["exported"], N, "counted once: {run}");
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM export_links").await,
        N
    );
    let files = std::fs::read_dir(app.doc_root.path().join("export/out"))
        .expect("exported files")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
        })
        .count();
    assert_eq!(files as i64, N, "one file per annotation");
    app.stop().await;
}

/// Samples, every 10 ms until stopped, the most runs of `project` seen
/// running at once and the most admitted live (in Redis or running).
fn sample_in_flight(
    db: sea_orm::DatabaseConnection,
    project: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(i64, i64)> {
    tokio::spawn(async move {
        let (mut running, mut admitted) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let sql = |cond: &str| {
                format!(
                    "SELECT COUNT(*) AS n FROM sync_runs WHERE project_id = {project} AND {cond}"
                )
            };
            running = running.max(count(&db, &sql("status = 'running'")).await);
            let live = "status IN ('queued', 'running') AND admitted_at IS NOT NULL";
            admitted = admitted.max(count(&db, &sql(live)).await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (running, admitted)
    })
}

/// Starts a sync of a new local storage of `project`; returns the run as
/// the answer shows it.
async fn sync_new_storage(app: &TestApp, project: i64, title: &str) -> Value {
    let storage = app.local_storage(project, json!({ "title": title })).await;
    let (status, started) = app
        .post(
            &format!("/api/v1/storages/{}/sync", storage["id"]),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    started["run"].clone()
}

/// The runs of `run_ids` in id (creation) order, as the API shows them: id,
/// [started_at, finished_at, admitted_at] in milliseconds, status.
async fn runs_of(app: &TestApp, run_ids: &[String]) -> Vec<(String, [i64; 3], String)> {
    let mut rows = Vec::new();
    for id in run_ids {
        let (_, run) = app.get(&format!("/api/v1/runs/{id}")).await;
        let ms = |field: &str| run[field].as_str().map_or(i64::MAX, chrono_ms);
        let times = [ms("started_at"), ms("finished_at"), ms("admitted_at")];
        rows.push((
            id.clone(),
            times,
            run["status"].as_str().unwrap_or("").to_owned(),
        ));
    }
    rows.sort();
    rows
}

/// `LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT=2`, two scheduler replicas and two
/// one-slot workers: project A starts 40 syncs at once, and only 2 go to
/// Redis (the rest are held, and say so). Project B starts one sync once
/// A's backlog is under way: it is not held, and it finishes while most of
/// A's runs have not started. A never has more than 2 runs in flight
/// (sampled as it goes, and from the run rows' times), its runs are let
/// on oldest first, and every run completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_at_its_cap_does_not_starve_another_project() {
    const A_SYNCS: usize = 40;
    // Runs long enough (~0.1 s here) that starting B's sync takes less
    // than one of them.
    const FILES: i64 = 1000;
    let env = vec![("LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT", "2".to_owned())];
    let app = spawn_app(AppOptions {
        workers: false,
        env,
        ..AppOptions::default()
    })
    .await;
    let replica = labelsync_tests::spawn_replica(&app).await;
    write_files(&app.doc_root.path().join("data"), FILES as usize, "jpg");
    let a = app.project("tenant a").await;
    let mut a_runs = Vec::new();
    for i in 0..A_SYNCS {
        let run = sync_new_storage(&app, a, &format!("a{i}")).await;
        assert_eq!(run["held"], i >= 2, "the first 2 go to the queue: {run}");
        assert_eq!(run["admitted_at"].is_null(), i >= 2, "{run}");
        a_runs.push(run["id"].as_str().expect("run id").to_owned());
    }
    let (_, queues) = app.get("/api/v1/queues").await;
    let pending = queues["items"][0]["pending"].as_u64().expect("pending");
    assert!(pending <= 2, "held runs are not in Redis: {queues}");

    let db = Database::connect(&app.database_url).await.expect("connect");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_in_flight(db.clone(), a, stop.clone());
    let one_slot = [("LABELSYNC_WORKER_CONCURRENCY", "1")];
    let _workers = [
        spawn_worker(&app, "fair-1", &one_slot),
        spawn_worker(&app, "fair-2", &one_slot),
    ];
    let a_done = format!(
        "SELECT COUNT(*) AS n FROM sync_runs WHERE project_id = {a} AND status = 'completed'"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&db, &a_done).await < 1 {
        assert!(Instant::now() < deadline, "no run of project A completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let b = replica.project("tenant b").await;
    let b_run = sync_new_storage(&replica, b, "b").await;
    assert_eq!(b_run["held"], false, "B has nothing in flight: {b_run}");
    let b_run = replica
        .wait_run(b_run["id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(b_run["status"], "completed", "{b_run}");
    let b_finished = chrono_ms(b_run["finished_at"].as_str().expect("finished_at"));

    let deadline = Instant::now() + Duration::from_secs(180);
    while count(&db, &a_done).await < A_SYNCS as i64 {
        assert!(
            Instant::now() < deadline,
            "project A's runs did not all complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (running, admitted) = sampler.await.expect("sampler");
    assert!(
        (1..=2).contains(&running) && admitted <= 2,
        "A had {running} runs running and {admitted} admitted at once"
    );
    assert_a_was_capped_and_b_went_first(&app, &a_runs, b_finished).await;
    assert_eq!(
        count(&db, "SELECT MAX(attempts) AS n FROM sync_runs").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM tasks").await,
        FILES * (A_SYNCS as i64 + 1)
    );
    replica.stop().await;
    app.stop().await;
}

/// From project A's run rows: never more than 2 running at once (each
/// run's start against the others' start and end), admitted in creation
/// order, and most of them started after B's run had finished.
async fn assert_a_was_capped_and_b_went_first(app: &TestApp, a_runs: &[String], b_finished: i64) {
    let rows = runs_of(app, a_runs).await;
    assert!(
        rows.iter().all(|(_, _, status)| status == "completed"),
        "{rows:?}"
    );
    for (id, [start, _, _], _) in &rows {
        let overlapping = rows
            .iter()
            .filter(|(_, [s, f, _], _)| s <= start && start < f)
            .count();
        assert!(
            overlapping <= 2,
            "{overlapping} runs of A running when {id} started: {rows:?}"
        );
    }
    let admitted: Vec<i64> = rows.iter().map(|(_, [_, _, at], _)| *at).collect();
    assert!(
        admitted.windows(2).all(|w| w[0] <= w[1]),
        "A's runs were let on oldest first: {rows:?}"
    );
    let after_b = rows
        .iter()
        .filter(|(_, [s, _, _], _)| *s > b_finished)
        .count();
    assert!(
        after_b >= a_runs.len() / 2,
        "B's sync finished before most of A's backlog started ({after_b} of {} after it): {rows:?}",
        a_runs.len()
    );
}

/// A database with projects 1 and 2: six storages of project 1, one of
/// project 2, and a held run of each storage, made in storage order.
async fn admission_db(url: &str) -> (sea_orm::DatabaseConnection, Vec<String>, String) {
    use labelsync::db::{self, runs};
    let db = db::connect(url).await.expect("connect");
    db::migrate(&db).await.expect("migrate");
    for title in ["p", "q"] {
        db::projects::create(&db, title, "image")
            .await
            .expect("project");
    }
    for (id, project) in [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 2)] {
        db.execute_unprepared(&format!(
            "INSERT INTO storages (id, project_id, role, backend, title, config, secrets_set, prefix, recursive, \
             import_method, presign, presign_ttl_seconds, can_delete_objects, created_at, updated_at) \
             VALUES ({id}, {project}, 'source', 'local', 's{id}', '{{}}', '[]', '', true, 'files', false, 900, \
             false, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')"
        ))
        .await
        .expect("storage");
    }
    let mut ids = Vec::new();
    for storage in 1..=7 {
        let (run, live) = runs::create_or_get_live(&db, storage, runs::RunKind::Import)
            .await
            .expect("run");
        assert!(!live && runs::to_json(&run)["held"] == true, "{run:?}");
        ids.push(run.id);
    }
    let q_run = ids.pop().expect("project 2's run");
    (db, ids, q_run)
}

/// The release logic on one backend: oldest first, up to the cap, fewest in
/// flight served first, eight admitters at once admit no more than the cap
/// allows, a run that ends frees its slot, a run put back is held again,
/// the stalled-run sweep sees admitted runs only, and cap 0 admits all.
async fn admission_rules(url: &str) {
    use labelsync::db::{admission, runs};
    let (db, p, q) = admission_db(url).await;
    assert_eq!(admission::held(&db).await.expect("held"), 7);
    assert_eq!(
        admission::waiting_projects(&db, 2, 10)
            .await
            .expect("waiting"),
        [1, 2]
    );
    assert_eq!(
        admission::admit(&db, 1, 2, 1).await.expect("admit"),
        [p[0].clone()]
    );
    // Project 2 has nothing in flight: it comes first now.
    assert_eq!(
        admission::waiting_projects(&db, 2, 10)
            .await
            .expect("waiting"),
        [2, 1]
    );
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { admission::admit(&db, 1, 2, 10).await.expect("admit") })
        })
        .collect();
    let mut won = Vec::new();
    for racer in racers {
        won.extend(racer.await.expect("racer"));
    }
    assert_eq!(
        won,
        [p[1].clone()],
        "eight admitters at once fill the cap once"
    );
    assert_eq!(admission::admitted_live(&db, 1).await.expect("live"), 2);
    assert!(
        admission::admit(&db, 1, 2, 10)
            .await
            .expect("admit")
            .is_empty()
    );
    assert_eq!(
        admission::waiting_projects(&db, 2, 10)
            .await
            .expect("waiting"),
        [2]
    );

    runs::finish(&db, &p[0], runs::RunStatus::Completed, None, None)
        .await
        .expect("finish");
    assert_eq!(
        admission::admit(&db, 1, 2, 10).await.expect("admit"),
        [p[2].clone()]
    );
    admission::hold_again(&db, vec![p[2].clone()])
        .await
        .expect("hold again");
    let again = runs::get(&db, &p[2]).await.expect("run");
    assert!(
        admission::is_held(&again) && again.heartbeat_at.is_none(),
        "{again:?}"
    );
    assert_eq!(
        admission::admit(&db, 1, 2, 10).await.expect("admit"),
        [p[2].clone()]
    );

    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let stalled = runs::stalled(&db, future, 100).await.expect("stalled");
    assert_eq!(
        stalled,
        [p[1].clone(), p[2].clone()],
        "held runs are not stalled"
    );
    assert_eq!(
        admission::admit(&db, 1, 0, 100).await.expect("admit"),
        p[3..].to_vec()
    );
    assert_eq!(admission::admit(&db, 2, 2, 10).await.expect("admit"), [q]);
    assert_eq!(admission::held(&db).await.expect("held"), 0);
    assert!(
        admission::waiting_projects(&db, 2, 10)
            .await
            .expect("waiting")
            .is_empty()
    );
    assert!(
        admission::admit(&db, 99, 2, 10)
            .await
            .expect("admit")
            .is_empty(),
        "no such project"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_rules_on_postgres() {
    admission_rules(&labelsync_tests::fresh_postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_rules_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    admission_rules(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("admission.db").display()
    ))
    .await;
}

/// A batch claimed by a job of its own run (the sync job running batches
/// while it waits) is skipped by its queued job while the claim is fresh:
/// where the two meet, at a run's last batches, nothing is read twice. A
/// stale claim (its holder died, the run's job or a queued one) is taken
/// again by the run, a claim given back at once, and a stopped run's
/// queued job closes the batch whoever claimed it. A claim is renewed and
/// given back by its holder only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_claimed_by_its_run_is_not_run_again_by_its_queued_job() {
    use chrono::{Duration as Span, Utc};
    use labelsync::db::batches;
    let (db, runs, _) = admission_db(&labelsync_tests::fresh_postgres().await).await;
    let run = &runs[0];
    let lease = Span::seconds(15);
    let ids = batches::create(
        &db,
        run,
        &[vec![json!({"key": "a"})], vec![json!({"key": "b"})]],
    )
    .await
    .expect("batches");
    let (claimed, queued_first) = (ids[0], ids[1]);
    // The run's job claims the newest unstarted batch.
    let got = batches::claim_unstarted(&db, run, Utc::now() - lease)
        .await
        .expect("claim")
        .expect("a batch to claim");
    assert_eq!(got.id, queued_first);
    // Its queued job skips it while the claim holds...
    let skipped = batches::count_attempt(&db, queued_first, Some(Utc::now() - lease)).await;
    assert_eq!(skipped.expect("count").map(|b| b.id), None, "read twice");
    // ...and the other batch, started by its queued job first, is not
    // claimed by the run's job.
    let started = batches::count_attempt(&db, claimed, Some(Utc::now() - lease)).await;
    assert_eq!(started.expect("count").map(|b| b.attempts), Some(1));
    let none = batches::claim_unstarted(&db, run, Utc::now() - lease).await;
    assert_eq!(none.expect("claim").map(|b| b.id), None);
    // The holder died: once its claim is a lease old the run takes it again.
    let claims_so_far = Utc::now();
    let later = Utc::now() + lease + Span::seconds(1);
    let again = batches::claim_unstarted(&db, run, later - lease).await;
    assert_eq!(
        again.expect("claim").map(|b| (b.id, b.attempts)),
        Some((queued_first, 2))
    );
    // So is a batch whose queued job died after counting its attempt (its
    // job lost with Redis' data): it was left unclaimed, never taken again,
    // and its run waited for it for ever.
    let orphan = batches::claim_unstarted(&db, run, claims_so_far).await;
    assert_eq!(
        orphan.expect("claim").map(|b| (b.id, b.attempts)),
        Some((claimed, 2))
    );
    // A claim is its holder's: a renewal keeps it fresh, and the holders
    // the batches were taken from (their attempt 1), presumed dead but only
    // slow, neither keep the new claim fresh nor give it away (before, one
    // did both: the batch given away was run by a third job).
    let renewed_after = Utc::now();
    for (id, attempt) in [(queued_first, 2), (claimed, 1)] {
        batches::renew_claim(&db, id, attempt).await.expect("renew");
    }
    batches::release_claim(&db, queued_first, 1)
        .await
        .expect("release");
    let taken = batches::claim_unstarted(&db, run, renewed_after).await;
    assert_eq!(
        taken.expect("claim").map(|b| (b.id, b.attempts)),
        Some((claimed, 3)),
        "only the claim its holder did not renew is stale"
    );
    // A holder that stops gives its claim back: the run's next look takes it.
    batches::release_claim(&db, queued_first, 2)
        .await
        .expect("release");
    let taken = batches::claim_unstarted(&db, run, Utc::now() - lease).await;
    assert_eq!(taken.expect("claim").map(|b| b.id), Some(queued_first));
    // A stopped run's queued job takes the batch to close it.
    let closing = batches::count_attempt(&db, queued_first, None).await;
    assert_eq!(closing.expect("count").map(|b| b.id), Some(queued_first));
    assert!(
        batches::mark_done(&db, queued_first, "w")
            .await
            .expect("done")
    );
    let done = batches::count_attempt(&db, queued_first, None).await;
    assert_eq!(done.expect("count").map(|b| b.id), None, "a done batch");
}

/// Many rounds of sixteen admitters at once against one project with a cap
/// of 3 (on Postgres, where they really run in parallel): after each
/// round exactly 3 runs are admitted, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admitters_never_exceed_the_cap() {
    use labelsync::db::{admission, runs};
    let (db, _, _) = admission_db(&labelsync_tests::fresh_postgres().await).await;
    // Six held runs of project 1 per round: each round ends the runs it
    // admitted and starts their storages' next runs (held).
    for round in 0..5 {
        let racers: Vec<_> = (0..16)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move { admission::admit(&db, 1, 3, 10).await.expect("admit") })
            })
            .collect();
        let mut won = 0;
        for racer in racers {
            won += racer.await.expect("racer").len();
        }
        assert_eq!(won, 3, "round {round}");
        assert_eq!(admission::admitted_live(&db, 1).await.expect("live"), 3);
        for storage in 1..=6 {
            if let Some(run) = runs::live(&db, storage).await.expect("live run")
                && !admission::is_held(&run)
            {
                runs::finish(&db, &run.id, runs::RunStatus::Completed, None, None)
                    .await
                    .expect("finish");
                runs::create_or_get_live(&db, storage, runs::RunKind::Import)
                    .await
                    .expect("next run");
            }
        }
    }
}

/// The registered workers (`GET /api/v1/workers`): the scheduler's
/// in-process worker and worker processes, with their slots and the run
/// they execute; a killed worker is shown `gone` after its missed
/// heartbeats, one stopped with SIGTERM deregisters. Ops may list them, a
/// read token may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_themselves_and_show_their_runs() {
    let app = spawn_app(AppOptions {
        token: Some("fleet-boot".into()),
        workers: false,
        ..AppOptions::default()
    })
    .await;
    // Pages of 2: the run lasts a few heartbeats.
    let storage = app.files_storage("workers", 2000).await;
    let slow = ("LABELSYNC_PAGE_SIZE", "2");
    let mut busy =
        spawn_ready_worker(&app, "busy", &[("LABELSYNC_WORKER_CONCURRENCY", "3"), slow]).await;
    let quiet = spawn_ready_worker(&app, "quiet", &[slow]).await;
    let named = |list: &Value, prefix: &str| -> Value {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|w| {
                w["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("{prefix}-")))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (status, list) = app.get("/api/v1/workers").await;
    assert_eq!(status, 200, "{list}");
    let w = named(&list, "busy");
    assert_eq!(w["slots"], 3, "{list}");
    assert_eq!(w["status"], "alive", "{list}");
    assert_eq!(w["version"], env!("CARGO_PKG_VERSION"), "{list}");
    assert!(w["host"].as_str().is_some_and(|h| !h.is_empty()), "{list}");
    assert!(
        w["started_at"].is_string() && w["heartbeat_at"].is_string(),
        "{list}"
    );
    assert_eq!(named(&list, "quiet")["running_jobs"], 0, "{list}");
    let (status, page) = app.get("/api/v1/workers?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["items"].as_array().expect("present").len(),
        1,
        "{page}"
    );
    let next = page["next_after"]
        .as_str()
        .expect("a full page has next_after")
        .to_owned();
    let (_, rest) = app.get(&format!("/api/v1/workers?after={next}")).await;
    assert!(
        rest["items"]
            .as_array()
            .expect("present")
            .iter()
            .all(|w| w["name"].as_str().expect("present") > next.as_str()),
        "{rest}"
    );
    let (status, bad) = app.get("/api/v1/workers?limit=0").await;
    assert_eq!(
        (status, &bad["error"]["code"]),
        (400, &json!("invalid_limit")),
        "{bad}"
    );

    // The run shows on the worker executing it (at its next heartbeat).
    let (run_id, _) = app.start_sync_and_wait_for_progress(&storage).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = app.get("/api/v1/workers").await;
        let (busy_w, quiet_w) = (named(&list, "busy"), named(&list, "quiet"));
        let runs = [&busy_w["current_runs"], &quiet_w["current_runs"]];
        if runs.contains(&&json!([run_id])) {
            assert!(runs.contains(&&json!([])), "one worker holds it: {list}");
            let holder = if busy_w["current_runs"] == json!([]) {
                quiet_w
            } else {
                busy_w
            };
            assert!(
                holder["running_jobs"].as_i64().expect("present") >= 1,
                "{list}"
            );
            break;
        }
        let (_, run) = app.get(&format!("/api/v1/runs/{run_id}")).await;
        assert!(
            run["status"] == "running" && Instant::now() < deadline,
            "the run never showed on its worker: {list} {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Scopes: ops lists them, read is refused.
    let mut tokens = Vec::new();
    for scope in ["ops", "read"] {
        let (status, token) = app
            .post("/api/v1/tokens", json!({ "name": scope, "scope": scope }))
            .await;
        assert_eq!(status, 201, "{token}");
        tokens.push(token["secret"].as_str().expect("present").to_owned());
    }
    for (token, expected) in tokens.iter().zip([200, 403]) {
        let resp = app
            .client
            .get(format!("{}/api/v1/workers", app.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /workers");
        assert_eq!(resp.status().as_u16(), expected);
    }

    // SIGKILL: gone after 3 missed heartbeats of 1 s; SIGTERM: deregistered.
    busy.kill();
    let status = Command::new("kill")
        .args(["-TERM", &quiet.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = app.get("/api/v1/workers").await;
        if named(&list, "busy")["status"] == "gone" && named(&list, "quiet").is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(quiet);
    app.stop().await;
}

/// The scheduler's in-process worker registers too (embedded mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_worker_registers_in_embedded_mode() {
    let app = spawn_app(AppOptions {
        embedded: true,
        ..AppOptions::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, list) = app.get("/api/v1/workers").await;
        assert_eq!(status, 200, "{list}");
        if let Some(w) = list["items"].as_array().expect("present").first() {
            assert_eq!(w["status"], "alive", "{list}");
            assert!(w["slots"].as_i64().expect("present") >= 1, "{list}");
            break;
        }
        assert!(Instant::now() < deadline, "no worker registered: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// An app (no in-process worker) and one worker of `slots` job slots that
/// reads `fetch` objects per slot: a read pool of `slots` x `fetch`.
async fn app_with_pooled_worker(
    name: &str,
    slots: usize,
    fetch: usize,
) -> (TestApp, labelsync_tests::Worker) {
    let app = partitions::app_with(false, &[]).await;
    let (slots, fetch) = (slots.to_string(), fetch.to_string());
    let worker = spawn_ready_worker(
        &app,
        name,
        &[
            ("LABELSYNC_WORKER_CONCURRENCY", slots.as_str()),
            ("LABELSYNC_FETCH_CONCURRENCY", fetch.as_str()),
        ],
    )
    .await;
    (app, worker)
}

/// A worker's jobs share one pool of object reads, `LABELSYNC_WORKER_CONCURRENCY`
/// x `LABELSYNC_FETCH_CONCURRENCY` (`ingest::reads`): a batch reading
/// alone reads more than `FETCH_CONCURRENCY` objects at once (it ran in
/// rounds of that many while the other slots idled), and the worker never
/// reads more than the pool at once, however many batches run together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_alone_reads_with_the_whole_pool_of_its_worker() {
    let (app, worker) = app_with_pooled_worker("pooled", 4, 4).await;
    // Batches of 4 rounds of 4 reads: 16 files are one batch, 96 are six,
    // more than the worker has slots.
    for (files, at_least) in [(16, 5), (96, 1)] {
        let prefix = format!("pool{files}");
        let (storage, proxy) = tasks_behind_latency(&app, &prefix, files, 100).await;
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["counters"]["created"], files as i64, "{run}");
        let most = proxy.most_reads_in_flight();
        assert!(
            (at_least..=16).contains(&most),
            "{files} files: {most} reads in flight at once, expected {at_least} to 16"
        );
    }
    drop(worker);
    app.stop().await;
}

/// Two storages' syncs on one worker share its reads fairly: the fast one's
/// batch, arriving while a slow storage holds the whole pool and has more
/// reads queued, reads as the slow storage's first round comes back,
/// rather than after the slow storage's queue (first come, first served:
/// after its second round, a whole slow round trip later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_storage_does_not_take_the_reads_of_a_fast_one_beside_it() {
    // 8 slots of 3 reads: a pool of 24, batches of 16. The slow sync takes
    // 5 slots (its job and 4 batches), the fast one 2 of the other 3.
    let (app, worker) = app_with_pooled_worker("fair", 8, 3).await;
    let (slow, slow_proxy) = tasks_behind_latency(&app, "slow", 64, 2000).await;
    let (fast, fast_proxy) = tasks_behind_latency(&app, "fast", 16, 20).await;
    let slow_run = app.start_sync(&slow["id"]).await;
    // The slow storage's first round fills the pool; 40 reads wait.
    let every = Duration::from_millis(5);
    eventually_every("the slow storage reading 20 objects at once", every, || {
        std::future::ready(slow_proxy.reads().0 >= 20)
    })
    .await;
    let (_, slow_before) = slow_proxy.reads();
    let fast_run = app.start_sync(&fast["id"]).await;
    eventually_every("the fast storage's first read", every, || {
        std::future::ready(fast_proxy.reads() != (0, 0))
    })
    .await;
    let slow_reads = slow_proxy.reads().1 - slow_before;
    // Fair: the first slow reads back go to the fast storage; the first
    // round's 24 come back together, so most of them have by the time the
    // fast read reaches its proxy (22-23 measured). First come, first
    // served: after the 40 queued slow reads (42-45 measured).
    assert!(
        slow_reads < 32,
        "the fast storage's first read went out after {slow_reads} slow reads"
    );
    for (run_id, files) in [(fast_run, 16), (slow_run, 64)] {
        let run = app.wait_run(&run_id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["counters"]["created"], files, "{run}");
    }
    drop(worker);
    app.stop().await;
}

/// A batch job that ends says so on Redis, and the run's job, waiting for
/// batches other slots run, looks at once: with a minute between polls
/// (and heartbeats), only those messages can end the run within the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_when_its_last_batch_does_without_waiting_for_a_poll() {
    let app = partitions::app_with(false, &[]).await;
    let worker = spawn_ready_worker(
        &app,
        "announced",
        &[
            ("LABELSYNC_QUEUE_POLL_MS", "60000"),
            ("LABELSYNC_HEARTBEAT_SECS", "60"),
            ("LABELSYNC_WORKER_CONCURRENCY", "16"),
        ],
    )
    .await;
    // Objects behind a 100 ms round trip: a batch takes 100 ms or more, so
    // the run's job, done listing, waits for batches still running in the
    // worker's other slots.
    let (storage, _proxy) = tasks_behind_latency(&app, "end", 600, 100).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let run = app.wait_run(&run_id, Duration::from_secs(40)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 600, "{run}");
    let db = Database::connect(&app.database_url).await.expect("connect");
    let by_slots = count(
        &db,
        "SELECT COUNT(*) AS n FROM sync_batches WHERE worker LIKE 'announced-%'",
    )
    .await;
    assert!(by_slots >= 1, "the run's job ran every batch itself");
    let last_batch = count(
        &db,
        "SELECT (EXTRACT(EPOCH FROM MAX(finished_at)) * 1000)::bigint AS n FROM sync_batches",
    )
    .await;
    let ended = chrono_ms(run["finished_at"].as_str().expect("finished_at"));
    assert!(
        ended - last_batch < 5_000,
        "the run ended {} ms after its last batch: {run}",
        ended - last_batch
    );
    drop(worker);
    app.stop().await;
}

/// The same in embedded mode (SQLite and the in-process worker): its
/// pushes wake the worker and its batch ends are announced inside the
/// process, so with a minute between polls and heartbeats a fanned-out
/// run still takes seconds (every hop waited for a poll: a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_ends_when_its_last_batch_does_without_waiting_for_a_poll() {
    let mut opts = AppOptions::with_storages();
    opts.embedded = true;
    opts.env.extend([
        ("LABELSYNC_QUEUE_POLL_MS", "60000".to_owned()),
        ("LABELSYNC_HEARTBEAT_SECS", "60".to_owned()),
        ("LABELSYNC_WORKER_CONCURRENCY", "16".to_owned()),
    ]);
    let app = spawn_app(opts).await;
    let (storage, _proxy) = tasks_behind_latency(&app, "embedded-end", 600, 100).await;
    let started = Instant::now();
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 600, "{run}");
    // 600 objects behind 100 ms in batches of 64, 16 slots: a few seconds
    // of reads; a run's job that waited for a poll would end a minute on.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "the run took {took:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_takes_a_pushed_job_without_waiting_for_its_poll() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let storage = app.files_storage("wake", 3).await;
    // A minute between polls and between heartbeats (apalis also looks for
    // jobs at a heartbeat): only the push's wake message can bring the job
    // to this worker within the test.
    let worker = spawn_ready_worker(
        &app,
        "sleepy",
        &[
            ("LABELSYNC_QUEUE_POLL_MS", "60000"),
            ("LABELSYNC_HEARTBEAT_SECS", "60"),
        ],
    )
    .await;
    // Past the worker's first look at the queue, made as it starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Without the wake something else in apalis has the worker look about
    // once a second: three jobs all taken at once rule that out.
    for _ in 0..3 {
        let run_id = app.start_sync(&storage["id"]).await;
        let run = app.wait_run(&run_id, Duration::from_secs(20)).await;
        assert_eq!(run["status"], "completed", "{run}");
        let at = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(run[field].as_str().expect(field)).expect(field)
        };
        let waited = at("started_at") - at("queued_at");
        assert!(
            waited < chrono::Duration::milliseconds(300),
            "the job waited {waited} for the worker: {run}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(worker);
    app.stop().await;
}

/// Jobs that ended well are forgotten by the scheduler's cleanup an hour
/// after they ended: the queues kept every job (on Redis its data, its
/// metadata hash and its id in the done set; embedded, its row) for ever,
/// so Redis grew with every run, batch and webhook job until it refused
/// pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_forgotten_on_redis() {
    finished_jobs_are_forgotten(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_forgotten_on_the_embedded_queue() {
    finished_jobs_are_forgotten(true).await;
}

async fn finished_jobs_are_forgotten(embedded: bool) {
    use labelsync::jobs::finished::FINISHED_KEPT;
    let app = spawn_app(AppOptions {
        embedded,
        ..AppOptions::default()
    })
    .await;
    write_files(&app.doc_root.path().join("data"), 3, "jpg");
    let project = app.project("finished").await;
    let storage = app.local_storage(project, json!({})).await;
    for _ in 0..2 {
        let run = app.sync(&storage["id"]).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    let state = labelsync_scheduler::app::state(labelsync_tests::settings(&app.vars))
        .await
        .expect("state");
    let queue = &state.queue;
    let keys_before = namespace_keys(&app).await;
    let forget = |kept| async move { queue.forget_finished(kept).await.expect("forget") };
    assert_eq!(forget(FINISHED_KEPT).await, 0, "none ended an hour ago");
    let forgot = forget(Duration::ZERO).await;
    assert!(forgot >= 2, "the two runs' jobs at least: {forgot}");
    assert_eq!(forget(Duration::ZERO).await, 0, "forgotten once");
    if !embedded {
        let keys_after = namespace_keys(&app).await;
        assert!(
            keys_after + forgot as usize <= keys_before,
            "each job's metadata hash is gone: {keys_before} keys before, {keys_after} after"
        );
    }
    app.stop().await;
}

/// How many Redis keys the app's queue namespace has.
async fn namespace_keys(app: &TestApp) -> usize {
    let mut conn = labelsync_tests::redis_connection().await;
    let pattern = format!("{}*", app.vars["LABELSYNC_QUEUE_NAMESPACE"]);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .expect("keys");
    keys.len()
}

/// Debian's libfaketime (the `faketime` package, which tests/run.sh
/// installs): preloaded, it moves a process's clock.
fn libfaketime() -> String {
    let dirs = std::fs::read_dir("/usr/lib").expect("/usr/lib");
    dirs.flatten()
        .map(|dir| dir.path().join("faketime/libfaketimeMT.so.1"))
        .find(|lib| lib.exists())
        .expect("libfaketime (Debian's faketime package)")
        .display()
        .to_string()
}

/// A worker whose clock runs a minute fast leaves a live attempt its run:
/// leases are on the database's clock. Here the live attempt is the
/// test's, renewing its lease every 300 ms on the database's clock; the
/// worker gets the run's job meanwhile. Before, the lease looked a minute
/// old to it (past the 3 s lease of these tests) and it took the run over
/// at once. Once the test stops renewing, the worker takes the run when
/// the lease is stale, and finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_is_fast_leaves_a_live_attempt_its_run() {
    let app = spawn_app(AppOptions::without_workers()).await;
    let storage = app.files_storage("clock", 3).await;
    let run_id = app.start_sync(&storage["id"]).await;
    let db = Database::connect(&app.database_url).await.expect("db");
    let renew = format!(
        "UPDATE sync_runs SET status = 'running', lease_owner = 'a live attempt', \
         lease_at = now(), heartbeat_at = now() WHERE id = '{run_id}' \
         AND (lease_owner IS NULL OR lease_owner = 'a live attempt')"
    );
    let renewed = |db: &sea_orm::DatabaseConnection| {
        let renew = renew.clone();
        let db = db.clone();
        async move {
            db.execute_unprepared(&renew)
                .await
                .expect("renew")
                .rows_affected()
                == 1
        }
    };
    assert!(renewed(&db).await, "the run taken before any worker ran");
    let lib = libfaketime();
    let fast_clock = [
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME", "+60s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let worker = spawn_ready_worker(&app, "fast-clock", &fast_clock).await;
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_secs(6) {
        assert!(
            renewed(&db).await,
            "the worker took the run from its live attempt after {:?}",
            holding.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The worker did try: the queue counted the run's job's failed tries
    // (the live attempt's lease turned it away).
    assert!(
        most_job_attempts(&app).await > 0,
        "the worker never tried the run"
    );
    let run = app.wait_run(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], 3, "{run}");
    drop(worker);
    app.stop().await;
}

/// A connection to the app's Redis, and the meta hashes of its queue's
/// jobs (apalis-redis keeps one per job pushed, with its tries and status).
async fn queue_jobs(app: &TestApp) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(app.vars["REDIS_URL"].as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // Every job pushed has its data in the queue's hash (not a scan of
    // the whole Redis, which other tests fill).
    let queue = format!("{}:runs", app.vars["LABELSYNC_QUEUE_NAMESPACE"]);
    let ids: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{queue}:data"))
        .query_async(&mut conn)
        .await
        .expect("HKEYS");
    let keys = ids.iter().map(|id| format!("{queue}:meta:{id}")).collect();
    (conn, keys)
}

/// The most tries the app's Redis queue counted of any of its jobs.
async fn most_job_attempts(app: &TestApp) -> i64 {
    let (mut conn, keys) = queue_jobs(app).await;
    let mut most = 0;
    for key in keys {
        let tries: Option<i64> = redis::cmd("HGET")
            .arg(&key)
            .arg("attempts")
            .query_async(&mut conn)
            .await
            .expect("HGET");
        most = most.max(tries.unwrap_or(0));
    }
    most
}

/// A run waiting its turn in Redis keeps its one job: the stalled-run
/// sweep pushes a run again only when Redis holds no job of it to run.
/// Before, it pushed one more every window (1 s here), and each would
/// meet the run running and be retried as busy. A job gone dead is
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_in_redis_is_not_pushed_again_every_window() {
    let mut options = AppOptions::without_workers();
    options
        .env
        .push(("LABELSYNC_REQUEUE_AFTER_SECS", "1".into()));
    let app = spawn_app(options).await;
    let storage = app.files_storage("waiting", 1).await;
    app.start_sync(&storage["id"]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut conn, jobs) = queue_jobs(&app).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    // The job dies (as after its last try): the next window pushes another.
    let task = jobs[0].rsplit(':').next().expect("a task id").to_owned();
    let dead = format!("{}:runs:dead", app.vars["LABELSYNC_QUEUE_NAMESPACE"]);
    let _: () = redis::cmd("SADD")
        .arg(&dead)
        .arg(&task)
        .query_async(&mut conn)
        .await
        .expect("SADD");
    labelsync_tests::eventually("a job in place of the dead one", || async {
        queue_jobs(&app).await.1.len() == 2
    })
    .await;
    app.stop().await;
}
