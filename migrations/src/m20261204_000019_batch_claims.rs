//! `sync_batches.claimed_at`: when a job of the batch's own run (the sync
//! job or a partition's job, running batches while it waits) took the batch
//! to run it itself. The batch's queued job skips a batch claimed less than
//! a run lease ago, so the end of a run, where the two meet, reads no batch
//! twice; a claim older than that (its holder died) is taken again by the
//! run's next look (`db::batches::claim_unstarted`).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_batches")
                .add_column(
                    ColumnDef::new("claimed_at")
                        .timestamp_with_time_zone()
                        .null()
                        .take(),
                )
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_batches")
                .drop_column("claimed_at")
                .take(),
        )
        .await
    }
}
