//! The run lifecycle. A run row is the single source of truth for a sync's
//! status, counters and resume cursor; every transition is one conditional
//! UPDATE, so a worker that lost the race (the run was cancelled, or another
//! attempt finished it) sees zero rows changed and stops.
use std::collections::HashMap;

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, SqlErr,
    sea_query::{Expr, ExprTrait, Func},
};
use serde::Serialize;

use super::entities::{object_error, sync_run};
use crate::{Error, Result};

pub use crate::kinds::RunKind;

/// A run's status. `queued` and `running` are live (at most one live run per
/// storage); the others are final and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    CompletedWithErrors,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::CompletedWithErrors,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::CompletedWithErrors => "completed_with_errors",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_live(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// The status of a run that did all its work, `failed` objects among
    /// it: with errors when there were any.
    pub fn completed(failed: i64) -> Self {
        if failed > 0 {
            RunStatus::CompletedWithErrors
        } else {
            RunStatus::Completed
        }
    }

    /// Whether the run did all its work (with errors or not).
    pub fn is_completed(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::CompletedWithErrors)
    }
}

const LIVE: [&str; 2] = ["queued", "running"];

/// The counters of a run (docs/API.md, "Runs"). Every increment is
/// added in the transaction that writes what it counts (a page, a chunk of
/// rows, a finished batch), so they never drift from the data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub listed: i64,
    pub matched: i64,
    pub created: i64,
    pub existed: i64,
    pub failed: i64,
    pub exported: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub bytes: i64,
    pub missing: i64,
    pub changed: i64,
    pub kept: i64,
}

impl Counters {
    pub fn of(run: &sync_run::Model) -> Self {
        Counters {
            listed: run.listed,
            matched: run.matched,
            created: run.created,
            existed: run.existed,
            failed: run.failed,
            exported: run.exported,
            unchanged: run.unchanged,
            deleted: run.deleted,
            bytes: run.bytes,
            missing: run.missing,
            changed: run.changed,
            kept: run.kept,
        }
    }
}

pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<sync_run::Model> {
    sync_run::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run {id} not found")))
}

/// The queued or running run of a storage, if any.
pub async fn live(db: &impl ConnectionTrait, storage_id: i64) -> Result<Option<sync_run::Model>> {
    Ok(sync_run::Entity::find()
        .filter(sync_run::Column::StorageId.eq(storage_id))
        .filter(sync_run::Column::Status.is_in(LIVE))
        .order_by_desc(sync_run::Column::Id)
        .one(db)
        .await?)
}

/// The storage's live run if an attempt of it has started, its row locked
/// for update until the caller's transaction ends (Postgres: a run
/// starting meanwhile waits for it; SQLite writes one at a time anyway).
pub async fn started_live(
    db: &impl ConnectionTrait,
    storage_id: i64,
) -> Result<Option<sync_run::Model>> {
    let live = sync_run::Entity::find()
        .filter(sync_run::Column::StorageId.eq(storage_id))
        .filter(sync_run::Column::Status.is_in(LIVE))
        .lock_exclusive()
        .one(db)
        .await?;
    Ok(live.filter(|run| run.started_at.is_some()))
}

/// Creates a queued run, or returns the storage's live run (`true`) when there
/// is one. The partial unique index `sync_runs_one_live` settles races between
/// replicas: the loser of the insert reads the winner's row.
pub async fn create_or_get_live(
    db: &DatabaseConnection,
    storage_id: i64,
    kind: RunKind,
) -> Result<(sync_run::Model, bool)> {
    create_or_get_live_scoped(db, storage_id, kind, SCOPE_FULL).await
}

/// A run over everything (a sync).
pub const SCOPE_FULL: &str = "full";
/// An export run that only drains the storage's outbox (annotation events).
pub const SCOPE_EVENTS: &str = "events";
/// An import run that reads again only the objects another run failed on
/// (`retry_of`): no listing, so no missing-object detection.
pub const SCOPE_RETRY: &str = "retry";

/// [`create_or_get_live`] with a scope; a live run of any scope is returned
/// as is (a full export run drains the outbox too).
pub async fn create_or_get_live_scoped(
    db: &DatabaseConnection,
    storage_id: i64,
    kind: RunKind,
    scope: &str,
) -> Result<(sync_run::Model, bool)> {
    let made = create_live(db, storage_id, kind, scope, None, false).await?;
    made.ok_or_else(|| Error::NotFound(format!("storage {storage_id} not found")))
}

/// [`create_or_get_live`] for the periodic tick, which claimed the
/// storage's period a moment before: `None` when the storage has been
/// paused (or deleted) since. The storage row is read `FOR SHARE` in the
/// insert's transaction, so a pause that commits first is seen, and one
/// that comes later waits for the run to commit: once `POST
/// /storages/{id}/pause` has answered, no periodic run of it appears.
pub async fn create_periodic(
    db: &DatabaseConnection,
    storage_id: i64,
    kind: RunKind,
) -> Result<Option<(sync_run::Model, bool)>> {
    create_live(db, storage_id, kind, SCOPE_FULL, None, true).await
}

