//! `webhooks.previous_secret` and `previous_secret_until`: the secret a
//! rotation replaced (sealed as `secret` is) and until when deliveries are
//! still signed with it too, so receivers can switch to the new secret
//! without rejecting events meanwhile. One column per statement: SQLite
//! adds one at a time.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            ColumnDef::new("previous_secret").text().null().take(),
            ColumnDef::new("previous_secret_until")
                .timestamp_with_time_zone()
                .null()
                .take(),
        ] {
            m.alter_table(Table::alter().table("webhooks").add_column(column).take())
                .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in ["previous_secret_until", "previous_secret"] {
            m.alter_table(Table::alter().table("webhooks").drop_column(column).take())
                .await?;
        }
        Ok(())
    }
}
