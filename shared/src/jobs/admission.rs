//! Letting held runs onto the queue (see `db::admission`): right after a
//! run is created, right after a run ends (by the worker that ended it:
//! that project's next run starts at once), and on every scheduler tick,
//! which serves every waiting project in turn.
//!
//! Fairness comes from the cap: a project has at most
//! `LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT` jobs in Redis or running, so a run
//! of another project waits behind a few jobs per busy project, not behind
//! one project's whole backlog. The tick serves the waiting projects round
//! by round, one run each per round, fewest runs in flight first.
use sea_orm::DatabaseConnection;

use super::{Pushed, Queue, RunJob};
use crate::{Result, config::Settings, db::admission};

/// Most runs of one project admitted by one [`release_project`] call (only
/// reached without a cap: with one, the cap is smaller).
const RELEASE_PER_PROJECT: u64 = 100;
/// Most runs one tick releases, and most projects it looks at.
const RELEASE_PER_TICK: usize = 1000;
const PROJECTS_PER_TICK: u64 = 1000;

/// What one release did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Runs admitted and pushed.
    pub pushed: usize,
    /// The queue's backlog was full: the runs not pushed are held again.
    pub full: bool,
}

/// Admits up to `max` of the project's held runs (as its cap allows) and
/// pushes them. On a full backlog the rest go back to held for the tick;
/// on a queue error the admitted runs not yet pushed are left to the
/// stalled-run sweep (their job may have been written), and the error is
/// returned.
pub async fn release(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    project_id: i64,
    max: u64,
) -> Result<Released> {
    let cap = settings.max_live_runs_per_project;
    let ids = admission::admit(db, project_id, cap, max).await?;
    let mut done = Released::default();
    for (i, run_id) in ids.iter().enumerate() {
        match queue.push(RunJob::for_run(run_id), run_id).await? {
            Pushed::Queued => done.pushed += 1,
            Pushed::Full => {
                admission::hold_again(db, ids[i..].to_vec()).await?;
                done.full = true;
                break;
            }
        }
    }
    Ok(done)
}

/// [`release`] as much of one project as it may have: after one of its
/// runs was created or ended.
pub async fn release_project(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    project_id: i64,
) -> Result<Released> {
    release(db, queue, settings, project_id, RELEASE_PER_PROJECT).await
}

/// The scheduler's tick: releases held runs of every project with room,
/// round-robin (one run per project per round, in the order of
/// `admission::waiting_projects`), until no project has room or held runs
/// left, the backlog is full, or [`RELEASE_PER_TICK`] runs went. Then
/// records how many runs are still held. Returns how many were released.
pub async fn release_held(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
) -> Result<usize> {
    let cap = settings.max_live_runs_per_project;
    let mut projects = admission::waiting_projects(db, cap, PROJECTS_PER_TICK).await?;
    let mut released = 0;
    'rounds: while !projects.is_empty() && released < RELEASE_PER_TICK {
        let mut again = Vec::with_capacity(projects.len());
        for project_id in projects {
            let done = release(db, queue, settings, project_id, 1).await?;
            released += done.pushed;
            if done.full || released >= RELEASE_PER_TICK {
                break 'rounds;
            }
            if done.pushed > 0 {
                again.push(project_id);
            }
        }
        projects = again;
    }
    let held = admission::held(db).await?;
    crate::metrics::metrics().runs_held.record(held, &[]);
    Ok(released)
}
