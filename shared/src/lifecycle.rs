//! Process lifecycle shared by both binaries: the shutdown signal, the
//! readiness probe and the worker process's main loop.
use std::sync::Arc;

use crate::{
    Error, Result,
    config::Settings,
    db,
    jobs::{JobContext, Queue},
};

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

/// A transient error once the worker is shutting down, so a running import
/// or export stops at its next page and another worker resumes the run.
pub fn check_stopping(stopping: Option<&std::sync::atomic::AtomicBool>) -> Result<()> {
    if stopping.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
        return Err(Error::Transient(
            "the worker is shutting down; another worker resumes this run".into(),
        ));
    }
    Ok(())
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
    let db = db::connect(&settings.database_url).await?;
    let queue = Queue::open(&settings, &db).await?;
    let bind = settings.worker.metrics_bind;
    let listener = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
        Error::invalid(
            "invalid_setting",
            None,
            format!("cannot listen on LABELSYNC_METRICS_BIND={bind}: {e}"),
        )
    })?;
    tracing::info!(addr = %listener.local_addr().map_or(bind, |a| a), "metrics and probes listening");
    let probes = tokio::spawn(crate::metrics::serve_worker_listener(
        listener,
        db.clone(),
        queue.clone(),
        settings.http,
    ));
    let ctx: Arc<JobContext> = JobContext::new(db, settings, Some(queue.clone()));
    let result = queue.run_worker(ctx, shutdown_signal()).await;
    probes.abort();
    result
}