/// Whether the storage's latest run of `scope` failed after `since`.
pub async fn failed_since(
    db: &impl ConnectionTrait,
    storage_id: i64,
    scope: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<bool> {
    use sync_run::Column as C;
    let latest = sync_run::Entity::find()
        .filter(C::StorageId.eq(storage_id))
        .filter(C::Scope.eq(scope))
        .order_by_desc(C::Id) // ULIDs: creation order, on the (storage_id, id) index
        .one(db)
        .await?;
    Ok(latest.is_some_and(|run| {
        run.status == RunStatus::Failed.as_str() && run.finished_at.is_some_and(|at| at > since)
    }))
}

/// Creates a `retry` import run of `of`'s storage that reads again the
/// objects `of` failed on, or returns the storage's live run (`true`).
pub async fn create_retry(
    db: &DatabaseConnection,
    of: &sync_run::Model,
) -> Result<(sync_run::Model, bool)> {
    let storage_id = of.storage_id;
    let made = create_live(
        db,
        storage_id,
        RunKind::Import,
        SCOPE_RETRY,
        Some(&of.id),
        false,
    );
    made.await?
        .ok_or_else(|| Error::NotFound(format!("storage {storage_id} not found")))
}

/// Creates a queued run, or returns the storage's live run (`true`);
/// `None` when `unless_paused` and the storage's schedule is paused or the
/// storage is gone (see [`create_periodic`]).
async fn create_live(
    db: &DatabaseConnection,
    storage_id: i64,
    kind: RunKind,
    scope: &str,
    retry_of: Option<&str>,
    unless_paused: bool,
) -> Result<Option<(sync_run::Model, bool)>> {
    // Read only when a run is to be made: on the hot path (an export of
    // annotation events while one is live) the live run is all it takes.
    let mut project_id = None;
    for _ in 0..3 {
        if let Some(run) = live(db, storage_id).await? {
            return Ok(Some((run, true)));
        }
        let project_id = match project_id {
            Some(id) => id,
            None => *project_id.insert(project_of(db, storage_id).await?),
        };
        let row = sync_run::ActiveModel {
            id: Set(super::new_id().to_string()),
            storage_id: Set(storage_id),
            kind: Set(kind.as_str().into()),
            status: Set(RunStatus::Queued.as_str().into()),
            listed: Set(0),
            matched: Set(0),
            created: Set(0),
            existed: Set(0),
            failed: Set(0),
            exported: Set(0),
            unchanged: Set(0),
            deleted: Set(0),
            bytes: Set(0),
            missing: Set(0),
            changed: Set(0),
            kept: Set(0),
            listing_incomplete: Set(false),
            cursor: Set(None),
            attempts: Set(0),
            error: Set(None),
            queued_at: Set(crate::clock::now()),
            started_at: Set(None),
            heartbeat_at: Set(None),
            finished_at: Set(None),
            lease_owner: Set(None),
            lease_at: Set(None),
            scope: Set(scope.to_owned()),
            project_id: Set(project_id),
            // Held until `admission::admit` lets it onto the queue.
            admitted_at: Set(None),
            retry_of: Set(retry_of.map(str::to_owned)),
            // The trace of the request or tick creating the run, if traced.
            trace_id: Set(crate::telemetry::current_trace_id()),
        };
        // The run and its `run.queued` event commit together.
        let tx = super::begin_write(db).await?;
        if unless_paused && !super::storages::schedule_active(&tx, storage_id).await? {
            return Ok(None); // rolled back
        }
        match sync_run::Entity::insert(row).exec_with_returning(&tx).await {
            Ok(run) => {
                record_events(&tx, &run).await?;
                tx.commit().await?;
                return Ok(Some((run, false)));
            }
            Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                continue;
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(Error::Transient(format!(
        "could not create or find a live run for storage {storage_id}"
    )))
}

/// The project of a storage; `NotFound` when the storage is gone.
async fn project_of(db: &impl ConnectionTrait, storage_id: i64) -> Result<i64> {
    use super::entities::storage;
    storage::Entity::find_by_id(storage_id)
        .select_only()
        .column(storage::Column::ProjectId)
        .into_tuple()
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("storage {storage_id} not found")))
}

/// What [`begin_attempt`] found.
#[derive(Debug)]
pub enum Attempt {
    /// The lease is ours: run it (resuming from its cursor).
    Started(Box<sync_run::Model>),
    /// Another attempt holds a live lease: try again later.
    Busy,
    /// The run already ended (finished, failed or cancelled).
    Ended,
}

/// Starts (or resumes) an attempt: `queued|running -> running`, attempts + 1,
/// and the lease to `owner` — unless another attempt's lease was renewed
/// within `lease_ttl`. Two jobs of one run (a duplicate delivery, a worker
/// presumed dead that was only slow) therefore never work on it at once.
/// Nor does a run begin beside a cancelled export of its storage whose
/// attempt may still write to it ([`cancelled_writer_alive`]).
pub async fn begin_attempt(
    db: &DatabaseConnection,
    id: &str,
    owner: &str,
    lease_ttl: std::time::Duration,
) -> Result<Attempt> {
    use sync_run::Column as C;
    // In whole microseconds, as both databases keep it: the run's
    // `started_at` is this very time exactly when this attempt started it.
    let now = chrono::SubsecRound::trunc_subsecs(crate::clock::now(), 6);
    let stale = now - chrono::Duration::from_std(lease_ttl).unwrap_or_default();
    let tx = super::begin_write(db).await?;
    hold_the_storage(&tx, id).await?;
    let res = sync_run::Entity::update_many()
        .col_expr(C::Status, Expr::value(RunStatus::Running.as_str()))
        .col_expr(C::Attempts, Expr::col(C::Attempts).add(1))
        .col_expr(
            C::StartedAt,
            Expr::from(Func::coalesce([Expr::col(C::StartedAt), Expr::value(now)])),
        )
        .col_expr(C::HeartbeatAt, Expr::value(now))
        // A running run is always admitted: it counts against its
        // project's cap even when started without the queue (the CLI).
        .col_expr(
            C::AdmittedAt,
            Expr::from(Func::coalesce([Expr::col(C::AdmittedAt), Expr::value(now)])),
        )
        .col_expr(C::LeaseOwner, Expr::value(owner))
        .col_expr(C::LeaseAt, Expr::value(now))
        .filter(C::Id.eq(id))
        .filter(C::Status.is_in(LIVE))
        .filter(
            sea_orm::Condition::any()
                .add(C::LeaseOwner.is_null())
                .add(C::LeaseAt.is_null())
                .add(C::LeaseAt.lt(stale)),
        )
        .filter(cancelled_writer_alive(stale).not())
        .exec(&tx)
        .await?;
    let run = get(&tx, id).await?;
    if res.rows_affected == 1 {
        // The first start's `run.started` event commits with it: the first
        // start, not the first counted attempt (a first attempt handed back
        // at a worker's shutdown gives its count back, and its successor's
        // is 1 again).
        if run.started_at == Some(now) {
            record_events(&tx, &run).await?;
        }
        tx.commit().await?;
        return Ok(Attempt::Started(Box::new(run)));
    }
    Ok(match RunStatus::parse(&run.status) {
        Some(status) if status.is_live() => Attempt::Busy,
        _ => Attempt::Ended,
    })
}

/// Share-locks the storage of run `id` for an attempt's start (Postgres;
/// SQLite's write transaction holds the whole database). A save of the
/// storage holds its row exclusively while it checks that no run of it
/// has started (the storage spec's `save`): the start waits for the
/// save to commit, and the attempt then reads the storage as saved; a save
/// that comes second sees the run started. Taken before the run's row, in
/// the save's order (storage, then run): no deadlock between the two. Key
/// share, the weakest lock: starts of one storage's runs never wait for
/// each other.
async fn hold_the_storage(db: &impl ConnectionTrait, id: &str) -> Result<()> {
    use super::entities::storage;
    use sea_orm::sea_query::{LockType, Query};
    storage::Entity::find()
        .select_only()
        .column(storage::Column::Id)
        .filter(
            storage::Column::Id.in_subquery(
                Query::select()
                    .column(sync_run::Column::StorageId)
                    .from(sync_run::Entity)
                    .and_where(sync_run::Column::Id.eq(id))
                    .to_owned(),
            ),
        )
        .lock(LockType::KeyShare)
        .into_tuple::<i64>()
        .one(db)
        .await?;
    Ok(())
}

/// The condition, on the run [`begin_attempt`] updates, that another run of
/// its storage was cancelled while an attempt writing to the storage (an
/// export) held it, and that attempt may still be at work: its lease is
/// held and was renewed since `stale`. A cancelled attempt stops at its
/// next heartbeat and then lets go ([`let_go`]); until then its uploads in
/// flight could land after the next run's, an older body over a newer
/// one. (An upload the storage had received whole when its attempt
/// stopped is the storage's to finish: S3 keeps the write that started
/// last; others the one that ended last.)
fn cancelled_writer_alive(stale: chrono::DateTime<Utc>) -> sea_orm::sea_query::Expr {
    use sea_orm::sea_query::{Alias, Query};
    use sync_run::Column as C;
    let other = Alias::new("other");
    let col = |c: C| Expr::col((other.clone(), c));
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from_as(sync_run::Entity, other.clone())
            .and_where(col(C::StorageId).equals((sync_run::Entity, C::StorageId)))
            .and_where(col(C::Status).eq(RunStatus::Cancelled.as_str()))
            .and_where(col(C::Kind).eq(RunKind::Export.as_str()))
            .and_where(col(C::LeaseOwner).is_not_null())
            .and_where(col(C::LeaseAt).gte(stale))
            .to_owned(),
    )
}

