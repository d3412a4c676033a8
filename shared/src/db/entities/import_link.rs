use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "import_links")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub storage_id: i64,
    pub object_key: String,
    pub row_index: i64,
    pub task_id: i64,
    pub etag: Option<String>,
    pub size: Option<i64>,
    pub last_modified: Option<DateTimeUtc>,
    pub object_exists: bool,
    /// The last run that listed this object.
    pub seen_run_id: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
