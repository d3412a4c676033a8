//! Database access: connection, migrations, entities and the queries the
//! pipelines need. Entities in [`entities`] are plain table definitions; the
//! behaviour lives in the sibling modules.
pub mod admission;
pub mod annotations;
pub mod audit;
pub mod batches;
pub mod change_counters;
pub mod entities;
pub mod exports;
pub mod idempotency;
pub mod links;
pub mod missing;
pub mod outbox;
pub mod partitions;
pub mod projects;
pub mod run_retention;
pub mod runs;
pub mod storages;
pub mod tasks;
pub mod tokens;
pub mod webhooks;
pub mod workers;

use std::time::Duration;

use labelsync_migrations::{Migrator, MigratorTrait};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select, Statement,
};

use crate::Result;

/// Whether `at` compares the same on both databases: years 0 to 9999.
/// SQLite compares timestamps as text, and chrono writes other years with
/// a sign (`+10000-...`, `-0001-...`), which sorts before every digit: a
/// token expiring in the year 10000 was expired there for ever.
pub fn comparable_everywhere(at: chrono::DateTime<chrono::Utc>) -> bool {
    use chrono::Datelike;
    (0..=9999).contains(&at.year())
}

/// The file a SQLite `url` names when it does not exist (`None` for a
/// Postgres URL, or a file that is there): for commands that must not
/// make a new database where they were meant to find the servers' one.
pub fn missing_sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    if !url.starts_with("sqlite") {
        return None;
    }
    let options = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    (!path.exists()).then(|| path.to_owned())
}

/// Opens the pool. SQLite gets WAL and a busy timeout so the API and the
/// in-process workers can write to one file without "database is locked".
/// Postgres connections plan every statement afresh (see [`point_pool`]).
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    let db = open(url, "force_custom_plan", 16, 0, "labelsync", ACQUIRE).await?;
    sync_clock(&db).await;
    Ok(db)
}

/// [`connect`] for the scheduler, whose pool serves the API: on Postgres a
/// request waits at most [`API_ACQUIRE`] for a connection, then is `503
/// unavailable`. sqlx tries to connect again until a pool's acquire timeout
/// while the server refuses connections (down, or at its
/// `max_connections`), so during an outage every request hung for
/// [`ACQUIRE`]. On SQLite, [`ACQUIRE`]: the pool is the embedded worker's
/// too, whose writers each wait up to 30 s for the file's write lock
/// holding a connection.
pub async fn connect_api(url: &str) -> Result<DatabaseConnection> {
    let acquire = if url.starts_with("sqlite") {
        ACQUIRE
    } else {
        API_ACQUIRE
    };
    let db = open(url, "force_custom_plan", 16, 0, "labelsync", acquire).await?;
    sync_clock(&db).await;
    Ok(db)
}

/// How long a statement waits for a pool's connection, but the API's.
const ACQUIRE: Duration = Duration::from_secs(30);

/// How long an API request waits for a connection on Postgres (see
/// [`connect_api`]): far above a busy pool's queue (milliseconds under 64
/// clients), far below a client's own timeout.
const API_ACQUIRE: Duration = Duration::from_secs(5);

/// [`connect`] for a worker with `slots` job slots: the pool keeps a
/// connection per slot and two more (the heartbeats) open from the start,
/// up to its 16. Opened on demand, a fresh worker's first batches each
/// waited for a new Postgres backend (a fork and its catalog caches:
/// milliseconds of the database's CPU apiece, all at once, while every
/// other batch of the run was starting too); an idle pool also let them go
/// after ten minutes. A server that cannot give that many within
/// [`KEEP_WITHIN`] (near its `max_connections`: sqlx would retry until its
/// acquire timeout) still gets a worker that opens them on demand, as
/// before, rather than one that cannot start.
pub async fn connect_worker(url: &str, slots: usize) -> Result<DatabaseConnection> {
    let kept = u32::try_from(slots.saturating_add(2))
        .unwrap_or(u32::MAX)
        .min(WORKER_POOL);
    let name = "labelsync-worker";
    let warm = open(url, "force_custom_plan", WORKER_POOL, kept, name, ACQUIRE);
    let why = match tokio::time::timeout(KEEP_WITHIN, warm).await {
        Ok(Ok(db)) => {
            warm_up(&db, kept as usize).await;
            // On a connection kept open: not one more beside them.
            sync_clock(&db).await;
            return Ok(db);
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("not all open within {KEEP_WITHIN:?}"),
    };
    tracing::warn!(error = %why, kept, "cannot keep a database connection per job slot open; opening them as jobs need them");
    let db = open(url, "force_custom_plan", WORKER_POOL, 0, name, ACQUIRE).await?;
    sync_clock(&db).await;
    Ok(db)
}

/// The pool of a worker run inside the scheduler (`LABELSYNC_EMBEDDED_WORKERS`
/// or the embedded mode), `slots` job slots. On Postgres, one of its own,
/// as a worker process has ([`connect_worker`]): sharing the API's, an
/// import's commits (two per object, up to 64 objects read at once) took
/// every connection, and API requests queued behind them for up to the
/// pool's 30 s acquire timeout. On SQLite, `db` itself (one writer at a
/// time whatever the pools).
pub async fn worker_pool(
    db: &DatabaseConnection,
    url: &str,
    slots: usize,
) -> Result<DatabaseConnection> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(db.clone());
    }
    connect_worker(url, slots).await
}

