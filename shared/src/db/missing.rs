//! The tasks of objects gone from a source storage with `on_missing:
//! delete_unlabeled` (docs/API.md, "Storages"). After a complete listing,
//! in the transaction that flags the missing links and checkpoints the run:
//! a task whose every import link is flagged (`object_exists = false`) and
//! that has no annotation is deleted, and its predictions and links with it
//! (foreign keys; on Postgres the links' delete trigger of migration 5); the
//! others are kept.
//!
//! Everything is set-based: one counting statement, and two statements per
//! chunk of [`CHUNK`] tasks to delete, never one per task.
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Statement};

use super::MAX_PARAMS;
use crate::Result;

/// Tasks per delete statement (one bound parameter each).
const CHUNK: usize = 5_000;
const _: () = assert!(CHUNK <= MAX_PARAMS);

/// Call before [`super::links::flag_missing`]: how many tasks with a link
/// the run found missing (see `links::count_missing`) will stay, because
/// they have an annotation or a link whose object is still there (listed by
/// the run, or of another storage and not flagged).
pub async fn kept_tasks(db: &impl ConnectionTrait, storage_id: i64, run_id: &str) -> Result<i64> {
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    let sql = "SELECT COUNT(DISTINCT l.task_id) AS n FROM import_links l \
               WHERE l.storage_id = $1 AND l.object_exists = TRUE \
                 AND (l.seen_run_id IS NULL OR l.seen_run_id <> $2) \
                 AND (EXISTS (SELECT 1 FROM annotations a WHERE a.task_id = l.task_id) \
                   OR EXISTS (SELECT 1 FROM import_links p WHERE p.task_id = l.task_id \
                              AND p.object_exists = TRUE \
                              AND (p.storage_id <> $1 OR p.seen_run_id = $2)))";
    let count = Count::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        [storage_id.into(), run_id.into()],
    ))
    .one(db)
    .await?;
    Ok(count.map_or(0, |c| c.n))
}

/// Call after [`super::links::flag_missing`]: deletes the unlabeled tasks
/// whose every link is flagged, among those with a flagged link of
/// `storage_id` (whenever it was flagged: a task kept while annotated goes
/// once its annotations are deleted), chunk by chunk in task id order.
/// Returns how many.
pub async fn delete_unlabeled(db: &impl ConnectionTrait, storage_id: i64) -> Result<i64> {
    let mut deleted = 0;
    let mut after = i64::MIN;
    loop {
        let ids = lock_candidates(db, storage_id, after).await?;
        let Some(&last) = ids.last() else {
            return Ok(deleted);
        };
        deleted += delete_if_still_unlabeled(db, &ids).await?;
        if ids.len() < CHUNK {
            return Ok(deleted);
        }
        after = last;
    }
}

/// The next [`CHUNK`] tasks to delete after task id `after`, in id order:
/// tasks with a flagged link of `storage_id`, no link present and no
/// annotation. Found through the partial index `import_links_gone`, so only
/// the storage's flagged links are read.
///
/// On Postgres they are locked (`FOR UPDATE`): an annotation being saved at
/// that moment holds a key-share lock on its task until it commits, so this
/// waits for it, and [`delete_if_still_unlabeled`], a new statement with a
/// new snapshot, sees the annotation and keeps the task. (On SQLite the
/// transaction holds the database's write lock already.)
async fn lock_candidates(
    db: &impl ConnectionTrait,
    storage_id: i64,
    after: i64,
) -> Result<Vec<i64>> {
    #[derive(FromQueryResult)]
    struct Id {
        id: i64,
    }
    let backend = db.get_database_backend();
    let lock = if backend == DbBackend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    // `$n` parameters work on both backends (sqlx binds SQLite's `$NNN` by
    // number).
    let sql = format!(
        "SELECT t.id FROM tasks t WHERE t.id IN ( \
             SELECT l.task_id FROM import_links l \
             WHERE l.storage_id = $1 AND l.object_exists = FALSE AND l.task_id > $2 \
               AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.task_id = l.task_id) \
               AND NOT EXISTS (SELECT 1 FROM import_links p \
                               WHERE p.task_id = l.task_id AND p.object_exists = TRUE) \
             GROUP BY l.task_id ORDER BY l.task_id LIMIT $3) \
         ORDER BY t.id{lock}",
    );
    let rows = Id::find_by_statement(Statement::from_sql_and_values(
        backend,
        sql,
        [storage_id.into(), after.into(), (CHUNK as i64).into()],
    ))
    .all(db)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Deletes those of `ids` (at most [`CHUNK`]) that still have no
/// annotation; returns how many. Their links are not checked again: only
/// the run that holds the storage's lease writes them, and a check of them
/// here is misplanned on Postgres (see docs/DECISIONS.md, Tasks of missing
/// objects deleted by id, in chunks).
async fn delete_if_still_unlabeled(db: &impl ConnectionTrait, ids: &[i64]) -> Result<i64> {
    let params: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "DELETE FROM tasks WHERE id IN ({}) \
         AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.task_id = tasks.id)",
        params.join(", ")
    );
    let res = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            ids.iter().map(|&id| id.into()),
        ))
        .await?;
    Ok(res.rows_affected() as i64)
}