/// Lets go of the lease `owner` holds on run `id` once the run has ended
/// under it (cancelled) and the attempt stopped: nothing of the attempt
/// can reach the storage any more, and the storage's next run need not
/// wait for the lease to go stale (see [`cancelled_writer_alive`]).
pub async fn let_go(db: &impl ConnectionTrait, id: &str, owner: &str) -> Result<()> {
    sync_run::Entity::update_many()
        .col_expr(
            sync_run::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
        .filter(sync_run::Column::Id.eq(id))
        .filter(sync_run::Column::LeaseOwner.eq(owner))
        .filter(sync_run::Column::Status.is_not_in(LIVE))
        .exec(db)
        .await?;
    Ok(())
}

/// Adds `delta` to the counters, moves the cursor (when given) and beats the
/// heart, all only while the run is `running` — and, with `owner`, only while
/// that attempt still holds the lease (and renews it). Returns false when not:
/// the caller must roll back and stop.
///
/// Workers of fan-out batches pass no owner: they only add the counts of rows
/// they linked, which the unique link key keeps exact.
pub async fn checkpoint(
    db: &impl ConnectionTrait,
    id: &str,
    delta: &Counters,
    cursor: Option<&str>,
    owner: Option<&str>,
) -> Result<bool> {
    let mut update = counted(id, delta, owner);
    if let Some(cursor) = cursor {
        update = update.col_expr(sync_run::Column::Cursor, Expr::value(cursor));
    }
    Ok(update.exec(db).await?.rows_affected == 1)
}

/// A listing page's move of a cursor: from where the attempt last
/// committed it (`None`: the listing's start) to the page's last key.
/// `to: None` moves nothing but still needs the cursor where the attempt
/// left it: the end of a listing (or of its discovery) is committed only
/// after every page it lists.
#[derive(Debug, Clone, Copy)]
pub struct CursorMove<'a> {
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
}

