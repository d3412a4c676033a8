//! Tasks made from storage objects: inserted in bulk with their import links
//! (the unique link key decides, inside the same transaction, which rows are
//! new), their predictions and annotations; and rewritten in place when a
//! changed task file is re-imported. The links themselves, and what the
//! pipeline asks of them, are in [`super::links`].
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, SqlErr, Statement, TransactionSession,
    TransactionTrait, sea_query::OnConflict,
};
use serde_json::Value;

use super::{
    MAX_PARAMS,
    entities::{annotation, import_link, prediction, task},
};
use crate::{Error, Result};

/// One task to create from an object (or a row of it).
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub object_key: String,
    pub row_index: i64,
    pub data: Value,
    pub meta: Option<Value>,
    /// Label Studio annotation objects carried by a full task (`result`,
    /// `completed_by`, `lead_time`, `was_cancelled`, `ground_truth`).
    pub annotations: Vec<Value>,
    /// Prediction objects (`result`, `model_version`, `score`).
    pub predictions: Vec<Value>,
    pub etag: Option<String>,
    pub size: Option<i64>,
    pub last_modified: Option<DateTime<Utc>>,
}

/// Replaces the data and meta of existing tasks, one statement per chunk (a
/// CTE of VALUES, which Postgres and SQLite both accept); returns how many
/// were updated. Annotations and predictions are left alone: they are the
/// labelers' work, not the file's.
pub async fn update_tasks(
    db: &impl ConnectionTrait,
    updates: Vec<(i64, Value, Option<Value>)>,
) -> Result<i64> {
    let backend = db.get_database_backend();
    let mut updated = 0;
    for chunk in updates.chunks(MAX_PARAMS / 3 - 1) {
        let mut n = 0;
        let mut param = || {
            n += 1;
            match backend {
                sea_orm::DbBackend::Postgres => format!("${n}"),
                _ => "?".to_owned(),
            }
        };
        let rows: Vec<String> = chunk
            .iter()
            .map(|_| format!("({}, {}, {})", param(), param(), param()))
            .collect();
        let now = param();
        let sql = format!(
            "WITH v(id, data, meta) AS (VALUES {}) \
             UPDATE tasks SET data = (SELECT v.data FROM v WHERE v.id = tasks.id), \
             meta = (SELECT v.meta FROM v WHERE v.id = tasks.id), updated_at = {now} \
             WHERE id IN (SELECT id FROM v)",
            rows.join(", ")
        );
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 3 + 1);
        for (id, data, meta) in chunk {
            values.push((*id).into());
            values.push(data.clone().into());
            values.push(meta.clone().into());
        }
        values.push(crate::clock::now().into());
        let res = db
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await?;
        updated += res.rows_affected() as i64;
    }
    Ok(updated)
}

/// Inserts the tasks, their links (seen by `run_id`), predictions and
/// annotations in bulk; call inside a transaction. Returns how many tasks
/// were created and how many were already linked.
///
/// The links are inserted with ON CONFLICT DO NOTHING, so if another attempt
/// linked the same (key, row) in the meantime, the task we just created for it
/// is deleted again in this same transaction: the link, not the caller's
/// earlier dedup query, has the last word.
pub async fn insert_tasks(
    db: &(impl ConnectionTrait + TransactionTrait),
    project_id: i64,
    storage_id: i64,
    run_id: &str,
    items: Vec<NewTask>,
) -> Result<(i64, i64)> {
    if db.get_database_backend() == DbBackend::Postgres {
        return insert_tasks_pg(db, project_id, storage_id, run_id, items).await;
    }
    let mut created = 0;
    let mut existed = 0;
    // 6 parameters per task row and 11 per link row.
    for chunk in items.chunks(MAX_PARAMS / 11) {
        let now = crate::clock::now();
        let ids = insert_task_rows(db, project_id, chunk, now).await?;
        let linked = insert_links(db, storage_id, run_id, chunk, &ids, now).await?;
        existed += delete_unlinked(db, &ids, &linked).await?;
        created += linked.len() as i64;
        insert_extras(db, project_id, chunk, &ids, &linked, now).await?;
    }
    Ok((created, existed))
}

/// One task per item, in one multi-row INSERT; their ids, ascending (so in
/// item order).
async fn insert_task_rows(
    db: &impl ConnectionTrait,
    project_id: i64,
    chunk: &[NewTask],
    now: DateTime<Utc>,
) -> Result<Vec<i64>> {
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
    Ok(ids)
}

