//! What an export run reads and writes: the project's annotations in keyset
//! pages, their tasks, and the export links (annotation -> object key and
//! content hash) that say what a target already has.
use std::collections::{HashMap, HashSet};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, sea_query::OnConflict,
};

use super::entities::{annotation, export_link, task};
use crate::Result;

/// What an export page holds at once: annotations and their tasks.
#[derive(Default)]
pub struct Page {
    pub annotations: Vec<annotation::Model>,
    pub tasks: HashMap<i64, task::Model>,
}

/// Up to `limit` of the project's annotations with an id above `after`, by
/// id, with their tasks, within `budget` bytes as [`costs_within`] counts
/// them. The sizes are measured in the database first (ids and sizes only),
/// so what is left out is never read: a page of 1,000 annotations of 1,000
/// large tasks held every task at once.
pub async fn annotation_page(
    db: &DatabaseConnection,
    project_id: i64,
    after: i64,
    limit: u64,
    budget: usize,
) -> Result<Page> {
    let rows = annotation::Entity::find()
        .filter(annotation::Column::ProjectId.eq(project_id))
        .filter(annotation::Column::Id.gt(after))
        .order_by_asc(annotation::Column::Id);
    let costs = annotation_costs(db, rows.clone().limit(limit)).await?;
    let taken = costs_within(db, &costs, budget).await?;
    let Some(&(last, _)) = costs[..taken].last() else {
        return Ok(Page::default());
    };
    // At most as many as were measured: an annotation committed since with
    // an id below `last` was not (the next page reads what this one drops).
    let annotations = rows
        .filter(annotation::Column::Id.lte(last))
        .limit(taken as u64)
        .all(db)
        .await?;
    with_tasks(db, annotations).await
}

/// Of `ids`, in their order, the annotations still in the project with
/// their tasks, as many from the front as fit `budget` (as
/// [`costs_within`] counts them; ids of annotations gone cost nothing);
/// and how many of `ids` that covers (the rest are left for later).
pub async fn annotations_of(
    db: &DatabaseConnection,
    project_id: i64,
    ids: &[i64],
    budget: usize,
) -> Result<(Page, usize)> {
    let rows = annotation::Entity::find()
        .filter(annotation::Column::ProjectId.eq(project_id))
        .filter(annotation::Column::Id.is_in(ids.iter().copied()));
    let found: HashMap<i64, (i64, i64)> = annotation_costs(db, rows).await?.into_iter().collect();
    let costs: Vec<(i64, (i64, i64))> = ids
        .iter()
        .filter_map(|id| Some((*id, *found.get(id)?)))
        .collect();
    let taken = costs_within(db, &costs, budget).await?;
    let covered = match costs.get(taken) {
        Some((first_left, _)) => ids.iter().position(|id| id == first_left).unwrap_or(0),
        None => ids.len(),
    };
    let kept: Vec<i64> = costs[..taken].iter().map(|(id, _)| *id).collect();
    let annotations = annotation::Entity::find()
        .filter(annotation::Column::Id.is_in(kept))
        .filter(annotation::Column::ProjectId.eq(project_id))
        .order_by_asc(annotation::Column::Id)
        .all(db)
        .await?;
    Ok((with_tasks(db, annotations).await?, covered))
}

/// `(annotation id, (task id, bytes of its result and completed_by as
/// JSON text))` of `rows`.
async fn annotation_costs(
    db: &DatabaseConnection,
    rows: sea_orm::Select<annotation::Entity>,
) -> Result<Vec<(i64, (i64, i64))>> {
    let rows: Vec<(i64, i64, i64)> = rows
        .select_only()
        .column(annotation::Column::Id)
        .column(annotation::Column::TaskId)
        .column_as(
            super::json_text_bytes(db, &["result", "completed_by"]),
            "bytes",
        )
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, task, bytes)| (id, (task, bytes)))
        .collect())
}

/// How many of `costs` (annotations, in page order) fit `budget` bytes
/// of JSON text: each annotation's own, and its task's `data` and `meta`
/// the first time the page meets the task (the page holds it once; the
/// bodies made from it are bounded by the export's concurrency). The first
/// always fits.
async fn costs_within(
    db: &DatabaseConnection,
    costs: &[(i64, (i64, i64))],
    budget: usize,
) -> Result<usize> {
    let task_ids: HashSet<i64> = costs.iter().map(|(_, (task, _))| *task).collect();
    let task_bytes: HashMap<i64, i64> = task::Entity::find()
        .filter(task::Column::Id.is_in(task_ids))
        .select_only()
        .column(task::Column::Id)
        .column_as(super::json_text_bytes(db, &["data", "meta"]), "bytes")
        .into_tuple::<(i64, i64)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    let mut met = HashSet::new();
    let sized: Vec<(i64, i64)> = costs
        .iter()
        .map(|&(id, (task, own))| {
            let task = if met.insert(task) {
                task_bytes.get(&task).copied().unwrap_or(0)
            } else {
                0
            };
            (id, own.saturating_add(task))
        })
        .collect();
    let (last, _) = super::last_within(&sized, budget);
    Ok(last
        .and_then(|last| sized.iter().position(|(id, _)| *id == last))
        .map_or(0, |i| i + 1))
}

/// `annotations` with the tasks they belong to (one query).
async fn with_tasks(db: &DatabaseConnection, annotations: Vec<annotation::Model>) -> Result<Page> {
    let ids: HashSet<i64> = annotations.iter().map(|a| a.task_id).collect();
    let tasks = task::Entity::find()
        .filter(task::Column::Id.is_in(ids))
        .all(db)
        .await?;
    Ok(Page {
        annotations,
        tasks: tasks.into_iter().map(|t| (t.id, t)).collect(),
    })
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
