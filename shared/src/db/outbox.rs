//! The export outbox: annotation events waiting for target storages.
//!
//! The API writes a row per target storage in the transaction that changes
//! the annotation ([`record`]); export runs drain them ([`page`], [`remove`]);
//! the scheduler starts runs for storages with rows ([`pending_storages`]).
//! One row per (storage, annotation): a newer event replaces the action and
//! bumps `version`, so an annotation edited ten times is exported once, and a
//! row drained while a newer event arrived is not removed.
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement,
};

use super::entities::export_outbox::{self, Column};
use crate::Result;

pub const UPSERT: &str = "upsert";
pub const DELETE: &str = "delete";

/// Records `action` for an annotation on every target storage of its
/// project; returns those storages' ids. A delete keeps, per storage, the
/// key its export link holds (call it before the annotation, and so its
/// links, are deleted): the object is where it was exported, whatever the
/// storage's prefix is now.
pub async fn record(
    db: &impl ConnectionTrait,
    project_id: i64,
    annotation_id: i64,
    action: &str,
) -> Result<Vec<i64>> {
    let backend = db.get_database_backend();
    // Numbered on both: the annotation's id is used twice.
    let p = |n: usize| match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => format!("?{n}"),
    };
    // Upserts: no key (a link, if any, is the upsert's to replace).
    let key = if action == DELETE {
        "l.object_key"
    } else {
        "NULL"
    };
    let sql = format!(
        "INSERT INTO export_outbox \
             (storage_id, annotation_id, action, version, created_at, object_key) \
         SELECT s.id, {a}, {action}, 1, {at}, {key} FROM storages s \
         LEFT JOIN export_links l ON l.storage_id = s.id AND l.annotation_id = {a} \
         WHERE s.project_id = {project} AND s.role = 'target' \
         ON CONFLICT (storage_id, annotation_id) DO UPDATE SET action = excluded.action, \
         version = export_outbox.version + 1, created_at = excluded.created_at, \
         object_key = excluded.object_key \
         RETURNING storage_id",
        a = p(1),
        action = p(2),
        at = p(3),
        project = p(4),
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [
                annotation_id.into(),
                action.into(),
                crate::clock::now().into(),
                project_id.into(),
            ],
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get::<i64>("", "storage_id").map_err(Into::into))
        .collect()
}

/// Storages with events waiting (at most `limit`).
pub async fn pending_storages(db: &impl ConnectionTrait, limit: u64) -> Result<Vec<i64>> {
    Ok(export_outbox::Entity::find()
        .select_only()
        .column(Column::StorageId)
        .distinct()
        .order_by_asc(Column::StorageId)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Whether any event waits for this storage.
pub async fn any_waiting(db: &impl ConnectionTrait, storage_id: i64) -> Result<bool> {
    Ok(!oldest(db, storage_id, 1).await?.is_empty())
}

/// A storage's oldest waiting events (at most `limit`), oldest first.
pub async fn oldest(
    db: &impl ConnectionTrait,
    storage_id: i64,
    limit: u64,
) -> Result<Vec<export_outbox::Model>> {
    Ok(export_outbox::Entity::find()
        .filter(Column::StorageId.eq(storage_id))
        .order_by_asc(Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Removes drained events, unless a newer event updated them meanwhile.
pub async fn remove(db: &impl ConnectionTrait, drained: &[export_outbox::Model]) -> Result<()> {
    for chunk in drained.chunks(1000) {
        let cond = chunk.iter().fold(Condition::any(), |cond, row| {
            cond.add(
                Condition::all()
                    .add(Column::Id.eq(row.id))
                    .add(Column::Version.eq(row.version)),
            )
        });
        export_outbox::Entity::delete_many()
            .filter(cond)
            .exec(db)
            .await?;
    }
    Ok(())
}
