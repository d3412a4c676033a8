//! Database access: connection, migrations, entities and the queries the
//! pipelines need. Entities in [`entities`] are plain table definitions; the
//! behaviour lives in the sibling modules.
pub mod batches;
pub mod entities;
pub mod links;
pub mod outbox;
pub mod runs;

use std::time::Duration;

use labelsync_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};

use crate::Result;

/// Opens the pool. SQLite gets WAL and a busy timeout so the API and the
/// in-process workers can write to one file without "database is locked".
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30));
    if url.starts_with("sqlite") {
        opts.max_connections(8).map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
        });
    } else {
        let loopback_plain = is_loopback_without_sslmode(url);
        opts.max_connections(16).map_sqlx_postgres_opts(move |o| {
            // The link table grows from empty during a sync; a generic plan made
            // while it was small keeps seq-scanning it (measured: 500 ms per
            // page-dedup query at 20k links, 5 ms with a custom plan).
            let o = o.options([("plan_cache_mode", "force_custom_plan")]);
            // sqlx 0.9.0 no longer sets TCP_NODELAY (sqlx issue #4335), so a
            // statement larger than one TLS record waits ~40 ms for a delayed
            // ACK. TLS to a loopback server protects nothing: skip it there
            // unless the URL asks for it.
            if loopback_plain {
                o.ssl_mode(sea_orm::sqlx::postgres::PgSslMode::Disable)
            } else {
                o
            }
        });
    }
    let db = Database::connect(opts).await?;
    Ok(db)
}

fn is_loopback_without_sslmode(url: &str) -> bool {
    use std::str::FromStr;
    if url.contains("sslmode=") {
        return false;
    }
    sea_orm::sqlx::postgres::PgConnectOptions::from_str(url)
        .map(|o| matches!(o.get_host(), "localhost" | "127.0.0.1" | "::1" | "[::1]"))
        .unwrap_or(false)
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<()> {
    Migrator::up(db, None).await?;
    Ok(())
}

/// True when the database answers a trivial query (for `/readyz`).
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.execute_unprepared("SELECT 1").await.is_ok()
}

/// The migrations this binary has that the database has not applied (for
/// `/readyz`: with `LABELSYNC_RUN_MIGRATIONS=false` a new pod must not take
/// work before the migration Job is done). Migrations the database has and
/// this binary does not (an older pod during a rolling update) do not count.
pub async fn pending_migrations(db: &DatabaseConnection) -> Result<Vec<String>> {
    let applied: std::collections::HashSet<String> = match db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT version FROM seaql_migrations",
        ))
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|row| row.try_get::<String>("", "version"))
            .collect::<Result<_, _>>()?,
        // No migration table yet: nothing is applied. Any other failure
        // (the server is down) is the caller's to report.
        Err(err) if ping(db).await => {
            tracing::debug!(%err, "no migration table");
            Default::default()
        }
        Err(err) => return Err(err.into()),
    };
    Ok(Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .filter(|name| !applied.contains(name))
        .collect())
}

/// Begins a transaction that will write. On SQLite it takes the write lock at
/// BEGIN (IMMEDIATE): a deferred transaction that reads first and writes later
/// fails with SQLITE_BUSY_SNAPSHOT when another connection (the run's
/// heartbeat) wrote in between, and busy_timeout cannot help there.
pub async fn begin_write(db: &DatabaseConnection) -> Result<sea_orm::DatabaseTransaction> {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    Ok(db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await?)
}

/// Refreshes the planner's statistics of `tables` (Postgres; a no-op on
/// SQLite). Keyset pages over a table that grew in bulk since its last
/// ANALYZE get planned as if it were tiny (a bitmap scan and a sort of every
/// remaining row, per page) when autovacuum is off or has not come round yet:
/// measured 48 ms instead of 2 ms per page of 1,000 annotations at 100k.
pub async fn refresh_stats(db: &DatabaseConnection, tables: &[&str]) -> Result<()> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("ANALYZE {}", tables.join(", ")))
            .await?;
    }
    Ok(())
}

pub fn is_sqlite(db: &DatabaseConnection) -> bool {
    db.get_database_backend() == DbBackend::Sqlite
}

/// Largest number of bound parameters one statement may carry on either
/// backend (SQLite's default limit is 32766, Postgres' 65535).
pub const MAX_PARAMS: usize = 30_000;
