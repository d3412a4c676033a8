//! `bench latency-tasks N WORKERS RTT_MS`: a Tasks-mode sync of N one-task
//! JSON files from the synthetic S3 server (`labelsync_tests::synthetic_s3`,
//! in this process), which waits RTT_MS before every answer, by WORKERS
//! `labelsync-worker` processes on Postgres + Redis; the scheduler is this
//! process (its API, tick and queue). Reports the wall time from the sync
//! request to the run's end, objects per second, the requests the server
//! answered and the connections it accepted, and the floor for that work
//! at that latency: the sequential listing (pages x RTT) plus the GETs
//! spread over every fetch slot of the fleet (objects x RTT / (workers x
//! worker slots x
//! `LABELSYNC_FETCH_CONCURRENCY`)), and the single-stream bound the issue
//! names (objects x RTT / `LABELSYNC_FETCH_CONCURRENCY`). With WARM_UP
//! (default 0), the fleet first syncs that many files of another storage
//! of the same server, untimed: the measured sync then finds the workers'
//! connections, prepared statements and memory as a fleet that has been
//! running has them (a fresh fleet's first sync pays for them). A second
//! line has the run's timeline, the workers' CPU per object, and
//! `worker_get_ms`: the mean GET round trip as the workers timed it (the
//! server's RTT_MS plus what a busy machine adds on either side). With
//! `BENCH_CONNECT_MS` set, the server reads a new connection only that
//! long after accepting it: the TCP and TLS handshakes of a distant HTTPS
//! endpoint (100 for two round trips at 50 ms), which loopback skips.
//! With `BENCH_FILE_ROWS` (default 1), each file is a JSONL file of that
//! many tasks (about 64 bytes a line), parsed as a worker parses large
//! files (with `BENCH_FILE_FORMAT=json`, a JSON array of them);
//! `BENCH_ROW_BYTES`, when set, pads each task's text to that many bytes
//! (files of long lines: one line of it with `BENCH_FILE_ROWS=1`);
//! `BENCH_WORKER_ARENAS`, when set, is the workers'
//! `MALLOC_ARENA_MAX` (this process keeps its own), and the second line
//! has the fleet's highest peak RSS.
//!
//! `bench latency-files N PREFIXES WORKERS RTT_MS [PARTITIONS]`: a
//! Files-mode sync of N objects spread over PREFIXES top-level prefixes of
//! the same server, with `LABELSYNC_LIST_PARTITIONS=PARTITIONS` (default
//! 64; 1 lists in one sequence, as before partitioned listing). Reports the
//! wall time and its ratio to the sequential listing floor (pages x RTT),
//! then the same for a second sync with nothing new (every key listed and
//! matched, no task written: the listing apart from the insert floor).
//!
//! Needs TEST_POSTGRES_URL and TEST_REDIS_URL (as the tests do).
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::Bytes;
use labelsync_tests::{
    AppOptions, spawn_app, spawn_ready_worker,
    synthetic_s3::{Latency, SyntheticS3},
};
use serde_json::json;

/// How often a sync's end is looked for: the wall times are this fine
/// (the test helper's 100 ms would add up to a tenth to a 1 s sync).
const POLL: Duration = Duration::from_millis(10);

pub async fn run(objects: usize, workers: usize, rtt_ms: u64, warm_up: usize) {
    let rtt = Duration::from_millis(rtt_ms);
    let connect = connect_time();
    let latency = Latency {
        rtt,
        bytes_per_second: None,
    };
    let server = SyntheticS3::start_handshaking(latency, connect).await;
    let rows = file_rows();
    let json_array = std::env::var("BENCH_FILE_FORMAT").is_ok_and(|f| f == "json");
    let pad = row_bytes();
    server.fill(
        "bench",
        (0..objects).map(|i| task_file(i, rows, json_array, pad)),
    );
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::with_storages()
    })
    .await;
    let arenas = std::env::var("BENCH_WORKER_ARENAS").ok();
    let env: Vec<(&str, &str)> = arenas
        .iter()
        .map(|a| ("MALLOC_ARENA_MAX", &a[..]))
        .collect();
    let fleet = spawn_fleet(&app, workers, &env).await;
    if warm_up > 0 {
        warm_up_fleet(&app, &server, warm_up).await;
    }
    let storage = json!({ "prefix": "tasks/", "import_method": "tasks" });
    let worker_cpu = cpu_seconds(&fleet);
    let gets = fleet_gets(&fleet).await;
    let (before, secs, storage, busy) = timed_sync(&app, &server, storage, objects * rows).await;
    let worker_cpu = cpu_seconds(&fleet) - worker_cpu;
    let gets = fleet_gets(&fleet).await - gets;
    report(
        &server,
        before,
        secs,
        objects,
        workers,
        (rtt, connect),
        busy,
    );
    let mut timeline = timeline(&app, &storage).await;
    timeline["worker_cpu_us_per_object"] = json!((worker_cpu * 1e6 / objects as f64).round());
    timeline["worker_get_ms"] = json!((gets.mean_ms() * 10.0).round() / 10.0);
    timeline["rows_per_file"] = json!(rows);
    timeline["malloc_arena_max"] = json!(arenas);
    timeline["worker_peak_rss_mb"] = json!(
        fleet
            .iter()
            .map(|w| labelsync_tests::peak_rss(w.0.id()) >> 20)
            .max()
    );
    println!("{timeline}");
    drop(fleet);
    app.stop().await;
}

