//! Building and running the server. `serve` takes an already-bound listener
//! and a shutdown future, so tests bind port 0 and stop it at will.
use std::{future::Future, time::Duration};

use anyhow::{Context, bail};
use labelsync::{
    config::Settings,
    db,
    jobs::{JobContext, Queue},
};
use tokio::{net::TcpListener, sync::watch};

use crate::api::{self, AppState};

/// Connects the database (migrating it unless disabled) and the queue.
pub async fn state(settings: Settings) -> anyhow::Result<AppState> {
    let db = db::connect_api(&settings.database_url)
        .await
        .context("cannot open the database (DATABASE_URL)")?;
    if settings.run_migrations {
        db::migrate(&db).await.context("migrations failed")?;
    }
    let point_db = db::point_pool(&db, &settings.database_url)
        .await
        .context("cannot open the database (DATABASE_URL)")?;
    let queue = Queue::open(&settings, &db)
        .await
        .context("cannot open the queue")?;
    Ok(AppState::new(db, point_db, queue, settings))
}

/// A bootstrap token is an admin of everything, and failed attempts at one
/// are not limited by address: one short enough to guess is named (by its
/// place in the list, never its text) at start.
fn warn_of_short_bootstrap_tokens(settings: &Settings) {
    for (place, token) in settings.api_tokens.iter().enumerate() {
        let chars = token.expose().chars().count();
        if chars < MIN_BOOTSTRAP_CHARS {
            tracing::warn!(
                place = place + 1,
                chars,
                "a LABELSYNC_API_TOKENS token is shorter than {MIN_BOOTSTRAP_CHARS} characters: \
                 it can be guessed; use a random one (openssl rand -base64 32)"
            );
        }
    }
}

/// The length below which a bootstrap token is called guessable: 32
/// characters of base64 are 192 bits.
const MIN_BOOTSTRAP_CHARS: usize = 32;

/// Serves the API on `listener` until `shutdown` resolves, within the
/// limits of `settings.http` (header, idle and body timeouts, connection
/// cap; see `labelsync::http`), and the probes on `LABELSYNC_PROBE_BIND`
/// when set ([`serve_probes`]). In embedded mode
/// (or with `LABELSYNC_EMBEDDED_WORKERS=true`) it also runs a worker, which is
/// stopped after the HTTP server and allowed to finish its jobs. The
/// worker's errors are logged, not returned: it is started again after one
/// while the API serves, and one it stops with ends nothing but itself.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if settings.api_tokens.is_empty() {
        if !addr.ip().is_loopback() {
            bail!(
                "refusing to serve on {addr} without LABELSYNC_API_TOKENS: set tokens or bind to 127.0.0.1"
            );
        }
        tracing::warn!(%addr, "LABELSYNC_API_TOKENS is not set: the API is open to anyone on this machine");
    }
    warn_of_short_bootstrap_tokens(&settings);
    if let Some(secrets) = &settings.secret_box {
        secrets.warn_if_placeholder();
    }
    // Bound before the database is: a wrong address fails the start at once.
    let probe_listener = settings
        .probe_bind
        .map(|bind| {
            labelsync::http::listen(bind)
                .with_context(|| format!("cannot listen on LABELSYNC_PROBE_BIND={bind}"))
        })
        .transpose()?;
    let state = state(settings).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let probes = probe_listener.map(|listener| serve_probes(listener, &state, stop_rx.clone()));
    let worker = state
        .settings
        .embedded_workers
        .then(|| start_in_process_worker(&state, stop_rx.clone()));
    let ticker = tokio::spawn(crate::periodic::run(
        state.clone(),
        state.settings.schedule_tick,
    ));
    let follower = tokio::spawn(api::follow_changes(
        state.db.clone(),
        state.storage_cache.clone(),
    ));
    tracing::info!(%addr, embedded_workers = state.settings.embedded_workers, "labelsync scheduler listening");
    let limits = state.settings.http;
    let pages = crate::console::router(state.clone());
    // Event streams end when the stop begins (see `api::streams`).
    let streams = state.streams.clone();
    let shutdown = async move {
        shutdown.await;
        streams.close_all();
    };
    labelsync::http::serve(listener, api::router(state, pages), limits, shutdown).await;
    ticker.abort();
    follower.abort();
    let _ = stop_tx.send(true);
    if let Some(probes) = probes {
        probes.await.context("probe listener panicked")?;
    }
    if let Some(worker) = worker {
        worker.await.context("worker task panicked")?;
    }
    Ok(())
}

/// Serves the probe listener (`LABELSYNC_PROBE_BIND`, see
/// `api::probe_router`) with the API's limits until `stop` says so: after
/// the API's drain, so that liveness answers while it drains.
fn serve_probes(
    listener: TcpListener,
    state: &AppState,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "probes and metrics listening");
    }
    let router = api::probe_router(state.clone());
    let limits = state.settings.http;
    tokio::spawn(labelsync::http::serve(
        listener,
        router,
        limits,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ))
}

/// Starts the in-process worker ([`run_in_process_worker`]) on a database
/// pool of its own (`db::worker_pool`), opened in its task so that the API
/// does not wait for it; on the API's pool when that cannot be opened (the
/// database has no connection to spare), as before it had one.
fn start_in_process_worker(
    state: &AppState,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (api_db, queue) = (state.db.clone(), state.queue.clone());
    let settings = state.settings.clone();
    tokio::spawn(async move {
        let (url, slots) = (&settings.database_url, settings.worker.concurrency);
        let db = match db::worker_pool(&api_db, url, slots).await {
            Ok(db) => db,
            Err(err) => {
                tracing::warn!(error = %err, "no database pool of its own for the in-process worker; it shares the API's");
                api_db
            }
        };
        let ctx = JobContext::new(db, (*settings).clone(), Some(queue.clone()));
        run_in_process_worker(ctx, queue, stop).await;
    })
}

/// Runs the in-process worker until `stop` says so, starting it again when
/// it dies (its queue connection broke: Redis restarting); the API keeps
/// serving meanwhile, with `/readyz` saying not ready until the queue
/// answers again.
async fn run_in_process_worker(
    ctx: std::sync::Arc<JobContext>,
    queue: Queue,
    mut stop: watch::Receiver<bool>,
) {
    labelsync::storage::s3::warm_up(&ctx.storage_env).await;
    // Not before the database has this binary's migrations (with
    // `LABELSYNC_RUN_MIGRATIONS=false` another process runs them).
    let mut waiting = stop.clone();
    tokio::select! {
        () = labelsync::lifecycle::wait_for_migrations(&ctx.db) => {}
        _ = waiting.wait_for(|s| *s) => return,
    }
    let mut pause = Duration::from_secs(1);
    loop {
        let mut stopped = stop.clone();
        let result = queue
            .run_worker(ctx.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        if *stop.borrow() {
            // Not a failure of the stop: the worker's last acks can meet a
            // Redis that restarted without their jobs (its last writes
            // lost, or the jobs handed out again), and apalis refuses them;
            // the jobs' work is committed, and a copy handed out again
            // finds its run ended.
            if let Err(e) = result {
                tracing::warn!(error = %e, "in-process worker stopped with an error");
            }
            return;
        }
        match &result {
            Ok(()) => tracing::error!(?pause, "in-process worker stopped; starting it again"),
            Err(e) => {
                tracing::error!(error = %e, ?pause, "in-process worker failed; starting it again")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
