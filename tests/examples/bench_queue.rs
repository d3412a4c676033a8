//! `bench queue N WORKERS [CONCURRENCY]`: N no-op jobs through the Redis
//! queue, run by WORKERS processes of this binary (`bench queue-worker`),
//! each with CONCURRENCY slots (default 4, the worker's default). Jobs are
//! pushed with `Queue::push` (the backlog check included) and run by an
//! apalis worker built with the production queue settings; only the handler
//! is a no-op. Redis' own `INFO cpu` and `INFO commandstats` before and
//! after give the server CPU and the commands each job cost (commands run
//! inside the queue's Lua scripts are listed too), to set against
//! `redis-benchmark` on the same machine.
use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apalis::prelude::*;
use labelsync::{
    config::Settings,
    jobs::{Pushed, Queue, RunJob},
};
use serde_json::json;

fn settings(namespace: &str, concurrency: usize) -> Settings {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let vars = [
        ("REDIS_URL", redis),
        ("LABELSYNC_QUEUE_NAMESPACE", namespace.to_owned()),
        ("LABELSYNC_WORKER_CONCURRENCY", concurrency.to_string()),
    ];
    Settings::from_lookup(|k| {
        vars.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap()
}

async fn open(settings: &Settings) -> Queue {
    // The database only matters to the embedded queue; Redis ignores it.
    let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
    Queue::open(settings, &db).await.unwrap()
}

async fn noop(_job: RunJob) -> Result<(), BoxDynError> {
    Ok(())
}

/// A worker process: runs no-op jobs until killed.
pub async fn worker(namespace: &str, concurrency: usize) {
    let settings = settings(namespace, concurrency);
    let Queue::Redis { storage, .. } = open(&settings).await else {
        unreachable!("REDIS_URL is set")
    };
    let name = format!("bench-{}", ulid::Ulid::new());
    WorkerBuilder::new(name.as_str())
        .backend(storage.poll_with_interval(settings.worker.poll_interval))
        .concurrency(concurrency)
        .build(noop)
        .run()
        .await
        .unwrap();
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `INFO commandstats`: calls and server microseconds per command.
async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            Some((name.to_owned(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// Redis' CPU seconds so far (`INFO cpu`: user + system).
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key, "used_cpu_sys" | "used_cpu_user")
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

pub async fn run(n: usize, workers: usize, concurrency: usize) {
    let namespace = format!("bench_{}", ulid::Ulid::new().to_string().to_lowercase());
    let settings = settings(&namespace, concurrency);
    let queue = open(&settings).await;
    let client = redis::Client::open(settings.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exe = std::env::current_exe().unwrap();
    let _workers = Workers(
        (0..workers)
            .map(|_| {
                Command::new(&exe)
                    .args(["queue-worker", &namespace, &concurrency.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    // Let every worker register and start polling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = commandstats(&mut conn).await;
    let cpu_before = redis_cpu(&mut conn).await;
    let started = Instant::now();
    let mut pushed = 0;
    let mut full_waits = 0u64;
    while pushed < n {
        let job = RunJob::for_run(format!("noop-{pushed}"));
        match queue.push(job, &format!("noop-{pushed}")).await.unwrap() {
            Pushed::Queued => pushed += 1,
            Pushed::Full => {
                full_waits += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let pushed_in = started.elapsed().as_secs_f64();
    loop {
        let depth = queue.depth().await.unwrap();
        if depth.pending == 0 && depth.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = commandstats(&mut conn).await;
    let redis_cpu_seconds = redis_cpu(&mut conn).await - cpu_before;
    let mut per_job: Vec<(String, f64, f64)> = after
        .iter()
        .filter_map(|(name, (calls, usec))| {
            let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
            let calls = calls.saturating_sub(c0);
            (calls > 0 && name != "info").then(|| {
                (
                    name.clone(),
                    calls as f64 / n as f64,
                    usec.saturating_sub(u0) as f64 / n as f64,
                )
            })
        })
        .collect();
    per_job.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "{}",
        json!({
            "bench": "queue",
            "jobs": n,
            "workers": workers,
            "concurrency": concurrency,
            "seconds": seconds,
            "jobs_per_s": n as f64 / seconds,
            "push_seconds": pushed_in,
            "backlog_full_waits": full_waits,
            // Redis' own CPU (user + system) over the run: what one job costs
            // the server, and the jobs/s a saturated Redis core would allow.
            "redis_cpu_seconds": redis_cpu_seconds,
            "redis_cpu_usec_per_job": redis_cpu_seconds * 1e6 / n as f64,
            "redis_bound_jobs_per_s": n as f64 / redis_cpu_seconds,
            "per_job": per_job
                .iter()
                .map(|(name, calls, usec)| json!({ "command": name, "calls": calls, "usec": usec }))
                .collect::<Vec<_>>(),
        })
    );
}
