//! Admission: which `queued` runs may go to the queue now. A run is created
//! *held* (`admitted_at` NULL); [`admit`] lets a project's held runs onto
//! the queue, oldest first, while the project has fewer than its cap of
//! admitted live runs (`LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT`). Nothing else
//! sets `admitted_at` on a queued run, and only admitted runs are pushed (by
//! `jobs::admission`, and again by the stalled-run sweep, which reads only
//! admitted runs), so the cap holds whoever pushes.
//!
//! Races: [`admit`] counts and admits in one transaction that first locks
//! the project's row (`FOR NO KEY UPDATE` on Postgres: two admitters of one
//! project take turns, and the second counts what the first committed; it
//! does not block inserts of storages, whose foreign key takes `KEY SHARE`).
//! SQLite has one writer at a time, and [`super::begin_write`] takes the
//! write lock at BEGIN. Everything else only lowers the count (a run ends,
//! is deleted, or is put back by [`hold_again`]), so a project never has
//! more admitted live runs than its cap, however many schedulers and
//! workers admit at once. (A project may be over it after the upgrade that
//! added the cap, or after the cap was lowered: it then admits nothing
//! until it is under.)
use chrono::Utc;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, FromQueryResult,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement, sea_query::Expr,
    sea_query::LockType,
};

use super::entities::{project, sync_run};
use crate::Result;

use sync_run::Column as C;

const QUEUED: &str = "queued";
const LIVE: [&str; 2] = ["queued", "running"];

/// True when `run` is held: queued and not yet let onto the queue.
pub fn is_held(run: &sync_run::Model) -> bool {
    run.status == QUEUED && run.admitted_at.is_none()
}

/// Admits up to `max` of the project's held runs, oldest first, as far as
/// its cap allows: fewer than `cap` admitted live runs after (`cap` 0: no
/// cap). Returns the ids admitted, oldest first: the caller pushes them,
/// and puts back with [`hold_again`] those the queue had no room for. An
/// admitted run counts as alive now (`heartbeat_at`), so the stalled-run
/// sweep leaves it to its push for `LABELSYNC_REQUEUE_AFTER_SECS` even if
/// it was held longer. Nothing for a deleted project.
pub async fn admit(
    db: &DatabaseConnection,
    project_id: i64,
    cap: u64,
    max: u64,
) -> Result<Vec<String>> {
    // Most calls (a run ended, nothing waits) stop at this one index probe,
    // without a lock. A run held after it is its creator's to release.
    if oldest_held(db, project_id).await?.is_none() {
        return Ok(Vec::new());
    }
    let tx = super::begin_write(db).await?;
    let locked: Option<i64> = project::Entity::find_by_id(project_id)
        .select_only()
        .column(project::Column::Id)
        .lock(LockType::NoKeyUpdate)
        .into_tuple()
        .one(&tx)
        .await?;
    let room = match (locked, cap) {
        (None, _) => 0,
        (Some(_), 0) => max,
        (Some(_), cap) => cap.saturating_sub(admitted_live_up_to(&tx, project_id, cap).await?),
    };
    if room == 0 {
        return Ok(Vec::new()); // rolled back on drop: nothing was written
    }
    let ids: Vec<String> = sync_run::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::ProjectId.eq(project_id))
        .filter(C::Status.eq(QUEUED))
        .filter(C::AdmittedAt.is_null())
        .order_by_asc(C::Id)
        .limit(room.min(max))
        .into_tuple()
        .all(&tx)
        .await?;
    if !ids.is_empty() {
        let now = crate::clock::now();
        sync_run::Entity::update_many()
            .col_expr(C::AdmittedAt, Expr::value(now))
            .col_expr(C::HeartbeatAt, Expr::value(now))
            .filter(C::Id.is_in(ids.clone()))
            .filter(C::Status.eq(QUEUED))
            .exec(&tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// The id of the project's oldest held run, if any.
async fn oldest_held(db: &impl ConnectionTrait, project_id: i64) -> Result<Option<String>> {
    Ok(sync_run::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::ProjectId.eq(project_id))
        .filter(C::Status.eq(QUEUED))
        .filter(C::AdmittedAt.is_null())
        .order_by_asc(C::Id)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?)
}

/// How many runs of the project are admitted and live (queued in the job
/// queue, or running).
pub async fn admitted_live(db: &impl ConnectionTrait, project_id: i64) -> Result<u64> {
    Ok(admitted_live_query(project_id).count(db).await?)
}

fn admitted_live_query(project_id: i64) -> sea_orm::Select<sync_run::Entity> {
    sync_run::Entity::find()
        .filter(C::ProjectId.eq(project_id))
        .filter(C::Status.is_in(LIVE))
        .filter(C::AdmittedAt.is_not_null())
}

/// [`admitted_live`], counted up to `bound` (ids read, at most `bound`):
/// all [`admit`] needs, and cheap even for a project far over its cap
/// (`count` would drop the limit).
async fn admitted_live_up_to(
    db: &impl ConnectionTrait,
    project_id: i64,
    bound: u64,
) -> Result<u64> {
    let ids: Vec<String> = admitted_live_query(project_id)
        .select_only()
        .column(C::Id)
        .limit(bound)
        .into_tuple()
        .all(db)
        .await?;
    Ok(ids.len() as u64)
}

/// Puts admitted runs that were not pushed (the queue's backlog was full)
/// back to held, so the scheduler's tick lets them on again once there is
/// room. Only while they are still `queued`: nothing else happened to them.
pub async fn hold_again(db: &impl ConnectionTrait, ids: Vec<String>) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sync_run::Entity::update_many()
        .col_expr(
            C::AdmittedAt,
            Expr::value(Option::<chrono::DateTime<Utc>>::None),
        )
        .col_expr(
            C::HeartbeatAt,
            Expr::value(Option::<chrono::DateTime<Utc>>::None),
        )
        .filter(C::Id.is_in(ids))
        .filter(C::Status.eq(QUEUED))
        .exec(db)
        .await?;
    Ok(())
}

