//! The command line: `serve` (default), `migrate`, and `sync --spec FILE`,
//! which runs one sync in this process through the same job code the workers
//! run, with a progress bar, and prints the finished run as JSON.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use labelsync::{
    config::Settings,
    db::{
        self,
        entities::storage,
        projects,
        runs::{self, RunStatus},
        storages,
    },
    jobs::{self, JobContext, RetryLater},
    storage::{
        Filter, ListOptions, StorageEnv,
        spec::{StorageSpec, ValidSpec},
    },
};
use sea_orm::DatabaseConnection;

#[derive(Debug, Parser)]
#[command(
    name = "labelsync-scheduler",
    version,
    about = "labelsync scheduler: HTTP API, periodic syncs, one-shot syncs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and, without REDIS_URL, run the workers in-process).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Run one sync in this process and print the finished run as JSON.
    Sync {
        /// A storage create body (docs/API.md) with "project": {"title", "data_key"}
        /// in place of "project_id".
        #[arg(long)]
        spec: PathBuf,
        /// Do not draw a progress bar even on a terminal.
        #[arg(long)]
        quiet: bool,
    },
    /// List what a sync of this spec would see, writing nothing: prints
    /// `{"listed", "matched", "seconds", "first_keys"}`.
    List {
        /// A spec file as for `sync`.
        #[arg(long)]
        spec: PathBuf,
    },
    /// Seal every stored secret that only a LABELSYNC_SECRET_KEY_FALLBACKS
    /// key opens again under LABELSYNC_SECRET_KEY (run it once every
    /// scheduler and worker has that key), and drop webhooks' previous
    /// secrets whose time is up; prints `{"key_id", "current", "resealed",
    /// "fallback", "unopenable", "unopenable_in", "expired_dropped"}` and
    /// exits 0 when every secret opens under the key alone (the fallbacks
    /// can go), 1 when not.
    Reseal {
        /// Refuse, writing nothing, unless LABELSYNC_SECRET_KEY has this id
        /// (the first 16 hex digits of the SHA-256 of its bytes:
        /// `printf %s "$KEY" | base64 -d | sha256sum | cut -c1-16`), so
        /// that a process still on the old settings seals nothing.
        #[arg(long)]
        expect_key_id: Option<String>,
    },
    /// Manage API tokens (kept in the database).
    #[command(subcommand)]
    Token(crate::token_cli::TokenCommand),
}

pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = labelsync::http::listen(settings.bind)
                .with_context(|| format!("cannot bind {}", settings.bind))?;
            crate::app::serve(settings, listener, labelsync::lifecycle::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let db = db::connect(&settings.database_url).await?;
            db::migrate(&db).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync { spec, quiet } => sync(settings, &spec, quiet).await,
        Command::List { spec } => list(settings, &spec).await,
        Command::Reseal { expect_key_id } => reseal(settings, expect_key_id).await,
        Command::Token(command) => crate::token_cli::run(settings, command).await,
    }
}

