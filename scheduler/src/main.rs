//! `labelsync-scheduler`: parse the command line and settings, start tracing,
//! hand over to the library (`cli::run`).
use std::process::ExitCode;

use clap::Parser;
use labelsync_scheduler::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match labelsync::config::Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("labelsync-scheduler: {err}");
            return ExitCode::from(2);
        }
    };
    let telemetry = labelsync::telemetry::init(
        settings.log_json,
        settings.otlp_endpoint.as_deref(),
        "labelsync-scheduler",
    );
    let code = match run(cli, settings).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("labelsync-scheduler: {err:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
