//! Annotations written through the API (created on a task, changed and
//! deleted by upstream apps); the outbox events that export them are
//! [`super::outbox`]'s.
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, FromQueryResult,
    IntoActiveModel, QueryFilter, Statement,
    sea_query::{ArrayType, Expr, Query},
};
use serde_json::Value;

use super::{
    audit,
    entities::{annotation, task},
    outbox,
};
use crate::Result;

/// The fields of an annotation a write gives. A create takes `None` as the
/// default (no completer, no lead time, false); an update keeps the field.
/// `completed_by: Some(Value::Null)` is no completer.
#[derive(Debug, Default, Clone)]
pub struct AnnotationFields {
    pub completed_by: Option<Value>,
    pub lead_time: Option<f64>,
    pub was_cancelled: Option<bool>,
    pub ground_truth: Option<bool>,
}

/// The annotation with this id, or `None` (never an error for a missing row).
pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<annotation::Model>> {
    Ok(annotation::Entity::find_by_id(id).one(db).await?)
}

/// Up to `limit` annotations of the task with ids above `after`, in id
/// order, within `budget` bytes of `result` and `completed_by` JSON
/// ([`super::page_within`]); `true` when cut short by it.
pub async fn of_task(
    db: &DatabaseConnection,
    task_id: i64,
    after: Option<i64>,
    limit: u64,
    budget: usize,
) -> Result<(Vec<annotation::Model>, bool)> {
    let rows = annotation::Entity::find().filter(annotation::Column::TaskId.eq(task_id));
    let keyset = (annotation::Column::Id, after);
    let json = ["result", "completed_by"];
    super::page_within(db, rows, keyset, &json, limit, budget).await
}

/// Inserts an annotation of the task with this id, in the task's project,
/// in one statement (the task is not read first); `None` when there is no
/// such task. Checks no access: [`create_recorded`] checks the returned
/// `project_id`, and rolls back when the writer may not see it.
async fn create_on_task(
    db: &impl ConnectionTrait,
    task_id: i64,
    result: Value,
    fields: AnnotationFields,
) -> Result<Option<annotation::Model>> {
    use annotation::Column as A;
    let now = crate::clock::now();
    let values = Query::select()
        .column(task::Column::Id)
        .column(task::Column::ProjectId)
        .expr(Expr::val(result))
        .expr(Expr::val(fields.completed_by.filter(|c| !c.is_null())))
        .expr(Expr::val(fields.lead_time))
        .expr(Expr::val(fields.was_cancelled.unwrap_or(false)))
        .expr(Expr::val(fields.ground_truth.unwrap_or(false)))
        .expr(Expr::val(now))
        .expr(Expr::val(now))
        .from(task::Entity)
        .and_where(task::Column::Id.eq(task_id))
        .to_owned();
    let insert = Query::insert()
        .into_table(annotation::Entity)
        .columns([
            A::TaskId,
            A::ProjectId,
            A::Result,
            A::CompletedBy,
            A::LeadTime,
            A::WasCancelled,
            A::GroundTruth,
            A::CreatedAt,
            A::UpdatedAt,
        ])
        .select_from(values)
        .map_err(|e| crate::Error::Internal(format!("annotation insert: {e}")))?
        .returning_all()
        .to_owned();
    let statement = db.get_database_backend().build(&insert);
    Ok(annotation::Model::find_by_statement(statement)
        .one(db)
        .await?)
}

/// What [`create_recorded`] writes beside the annotation.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// The projects the writer may touch (`None`: every one). A task in
    /// another project is treated as missing, and nothing is written.
    pub visible: Option<Vec<i64>>,
    /// The request's audit row. Its `project_id` becomes the annotation's,
    /// and the annotation's id is added to `resource` as `annotation_id`.
    pub audit: Option<audit::Entry>,
}

/// An annotation [`create_recorded`] made, and the target storages its
/// export event was recorded for.
#[derive(Debug, Clone)]
pub struct Created {
    pub annotation: annotation::Model,
    pub targets: Vec<i64>,
}

/// Creates an annotation on the task with this id together with its export
/// events (one per target storage of the task's project, see
/// [`outbox::record`]) and the request's audit row, all or nothing. `None`
/// (and nothing written) when the task is missing or not in
/// `recorded.visible`.
///
/// On Postgres this is one statement (data-modifying CTEs), one round trip
/// for the hot path of a labeling UI saving; SQLite writes the same rows in
/// one transaction.
pub async fn create_recorded(
    db: &DatabaseConnection,
    task_id: i64,
    result: Value,
    fields: AnnotationFields,
    recorded: Recorded,
) -> Result<Option<Created>> {
    if db.get_database_backend() == DbBackend::Postgres {
        return create_recorded_in_one(db, task_id, result, fields, recorded).await;
    }
    let txn = super::begin_write(db).await?;
    let Some(annotation) = create_on_task(&txn, task_id, result, fields).await? else {
        return Ok(None);
    };
    let visible = recorded.visible.as_ref();
    if visible.is_some_and(|ids| !ids.contains(&annotation.project_id)) {
        return Ok(None); // the transaction is dropped: rolled back
    }
    let targets =
        outbox::record(&txn, annotation.project_id, annotation.id, outbox::UPSERT).await?;
    if let Some(mut entry) = recorded.audit {
        entry.project_id = Some(annotation.project_id);
        entry.resource = with_annotation_id(entry.resource, annotation.id);
        audit::record(&txn, entry).await?;
    }
    txn.commit().await?;
    Ok(Some(Created {
        annotation,
        targets,
    }))
}

