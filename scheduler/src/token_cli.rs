//! `labelsync-scheduler token create|list|revoke`: token management from a
//! shell, on the same database the servers read (so it works before any
//! token exists, and a revocation holds at once on every replica).
use std::process::ExitCode;

use anyhow::{Context, bail};
use labelsync::{
    config::Settings,
    db::{
        self, audit,
        tokens::{self, NewToken},
    },
    security::tokens::{Scope, expiry_after},
};
use sea_orm::DatabaseConnection;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints its secret alone on the first line of stdout
    /// (shown this once, never stored), then the token as JSON.
    Create {
        /// Who or what holds it (shown in lists and audit rows).
        #[arg(long)]
        name: String,
        /// admin, write, read or ops.
        #[arg(long)]
        scope: String,
        /// A project the token is held to (repeat for several); none: all.
        #[arg(long = "project")]
        projects: Vec<i64>,
        /// Lifetime such as 90d, 12h or 30m; none: until revoked.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List every token as JSON lines (never secrets).
    List,
    /// Revoke a token by id, or by name when one live token has it.
    Revoke {
        /// The token's id or name.
        token: String,
    },
}

pub async fn run(settings: Settings, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let db = open_servers_database(&settings).await?;
    match command {
        TokenCommand::Create {
            name,
            scope,
            projects,
            expires,
        } => create(&db, name, &scope, projects, expires.as_deref()).await,
        TokenCommand::List => list(&db).await,
        TokenCommand::Revoke { token } => revoke(&db, &token).await,
    }
}

/// Opens the database the servers use. Never a new SQLite file: with
/// `DATABASE_URL` unset (a shell in the wrong container) a token went into
/// a new `./labelsync.db` that no server reads, and the command said it
/// worked. Migrated only where `LABELSYNC_RUN_MIGRATIONS` lets servers
/// migrate: a newer CLI must not migrate a database its fleet still runs
/// on when migrations are a step of their own.
pub(crate) async fn open_servers_database(
    settings: &Settings,
) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = db::missing_sqlite_file(&settings.database_url) {
        bail!(
            "there is no database at {} (DATABASE_URL names it, or is unset): set DATABASE_URL to the servers' database, or run `labelsync-scheduler migrate` first to make a new one",
            path.display()
        );
    }
    let db = db::connect(&settings.database_url)
        .await
        .context("cannot open the database (DATABASE_URL)")?;
    if settings.run_migrations {
        db::migrate(&db).await.context("migrations failed")?;
    }
    Ok(db)
}

async fn create(
    db: &DatabaseConnection,
    name: String,
    scope: &str,
    projects: Vec<i64>,
    expires: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let Some(scope) = Scope::parse(scope) else {
        bail!("--scope must be one of admin, write, read, ops (got {scope:?})");
    };
    let expires_at = match expires {
        Some(text) => match expiry_after(text, labelsync::clock::now()) {
            Some(at) => Some(at),
            None => {
                bail!(
                    "--expires must be a lifetime such as 90d, 12h, 30m or 3600s, ending before the year 262143 (got {text:?})"
                )
            }
        },
        None => None,
    };
    let new = NewToken {
        name,
        scope,
        projects: (!projects.is_empty()).then_some(projects),
        expires_at,
    };
    tokens::check(db, &new).await?;
    let txn = db::begin_write(db).await?;
    let (model, secret) = tokens::create(&txn, new).await?;
    audit_cli(&txn, "create", model.id, 201).await?;
    txn.commit().await?;
    // The secret alone on the first line, so `| head -1` captures it.
    println!("{secret}");
    println!("{}", tokens::to_json(&model));
    Ok(ExitCode::SUCCESS)
}

async fn list(db: &DatabaseConnection) -> anyhow::Result<ExitCode> {
    let mut after = None;
    loop {
        let rows = tokens::page(db, after, 1000).await?;
        for token in &rows {
            println!("{}", tokens::to_json(token));
        }
        match rows.last() {
            Some(last) if rows.len() == 1000 => after = Some(last.id),
            _ => return Ok(ExitCode::SUCCESS),
        }
    }
}

async fn revoke(db: &DatabaseConnection, which: &str) -> anyhow::Result<ExitCode> {
    let id = match which.parse::<i64>() {
        Ok(id) => id,
        Err(_) => {
            let named = tokens::active_named(db, which).await?;
            match named.as_slice() {
                [one] => one.id,
                [] => bail!("no live token is named {which:?}"),
                _ => bail!(
                    "{} live tokens are named {which:?}; revoke one by id (token list)",
                    named.len()
                ),
            }
        }
    };
    let txn = db::begin_write(db).await?;
    let Some(token) = tokens::revoke(&txn, id).await? else {
        bail!("no token has id {id}");
    };
    audit_cli(&txn, "revoke", id, 204).await?;
    txn.commit().await?;
    println!("{}", tokens::to_json(&token));
    Ok(ExitCode::SUCCESS)
}

/// The audit row of a token change made from the shell (in its
/// transaction): the caller is `cli`, the route the command.
async fn audit_cli(
    txn: &impl sea_orm::ConnectionTrait,
    command: &str,
    token_id: i64,
    status: u16,
) -> anyhow::Result<()> {
    let entry = audit::Entry {
        at: labelsync::clock::now(),
        token_id: None,
        token_name: "cli".into(),
        method: "CLI".into(),
        route: format!("labelsync-scheduler token {command}"),
        path: String::new(),
        project_id: None,
        resource: serde_json::json!({ "token_id": token_id }),
        status,
        request_id: String::new(),
        client: None,
    };
    audit::record(txn, entry).await?;
    Ok(())
}
