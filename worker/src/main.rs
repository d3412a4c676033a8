//! `labelsync-worker`: runs sync jobs from the Redis queue until SIGTERM.
//! All logic lives in the `labelsync` library; see `lifecycle::run_worker_process`.
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
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