/// One re-seal pass (`labelsync::reseal`), its tally printed as JSON.
async fn reseal(settings: Settings, expect_key_id: Option<String>) -> anyhow::Result<ExitCode> {
    let Some(secrets) = settings.secret_box.clone() else {
        bail!(
            "reseal needs LABELSYNC_SECRET_KEY (and the old key in LABELSYNC_SECRET_KEY_FALLBACKS)"
        );
    };
    if let Some(expected) = expect_key_id
        && expected.trim() != secrets.key_id()
    {
        bail!(
            "LABELSYNC_SECRET_KEY here has the id {}, not {}: this process has other settings (a pod of an earlier rollout?); nothing was written",
            secrets.key_id(),
            expected.trim()
        );
    }
    let db = crate::token_cli::open_servers_database(&settings).await?;
    let tally = labelsync::reseal::pass(&db, &secrets, labelsync::reseal::Mode::Reseal).await?;
    println!("{}", serde_json::to_string(&tally)?);
    Ok(if tally.settled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads and validates a spec file.
async fn read_spec(
    settings: &Settings,
    path: &std::path::Path,
) -> anyhow::Result<(StorageSpec, ValidSpec, StorageEnv)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let spec = StorageSpec::from_json(value)
        .with_context(|| format!("{} is not a valid storage spec", path.display()))?;
    let env = StorageEnv::from_settings(settings);
    let valid = spec.validate(&env).await?;
    Ok((spec, valid, env))
}

/// The listing alone, through the same backend and filter a sync uses (so
/// its time is the floor a sync of the storage can reach).
async fn list(settings: Settings, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (spec, valid, env) = read_spec(&settings, path).await?;
    let model = spec.to_model(0, &valid);
    let secrets = valid.secrets.clone().unwrap_or_default();
    let backend = labelsync::storage::open_with(valid.kind, &valid.config, &secrets, &env).await?;
    let filter = Filter::from_storage(&model)?;
    let started = std::time::Instant::now();
    let mut pages = backend.list(ListOptions {
        prefix: model.prefix.clone(),
        recursive: model.recursive,
        start_after: None,
        page_size: settings.worker.page_size,
    });
    let (mut listed, mut matched, mut first_keys) = (0u64, 0u64, Vec::new());
    while let Some(page) = pages.next().await {
        for object in page?.objects {
            listed += 1;
            if filter.matches(&object.key) {
                matched += 1;
                if first_keys.len() < 10 {
                    first_keys.push(object.key);
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "listed": listed, "matched": matched, "seconds": seconds, "first_keys": first_keys })
    );
    Ok(ExitCode::SUCCESS)
}

async fn sync(settings: Settings, path: &std::path::Path, quiet: bool) -> anyhow::Result<ExitCode> {
    let (spec, valid, env) = read_spec(&settings, path).await?;

    let db = db::connect(&settings.database_url).await?;
    if settings.run_migrations {
        db::migrate(&db).await?;
    }
    let project_id = match (&spec.project, spec.project_id) {
        (Some(p), None) => find_or_create_project(&db, &p.title, &p.data_key).await?,
        (None, Some(id)) => existing_project(&db, id).await?,
        _ => bail!(
            "the spec needs exactly one of \"project\" {{\"title\", \"data_key\"}} or \"project_id\""
        ),
    };
    let storage = find_or_create_storage(&db, &spec, project_id, &valid, &env).await?;
    let kind = jobs::run_kind(&storage);
    let (run, already) = runs::create_or_get_live(&db, storage.id, kind).await?;
    // A live run is resumed here unless an attempt still holds it (a worker,
    // or another CLI): a CLI killed mid-sync leaves a run the next one finishes.
    let w = &settings.worker;
    let lease_ttl = chrono::Duration::from_std(w.heartbeat * w.missed_heartbeats.max(1) as u32)
        .unwrap_or_default();
    let held = run.lease_owner.is_some()
        && run
            .lease_at
            .is_some_and(|at| labelsync::clock::now() - at < lease_ttl);
    if already && held {
        bail!(
            "storage {} has a run in progress elsewhere ({})",
            storage.id,
            run.id
        );
    }

    let bar = progress_bar(quiet);
    let watcher = tokio::spawn(watch_progress(db.clone(), run.id.clone(), bar.clone()));
    // No queue: Tasks-mode objects are imported in this process, not fanned out.
    let ctx = JobContext::new(db.clone(), settings, None);
    let mut backoff = Duration::from_millis(500);
    // Transient failures are retried here as the queue would, with our attempt limit.
    loop {
        match jobs::execute(&ctx, &run.id).await {
            Ok(()) => break,
            Err(RetryLater(err)) => {
                bar.println(format!("retrying after: {err}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    watcher.abort();
    let run = runs::get(&db, &run.id).await?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&runs::to_json(&run))?);
    match RunStatus::parse(&run.status) {
        Some(RunStatus::Completed | RunStatus::CompletedWithErrors) => Ok(ExitCode::SUCCESS),
        _ => {
            eprintln!(
                "sync {}: {}",
                run.status,
                run.error.as_deref().unwrap_or("no error recorded")
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The spec's `project_id`, checked first: a missing project would
/// otherwise surface as the database's foreign-key error on the storage.
async fn existing_project(db: &DatabaseConnection, id: i64) -> anyhow::Result<i64> {
    match projects::find(db, id).await? {
        Some(p) => Ok(p.id),
        None => bail!(
            "project {id} does not exist in this database (DATABASE_URL): create it first (POST /api/v1/projects), or give \"project\": {{\"title\", \"data_key\"}} in the spec instead of \"project_id\""
        ),
    }
}

async fn find_or_create_project(
    db: &DatabaseConnection,
    title: &str,
    data_key: &str,
) -> anyhow::Result<i64> {
    if let Some(p) = projects::find_titled(db, title).await? {
        return Ok(p.id);
    }
    if !projects::is_valid_data_key(data_key) {
        bail!("the spec's project: {}", projects::DATA_KEY_RULE);
    }
    let p = projects::create(db, title, data_key).await?;
    Ok(p.id)
}

/// The project's storage with the same role, backend and title, updated to the
/// spec; or a new one.
async fn find_or_create_storage(
    db: &DatabaseConnection,
    spec: &StorageSpec,
    project_id: i64,
    valid: &ValidSpec,
    env: &StorageEnv,
) -> anyhow::Result<storage::Model> {
    let existing = storages::find_titled(
        db,
        project_id,
        spec.role.as_str(),
        valid.kind.as_str(),
        &spec.title,
    )
    .await?;
    Ok(labelsync::storage::spec::save(db, spec, valid, project_id, existing.as_ref(), env).await?)
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    // Draws on stderr only when it is a terminal; stdout stays the JSON result.
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn watch_progress(db: DatabaseConnection, run_id: String, bar: ProgressBar) {
    loop {
        if let Ok(run) = runs::get(&db, &run_id).await {
            bar.set_message(format!(
                "{}: listed {} matched {} created {} existed {} failed {}",
                run.status, run.listed, run.matched, run.created, run.existed, run.failed
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
