//! Webhooks for upstream apps:
//! - `webhooks`: an endpoint (URL, event types, optional project, sealed
//!   signing secret), whether it is enabled (and since when it fails), and the lease of the one job
//!   delivering to it at a time;
//! - `webhook_events`: what happened (a run changed status, objects went
//!   missing, an export failed), written in the transaction of the change;
//! - `webhook_deliveries`: one row per (endpoint, event) with its state and
//!   next attempt time; delivered oldest first per endpoint;
//! - `webhook_attempts`: every HTTP attempt of a delivery (status code, the
//!   first KB of the answer, duration).
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn id() -> ColumnDef {
    ColumnDef::new("id")
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .take()
}

fn at(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .not_null()
        .take()
}

fn cascade(from: &'static str, table: &'static str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from_col(from)
        .to(table, "id")
        .on_delete(ForeignKeyAction::Cascade)
        .take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("webhooks")
                .col(id())
                .col(ColumnDef::new("project_id").big_integer().null())
                .col(ColumnDef::new("url").text().not_null())
                // `,run.completed,run.failed,`: one LIKE finds subscribers
                // on either database; `,*,` is every event.
                .col(ColumnDef::new("events").text().not_null())
                .col(ColumnDef::new("secret").text().not_null())
                .col(ColumnDef::new("enabled").boolean().not_null().default(true))
                .col(ColumnDef::new("disabled_reason").text().null())
                // Since when every attempt failed (cleared by a success): an
                // endpoint failing for LABELSYNC_WEBHOOK_MAX_AGE_SECS is disabled.
                .col(
                    ColumnDef::new("failing_since")
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(ColumnDef::new("lease_owner").string_len(32).null())
                .col(ColumnDef::new("lease_at").timestamp_with_time_zone().null())
                .col(at("created_at"))
                .col(at("updated_at"))
                .foreign_key(&mut cascade("project_id", "projects"))
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("webhook_events")
                .col(ColumnDef::new("id").string_len(32).not_null().primary_key())
                .col(ColumnDef::new("event_type").string_len(64).not_null())
                .col(ColumnDef::new("project_id").big_integer().null())
                .col(ColumnDef::new("payload").text().not_null())
                .col(at("created_at"))
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("webhook_deliveries")
                .col(id())
                .col(ColumnDef::new("webhook_id").big_integer().not_null())
                .col(ColumnDef::new("event_id").string_len(32).not_null())
                // `pending`, `delivered` or `failed`.
                .col(ColumnDef::new("status").string_len(16).not_null())
                .col(ColumnDef::new("attempts").integer().not_null().default(0))
                .col(at("next_attempt_at"))
                .col(ColumnDef::new("last_status_code").integer().null())
                .col(ColumnDef::new("last_error").text().null())
                .col(at("created_at"))
                .col(
                    ColumnDef::new("finished_at")
                        .timestamp_with_time_zone()
                        .null(),
                )
                .foreign_key(&mut cascade("webhook_id", "webhooks"))
                .foreign_key(&mut cascade("event_id", "webhook_events"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .table("webhook_deliveries")
                .name("webhook_deliveries_log")
                .col("webhook_id")
                .col("id")
                .take(),
        )
        .await?;
        // The queues: only pending rows, so the scheduler's look for due
        // deliveries every tick does not read the delivered history.
        m.get_connection()
            .execute_unprepared(
                "CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, id) \
                 WHERE status = 'pending'",
            )
            .await?;
        m.create_index(
            Index::create()
                .table("webhook_deliveries")
                .name("webhook_deliveries_event")
                .col("event_id")
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("webhook_attempts")
                .col(id())
                .col(ColumnDef::new("delivery_id").big_integer().not_null())
                .col(at("started_at"))
                .col(ColumnDef::new("status_code").integer().null())
                .col(ColumnDef::new("response_body").text().null())
                .col(ColumnDef::new("error").text().null())
                .col(ColumnDef::new("duration_ms").big_integer().not_null())
                .foreign_key(&mut cascade("delivery_id", "webhook_deliveries"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .table("webhook_attempts")
                .name("webhook_attempts_delivery")
                .col("delivery_id")
                .col("id")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "webhook_attempts",
            "webhook_deliveries",
            "webhook_events",
            "webhooks",
        ] {
            m.drop_table(Table::drop().table(table).take()).await?;
        }
        Ok(())
    }
}
