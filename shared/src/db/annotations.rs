//! Annotations written through the API (created on a task, changed and
//! deleted by upstream apps); the outbox events that export them are
//! [`super::outbox`]'s.
use chrono::Utc;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder,
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

/// Inserts an annotation of `task` (in the task's project) and returns it;
/// checks nothing (the caller did).
pub async fn create(
    db: &impl ConnectionTrait,
    task: &task::Model,
    result: Value,
    fields: AnnotationFields,
) -> Result<annotation::Model> {
    let now = Utc::now();
    Ok(annotation::ActiveModel {
        task_id: Set(task.id),
        project_id: Set(task.project_id),
        result: Set(result),
        completed_by: Set(fields.completed_by.filter(|c| !c.is_null())),
        lead_time: Set(fields.lead_time),
        was_cancelled: Set(fields.was_cancelled.unwrap_or(false)),
        ground_truth: Set(fields.ground_truth.unwrap_or(false)),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(db)
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
