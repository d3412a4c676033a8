//! `export_outbox.object_key`: for a delete, the key its annotation was
//! last exported under on that storage, read from the export link in the
//! delete's transaction (the link goes with the annotation). The object is
//! deleted there even when the storage's prefix changed since; without a
//! link (never exported) the key the current prefix gives is deleted.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("export_outbox")
                .add_column(ColumnDef::new("object_key").text().null().take())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("export_outbox")
                .drop_column("object_key")
                .take(),
        )
        .await
    }
}
