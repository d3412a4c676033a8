//! `sync_batches.last_error`: why the batch's latest attempt failed, so a
//! batch given up after its attempts says why, as a run does
//! (`sync_runs.error` holds a failed attempt's error the same way).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_batches")
                .add_column(ColumnDef::new("last_error").text().null().take())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_batches")
                .drop_column("last_error")
                .take(),
        )
        .await
    }
}