/// The links of the items to their tasks `ids` (seen by `run_id`), with ON
/// CONFLICT DO NOTHING; the ids of the tasks whose link went in.
async fn insert_links(
    db: &impl ConnectionTrait,
    storage_id: i64,
    run_id: &str,
    chunk: &[NewTask],
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<HashSet<i64>> {
    let links = chunk
        .iter()
        .zip(ids)
        .map(|(item, id)| import_link::ActiveModel {
            storage_id: Set(storage_id),
            object_key: Set(item.object_key.clone()),
            row_index: Set(item.row_index),
            task_id: Set(*id),
            etag: Set(item.etag.clone()),
            size: Set(item.size),
            last_modified: Set(item.last_modified),
            object_exists: Set(true),
            seen_run_id: Set(Some(run_id.to_owned())),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        });
    // RETURNING only the task ids: decoding whole link rows cost more
    // than the insert itself.
    let mut insert = import_link::Entity::insert_many(links)
        .on_conflict(
            OnConflict::columns([
                import_link::Column::StorageId,
                import_link::Column::ObjectKey,
                import_link::Column::RowIndex,
            ])
            .do_nothing()
            .to_owned(),
        )
        .into_query();
    insert.returning_col(import_link::Column::TaskId);
    Ok(db
        .query_all(&insert)
        .await?
        .iter()
        .map(|row| row.try_get::<i64>("", "task_id"))
        .collect::<Result<_, _>>()?)
}

/// Deletes the tasks among `ids` whose link was not inserted (another
/// attempt linked their row first); returns how many.
async fn delete_unlinked(
    db: &impl ConnectionTrait,
    ids: &[i64],
    linked: &HashSet<i64>,
) -> Result<i64> {
    if linked.len() >= ids.len() {
        return Ok(0);
    }
    let orphans: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !linked.contains(id))
        .collect();
    task::Entity::delete_many()
        .filter(task::Column::Id.is_in(orphans.iter().copied()))
        .exec(db)
        .await?;
    Ok(orphans.len() as i64)
}

/// Postgres: one statement per chunk, whatever its size. The rows travel as
/// arrays (a fixed handful of parameters, so the statement is parsed once
/// per connection instead of a 10,000-parameter `VALUES` list every time),
/// the task ids are drawn from the sequence up front (in array order, so
/// ids ascend with the rows), and the links go in first: only rows whose
/// link was new get a task.
///
/// The rows are new as far as the caller could tell (it left out rows with
/// links), so the insert is tried without `ON CONFLICT` first (see
/// docs/DECISIONS.md, One statement per chunk, without ON CONFLICT first).
/// A row another attempt linked meanwhile fails that try with a unique
/// violation; it is undone to its savepoint and the chunk goes again with
/// `ON CONFLICT DO NOTHING`, which skips the raced rows.
///
/// Arrays cannot carry NULLs through sea-query, so absent values travel as
/// sentinels turned back into NULL in SQL: JSON `null` meta, an empty etag,
/// size -1 and the Unix epoch as last-modified time.
///
/// On Postgres these tables have no foreign keys to their parents (migration
/// `m20261202_000005_bulk_import_keys`; see docs/DECISIONS.md, Dropped
/// foreign keys on the bulk-import tables), so this function does once per
/// call what the checks did per row: it locks the storage and project rows
/// `FOR KEY SHARE`, which makes a concurrent delete of either wait for this
/// transaction (and then take the new rows with it through the delete
/// triggers), and fails with `NotFound` if one is gone already. Each task is
/// inserted in the statement that inserts its link.
async fn insert_tasks_pg(
    db: &(impl ConnectionTrait + TransactionTrait),
    project_id: i64,
    storage_id: i64,
    run_id: &str,
    items: Vec<NewTask>,
) -> Result<(i64, i64)> {
    // In this transaction the foreign-key checks (now those of predictions
    // and annotations) take cached plans again: see docs/DECISIONS.md
    // (plan_cache_mode back to auto for the task insert).
    db.execute_unprepared("SET LOCAL plan_cache_mode = auto")
        .await?;
    lock_owner(db, project_id, storage_id).await?;
    let mut created = 0;
    let mut existed = 0;
    for chunk in items.chunks(PG_STATEMENT_ROWS) {
        let now = crate::clock::now();
        let values = || chunk_values(chunk, project_id, storage_id, run_id, now);
        let rows = insert_chunk_pg(db, values).await?;
        let (ids, made) = created_ids(rows, chunk.len())?;
        created += made.len() as i64;
        existed += (chunk.len() - made.len()) as i64;
        insert_extras(db, project_id, chunk, &ids, &made, now).await?;
    }
    // Back to the connection's setting for the rest of the transaction (the
    // caller's link lookups and updates need their custom plans).
    db.execute_unprepared("RESET plan_cache_mode").await?;
    Ok((created, existed))
}

