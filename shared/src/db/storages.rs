//! Storages: the rows the API, the CLI and the periodic tick read and write
//! (the spec behind a row, its validation and its secrets are
//! `storage::spec`'s). Every change a resolve could see (insert, replace,
//! secrets, delete) bumps [`change_counters::STORAGES`] on the same
//! connection or transaction.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::NotSet,
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel, Order, QueryFilter,
    QueryOrder, QuerySelect,
    sea_query::{Expr, NullOrdering},
};
use serde_json::Value;

use super::{change_counters, entities::storage};
use crate::Result;

/// The storage with this id, or `None` (never an error for a missing row).
pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<storage::Model>> {
    Ok(storage::Entity::find_by_id(id).one(db).await?)
}

/// Locks storage `id`'s row for update until the caller's transaction ends
/// (Postgres; SQLite writes one at a time anyway).
pub async fn lock(db: &impl ConnectionTrait, id: i64) -> Result<()> {
    storage::Entity::find_by_id(id)
        .select_only()
        .column(storage::Column::Id)
        .lock_exclusive()
        .into_tuple::<i64>()
        .one(db)
        .await?;
    Ok(())
}

/// Every storage's id, in order (the primary key's index alone).
pub async fn all_ids(db: &impl ConnectionTrait) -> Result<Vec<i64>> {
    Ok(storage::Entity::find()
        .select_only()
        .column(storage::Column::Id)
        .order_by_asc(storage::Column::Id)
        .into_tuple()
        .all(db)
        .await?)
}

/// The filters of [`page`] (`None`: any).
#[derive(Debug, Default, Clone, Copy)]
pub struct StorageFilter<'a> {
    pub project_id: Option<i64>,
    pub role: Option<&'a str>,
    /// Storages with ids above this one.
    pub after: Option<i64>,
    /// Only storages of these projects (a restricted caller's).
    pub projects: Option<&'a [i64]>,
}

/// Up to `limit` storages matching `filter`, in id order.
pub async fn page(
    db: &impl ConnectionTrait,
    filter: StorageFilter<'_>,
    limit: u64,
) -> Result<Vec<storage::Model>> {
    let mut query = storage::Entity::find()
        .order_by_asc(storage::Column::Id)
        .limit(limit);
    if let Some(project_id) = filter.project_id {
        query = query.filter(storage::Column::ProjectId.eq(project_id));
    }
    if let Some(role) = filter.role {
        query = query.filter(storage::Column::Role.eq(role));
    }
    if let Some(after) = filter.after {
        query = query.filter(storage::Column::Id.gt(after));
    }
    if let Some(ids) = filter.projects {
        query = query.filter(storage::Column::ProjectId.is_in(ids.iter().copied()));
    }
    Ok(query.all(db).await?)
}

/// Every storage of the project with this role and backend, in id order
/// (possibly none).
pub async fn of_project(
    db: &impl ConnectionTrait,
    project_id: i64,
    role: &str,
    backend: &str,
) -> Result<Vec<storage::Model>> {
    Ok(storage::Entity::find()
        .filter(storage::Column::ProjectId.eq(project_id))
        .filter(storage::Column::Role.eq(role))
        .filter(storage::Column::Backend.eq(backend))
        .order_by_asc(storage::Column::Id)
        .all(db)
        .await?)
}

/// The oldest storage of the project with this role, backend and title, or
/// `None`.
pub async fn find_titled(
    db: &impl ConnectionTrait,
    project_id: i64,
    role: &str,
    backend: &str,
    title: &str,
) -> Result<Option<storage::Model>> {
    Ok(storage::Entity::find()
        .filter(storage::Column::ProjectId.eq(project_id))
        .filter(storage::Column::Role.eq(role))
        .filter(storage::Column::Backend.eq(backend))
        .filter(storage::Column::Title.eq(title))
        .order_by_asc(storage::Column::Id)
        .one(db)
        .await?)
}

/// Inserts `row` as a new storage (its `id` is ignored: the database picks
/// one) and returns the saved row.
pub async fn insert(db: &impl ConnectionTrait, row: storage::Model) -> Result<storage::Model> {
    let mut model = row.into_active_model().reset_all();
    model.id = NotSet;
    let saved = model.insert(db).await?;
    change_counters::bump(db, change_counters::STORAGES).await?;
    Ok(saved)
}

