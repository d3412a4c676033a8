use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "sync_batches")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub run_id: String,
    /// `[{key, size, etag, last_modified}]`: the objects this batch imports.
    #[sea_orm(column_type = "JsonBinary")]
    pub objects: Json,
    pub done: bool,
    pub attempts: i64,
    /// The worker that finished it.
    pub worker: Option<String>,
    pub created_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    /// When a job of the batch's run took it to run it itself; its queued
    /// job skips it while this is younger than a run lease.
    pub claimed_at: Option<DateTimeUtc>,
    /// Why its latest attempt failed (transient: it is tried again), for
    /// the message of a batch given up after its attempts.
    pub last_error: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
