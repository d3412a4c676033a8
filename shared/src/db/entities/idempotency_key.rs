use sea_orm::entity::prelude::*;

/// The first answer to a POST with an `Idempotency-Key` (see `db::idempotency`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "idempotency_keys")]
pub struct Model {
    /// SHA-256 (hex) of the caller's bearer token; empty without tokens.
    #[sea_orm(primary_key, auto_increment = false)]
    pub caller: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// SHA-256 (hex) of the method, path and body.
    pub request_hash: String,
    /// `None` while the first request is being answered.
    pub status: Option<i32>,
    pub response: Option<String>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
