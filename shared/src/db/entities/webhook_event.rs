use sea_orm::entity::prelude::*;

/// Something that happened, as its webhook payload (see `db::webhooks`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_events")]
pub struct Model {
    /// A ULID: the payload's `id` and the `webhook-id` header.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub event_type: String,
    pub project_id: Option<i64>,
    /// The JSON body sent, byte for byte (what the signature covers).
    pub payload: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