/// `resource` (an object; anything else counts as an empty one) with
/// `annotation_id` set.
fn with_annotation_id(resource: Value, id: i64) -> Value {
    let mut ids = object_or_empty(resource);
    ids.insert("annotation_id".to_owned(), id.into());
    Value::Object(ids)
}

fn object_or_empty(resource: Value) -> serde_json::Map<String, Value> {
    match resource {
        Value::Object(ids) => ids,
        _ => serde_json::Map::new(),
    }
}

/// The annotation, the outbox rows and the audit row as the CTEs of one
/// statement: `$1` task, `$2`..`$7` the annotation's fields, `$8` the
/// visible projects (NULL: all), then the audit row's fields from `$9`.
/// The outbox part is [`outbox::record`]'s upsert fed by the new row.
const CREATE_RECORDED: &str = "\
    WITH a AS ( \
        INSERT INTO annotations (task_id, project_id, result, completed_by, lead_time, \
            was_cancelled, ground_truth, created_at, updated_at) \
        SELECT id, project_id, $2, $3, $4, $5, $6, $7, $7 FROM tasks \
        WHERE id = $1 AND ($8::bigint[] IS NULL OR project_id = ANY($8::bigint[])) \
        RETURNING *), \
    o AS ( \
        INSERT INTO export_outbox \
            (storage_id, annotation_id, action, version, created_at, object_key) \
        SELECT s.id, a.id, 'upsert', 1, $7, NULL FROM storages s \
        JOIN a ON s.project_id = a.project_id WHERE s.role = 'target' \
        ON CONFLICT (storage_id, annotation_id) DO UPDATE SET action = excluded.action, \
            version = export_outbox.version + 1, created_at = excluded.created_at, \
            object_key = excluded.object_key \
        RETURNING storage_id), \
    au AS ( \
        INSERT INTO audit_events (at, token_id, token_name, method, route, path, project_id, \
            resource, status, request_id, client) \
        SELECT $9, $10, $11, $12, $13, $14, a.project_id, \
            ($15::jsonb || jsonb_build_object('annotation_id', a.id))::text, $16, $17, $18 \
        FROM a WHERE $19) \
    SELECT a.*, ARRAY(SELECT storage_id FROM o) AS targets FROM a";

async fn create_recorded_in_one(
    db: &DatabaseConnection,
    task_id: i64,
    result: Value,
    fields: AnnotationFields,
    recorded: Recorded,
) -> Result<Option<Created>> {
    let now = crate::clock::now();
    let visible = recorded.visible.map(|ids| {
        let ids = ids.into_iter().map(sea_orm::Value::from).collect();
        Box::new(ids)
    });
    let mut values = vec![
        task_id.into(),
        result.into(),
        fields.completed_by.filter(|c| !c.is_null()).into(),
        fields.lead_time.into(),
        fields.was_cancelled.unwrap_or(false).into(),
        fields.ground_truth.unwrap_or(false).into(),
        now.into(),
        sea_orm::Value::Array(ArrayType::BigInt, visible),
    ];
    values.extend(audit_values(recorded.audit));
    let statement = Statement::from_sql_and_values(DbBackend::Postgres, CREATE_RECORDED, values);
    let Some(row) = db.query_one_raw(statement).await? else {
        return Ok(None);
    };
    Ok(Some(Created {
        annotation: annotation::Model::from_query_result(&row, "")?,
        targets: row.try_get("", "targets")?,
    }))
}

/// `$9`..`$19` of [`CREATE_RECORDED`]: the audit row's fields, and whether
/// there is one (with defaults when not).
fn audit_values(entry: Option<audit::Entry>) -> Vec<sea_orm::Value> {
    let write = entry.is_some();
    let entry = entry.unwrap_or_default();
    let resource = Value::Object(object_or_empty(entry.resource));
    vec![
        entry.at.into(),
        entry.token_id.into(),
        entry.token_name.into(),
        entry.method.into(),
        entry.route.into(),
        entry.path.into(),
        resource.to_string().into(),
        i32::from(entry.status).into(),
        entry.request_id.into(),
        entry.client.into(),
        write.into(),
    ]
}

/// Writes the given fields over `current` (`None` keeps one) with a new
/// `updated_at`, and returns the row; a row deleted meanwhile is an error.
pub async fn update(
    db: &impl ConnectionTrait,
    current: annotation::Model,
    result: Option<Value>,
    fields: AnnotationFields,
) -> Result<annotation::Model> {
    let mut model = current.into_active_model();
    if let Some(result) = result {
        model.result = Set(result);
    }
    if let Some(by) = fields.completed_by {
        model.completed_by = Set(Some(by).filter(|c| !c.is_null()));
    }
    if let Some(t) = fields.lead_time {
        model.lead_time = Set(Some(t));
    }
    if let Some(c) = fields.was_cancelled {
        model.was_cancelled = Set(c);
    }
    if let Some(g) = fields.ground_truth {
        model.ground_truth = Set(g);
    }
    model.updated_at = Set(crate::clock::now());
    Ok(model.update(db).await?)
}

/// Locks the annotation's row for the rest of the transaction (Postgres;
/// SQLite's write transactions are serial already), and waits for an
/// export commit holding it: a delete then reads the export links as that
/// commit left them (READ COMMITTED: each statement sees what committed
/// before it), not as they were before it.
pub async fn lock(db: &impl ConnectionTrait, id: i64) -> Result<()> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT id FROM annotations WHERE id = $1 FOR UPDATE",
        [id.into()],
    ))
    .await?;
    Ok(())
}

/// Deletes the annotation; a missing one is not an error (nothing happens).
pub async fn delete(db: &impl ConnectionTrait, id: i64) -> Result<()> {
    annotation::Entity::delete_by_id(id).exec(db).await?;
    Ok(())
}
