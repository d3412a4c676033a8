use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "export_links")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub storage_id: i64,
    pub annotation_id: i64,
    pub object_key: String,
    pub content_hash: String,
    pub exported_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
