//! `labelsync-worker`: runs sync jobs from the Redis queue until SIGTERM.
//! All logic lives in the `labelsync` library; see `lifecycle::run_worker_process`.
//! The same binary reads Parquet files in child processes
//! (`labelsync-worker parse-parquet`, see `ingest::parquet_process`).
use std::process::ExitCode;

fn main() -> ExitCode {
    // First, before a runtime starts threads: a child sets its own memory
    // limit and needs none of them.
    if let Some(code) = labelsync::ingest::parquet_process::run_if_child() {
        return code;
    }
    // Still before any thread: may start the process again, with a bound
    // on glibc's malloc arenas.
    labelsync::lifecycle::bound_malloc_arenas();
    serve()
}

#[tokio::main]
async fn serve() -> ExitCode {
    let settings = match labelsync::config::Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("labelsync-worker: {err}");
            return ExitCode::from(2);
        }
    };
    let telemetry = labelsync::telemetry::init(
        settings.log_json,
        settings.otlp_endpoint.as_deref(),
        "labelsync-worker",
    );
    let code = match labelsync::lifecycle::run_worker_process(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "worker exiting");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