/// Prepares on this connection the statements of a first task insert (see
/// `db::warm_up`): the owners' lock on ids that do not exist, and the insert
/// with no rows (Postgres parses it once per connection, ~1 ms of its CPU
/// that a fresh worker's first batches otherwise all paid together). Writes
/// nothing.
pub(super) async fn warm_up(db: &(impl ConnectionTrait + TransactionTrait)) -> Result<()> {
    match lock_owner(db, -1, -1).await {
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(err) => return Err(err),
    }
    insert_chunk_pg(db, || chunk_values(&[], -1, -1, "", crate::clock::now())).await?;
    Ok(())
}

/// Locks the storage and project rows `FOR KEY SHARE` (see
/// [`insert_tasks_pg`]); `NotFound` if either is gone.
async fn lock_owner(db: &impl ConnectionTrait, project_id: i64, storage_id: i64) -> Result<()> {
    let owner = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 FROM storages s JOIN projects p ON p.id = s.project_id \
             WHERE s.id = $1 AND p.id = $2 FOR KEY SHARE OF s, p",
            [storage_id.into(), project_id.into()],
        ))
        .await?;
    if owner.is_none() {
        return Err(Error::NotFound(format!(
            "storage {storage_id} of project {project_id} was deleted"
        )));
    }
    Ok(())
}

/// The parameters of [`insert_chunk_sql`]: `$1`..`$7` one array per column
/// (absent values as their sentinels), then `$8`..`$11`.
fn chunk_values(
    chunk: &[NewTask],
    project_id: i64,
    storage_id: i64,
    run_id: &str,
    now: DateTime<Utc>,
) -> Vec<sea_orm::Value> {
    use sea_orm::sea_query::ArrayType as A;
    let column = |ty: A, f: fn(&NewTask) -> sea_orm::Value| {
        sea_orm::Value::Array(ty, Some(Box::new(chunk.iter().map(f).collect())))
    };
    vec![
        column(A::String, |t| t.object_key.clone().into()),
        column(A::BigInt, |t| t.row_index.into()),
        column(A::Json, |t| t.data.clone().into()),
        column(A::Json, |t| t.meta.clone().unwrap_or(Value::Null).into()),
        column(A::String, |t| t.etag.clone().unwrap_or_default().into()),
        column(A::BigInt, |t| t.size.unwrap_or(-1).into()),
        column(A::ChronoDateTimeUtc, |t| {
            t.last_modified.unwrap_or(DateTime::UNIX_EPOCH).into()
        }),
        storage_id.into(),
        run_id.into(),
        now.into(),
        project_id.into(),
    ]
}

