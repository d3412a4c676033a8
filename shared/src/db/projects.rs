//! Projects: the rows the API and the CLI create, list, change and delete,
//! and their task counts.
use std::collections::HashMap;

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};

use super::{
    change_counters,
    entities::{project, task},
};
use crate::Result;

/// The project with this id, or `None` (never an error for a missing row).
pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<project::Model>> {
    Ok(project::Entity::find_by_id(id).one(db).await?)
}

/// The oldest project with exactly this title, or `None`.
pub async fn find_titled(db: &impl ConnectionTrait, title: &str) -> Result<Option<project::Model>> {
    Ok(project::Entity::find()
        .filter(project::Column::Title.eq(title))
        .order_by_asc(project::Column::Id)
        .one(db)
        .await?)
}

/// What a project's `data_key` may be, as [`is_valid_data_key`] checks it.
pub const DATA_KEY_RULE: &str = "data_key must be 1-100 ASCII letters, digits, '_' or '-' (the task field a Files-mode object fills)";

/// Whether `key` may be a project's `data_key`: the API document's pattern
/// `^[A-Za-z0-9_-]{1,100}$` exactly (ASCII only: Unicode "alphanumeric" has
/// no portable regex class). Every Files-mode task of the project has this
/// key, so a key serde_json reserves (`crate::json`) would make them all
/// unreadable.
pub fn is_valid_data_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 100
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Inserts a project and returns its row; checks nothing (the caller did).
pub async fn create(
    db: &impl ConnectionTrait,
    title: &str,
    data_key: &str,
) -> Result<project::Model> {
    let now = crate::clock::now();
    Ok(project::ActiveModel {
        title: Set(title.to_owned()),
        data_key: Set(data_key.to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(db)
    .await?)
}

/// Up to `limit` projects with ids above `after`, in id order.
pub async fn page(
    db: &impl ConnectionTrait,
    after: Option<i64>,
    limit: u64,
    only: Option<&[i64]>,
) -> Result<Vec<project::Model>> {
    let mut query = project::Entity::find()
        .order_by_asc(project::Column::Id)
        .limit(limit);
    if let Some(ids) = only {
        query = query.filter(project::Column::Id.is_in(ids.iter().copied()));
    }
    if let Some(after) = after {
        query = query.filter(project::Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Which of `ids` are projects.
pub async fn existing(db: &impl ConnectionTrait, ids: &[i64]) -> Result<Vec<i64>> {
    Ok(project::Entity::find()
        .select_only()
        .column(project::Column::Id)
        .filter(project::Column::Id.is_in(ids.iter().copied()))
        .into_tuple()
        .all(db)
        .await?)
}

/// The titles of those of `ids` that are projects.
pub async fn titles(db: &impl ConnectionTrait, ids: &[i64]) -> Result<HashMap<i64, String>> {
    let rows: Vec<(i64, String)> = project::Entity::find()
        .select_only()
        .column(project::Column::Id)
        .column(project::Column::Title)
        .filter(project::Column::Id.is_in(ids.iter().copied()))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Task counts of several projects in one grouped query (a project without
/// tasks is absent from the map).
pub async fn task_counts(db: &impl ConnectionTrait, ids: &[i64]) -> Result<HashMap<i64, i64>> {
    let rows: Vec<(i64, i64)> = task::Entity::find()
        .select_only()
        .column(task::Column::ProjectId)
        .column_as(task::Column::Id.count(), "n")
        .filter(task::Column::ProjectId.is_in(ids.iter().copied()))
        .group_by(task::Column::ProjectId)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Writes the given title and data key over `current` (`None` keeps the
/// field) and returns the row; a row deleted meanwhile is an error.
pub async fn update(
    db: &impl ConnectionTrait,
    current: project::Model,
    title: Option<String>,
    data_key: Option<String>,
) -> Result<project::Model> {
    let mut model = current.into_active_model();
    if let Some(title) = title {
        model.title = Set(title);
    }
    if let Some(key) = data_key {
        model.data_key = Set(key);
    }
    model.updated_at = Set(crate::clock::now());
    Ok(model.update(db).await?)
}

/// Deletes the project (its storages, tasks, links and runs go with it, ON
/// DELETE CASCADE); false when there was no such project.
pub async fn delete(db: &impl ConnectionTrait, id: i64) -> Result<bool> {
    let res = project::Entity::delete_by_id(id).exec(db).await?;
    // Its storages went with it.
    change_counters::bump(db, change_counters::STORAGES).await?;
    Ok(res.rows_affected > 0)
}
