//! The partitions of a partitioned import run (see `ingest::partitions`):
//! written by the run's job in one transaction, listed by any worker under
//! a lease, each moving its own cursor with the pages it commits.
use chrono::Utc;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::{Expr, ExprTrait},
};

use super::entities::sync_partition::{self, Column as C};
use crate::Result;

/// Writes the run's partitions: `(prefix, recursive, cursor)` each, the
/// cursor being the key a partition's listing starts after (none: from
/// its beginning).
pub async fn create(
    db: &impl ConnectionTrait,
    run_id: &str,
    parts: &[(String, bool, Option<String>)],
) -> Result<()> {
    let rows = parts
        .iter()
        .map(|(prefix, recursive, cursor)| sync_partition::ActiveModel {
            run_id: Set(run_id.to_owned()),
            prefix: Set(prefix.clone()),
            recursive: Set(*recursive),
            cursor: Set(cursor.clone()),
            done: Set(false),
            failed: Set(false),
            attempts: Set(0),
            ..Default::default()
        });
    sync_partition::Entity::insert_many(rows).exec(db).await?;
    Ok(())
}

/// The run's partitions, in the order they were made.
pub async fn of_run(db: &impl ConnectionTrait, run_id: &str) -> Result<Vec<sync_partition::Model>> {
    Ok(sync_partition::Entity::find()
        .filter(C::RunId.eq(run_id))
        .order_by_asc(C::Id)
        .all(db)
        .await?)
}

/// How many partitions the run has, and how many of them are done.
pub async fn count(db: &impl ConnectionTrait, run_id: &str) -> Result<(usize, usize)> {
    let of_run = || sync_partition::Entity::find().filter(C::RunId.eq(run_id));
    let found = of_run().count(db).await?;
    let done = of_run().filter(C::Done.eq(true)).count(db).await?;
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok((size(found), size(done)))
}

/// Partitions of the run not finished yet.
pub async fn pending(db: &impl ConnectionTrait, run_id: &str) -> Result<u64> {
    Ok(sync_partition::Entity::find()
        .filter(C::RunId.eq(run_id))
        .filter(C::Done.eq(false))
        .count(db)
        .await?)
}

/// A partition no live attempt holds: never leased, let go, or its
/// holder's lease older than `stale`.
fn free(stale: chrono::DateTime<Utc>) -> Condition {
    Condition::any()
        .add(C::LeaseOwner.is_null())
        .add(C::LeaseAt.is_null())
        .add(C::LeaseAt.lt(stale))
}

/// Takes partition `id` for an attempt (counting it) unless it is done,
/// given up on, out of attempts (`max`), or held by a live attempt.
pub async fn claim(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
    stale: chrono::DateTime<Utc>,
    max: i64,
) -> Result<Option<sync_partition::Model>> {
    let res = sync_partition::Entity::update_many()
        .col_expr(C::Attempts, Expr::col(C::Attempts).add(1))
        .col_expr(C::LeaseOwner, Expr::value(owner))
        .col_expr(C::LeaseAt, Expr::value(crate::clock::now()))
        .filter(C::Id.eq(id))
        .filter(C::Done.eq(false))
        .filter(C::Failed.eq(false))
        .filter(C::Attempts.lt(max))
        .filter(free(stale))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Ok(None);
    }
    Ok(sync_partition::Entity::find_by_id(id).one(db).await?)
}

/// The first partition of the run [`claim`] would take now.
pub async fn claimable(
    db: &impl ConnectionTrait,
    run_id: &str,
    stale: chrono::DateTime<Utc>,
    max: i64,
) -> Result<Vec<i64>> {
    Ok(sync_partition::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::RunId.eq(run_id))
        .filter(C::Done.eq(false))
        .filter(C::Failed.eq(false))
        .filter(C::Attempts.lt(max))
        .filter(free(stale))
        .order_by_asc(C::Id)
        .limit(4)
        .into_tuple()
        .all(db)
        .await?)
}

/// A partition the run cannot finish without: given up on, or out of
/// attempts with no live attempt left.
pub async fn lost(
    db: &impl ConnectionTrait,
    run_id: &str,
    stale: chrono::DateTime<Utc>,
    max: i64,
) -> Result<Option<sync_partition::Model>> {
    Ok(sync_partition::Entity::find()
        .filter(C::RunId.eq(run_id))
        .filter(C::Done.eq(false))
        .filter(
            Condition::any()
                .add(C::Failed.eq(true))
                .add(Condition::all().add(C::Attempts.gte(max)).add(free(stale))),
        )
        .order_by_asc(C::Id)
        .one(db)
        .await?)
}

/// Moves the partition's cursor (when given) and renews its lease; false
/// when `owner` no longer holds it (taken over, or finished), or when the
/// cursor is not where the move starts.
pub async fn checkpoint(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
    cursor: Option<super::runs::CursorMove<'_>>,
) -> Result<bool> {
    let mut update = sync_partition::Entity::update_many()
        .col_expr(C::LeaseAt, Expr::value(crate::clock::now()));
    // Moved only from where the attempt left it (see
    // `runs::checkpoint_page`).
    if let Some(cursor) = cursor {
        update = update.filter(cursor.starts_at(C::Cursor));
        if let Some(to) = cursor.to {
            update = update.col_expr(C::Cursor, Expr::value(to));
        }
    }
    let res = update
        .filter(C::Id.eq(id))
        .filter(C::LeaseOwner.eq(owner))
        .filter(C::Done.eq(false))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// The cursor of partition `id` while `owner` holds it (the outer `None`
/// when it does not, or the partition is done).
pub async fn cursor_of(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
) -> Result<Option<Option<String>>> {
    let row = sync_partition::Entity::find_by_id(id)
        .filter(C::LeaseOwner.eq(owner))
        .filter(C::Done.eq(false))
        .one(db)
        .await?;
    Ok(row.map(|row| row.cursor))
}

/// Marks the partition listed; false when `owner` no longer holds it, or
/// when its cursor is not `at`, where the attempt last committed it (see
/// `runs::checkpoint_page`).
pub async fn finish(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
    worker: &str,
    at: Option<&str>,
) -> Result<bool> {
    let stays = super::runs::CursorMove { from: at, to: None };
    let res = sync_partition::Entity::update_many()
        .filter(stays.starts_at(C::Cursor))
        .col_expr(C::Done, Expr::value(true))
        .col_expr(C::Worker, Expr::value(worker))
        .col_expr(C::FinishedAt, Expr::value(crate::clock::now()))
        .col_expr(C::LeaseOwner, Expr::value(Option::<String>::None))
        .filter(C::Id.eq(id))
        .filter(C::LeaseOwner.eq(owner))
        .filter(C::Done.eq(false))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Lets the partition go after a failed attempt, keeping why; `failed`
/// gives it up (the run then fails). An attempt `handed_back` by a worker
/// shutting down gives back the attempt it counted, as a run's does
/// (`runs::release`).
pub async fn release(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
    error: &str,
    failed: bool,
    handed_back: bool,
) -> Result<()> {
    let attempts = if handed_back {
        Expr::col(C::Attempts).sub(1)
    } else {
        Expr::col(C::Attempts)
    };
    sync_partition::Entity::update_many()
        .col_expr(C::LeaseOwner, Expr::value(Option::<String>::None))
        .col_expr(C::Attempts, attempts)
        .col_expr(C::Error, Expr::value(crate::error::storable(error)))
        .col_expr(C::Failed, Expr::value(failed))
        .filter(C::Id.eq(id))
        .filter(C::LeaseOwner.eq(owner))
        .exec(db)
        .await?;
    Ok(())
}
