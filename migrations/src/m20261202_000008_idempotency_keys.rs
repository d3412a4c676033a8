//! `idempotency_keys`: the first response to a POST sent with an
//! `Idempotency-Key`, per caller (the SHA-256 of its bearer token; the empty
//! string in the open loopback mode) and key. `request_hash` tells a replay
//! (same method, path and body) from a key reused for another request;
//! `status` is null while the first request is still being answered.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("idempotency_keys")
                .col(ColumnDef::new("caller").string_len(64).not_null())
                .col(ColumnDef::new("key").string_len(255).not_null())
                .col(ColumnDef::new("request_hash").string_len(64).not_null())
                .col(ColumnDef::new("status").integer().null())
                .col(ColumnDef::new("response").text().null())
                .col(
                    ColumnDef::new("created_at")
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .primary_key(Index::create().col("caller").col("key"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .table("idempotency_keys")
                .name("idempotency_keys_age")
                .col("created_at")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("idempotency_keys").take())
            .await
    }
}
