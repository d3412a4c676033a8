use sea_orm::entity::prelude::*;

/// An export or delete waiting for one target storage (see `db::outbox`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "export_outbox")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub storage_id: i64,
    pub annotation_id: i64,
    /// `upsert` or `delete`.
    pub action: String,
    pub version: i64,
    pub created_at: DateTimeUtc,
    /// A delete's key where its annotation was last exported (its export
    /// link's), when it was; null for upserts.
    pub object_key: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