/// Runs the chunk's statement without `ON CONFLICT` under a savepoint; on a
/// unique violation, rolls back to it and runs it again with `ON CONFLICT
/// DO NOTHING`. Returns its rows: (task id, whether its link was new).
/// `values` makes the parameters for each try: made again on a violation,
/// which is rare, rather than copied for every chunk in case of one (the
/// copy showed in a worker's profile of a 1,000,000-object sync).
async fn insert_chunk_pg(
    db: &(impl ConnectionTrait + TransactionTrait),
    values: impl Fn() -> Vec<sea_orm::Value>,
) -> Result<Vec<sea_orm::QueryResult>> {
    let statement = |on_conflict| {
        Statement::from_sql_and_values(DbBackend::Postgres, insert_chunk_sql(on_conflict), values())
    };
    let savepoint = db.begin().await?;
    match savepoint.query_all_raw(statement("")).await {
        Ok(rows) => {
            savepoint.commit().await?;
            Ok(rows)
        }
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            savepoint.rollback().await?;
            Ok(db
                .query_all_raw(statement(
                    "ON CONFLICT (storage_id, object_key, row_index) DO NOTHING",
                ))
                .await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The chunk's task ids in row order, and those whose task was made.
fn created_ids(
    rows: Vec<sea_orm::QueryResult>,
    chunk_len: usize,
) -> Result<(Vec<i64>, HashSet<i64>)> {
    let mut ids = Vec::with_capacity(chunk_len);
    let mut made = HashSet::new();
    for row in rows {
        let (id, linked): (i64, bool) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
        ids.push(id);
        if linked {
            made.insert(id);
        }
    }
    Ok((ids, made))
}

/// The statement of one chunk of [`insert_tasks_pg`], with `on_conflict`
/// (empty, or the clause that skips raced rows) on the link insert.
fn insert_chunk_sql(on_conflict: &str) -> String {
    format!(
        r#"
WITH input AS MATERIALIZED (
    SELECT nextval('tasks_id_seq') AS id, k, r, d, NULLIF(m, 'null'::jsonb) AS m,
           NULLIF(e, '') AS e, NULLIF(s, -1) AS s, NULLIF(t, 'epoch'::timestamptz) AS t
    FROM unnest($1::text[], $2::bigint[], $3::jsonb[], $4::jsonb[], $5::text[], $6::bigint[], $7::timestamptz[])
         AS u(k, r, d, m, e, s, t)
), linked AS (
    INSERT INTO import_links (storage_id, object_key, row_index, task_id, etag, size,
                              last_modified, object_exists, seen_run_id, created_at, updated_at)
    SELECT $8, k, r, id, e, s, t, true, $9, $10, $10 FROM input
    {on_conflict}
    RETURNING task_id
), made AS (
    INSERT INTO tasks (id, project_id, data, meta, created_at, updated_at)
    SELECT input.id, $11, input.d, input.m, $10, $10 FROM input JOIN linked ON linked.task_id = input.id
)
SELECT input.id, linked.task_id IS NOT NULL FROM input LEFT JOIN linked ON linked.task_id = input.id
ORDER BY input.id"#
    )
}

/// Rows per statement of [`insert_tasks_pg`].
const PG_STATEMENT_ROWS: usize = 5000;

/// Predictions and annotations of the tasks just created, in bulk.
async fn insert_extras(
    db: &impl ConnectionTrait,
    project_id: i64,
    items: &[NewTask],
    ids: &[i64],
    linked: &HashSet<i64>,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut predictions = Vec::new();
    let mut annotations = Vec::new();
    for (item, id) in items.iter().zip(ids).filter(|(_, id)| linked.contains(id)) {
        for p in &item.predictions {
            predictions.push(prediction::ActiveModel {
                task_id: Set(*id),
                result: Set(p.get("result").cloned().unwrap_or(Value::Array(Vec::new()))),
                model_version: Set(p
                    .get("model_version")
                    .and_then(Value::as_str)
                    .map(str::to_owned)),
                score: Set(p.get("score").and_then(Value::as_f64)),
                created_at: Set(now),
                ..Default::default()
            });
        }
        for a in &item.annotations {
            annotations.push(annotation::ActiveModel {
                task_id: Set(*id),
                project_id: Set(project_id),
                result: Set(a.get("result").cloned().unwrap_or(Value::Array(Vec::new()))),
                completed_by: Set(a.get("completed_by").cloned().filter(|v| !v.is_null())),
                lead_time: Set(a.get("lead_time").and_then(Value::as_f64)),
                was_cancelled: Set(a
                    .get("was_cancelled")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)),
                ground_truth: Set(a
                    .get("ground_truth")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)),
                created_at: Set(now),
                updated_at: Set(now),
                ..Default::default()
            });
        }
    }
    for chunk in predictions.chunks(MAX_PARAMS / 5) {
        prediction::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    for chunk in annotations.chunks(MAX_PARAMS / 9) {
        annotation::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// The task with this id, or `None` (never an error for a missing row).
pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<task::Model>> {
    Ok(task::Entity::find_by_id(id).one(db).await?)
}

/// Up to `limit` tasks of the project with ids above `after`, in id order,
/// within `budget` bytes of `data` and `meta` JSON ([`super::page_within`]);
/// `true` when cut short by it.
pub async fn page(
    db: &DatabaseConnection,
    project_id: i64,
    after: Option<i64>,
    limit: u64,
    budget: usize,
) -> Result<(Vec<task::Model>, bool)> {
    let rows = task::Entity::find().filter(task::Column::ProjectId.eq(project_id));
    let json = ["data", "meta"];
    super::page_within(db, rows, (task::Column::Id, after), &json, limit, budget).await
}

/// The import link each of these tasks came from, by task id (a task made
/// through the API has none and is absent).
pub async fn sources(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<HashMap<i64, import_link::Model>> {
    let links = import_link::Entity::find()
        .filter(import_link::Column::TaskId.is_in(ids.iter().copied()))
        .all(db)
        .await?;
    Ok(links.into_iter().map(|l| (l.task_id, l)).collect())
}

/// The task's first `limit` predictions, in id order (possibly none).
pub async fn predictions_of(
    db: &impl ConnectionTrait,
    task_id: i64,
    limit: u64,
) -> Result<Vec<prediction::Model>> {
    Ok(prediction::Entity::find()
        .filter(prediction::Column::TaskId.eq(task_id))
        .order_by_asc(prediction::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}
