//! The data model of docs/DESIGN.md as first made: projects, storages, tasks, predictions,
//! annotations, import/export links, sync runs and per-object errors.
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
fn text(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).text().not_null().take()
}
fn text_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).text().null().take()
}
fn big(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .big_integer()
        .not_null()
        .default(0)
        .take()
}
fn big_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).big_integer().null().take()
}
fn flag(name: &'static str, default: bool) -> ColumnDef {
    ColumnDef::new(name)
        .boolean()
        .not_null()
        .default(default)
        .take()
}
fn json(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).json_binary().not_null().take()
}
fn json_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).json_binary().null().take()
}
fn time(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .not_null()
        .take()
}
fn time_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .null()
        .take()
}
fn parent(column: &'static str, table: &'static str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from_col(column)
        .to(table, "id")
        .on_delete(ForeignKeyAction::Cascade)
        .take()
}
fn index(table: &'static str, name: &'static str, cols: &[&'static str]) -> IndexCreateStatement {
    let mut index = Index::create();
    index.table(table).name(name);
    for col in cols {
        index.col(*col);
    }
    index.take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("projects")
                .col(id())
                .col(text("title"))
                .col(text("data_key"))
                .col(time("created_at"))
                .col(time("updated_at"))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("storages")
                .col(id())
                .col(ColumnDef::new("project_id").big_integer().not_null())
                .col(text("role"))
                .col(text("backend"))
                .col(text("title"))
                .col(json("config"))
                // AES-GCM ciphertext of the secrets JSON; never leaves the database in clear.
                .col(text_null("secrets"))
                .col(json("secrets_set"))
                .col(text("prefix"))
                .col(text_null("regex_filter"))
                .col(flag("recursive", true))
                .col(text("import_method"))
                .col(flag("presign", true))
                .col(big("presign_ttl_seconds"))
                .col(flag("can_delete_objects", false))
                .col(big_null("sync_interval_seconds"))
                .col(time_null("next_sync_at"))
                .col(time("created_at"))
                .col(time("updated_at"))
                .foreign_key(&mut parent("project_id", "projects"))
                .take(),
        )
        .await?;
        m.create_index(index("storages", "storages_project", &["project_id"]))
            .await?;

        m.create_table(
            Table::create()
                .table("tasks")
                .col(id())
                .col(ColumnDef::new("project_id").big_integer().not_null())
                .col(json("data"))
                .col(json_null("meta"))
                .col(time("created_at"))
                .col(time("updated_at"))
                .foreign_key(&mut parent("project_id", "projects"))
                .take(),
        )
        .await?;
        m.create_index(index("tasks", "tasks_project", &["project_id", "id"]))
            .await?;

        m.create_table(
            Table::create()
                .table("predictions")
                .col(id())
                .col(ColumnDef::new("task_id").big_integer().not_null())
                .col(json("result"))
                .col(text_null("model_version"))
                .col(ColumnDef::new("score").double().null())
                .col(time("created_at"))
                .foreign_key(&mut parent("task_id", "tasks"))
                .take(),
        )
        .await?;
        m.create_index(index("predictions", "predictions_task", &["task_id"]))
            .await?;

        m.create_table(
            Table::create()
                .table("annotations")
                .col(id())
                .col(ColumnDef::new("task_id").big_integer().not_null())
                .col(ColumnDef::new("project_id").big_integer().not_null())
                .col(json("result"))
                .col(json_null("completed_by"))
                .col(ColumnDef::new("lead_time").double().null())
                .col(flag("was_cancelled", false))
                .col(flag("ground_truth", false))
                .col(time("created_at"))
                .col(time("updated_at"))
                .foreign_key(&mut parent("task_id", "tasks"))
                .foreign_key(&mut parent("project_id", "projects"))
                .take(),
        )
        .await?;
        m.create_index(index("annotations", "annotations_task", &["task_id"]))
            .await?;
        m.create_index(index(
            "annotations",
            "annotations_project",
            &["project_id", "id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("import_links")
                .col(id())
                .col(ColumnDef::new("storage_id").big_integer().not_null())
                .col(text("object_key"))
                .col(big("row_index"))
                .col(ColumnDef::new("task_id").big_integer().not_null())
                .col(text_null("etag"))
                .col(big_null("size"))
                .col(time_null("last_modified"))
                .col(flag("object_exists", true))
                .col(time("created_at"))
                .col(time("updated_at"))
                .foreign_key(&mut parent("storage_id", "storages"))
                .foreign_key(&mut parent("task_id", "tasks"))
                .take(),
        )
        .await?;
        // The key that makes re-runs, retried batches and crashed workers harmless.
        m.create_index(
            index(
                "import_links",
                "import_links_object",
                &["storage_id", "object_key", "row_index"],
            )
            .unique()
            .take(),
        )
        .await?;
        m.create_index(index("import_links", "import_links_task", &["task_id"]))
            .await?;

        m.create_table(
            Table::create()
                .table("export_links")
                .col(id())
                .col(ColumnDef::new("storage_id").big_integer().not_null())
                .col(ColumnDef::new("annotation_id").big_integer().not_null())
                .col(text("object_key"))
                .col(text("content_hash"))
                .col(time("exported_at"))
                .foreign_key(&mut parent("storage_id", "storages"))
                .foreign_key(&mut parent("annotation_id", "annotations"))
                .take(),
        )
        .await?;
        m.create_index(
            index(
                "export_links",
                "export_links_annotation",
                &["storage_id", "annotation_id"],
            )
            .unique()
            .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("sync_runs")
                .col(ColumnDef::new("id").string_len(26).not_null().primary_key())
                .col(ColumnDef::new("storage_id").big_integer().not_null())
                .col(text("kind"))
                .col(text("status"))
                .col(big("listed"))
                .col(big("matched"))
                .col(big("created"))
                .col(big("existed"))
                .col(big("failed"))
                .col(big("exported"))
                .col(big("unchanged"))
                .col(big("deleted"))
                .col(big("bytes"))
                .col(text_null("cursor"))
                .col(big("attempts"))
                .col(text_null("error"))
                .col(time("queued_at"))
                .col(time_null("started_at"))
                .col(time_null("heartbeat_at"))
                .col(time_null("finished_at"))
                .foreign_key(&mut parent("storage_id", "storages"))
                .take(),
        )
        .await?;
        m.create_index(index(
            "sync_runs",
            "sync_runs_storage",
            &["storage_id", "id"],
        ))
        .await?;
        // One live run per storage: the database itself is the lease, so two API
        // replicas (or a double click) can never start two runs of one storage.
        // Both Postgres and SQLite accept this partial index as written.
        m.get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX sync_runs_one_live ON sync_runs (storage_id) \
                 WHERE status IN ('queued', 'running')",
            )
            .await?;

        m.create_table(
            Table::create()
                .table("object_errors")
                .col(id())
                .col(ColumnDef::new("run_id").string_len(26).not_null())
                .col(text("object_key"))
                .col(big_null("row_index"))
                .col(text("error"))
                .col(time("created_at"))
                .foreign_key(&mut parent("run_id", "sync_runs"))
                .take(),
        )
        .await?;
        m.create_index(index(
            "object_errors",
            "object_errors_run",
            &["run_id", "id"],
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "object_errors",
            "sync_runs",
            "export_links",
            "import_links",
            "annotations",
            "predictions",
            "tasks",
            "storages",
            "projects",
        ] {
            m.drop_table(Table::drop().table(table).take()).await?;
        }
        Ok(())
    }
}
