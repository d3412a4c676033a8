//! `api_tokens`: the API's tokens kept in the database (docs/API.md,
//! "Tokens and scopes"). Only the SHA-256 of a secret is stored
//! (`secret_hash`, unique: lookups go by it); `prefix` is what lists show
//! so people can tell tokens apart. `projects` is null for every project or
//! the allowed ids as `,3,4,` (the same comma-wrapped form as webhook event
//! lists, so one LIKE finds a project).
//!
//! `audit_events`: one row per mutating API request (who, what, outcome),
//! kept `LABELSYNC_AUDIT_RETENTION_DAYS`.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn timestamp(name: &'static str, null: bool) -> ColumnDef {
    let mut col = ColumnDef::new(name);
    col.timestamp_with_time_zone();
    if null {
        col.null()
    } else {
        col.not_null()
    };
    col
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("api_tokens")
                .col(
                    ColumnDef::new("id")
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new("name").string_len(100).not_null())
                .col(ColumnDef::new("prefix").string_len(32).not_null())
                .col(
                    ColumnDef::new("secret_hash")
                        .string_len(64)
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new("scope").string_len(16).not_null())
                .col(ColumnDef::new("projects").text().null())
                .col(timestamp("created_at", false))
                .col(timestamp("last_used_at", true))
                .col(timestamp("expires_at", true))
                .col(timestamp("revoked_at", true))
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("audit_events")
                .col(
                    ColumnDef::new("id")
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(timestamp("at", false))
                .col(ColumnDef::new("token_id").big_integer().null())
                .col(ColumnDef::new("token_name").string_len(100).not_null())
                .col(ColumnDef::new("method").string_len(16).not_null())
                .col(ColumnDef::new("route").string_len(200).not_null())
                .col(ColumnDef::new("path").text().not_null())
                .col(ColumnDef::new("project_id").big_integer().null())
                .col(ColumnDef::new("resource").text().not_null())
                .col(ColumnDef::new("status").integer().not_null())
                .col(ColumnDef::new("request_id").string_len(128).not_null())
                .col(ColumnDef::new("client").string_len(64).null())
                .take(),
        )
        .await?;
        for (name, col) in [
            ("audit_events_at", "at"),
            ("audit_events_token", "token_id"),
            ("audit_events_project", "project_id"),
        ] {
            m.create_index(
                Index::create()
                    .table("audit_events")
                    .name(name)
                    .col(col)
                    .take(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("audit_events").take())
            .await?;
        m.drop_table(Table::drop().table("api_tokens").take()).await
    }
}