impl CursorMove<'_> {
    /// The condition that `column` (a cursor) is where the move starts.
    pub fn starts_at(&self, column: impl ColumnTrait) -> sea_orm::sea_query::SimpleExpr {
        match self.from {
            Some(from) => column.eq(from),
            None => column.is_null(),
        }
    }
}

/// [`checkpoint`] of a listing page that moves the run's cursor: refused
/// (false) also when the cursor is not where the attempt left it, as when
/// the database lost commits it had acknowledged (a crash with
/// `synchronous_commit` off, a failover to a replica behind): going on
/// from the page's key would skip the pages lost.
pub async fn checkpoint_page(
    db: &impl ConnectionTrait,
    id: &str,
    delta: &Counters,
    cursor: CursorMove<'_>,
    owner: Option<&str>,
) -> Result<bool> {
    use sync_run::Column as C;
    let mut update = counted(id, delta, owner).filter(cursor.starts_at(C::Cursor));
    if let Some(to) = cursor.to {
        update = update.col_expr(C::Cursor, Expr::value(to));
    }
    Ok(update.exec(db).await?.rows_affected == 1)
}

/// The update of a [`checkpoint`]: `delta` added to the running run `id`'s
/// counters, its heartbeat (and `owner`'s lease) renewed.
fn counted(
    id: &str,
    delta: &Counters,
    owner: Option<&str>,
) -> sea_orm::UpdateMany<sync_run::Entity> {
    use sync_run::Column as C;
    let add = |c: C, n: i64| (c, Expr::col(c).add(n));
    let now = crate::clock::now();
    let mut update = sync_run::Entity::update_many();
    for (col, expr) in [
        add(C::Listed, delta.listed),
        add(C::Matched, delta.matched),
        add(C::Created, delta.created),
        add(C::Existed, delta.existed),
        add(C::Failed, delta.failed),
        add(C::Exported, delta.exported),
        add(C::Unchanged, delta.unchanged),
        add(C::Deleted, delta.deleted),
        add(C::Bytes, delta.bytes),
        add(C::Missing, delta.missing),
        add(C::Changed, delta.changed),
        add(C::Kept, delta.kept),
    ] {
        update = update.col_expr(col, expr);
    }
    if let Some(owner) = owner {
        update = update
            .col_expr(C::LeaseAt, Expr::value(now))
            .filter(C::LeaseOwner.eq(owner));
    }
    update
        .col_expr(C::HeartbeatAt, Expr::value(now))
        .filter(C::Id.eq(id))
        .filter(C::Status.eq(RunStatus::Running.as_str()))
}

