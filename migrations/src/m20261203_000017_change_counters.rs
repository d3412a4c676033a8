//! `change_counters`: one row per kind of configuration that API replicas
//! cache in memory, with a number bumped in the same transaction as every
//! change of that kind. A replica reads the number every second and drops its
//! cache when it moved, so a change made anywhere (another replica, the CLI)
//! is seen everywhere within a second. Row `storages`: storages created,
//! replaced, deleted or re-keyed, and projects deleted (see
//! `db::change_counters`).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("change_counters")
                .col(
                    ColumnDef::new("name")
                        .string_len(64)
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new("value").big_integer().not_null().default(0))
                .take(),
        )
        .await?;
        m.exec_stmt(
            Query::insert()
                .into_table("change_counters")
                .columns(["name", "value"])
                .values_panic(["storages".into(), 0i64.into()])
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("change_counters").take())
            .await
    }
}
