//! API tokens in the database (`api_tokens`; the scopes and secrets are in
//! `security::tokens`). A token is looked up by the hash of its secret on
//! every request, so a revocation or an expiry holds at once on every
//! scheduler replica.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, sea_query::Expr,
};

use super::entities::api_token::{self, Column as C};
use crate::{
    Error, Result,
    security::tokens::{self, Scope},
};

/// What a new token is.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub scope: Scope,
    /// `None`: every project.
    pub projects: Option<Vec<i64>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Refuses a token that could not work as asked: an empty or long name, an
/// admin held to projects (admin reaches everything), an empty or unknown
/// project list, an expiry in the past.
pub async fn check(db: &impl ConnectionTrait, new: &NewToken) -> Result<()> {
    if !(1..=100).contains(&new.name.chars().count()) || new.name.contains('\0') {
        return Err(Error::invalid(
            "invalid_name",
            Some("name"),
            "name must be 1-100 characters (say which app or person holds the token)",
        ));
    }
    if let Some(expires_at) = new.expires_at
        && expires_at <= crate::clock::now()
    {
        return Err(Error::invalid(
            "invalid_expires_at",
            Some("expires_at"),
            "expires_at must be in the future",
        ));
    }
    if new
        .expires_at
        .is_some_and(|expires_at| !super::comparable_everywhere(expires_at))
    {
        return Err(Error::invalid(
            "invalid_expires_at",
            Some("expires_at"),
            "expires_at must be before the year 10000",
        ));
    }
    let Some(ids) = &new.projects else {
        return Ok(());
    };
    if new.scope == Scope::Admin {
        return Err(Error::invalid(
            "invalid_projects",
            Some("projects"),
            "an admin token reaches every project; give projects only with scope write, read or ops",
        ));
    }
    if ids.is_empty() || ids.len() > 1000 {
        return Err(Error::invalid(
            "invalid_projects",
            Some("projects"),
            "projects must list 1 to 1000 project ids, or be null for every project",
        ));
    }
    let known = super::projects::existing(db, ids).await?;
    match ids.iter().find(|id| !known.contains(id)) {
        Some(id) => Err(Error::invalid(
            "unknown_project",
            Some("projects"),
            format!("project {id} does not exist"),
        )),
        None => Ok(()),
    }
}

/// Creates a token; returns its row and its secret (the only time the
/// secret exists outside the caller's hands).
pub async fn create(
    db: &impl ConnectionTrait,
    new: NewToken,
) -> Result<(api_token::Model, String)> {
    let (secret, hash) = tokens::generate()?;
    let row = api_token::ActiveModel {
        name: Set(new.name),
        prefix: Set(tokens::display_prefix(&secret)),
        secret_hash: Set(hash),
        scope: Set(new.scope.as_str().to_owned()),
        projects: Set(new.projects.as_deref().map(encode_projects)),
        created_at: Set(crate::clock::now()),
        last_used_at: Set(None),
        expires_at: Set(new.expires_at),
        revoked_at: Set(None),
        ..Default::default()
    };
    let model = api_token::Entity::insert(row)
        .exec_with_returning(db)
        .await?;
    Ok((model, secret))
}

/// `,3,4,`: one LIKE `%,3,%` finds a project in it.
fn encode_projects(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!(",{},", list.join(","))
}

/// The projects a token is held to (`None`: all).
pub fn projects_of(token: &api_token::Model) -> Option<Vec<i64>> {
    token
        .projects
        .as_deref()
        .map(|list| list.split(',').filter_map(|id| id.parse().ok()).collect())
}

pub fn scope_of(token: &api_token::Model) -> Option<Scope> {
    Scope::parse(&token.scope)
}

/// The token whose secret hashes to `hash`, if it is neither revoked nor
/// expired at `now`.
pub async fn usable(
    db: &impl ConnectionTrait,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<Option<api_token::Model>> {
    Ok(api_token::Entity::find()
        .filter(C::SecretHash.eq(hash))
        .filter(C::RevokedAt.is_null())
        .filter(
            Condition::any()
                .add(C::ExpiresAt.is_null())
                .add(C::ExpiresAt.gt(now)),
        )
        .one(db)
        .await?)
}

/// How stale `last_used_at` may be: it is written at most this often per
/// token, not on every request.
pub const LAST_USED_RESOLUTION: chrono::Duration = chrono::Duration::minutes(1);

/// Records that the token was used at `now`, unless that was recorded less
/// than [`LAST_USED_RESOLUTION`] ago.
pub async fn touch(
    db: &impl ConnectionTrait,
    token: &api_token::Model,
    now: DateTime<Utc>,
) -> Result<()> {
    if token
        .last_used_at
        .is_some_and(|at| now - at < LAST_USED_RESOLUTION)
    {
        return Ok(());
    }
    api_token::Entity::update_many()
        .col_expr(C::LastUsedAt, Expr::value(now))
        .filter(C::Id.eq(token.id))
        .exec(db)
        .await?;
    Ok(())
}

/// Whether any token was ever made (revoked and expired ones count): from
/// then on the open loopback mode asks for tokens, and revoking the last
/// one does not open the API again.
pub async fn any_made(db: &impl ConnectionTrait) -> Result<bool> {
    let found: Option<i64> = api_token::Entity::find()
        .select_only()
        .column(C::Id)
        .into_tuple()
        .one(db)
        .await?;
    Ok(found.is_some())
}

pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<api_token::Model>> {
    Ok(api_token::Entity::find_by_id(id).one(db).await?)
}

/// Up to `limit` tokens with ids above `after`, revoked ones included.
pub async fn page(
    db: &impl ConnectionTrait,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<api_token::Model>> {
    let mut query = api_token::Entity::find().order_by_asc(C::Id).limit(limit);
    if let Some(after) = after {
        query = query.filter(C::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Revokes a token (the row stays, for the audit trail); `None` when there
/// is no such token. Revoking twice keeps the first time.
pub async fn revoke(db: &impl ConnectionTrait, id: i64) -> Result<Option<api_token::Model>> {
    api_token::Entity::update_many()
        .col_expr(C::RevokedAt, Expr::value(crate::clock::now()))
        .filter(C::Id.eq(id))
        .filter(C::RevokedAt.is_null())
        .exec(db)
        .await?;
    find(db, id).await
}

/// The not-yet-revoked tokens called `name` (the CLI revokes by name when
/// exactly one matches).
pub async fn active_named(db: &impl ConnectionTrait, name: &str) -> Result<Vec<api_token::Model>> {
    Ok(api_token::Entity::find()
        .filter(C::Name.eq(name))
        .filter(C::RevokedAt.is_null())
        .order_by_asc(C::Id)
        .all(db)
        .await?)
}

/// The token's JSON in the API and the CLI (never the secret or its hash).
pub fn to_json(token: &api_token::Model) -> serde_json::Value {
    serde_json::json!({
        "id": token.id,
        "name": token.name,
        "prefix": token.prefix,
        "scope": token.scope,
        "projects": projects_of(token),
        "created_at": token.created_at,
        "last_used_at": token.last_used_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_lists_round_trip_sorted_and_unique() {
        let encoded = encode_projects(&[4, 3, 4]);
        assert_eq!(encoded, ",3,4,");
        let token = api_token::Model {
            id: 1,
            name: "a".into(),
            prefix: "lsk_".into(),
            secret_hash: String::new(),
            scope: "read".into(),
            projects: Some(encoded),
            created_at: crate::clock::now(),
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
        };
        assert_eq!(projects_of(&token), Some(vec![3, 4]));
    }
}
