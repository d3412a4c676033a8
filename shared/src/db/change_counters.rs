//! Change counters (table `change_counters`): a number per kind of
//! configuration that API replicas cache, bumped in the same transaction as
//! each change of that kind, so a replica that reads it knows whether what
//! it holds may be stale. Today one counter, [`STORAGES`].
use sea_orm::{
    ConnectionTrait,
    sea_query::{Alias, Expr, ExprTrait, Query},
};

use crate::{Error, Result};

/// Storages created, replaced, deleted or given new secrets, and projects
/// deleted (their storages go with them).
pub const STORAGES: &str = "storages";

const TABLE: &str = "change_counters";

/// Adds one to the counter `name` (on the caller's transaction, when it is
/// one, so the change and its count commit together).
pub async fn bump(db: &impl ConnectionTrait, name: &str) -> Result<()> {
    let update = Query::update()
        .table(Alias::new(TABLE))
        .value(Alias::new("value"), Expr::col(Alias::new("value")).add(1))
        .and_where(Expr::col(Alias::new("name")).eq(name))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

/// The counter's value now.
pub async fn read(db: &impl ConnectionTrait, name: &str) -> Result<i64> {
    let select = Query::select()
        .column(Alias::new("value"))
        .from(Alias::new(TABLE))
        .and_where(Expr::col(Alias::new("name")).eq(name))
        .to_owned();
    let row = db
        .query_one(&select)
        .await?
        .ok_or_else(|| Error::Internal(format!("{TABLE} has no row {name:?}")))?;
    Ok(row.try_get::<i64>("", "value")?)
}