/// Writes a PATCHed storage's settings (`row`) over the storage with its id
/// as it was read, at `read_updated_at`; the row as saved, or `None` when
/// it was changed since (another PATCH); an error when it is gone. The columns a PATCH
/// does not set are left as they are now, not as they were read: the
/// sealed secrets (see [`set_secrets`]), the pause (a pause landing while
/// a PATCH ran was undone), and the next sync when `keep_schedule`.
pub async fn replace(
    db: &impl ConnectionTrait,
    row: storage::Model,
    read_updated_at: DateTime<Utc>,
    keep_schedule: bool,
) -> Result<Option<storage::Model>> {
    let id = row.id;
    let mut update = row.into_active_model().reset_all();
    update.id = NotSet;
    update.created_at = NotSet;
    update.secrets = NotSet;
    update.secrets_set = NotSet;
    update.schedule_paused_at = NotSet;
    if keep_schedule {
        update.next_sync_at = NotSet;
    }
    let written = storage::Entity::update_many()
        .set(update)
        .filter(storage::Column::Id.eq(id))
        .filter(storage::Column::UpdatedAt.eq(read_updated_at))
        .exec(db)
        .await?;
    if written.rows_affected == 0 {
        return match find(db, id).await? {
            Some(_) => Ok(None),
            None => Err(crate::Error::NotFound(format!(
                "storage {id} was deleted by another request meanwhile"
            ))),
        };
    }
    change_counters::bump(db, change_counters::STORAGES).await?;
    find(db, id).await
}

/// Sets the sealed secrets of a saved storage and the names of those set;
/// returns the row.
pub async fn set_secrets(
    db: &impl ConnectionTrait,
    row: storage::Model,
    sealed: Option<String>,
    names: Value,
) -> Result<storage::Model> {
    let mut update = row.into_active_model();
    update.secrets = Set(sealed);
    update.secrets_set = Set(names);
    let saved = update.update(db).await?;
    change_counters::bump(db, change_counters::STORAGES).await?;
    Ok(saved)
}

