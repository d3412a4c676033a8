//! An index on `export_outbox (storage_id, id)`: an export run reads its
//! storage's oldest waiting events on every page (`db::outbox::oldest`), and
//! without it that read walks the primary key past every other storage's
//! events.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const NAME: &str = "export_outbox_by_storage";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .table("export_outbox")
                .name(NAME)
                .col("storage_id")
                .col("id")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().table("export_outbox").name(NAME).to_owned())
            .await
    }
}