/// Syncs `objects` one-task files of the server's `warm` bucket, so the
/// fleet has run a sync before the measured one (see the module's
/// documentation).
async fn warm_up_fleet(app: &labelsync_tests::TestApp, server: &SyntheticS3, objects: usize) {
    server.fill(
        "warm",
        (0..objects).map(|i| {
            let body = json!({ "data": { "text": format!("warm {i}") } }).to_string();
            (format!("warm/w-{i:07}.json"), Bytes::from(body))
        }),
    );
    let project = app.project("warm-up").await;
    let (status, storage) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "source", "backend": "s3",
                "config": { "bucket": "warm", "endpoint_url": server.endpoint },
                "secrets": { "access_key_id": "k", "secret_access_key": "s" },
                "prefix": "warm/", "import_method": "tasks",
            }),
        )
        .await;
    assert_eq!(status, 201, "{storage}");
    let run = sync(app, &storage["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    // The report counts the measured sync's requests only.
    let c = &server.counts;
    for count in [
        &c.list,
        &c.get,
        &c.sdk_get,
        &c.head,
        &c.put,
        &c.delete,
        &c.other,
        &c.connections,
    ] {
        count.store(0, Ordering::Relaxed);
    }
}

/// WORKERS worker processes with the production page size (the test
/// helper's default is 100) and `env`; their log filter is
/// `BENCH_WORKER_LOG` (default `warn`), their log on this stderr.
async fn spawn_fleet(
    app: &labelsync_tests::TestApp,
    workers: usize,
    env: &[(&str, &str)],
) -> Vec<labelsync_tests::Worker> {
    let page = defaults().worker.page_size.to_string();
    let log = std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into());
    let mut env = env.to_vec();
    env.push(("LABELSYNC_PAGE_SIZE", page.as_str()));
    env.push(("RUST_LOG", log.as_str()));
    let mut fleet = Vec::new();
    for w in 0..workers {
        fleet.push(spawn_ready_worker(app, &format!("bench-{w}"), &env).await);
    }
    fleet
}

/// Syncs a storage and waits for the run's end, looking every [`POLL`].
async fn sync(app: &labelsync_tests::TestApp, storage: &serde_json::Value) -> serde_json::Value {
    let run_id = app.start_sync(storage).await;
    app.wait_run_polling(&run_id, Duration::from_secs(600), POLL)
        .await
}

/// Syncs `storage` again and checks that it listed `objects` and made no
/// task; returns the sync's seconds.
async fn timed_resync(
    app: &labelsync_tests::TestApp,
    storage: &serde_json::Value,
    objects: usize,
) -> f64 {
    let started = Instant::now();
    let run = sync(app, storage).await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["listed"], objects as i64, "{run}");
    assert_eq!(run["counters"]["created"], 0, "{run}");
    secs
}