/// Up to `limit` storages with sealed secrets and ids above `after`, in id
/// order: `(id, sealed)`.
pub async fn sealed_after(
    db: &impl ConnectionTrait,
    after: i64,
    limit: u64,
) -> Result<Vec<(i64, String)>> {
    Ok(storage::Entity::find()
        .select_only()
        .column(storage::Column::Id)
        .column(storage::Column::Secrets)
        .filter(storage::Column::Id.gt(after))
        .filter(storage::Column::Secrets.is_not_null())
        .order_by_asc(storage::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Replaces storage `id`'s sealed secrets `old` with `new` (the same
/// secrets sealed again); false when they are no longer `old` (a save in
/// between wrote others, which stay). `updated_at` is left: a PATCH that
/// read the row before is not refused for it.
pub async fn swap_sealed(db: &impl ConnectionTrait, id: i64, old: &str, new: &str) -> Result<bool> {
    let written = storage::Entity::update_many()
        .col_expr(storage::Column::Secrets, Expr::value(new))
        .filter(storage::Column::Id.eq(id))
        .filter(storage::Column::Secrets.eq(old))
        .exec(db)
        .await?;
    if written.rows_affected == 0 {
        return Ok(false);
    }
    change_counters::bump(db, change_counters::STORAGES).await?;
    Ok(true)
}

/// Deletes the storage (its links and runs go with it, ON DELETE CASCADE);
/// false when there was no such storage.
pub async fn delete(db: &impl ConnectionTrait, id: i64) -> Result<bool> {
    let res = storage::Entity::delete_by_id(id).exec(db).await?;
    change_counters::bump(db, change_counters::STORAGES).await?;
    Ok(res.rows_affected > 0)
}

/// Pauses (`Some(now)`) or resumes (`None`) the storage's periodic syncs;
/// pausing a paused storage keeps the time it was paused at. The row as it
/// is after, or `None` when there is no such storage.
pub async fn set_schedule_paused(
    db: &impl ConnectionTrait,
    id: i64,
    paused_at: Option<DateTime<Utc>>,
) -> Result<Option<storage::Model>> {
    let mut update = storage::Entity::update_many()
        .col_expr(storage::Column::SchedulePausedAt, Expr::value(paused_at))
        .filter(storage::Column::Id.eq(id));
    if paused_at.is_some() {
        update = update.filter(storage::Column::SchedulePausedAt.is_null());
    }
    update.exec(db).await?;
    find(db, id).await
}

/// Records the outcome of checking the storage as it was saved at
/// `checked_updated_at` (`error`: what was wrong; `None`: it answered as
/// expected). Nothing is written when the storage was changed (or deleted)
/// since: that check was of settings it no longer has.
pub async fn record_validation(
    db: &impl ConnectionTrait,
    id: i64,
    checked_updated_at: DateTime<Utc>,
    error: Option<&str>,
) -> Result<()> {
    storage::Entity::update_many()
        .col_expr(
            storage::Column::ValidatedAt,
            Expr::value(crate::clock::now()),
        )
        .col_expr(
            storage::Column::ValidationError,
            Expr::value(error.map(str::to_owned)),
        )
        .filter(storage::Column::Id.eq(id))
        .filter(storage::Column::UpdatedAt.eq(checked_updated_at))
        .exec(db)
        .await?;
    Ok(())
}

/// Storages with a sync period, not paused, whose next sync is unset or
/// not after `now`. A period that came round while paused is due at once
/// when the storage is resumed.
fn due(now: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(storage::Column::SyncIntervalSeconds.is_not_null())
        .add(storage::Column::SchedulePausedAt.is_null())
        .add(
            Condition::any()
                .add(storage::Column::NextSyncAt.is_null())
                .add(storage::Column::NextSyncAt.lte(now)),
        )
}

/// Up to `limit` storages whose period has come at `now`, longest due
/// first (never synced first): (id, period in seconds). In any other order
/// the same `limit` storages, due again at every tick (a project's storages
/// with a 1 s period), could take every place and starve the others.
pub async fn due_for_sync(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<(i64, Option<i64>)>> {
    Ok(storage::Entity::find()
        .select_only()
        .column(storage::Column::Id)
        .column(storage::Column::SyncIntervalSeconds)
        .filter(due(now))
        .order_by_with_nulls(storage::Column::NextSyncAt, Order::Asc, NullOrdering::First)
        .order_by_asc(storage::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Whether the storage exists with its schedule not paused, its row
/// locked `FOR SHARE` (Postgres) until `txn` ends: a pause waits for it.
/// SQLite's write transactions run one at a time, which does the same.
pub async fn schedule_active(txn: &impl ConnectionTrait, id: i64) -> Result<bool> {
    let mut row = storage::Entity::find_by_id(id)
        .select_only()
        .column(storage::Column::Id)
        .filter(storage::Column::SchedulePausedAt.is_null());
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        row = row.lock_shared();
    }
    let found: Option<i64> = row.into_tuple().one(txn).await?;
    Ok(found.is_some())
}

/// Claims the storage's period: moves its next sync to `held` if it is
/// still due at `now`; false when another replica took it first (or it is
/// gone). The claimer moves it on to the next period once the period's
/// run is made ([`move_period`]); a claimer that dies first leaves it due
/// again at `held`.
pub async fn claim_period(
    db: &impl ConnectionTrait,
    id: i64,
    now: DateTime<Utc>,
    held: DateTime<Utc>,
) -> Result<bool> {
    let claimed = storage::Entity::update_many()
        .col_expr(storage::Column::NextSyncAt, Expr::value(held))
        .filter(storage::Column::Id.eq(id))
        .filter(due(now))
        .exec(db)
        .await?;
    Ok(claimed.rows_affected > 0)
}

/// Moves a period [`claim_period`] claimed from `from` to `to`: on to the
/// next period once its run is made, or back to now when it could not be
/// (the next tick tries again). Nothing when the storage was changed or
/// claimed meanwhile.
pub async fn move_period(
    db: &impl ConnectionTrait,
    id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<bool> {
    let moved = storage::Entity::update_many()
        .col_expr(storage::Column::NextSyncAt, Expr::value(to))
        .filter(storage::Column::Id.eq(id))
        .filter(storage::Column::NextSyncAt.eq(from))
        .exec(db)
        .await?;
    Ok(moved.rows_affected > 0)
}
