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
    /// How many annotations fit the budget (those read, unless some were
    /// deleted since they were measured).
    pub taken: usize,
    /// Where the next keyset page starts: after this id. `None` when there
    /// was nothing to measure: the end.
    pub next: Option<i64>,
}

/// How a page is cut: at most `bytes` of JSON text (as [`Meter`] counts
/// it), measured first over `first_window` annotations, then over windows
/// 8 times larger (at most twice what the budget left holds, see
/// [`Meter::next_window`]) until the budget or the page is full. Measuring renders
/// a task's JSON as reading it would: a page of large tasks must not
/// measure a thousand to take two (pass twice the last page's take), and
/// a page of small ones reaches its thousand in a few rounds.
#[derive(Clone, Copy)]
pub struct Budget {
    pub bytes: usize,
    pub first_window: usize,
}

/// Up to `limit` of the project's annotations with an id above `after`, by
/// id, with their tasks, within `budget`. The sizes are measured in the
/// database first (ids and sizes only), so what is left out is never read:
/// a page of 1,000 annotations of 1,000 large tasks held every task at once.
pub async fn annotation_page(
    db: &DatabaseConnection,
    project_id: i64,
    after: i64,
    limit: usize,
    budget: Budget,
) -> Result<Page> {
    let rows = annotation::Entity::find()
        .filter(annotation::Column::ProjectId.eq(project_id))
        .order_by_asc(annotation::Column::Id);
    let mut meter = Meter::new(budget.bytes);
    let mut window = budget.first_window.clamp(1, limit.max(1));
    let mut from = after;
    while meter.taken.len() < limit {
        let want = window.min(limit - meter.taken.len());
        let measured = rows.clone().filter(annotation::Column::Id.gt(from));
        let costs = annotation_costs(db, measured.limit(want as u64)).await?;
        let Some(&(last, _, _)) = costs.last() else {
            break;
        };
        let ended = costs.len() < want;
        if meter.add(db, &costs).await?.is_some() || ended {
            break;
        }
        from = last;
        window = meter.next_window(window);
    }
    let taken = meter.taken.len();
    let Some(&last) = meter.taken.last() else {
        return Ok(Page::default());
    };
    // At most as many as were measured: an annotation committed since with
    // an id below `last` was not (the next page reads what this one drops).
    let annotations = rows
        .filter(annotation::Column::Id.gt(after))
        .filter(annotation::Column::Id.lte(last))
        .limit(taken as u64)
        .all(db)
        .await?;
    // Fewer than were measured: some were deleted since, and every
    // measured one up to `last` was read.
    let next = match annotations.last() {
        Some(read) if annotations.len() == taken => read.id,
        _ => last,
    };
    with_tasks(db, annotations, taken, Some(next)).await
}

/// Of `ids`, in their order, the annotations still in the project with
/// their tasks, as many from the front as fit `budget` (ids of annotations
/// gone cost nothing); and how many of `ids` that covers (the rest are left
/// for later).
pub async fn annotations_of(
    db: &DatabaseConnection,
    project_id: i64,
    ids: &[i64],
    budget: Budget,
) -> Result<(Page, usize)> {
    if ids.is_empty() {
        return Ok((Page::default(), 0));
    }
    let mut meter = Meter::new(budget.bytes);
    let mut window = budget.first_window.max(1);
    let mut start = 0;
    let mut covered = ids.len();
    while start < ids.len() {
        let chunk = &ids[start..ids.len().min(start.saturating_add(window))];
        let rows = annotation::Entity::find()
            .filter(annotation::Column::ProjectId.eq(project_id))
            .filter(annotation::Column::Id.is_in(chunk.iter().copied()));
        let found: HashMap<i64, (i64, i64, i64)> = annotation_costs(db, rows)
            .await?
            .into_iter()
            .map(|cost| (cost.0, cost))
            .collect();
        let costs: Vec<(i64, i64, i64)> = chunk
            .iter()
            .filter_map(|id| found.get(id))
            .copied()
            .collect();
        if let Some(left) = meter.add(db, &costs).await? {
            let first_left = costs[left].0;
            covered = start + chunk.iter().position(|id| *id == first_left).unwrap_or(0);
            break;
        }
        start += chunk.len();
        window = meter.next_window(window);
    }
    let annotations = annotation::Entity::find()
        .filter(annotation::Column::Id.is_in(meter.taken.iter().copied()))
        .filter(annotation::Column::ProjectId.eq(project_id))
        .order_by_asc(annotation::Column::Id)
        .all(db)
        .await?;
    let taken = meter.taken.len();
    Ok((with_tasks(db, annotations, taken, None).await?, covered))
}

