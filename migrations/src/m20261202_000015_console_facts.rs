//! Two facts the ops console shows and the API returns:
//! - `sync_runs.trace_id`: the OpenTelemetry trace the run was created in
//!   (32 hex digits), NULL when tracing is off;
//! - `storages.validated_at` / `storages.validation_error`: when the storage
//!   was last checked (`POST /storages/{id}/validate`) and what was wrong
//!   (NULL: it answered as expected).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .add_column(ColumnDef::new("trace_id").string_len(32).null().take())
                .take(),
        )
        .await?;
        // Two statements: SQLite alters one column at a time.
        m.alter_table(
            Table::alter()
                .table("storages")
                .add_column(
                    ColumnDef::new("validated_at")
                        .timestamp_with_time_zone()
                        .null()
                        .take(),
                )
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("storages")
                .add_column(ColumnDef::new("validation_error").text().null().take())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in ["validation_error", "validated_at"] {
            m.alter_table(Table::alter().table("storages").drop_column(column).take())
                .await?;
        }
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .drop_column("trace_id")
                .take(),
        )
        .await
    }
}
