//! Admission of runs to the queue (`LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT`,
//! docs/DESIGN.md "Admission and fairness"):
//! - `sync_runs.project_id`: the project of the run's storage, copied onto
//!   the run so the per-project questions below read one index (a storage
//!   never changes project);
//! - `sync_runs.admitted_at`: when the run was let onto the queue; NULL
//!   while it is *held* (`queued`, waiting in the database for its
//!   project's turn);
//! - `sync_runs_held` (`project_id`, `id`) over held runs: a project's
//!   oldest held run is the first entry of its range, and the projects with
//!   held runs are read from this small index alone;
//! - `sync_runs_admitted` (`project_id`) over admitted live runs: how many
//!   runs a project has in flight, counted from at most a few entries.
//!
//! Existing rows get their project and count as admitted (`admitted_at =
//! queued_at`): every live run of before this migration was already handed
//! to the queue, or to the sweep that pushes it. A project may so be over
//! its cap for a while after the upgrade; its new runs wait until it is not.
//! Both Postgres and SQLite accept the statements as written.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            ColumnDef::new("project_id")
                .big_integer()
                .not_null()
                .default(0)
                .take(),
            ColumnDef::new("admitted_at")
                .timestamp_with_time_zone()
                .null()
                .take(),
        ] {
            m.alter_table(Table::alter().table("sync_runs").add_column(column).take())
                .await?;
        }
        let db = m.get_connection();
        for sql in [
            "UPDATE sync_runs SET admitted_at = queued_at, project_id = COALESCE(\
             (SELECT s.project_id FROM storages s WHERE s.id = sync_runs.storage_id), 0)",
            "CREATE INDEX sync_runs_held ON sync_runs (project_id, id) \
             WHERE status = 'queued' AND admitted_at IS NULL",
            "CREATE INDEX sync_runs_admitted ON sync_runs (project_id) \
             WHERE status IN ('queued', 'running') AND admitted_at IS NOT NULL",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        for index in ["sync_runs_admitted", "sync_runs_held"] {
            db.execute_unprepared(&format!("DROP INDEX {index}"))
                .await?;
        }
        for column in ["admitted_at", "project_id"] {
            m.alter_table(Table::alter().table("sync_runs").drop_column(column).take())
                .await?;
        }
        Ok(())
    }
}