/// Makes a source storage of the server's `bench` bucket (with `extra`
/// fields), syncs it, and checks that it made `tasks` tasks; returns the
/// server's request count before the sync, the sync's seconds, the
/// storage's id and the machine's busy share during the sync.
async fn timed_sync(
    app: &labelsync_tests::TestApp,
    server: &SyntheticS3,
    extra: serde_json::Value,
    tasks: usize,
) -> (u64, f64, serde_json::Value, f64) {
    let project = app.project("latency").await;
    let mut body = json!({
        "project_id": project, "role": "source", "backend": "s3",
        "config": { "bucket": "bench", "endpoint_url": server.endpoint },
        "secrets": { "access_key_id": "k", "secret_access_key": "s" },
    });
    for (key, value) in extra.as_object().into_iter().flatten() {
        body[key] = value.clone();
    }
    let (status, storage) = app.post("/api/v1/storages", body).await;
    assert_eq!(status, 201, "{storage}");
    let before = server.counts.total();
    let cpu = cpu_ticks();
    let started = Instant::now();
    let run = sync(app, &storage["id"]).await;
    let secs = started.elapsed().as_secs_f64();
    let busy = busy_since(cpu);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["counters"]["created"], tasks as i64, "{run}");
    (before, secs, storage["id"].clone(), busy)
}

/// The fleet's GET requests so far and their seconds, as the workers timed
/// them (their `labelsync_storage_request_duration_seconds` histograms):
/// the round trip each read saw, the server's delay plus what a busy
/// machine adds on either side.
#[derive(Debug, Clone, Copy, Default)]
struct Gets {
    count: f64,
    seconds: f64,
}

impl Gets {
    fn mean_ms(self) -> f64 {
        if self.count > 0.0 {
            self.seconds / self.count * 1000.0
        } else {
            0.0
        }
    }
}

impl std::ops::Sub for Gets {
    type Output = Gets;
    fn sub(self, before: Gets) -> Gets {
        Gets {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
        }
    }
}

/// [`Gets`] summed over the fleet's `/metrics`.
async fn fleet_gets(fleet: &[labelsync_tests::Worker]) -> Gets {
    let mut total = Gets::default();
    for worker in fleet {
        let addr = worker
            .metrics_addr()
            .expect("a worker with a metrics listener");
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("the worker's metrics")
            .text()
            .await
            .expect("the worker's metrics");
        let gets = |name| {
            labelsync_tests::metric_samples(&text, name, &[("operation", "get")]).sum::<f64>()
        };
        total.seconds += gets("labelsync_storage_request_duration_seconds_sum");
        total.count += gets("labelsync_storage_request_duration_seconds_count");
    }
    total
}

/// The machine's busy and total CPU ticks so far (`/proc/stat`).
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .expect("the cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = ticks[3] + ticks[4];
    let total: u64 = ticks.iter().take(8).sum();
    (total - idle, total)
}

/// The CPU time the fleet's processes used so far, in seconds (user and
/// system, from `/proc/<pid>/stat`, at the kernel's 100 ticks a second).
fn cpu_seconds(fleet: &[labelsync_tests::Worker]) -> f64 {
    let ticks: u64 = fleet
        .iter()
        .map(|w| {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.0.id()))
                .expect("the worker's /proc stat");
            // After the command's closing parenthesis: fields 3.., so utime
            // (field 14) and stime (15) are the 12th and 13th.
            let rest = stat.rsplit_once(')').expect("a stat line").1;
            let fields: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse().ok())
                .collect();
            fields.iter().sum::<u64>()
        })
        .sum();
    ticks as f64 / 100.0
}

/// The share of the machine's CPU time that was busy since `before`.
fn busy_since(before: (u64, u64)) -> f64 {
    let now = cpu_ticks();
    let total = (now.1 - before.1).max(1) as f64;
    ((now.0 - before.0) as f64 / total * 100.0).round() / 100.0
}

