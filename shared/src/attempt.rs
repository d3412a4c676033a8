//! What one attempt of a run shares between the import and the export
//! pipelines: how it ended ([`Outcome`]), the stop flag it checks at
//! every page ([`check_stopping`]) and its heartbeats' guard
//! ([`AbortOnDrop`]). Below `ingest` and `export`, above `storage`: the
//! job layer (`jobs`) reads the outcome, the process layer (`lifecycle`)
//! raises the flag.
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Result};

/// How an attempt ended (errors are returned as `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every page was committed.
    Finished,
    /// The run stopped being `running` under us (cancelled): nothing more was written.
    Stopped,
}

/// A transient error once the worker is shutting down (`stopping` raised on
/// SIGTERM), so a running import or export stops at its next page and
/// another worker resumes the run.
pub fn check_stopping(stopping: Option<&AtomicBool>) -> Result<()> {
    if stopping.is_some_and(|s| s.load(Ordering::Relaxed)) {
        return Err(Error::Transient(
            "the worker is shutting down; another worker resumes this run".into(),
        ));
    }
    Ok(())
}

/// A lease's heartbeat is aborted with its attempt, so even an attempt that
/// panics stops renewing what it held.
pub use crate::task::AbortOnDrop;

/// Why a run (or a batch) is given up on after `max` attempts. Attempts
/// are counted as they begin, so attempts that killed their process (an
/// abort, an OOM kill) count too, and a poison run ends instead of taking
/// down every worker it is handed to.
pub fn gave_up(max: i64, last_error: Option<&str>) -> String {
    match last_error {
        Some(last) => format!("gave up after {max} attempts; last error: {last}"),
        None => format!(
            "gave up after {max} attempts that never finished: the worker running it died or was killed each time (a crash or an out-of-memory kill; see the workers' logs)"
        ),
    }
}
