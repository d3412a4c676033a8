use sea_orm::entity::prelude::*;

/// One mutating API request (see `db::audit`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    /// `None` for a bootstrap token (`LABELSYNC_API_TOKENS`) or the open
    /// loopback mode; `token_name` says which.
    pub token_id: Option<i64>,
    pub token_name: String,
    pub method: String,
    /// The route's template (`/api/v1/storages/{id}`).
    pub route: String,
    pub path: String,
    pub project_id: Option<i64>,
    /// The ids the request named or created, a JSON object.
    pub resource: String,
    pub status: i32,
    pub request_id: String,
    pub client: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