/// Where the storage's last run spent its time, in ms from its request
/// (the database's clocks, not the bench's 100 ms polling): taken by a
/// worker, first and last batch made, first and last batch done, ended;
/// and for each worker that finished batches (`sync-job`: the run's own
/// job), how many and when its last one was done.
async fn timeline(
    app: &labelsync_tests::TestApp,
    storage: &serde_json::Value,
) -> serde_json::Value {
    use sea_orm::{ConnectionTrait, Statement};
    let db = sea_orm::Database::connect(&app.database_url)
        .await
        .expect("bench database");
    let sql = "SELECT \
        (1000 * EXTRACT(EPOCH FROM r.started_at - r.queued_at))::float8 AS taken, \
        (1000 * EXTRACT(EPOCH FROM MIN(b.created_at) - r.queued_at))::float8 AS first_batch, \
        (1000 * EXTRACT(EPOCH FROM MAX(b.created_at) - r.queued_at))::float8 AS last_batch, \
        (1000 * EXTRACT(EPOCH FROM MIN(b.finished_at) - r.queued_at))::float8 AS first_done, \
        (1000 * EXTRACT(EPOCH FROM MAX(b.finished_at) - r.queued_at))::float8 AS last_done, \
        (1000 * EXTRACT(EPOCH FROM r.finished_at - r.queued_at))::float8 AS ended, \
        COUNT(b.id) AS batches \
        FROM sync_runs r LEFT JOIN sync_batches b ON b.run_id = r.id \
        WHERE r.storage_id = $1 GROUP BY r.id ORDER BY r.queued_at DESC LIMIT 1";
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [storage.as_i64().expect("storage id").into()],
        ))
        .await
        .expect("timeline")
        .expect("the run");
    let ms = |c: &str| {
        row.try_get::<Option<f64>>("", c)
            .ok()
            .flatten()
            .map(f64::round)
    };
    let by_worker = "SELECT b.worker, COUNT(*) AS batches, \
        (1000 * EXTRACT(EPOCH FROM MAX(b.finished_at) - r.queued_at))::float8 AS last_done \
        FROM sync_batches b JOIN sync_runs r ON r.id = b.run_id \
        WHERE b.run_id = (SELECT id FROM sync_runs WHERE storage_id = $1 \
        ORDER BY queued_at DESC LIMIT 1) GROUP BY b.worker, r.queued_at ORDER BY b.worker";
    let workers: Vec<serde_json::Value> = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            by_worker,
            [storage.as_i64().expect("storage id").into()],
        ))
        .await
        .expect("batches by worker")
        .iter()
        .map(|r| {
            json!([
                r.try_get::<Option<String>>("", "worker").ok().flatten(),
                r.try_get::<i64>("", "batches").unwrap_or(0),
                r.try_get::<Option<f64>>("", "last_done")
                    .ok()
                    .flatten()
                    .map(f64::round),
            ])
        })
        .collect();
    json!({
        "by_worker": workers,
        "timeline_ms": {
            "taken": ms("taken"), "first_batch": ms("first_batch"), "last_batch": ms("last_batch"),
            "first_done": ms("first_done"), "last_done": ms("last_done"), "ended": ms("ended"),
        },
        "batches": row.try_get::<i64>("", "batches").unwrap_or(0),
    })
}

fn defaults() -> labelsync::config::Settings {
    labelsync::config::Settings::from_lookup(|_| None).expect("default settings")
}

/// `BENCH_FILE_ROWS`: see the module's documentation (default 1).
fn file_rows() -> usize {
    let rows = std::env::var("BENCH_FILE_ROWS").map_or(Ok(1), |v| v.parse::<usize>());
    rows.expect("BENCH_FILE_ROWS: a number of rows").max(1)
}

/// `BENCH_ROW_BYTES`: see the module's documentation (default: no padding).
fn row_bytes() -> usize {
    let bytes = std::env::var("BENCH_ROW_BYTES").map_or(Ok(0), |v| v.parse::<usize>());
    bytes.expect("BENCH_ROW_BYTES: a number of bytes")
}

/// `text` padded with `x` to `pad` bytes.
fn padded(mut text: String, pad: usize) -> String {
    let missing = pad.saturating_sub(text.len());
    text.extend(std::iter::repeat_n('x', missing));
    text
}

/// The `i`th task file: one JSON task, or a JSONL file of `rows` tasks of
/// about 64 bytes each (a JSON array of them with `json_array`), each
/// task's text padded to `pad` bytes. One padded task is a JSONL file of
/// one line.
fn task_file(i: usize, rows: usize, json_array: bool, pad: usize) -> (String, Bytes) {
    if rows == 1 && pad == 0 {
        let body = json!({ "data": { "text": format!("task {i}") } }).to_string();
        return (format!("tasks/t-{i:07}.json"), Bytes::from(body));
    }
    let mut body = String::with_capacity(rows * pad.max(64));
    for r in 0..rows {
        let text = padded(format!("task {i} row {r}"), pad);
        let line = json!({ "data": { "text": text, "n": r } });
        body.push_str(&line.to_string());
        body.push('\n');
    }
    if json_array {
        let array = format!("[{}]", body.trim_end().replace('\n', ","));
        return (format!("tasks/t-{i:07}.json"), Bytes::from(array));
    }
    (format!("tasks/t-{i:07}.jsonl"), Bytes::from(body))
}

