//! Export events:
//! - `export_outbox`: one row per (target storage, annotation) with an export
//!   or delete waiting, written in the transaction that changes the
//!   annotation, so no event is lost when Redis or the workers are down.
//!   Repeated events for one annotation coalesce into its row (the latest
//!   action wins; `version` tells a drained row from one updated meanwhile).
//! - `sync_runs.scope`: `full` (a sync: every annotation) or `events` (only
//!   the storage's outbox).
//! - `storages.reimport_changed`: a source that re-reads objects whose etag
//!   changed (Tasks mode updates their tasks).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("export_outbox")
                .col(
                    ColumnDef::new("id")
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new("storage_id").big_integer().not_null())
                .col(ColumnDef::new("annotation_id").big_integer().not_null())
                // `upsert` or `delete`.
                .col(ColumnDef::new("action").string_len(16).not_null())
                .col(
                    ColumnDef::new("version")
                        .big_integer()
                        .not_null()
                        .default(1),
                )
                .col(
                    ColumnDef::new("created_at")
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from_col("storage_id")
                        .to("storages", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .table("export_outbox")
                .name("export_outbox_one_per_annotation")
                .col("storage_id")
                .col("annotation_id")
                .unique()
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("storages")
                .add_column(
                    ColumnDef::new("reimport_changed")
                        .boolean()
                        .not_null()
                        .default(false)
                        .take(),
                )
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .add_column(
                    ColumnDef::new("scope")
                        .string_len(16)
                        .not_null()
                        .default("full")
                        .take(),
                )
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("export_outbox").take())
            .await?;
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .drop_column("scope")
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("storages")
                .drop_column("reimport_changed")
                .take(),
        )
        .await
    }
}
