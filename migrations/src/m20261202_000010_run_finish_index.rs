//! An index on `sync_runs.finished_at`: the project-wide live event stream
//! (`GET /api/v1/events`) asks every half second for the runs that ended
//! since its last look, which must not scan the whole run history.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .table("sync_runs")
                .name("sync_runs_finished_at")
                .col("finished_at")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .table("sync_runs")
                .name("sync_runs_finished_at")
                .to_owned(),
        )
        .await
    }
}
