//! `partial_objects`: Tasks-mode objects whose rows are being imported over
//! several transactions. A row is written before an object's first chunk
//! commits and deleted once its last row is in; an object that still has
//! one (its run was cancelled, failed or killed half-way) is read again by
//! the next run, which adds the rows that are missing instead of counting
//! the object as imported.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("partial_objects")
                .col(ColumnDef::new("storage_id").big_integer().not_null())
                .col(ColumnDef::new("object_key").text().not_null())
                .col(
                    ColumnDef::new("started_at")
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .primary_key(Index::create().col("storage_id").col("object_key"))
                .foreign_key(
                    ForeignKey::create()
                        .from_col("storage_id")
                        .to("storages", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("partial_objects").take())
            .await
    }
}
