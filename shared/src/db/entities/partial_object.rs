use sea_orm::entity::prelude::*;

/// A Tasks-mode object whose rows are not all imported yet (see
/// `db::links::mark_partial`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "partial_objects")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub storage_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub object_key: String,
    pub started_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
