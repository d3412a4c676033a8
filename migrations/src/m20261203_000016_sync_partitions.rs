//! `sync_partitions`: the key ranges a big import run lists in parallel.
//! The run's job discovers them (common prefixes under the storage's
//! prefix) and writes them in one transaction; any worker lists one under
//! a lease (`lease_owner` / `lease_at`, as a run's), moving its own
//! `cursor` with each committed page; the run's job reconciles missing
//! objects once every partition is `done`.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("sync_partitions")
                .col(
                    ColumnDef::new("id")
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new("run_id").string_len(26).not_null())
                // Keys starting with `prefix`: all of them (`recursive`), or
                // only those with no `/` after it.
                .col(ColumnDef::new("prefix").text().not_null())
                .col(ColumnDef::new("recursive").boolean().not_null())
                .col(ColumnDef::new("cursor").text().null())
                .col(ColumnDef::new("done").boolean().not_null().default(false))
                // Given up on (a permanent error, or out of attempts): the
                // run fails with `error`.
                .col(ColumnDef::new("failed").boolean().not_null().default(false))
                .col(
                    ColumnDef::new("attempts")
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ColumnDef::new("lease_owner").string_len(26).null())
                .col(ColumnDef::new("lease_at").timestamp_with_time_zone().null())
                // Why the last attempt failed.
                .col(ColumnDef::new("error").text().null())
                .col(ColumnDef::new("worker").text().null())
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
        m.create_index(
            Index::create()
                .table("sync_partitions")
                .name("sync_partitions_run")
                .col("run_id")
                .col("done")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("sync_partitions").take())
            .await
    }
}
