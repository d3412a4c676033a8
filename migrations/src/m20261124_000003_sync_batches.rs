//! Fan-out and attempt leases:
//! - `sync_batches`: the slices of a big Tasks-mode sync that any worker may
//!   run. The sync job writes a batch row, then enqueues a job naming it; the
//!   batch's worker marks it done in the transaction that records its errors.
//! - `sync_runs.lease_owner` / `lease_at`: the attempt that holds a run and its
//!   last heartbeat, so a duplicate job never runs a run twice at once.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("sync_batches")
                .col(
                    ColumnDef::new("id")
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new("run_id").string_len(26).not_null())
                // The listed objects of the batch: [{key, size, etag, last_modified}].
                .col(ColumnDef::new("objects").json_binary().not_null())
                .col(ColumnDef::new("done").boolean().not_null().default(false))
                .col(
                    ColumnDef::new("attempts")
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ColumnDef::new("worker").text().null())
                .col(
                    ColumnDef::new("created_at")
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new("finished_at")
                        .timestamp_with_time_zone()
                        .null(),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from_col("run_id")
                        .to("sync_runs", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .take(),
        )
        .await?;
        for col in [
            ColumnDef::new("lease_owner").string_len(26).null().take(),
            ColumnDef::new("lease_at")
                .timestamp_with_time_zone()
                .null()
                .take(),
        ] {
            m.alter_table(Table::alter().table("sync_runs").add_column(col).take())
                .await?;
        }
        m.create_index(
            Index::create()
                .table("sync_batches")
                .name("sync_batches_run")
                .col("run_id")
                .col("done")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("sync_batches").take())
            .await
    }
}
