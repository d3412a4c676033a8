//! Benchmarks of the export engine and of Files-mode imports from S3, run
//! in-process through the same job code the workers run:
//!
//! ```sh
//! eval "$(bash tests/emulators.sh | grep ^export)"
//! cargo run --release -p labelsync-tests --example bench -- export local 100000 postgres://…/empty_db
//! cargo run --release -p labelsync-tests --example bench -- export s3 10000 postgres://…/empty_db
//! cargo run --release -p labelsync-tests --example bench -- import-s3 100000 postgres://…/empty_db moto
//! cargo run --release -p labelsync-tests --example bench -- queue 20000 2
//! cargo run --release -p labelsync-tests --example bench -- latency-tasks 2000 4 50
//! cargo run --release -p labelsync-tests --example bench -- annotations 64 60 500 50
//! ```
//!
//! `export`: N annotations (on N tasks, inserted in bulk) exported to a
//! local directory, s3s-fs (`s3`) or moto, then exported again with nothing
//! changed.
//! `import-s3`: N objects put into an s3s-fs (or moto) bucket, listed once (the floor),
//! then synced in Files mode.
//! `queue`: no-op jobs through the Redis queue (see `bench_queue.rs`).
//! `latency-tasks`: a Tasks-mode sync from a synthetic S3 server at a round
//! trip of RTT_MS, by WORKERS worker processes (see `bench_latency.rs`).
//! `annotations`: annotations posted by CLIENTS concurrent clients with an
//! S3 export target at RTT_MS (see `bench_annotations.rs`).
//! `s3-server`: the synthetic S3 server alone, answering after RTT_MS, until
//! killed; prints its endpoint (`tests/bench-resolve.sh` puts it behind
//! `/resolve` as a distant bucket).
//! Prints one JSON line per measurement.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use labelsync::{
    config::Settings,
    db::{self, runs},
    jobs::{self, JobContext},
    storage::{
        BackendKind, ListOptions,
        spec::{self, StorageSpec},
    },
};
use labelsync_tests::{
    backends::{bucket_name, create_s3_bucket, endpoint, open},
    synthetic_s3::{Latency, SyntheticS3},
};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};

fn usage() -> ! {
    eprintln!(
        "usage: bench export local|s3|moto N DATABASE_URL | bench import-s3 N DATABASE_URL [s3s|moto] | bench queue N WORKERS [CONCURRENCY] | bench latency-tasks N WORKERS RTT_MS [WARM_UP] | bench latency-files N PREFIXES WORKERS RTT_MS [PARTITIONS] | bench annotations CLIENTS SECONDS RATE RTT_MS | bench s3-server RTT_MS"
    );
    std::process::exit(2)
}

fn s3s() -> (String, String, String) {
    (
        endpoint("TEST_S3S_ENDPOINT"),
        std::env::var("TEST_S3S_ACCESS_KEY").unwrap_or_else(|_| "labelsync-test".into()),
        std::env::var("TEST_S3S_SECRET_KEY").unwrap_or_else(|_| "labelsync-test-secret".into()),
    )
}

/// Runs the synthetic S3 server until the process is killed; its endpoint
/// is the one line printed.
async fn serve_synthetic_s3(rtt_ms: u64) {
    let server = SyntheticS3::start(Latency {
        rtt: std::time::Duration::from_millis(rtt_ms),
        bytes_per_second: None,
    })
    .await;
    println!("{}", server.endpoint);
    futures::future::pending::<()>().await;
}

mod bench_annotations;
mod bench_latency;
mod bench_queue;

