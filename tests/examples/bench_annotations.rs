//! `bench annotations CLIENTS SECONDS RATE RTT_MS`: annotations saved over
//! the API while an S3 export target (the synthetic server, at RTT_MS per
//! request) receives them. A scheduler with its in-process worker on
//! Postgres + Redis (this process) serves both the API and the exports.
//! 1. Throughput: CLIENTS concurrent clients post annotations for SECONDS:
//!    annotations per second and p50 / p99 of the request.
//! 2. Save to storage: after the first phase's exports drained, RATE
//!    annotations a second for SECONDS (at most CLIENTS in flight): for each,
//!    the time from its 201 to its object being written in the bucket,
//!    p50 / p99, and the rate reached.
//!
//! Needs TEST_POSTGRES_URL and TEST_REDIS_URL (as the tests do).
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use labelsync_tests::{
    AppOptions, TestApp, spawn_app,
    synthetic_s3::{Latency, SyntheticS3},
    write_files,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const TOKEN: &str = "bench-annotations-token";

pub async fn run(clients: usize, seconds: u64, rate: u64, rtt_ms: u64) {
    let server = SyntheticS3::start(Latency {
        rtt: Duration::from_millis(rtt_ms),
        bytes_per_second: None,
    })
    .await;
    server.fill("labels", []);
    // A configured token, as in production (the open loopback mode asks the
    // database on every request whether a token was ever made).
    let app = spawn_app(AppOptions {
        token: Some(TOKEN.into()),
        ..AppOptions::with_storages()
    })
    .await;
    let tasks = tasks_with_a_target(&app, &server).await;
    let tasks = Arc::new(tasks);

    let (saved, latencies, secs) = flood(&app, &tasks, clients, Duration::from_secs(seconds)).await;
    let post = percentiles(latencies);
    wait_for_objects(&server, saved.len()).await;
    let (paced, delays, paced_secs) = paced(&app, &tasks, clients, rate, seconds).await;
    let written = wait_for_objects(&server, saved.len() + paced.len()).await;
    let to_storage: Vec<Duration> = paced
        .iter()
        .filter_map(|(id, answered)| {
            let at = written.get(&labelsync::export::object_key("ann", *id))?;
            Some(at.saturating_duration_since(*answered))
        })
        .collect();
    print_worst_per_second(&paced, &written);
    let stored = percentiles(to_storage);
    let paced_post = percentiles(delays);
    println!(
        "{}",
        json!({
            "bench": "annotations", "clients": clients, "rtt_ms": rtt_ms,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "flood": { "annotations": saved.len(), "seconds": round(secs),
                       "per_s": round(saved.len() as f64 / secs), "p50_ms": post.0, "p99_ms": post.1 },
            "paced": { "asked_per_s": rate, "annotations": paced.len(),
                       "per_s": round(paced.len() as f64 / paced_secs),
                       "post_p50_ms": paced_post.0, "post_p99_ms": paced_post.1,
                       "to_storage_p50_ms": stored.0, "to_storage_p99_ms": stored.1 },
        })
    );
    app.stop().await;
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// 1,000 tasks from a local source, and an S3 export target on `server`.
async fn tasks_with_a_target(app: &TestApp, server: &SyntheticS3) -> Vec<i64> {
    write_files(&app.doc_root.path().join("images"), 1000, "jpg");
    let project = app.project("annotations").await;
    let source = app
        .local_storage(project, json!({ "config": { "path": "images" } }))
        .await;
    let run = app.sync(&source["id"]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let (status, target) = app
        .post(
            "/api/v1/storages",
            json!({
                "project_id": project, "role": "target", "backend": "s3", "prefix": "ann",
                "config": { "bucket": "labels", "endpoint_url": server.endpoint },
                "secrets": { "access_key_id": "k", "secret_access_key": "s" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{target}");
    let tasks: Vec<i64> = app
        .all_tasks(project)
        .await
        .iter()
        .filter_map(|t| t["id"].as_i64())
        .collect();
    assert_eq!(tasks.len(), 1000);
    tasks
}

/// Posts one annotation on task `n % tasks`; its id and how long it took.
async fn post(client: &reqwest::Client, base: &str, tasks: &[i64], n: usize) -> (i64, Duration) {
    let task = tasks[n % tasks.len()];
    let body = json!({ "result": [{ "type": "choices", "value": { "choices": ["cat"] } }], "lead_time": 1.5 });
    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/v1/tasks/{task}/annotations"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let saved: Value = response.json().await.expect("JSON");
    (saved["id"].as_i64().expect("id"), started.elapsed())
}

/// `clients` loops posting as fast as they can for `span`.
async fn flood(
    app: &TestApp,
    tasks: &Arc<Vec<i64>>,
    clients: usize,
    span: Duration,
) -> (Vec<i64>, Vec<Duration>, f64) {
    let started = Instant::now();
    let loops: Vec<_> = (0..clients)
        .map(|c| {
            let (client, base, tasks) = (app.client.clone(), app.base.clone(), tasks.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut n = c;
                while started.elapsed() < span {
                    out.push(post(&client, &base, &tasks, n).await);
                    n += clients;
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.expect("client"));
    }
    let secs = started.elapsed().as_secs_f64();
    let (ids, latencies) = all.into_iter().unzip();
    (ids, latencies, secs)
}

/// `rate` posts a second for `seconds`, at most `clients` in flight: each
/// annotation's id with the instant its 201 arrived, and the post times.
async fn paced(
    app: &TestApp,
    tasks: &Arc<Vec<i64>>,
    clients: usize,
    rate: u64,
    seconds: u64,
) -> (Vec<(i64, Instant)>, Vec<Duration>, f64) {
    let slots = Arc::new(Semaphore::new(clients));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let started = Instant::now();
    let mut posts = Vec::new();
    for n in 0..(rate * seconds) as usize {
        tick.tick().await;
        let permit = slots.clone().acquire_owned().await.expect("slot");
        let (client, base, tasks) = (app.client.clone(), app.base.clone(), tasks.clone());
        posts.push(tokio::spawn(async move {
            let (id, took) = post(&client, &base, &tasks, n).await;
            drop(permit);
            (id, Instant::now(), took)
        }));
    }
    let mut out = Vec::new();
    for p in posts {
        out.push(p.await.expect("post"));
    }
    let secs = started.elapsed().as_secs_f64();
    let took = out.iter().map(|o| o.2).collect();
    (
        out.into_iter().map(|(id, at, _)| (id, at)).collect(),
        took,
        secs,
    )
}

/// Waits (up to 5 minutes) until the bucket holds `n` objects; when each
/// was written.
async fn wait_for_objects(
    server: &SyntheticS3,
    n: usize,
) -> std::collections::HashMap<String, Instant> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while server.len("labels") < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} exported",
            server.len("labels")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.written("labels")
}

/// On stderr, for each second of the paced phase, the slowest save to
/// storage of the annotations answered in it: shows whether the tail is
/// spread or bunched (a stalled export run, a sweep, a vacuum).
fn print_worst_per_second(
    paced: &[(i64, Instant)],
    written: &std::collections::HashMap<String, Instant>,
) {
    let Some(start) = paced.iter().map(|p| p.1).min() else {
        return;
    };
    let mut worst: std::collections::BTreeMap<u64, u128> = Default::default();
    for (id, answered) in paced {
        let Some(at) = written.get(&labelsync::export::object_key("ann", *id)) else {
            continue;
        };
        let second = answered.duration_since(start).as_secs();
        let ms = at.saturating_duration_since(*answered).as_millis();
        let slot = worst.entry(second).or_default();
        *slot = (*slot).max(ms);
    }
    let line: Vec<String> = worst.iter().map(|(s, ms)| format!("{s}:{ms}")).collect();
    eprintln!(
        "slowest save to storage per second (s:ms): {}",
        line.join(" ")
    );
}

/// p50 and p99 in milliseconds.
fn percentiles(mut values: Vec<Duration>) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values.sort();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (
        round(at(0.5).as_secs_f64() * 1000.0),
        round(at(0.99).as_secs_f64() * 1000.0),
    )
}
