//! Annotations written through the API (created on a task, changed and
//! deleted by upstream apps); the outbox events that export them are
//! [`super::outbox`]'s.
use chrono::Utc;
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, IntoActiveModel, QueryFilter,
    QueryOrder,
    sea_query::{Expr, Query},
};
use serde_json::Value;

use super::entities::{annotation, task};
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

/// Every annotation of the task, in id order (possibly none).
pub async fn of_task(db: &impl ConnectionTrait, task_id: i64) -> Result<Vec<annotation::Model>> {
    Ok(annotation::Entity::find()
        .filter(annotation::Column::TaskId.eq(task_id))
        .order_by_asc(annotation::Column::Id)
        .all(db)
        .await?)
}

/// Inserts an annotation of the task with this id, in the task's project,
/// in one statement (the task is not read first: the hot path of a labeling
/// UI saving); `None` when there is no such task. Checks no access: the
/// caller checks the returned `project_id`, and rolls back when it may not.
pub async fn create_on_task(
    db: &impl ConnectionTrait,
    task_id: i64,
    result: Value,
    fields: AnnotationFields,
) -> Result<Option<annotation::Model>> {
    use annotation::Column as A;
    let now = Utc::now();
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
    model.updated_at = Set(Utc::now());
    Ok(model.update(db).await?)
}

/// Deletes the annotation; a missing one is not an error (nothing happens).
pub async fn delete(db: &impl ConnectionTrait, id: i64) -> Result<()> {
    annotation::Entity::delete_by_id(id).exec(db).await?;
    Ok(())
}
