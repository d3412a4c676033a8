//! Change awareness:
//! - `import_links.seen_run_id`: the last run that listed the object, so a run
//!   can tell which objects disappeared, and a replayed page does not count
//!   its rows twice;
//! - `sync_runs.missing` / `sync_runs.changed`: objects gone since the last
//!   sync, and objects whose etag changed.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        let add = |table: &'static str, col: ColumnDef| {
            Table::alter().table(table).add_column(col).take()
        };
        m.alter_table(add(
            "import_links",
            ColumnDef::new("seen_run_id").string_len(26).null().take(),
        ))
        .await?;
        m.alter_table(add(
            "sync_runs",
            ColumnDef::new("missing")
                .big_integer()
                .not_null()
                .default(0)
                .take(),
        ))
        .await?;
        m.alter_table(add(
            "sync_runs",
            ColumnDef::new("changed")
                .big_integer()
                .not_null()
                .default(0)
                .take(),
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let drop = |table: &'static str, col: &'static str| {
            Table::alter().table(table).drop_column(col).take()
        };
        m.alter_table(drop("sync_runs", "changed")).await?;
        m.alter_table(drop("sync_runs", "missing")).await?;
        m.alter_table(drop("import_links", "seen_run_id")).await?;
        Ok(())
    }
}
