//! # Layout
//! Helpers shared by every integration test binary of `tests/` (`api.rs`,
//! `import.rs`, `export.rs`, `resolve.rs`, `storage.rs`, `fleet.rs`,
//! `telemetry.rs`, `faults.rs`, `migrations.rs`, `deploy.rs`) and the bench
//! examples:
//!
//! - this module: a fresh Postgres database ([`fresh_postgres`]) and a fresh
//!   Redis queue namespace per test, settings from a map ([`settings`]), an
//!   in-process scheduler on a random port ([`spawn_app`], and a second
//!   replica of it with [`spawn_replica`]), `labelsync-worker` processes
//!   ([`spawn_worker`], [`spawn_ready_worker`]) and the paths of the built
//!   binaries ([`binary`]), test data (files, Parquet files: plain, nested,
//!   decompression bombs) and a process's peak memory ([`peak_rss`]);
//! - [`backends`]: the storage emulators the backend tests talk to, and a
//!   fresh bucket on each;
//! - [`fault_proxy`]: a fault-injecting HTTP proxy to put in front of an emulator;
//! - [`otlp`]: a small OTLP/HTTP collector that keeps the spans and metrics
//!   it receives.
//!
//! Servers are taken from `TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`). A missing server fails the test with a message;
//! nothing is ever skipped.
pub mod backends;
pub mod fault_proxy;
pub mod otlp;
pub mod synthetic_s3;
pub mod webhook_receiver;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use labelsync::config::Settings;
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

/// Where the test servers listen: an ephemeral port on 127.0.0.1, with
/// the product's backlog ([`labelsync::http::listen`]), so a burst of
/// connections is not delayed by the kernel.
pub const LOOPBACK: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A unique lowercase name for databases and queue namespaces.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Creates an empty Postgres database and returns its URL.
pub async fn fresh_postgres() -> String {
    fresh_postgres_on(&postgres_admin_url()).await
}

/// Creates an empty database on the server of `admin_url`.
pub async fn fresh_postgres_on(admin_url: &str) -> String {
    let admin_url = admin_url.to_owned();
    let admin = Database::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!("Postgres is required at {admin_url} (set TEST_POSTGRES_URL): {e}")
    });
    let name = unique("labelsync_test");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    // Test databases are thrown away: skipping the WAL flush at each commit
    // keeps the many-small-transactions tests fast on a 2-core CI machine.
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE {name} SET synchronous_commit = off"
        ))
        .await
        .expect("configure test database");
    admin.close().await.ok();
    let (base, _) = admin_url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// Checks Redis answers, so a missing server fails loudly here rather than as
/// a timeout later.
pub async fn require_redis() -> String {
    let mut conn = redis_connection().await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("Redis PING");
    assert_eq!(pong, "PONG");
    redis_url()
}

/// A connection to the tests' Redis (`TEST_REDIS_URL`); a missing server
/// fails loudly here.
pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("valid TEST_REDIS_URL");
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is required at {url} (set TEST_REDIS_URL): {e}"))
}

/// Settings for a test, from a map (the process environment is not read).
/// Parquet files are read by the built `labelsync-worker` unless the map
/// names another reader: a test binary is not one.
pub fn settings(vars: &HashMap<&str, String>) -> Settings {
    Settings::from_lookup(|k| {
        vars.get(k).cloned().or_else(|| {
            (k == "LABELSYNC_PARQUET_PARSER").then(|| parquet_parser().display().to_string())
        })
    })
    .expect("valid test settings")
}

/// Where the built `labelsync-worker` is, whether or not it was built (a
/// test that reads Parquet files without it fails on its first file).
pub fn parquet_parser() -> PathBuf {
    target_dir().join("labelsync-worker")
}

