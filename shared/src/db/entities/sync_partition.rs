use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "sync_partitions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub run_id: String,
    /// The keys this partition lists: those starting with `prefix`, all of
    /// them when `recursive`, else only those with no `/` after it.
    pub prefix: String,
    pub recursive: bool,
    /// The last key of its last committed page.
    pub cursor: Option<String>,
    pub done: bool,
    /// Given up on: the run fails with `error`.
    pub failed: bool,
    pub attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_at: Option<DateTimeUtc>,
    pub error: Option<String>,
    /// The worker that finished it.
    pub worker: Option<String>,
    pub finished_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