/// Records that some part of the run's listing could not be read (see
/// `sync_run::Model::listing_incomplete`); written with the page whose
/// listing errors it records, so a resumed run still knows.
pub async fn mark_listing_incomplete(db: &impl ConnectionTrait, id: &str) -> Result<()> {
    sync_run::Entity::update_many()
        .col_expr(sync_run::Column::ListingIncomplete, Expr::value(true))
        .filter(sync_run::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Ends a live run — with `owner`, only if that attempt still holds it —
/// and records its webhook events in the same transaction. Returns false
/// when it was not live any more (or not ours).
pub async fn finish(
    db: &DatabaseConnection,
    id: &str,
    status: RunStatus,
    error: Option<String>,
    owner: Option<&str>,
) -> Result<bool> {
    let tx = super::begin_write(db).await?;
    if !finish_in(&tx, id, status, error, owner).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// [`finish`] in the caller's transaction `tx` (with the last writes of
/// the run's work, so the two commit together or not at all).
pub async fn finish_in(
    tx: &impl ConnectionTrait,
    id: &str,
    status: RunStatus,
    error: Option<String>,
    owner: Option<&str>,
) -> Result<bool> {
    let now = crate::clock::now();
    let mut update = sync_run::Entity::update_many()
        .col_expr(sync_run::Column::Status, Expr::value(status.as_str()))
        .col_expr(
            sync_run::Column::Error,
            Expr::value(error.as_deref().map(crate::error::storable)),
        )
        .col_expr(sync_run::Column::FinishedAt, Expr::value(now))
        .col_expr(sync_run::Column::HeartbeatAt, Expr::value(now))
        .filter(sync_run::Column::Id.eq(id))
        .filter(sync_run::Column::Status.is_in(LIVE));
    if let Some(owner) = owner {
        update = update.filter(sync_run::Column::LeaseOwner.eq(owner));
    }
    // The row as updated comes back with the update: no second read.
    let Some(run) = update.exec_with_returning(tx).await?.into_iter().next() else {
        return Ok(false);
    };
    record_events(tx, &run).await?;
    Ok(true)
}

/// How many of an export run's per-object errors its `export.failed` event
/// carries (the rest are at `GET /runs/{id}/errors`).
const ERRORS_IN_EVENT: u64 = 10;

/// Records the webhook events of a run that just changed status (see
/// `db::webhooks::record`): `run.<status>`, and when it ended,
/// `storage.objects_missing` for an import that found objects gone (with
/// what its storage's `on_missing` did to their tasks) and `export.failed`
/// for an export with objects it could not write.
async fn record_events(db: &impl ConnectionTrait, run: &sync_run::Model) -> Result<()> {
    use super::{entities::storage, webhooks::record};
    let project_id: Option<i64> = storage::Entity::find_by_id(run.storage_id)
        .select_only()
        .column(storage::Column::ProjectId)
        .into_tuple()
        .one(db)
        .await?;
    let mut data = serde_json::json!({ "run": to_json(run), "project_id": project_id });
    let status = RunStatus::parse(&run.status).unwrap_or(RunStatus::Failed);
    let event = match status {
        RunStatus::Running => "run.started".to_owned(),
        other => format!("run.{}", other.as_str()),
    };
    record(db, &event, project_id, data.clone()).await?;
    if status.is_live() {
        return Ok(());
    }
    if status.is_completed() && run.kind == RunKind::Import.as_str() && run.missing > 0 {
        data["missing"] = run.missing.into();
        data["tasks_deleted"] = run.deleted.into();
        data["tasks_kept"] = run.kept.into();
        record(db, "storage.objects_missing", project_id, data.clone()).await?;
    }
    if run.kind == RunKind::Export.as_str() && run.failed > 0 {
        let errors = errors_page(db, &run.id, None, ERRORS_IN_EVENT).await?;
        data["failed"] = run.failed.into();
        data["errors"] = errors
            .iter()
            .map(|e| serde_json::json!({ "key": e.object_key, "error": e.error }))
            .collect();
        record(db, "export.failed", project_id, data).await?;
    }
    Ok(())
}

/// Lets go of an attempt's lease after a transient failure, recording why,
/// so the retry can start at once. An attempt `handed_back` by a worker
/// shutting down (SIGTERM: a scale-in, a deploy) gives back the attempt it
/// counted: attempts are counted as they begin so that crashes count, and
/// a long run handed back at every scale-in was failed after five.
pub async fn release(
    db: &impl ConnectionTrait,
    id: &str,
    owner: &str,
    error: &str,
    handed_back: bool,
) -> Result<()> {
    let counted = Expr::col(sync_run::Column::Attempts);
    let attempts = if handed_back { counted.sub(1) } else { counted };
    sync_run::Entity::update_many()
        .col_expr(
            sync_run::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
        .col_expr(sync_run::Column::Attempts, attempts)
        .col_expr(
            sync_run::Column::Error,
            Expr::value(crate::error::storable(error)),
        )
        .filter(sync_run::Column::Id.eq(id))
        .filter(sync_run::Column::LeaseOwner.eq(owner))
        // An ended run keeps its own error (an attempt whose end committed
        // but whose client saw an error fails as transient after it).
        .filter(sync_run::Column::Status.is_in(LIVE))
        .exec(db)
        .await?;
    Ok(())
}

/// Cancels a queued or running run; a worker running it notices at its next
/// checkpoint. Cancelling an ended run changes nothing.
pub async fn cancel(db: &DatabaseConnection, id: &str) -> Result<sync_run::Model> {
    get(db, id).await?;
    finish(
        db,
        id,
        RunStatus::Cancelled,
        Some("cancelled by request".into()),
        None,
    )
    .await?;
    get(db, id).await
}

/// Records per-object failures of a run (one row each, inserted in bulk).
pub async fn record_errors(
    db: &impl ConnectionTrait,
    run_id: &str,
    errors: Vec<(String, Option<i64>, String)>,
) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let now = crate::clock::now();
    let rows = errors
        .into_iter()
        .map(|(key, row, error)| object_error::ActiveModel {
            run_id: Set(run_id.to_owned()),
            object_key: Set(key),
            row_index: Set(row),
            error: Set(crate::error::storable(&error)),
            created_at: Set(now),
            ..Default::default()
        });
    let rows: Vec<_> = rows.collect();
    for chunk in rows.chunks(super::MAX_PARAMS / 5) {
        object_error::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// A run as the API (and the CLI) shows it.
pub fn to_json(run: &sync_run::Model) -> serde_json::Value {
    serde_json::json!({
        "id": run.id,
        "storage_id": run.storage_id,
        "kind": run.kind,
        "scope": run.scope,
        "retry_of": run.retry_of,
        "status": run.status,
        "counters": Counters::of(run),
        "error": run.error,
        "attempts": run.attempts,
        "queued_at": run.queued_at,
        "started_at": run.started_at,
        "heartbeat_at": run.heartbeat_at,
        "finished_at": run.finished_at,
        "held": super::admission::is_held(run),
        "admitted_at": run.admitted_at,
        "trace_id": run.trace_id,
    })
}

/// The storage a run works on and its project, in one statement;
/// `NotFound` when either was deleted (the run goes with them).
pub async fn owners(
    db: &impl ConnectionTrait,
    storage_id: i64,
) -> Result<(
    super::entities::storage::Model,
    super::entities::project::Model,
)> {
    use super::entities::{project, storage};
    let (storage, project) = storage::Entity::find_by_id(storage_id)
        .find_also_related(project::Entity)
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("storage {storage_id} was deleted")))?;
    let project = project
        .ok_or_else(|| Error::NotFound(format!("project {} was deleted", storage.project_id)))?;
    Ok((storage, project))
}

/// A run with the storage it works on and that storage's project, in one
/// statement; `NotFound` when the run is gone, and no owners when either
/// was deleted (the run goes with them).
pub async fn with_owners(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<(
    sync_run::Model,
    Option<(
        super::entities::storage::Model,
        super::entities::project::Model,
    )>,
)> {
    use super::entities::{project, storage};
    let (run, storage, project) = sync_run::Entity::find_by_id(id.to_owned())
        .find_also_related(storage::Entity)
        .and_also_related(project::Entity)
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run {id} not found")))?;
    Ok((run, storage.zip(project)))
}

/// Admitted live runs with no sign of life (heartbeat, admission, or
/// queueing time) since `cutoff`, oldest first, at most `limit`: their job
/// may be lost. Held runs are not among them: they have no job yet, and
/// only admission may give them one.
pub async fn stalled(
    db: &impl ConnectionTrait,
    cutoff: chrono::DateTime<Utc>,
    limit: u64,
) -> Result<Vec<String>> {
    use sea_orm::sea_query::Func;
    use sync_run::Column as C;
    let unheard = Expr::expr(Func::coalesce([
        Expr::col(C::HeartbeatAt),
        Expr::col(C::QueuedAt),
    ]))
    .lt(cutoff);
    let stalled = sea_orm::Condition::all()
        .add(C::Status.is_in(LIVE))
        .add(C::AdmittedAt.is_not_null())
        .add(unheard);
    ids_where(db, stalled, limit).await
}

/// Running runs whose lease is free or was last renewed before `before`
/// (the condition on which an attempt takes a run over), at most `limit`,
/// oldest first.
pub async fn running_with_stale_lease(
    db: &impl ConnectionTrait,
    before: chrono::DateTime<Utc>,
    limit: u64,
) -> Result<Vec<String>> {
    use sync_run::Column as C;
    let stale = sea_orm::Condition::any()
        .add(C::LeaseOwner.is_null())
        .add(C::LeaseAt.is_null())
        .add(C::LeaseAt.lt(before));
    let running = sea_orm::Condition::all()
        .add(C::Status.eq(RunStatus::Running.as_str()))
        .add(stale);
    ids_where(db, running, limit).await
}

/// Queued runs admitted (their job pushed) before `before` and not
/// marked alive since ([`mark_alive_if_queued`]), at most `limit`, oldest
/// first: what a queue that forgot its jobs at `before` is given again,
/// a page at a time (each page is marked alive once pushed).
pub async fn admitted_queued(
    db: &impl ConnectionTrait,
    before: chrono::DateTime<Utc>,
    limit: u64,
) -> Result<Vec<String>> {
    use sync_run::Column as C;
    let not_alive_since = sea_orm::Condition::any()
        .add(C::HeartbeatAt.is_null())
        .add(C::HeartbeatAt.lt(before));
    let admitted = sea_orm::Condition::all()
        .add(C::Status.eq(RunStatus::Queued.as_str()))
        .add(C::AdmittedAt.lt(before))
        .add(not_alive_since);
    ids_where(db, admitted, limit).await
}

/// The ids of the runs that meet `condition`, oldest first, at most `limit`.
async fn ids_where(
    db: &impl ConnectionTrait,
    condition: sea_orm::Condition,
    limit: u64,
) -> Result<Vec<String>> {
    use sea_orm::QuerySelect;
    Ok(sync_run::Entity::find()
        .select_only()
        .column(sync_run::Column::Id)
        .filter(condition)
        .order_by_asc(sync_run::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Counts the still-queued runs among `ids` as alive at `now` (they were
/// just pushed to the queue again).
pub async fn mark_alive_if_queued(
    db: &impl ConnectionTrait,
    ids: Vec<String>,
    now: chrono::DateTime<Utc>,
) -> Result<()> {
    use sync_run::Column as C;
    sync_run::Entity::update_many()
        .col_expr(C::HeartbeatAt, Expr::value(now))
        .filter(C::Id.is_in(ids))
        .filter(C::Status.eq(RunStatus::Queued.as_str()))
        .exec(db)
        .await?;
    Ok(())
}

/// The filters of [`page`] (`None`: any).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunFilter<'a> {
    pub storage_id: Option<i64>,
    pub project_id: Option<i64>,
    /// Runs queued after / before these times.
    pub created_after: Option<chrono::DateTime<Utc>>,
    pub created_before: Option<chrono::DateTime<Utc>>,
    pub status: Option<RunStatus>,
    /// A run kind's name (the caller checked it).
    pub kind: Option<&'a str>,
    /// A run id: runs older than it.
    pub before: Option<&'a str>,
    /// Only runs of these projects (a restricted caller's).
    pub projects: Option<&'a [i64]>,
}

/// Up to `limit` runs matching `filter`, newest first (run ids are ULIDs, so
/// id order is creation order).
pub async fn page(
    db: &impl ConnectionTrait,
    filter: RunFilter<'_>,
    limit: u64,
) -> Result<Vec<sync_run::Model>> {
    let mut query = sync_run::Entity::find()
        .order_by_desc(sync_run::Column::Id)
        .limit(limit);
    if let Some(storage_id) = filter.storage_id {
        query = query.filter(sync_run::Column::StorageId.eq(storage_id));
    }
    if let Some(project_id) = filter.project_id {
        query = query.filter(sync_run::Column::ProjectId.eq(project_id));
    }
    if let Some(after) = filter.created_after {
        query = query.filter(sync_run::Column::QueuedAt.gt(after));
    }
    if let Some(before) = filter.created_before {
        query = query.filter(sync_run::Column::QueuedAt.lt(before));
    }
    if let Some(status) = filter.status {
        query = query.filter(sync_run::Column::Status.eq(status.as_str()));
    }
    if let Some(kind) = filter.kind {
        query = query.filter(sync_run::Column::Kind.eq(kind));
    }
    if let Some(before) = filter.before {
        query = query.filter(sync_run::Column::Id.lt(before));
    }
    if let Some(projects) = filter.projects {
        query = query.filter(of_projects(projects));
    }
    Ok(query.all(db).await?)
}

/// How many runs there are of each status: those queued at or after
/// `since` (all when `None`), of these projects (all when `None`).
pub async fn count_by_status(
    db: &impl ConnectionTrait,
    since: Option<chrono::DateTime<Utc>>,
    projects: Option<&[i64]>,
) -> Result<HashMap<String, i64>> {
    let mut query = sync_run::Entity::find()
        .select_only()
        .column(sync_run::Column::Status)
        .column_as(sync_run::Column::Id.count(), "n")
        .group_by(sync_run::Column::Status);
    if let Some(since) = since {
        query = query.filter(sync_run::Column::QueuedAt.gte(since));
    }
    if let Some(projects) = projects {
        query = query.filter(of_projects(projects));
    }
    let rows: Vec<(String, i64)> = query.into_tuple().all(db).await?;
    Ok(rows.into_iter().collect())
}

/// Runs of these projects.
fn of_projects(projects: &[i64]) -> sea_orm::Condition {
    sea_orm::Condition::all().add(sync_run::Column::ProjectId.is_in(projects.iter().copied()))
}

/// Up to `limit` per-object errors of the run with ids above `after`, in id
/// order (none for an unknown run: the caller checks the run first).
pub async fn errors_page(
    db: &impl ConnectionTrait,
    run_id: &str,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<object_error::Model>> {
    let mut query = object_error::Entity::find()
        .filter(object_error::Column::RunId.eq(run_id))
        .order_by_asc(object_error::Column::Id)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(object_error::Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Up to `limit` distinct keys of the run's per-object errors after
/// `after`, in key order (what a `retry` run of it reads again).
pub async fn error_keys(
    db: &impl ConnectionTrait,
    run_id: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>> {
    let mut query = object_error::Entity::find()
        .select_only()
        .column(object_error::Column::ObjectKey)
        .distinct()
        .filter(object_error::Column::RunId.eq(run_id))
        .order_by_asc(object_error::Column::ObjectKey)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(object_error::Column::ObjectKey.gt(after));
    }
    Ok(query.into_tuple().all(db).await?)
}

/// Which of `keys` are keys of the run's per-object errors (each once).
pub async fn error_keys_among(
    db: &impl ConnectionTrait,
    run_id: &str,
    keys: Vec<String>,
) -> Result<Vec<String>> {
    Ok(object_error::Entity::find()
        .select_only()
        .column(object_error::Column::ObjectKey)
        .distinct()
        .filter(object_error::Column::RunId.eq(run_id))
        .filter(object_error::Column::ObjectKey.is_in(keys))
        .into_tuple()
        .all(db)
        .await?)
}

/// Whether the run recorded any per-object error.
pub async fn has_errors(db: &impl ConnectionTrait, run_id: &str) -> Result<bool> {
    Ok(object_error::Entity::find()
        .filter(object_error::Column::RunId.eq(run_id))
        .one(db)
        .await?
        .is_some())
}

/// Runs that ended at or after `since`, of these projects (all when
/// `None`), at most `limit`, oldest end first: the console's throughput
/// and failure charts, a project event stream's ended runs. Reads the
/// `finished_at` index.
pub async fn ended_since(
    db: &impl ConnectionTrait,
    since: chrono::DateTime<Utc>,
    projects: Option<&[i64]>,
    limit: u64,
) -> Result<Vec<sync_run::Model>> {
    let mut query = sync_run::Entity::find()
        .filter(sync_run::Column::FinishedAt.gte(since))
        .order_by_asc(sync_run::Column::FinishedAt)
        .order_by_asc(sync_run::Column::Id)
        .limit(limit);
    if let Some(projects) = projects {
        query = query.filter(of_projects(projects));
    }
    Ok(query.all(db).await?)
}

/// What the runs that ended in one span did: how many ended, how many
/// failed, and the objects they listed, tasks they created and annotations
/// they exported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EndedTotals {
    pub ended: i64,
    pub failed: i64,
    pub listed: i64,
    pub created: i64,
    pub exported: i64,
}

/// The totals of the runs of these projects (all when `None`) that ended in
/// each of `spans` spans of `span` ending at `now`, oldest first: span `i`
/// holds the ends in `(start + i span, start + (i + 1) span]`, `start`
/// being `now - spans x span`. Summed in the database, one query whatever
/// the number of runs (the console read every run of the day, and at most
/// 20,000 of them, the oldest: a busy day's last hour looked idle).
pub async fn ended_per_span(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<Utc>,
    span: chrono::Duration,
    spans: usize,
    projects: Option<&[i64]>,
) -> Result<Vec<EndedTotals>> {
    use sync_run::Column as C;
    if spans == 0 {
        return Ok(Vec::new());
    }
    let count = i32::try_from(spans).unwrap_or(i32::MAX);
    let start = now - span * count;
    // Each end's span: the first whose upper bound it does not pass.
    let mut which = sea_orm::sea_query::CaseStatement::new();
    for i in 0..count {
        which = which.case(C::FinishedAt.lte(start + span * (i + 1)), i);
    }
    let sum = |column: &str| Expr::cust(format!("CAST(COALESCE(SUM({column}), 0) AS BIGINT)"));
    let failed = format!(
        "CASE WHEN status = '{}' THEN 1 ELSE 0 END",
        RunStatus::Failed.as_str()
    );
    let mut query = sync_run::Entity::find()
        .select_only()
        .column_as(Into::<Expr>::into(which.finally(count)), "span")
        .column_as(Expr::cust("CAST(COUNT(*) AS BIGINT)"), "ended")
        .column_as(sum(&failed), "failed")
        .column_as(sum("listed"), "listed")
        .column_as(sum("created"), "created")
        .column_as(sum("exported"), "exported")
        .filter(C::FinishedAt.gt(start))
        .filter(C::FinishedAt.lte(now))
        // By position: a name would be taken for a column of that name first.
        .group_by(Expr::cust("1"));
    if let Some(projects) = projects {
        query = query.filter(of_projects(projects));
    }
    let rows: Vec<(i32, i64, i64, i64, i64, i64)> = query.into_tuple().all(db).await?;
    let mut totals = vec![EndedTotals::default(); spans];
    for (i, ended, failed, listed, created, exported) in rows {
        if let Some(total) = usize::try_from(i).ok().and_then(|i| totals.get_mut(i)) {
            *total = EndedTotals {
                ended,
                failed,
                listed,
                created,
                exported,
            };
        }
    }
    Ok(totals)
}

/// The newest run of each storage that has one, by storage id, in two
/// queries whatever the number of storages.
pub async fn newest_of(
    db: &impl ConnectionTrait,
    storage_ids: &[i64],
) -> Result<HashMap<i64, sync_run::Model>> {
    let newest: Vec<String> = sync_run::Entity::find()
        .select_only()
        .column_as(sync_run::Column::Id.max(), "id")
        .filter(sync_run::Column::StorageId.is_in(storage_ids.iter().copied()))
        .group_by(sync_run::Column::StorageId)
        .into_tuple()
        .all(db)
        .await?;
    let runs = sync_run::Entity::find()
        .filter(sync_run::Column::Id.is_in(newest))
        .all(db)
        .await?;
    Ok(runs.into_iter().map(|r| (r.storage_id, r)).collect())
}

/// The storage's newest run before `run` of its kind and scope that
/// completed (with or without object errors): what the console estimates a
/// live run's size from. Index: `sync_runs (storage_id, id)`.
pub async fn previous_completed(
    db: &impl ConnectionTrait,
    run: &sync_run::Model,
) -> Result<Option<sync_run::Model>> {
    let done = [RunStatus::Completed, RunStatus::CompletedWithErrors].map(RunStatus::as_str);
    Ok(sync_run::Entity::find()
        .filter(sync_run::Column::StorageId.eq(run.storage_id))
        .filter(sync_run::Column::Id.lt(run.id.as_str()))
        .filter(sync_run::Column::Kind.eq(run.kind.as_str()))
        .filter(sync_run::Column::Scope.eq(run.scope.as_str()))
        .filter(sync_run::Column::Status.is_in(done))
        .order_by_desc(sync_run::Column::Id)
        .one(db)
        .await?)
}

/// The live runs (queued or running), of these projects when given, at
/// most `limit`, oldest first (the partial live-run index).
pub async fn live_of(
    db: &impl ConnectionTrait,
    projects: Option<&[i64]>,
    limit: u64,
) -> Result<Vec<sync_run::Model>> {
    let mut query = sync_run::Entity::find()
        .filter(sync_run::Column::Status.is_in(LIVE))
        .order_by_asc(sync_run::Column::Id)
        .limit(limit);
    if let Some(projects) = projects {
        query = query.filter(of_projects(projects));
    }
    Ok(query.all(db).await?)
}

/// A page of the runs that ended after `after` (the `(finished_at, id)`
/// of the last run of the previous page), in that order, of these projects
/// when given: a keyset page, which goes on however many runs ended at
/// one instant. Reads the `finished_at` index.
pub async fn ended_after(
    db: &impl ConnectionTrait,
    projects: Option<&[i64]>,
    after: (chrono::DateTime<Utc>, &str),
    limit: u64,
) -> Result<Vec<sync_run::Model>> {
    use sync_run::Column as C;
    let (at, id) = after;
    let past = sea_orm::Condition::any().add(C::FinishedAt.gt(at)).add(
        sea_orm::Condition::all()
            .add(C::FinishedAt.eq(at))
            .add(C::Id.gt(id)),
    );
    let mut query = sync_run::Entity::find()
        .filter(past)
        .order_by_asc(C::FinishedAt)
        .order_by_asc(C::Id)
        .limit(limit);
    if let Some(projects) = projects {
        query = query.filter(of_projects(projects));
    }
    Ok(query.all(db).await?)
}

/// The runs of these ids that exist.
/// Which of `ids` are runs still queued.
pub async fn queued_among(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sync_run::Entity::find()
        .select_only()
        .column(sync_run::Column::Id)
        .filter(sync_run::Column::Id.is_in(ids.iter().map(String::as_str)))
        .filter(sync_run::Column::Status.eq(RunStatus::Queued.as_str()))
        .into_tuple()
        .all(db)
        .await?)
}

pub async fn by_ids(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<sync_run::Model>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sync_run::Entity::find()
        .filter(sync_run::Column::Id.is_in(ids.iter().map(String::as_str)))
        .all(db)
        .await?)
}