/// Where cargo puts the binaries this test binary was built with.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
    pub doc_root: tempfile::TempDir,
    pub database_url: String,
    pub vars: HashMap<&'static str, String>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct AppOptions {
    /// Postgres + Redis (the fleet setup) or SQLite + the embedded queue.
    pub embedded: bool,
    /// Run a worker inside the scheduler process.
    pub workers: bool,
    pub token: Option<String>,
    /// Extra settings (environment variable, value).
    pub env: Vec<(&'static str, String)>,
    /// The Postgres server (an admin URL) the test's fresh database is made
    /// on, when not `TEST_POSTGRES_URL`'s: a server of the test's own.
    pub postgres_admin: Option<String>,
}

/// The key tests seal storage secrets with (32 bytes, base64).
pub const TEST_SECRET_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

impl AppOptions {
    /// A server whose storages and webhooks may reach the emulators and
    /// receivers on 127.0.0.1, and whose storages take secrets.
    pub fn with_storages() -> Self {
        AppOptions {
            env: vec![
                ("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS", "true".into()),
                ("LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS", "true".into()),
                ("LABELSYNC_SECRET_KEY", TEST_SECRET_KEY.into()),
            ],
            ..AppOptions::default()
        }
    }

    /// Postgres + Redis with no in-process worker: runs stay queued until a
    /// test starts `labelsync-worker` processes (or never, on purpose).
    pub fn without_workers() -> Self {
        AppOptions {
            workers: false,
            ..AppOptions::default()
        }
    }
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            embedded: false,
            workers: true,
            token: None,
            env: Vec::new(),
            postgres_admin: None,
        }
    }
}

/// Starts the scheduler on 127.0.0.1:0 with a fresh database, a fresh queue
/// namespace and a fresh document root.
pub async fn spawn_app(opts: AppOptions) -> TestApp {
    let doc_root = tempfile::tempdir().expect("temp dir");
    let mut vars: HashMap<&'static str, String> = HashMap::new();
    let database_url = if opts.embedded {
        let path = doc_root.path().join("labelsync.db");
        format!("sqlite://{}?mode=rwc", path.display())
    } else {
        vars.insert("REDIS_URL", require_redis().await);
        match &opts.postgres_admin {
            Some(admin) => fresh_postgres_on(admin).await,
            None => fresh_postgres().await,
        }
    };
    vars.insert("DATABASE_URL", database_url.clone());
    vars.insert("LABELSYNC_QUEUE_NAMESPACE", unique("test"));
    vars.insert("LABELSYNC_EMBEDDED_WORKERS", opts.workers.to_string());
    vars.insert("LABELSYNC_HEARTBEAT_SECS", "1".into());
    vars.insert("LABELSYNC_SCHEDULE_TICK_MS", "200".into());
    vars.insert(
        "LOCAL_FILES_DOCUMENT_ROOT",
        doc_root.path().display().to_string(),
    );
    vars.insert(
        "LABELSYNC_EMBEDDED_QUEUE_PATH",
        doc_root.path().join("queue.db").display().to_string(),
    );
    if let Some(token) = &opts.token {
        vars.insert("LABELSYNC_API_TOKENS", format!("other-token,{token}"));
    }
    vars.extend(opts.env.iter().cloned());
    start(vars, doc_root, database_url, opts.token).await
}

/// A second scheduler on the same database, queue namespace and document root
/// (an HA replica).
pub async fn spawn_replica(of: &TestApp) -> TestApp {
    let doc_root = tempfile::tempdir().expect("temp dir");
    start(
        of.vars.clone(),
        doc_root,
        of.database_url.clone(),
        of.token.clone(),
    )
    .await
}

async fn start(
    vars: HashMap<&'static str, String>,
    doc_root: tempfile::TempDir,
    database_url: String,
    token: Option<String>,
) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = labelsync::telemetry::init(false, None, "labelsync-test");
    }
    let listener = labelsync::http::listen(LOOPBACK).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(labelsync_scheduler::app::serve(
        settings(&vars),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let app = TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        token,
        doc_root,
        database_url,
        vars,
        stop: Some(stop),
        handle: Some(handle),
    };
    app.wait_ready().await;
    app
}

