//! What a source does with the tasks of objects that left it:
//! - `storages.on_missing`: `keep`, `flag` (the behaviour before this
//!   column, hence the default) or `delete_unlabeled` (docs/API.md,
//!   "Storages");
//! - `sync_runs.kept`: tasks an import run kept although every object row
//!   they came from is gone (they have annotations, or a link still present);
//!   the tasks it deleted are counted in `deleted`;
//! - `sync_runs.listing_incomplete`: some part of an import run's listing
//!   could not be read (an unreadable directory), so objects it did not
//!   list may still be there: such a run deletes no task;
//! - `import_links_gone`: a partial index of the links flagged missing, by
//!   storage and task, so finding the tasks to delete reads only those links
//!   (few, next to the storage's others) in task order. Both Postgres and
//!   SQLite accept it as written.
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
                    ColumnDef::new("on_missing")
                        .string_len(16)
                        .not_null()
                        .default("flag")
                        .take(),
                )
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .add_column(
                    ColumnDef::new("kept")
                        .big_integer()
                        .not_null()
                        .default(0)
                        .take(),
                )
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("sync_runs")
                .add_column(
                    ColumnDef::new("listing_incomplete")
                        .boolean()
                        .not_null()
                        .default(false)
                        .take(),
                )
                .take(),
        )
        .await?;
        m.get_connection()
            .execute_unprepared(
                "CREATE INDEX import_links_gone ON import_links (storage_id, task_id) \
                 WHERE object_exists = FALSE",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared("DROP INDEX import_links_gone")
            .await?;
        for column in ["listing_incomplete", "kept"] {
            m.alter_table(Table::alter().table("sync_runs").drop_column(column).take())
                .await?;
        }
        m.alter_table(
            Table::alter()
                .table("storages")
                .drop_column("on_missing")
                .take(),
        )
        .await
    }
}