/// Runs a fan-out batch job's statements once on each of the `kept`
/// connections, all held at once, in transactions rolled back. A Postgres
/// backend reads a table's and its indexes' catalog entries on its first
/// statement over them, and sqlx prepares each statement once per
/// connection: on a fresh worker every slot paid both at once, while a
/// run's whole first wave of batches was starting on every worker, and a
/// batch took 15-40 ms from its job to its first read instead of 1-2.
/// Best effort, within [`KEEP_WITHIN`]: a failure (a database not
/// migrated yet) is only logged.
async fn warm_up(db: &DatabaseConnection, kept: usize) {
    if db.get_database_backend() != DbBackend::Postgres || kept == 0 {
        return;
    }
    let warm = async {
        // Every connection held at once, so that each one is warmed; one
        // that cannot begin drops the others at once.
        let begins = (0..kept).map(|_| sea_orm::TransactionTrait::begin(db));
        let txns = futures::future::try_join_all(begins).await?;
        futures::future::try_join_all(txns.into_iter().map(warm_one)).await?;
        Ok::<_, crate::Error>(())
    };
    let failed = match tokio::time::timeout(KEEP_WITHIN, warm).await {
        Ok(warmed) => warmed.err().map(|e| e.to_string()),
        Err(_) => Some(format!("not done within {KEEP_WITHIN:?}")),
    };
    if let Some(error) = failed {
        tracing::warn!(%error, "worker connections not warmed up");
    }
}

/// [`warm_up`]'s statements on one connection, on ids that do not exist:
/// those a batch job starts and ends with, and its tables' others.
async fn warm_one(txn: sea_orm::DatabaseTransaction) -> Result<()> {
    use sea_orm::EntityTrait;
    let _ = runs::get(&txn, "").await;
    let _ = runs::owners(&txn, -1).await;
    entities::project::Entity::find_by_id(-1).one(&txn).await?;
    batches::count_attempt(&txn, -1, Some(crate::clock::now())).await?;
    batches::mark_done(&txn, -1, "").await?;
    runs::checkpoint(&txn, "", &runs::Counters::default(), None, None).await?;
    tasks::warm_up(&txn).await?;
    for table in ["tasks", "import_links", "object_errors"] {
        let probe = format!("SELECT 1 FROM {table} WHERE id = -1");
        txn.execute_unprepared(&probe).await?;
    }
    txn.rollback().await?;
    Ok(())
}

/// How long a worker waits for its kept connections (see [`connect_worker`]).
const KEEP_WITHIN: Duration = Duration::from_secs(5);

/// Connections in a worker's pool (as in [`connect`]'s).
const WORKER_POOL: u32 = 16;

/// The scheduler's second pool on Postgres (8 connections), for the API's
/// point statements: one row by key, the same shape every time, such as an
/// annotation save (`annotations::create_recorded`). Its connections keep
/// Postgres' own plan caching, which [`connect`]'s turn off: the plans of
/// these statements cannot go stale as a table grows, and planning them
/// and their foreign-key checks on every call is what made planning about
/// 40% of Postgres' CPU under 64 clients saving annotations (see
/// docs/DECISIONS.md, "A second pool for point statements").
/// On SQLite, `db` itself. A request waits for a connection as on
/// [`connect_api`]'s pool.
pub async fn point_pool(db: &DatabaseConnection, url: &str) -> Result<DatabaseConnection> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(db.clone());
    }
    open(url, "auto", 8, 0, "labelsync", API_ACQUIRE).await
}

