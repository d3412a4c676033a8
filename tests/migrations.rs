//! Migrations up (and down and up again) on a fresh Postgres database and a
//! fresh SQLite file, with the constraints the pipelines rely on.
use labelsync::db;
use labelsync_migrations::{Migrator, MigratorTrait};
use labelsync_tests::fresh_postgres;
use sea_orm::{ConnectionTrait, DatabaseConnection};

const TABLES: [&str; 9] = [
    "projects",
    "storages",
    "tasks",
    "predictions",
    "annotations",
    "import_links",
    "export_links",
    "sync_runs",
    "object_errors",
];

async fn check_schema(db: &DatabaseConnection) {
    for table in TABLES {
        db.execute_unprepared(&format!("SELECT COUNT(*) FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("table {table} missing: {e}"));
    }
    let now = "'2026-01-01T00:00:00Z'";
    db.execute_unprepared(&format!(
        "INSERT INTO projects (id, title, data_key, created_at, updated_at) VALUES (1, 'p', 'image', {now}, {now})"
    ))
    .await
    .expect("insert project");
    db.execute_unprepared(&format!(
        "INSERT INTO storages (id, project_id, role, backend, title, config, secrets_set, prefix, recursive, import_method, presign, presign_ttl_seconds, can_delete_objects, created_at, updated_at) \
         VALUES (1, 1, 'source', 'local', 's', '{{}}', '[]', '', true, 'files', false, 900, false, {now}, {now})"
    ))
    .await
    .expect("insert storage");
    db.execute_unprepared(&format!(
        "INSERT INTO tasks (id, project_id, data, created_at, updated_at) VALUES (1, 1, '{{}}', {now}, {now})"
    ))
    .await
    .expect("insert task");
    let link = format!(
        "INSERT INTO import_links (storage_id, object_key, row_index, task_id, object_exists, created_at, updated_at) \
         VALUES (1, 'a.jpg', 0, 1, true, {now}, {now})"
    );
    db.execute_unprepared(&link).await.expect("first link");
    assert!(
        db.execute_unprepared(&link).await.is_err(),
        "UNIQUE(storage_id, object_key, row_index) must refuse a second link"
    );
    let run = |id: &str, status: &str| {
        format!(
            "INSERT INTO sync_runs (id, storage_id, kind, status, queued_at) VALUES ('{id}', 1, 'import', '{status}', {now})"
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
    // Deleting the project cascades to everything under it.
    db.execute_unprepared("DELETE FROM projects WHERE id = 1")
        .await
        .expect("delete project");
    for table in ["storages", "tasks", "import_links", "sync_runs"] {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .expect("count")
            .expect("row");
        let n: i64 = row.try_get("", "n").expect("n");
        assert_eq!(n, 0, "{table} not emptied by the cascade");
    }
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
