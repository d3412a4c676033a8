//! What an export run reads and writes: the project's annotations in keyset
//! pages, their tasks, and the export links (annotation -> object key and
//! content hash) that say what a target already has.
use std::collections::{HashMap, HashSet};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::OnConflict,
};

use super::entities::{annotation, export_link, task};
use crate::Result;

/// The project's annotations with an id above `after`, by id, at most `limit`.
pub async fn annotation_page(
    db: &impl ConnectionTrait,
    project_id: i64,
    after: i64,
    limit: u64,
) -> Result<Vec<annotation::Model>> {
    Ok(annotation::Entity::find()
        .filter(annotation::Column::ProjectId.eq(project_id))
        .filter(annotation::Column::Id.gt(after))
        .order_by_asc(annotation::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// The annotations among `ids` that still exist in the project.
pub async fn annotations_in_project(
    db: &impl ConnectionTrait,
    project_id: i64,
    ids: Vec<i64>,
) -> Result<Vec<annotation::Model>> {
    Ok(annotation::Entity::find()
        .filter(annotation::Column::Id.is_in(ids))
        .filter(annotation::Column::ProjectId.eq(project_id))
        .all(db)
        .await?)
}

/// The tasks among `ids`, by id (one query).
pub async fn tasks_by_id(
    db: &impl ConnectionTrait,
    ids: Vec<i64>,
) -> Result<HashMap<i64, task::Model>> {
    let tasks = task::Entity::find()
        .filter(task::Column::Id.is_in(ids))
        .all(db)
        .await?;
    Ok(tasks.into_iter().map(|t| (t.id, t)).collect())
}

/// The storage's export links of the annotations among `ids`, by annotation.
pub async fn links_of(
    db: &impl ConnectionTrait,
    storage_id: i64,
    annotation_ids: Vec<i64>,
) -> Result<HashMap<i64, export_link::Model>> {
    let links = export_link::Entity::find()
        .filter(export_link::Column::StorageId.eq(storage_id))
        .filter(export_link::Column::AnnotationId.is_in(annotation_ids))
        .all(db)
        .await?;
    Ok(links.into_iter().map(|l| (l.annotation_id, l)).collect())
}

/// Writes (or updates) the links of uploaded annotations; call inside the
/// page's transaction. An annotation deleted since its page was read has no
/// link to keep (its delete event removes the object): only links of
/// annotations still there are written, and on Postgres those rows are
/// locked against deletion until the transaction ends, so the links'
/// foreign key holds.
pub async fn write_links(
    txn: &impl ConnectionTrait,
    links: Vec<export_link::ActiveModel>,
) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = links
        .iter()
        .filter_map(|l| l.annotation_id.clone().take())
        .collect();
    let mut alive = annotation::Entity::find()
        .select_only()
        .column(annotation::Column::Id)
        .filter(annotation::Column::Id.is_in(ids));
    if txn.get_database_backend() == DbBackend::Postgres {
        alive = alive.lock_shared();
    }
    let alive: HashSet<i64> = alive.into_tuple().all(txn).await?.into_iter().collect();
    let links: Vec<_> = links
        .into_iter()
        .filter(|l| {
            l.annotation_id
                .clone()
                .take()
                .is_some_and(|id| alive.contains(&id))
        })
        .collect();
    for chunk in links.chunks(1000) {
        export_link::Entity::insert_many(chunk.to_vec())
            .on_conflict(
                OnConflict::columns([
                    export_link::Column::StorageId,
                    export_link::Column::AnnotationId,
                ])
                .update_columns([
                    export_link::Column::ObjectKey,
                    export_link::Column::ContentHash,
                    export_link::Column::ExportedAt,
                ])
                .to_owned(),
            )
            .exec_without_returning(txn)
            .await?;
    }
    Ok(())
}