/// A pool of at most `size` connections, `kept` of them open at all times,
/// shown to Postgres as `application_name` (Postgres only: so ops can tell
/// in `pg_stat_activity` whose connections they are), whose statements
/// wait at most `acquire` for a connection.
async fn open(
    url: &str,
    plan_cache_mode: &'static str,
    size: u32,
    kept: u32,
    application_name: &'static str,
    acquire: Duration,
) -> Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new(url.to_owned());
    // sea-orm's connect timeout is sqlx's acquire timeout: one setting.
    opts.sqlx_logging(false).acquire_timeout(acquire);
    if url.starts_with("sqlite") {
        opts.max_connections(8).map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
        });
    } else {
        let loopback_plain = is_loopback_without_sslmode(url);
        opts.max_connections(size)
            .min_connections(kept)
            .map_sqlx_postgres_opts(move |o| {
                // Generic plans made while the link table was small kept
                // seq-scanning it: see docs/DECISIONS.md (force_custom_plan on
                // every connection). No JIT: it compiled a page's link lookup
                // for 5-10 ms to run it in 4 (docs/DECISIONS.md, No JIT).
                let mut o = o.options([("plan_cache_mode", plan_cache_mode), ("jit", "off")]);
                // One the URL (or PGAPPNAME) gives wins.
                if o.get_application_name().is_none() {
                    o = o.application_name(application_name);
                }
                // TLS to a loopback server protects nothing and costs a delayed
                // ACK per large statement: see docs/DECISIONS.md (No TLS to a
                // loopback Postgres).
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

/// Measures how far the database's clock is from this machine's (see
/// [`crate::clock`]): a Postgres server's time read between two of ours,
/// taken as read at their middle, on a connection taken first (a wait for
/// one is no part of the measure). A read whose round trip took longer
/// than [`CLOCK_READ_LIMIT`] tells too little, and is dropped, as a failed
/// read is: the last measure stays. SQLite is this process's own file:
/// its clock is ours.
pub async fn sync_clock(db: &DatabaseConnection) {
    use chrono::{DateTime, Utc};
    use sea_orm::TransactionTrait;
    if db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    let Ok(txn) = db.begin().await else {
        tracing::debug!("the database's clock could not be read; the last measure stays");
        return;
    };
    let sent = Utc::now();
    let read = txn
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT clock_timestamp() AS now",
        ))
        .await;
    let received = Utc::now();
    let _ = txn.rollback().await;
    let Ok(Some(row)) = read else {
        return;
    };
    let Ok(theirs) = row.try_get::<DateTime<Utc>>("", "now") else {
        return;
    };
    if (received - sent).to_std().unwrap_or(Duration::MAX) > CLOCK_READ_LIMIT {
        tracing::debug!(
            round_trip_ms = (received - sent).num_milliseconds(),
            "a read of the database's clock took too long to be used; the last measure stays"
        );
        return;
    }
    let half_trip = (received - sent) / 2;
    let mut offset = theirs - (sent + half_trip);
    // What the measure cannot tell apart: clocks that agree within it
    // agree (a machine measuring its own database, or one in step, takes
    // no offset that a next measure reverses), and a measure within it of
    // the last one changes nothing (the offset does not wobble).
    let noise = half_trip + CLOCKS_AGREE;
    if offset.abs() <= noise {
        offset = chrono::Duration::zero();
    }
    if (offset - crate::clock::offset()).abs() <= noise {
        return;
    }
    if offset.abs() > chrono::Duration::seconds(1) {
        tracing::warn!(
            offset_ms = offset.num_milliseconds(),
            "this machine's clock is off the database's; leases and heartbeats keep the database's time"
        );
    }
    crate::clock::set_offset(offset);
}

/// The longest round trip a read of the database's clock may take to be
/// used: half of it is the most the measure can be wrong by.
const CLOCK_READ_LIMIT: Duration = Duration::from_millis(250);

/// An offset from the database's clock this small (beyond half the read's
/// round trip) is none: leases and heartbeats are seconds long.
const CLOCKS_AGREE: chrono::Duration = chrono::Duration::milliseconds(50);

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
/// SQLite), so keyset pages over a table that grew in bulk are not planned as
/// if it were tiny: see docs/DECISIONS.md (ANALYZE at the start of an export).
pub async fn refresh_stats(db: &DatabaseConnection, tables: &[&str]) -> Result<()> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("ANALYZE {}", tables.join(", ")))
            .await?;
    }
    Ok(())
}

