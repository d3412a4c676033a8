//! `labelsync-scheduler`: parse the command line and settings, start tracing,
//! hand over to the library (`cli::run`).
use std::process::ExitCode;

use clap::Parser;
use labelsync_scheduler::cli::{Cli, run};

// mimalloc: glibc's malloc took a tenth of the API's CPU under load (the
// annotations bench: +12-25% saves a second). Workers keep glibc's: a
// Tasks-mode sync ran 30% slower on mimalloc (docs/DECISIONS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
