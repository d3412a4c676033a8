//! # Layout
//! SeaORM migrations for labelsync, one dated module per migration. They run on
//! Postgres (production) and SQLite (embedded mode): only portable column types,
//! and raw SQL only where both dialects accept the same text (partial indexes),
//! except where a migration is for one backend alone and says why
//! (`m20261202_000005_bulk_import_keys`: Postgres only).
pub use sea_orm_migration::prelude::*;

mod m20261124_000001_initial;
mod m20261124_000002_change_tracking;
mod m20261124_000003_sync_batches;
mod m20261124_000004_export_outbox;
mod m20261202_000005_bulk_import_keys;
mod m20261202_000006_partial_objects;
mod m20261202_000007_webhooks;
mod m20261202_000008_idempotency_keys;
mod m20261202_000009_on_missing;
mod m20261202_000010_run_finish_index;
mod m20261202_000011_tokens_audit;
mod m20261202_000012_run_admission;
mod m20261202_000013_workers;
mod m20261202_000014_pause_and_retry;
mod m20261202_000015_console_facts;
mod m20261203_000016_sync_partitions;
mod m20261203_000017_change_counters;
mod m20261203_000018_outbox_by_storage;
mod m20261204_000019_batch_claims;
mod m20261206_000020_batch_errors;
mod m20261206_000021_annotations_by_task;
mod m20261207_000022_outbox_object_keys;
mod m20261207_000023_cancelled_runs_held;
mod m20261207_000024_webhook_secret_rotation;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_initial::Migration),
            Box::new(m20261124_000002_change_tracking::Migration),
            Box::new(m20261124_000003_sync_batches::Migration),
            Box::new(m20261124_000004_export_outbox::Migration),
            Box::new(m20261202_000005_bulk_import_keys::Migration),
            Box::new(m20261202_000006_partial_objects::Migration),
            Box::new(m20261202_000007_webhooks::Migration),
            Box::new(m20261202_000008_idempotency_keys::Migration),
            Box::new(m20261202_000009_on_missing::Migration),
            Box::new(m20261202_000010_run_finish_index::Migration),
            Box::new(m20261202_000011_tokens_audit::Migration),
            Box::new(m20261202_000012_run_admission::Migration),
            Box::new(m20261202_000013_workers::Migration),
            Box::new(m20261202_000014_pause_and_retry::Migration),
            Box::new(m20261202_000015_console_facts::Migration),
            Box::new(m20261203_000016_sync_partitions::Migration),
            Box::new(m20261203_000017_change_counters::Migration),
            Box::new(m20261203_000018_outbox_by_storage::Migration),
            Box::new(m20261204_000019_batch_claims::Migration),
            Box::new(m20261206_000020_batch_errors::Migration),
            Box::new(m20261206_000021_annotations_by_task::Migration),
            Box::new(m20261207_000022_outbox_object_keys::Migration),
            Box::new(m20261207_000023_cancelled_runs_held::Migration),
            Box::new(m20261207_000024_webhook_secret_rotation::Migration),
        ]
    }
}