impl TestApp {
    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(resp) = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                && resp.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("scheduler did not become ready at {}", self.base);
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a request (with the token, and `body` as JSON when given);
    /// returns the status and the JSON body (Null when not JSON).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = &body {
            req = req.json(body);
        }
        let resp = self
            .auth(req)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        split(resp).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// POST a raw body with a JSON content type.
    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let resp = self
            .auth(
                self.client
                    .post(format!("{}{path}", self.base))
                    .header("content-type", "application/json")
                    .body(body),
            )
            .send()
            .await
            .expect("POST");
        split(resp).await
    }

    /// Creates a project and returns its id.
    pub async fn project(&self, title: &str) -> i64 {
        let (status, body) = self
            .post(
                "/api/v1/projects",
                serde_json::json!({ "title": title, "data_key": "image" }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_i64().expect("project id")
    }

    /// Writes `files` small `.jpg` files under the document root's `data/`
    /// and makes a project named `name` with a local Files-mode storage on
    /// them; returns the storage.
    pub async fn files_storage(&self, name: &str, files: usize) -> Value {
        write_files(&self.doc_root.path().join("data"), files, "jpg");
        let project = self.project(name).await;
        self.local_storage(project, serde_json::json!({})).await
    }

    /// Creates a local source storage on the document root's `data/`
    /// (Files mode), with `extra` fields overriding the defaults.
    pub async fn local_storage(&self, project_id: i64, extra: Value) -> Value {
        let mut body = serde_json::json!({
            "project_id": project_id, "role": "source", "backend": "local",
            "config": { "path": "data" },
        });
        for (key, value) in extra.as_object().expect("extra fields are an object") {
            body[key] = value.clone();
        }
        let (status, storage) = self.post("/api/v1/storages", body).await;
        assert_eq!(status, 201, "{storage}");
        storage
    }

    /// Starts a sync of `storage` and waits until its worker has committed
    /// some tasks; returns the run id and the run at that moment.
    pub async fn start_sync_and_wait_for_progress(&self, storage: &Value) -> (String, Value) {
        let run_id = self.start_sync(&storage["id"]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, run) = self.get(&format!("/api/v1/runs/{run_id}")).await;
            if run["counters"]["created"].as_i64().unwrap_or(0) > 0 {
                return (run_id, run);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never started: {run}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`Self::wait_run`], for tests that take the database away: an
    /// answer may meet a broken connection (503) before the pool replaces
    /// it, so answers are not asserted on while polling.
    pub async fn wait_run_through_outage(&self, run_id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, run) = self.get(&format!("/api/v1/runs/{run_id}")).await;
            if status == 200 && run["status"] != "queued" && run["status"] != "running" {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run still going: {run}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls a run until it leaves queued/running; panics after `timeout`.
    pub async fn wait_run(&self, run_id: &str, timeout: Duration) -> Value {
        self.wait_run_polling(run_id, timeout, Duration::from_millis(100))
            .await
    }

    /// [`Self::wait_run`], looking `every` so often (a benchmark's wall
    /// time is only as fine as its polling).
    pub async fn wait_run_polling(
        &self,
        run_id: &str,
        timeout: Duration,
        every: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, run) = self.get(&format!("/api/v1/runs/{run_id}")).await;
            assert_eq!(status, 200, "{run}");
            let state = run["status"].as_str().unwrap_or_default().to_owned();
            if state != "queued" && state != "running" {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} still {state} after {timeout:?}: {run}"
            );
            tokio::time::sleep(every).await;
        }
    }

    /// The first page of a run's per-object errors.
    pub async fn run_errors(&self, run_id: &str) -> Vec<Value> {
        let (status, errors) = self.get(&format!("/api/v1/runs/{run_id}/errors")).await;
        assert_eq!(status, 200, "{errors}");
        errors["items"].as_array().expect("items").clone()
    }

    /// Slows every update of a run's row in the app's database (its
    /// checkpoint, in every transaction of rows) by `seconds`, with a
    /// trigger (Postgres).
    pub async fn slow_run_updates(&self, seconds: f64) {
        let db = Database::connect(self.database_url.as_str())
            .await
            .expect("database");
        db.execute_unprepared(&format!(
            "CREATE FUNCTION slow_run_updates() RETURNS trigger AS $$ \
             BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER slow_run_updates BEFORE UPDATE ON sync_runs \
             FOR EACH ROW EXECUTE FUNCTION slow_run_updates();"
        ))
        .await
        .expect("trigger");
    }

    /// Makes the database lose, once, the commit of the listing page that
    /// moves the cursor of a row of `table` (`sync_runs` or
    /// `sync_partitions`) to `key`, as a crash with asynchronous commits or
    /// a failover to a replica behind loses a commit it acknowledged: the
    /// cursor stays where it was and the page's links and tasks go, while
    /// the attempt saw its commit succeed. (The page's counters stay.)
    /// [`TestApp::page_was_lost`] tells whether it happened.
    pub async fn lose_a_page_once(&self, table: &str, key: &str) {
        let prefix = if table == "sync_partitions" {
            "NEW.prefix"
        } else {
            "''"
        };
        let db = Database::connect(self.database_url.as_str())
            .await
            .expect("database");
        db.execute_unprepared(&format!(
            "CREATE TABLE lost_pages (cursor text); \
             CREATE FUNCTION lose_a_page() RETURNS trigger AS $$ \
             BEGIN \
               IF NEW.cursor = '{key}' AND OLD.cursor IS DISTINCT FROM NEW.cursor \
                  AND NOT EXISTS (SELECT 1 FROM lost_pages) THEN \
                 INSERT INTO lost_pages VALUES (NEW.cursor); \
                 WITH gone AS (DELETE FROM import_links \
                   WHERE object_key > coalesce(OLD.cursor, '') AND object_key <= NEW.cursor \
                   AND left(object_key, length({prefix})) = {prefix} RETURNING task_id) \
                 DELETE FROM tasks WHERE id IN (SELECT task_id FROM gone); \
                 NEW.cursor := OLD.cursor; \
               END IF; \
               RETURN NEW; \
             END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER lose_a_page BEFORE UPDATE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION lose_a_page();"
        ))
        .await
        .expect("trigger");
    }

    /// Whether [`TestApp::lose_a_page_once`]'s page was lost.
    pub async fn page_was_lost(&self) -> bool {
        self.count("SELECT count(*) AS n FROM lost_pages").await == 1
    }

    /// The number `sql` (a `SELECT count(*) AS n ...`) counts in the app's
    /// database.
    pub async fn count(&self, sql: &str) -> i64 {
        let db = Database::connect(self.database_url.as_str())
            .await
            .expect("database");
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                sql,
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get("", "n").expect("n")
    }

    /// A local source of project `title` on `data/`, which holds `files`
    /// files `obj-00000.jpg`, `obj-00001.jpg`, ...: (project id, storage).
    pub async fn numbered_files_source(&self, title: &str, files: usize) -> (i64, Value) {
        let data = self.doc_root.path().join("data");
        std::fs::create_dir_all(&data).expect("data");
        for i in 0..files {
            std::fs::write(data.join(format!("obj-{i:05}.jpg")), b"x").expect("write");
        }
        let project = self.project(title).await;
        let storage = self.local_storage(project, serde_json::json!({})).await;
        (project, storage)
    }

    /// Every task of a project, following `next_after`.
    pub async fn all_tasks(&self, project_id: i64) -> Vec<Value> {
        let mut tasks = Vec::new();
        let mut after = String::new();
        loop {
            let (status, page) = self
                .get(&format!(
                    "/api/v1/projects/{project_id}/tasks?limit=1000{after}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            tasks.extend(page["items"].as_array().expect("items").iter().cloned());
            match page["next_after"].as_i64() {
                Some(next) => after = format!("&after={next}"),
                None => return tasks,
            }
        }
    }

    /// Starts a sync of a storage and waits for the run to end.
    pub async fn sync(&self, storage_id: &Value) -> Value {
        let run_id = self.start_sync(storage_id).await;
        self.wait_run(&run_id, Duration::from_secs(120)).await
    }

    /// Cancels a run (`POST /runs/{id}/cancel`, which must answer 200):
    /// the run as answered.
    pub async fn cancel(&self, run_id: &str) -> Value {
        let (status, run) = self
            .post(
                &format!("/api/v1/runs/{run_id}/cancel"),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "cancel {run_id}: {run}");
        run
    }

    /// Starts a sync of a storage (by id); returns the run id.
    pub async fn start_sync(&self, storage_id: &Value) -> String {
        let (status, started) = self
            .post(
                &format!("/api/v1/storages/{storage_id}/sync"),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 202, "{started}");
        started["run"]["id"].as_str().expect("run id").to_owned()
    }

    /// Stops the server and its in-process worker, surfacing their errors.
    pub async fn stop(mut self) {
        self.stop_server().await;
    }

    async fn stop_server(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server result");
        }
    }

    /// Stops the server and starts it again on the same database, queue
    /// namespace and document root with `env` set over its settings (a
    /// restart with a setting changed).
    pub async fn restart_with(mut self, env: &[(&'static str, String)]) -> TestApp {
        self.stop_server().await;
        let mut vars = self.vars.clone();
        vars.extend(env.iter().cloned());
        start(vars, self.doc_root, self.database_url, self.token).await
    }
}

async fn split(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after
/// 30 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_every(what, Duration::from_millis(100), check).await;
}

/// [`eventually`], polling every `every` (for a test that measures the
/// moment the condition comes true).
pub async fn eventually_every<F, Fut>(what: &str, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Writes `n` small files under `dir`, spread over sub-directories of 1,000.
pub fn write_files(dir: &Path, n: usize, ext: &str) {
    for i in 0..n {
        let sub = dir.join(format!("part-{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).expect("mkdir");
        }
        std::fs::write(sub.join(format!("obj-{i:06}.{ext}")), i.to_string()).expect("write");
    }
}

/// A built binary of the workspace (`cargo build --workspace --bins` first).
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as .ci/run does)",
        path.display()
    );
    path
}

/// A `labelsync-worker` process, killed when dropped so a failing test
/// leaves none behind.
pub struct Worker(pub std::process::Child, pub Option<String>);

impl Worker {
    /// Where its `/metrics` answers (`host:port`), when
    /// [`spawn_ready_worker`] started it.
    pub fn metrics_addr(&self) -> Option<&str> {
        self.1.as_deref()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        self.0.kill().expect("SIGKILL the worker");
        self.0.wait().expect("reap the worker");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `labelsync-worker` on `app`'s database, queue namespace and
/// document root, with pages of 100 and a metrics listener on a random
/// port; `env` overrides those defaults.
pub fn spawn_worker(app: &TestApp, name: &str, env: &[(&str, &str)]) -> Worker {
    let mut cmd = std::process::Command::new(binary("labelsync-worker"));
    cmd.env_clear()
        .env("LABELSYNC_METRICS_BIND", "127.0.0.1:0")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LABELSYNC_WORKER_NAME", name)
        .env("LABELSYNC_PAGE_SIZE", "100")
        .env("RUST_LOG", "warn")
        // The caller's settings win over the defaults above.
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null());
    for key in [
        "LABELSYNC_QUEUE_BACKLOG_LIMIT",
        "LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT",
        "DATABASE_URL",
        "REDIS_URL",
        "LABELSYNC_QUEUE_NAMESPACE",
        "LOCAL_FILES_DOCUMENT_ROOT",
        "LABELSYNC_HEARTBEAT_SECS",
        "LABELSYNC_SECRET_KEY",
        "LABELSYNC_ALLOW_PRIVATE_ENDPOINTS",
        "LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS",
        "LABELSYNC_WEBHOOK_MAX_AGE_SECS",
    ] {
        if let Some(value) = app.vars.get(key) {
            cmd.env(key, value);
        }
    }
    Worker(cmd.spawn().expect("start labelsync-worker"), None)
}

/// The values of the samples of `name` in a Prometheus text scrape that
/// carry every label of `labels`, in the scrape's order.
pub fn metric_samples<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(move |line| line.starts_with(&prefix))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// `127.0.0.1:<a port free a moment ago>`, for a listener of a process a
/// test starts.
pub fn free_local_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// [`spawn_worker`], returning once the worker's `/readyz` says 200, so
/// the test knows it takes jobs (a worker process takes a moment to start).
pub async fn spawn_ready_worker(app: &TestApp, name: &str, env: &[(&str, &str)]) -> Worker {
    let bind = free_local_addr();
    let mut env = env.to_vec();
    env.push(("LABELSYNC_METRICS_BIND", &bind));
    let mut worker = spawn_worker(app, name, &env);
    worker.1 = Some(bind.clone());
    wait_ready(&bind, name).await;
    worker
}

/// Waits (60 s at most) until the worker listening on `bind` says 200 on
/// `/readyz`; its answer.
pub async fn wait_ready(bind: &str, name: &str) -> Value {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client.get(format!("http://{bind}/readyz")).send().await;
        if let Ok(ready) = ready
            && ready.status() == 200
        {
            return ready.json().await.expect("a JSON /readyz body");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker {name} not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The repository root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Writes a Parquet file of `rows` rows `{id: i64, text: "row <id>"}` in
/// row groups of at most `group_rows` rows (snappy-compressed, as pandas and
/// Spark write by default).
pub fn write_parquet(path: &Path, rows: usize, group_rows: usize) {
    write_parquet_with(path, rows, group_rows, |i| format!("row {i}"));
}

/// [`write_parquet`], each row's text given by `text`.
pub fn write_parquet_with(
    path: &Path,
    rows: usize,
    group_rows: usize,
    text: impl Fn(i64) -> String,
) {
    use std::sync::Arc;

    use parquet::{
        basic::Compression,
        data_type::{ByteArray, ByteArrayType, Int64Type},
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::parser::parse_message_type,
    };
    let schema = Arc::new(
        parse_message_type("message task { REQUIRED INT64 id; REQUIRED BYTE_ARRAY text (UTF8); }")
            .expect("schema"),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).expect("create parquet file");
    let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
    let mut start = 0;
    while start < rows {
        let end = (start + group_rows).min(rows);
        let ids: Vec<i64> = (start as i64..end as i64).collect();
        let texts: Vec<ByteArray> = ids
            .iter()
            .map(|i| ByteArray::from(text(*i).as_str()))
            .collect();
        let mut group = writer.next_row_group().expect("row group");
        let mut col = group.next_column().expect("column").expect("id column");
        col.typed::<Int64Type>()
            .write_batch(&ids, None, None)
            .expect("ids");
        col.close().expect("close ids");
        let mut col = group.next_column().expect("column").expect("text column");
        col.typed::<ByteArrayType>()
            .write_batch(&texts, None, None)
            .expect("texts");
        col.close().expect("close texts");
        group.close().expect("close group");
        start = end;
    }
    writer.close().expect("close parquet file");
}

/// Writes a Parquet file with one column `nested`: `levels` lists inside
/// each other (the LIST layout pyarrow writes), and one row whose innermost
/// list holds 7. The writer walks the schema recursively, so it runs on a
/// thread with a big stack.
pub fn write_nested_parquet(path: &Path, levels: usize) {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(move || nested_parquet(&path, levels))
        .expect("writer thread")
        .join()
        .expect("nested parquet written");
}

fn nested_parquet(path: &Path, levels: usize) {
    use std::sync::Arc;

    use parquet::{
        basic::{LogicalType, Repetition, Type as Physical},
        data_type::Int64Type,
        file::{properties::WriterProperties, writer::SerializedFileWriter},
        schema::types::Type,
    };
    let mut inner = Type::primitive_type_builder("element", Physical::INT64)
        .with_repetition(Repetition::OPTIONAL)
        .build()
        .expect("leaf");
    for level in 0..levels {
        let list = Type::group_type_builder("list")
            .with_repetition(Repetition::REPEATED)
            .with_fields(vec![Arc::new(inner)])
            .build()
            .expect("list");
        let name = if level + 1 == levels {
            "nested"
        } else {
            "element"
        };
        inner = Type::group_type_builder(name)
            .with_repetition(Repetition::OPTIONAL)
            .with_logical_type(Some(LogicalType::List))
            .with_fields(vec![Arc::new(list)])
            .build()
            .expect("group");
    }
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![Arc::new(inner)])
        .build()
        .expect("schema");
    let file = std::fs::File::create(path).expect("create parquet file");
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).expect("writer");
    let max_def = writer.schema_descr().column(0).max_def_level();
    let mut group = writer.next_row_group().expect("row group");
    let mut col = group.next_column().expect("column").expect("nested column");
    col.typed::<Int64Type>()
        .write_batch(&[7], Some(&[max_def]), Some(&[0]))
        .expect("value");
    col.close().expect("close column");
    group.close().expect("close group");
    writer.close().expect("close parquet file");
}

/// Writes a zstd Parquet file whose one row has a `text` of `bytes` bytes
/// that compress to almost nothing (a decompression bomb).
pub fn write_parquet_bomb(path: &Path, bytes: usize) {
    use parquet::basic::{Compression, ZstdLevel};
    let zstd = Compression::ZSTD(ZstdLevel::try_new(3).expect("level"));
    write_one_text_row(path, zstd, vec![b'a'; bytes]);
}

/// Writes a zstd Parquet file of one row of `columns` text columns, each
/// `bytes` of `a`: no column alone is a bomb (under the 64 MiB a chunk may
/// inflate to), but reading the row holds every column's page at once.
pub fn write_parquet_wide_bomb(path: &Path, columns: usize, bytes: usize) {
    use parquet::basic::{Compression, ZstdLevel};
    let zstd = Compression::ZSTD(ZstdLevel::try_new(3).expect("level"));
    write_text_columns(path, zstd, columns, vec![b'a'; bytes]);
}

/// Writes a Parquet file of one `text` column holding one row, `text`,
/// in one page (no dictionary, no statistics) compressed with `compression`.
fn write_one_text_row(path: &Path, compression: parquet::basic::Compression, text: Vec<u8>) {
    write_text_columns(path, compression, 1, text);
}

/// Writes a Parquet file of `columns` text columns (`text`, `text1`, ...)
/// holding one row, each `text`, in one page each (no dictionary, no
/// statistics) compressed with `compression`.
fn write_text_columns(
    path: &Path,
    compression: parquet::basic::Compression,
    columns: usize,
    text: Vec<u8>,
) {
    use std::sync::Arc;

    use parquet::{
        data_type::{ByteArray, ByteArrayType},
        file::{
            properties::{EnabledStatistics, WriterProperties},
            writer::SerializedFileWriter,
        },
        schema::parser::parse_message_type,
    };
    let names: Vec<String> = (0..columns)
        .map(|i| match i {
            0 => "text".to_owned(),
            i => format!("text{i}"),
        })
        .collect();
    let fields: String = names
        .iter()
        .map(|name| format!("REQUIRED BYTE_ARRAY {name} (UTF8); "))
        .collect();
    let schema =
        Arc::new(parse_message_type(&format!("message task {{ {fields}}}")).expect("schema"));
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .build(),
    );
    let file = std::fs::File::create(path).expect("create parquet file");
    let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    for _ in &names {
        let mut col = group.next_column().expect("column").expect("a text column");
        col.typed::<ByteArrayType>()
            .write_batch(&[ByteArray::from(text.clone())], None, None)
            .expect("text");
        col.close().expect("close text");
    }
    group.close().expect("close group");
    writer.close().expect("close parquet file");
}

/// Writes a Parquet file of one `text` row whose page is
/// `DELTA_LENGTH_BYTE_ARRAY` encoded and declares `count` values in its
/// lengths' header (the file holds one): the `parquet` crate makes room for
/// `count` lengths (4 bytes each) before it reads one.
pub fn write_parquet_delta_count(path: &Path, count: u64) {
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::Arc;

    use parquet::{
        basic::Encoding,
        data_type::{ByteArray, ByteArrayType},
        file::{
            properties::{EnabledStatistics, WriterProperties},
            writer::SerializedFileWriter,
        },
        schema::parser::parse_message_type,
    };
    let schema = Arc::new(
        parse_message_type("message task { REQUIRED BYTE_ARRAY text (UTF8); }").expect("schema"),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_dictionary_enabled(false)
            .set_encoding(Encoding::DELTA_LENGTH_BYTE_ARRAY)
            .set_statistics_enabled(EnabledStatistics::None)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(
        std::fs::File::create(path).expect("create parquet file"),
        schema,
        props,
    )
    .expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    let mut col = group.next_column().expect("column").expect("a text column");
    col.typed::<ByteArrayType>()
        .write_batch(&[ByteArray::from(vec![b'a'; 100])], None, None)
        .expect("text");
    col.close().expect("close text");
    group.close().expect("close group");
    writer.close().expect("close parquet file");

    let (mut file, start, mut chunk) = first_column_chunk(path);
    let len = chunk.len();
    // The lengths' header: block size 128, 4 miniblocks, 1 value.
    let header = chunk
        .windows(4)
        .position(|w| w == [0x80, 0x01, 0x04, 0x01])
        .expect("a delta header in the page")
        + 3;
    let mut varint = Vec::new();
    let mut n = count;
    while n >= 0x80 {
        varint.push((n as u8) | 0x80);
        n >>= 7;
    }
    varint.push(n as u8);
    // The longer count takes the place of the text's last bytes, so every
    // size the file declares stays true.
    chunk.splice(header..=header, varint.iter().copied());
    chunk.truncate(len);
    file.seek(SeekFrom::Start(start)).expect("seek");
    file.write_all(&chunk).expect("write page");
}

/// The Parquet file at `path` opened to be patched, where its first column
/// chunk starts, and the chunk's bytes.
fn first_column_chunk(path: &Path) -> (std::fs::File, u64, Vec<u8>) {
    use std::io::{Read, Seek, SeekFrom};

    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).expect("open")).expect("read");
    let column = reader.metadata().row_group(0).column(0).clone();
    let start = column.data_page_offset() as u64;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut chunk = vec![0u8; column.compressed_size() as usize];
    file.seek(SeekFrom::Start(start)).expect("seek");
    file.read_exact(&mut chunk).expect("read chunk");
    (file, start, chunk)
}

/// `len` characters that compression cannot shrink much: 64 symbols from a
/// xorshift started at `seed`.
pub fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                    [(x % 64) as usize],
            )
        })
        .collect()
}

