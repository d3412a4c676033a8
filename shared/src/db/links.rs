//! Import links: the (storage, object key, row) -> task map. Its unique key is
//! what makes a replayed page, a retried job or a resumed run create nothing
//! twice. Every function here works a page (or a chunk of rows) at a time:
//! one query per page, never one per object. Inserting tasks with their
//! links is [`super::tasks`]'s.
use std::collections::{HashMap, HashSet};

use super::{
    MAX_PARAMS,
    entities::{import_link, partial_object},
};
use crate::Result;
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter,
    QuerySelect, Statement,
    sea_query::{Expr, Func},
};

/// What the database knows about an object already linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Links (tasks) of this object.
    pub rows: i64,
    pub etag: Option<String>,
    /// Whether the current run already listed it (a replayed page).
    pub seen_by_run: bool,
}

#[derive(Debug, FromQueryResult)]
struct KnownRow {
    object_key: String,
    rows: i64,
    etag: Option<String>,
    seen: Option<String>,
}

/// The linked objects among `keys`, one grouped query per chunk of keys.
pub async fn known_objects(
    db: &impl ConnectionTrait,
    storage_id: i64,
    run_id: &str,
    keys: &[String],
) -> Result<HashMap<String, Known>> {
    use import_link::Column as C;
    let mut found = HashMap::new();
    for chunk in keys.chunks(MAX_PARAMS) {
        let rows = if db.get_database_backend() == DbBackend::Postgres {
            // One index lookup per key, whatever the statistics say: see
            // docs/DECISIONS.md (Link lookups one index probe per key).
            // Gated by one look for any link between the chunk's least and
            // greatest key (a one-time filter, taken in the collation the
            // index compares with): a first sync's pages have none, and
            // their thousand probes that find nothing were a sixth of what
            // Postgres spent on each page (Link lookups skipped where no
            // link can be).
            KnownRow::find_by_statement(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT k.key AS object_key, l.rows, l.etag, l.seen \
                 FROM unnest($1::text[]) AS k(key) CROSS JOIN LATERAL ( \
                     SELECT count(*) AS rows, max(etag) AS etag, max(seen_run_id) AS seen \
                     FROM import_links WHERE storage_id = $2 AND object_key = k.key) l \
                 WHERE l.rows > 0 AND EXISTS ( \
                     SELECT 1 FROM import_links WHERE storage_id = $2 \
                     AND object_key BETWEEN (SELECT min(m) FROM unnest($1::text[]) AS m) \
                                        AND (SELECT max(m) FROM unnest($1::text[]) AS m))",
                [text_array(chunk), storage_id.into()],
            ))
            .all(db)
            .await?
        } else {
            import_link::Entity::find()
                .select_only()
                .column(C::ObjectKey)
                .column_as(C::Id.count(), "rows")
                .column_as(C::Etag.max(), "etag")
                .column_as(C::SeenRunId.max(), "seen")
                .filter(C::StorageId.eq(storage_id))
                .filter(C::ObjectKey.is_in(chunk.iter().cloned()))
                .group_by(C::ObjectKey)
                .into_model::<KnownRow>()
                .all(db)
                .await?
        };
        found.extend(rows.into_iter().map(|r| {
            let seen_by_run = r.seen.as_deref() == Some(run_id);
            (
                r.object_key,
                Known {
                    rows: r.rows,
                    etag: r.etag,
                    seen_by_run,
                },
            )
        }));
    }
    Ok(found)
}

/// Marks objects as listed by `run_id` (and present).
pub async fn mark_seen(
    db: &impl ConnectionTrait,
    storage_id: i64,
    run_id: &str,
    keys: &[String],
) -> Result<()> {
    use import_link::Column as C;
    for chunk in keys.chunks(MAX_PARAMS) {
        // Rows this run just created carry its id already: leaving them
        // alone spares rewriting every row of a large file (100,000 rows of
        // one JSONL: 1.8 s).
        if db.get_database_backend() == DbBackend::Postgres {
            // As in `known_objects`, one index lookup per key (see
            // docs/DECISIONS.md, Link lookups one index probe per key);
            // `OFFSET 0` keeps the lateral subquery from being flattened into
            // a hash join. Rows are updated by id.
            db.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE import_links SET seen_run_id = $3, object_exists = true \
                 WHERE id = ANY(ARRAY( \
                     SELECT l.id FROM unnest($1::text[]) AS k(key) CROSS JOIN LATERAL ( \
                         SELECT id FROM import_links \
                         WHERE storage_id = $2 AND object_key = k.key \
                           AND (seen_run_id IS DISTINCT FROM $3 OR NOT object_exists) \
                         OFFSET 0) l))",
                [text_array(chunk), storage_id.into(), run_id.into()],
            ))
            .await?;
            continue;
        }
        import_link::Entity::update_many()
            .col_expr(C::SeenRunId, Expr::value(run_id))
            .col_expr(C::ObjectExists, Expr::value(true))
            .filter(C::StorageId.eq(storage_id))
            .filter(C::ObjectKey.is_in(chunk.iter().cloned()))
            .filter(
                sea_orm::Condition::any()
                    .add(C::SeenRunId.ne(run_id))
                    .add(C::SeenRunId.is_null())
                    .add(C::ObjectExists.eq(false)),
            )
            .exec(db)
            .await?;
    }
    Ok(())
}

/// A Postgres `text[]` parameter.
fn text_array(items: &[String]) -> sea_orm::Value {
    sea_orm::Value::Array(
        sea_orm::sea_query::ArrayType::String,
        Some(Box::new(items.iter().map(|k| k.clone().into()).collect())),
    )
}

