//! Import links: the (storage, object key, row) -> task map. Its unique key is
//! what makes a replayed page, a retried job or a resumed run create nothing
//! twice. Every function here works a page at a time: one query per page,
//! never one per object.
use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::OnConflict,
};

use super::{
    MAX_PARAMS,
    entities::{import_link, task},
};
use crate::Result;

/// One task to create from an object (or a row of it).
#[derive(Debug, Clone)]
pub struct NewTask {
    pub object_key: String,
    pub row_index: i64,
    pub data: serde_json::Value,
    pub meta: Option<serde_json::Value>,
    pub etag: Option<String>,
    pub size: Option<i64>,
    pub last_modified: Option<DateTime<Utc>>,
}

/// The keys among `keys` that already have a link for row 0 in this storage.
pub async fn existing_keys(
    db: &impl ConnectionTrait,
    storage_id: i64,
    keys: &[String],
) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in keys.chunks(MAX_PARAMS) {
        let rows: Vec<String> = import_link::Entity::find()
            .select_only()
            .column(import_link::Column::ObjectKey)
            .filter(import_link::Column::StorageId.eq(storage_id))
            .filter(import_link::Column::RowIndex.eq(0))
            .filter(import_link::Column::ObjectKey.is_in(chunk.iter().cloned()))
            .into_tuple()
            .all(db)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Inserts the tasks and their links in bulk; call inside a transaction.
/// Returns how many were created and how many already existed.
///
/// The links are inserted with ON CONFLICT DO NOTHING, so if another attempt
/// linked the same (key, row) in the meantime, the task we just created for it
/// is deleted again in this same transaction: the link, not the caller's
/// earlier dedup query, has the last word.
pub async fn insert_tasks(
    db: &impl ConnectionTrait,
    project_id: i64,
    storage_id: i64,
    items: Vec<NewTask>,
) -> Result<(i64, i64)> {
    let mut created = 0;
    let mut existed = 0;
    // 6 parameters per task row and 10 per link row.
    for chunk in items.chunks(MAX_PARAMS / 10) {
        let now = Utc::now();
        let tasks = chunk.iter().map(|item| task::ActiveModel {
            project_id: Set(project_id),
            data: Set(item.data.clone()),
            meta: Set(item.meta.clone()),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        });
        // Both Postgres and SQLite hand out ids of one multi-row INSERT in row
        // order; RETURNING's order is not promised, so sort before pairing.
        let mut ids = task::Entity::insert_many(tasks)
            .exec_with_returning_keys(db)
            .await?;
        ids.sort_unstable();

        let links = chunk
            .iter()
            .zip(&ids)
            .map(|(item, id)| import_link::ActiveModel {
                storage_id: Set(storage_id),
                object_key: Set(item.object_key.clone()),
                row_index: Set(item.row_index),
                task_id: Set(*id),
                etag: Set(item.etag.clone()),
                size: Set(item.size),
                last_modified: Set(item.last_modified),
                object_exists: Set(true),
                created_at: Set(now),
                updated_at: Set(now),
                ..Default::default()
            });
        let linked: Vec<i64> = import_link::Entity::insert_many(links)
            .on_conflict(
                OnConflict::columns([
                    import_link::Column::StorageId,
                    import_link::Column::ObjectKey,
                    import_link::Column::RowIndex,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_with_returning(db)
            .await?
            .into_iter()
            .map(|link| link.task_id)
            .collect();

        if linked.len() < ids.len() {
            let linked: HashSet<i64> = linked.iter().copied().collect();
            let orphans: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !linked.contains(id))
                .collect();
            task::Entity::delete_many()
                .filter(task::Column::Id.is_in(orphans.iter().copied()))
                .exec(db)
                .await?;
            existed += orphans.len() as i64;
        }
        created += linked.len() as i64;
    }
    Ok((created, existed))
}