/// `(annotation id, task id, bytes of its result and completed_by as JSON
/// text)` of `rows`.
async fn annotation_costs(
    db: &DatabaseConnection,
    rows: sea_orm::Select<annotation::Entity>,
) -> Result<Vec<(i64, i64, i64)>> {
    Ok(rows
        .select_only()
        .column(annotation::Column::Id)
        .column(annotation::Column::TaskId)
        .column_as(
            super::json_text_bytes(db, &["result", "completed_by"]),
            "bytes",
        )
        .into_tuple()
        .all(db)
        .await?)
}

/// Annotations taken in page order while they fit `budget` bytes of JSON
/// text: each annotation's own, and its task's `data` and `meta` the first
/// time the page meets the task (the page holds it once; the bodies made
/// from it are bounded by the export's concurrency). The first always
/// fits.
struct Meter {
    budget: usize,
    used: usize,
    taken: Vec<i64>,
    /// The tasks of the annotations taken (counted once).
    met: HashSet<i64>,
}

impl Meter {
    fn new(budget: usize) -> Self {
        Meter {
            budget,
            used: 0,
            taken: Vec::new(),
            met: HashSet::new(),
        }
    }

    /// Measures the tasks of `costs` not met yet and takes the annotations
    /// while they fit; the index in `costs` of the first that did not.
    async fn add(
        &mut self,
        db: &DatabaseConnection,
        costs: &[(i64, i64, i64)],
    ) -> Result<Option<usize>> {
        let new: HashSet<i64> = costs
            .iter()
            .map(|&(_, task, _)| task)
            .filter(|task| !self.met.contains(task))
            .collect();
        let mut sizes: HashMap<i64, i64> = HashMap::new();
        if !new.is_empty() {
            sizes = task::Entity::find()
                .filter(task::Column::Id.is_in(new))
                .select_only()
                .column(task::Column::Id)
                .column_as(super::json_text_bytes(db, &["data", "meta"]), "bytes")
                .into_tuple::<(i64, i64)>()
                .all(db)
                .await?
                .into_iter()
                .collect();
        }
        for (i, &(id, task, own)) in costs.iter().enumerate() {
            let task_bytes = match self.met.contains(&task) {
                true => 0,
                false => sizes.get(&task).copied().unwrap_or(0),
            };
            let bytes = usize::try_from(own.saturating_add(task_bytes)).unwrap_or(0);
            if !self.taken.is_empty() && self.used.saturating_add(bytes) > self.budget {
                return Ok(Some(i));
            }
            self.used = self.used.saturating_add(bytes);
            self.met.insert(task);
            self.taken.push(id);
        }
        Ok(None)
    }

    /// The next measuring window after one of `window`: 8 times larger,
    /// but at most twice what the budget left holds at the sizes taken so
    /// far, and never smaller than the last (one large task must not leave
    /// a page of small ones measuring a few at a time). The database renders every task a window measures, so a window
    /// 8 times larger than what the page still takes rendered up to 8
    /// times the page's budget of task JSON to take a few more.
    fn next_window(&self, window: usize) -> usize {
        let grown = window.saturating_mul(8);
        let Some(average) = self.used.checked_div(self.taken.len()).filter(|&a| a > 0) else {
            return grown;
        };
        let fits = self.budget.saturating_sub(self.used) / average;
        grown.min(fits.saturating_mul(2)).max(window)
    }
}

/// `annotations` with the tasks they belong to (one query), as a page.
async fn with_tasks(
    db: &DatabaseConnection,
    annotations: Vec<annotation::Model>,
    taken: usize,
    next: Option<i64>,
) -> Result<Page> {
    let ids: HashSet<i64> = annotations.iter().map(|a| a.task_id).collect();
    let tasks = task::Entity::find()
        .filter(task::Column::Id.is_in(ids))
        .all(db)
        .await?;
    Ok(Page {
        annotations,
        tasks: tasks.into_iter().map(|t| (t.id, t)).collect(),
        taken,
        next,
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

/// Forgets where the target `storage_id` wrote each annotation: it was
/// moved elsewhere (another bucket, another directory), where none of them
/// is yet, so its next full export writes every one (a link says only the
/// key, which the new place shares).
pub async fn forget_links(db: &impl ConnectionTrait, storage_id: i64) -> Result<()> {
    export_link::Entity::delete_many()
        .filter(export_link::Column::StorageId.eq(storage_id))
        .exec(db)
        .await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows grow 8 times until the page's sizes say how many more fit;
    /// then at most twice that many are measured.
    #[test]
    fn a_measuring_window_grows_no_further_than_the_budget_left() {
        let mut meter = Meter::new(32 << 20);
        assert_eq!(meter.next_window(16), 128, "nothing taken: no sizes yet");
        meter.taken = (0..16).collect();
        meter.used = 16 << 20;
        assert_eq!(meter.next_window(16), 32, "16 MiB left at 1 MiB each");
        meter.used = (32 << 20) - 10;
        assert_eq!(meter.next_window(16), 16, "never smaller than the last");
        meter.used = 16 << 10;
        assert_eq!(meter.next_window(16), 128, "small ones: 8 times");
    }
}
