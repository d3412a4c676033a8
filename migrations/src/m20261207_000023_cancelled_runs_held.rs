//! A partial index on `sync_runs (storage_id)` of the cancelled runs whose
//! attempt still holds its lease: every attempt's start asks whether its
//! storage has one (`db::runs::begin_attempt`), and without it that walked
//! every run the storage keeps. The attempt lets go once it has stopped, so
//! the index holds few rows: those of attempts still stopping, and of runs
//! cancelled before this version or whose worker died (looked up only by
//! their storage).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Both Postgres and SQLite accept this partial index as written.
        m.get_connection()
            .execute_unprepared(
                "CREATE INDEX sync_runs_cancelled_held ON sync_runs (storage_id) \
                 WHERE status = 'cancelled' AND lease_owner IS NOT NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .table("sync_runs")
                .name("sync_runs_cancelled_held")
                .to_owned(),
        )
        .await
    }
}