/// Projects with held runs and room under `cap` (0: no cap), at most
/// `limit`, in the order they should be served: fewest admitted live runs
/// first (a project with nothing in flight before one with runs going),
/// then the one whose oldest held run has waited longest.
pub async fn waiting_projects(db: &impl ConnectionTrait, cap: u64, limit: u64) -> Result<Vec<i64>> {
    #[derive(FromQueryResult)]
    struct Waiting {
        project_id: i64,
    }
    let backend = db.get_database_backend();
    let p = |n: usize| match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    // Both counts read the partial indexes of migration 12 only.
    let sql = format!(
        "SELECT project_id FROM (\
           SELECT h.project_id, h.oldest, \
             (SELECT COUNT(*) FROM sync_runs a WHERE a.project_id = h.project_id \
              AND a.status IN ('queued', 'running') AND a.admitted_at IS NOT NULL) AS live \
           FROM (SELECT project_id, MIN(id) AS oldest FROM sync_runs \
                 WHERE status = 'queued' AND admitted_at IS NULL GROUP BY project_id) h\
         ) w WHERE {} = 0 OR w.live < {} ORDER BY w.live, w.oldest LIMIT {}",
        p(1),
        p(2),
        p(3)
    );
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = Waiting::find_by_statement(Statement::from_sql_and_values(
        backend,
        sql,
        [cap.into(), cap.into(), limit.into()],
    ))
    .all(db)
    .await?;
    Ok(rows.into_iter().map(|w| w.project_id).collect())
}

/// How many runs are held, over every project (the `labelsync.runs.held`
/// gauge).
pub async fn held(db: &impl ConnectionTrait) -> Result<u64> {
    Ok(sync_run::Entity::find()
        .filter(C::Status.eq(QUEUED))
        .filter(C::AdmittedAt.is_null())
        .count(db)
        .await?)
}
