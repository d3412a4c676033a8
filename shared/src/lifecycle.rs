//! Process lifecycle shared by both binaries: the shutdown signal, the
//! readiness probe, the `/metrics` answer, the worker's probe listener and
//! the worker process's main loop. The top of the library: it may use every
//! other module, none uses it.
use std::sync::Arc;

use crate::{
    Error, Result,
    config::Settings,
    db,
    jobs::{JobContext, Queue},
    metrics::metrics,
};

/// How many malloc arenas a worker process runs on when its environment
/// sets no limit (see [`bound_malloc_arenas`]).
pub const WORKER_MALLOC_ARENAS: &str = "2";

/// Starts this process again (the same process id, arguments and
/// environment) with `MALLOC_ARENA_MAX` set to [`WORKER_MALLOC_ARENAS`]
/// when its environment sets no arena limit of its own (`MALLOC_ARENA_MAX`
/// of 1 or more, or glibc's `glibc.malloc.arena_max` tunable); returns
/// only when it did not: on another C library, under a program loader run
/// by hand (`ld-linux… labelsync-worker`), or when the `exec` failed (said
/// on stderr; the process then runs on glibc's default, and with SIGPIPE
/// at its default, which [`run_worker_process`] handles again). Called
/// first thing in the worker's `main`, before any thread starts.
///
/// Why: glibc gives a thread that finds the arenas busy an arena of its
/// own, up to eight per core of the machine (not of the container), and an
/// arena keeps the pages its frees returned, for its next allocations. The
/// worker's budgets bound what its parses hold at once, not on which
/// threads: with the default, each blocking thread that parsed keeps up to
/// a budget's worth, and a worker's memory grew with the number of threads
/// that parsed, past the limits its settings give. glibc reads the limit
/// before `main` runs, and setting it from the program takes `mallopt`,
/// unsafe code this crate forbids; an `exec` is the safe way to set it.
pub fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::{ffi::OsStrExt, process::CommandExt};
        let tuned = std::env::var_os("GLIBC_TUNABLES").is_some_and(|tunables| {
            let name = b"glibc.malloc.arena_max=";
            tunables.as_bytes().windows(name.len()).any(|w| w == name)
        });
        let bounded = std::env::var("MALLOC_ARENA_MAX")
            .is_ok_and(|max| max.trim().parse::<u64>().is_ok_and(|max| max > 0));
        // /proc/self/exe rather than its path: it runs even when the file
        // was replaced or deleted since.
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        let loader = exe
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(b"ld-"));
        if tuned || bounded || loader {
            return;
        }
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        command.arg0(args.next().unwrap_or_default()).args(args);
        // Returns only on failure.
        let err = command.env("MALLOC_ARENA_MAX", WORKER_MALLOC_ARENAS).exec();
        eprintln!(
            "labelsync-worker: could not start again with MALLOC_ARENA_MAX={WORKER_MALLOC_ARENAS} \
             ({err}); running on glibc's default arenas, which may hold more memory than the \
             budgets say"
        );
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight jobs");
}

/// `/readyz` of both binaries: 200 when the database answers and has every
/// migration this binary knows, and the queue answers; 503 otherwise, the
/// body saying which part is missing.
pub async fn readiness(
    db: &sea_orm::DatabaseConnection,
    queue: &Queue,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let (pending, queue) = tokio::join!(db::pending_migrations(db), queue.ping());
    let (database, migrated) = match &pending {
        Ok(pending) => (true, pending.is_empty()),
        Err(_) => (false, false),
    };
    let status = if database && migrated && queue {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body =
        serde_json::json!({ "database": database, "migrated": migrated, "queue": queue });
    if let Ok(pending) = pending
        && !pending.is_empty()
    {
        body["pending_migrations"] = pending.into();
    }
    (status, axum::Json(body))
}

/// `labelsync-worker`: runs jobs from Redis until SIGTERM.
pub async fn run_worker_process(settings: Settings) -> Result<()> {
    if settings.redis_url.is_none() {
        return Err(Error::invalid(
            "invalid_setting",
            None,
            "labelsync-worker needs REDIS_URL; to run everything in one process use `labelsync-scheduler serve`",
        ));
    }
    // SIGPIPE handled, so that a write to a closed connection is an error
    // and does not end the process: std sets it back to its default for an
    // exec, and one that failed (`bound_malloc_arenas`) leaves it so.
    #[cfg(unix)]
    let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::pipe());
    if let Some(secrets) = &settings.secret_box {
        secrets.warn_if_placeholder();
    }
    let db = db::connect_worker(&settings.database_url, settings.worker.concurrency).await?;
    let queue = Queue::open(&settings, &db).await?;
    let bind = settings.worker.metrics_bind;
    let listener = crate::http::listen(bind).map_err(|e| {
        Error::invalid(
            "invalid_setting",
            None,
            format!("cannot listen on LABELSYNC_METRICS_BIND={bind}: {e}"),
        )
    })?;
    tracing::info!(addr = %listener.local_addr().map_or(bind, |a| a), "metrics and probes listening");
    let ctx: Arc<JobContext> = JobContext::new(db, settings, Some(queue.clone()));
    let probes = tokio::spawn(serve_worker_listener(listener, ctx.clone(), queue.clone()));
    crate::storage::s3::warm_up(&ctx.storage_env).await;
    tokio::select! {
        () = wait_for_migrations(&ctx.db) => {}
        () = shutdown_signal() => {
            probes.abort();
            return Ok(());
        }
    }
    let result = queue.run_worker(ctx, shutdown_signal()).await;
    probes.abort();
    result
}

