//! Deleting ended runs nobody needs any more (the scheduler's cleanup), with
//! what hangs off them: a run's object errors, batches and partitions go
//! with it (the schema cascades). A storage synced every second ends 86,400
//! runs a day; kept forever, they would slow every listing and count of
//! runs and fill the database.
//!
//! Two rules, each settings (`LABELSYNC_RUN_RETENTION_DAYS`,
//! `LABELSYNC_RUNS_KEPT_PER_STORAGE`): a run that ended before the cutoff
//! goes, and a storage keeps at most its newest `kept` runs. Always kept:
//! each storage's newest ended run of each kind (what the storage shows as
//! its last result), and a run that a live retry run reads the errors of.
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::Expr,
};

use super::entities::sync_run::{self, Column as C};
use crate::Result;

/// Runs one DELETE removes at most: a run may carry many object errors,
/// and one statement holds its locks until it ends.
const CHUNK: u64 = 500;

/// Statements one pass makes at most per rule, so a first pass over years
/// of runs is spread over several passes.
const CHUNKS_PER_PASS: u64 = 20;

/// Not the newest ended run of its storage and kind: a newer one exists
/// (found walking `sync_runs (storage_id, id)` up from the run, usually at
/// its next step).
const NOT_NEWEST: &str = "EXISTS (SELECT 1 FROM sync_runs newer \
     WHERE newer.storage_id = sync_runs.storage_id AND newer.id > sync_runs.id \
     AND newer.kind = sync_runs.kind AND newer.finished_at IS NOT NULL)";

/// Not a run that a live retry run reads the failed objects of.
const NOT_RETRIED: &str = "sync_runs.id NOT IN (SELECT live.retry_of FROM sync_runs live \
     WHERE live.status IN ('queued', 'running') AND live.retry_of IS NOT NULL)";

/// What a pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Ended before the cutoff.
    pub expired: u64,
    /// Past the newest `kept` of their storage.
    pub over_count: u64,
}

/// Which storages a pass applies the count rule to.
#[derive(Debug, Clone, Copy)]
pub enum Counted {
    /// Those that ended a run since then: a regular pass costs what the
    /// fleet did since the last one (a storage that ends none is not
    /// growing; its old runs meet the cutoff).
    EndedSince(DateTime<Utc>),
    /// Every storage: a full pass, so a lowered count reaches the storages
    /// that sync rarely too (one index walk each).
    Every,
}

/// Deletes the runs that ended before `before`, and, of the storages
/// `counted`, those past each one's newest `kept`.
pub async fn prune(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    kept: u64,
    counted: Counted,
) -> Result<Pruned> {
    let expired = ended_runs().filter(C::FinishedAt.lt(before));
    let mut pruned = Pruned {
        expired: delete_chunks(db, expired).await?,
        over_count: 0,
    };
    let storages = match counted {
        Counted::EndedSince(since) => active_storages(db, since).await?,
        Counted::Every => super::storages::all_ids(db).await?,
    };
    for storage_id in storages {
        let Some(oldest_kept) = nth_newest(db, storage_id, kept).await? else {
            continue;
        };
        let older = ended_runs()
            .filter(C::StorageId.eq(storage_id))
            .filter(C::Id.lt(oldest_kept.as_str()));
        pruned.over_count += delete_chunks(db, older).await?;
    }
    Ok(pruned)
}

/// Deletes `runs`, [`CHUNK`] a statement, at most [`CHUNKS_PER_PASS`]
/// statements; how many.
async fn delete_chunks(
    db: &impl ConnectionTrait,
    runs: sea_orm::Select<sync_run::Entity>,
) -> Result<u64> {
    let mut deleted = 0;
    for _ in 0..CHUNKS_PER_PASS {
        let n = delete_chunk(db, runs.clone()).await?;
        deleted += n;
        if n < CHUNK {
            break;
        }
    }
    Ok(deleted)
}

/// Ended runs that may go: not a storage's newest of its kind, not read by
/// a live retry.
fn ended_runs() -> sea_orm::Select<sync_run::Entity> {
    sync_run::Entity::find()
        .filter(C::FinishedAt.is_not_null())
        .filter(C::Status.is_not_in(["queued", "running"]))
        .filter(Expr::cust(NOT_NEWEST))
        .filter(Expr::cust(NOT_RETRIED))
}

/// Deletes up to [`CHUNK`] of `runs`, the longest ended first; how many.
/// Their object errors go first, a bounded number a statement (a run may
/// have millions), and the rules are checked again as each run is deleted:
/// a run that became the newest meanwhile stays. (A retry asked for in the
/// moment between the two finds the errors gone and reads nothing; these
/// are runs past their retention.)
async fn delete_chunk(
    db: &impl ConnectionTrait,
    runs: sea_orm::Select<sync_run::Entity>,
) -> Result<u64> {
    let ids: Vec<String> = runs
        .select_only()
        .column(C::Id)
        .order_by_asc(C::FinishedAt)
        .limit(CHUNK)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    delete_errors_of(db, &ids).await?;
    let deleted = sync_run::Entity::delete_many()
        .filter(C::Id.is_in(ids))
        .filter(Expr::cust(NOT_NEWEST))
        .filter(Expr::cust(NOT_RETRIED))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// Object errors deleted by one statement at most.
const ERRORS_CHUNK: u64 = 10_000;

/// Deletes the object errors of these runs, [`ERRORS_CHUNK`] at a time.
async fn delete_errors_of(db: &impl ConnectionTrait, runs: &[String]) -> Result<()> {
    use super::entities::object_error::{self, Column as E};
    loop {
        let ids: Vec<i64> = object_error::Entity::find()
            .select_only()
            .column(E::Id)
            .filter(E::RunId.is_in(runs.iter().map(String::as_str)))
            .limit(ERRORS_CHUNK)
            .into_tuple()
            .all(db)
            .await?;
        if ids.is_empty() {
            return Ok(());
        }
        object_error::Entity::delete_many()
            .filter(E::Id.is_in(ids))
            .exec(db)
            .await?;
    }
}

/// Storages that ended a run since `since` (index `sync_runs (finished_at)`).
async fn active_storages(db: &impl ConnectionTrait, since: DateTime<Utc>) -> Result<Vec<i64>> {
    Ok(sync_run::Entity::find()
        .select_only()
        .column(C::StorageId)
        .distinct()
        .filter(C::FinishedAt.gte(since))
        .into_tuple()
        .all(db)
        .await?)
}

/// The id of the storage's `n`th newest run, if it has that many.
async fn nth_newest(db: &impl ConnectionTrait, storage_id: i64, n: u64) -> Result<Option<String>> {
    Ok(sync_run::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::StorageId.eq(storage_id))
        .order_by_desc(C::Id)
        .offset(n.saturating_sub(1))
        .limit(1)
        .into_tuple()
        .one(db)
        .await?)
}
