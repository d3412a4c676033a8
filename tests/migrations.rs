//! Migrations up (and down and up again) on a fresh Postgres database and a
//! fresh SQLite file, with the constraints the pipelines rely on.
use labelsync::db;
use labelsync_migrations::{Migrator, MigratorTrait};
use labelsync_tests::fresh_postgres;
use sea_orm::{ConnectionTrait, DatabaseConnection};

const TABLES: [&str; 16] = [
    "projects",
    "storages",
    "tasks",
    "predictions",
    "annotations",
    "import_links",
    "export_links",
    "sync_runs",
    "object_errors",
    "webhooks",
    "webhook_events",
    "webhook_deliveries",
    "webhook_attempts",
    "idempotency_keys",
    "fleet_workers",
    "change_counters",
];

async fn check_schema(db: &DatabaseConnection) {
    check_tables_exist(db).await;
    insert_project_storage_task(db).await;
    check_one_link_per_object_row(db).await;
    check_one_live_run_per_storage(db).await;
    check_on_missing_defaults(db).await;
    check_storage_delete_takes_its_links(db).await;
    check_task_delete_takes_its_links(db).await;
    check_project_delete_cascades(db).await;
}

async fn check_tables_exist(db: &DatabaseConnection) {
    for table in TABLES {
        db.execute_unprepared(&format!("SELECT COUNT(*) FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("table {table} missing: {e}"));
    }
}

/// Project 1, its storage 1 and its task 1.
async fn insert_project_storage_task(db: &DatabaseConnection) {
    db.execute_unprepared(&format!(
        "INSERT INTO projects (id, title, data_key, created_at, updated_at) VALUES (1, 'p', 'image', {NOW}, {NOW})"
    ))
    .await
    .expect("insert project");
    db.execute_unprepared(&storage_sql(1, 1, "files"))
        .await
        .expect("insert storage");
    db.execute_unprepared(&task_sql(1))
        .await
        .expect("insert task");
}

async fn check_one_link_per_object_row(db: &DatabaseConnection) {
    let link = link_sql(1, 0, 1);
    db.execute_unprepared(&link).await.expect("first link");
    assert!(
        db.execute_unprepared(&link).await.is_err(),
        "UNIQUE(storage_id, object_key, row_index) must refuse a second link"
    );
}

async fn check_one_live_run_per_storage(db: &DatabaseConnection) {
    let run = |id: &str, status: &str| {
        format!(
            "INSERT INTO sync_runs (id, storage_id, kind, status, queued_at) VALUES ('{id}', 1, 'import', '{status}', {NOW})"
        )
    };
    db.execute_unprepared(&run("r1", "completed"))
        .await
        .expect("ended run");
    db.execute_unprepared(&run("r2", "queued"))
        .await
        .expect("live run");
    assert!(
        db.execute_unprepared(&run("r3", "running")).await.is_err(),
        "a second live run of one storage must be refused"
    );
}

/// Rows written without the columns of migration 9 (as before it) read as
/// today's behaviour: `on_missing` `flag`, nothing kept, a complete listing.
async fn check_on_missing_defaults(db: &DatabaseConnection) {
    let sql = "SELECT COUNT(*) AS n FROM storages WHERE id = 1 AND on_missing = 'flag'";
    assert_eq!(count(db, sql).await, 1, "on_missing defaults to flag");
    let sql = "SELECT COUNT(*) AS n FROM sync_runs \
               WHERE id = 'r1' AND kept = 0 AND listing_incomplete = FALSE";
    assert_eq!(
        count(db, sql).await,
        1,
        "kept and listing_incomplete default"
    );
}

/// Deleting a storage takes its links, not the project's tasks.
async fn check_storage_delete_takes_its_links(db: &DatabaseConnection) {
    db.execute_unprepared(&storage_sql(2, 1, "files"))
        .await
        .expect("insert second storage");
    db.execute_unprepared(&link_sql(2, 0, 1))
        .await
        .expect("link of the second storage");
    db.execute_unprepared("DELETE FROM storages WHERE id = 2")
        .await
        .expect("delete storage");
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) AS n FROM import_links WHERE storage_id = 2"
        )
        .await,
        0,
        "a deleted storage's links must go with it"
    );
    assert_eq!(
        count(db, "SELECT COUNT(*) AS n FROM import_links").await,
        1,
        "other storages' links stay"
    );
    assert_eq!(
        count(db, "SELECT COUNT(*) AS n FROM tasks").await,
        1,
        "tasks stay"
    );
}