/// Records the new etag, size and time of a changed object.
pub async fn update_object(
    db: &impl ConnectionTrait,
    storage_id: i64,
    key: &str,
    etag: Option<&str>,
    size: Option<i64>,
    last_modified: Option<DateTime<Utc>>,
) -> Result<()> {
    use import_link::Column as C;
    import_link::Entity::update_many()
        .col_expr(C::Etag, Expr::value(etag))
        .col_expr(C::Size, Expr::value(size))
        .col_expr(C::LastModified, Expr::value(last_modified))
        .col_expr(C::UpdatedAt, Expr::value(crate::clock::now()))
        .filter(C::StorageId.eq(storage_id))
        .filter(C::ObjectKey.eq(key))
        .exec(db)
        .await?;
    Ok(())
}

/// After a complete listing, the links of `storage_id` the run did not see
/// and that are not flagged yet: their objects are gone since the last run
/// that looked (or since their import).
fn unseen(storage_id: i64, run_id: &str) -> sea_orm::Condition {
    use import_link::Column as C;
    sea_orm::Condition::all()
        .add(C::StorageId.eq(storage_id))
        .add(C::ObjectExists.eq(true))
        .add(
            sea_orm::Condition::any()
                .add(C::SeenRunId.is_null())
                .add(C::SeenRunId.ne(run_id)),
        )
}

/// After a complete listing: how many objects have [`unseen`] links (the
/// run's `missing`). Changes nothing.
pub async fn count_missing(
    db: &impl ConnectionTrait,
    storage_id: i64,
    run_id: &str,
) -> Result<i64> {
    use import_link::Column as C;
    let objects: Option<i64> = import_link::Entity::find()
        .select_only()
        .expr_as(Func::count_distinct(Expr::col(C::ObjectKey)), "n")
        .filter(unseen(storage_id, run_id))
        .into_tuple()
        .one(db)
        .await?;
    Ok(objects.unwrap_or(0))
}

/// After a complete listing: flags the [`unseen`] links `object_exists =
/// false` (a later listing that sees their object again clears the flag:
/// [`mark_seen`]).
pub async fn flag_missing(db: &impl ConnectionTrait, storage_id: i64, run_id: &str) -> Result<()> {
    use import_link::Column as C;
    import_link::Entity::update_many()
        .col_expr(C::ObjectExists, Expr::value(false))
        .filter(unseen(storage_id, run_id))
        .exec(db)
        .await?;
    Ok(())
}

/// The tasks linked to rows `[lo, hi]` of one object: row index -> task id.
pub async fn linked_tasks(
    db: &impl ConnectionTrait,
    storage_id: i64,
    key: &str,
    lo: i64,
    hi: i64,
) -> Result<HashMap<i64, i64>> {
    use import_link::Column as C;
    let rows: Vec<(i64, i64)> = import_link::Entity::find()
        .select_only()
        .column(C::RowIndex)
        .column(C::TaskId)
        .filter(C::StorageId.eq(storage_id))
        .filter(C::ObjectKey.eq(key))
        .filter(C::RowIndex.between(lo, hi))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Records that `key`'s rows are being imported over several transactions
/// (idempotent). Until [`clear_partial`], runs treat the object as not yet
/// imported: a cancelled, failed or killed attempt leaves it marked, and the
/// next run reads it again and adds the rows that are missing.
pub async fn mark_partial(db: &impl ConnectionTrait, storage_id: i64, key: &str) -> Result<()> {
    write_marks(db, storage_id, vec![PartialMark::Set(key.to_owned())]).await
}

/// Every row of `key` is in: it is imported like any other object.
pub async fn clear_partial(db: &impl ConnectionTrait, storage_id: i64, key: &str) -> Result<()> {
    write_marks(db, storage_id, vec![PartialMark::Clear(key.to_owned())]).await
}

/// A small object's partial mark, written in the transaction that commits
/// its rows (small objects' rows are committed together, after their reads
/// ended; see [`mark_partial`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartialMark {
    /// It broke after these rows: the next run reads it again.
    Set(String),
    /// It was read to its end, and may have been marked before.
    Clear(String),
}

/// Writes `marks` of `storage_id`'s objects: one statement for the marks
/// set and one for those cleared (per [`MAX_PARAMS`] keys).
pub async fn write_marks(
    db: &impl ConnectionTrait,
    storage_id: i64,
    marks: Vec<PartialMark>,
) -> Result<()> {
    use partial_object::Column as C;
    let (mut set, mut cleared) = (Vec::new(), Vec::new());
    for mark in marks {
        match mark {
            PartialMark::Set(key) => set.push(key),
            PartialMark::Clear(key) => cleared.push(key),
        }
    }
    for chunk in set.chunks(MAX_PARAMS / 3) {
        let rows = chunk.iter().map(|key| partial_object::ActiveModel {
            storage_id: Set(storage_id),
            object_key: Set(key.clone()),
            started_at: Set(crate::clock::now()),
        });
        partial_object::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([C::StorageId, C::ObjectKey])
            .exec_without_returning(db)
            .await?;
    }
    for chunk in cleared.chunks(MAX_PARAMS) {
        partial_object::Entity::delete_many()
            .filter(C::StorageId.eq(storage_id))
            .filter(C::ObjectKey.is_in(chunk.iter().cloned()))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Which of `keys` are marked partial (see [`mark_partial`]).
pub async fn partial_among(
    db: &impl ConnectionTrait,
    storage_id: i64,
    keys: &[String],
) -> Result<HashSet<String>> {
    use partial_object::Column as C;
    let mut found = HashSet::new();
    for chunk in keys.chunks(MAX_PARAMS) {
        let rows: Vec<String> = partial_object::Entity::find()
            .select_only()
            .column(C::ObjectKey)
            .filter(C::StorageId.eq(storage_id))
            .filter(C::ObjectKey.is_in(chunk.iter().cloned()))
            .into_tuple()
            .all(db)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}
