//! Real processes: the worker binary on Redis (one killed with SIGKILL in the
//! middle of a sync) and the one-shot `labelsync-scheduler sync` CLI.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use labelsync_tests::{
    AppOptions, TestApp, binary, repo_root, spawn_app, spawn_ready_worker, spawn_worker,
    write_files,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
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
    for pair in queued.windows(2) {
        assert!(
            pair[0] - pair[1] >= 1900,
            "two runs less than a period apart: {runs:?}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sync_fans_out_batches_across_workers() {
    let app = spawn_app(AppOptions::without_workers()).await;
    // "left" has one slot and takes the sync job, so it cannot run a batch:
    // every batch has to go through Redis to "right", started once the sync
    // job runs (or, after 2 s without progress, be run by the sync job
    // itself, as "sync-job"). Which worker takes which job is otherwise a
    // race that one quick worker can win every time.
    let left = spawn_ready_worker(&app, "left", &[("LABELSYNC_WORKER_CONCURRENCY", "1")]).await;
    let storage = fan_out_storage(&app, 1500).await;
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
    assert_eq!(run["counters"]["created"], 1500, "{run}");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM tasks").await, 1500);
    // 1,500 objects in batches of 50, every one finished.
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM sync_batches WHERE done").await,
        30
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_run_back_and_another_worker_finishes_it() {
    const OBJECTS: usize = 40_000;
    let app = spawn_app(AppOptions::without_workers()).await;
    write_files(&app.doc_root.path().join("data"), OBJECTS, "jpg");
    let project = app.project("drain").await;
    let storage = app.local_storage(project, json!({})).await;
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
    let env = vec![
        ("LABELSYNC_QUEUE_BACKLOG_LIMIT", "20".to_owned()),
        ("LABELSYNC_REQUEUE_AFTER_SECS", "1".to_owned()),
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
        "INSERT INTO sync_runs (id, storage_id, kind, status, queued_at) \
         SELECT lpad(id::text, 26, '0'), id, 'import', 'queued', now() - interval '1 hour' FROM storages"
            .to_owned(),
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
/// migration Job ended), naming it, and 200 once it is applied.
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
    labelsync::db::migrate(&db).await.expect("migrate");
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    app.stop().await;
}

/// A worker serves `/healthz`, `/readyz` and `/metrics` on its own listener;
/// its job metrics and the queue depth are there after it ran a sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_serves_probes_and_metrics() {
    let app = spawn_app(AppOptions::without_workers()).await;
    write_files(&app.doc_root.path().join("data"), 20, "jpg");
    let project = app.project("metrics").await;
    let storage = app.local_storage(project, json!({})).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bind = format!("127.0.0.1:{port}");
    let _worker = spawn_worker(&app, "observed", &[("LABELSYNC_METRICS_BIND", &bind)]);
    let run = app.sync(&storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("http://{bind}{path}")).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    let ready = get("/readyz").await.expect("readyz");
    assert_eq!(ready.status(), 200);
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