/// Writes a GZIP Parquet file of one row whose page holds, in place of its
/// ~770 KB of text, a GZIP member of `inflated` zero bytes: the page header
/// and the footer still declare the text's 1 MiB, so only inflating the
/// page tells (the `parquet` crate inflates it whole before it can).
pub fn write_parquet_gzip_bomb(path: &Path, inflated: usize) {
    use std::io::{Seek, SeekFrom, Write};

    use parquet::basic::{Compression, GzipLevel};
    let text = noise(1, 1 << 20).into_bytes();
    write_one_text_row(path, Compression::GZIP(GzipLevel::default()), text);

    let (mut file, start, chunk) = first_column_chunk(path);
    let payload = chunk
        .windows(3)
        .position(|w| w == [0x1f, 0x8b, 0x08])
        .expect("a gzip member in the page");
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated.div_ceil(zeros.len()) {
        bomb.write_all(&zeros).expect("deflate");
    }
    let bomb = bomb.finish().expect("bomb");
    assert!(
        bomb.len() <= chunk.len() - payload,
        "the bomb ({} bytes) fits the page ({} bytes)",
        bomb.len(),
        chunk.len() - payload
    );
    file.seek(SeekFrom::Start(start + payload as u64))
        .expect("seek");
    file.write_all(&bomb).expect("write bomb");
}

/// The peak resident memory of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kb * 1024
}