/// A new row id for tables whose id order is creation order (runs, webhook
/// events): a ULID that sorts after every id this process made before, even
/// within one millisecond (a plain `Ulid::new()` draws its low bits at
/// random, so two runs queued in the same millisecond could be admitted, or
/// two events listed, in the opposite order). Across processes the order is
/// the clocks' order, to the millisecond.
pub fn new_id() -> ulid::Ulid {
    static GENERATOR: std::sync::Mutex<ulid::Generator> =
        std::sync::Mutex::new(ulid::Generator::new());
    let mut generator = GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Fails only when this millisecond's random start has been counted up
    // to 2^80 - 1 (not reachable in practice); the id is then a random one,
    // unordered within that millisecond.
    generator.generate().unwrap_or_else(|_| ulid::Ulid::new())
}

pub fn is_sqlite(db: &DatabaseConnection) -> bool {
    db.get_database_backend() == DbBackend::Sqlite
}

/// Largest number of bound parameters one statement may carry on either
/// backend (SQLite's default limit is 32766, Postgres' 65535).
pub const MAX_PARAMS: usize = 30_000;

/// Up to `limit` rows of `rows` with ids above `after`, in id order,
/// stopping before the row that would take the JSON text of its `json`
/// columns past `budget` bytes (the first always comes); `true` when cut
/// so. The sizes are measured in the database first (ids and sizes only),
/// so the rows left out are neither sent nor read: a list of large things
/// (tasks, annotations) costs the budget, not `limit` times the largest.
pub async fn page_within<E: EntityTrait>(
    db: &DatabaseConnection,
    rows: Select<E>,
    (id, after): (E::Column, Option<i64>),
    json: &[&str],
    limit: u64,
    budget: usize,
) -> Result<(Vec<E::Model>, bool)> {
    let rows = match after {
        Some(after) => rows.filter(id.gt(after)),
        None => rows,
    }
    .order_by_asc(id);
    let sizes: Vec<(i64, i64)> = rows
        .clone()
        .limit(limit)
        .select_only()
        .column(id)
        .column_as(json_text_bytes(db, json), "bytes")
        .into_tuple()
        .all(db)
        .await?;
    let (Some(last), cut) = last_within(&sizes, budget) else {
        return Ok((Vec::new(), false));
    };
    // At most `limit` again: a row committed since with an id below `last`
    // was not measured.
    let page = rows.filter(id.lte(last)).limit(limit).all(db).await?;
    Ok((page, cut))
}

/// The bytes the JSON `columns` of a row take as text, summed (NULL as
/// 0), in `db`'s dialect: what the row costs an answer, measured without
/// sending it (Postgres renders each value; SQLite keeps JSON as text).
pub(super) fn json_text_bytes(
    db: &DatabaseConnection,
    columns: &[&str],
) -> sea_orm::sea_query::SimpleExpr {
    let postgres = db.get_database_backend() == DbBackend::Postgres;
    let each: Vec<String> = columns
        .iter()
        .map(|column| match postgres {
            true => format!("coalesce(octet_length({column}::text), 0)"),
            false => format!("coalesce(length(CAST({column} AS BLOB)), 0)"),
        })
        .collect();
    sea_orm::sea_query::Expr::cust(format!("CAST({} AS BIGINT)", each.join(" + ")))
}

/// Of rows' `(id, bytes)` in id order, the id of the last within `budget`
/// bytes in all (the first always counts), and whether rows were left out.
fn last_within(rows: &[(i64, i64)], budget: usize) -> (Option<i64>, bool) {
    let mut used = 0usize;
    let mut last = None;
    for &(id, bytes) in rows {
        let bytes = usize::try_from(bytes).unwrap_or(0);
        if last.is_some() && used.saturating_add(bytes) > budget {
            return (last, true);
        }
        used = used.saturating_add(bytes);
        last = Some(id);
    }
    (last, false)
}

#[cfg(test)]
mod tests {
    /// Thousands of ids in a few milliseconds still sort in the order they
    /// were made (`Ulid::new()` fails this: its low bits are random).
    #[test]
    fn ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..20_000).map(|_| super::new_id().to_string()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    /// A page takes rows while they fit the budget, the first always, and
    /// says when it left some out.
    #[test]
    fn a_page_ends_at_its_budget() {
        use super::last_within;
        assert_eq!(last_within(&[], 10), (None, false));
        assert_eq!(last_within(&[(1, 50)], 10), (Some(1), false));
        assert_eq!(last_within(&[(1, 4), (2, 6), (3, 1)], 10), (Some(2), true));
        assert_eq!(last_within(&[(1, 4), (2, 6)], 10), (Some(2), false));
        assert_eq!(
            last_within(&[(5, 3), (9, -1), (12, 20)], 10),
            (Some(9), true)
        );
    }
}