/// How often a worker waiting for its migrations looks again.
const MIGRATIONS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns once the database has every migration this binary knows. A
/// worker never migrates; one started beside the migration Job
/// (`kubectl apply` starts both) took jobs at once, against a schema older
/// than its code. It waits now, its `/readyz` naming what is pending.
pub async fn wait_for_migrations(db: &sea_orm::DatabaseConnection) {
    let mut told = false;
    loop {
        match db::pending_migrations(db).await {
            Ok(pending) if pending.is_empty() => return,
            Ok(pending) if !told => {
                tracing::info!(
                    ?pending,
                    "waiting for the database's migrations before taking jobs"
                );
                told = true;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot read the database's migrations"),
        }
        tokio::time::sleep(MIGRATIONS_POLL).await;
    }
}

/// The `/metrics` answer: the queue's depth is read first (a scrape sees
/// the backlog of that moment), then everything is rendered.
pub async fn metrics_response(
    queue: &Queue,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    match queue.depth().await {
        Ok(depth) => metrics().record_queue(&depth.queue, depth.pending, depth.running, depth.dead),
        Err(e) => tracing::warn!(error = %e, "queue depth unavailable for /metrics"),
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
}

/// A worker's `/readyz`: [`readiness`], plus `"taking_jobs"`, false (and
/// 503) until the worker has registered and once it drains: a worker
/// started a moment ago answered 200 before it was in the fleet's list and
/// took jobs.
async fn worker_readiness(
    ctx: &JobContext,
    queue: &Queue,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let (mut status, axum::Json(mut body)) = readiness(&ctx.db, queue).await;
    use std::sync::atomic::Ordering::Acquire;
    // A draining worker (SIGTERM) takes no more jobs either.
    let taking = ctx.taking_jobs.load(Acquire) && !ctx.stopping.load(Acquire);
    body["taking_jobs"] = taking.into();
    if !taking {
        status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    (status, axum::Json(body))
}

/// The worker's own small HTTP listener: `/metrics`, `/healthz` (the process
/// answers) and `/readyz` ([`worker_readiness`]), for Prometheus and the
/// orchestrator's probes; with the API's limits ([`crate::http`], the
/// context's settings) and its error body for unknown paths and methods.
pub async fn serve_worker_listener(
    listener: tokio::net::TcpListener,
    ctx: Arc<JobContext>,
    queue: Queue,
) {
    use axum::{Json, http::StatusCode, routing::get};
    let limits = ctx.settings.http;
    let metrics_queue = queue.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let queue = metrics_queue.clone();
                async move { metrics_response(&queue).await }
            }),
        )
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route(
            "/readyz",
            get(move || {
                let (ctx, queue) = (ctx.clone(), queue.clone());
                async move { worker_readiness(&ctx, &queue).await }
            }),
        )
        .method_not_allowed_fallback(|| async {
            crate::http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .fallback(|| async {
            crate::http::error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such path; the worker serves /metrics, /healthz and /readyz",
            )
        });
    crate::http::serve(listener, app, limits, std::future::pending()).await;
}
