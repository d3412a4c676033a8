//! Two controls of the ops console:
//! - `storages.schedule_paused_at`: set while the storage's periodic syncs
//!   are paused (`POST /storages/{id}/pause`); the tick skips it, a manual
//!   sync still runs;
//! - `sync_runs.retry_of`: the run whose failed objects a `retry` run reads
//!   again (`POST /runs/{id}/retry`); NULL for every other run.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("storages")
                .add_column(
                    ColumnDef::new("schedule_paused_at")
                        .timestamp_with_time_zone()
                        .null()
                        .take(),
                )
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .add_column(ColumnDef::new("retry_of").string_len(26).null().take())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .drop_column("retry_of")
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("storages")
                .drop_column("schedule_paused_at")
                .take(),
        )
        .await
    }
}
