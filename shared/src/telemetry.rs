//! Tracing setup for both binaries. `RUST_LOG` filters (default `info`);
//! `LABELSYNC_LOG_FORMAT=json` switches to JSON lines. Logs go to stderr so the
//! CLI's stdout stays machine-readable.
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn,apalis=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    // `try_init`: tests call this once per spawned app; only the first one wins.
    let _ = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
}
