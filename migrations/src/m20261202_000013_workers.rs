//! `fleet_workers`: each worker process (and the in-process worker of embedded
//! mode) registers itself here and refreshes its row with every heartbeat,
//! for `GET /api/v1/workers`: its name (unique per start), host, version,
//! slots (concurrency), the runs it is executing now (`current_runs`, a JSON
//! array of run ids) and how many jobs it holds (`running_jobs`). A row not
//! refreshed for a few heartbeats is shown as gone; the scheduler's tick
//! deletes rows silent for longer (see `db::workers`). Not `workers`:
//! SQLite table names ignore case, and the embedded queue (apalis-sqlite),
//! which lives in the same file in embedded mode, has a `Workers` table.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let at = |name: &'static str| {
            ColumnDef::new(name)
                .timestamp_with_time_zone()
                .not_null()
                .take()
        };
        m.create_table(
            Table::create()
                .table("fleet_workers")
                .col(
                    ColumnDef::new("name")
                        .string_len(255)
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new("host").string_len(255).not_null())
                .col(ColumnDef::new("version").string_len(64).not_null())
                .col(ColumnDef::new("slots").integer().not_null())
                .col(ColumnDef::new("running_jobs").integer().not_null())
                .col(ColumnDef::new("current_runs").json_binary().not_null())
                .col(at("started_at"))
                .col(at("heartbeat_at"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .table("fleet_workers")
                .name("fleet_workers_heartbeat")
                .col("heartbeat_at")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("fleet_workers").take())
            .await
    }
}
