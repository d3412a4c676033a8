//! Postgres: the three foreign keys every imported row went through
//! (`import_links.storage_id -> storages`, `import_links.task_id -> tasks`,
//! `tasks.project_id -> projects`) become statement-level delete triggers.
//!
//! Why: the per-row key checks were more than half of a bulk import's server
//! time; see docs/DECISIONS.md (Dropped foreign keys on the bulk-import tables).
//!
//! What the keys guaranteed is kept:
//! - deletes still cascade, once per statement over its transition table
//!   instead of once per row: a deleted project takes its tasks, a deleted
//!   task or storage its links (the other cascades, to storages, runs,
//!   annotations and predictions, are still foreign keys);
//! - inserts cannot point at a missing parent: the only writer of these
//!   rows, `db::tasks::insert_tasks`, takes the `FOR KEY SHARE` lock on the
//!   storage and project rows that the key checks took, once per call, and
//!   inserts each task in the same statement as its link.
//!
//! SQLite keeps its foreign keys (it cannot drop a constraint in place, and
//! its checks are cheap in-process lookups): this migration does nothing
//! there.
use sea_orm_migration::{prelude::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (trigger, parent table, child table, child column): "deleting a parent
/// row deletes the child rows that point at it".
const CASCADES: [(&str, &str, &str, &str); 3] = [
    ("projects_delete_tasks", "projects", "tasks", "project_id"),
    (
        "tasks_delete_import_links",
        "tasks",
        "import_links",
        "task_id",
    ),
    (
        "storages_delete_import_links",
        "storages",
        "import_links",
        "storage_id",
    ),
];

/// The foreign keys replaced, as Postgres named them: (table, constraint,
/// column, parent table).
const KEYS: [(&str, &str, &str, &str); 3] = [
    ("tasks", "tasks_project_id_fkey", "project_id", "projects"),
    (
        "import_links",
        "import_links_task_id_fkey",
        "task_id",
        "tasks",
    ),
    (
        "import_links",
        "import_links_storage_id_fkey",
        "storage_id",
        "storages",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = m.get_connection();
        for (trigger, parent, child, column) in CASCADES {
            db.execute_unprepared(&format!(
                "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     DELETE FROM {child} USING gone WHERE {child}.{column} = gone.id;
                     RETURN NULL;
                 END $$;
                 CREATE TRIGGER {trigger} AFTER DELETE ON {parent}
                     REFERENCING OLD TABLE AS gone
                     FOR EACH STATEMENT EXECUTE FUNCTION {trigger}();"
            ))
            .await?;
        }
        for (table, constraint, _, _) in KEYS {
            db.execute_unprepared(&format!("ALTER TABLE {table} DROP CONSTRAINT {constraint}"))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = m.get_connection();
        for (table, constraint, column, parent) in KEYS {
            db.execute_unprepared(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {constraint} FOREIGN KEY ({column}) \
                 REFERENCES {parent} (id) ON DELETE CASCADE"
            ))
            .await?;
        }
        for (trigger, parent, _, _) in CASCADES {
            db.execute_unprepared(&format!(
                "DROP TRIGGER {trigger} ON {parent}; DROP FUNCTION {trigger}();"
            ))
            .await?;
        }
        Ok(())
    }
}
