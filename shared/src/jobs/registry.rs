//! The worker's registration (`db::workers`): refreshed every heartbeat
//! with what the worker holds now, deleted when it stops cleanly.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

use crate::db::workers;

/// The jobs a worker process is executing now: one entry per job, the
/// run's id (empty for a webhook delivery).
#[derive(Debug, Default)]
pub struct Current(Mutex<Vec<String>>);

impl Current {
    /// Counts a job as running until the guard is dropped.
    pub fn enter(self: &Arc<Self>, run_id: &str) -> Running {
        self.lock().push(run_id.to_owned());
        Running {
            of: self.clone(),
            run_id: run_id.to_owned(),
        }
    }

    /// How many jobs run, and the distinct ids of their runs, sorted.
    pub fn snapshot(&self) -> (usize, Vec<String>) {
        let jobs = self.lock();
        let mut runs: Vec<String> = jobs.iter().filter(|r| !r.is_empty()).cloned().collect();
        runs.sort();
        runs.dedup();
        (jobs.len(), runs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running job of [`Current`]; dropping it ends it.
pub struct Running {
    of: Arc<Current>,
    run_id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut jobs = self.of.lock();
        if let Some(i) = jobs.iter().position(|r| *r == self.run_id) {
            jobs.swap_remove(i);
        }
    }
}

/// Who a worker is, for its registration.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub host: String,
    pub slots: i32,
    pub started_at: DateTime<Utc>,
}

impl Identity {
    pub fn new(name: &str, slots: usize) -> Self {
        Identity {
            name: name.to_owned(),
            host: host_name(),
            slots: i32::try_from(slots).unwrap_or(i32::MAX),
            started_at: crate::clock::now(),
        }
    }
}

/// The machine's (or pod's) name: `HOSTNAME`, else the kernel's, else
/// `unknown`.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes the registration once, after measuring the clock's offset from
/// the database's again (see [`crate::clock`]).
pub async fn beat(db: &DatabaseConnection, me: &Identity, current: &Current) {
    crate::db::sync_clock(db).await;
    let (jobs, runs) = current.snapshot();
    let beat = workers::Beat {
        name: &me.name,
        host: &me.host,
        version: env!("CARGO_PKG_VERSION"),
        slots: me.slots,
        running_jobs: i32::try_from(jobs).unwrap_or(i32::MAX),
        current_runs: runs,
        started_at: me.started_at,
        now: crate::clock::now(),
    };
    if let Err(err) = workers::beat(db, beat).await {
        tracing::debug!(error = %err, worker = %me.name, "worker registration failed; next heartbeat retries");
    }
}

/// Refreshes the registration every `every` until aborted.
pub async fn keep_registered(
    db: DatabaseConnection,
    me: Identity,
    current: Arc<Current>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        beat(&db, &me, &current).await;
    }
}

/// Deletes the registration (a clean stop).
pub async fn deregister(db: &DatabaseConnection, name: &str) {
    if let Err(err) = workers::remove(db, name).await {
        tracing::debug!(error = %err, worker = name, "worker deregistration failed; the scheduler prunes it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_counts_jobs_and_lists_each_run_once() {
        let current = Arc::new(Current::default());
        assert_eq!(current.snapshot(), (0, Vec::<String>::new()));
        let b1 = current.enter("run-b");
        let a = current.enter("run-a");
        let b2 = current.enter("run-b");
        let hook = current.enter("");
        assert_eq!(
            current.snapshot(),
            (4, vec!["run-a".to_owned(), "run-b".to_owned()])
        );
        drop(b1);
        drop(hook);
        assert_eq!(
            current.snapshot(),
            (2, vec!["run-a".to_owned(), "run-b".to_owned()])
        );
        drop(b2);
        drop(a);
        assert_eq!(current.snapshot(), (0, Vec::<String>::new()));
    }

    #[test]
    fn a_worker_knows_its_host() {
        assert!(!host_name().is_empty());
        let me = Identity::new("w-1", usize::MAX);
        assert_eq!(me.slots, i32::MAX);
    }
}