// The scheduler and its in-process worker run in this process: the
// scheduler binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if run_fleet_bench(&args).await {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (mode, target, n, url) = match args.as_slice() {
        [m, t, n, u] if m == "export" => (
            m.clone(),
            t.clone(),
            n.parse().unwrap_or_else(|_| usage()),
            u.clone(),
        ),
        [m, n, u] if m == "import-s3" => (
            m.clone(),
            "s3s".to_owned(),
            n.parse().unwrap_or_else(|_| usage()),
            u.clone(),
        ),
        [m, n, u, e] if m == "import-s3" => (
            m.clone(),
            e.clone(),
            n.parse().unwrap_or_else(|_| usage()),
            u.clone(),
        ),
        _ => usage(),
    };
    let vars = [
        ("DATABASE_URL", url.clone()),
        (
            "LOCAL_FILES_DOCUMENT_ROOT",
            root.path().display().to_string(),
        ),
        ("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS", "true".into()),
        (
            "LABELSYNC_SECRET_KEY",
            labelsync_tests::TEST_SECRET_KEY.into(),
        ),
        ("RUST_LOG", "warn".into()),
    ];
    let settings = Settings::from_lookup(|k| {
        vars.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    let db = db::connect(&url).await.unwrap();
    db::migrate(&db).await.unwrap();
    let ctx = JobContext::new(db.clone(), settings, None);
    if mode == "export" {
        bench_export(&ctx, &db, &target, n, root.path()).await;
    } else {
        bench_import_s3(
            &ctx,
            &db,
            usize::try_from(n).unwrap_or_else(|_| usage()),
            &target,
        )
        .await;
    }
}

/// The benches that run a fleet or a server of their own (queue,
/// annotations, latency, the synthetic S3 server); false when `args` name
/// none of them.
async fn run_fleet_bench(args: &[String]) -> bool {
    let number = |s: &String| s.parse::<usize>().unwrap_or_else(|_| usage());
    match args {
        [m, n, w] if m == "queue" => bench_queue::run(number(n), number(w), 4).await,
        [m, n, w, c] if m == "queue" => bench_queue::run(number(n), number(w), number(c)).await,
        [m, ns, c] if m == "queue-worker" => bench_queue::worker(ns, number(c)).await,
        [m, c, s, r, rtt] if m == "annotations" => {
            bench_annotations::run(
                number(c),
                number(s) as u64,
                number(r) as u64,
                number(rtt) as u64,
            )
            .await;
        }
        [m, n, p, w, rtt, rest @ ..] if m == "latency-files" && rest.len() <= 1 => {
            let partitions = rest.first().map_or(64, &number);
            let (n, p, w, rtt) = (number(n), number(p), number(w), number(rtt) as u64);
            bench_latency::run_files(n, p, w, rtt, partitions).await;
        }
        [m, rtt] if m == "s3-server" => serve_synthetic_s3(number(rtt) as u64).await,
        [m, n, w, rtt, rest @ ..] if m == "latency-tasks" && rest.len() <= 1 => {
            let warm_up = rest.first().map_or(0, &number);
            bench_latency::run(number(n), number(w), number(rtt) as u64, warm_up).await;
        }
        _ => return false,
    }
    true
}

async fn exec(db: &DatabaseConnection, sql: String) {
    db.execute_unprepared(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Creates a storage from a spec body, as the API does.
async fn storage(ctx: &JobContext, body: Value) -> labelsync::db::entities::storage::Model {
    let spec = StorageSpec::from_json(body).unwrap();
    let valid = spec.validate(&ctx.storage_env).await.unwrap();
    spec::save(
        &ctx.db,
        &spec,
        &valid,
        spec.project_id.unwrap(),
        None,
        &ctx.storage_env,
    )
    .await
    .unwrap()
}

/// Runs one sync of a storage to its end in this process; returns the run and seconds.
async fn sync(ctx: &JobContext, storage_id: i64, kind: runs::RunKind) -> (Value, f64) {
    let (run, _) = runs::create_or_get_live(&ctx.db, storage_id, kind)
        .await
        .unwrap();
    let started = Instant::now();
    while jobs::execute(ctx, &run.id).await.is_err() {}
    let seconds = started.elapsed().as_secs_f64();
    (
        runs::to_json(&runs::get(&ctx.db, &run.id).await.unwrap()),
        seconds,
    )
}

async fn project(db: &DatabaseConnection) -> i64 {
    exec(db, "INSERT INTO projects (title, data_key, created_at, updated_at) VALUES ('bench', 'image', now(), now())".into()).await;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT max(id) AS id FROM projects",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "id").unwrap()
}

async fn bench_export(
    ctx: &JobContext,
    db: &DatabaseConnection,
    target: &str,
    n: i64,
    root: &std::path::Path,
) {
    let project = project(db).await;
    let started = Instant::now();
    exec(db, format!(
        "INSERT INTO tasks (project_id, data, created_at, updated_at) \
         SELECT {project}, jsonb_build_object('image', 's3://bucket/img-' || g || '.jpg'), now(), now() FROM generate_series(1, {n}) g"
    )).await;
    exec(db, format!(
        "INSERT INTO annotations (task_id, project_id, result, completed_by, lead_time, was_cancelled, ground_truth, created_at, updated_at) \
         SELECT id, {project}, jsonb_build_array(jsonb_build_object('type', 'choices', 'value', jsonb_build_object('choices', jsonb_build_array('cat')))), \
         jsonb_build_object('id', 1, 'email', 'a@example.com'), 3.5, false, false, now(), now() FROM tasks WHERE project_id = {project}"
    )).await;
    eprintln!(
        "inserted {n} tasks and annotations in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let body = match target {
        "local" => {
            std::fs::create_dir_all(root.join("export")).unwrap();
            json!({ "project_id": project, "role": "target", "backend": "local", "prefix": "ann", "config": { "path": "export" } })
        }
        "s3" | "moto" => {
            let (url, key, secret) = if target == "moto" {
                (endpoint("TEST_S3_ENDPOINT"), "test".into(), "test".into())
            } else {
                s3s()
            };
            let bucket = bucket_name();
            create_s3_bucket(&url, &key, &secret, &bucket).await;
            json!({ "project_id": project, "role": "target", "backend": "s3", "prefix": "ann",
                    "config": { "bucket": bucket, "endpoint_url": url },
                    "secrets": { "access_key_id": key, "secret_access_key": secret } })
        }
        _ => usage(),
    };
    let target_row = storage(ctx, body).await;
    for pass in ["first", "no-change"] {
        let (run, seconds) = sync(ctx, target_row.id, runs::RunKind::Export).await;
        let c = &run["counters"];
        println!(
            "{}",
            json!({ "bench": "export", "target": target, "annotations": n, "pass": pass, "status": run["status"],
                    "exported": c["exported"], "unchanged": c["unchanged"], "failed": c["failed"],
                    "seconds": seconds, "annotations_per_s": n as f64 / seconds })
        );
    }
}

async fn bench_import_s3(ctx: &JobContext, db: &DatabaseConnection, n: usize, emulator: &str) {
    let (url, key, secret) = match emulator {
        "moto" => (endpoint("TEST_S3_ENDPOINT"), "test".into(), "test".into()),
        "s3s" => s3s(),
        _ => usage(),
    };
    let bucket = bucket_name();
    create_s3_bucket(&url, &key, &secret, &bucket).await;
    let config = json!({ "bucket": bucket, "endpoint_url": url });
    let secrets = json!({ "access_key_id": key, "secret_access_key": secret });
    let s3 = open(BackendKind::S3, config.clone(), secrets.clone()).await;
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let s3 = s3.clone();
            async move {
                s3.put(
                    &format!("images/{:03}/img-{i:07}.jpg", i / 1000),
                    Bytes::from_static(b"jpeg"),
                    None,
                )
                .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    eprintln!(
        "put {n} objects in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let listed: usize = s3
        .list(ListOptions {
            prefix: "images/".into(),
            recursive: true,
            start_after: None,
            page_size: 1000,
        })
        .map_ok(|p| p.objects.len())
        .try_fold(0, |a, b| async move { Ok(a + b) })
        .await
        .unwrap();
    let list_seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({ "bench": "list-s3", "emulator": emulator, "objects": listed, "seconds": list_seconds })
    );

    let project = project(db).await;
    let source = storage(
        ctx,
        json!({ "project_id": project, "role": "source", "backend": "s3", "prefix": "images/",
                                      "config": config, "secrets": secrets }),
    )
    .await;
    let (run, seconds) = sync(ctx, source.id, runs::RunKind::Import).await;
    println!(
        "{}",
        json!({ "bench": "import-s3-files", "emulator": emulator, "objects": n, "status": run["status"], "created": run["counters"]["created"],
                "seconds": seconds, "objects_per_s": n as f64 / seconds, "ratio_to_listing": seconds / list_seconds })
    );
}
