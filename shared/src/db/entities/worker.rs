use sea_orm::entity::prelude::*;

/// A worker's registration, refreshed with its heartbeat (see `db::workers`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fleet_workers")]
pub struct Model {
    /// The worker's name: its prefix and a random suffix, new at each start.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub host: String,
    /// The labelsync version it runs.
    pub version: String,
    /// How many jobs it runs at once.
    pub slots: i32,
    /// How many jobs it holds now (runs, fan-out batches, webhook deliveries).
    pub running_jobs: i32,
    /// The ids of the runs it is executing now (a JSON array).
    #[sea_orm(column_type = "JsonBinary")]
    pub current_runs: Json,
    pub started_at: DateTimeUtc,
    pub heartbeat_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