/// Deleting a task takes its links.
async fn check_task_delete_takes_its_links(db: &DatabaseConnection) {
    db.execute_unprepared(&task_sql(2))
        .await
        .expect("insert second task");
    db.execute_unprepared(&link_sql(1, 1, 2))
        .await
        .expect("link of the second task");
    db.execute_unprepared("DELETE FROM tasks WHERE id = 2")
        .await
        .expect("delete task");
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) AS n FROM import_links WHERE task_id = 2"
        )
        .await,
        0,
        "a deleted task's links must go with it"
    );
}

/// Deleting the project cascades to everything under it.
async fn check_project_delete_cascades(db: &DatabaseConnection) {
    db.execute_unprepared("DELETE FROM projects WHERE id = 1")
        .await
        .expect("delete project");
    for table in ["storages", "tasks", "import_links", "sync_runs"] {
        let n = count(db, &format!("SELECT COUNT(*) AS n FROM {table}")).await;
        assert_eq!(n, 0, "{table} not emptied by the cascade");
    }
}

/// A task of project 1 with empty data.
fn task_sql(id: i64) -> String {
    format!(
        "INSERT INTO tasks (id, project_id, data, created_at, updated_at) VALUES ({id}, 1, '{{}}', {NOW}, {NOW})"
    )
}

/// A local source storage row.
fn storage_sql(id: i64, project: i64, import_method: &str) -> String {
    format!(
        "INSERT INTO storages (id, project_id, role, backend, title, config, secrets_set, prefix, recursive, import_method, presign, presign_ttl_seconds, can_delete_objects, created_at, updated_at) \
         VALUES ({id}, {project}, 'source', 'local', 's{id}', '{{}}', '[]', '', true, '{import_method}', false, 900, false, {NOW}, {NOW})"
    )
}

/// A link of `a.jpg` row `row` of a storage to a task.
fn link_sql(storage: i64, row: i64, task: i64) -> String {
    format!(
        "INSERT INTO import_links (storage_id, object_key, row_index, task_id, object_exists, created_at, updated_at) \
         VALUES ({storage}, 'a.jpg', {row}, {task}, true, {NOW}, {NOW})"
    )
}

const NOW: &str = "'2026-01-01T00:00:00Z'";

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql,
        ))
        .await
        .expect("count")
        .expect("row");
    row.try_get("", "n").expect("n")
}

async fn up_down_up(db: &DatabaseConnection) {
    db::migrate(db).await.expect("migrate up");
    db::migrate(db).await.expect("migrate up again is a no-op");
    Migrator::down(db, None).await.expect("migrate down");
    db::migrate(db).await.expect("migrate up after down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_on_fresh_postgres() {
    let url = fresh_postgres().await;
    let db = db::connect(&url).await.expect("connect");
    up_down_up(&db).await;
    check_schema(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_on_fresh_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("fresh.db").display()
    );
    let db = db::connect(&url).await.expect("connect");
    up_down_up(&db).await;
    check_schema(&db).await;
}

/// On Postgres the link and task tables have no foreign keys to their
/// parents (migration 5); `insert_tasks` checks them instead, once per call,
/// and writes nothing for a storage or project that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_task_inserts_refuse_a_missing_storage_or_project() {
    use labelsync::db::tasks::{NewTask, insert_tasks};
    use sea_orm::TransactionTrait;
    let url = fresh_postgres().await;
    let db = db::connect(&url).await.expect("connect");
    db::migrate(&db).await.expect("migrate");
    let now = "'2026-01-01T00:00:00Z'";
    for sql in [
        format!(
            "INSERT INTO projects (id, title, data_key, created_at, updated_at) VALUES (1, 'p', 'image', {now}, {now}), (2, 'q', 'image', {now}, {now})"
        ),
        storage_sql(1, 1, "tasks"),
    ] {
        db.execute_unprepared(&sql).await.expect("fixture");
    }
    let rows = || {
        vec![NewTask {
            object_key: "a.json".into(),
            data: serde_json::json!({ "text": "a" }),
            ..Default::default()
        }]
    };
    // (storage, project): a storage that does not exist, and one of another project.
    for (storage, project) in [(9, 1), (1, 2)] {
        let txn = db.begin().await.expect("begin");
        let err = insert_tasks(&txn, project, storage, "run", rows())
            .await
            .expect_err("insert for a missing parent");
        assert!(
            matches!(err, labelsync::Error::NotFound(_)),
            "storage {storage}, project {project}: {err:?}"
        );
        txn.rollback().await.expect("rollback");
    }
    let txn = db.begin().await.expect("begin");
    assert_eq!(
        insert_tasks(&txn, 1, 1, "run", rows())
            .await
            .expect("insert"),
        (1, 0)
    );
    txn.commit().await.expect("commit");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM tasks").await, 1);
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM import_links").await,
        1
    );
}
