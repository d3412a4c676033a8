//! Idempotency keys: the first answer to a POST sent with an
//! `Idempotency-Key`, kept so a retry of the same request gets it again
//! instead of doing the work twice (docs/API.md, "Idempotent requests").
//!
//! [`claim`] inserts the key before the request runs (status `NULL`: in
//! progress); the primary key (caller, key) makes concurrent duplicates
//! meet the first one's row. [`complete`] stores the answer; [`let_go`]
//! removes a claim whose request failed on the server's side, so a retry
//! runs again, as it does an expired or abandoned one.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    sea_query::{Expr, OnConflict},
};

use super::entities::idempotency_key::{self, Column as C};
use crate::Result;

/// What [`claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// The key is new, claimed at this time (the claim's `created_at`,
    /// in whole microseconds as both databases keep it): run the request,
    /// then [`complete`] or [`let_go`].
    Claimed(DateTime<Utc>),
    /// The key is taken: its row as it is now.
    Taken(idempotency_key::Model),
}

/// Claims `key` for `caller`, or reads who has it. The insert does nothing
/// on a taken key rather than fail: a duplicate waiting for the first
/// answer claims again every 50 ms, and each failed insert was an error
/// in the Postgres log (about 600 a waiter), and would abort a
/// transaction it ran in.
pub async fn claim(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
    request_hash: &str,
) -> Result<Claim> {
    loop {
        let made = chrono::SubsecRound::trunc_subsecs(crate::clock::now(), 6);
        let row = idempotency_key::ActiveModel {
            caller: Set(caller.to_owned()),
            key: Set(key.to_owned()),
            request_hash: Set(request_hash.to_owned()),
            status: Set(None),
            response: Set(None),
            created_at: Set(made),
        };
        let inserted = idempotency_key::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([C::Caller, C::Key])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        if inserted == 1 {
            return Ok(Claim::Claimed(made));
        }
        if let Some(row) = get(db, caller, key).await? {
            return Ok(Claim::Taken(row));
        }
        // Forgotten between the two statements: claim it again.
    }
}

pub async fn get(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
) -> Result<Option<idempotency_key::Model>> {
    Ok(
        idempotency_key::Entity::find_by_id((caller.to_owned(), key.to_owned()))
            .one(db)
            .await?,
    )
}

/// Stores the answer of the request whose claim was `made` then: only
/// while the claim is that one (a claim forgotten as abandoned and taken
/// since, by another request or by a retry of this one, is theirs).
pub async fn complete(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
    made: DateTime<Utc>,
    (status, response): (u16, &str),
) -> Result<()> {
    idempotency_key::Entity::update_many()
        .col_expr(C::Status, Expr::value(i32::from(status)))
        .col_expr(C::Response, Expr::value(response))
        .filter(C::Caller.eq(caller))
        .filter(C::Key.eq(key))
        .filter(C::CreatedAt.eq(made))
        .exec(db)
        .await?;
    Ok(())
}

/// Lets go of the claim `made` then (its request failed on the server's
/// side, or it expired, or it was abandoned), unless the key was claimed
/// again since.
pub async fn let_go(
    db: &impl ConnectionTrait,
    caller: &str,
    key: &str,
    made: DateTime<Utc>,
) -> Result<()> {
    idempotency_key::Entity::delete_many()
        .filter(C::Caller.eq(caller))
        .filter(C::Key.eq(key))
        .filter(C::CreatedAt.eq(made))
        .exec(db)
        .await?;
    Ok(())
}

/// Deletes every key made before `before`; returns how many.
pub async fn prune(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64> {
    Ok(idempotency_key::Entity::delete_many()
        .filter(C::CreatedAt.lt(before))
        .exec(db)
        .await?
        .rows_affected)
}