/// `BENCH_CONNECT_MS`: see the module's documentation (default 0).
fn connect_time() -> Duration {
    let ms = std::env::var("BENCH_CONNECT_MS").map_or(Ok(0), |v| v.parse::<u64>());
    Duration::from_millis(ms.expect("BENCH_CONNECT_MS: a number of milliseconds"))
}

/// One JSON line: the measurement and its floors.
fn report(
    server: &SyntheticS3,
    before: u64,
    secs: f64,
    objects: usize,
    workers: usize,
    (rtt, connect): (Duration, Duration),
    cpu_busy: f64,
) {
    let settings = defaults();
    let (fetch, slots) = (
        settings.worker.fetch_concurrency,
        settings.worker.concurrency,
    );
    let rtt_s = rtt.as_secs_f64();
    let pages = objects.div_ceil(settings.worker.page_size) as f64;
    let fleet_floor = pages * rtt_s + objects as f64 * rtt_s / (workers * slots * fetch) as f64;
    let stream_floor = objects as f64 * rtt_s / fetch as f64;
    let c = &server.counts;
    println!(
        "{}",
        json!({
            "bench": "latency-tasks", "objects": objects, "workers": workers,
            "rtt_ms": rtt.as_millis() as u64, "connect_ms": connect.as_millis() as u64, "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "seconds": (secs * 100.0).round() / 100.0,
            "objects_per_s": (objects as f64 / secs).round(),
            "requests": server.counts.total() - before,
            "lists": c.list.load(Ordering::Relaxed), "gets": c.get.load(Ordering::Relaxed),
            "sdk_gets": c.sdk_get.load(Ordering::Relaxed),
            "connections": c.connections.load(Ordering::Relaxed),
            "fleet_floor_s": (fleet_floor * 100.0).round() / 100.0,
            "x_fleet_floor": (secs / fleet_floor * 100.0).round() / 100.0,
            "one_stream_floor_s": (stream_floor * 100.0).round() / 100.0,
            "x_one_stream_floor": (secs / stream_floor * 100.0).round() / 100.0,
            "cpu_busy": cpu_busy,
        })
    );
}

/// `latency-files`: see the module's documentation.
pub async fn run_files(
    objects: usize,
    prefixes: usize,
    workers: usize,
    rtt_ms: u64,
    partitions: usize,
) {
    let rtt = Duration::from_millis(rtt_ms);
    let server = SyntheticS3::start(Latency {
        rtt,
        bytes_per_second: None,
    })
    .await;
    server.fill(
        "bench",
        (0..objects).map(|i| {
            (
                format!("p{:03}/f-{i:08}.jpg", i % prefixes.max(1)),
                Bytes::from_static(b"x"),
            )
        }),
    );
    let app = spawn_app(AppOptions {
        workers: false,
        ..AppOptions::with_storages()
    })
    .await;
    let parts = partitions.to_string();
    let fleet = spawn_fleet(
        &app,
        workers,
        &[("LABELSYNC_LIST_PARTITIONS", parts.as_str())],
    )
    .await;
    let (before, secs, storage, _) = timed_sync(&app, &server, json!({}), objects).await;
    let requests = server.counts.total() - before;
    // A re-sync with nothing new lists every key and writes no task: the
    // listing's own speed, apart from the database's insert floor.
    let resync_secs = timed_resync(&app, &storage, objects).await;
    let pages = objects.div_ceil(defaults().worker.page_size) as f64;
    let floor = pages * rtt.as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "latency-files", "objects": objects, "prefixes": prefixes, "workers": workers,
            "partitions": partitions, "rtt_ms": rtt_ms,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "seconds": (secs * 100.0).round() / 100.0,
            "objects_per_s": (objects as f64 / secs).round(),
            "requests": requests,
            "listing_floor_s": (floor * 100.0).round() / 100.0,
            "speedup_over_listing_floor": (floor / secs * 100.0).round() / 100.0,
            "resync_seconds": (resync_secs * 100.0).round() / 100.0,
            "resync_speedup_over_listing_floor": (floor / resync_secs * 100.0).round() / 100.0,
        })
    );
    drop(fleet);
    app.stop().await;
}
