//! A project's source storages as `/resolve` needs them, kept in memory so
//! that a resolve (one per image a labeler sees) reads no database row and
//! builds no storage client.
//!
//! Contract: an entry is used only while it is younger than
//! `LABELSYNC_RESOLVE_CACHE_SECS`, no change was seen since it was read,
//! and the change counter was read successfully within [`FOLLOW_STALE`].
//! Changes are seen two ways: this replica's own API handlers call
//! [`StorageCache::forget`] after committing, and [`follow_changes`] reads
//! the database's change counter (bumped in the same transaction as every
//! storage change, by any replica or the CLI) every second. While that read
//! fails (or before it first succeeds) nothing is served from memory, so
//! the one-second bound never silently becomes the TTL. A missing project
//! is never cached, so creating one needs no invalidation.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use labelsync::{
    Result,
    db::{change_counters, entities::storage, projects, storages},
    storage::{BackendKind, Role, Storage, StorageEnv},
};
use sea_orm::DatabaseConnection;
use tokio::sync::OnceCell;

/// More entries than this (project x backend) and expired ones are dropped;
/// if none had expired, all are.
const MAX_ENTRIES: usize = 10_000;

/// How often [`follow_changes`] reads the change counter.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Entries are not used once the counter's last successful read is older
/// than this (a few missed reads: the database is down or slow).
const FOLLOW_STALE: Duration = Duration::from_secs(3);

/// One source storage of a project, with its client opened on first use.
pub struct Source {
    pub model: storage::Model,
    /// The bucket / container / volume / local directory as URIs name it
    /// (`None`: the config names none, so no URI can match it).
    pub location: Option<String>,
    opened: OnceCell<Arc<dyn Storage>>,
}

impl Source {
    fn new(model: storage::Model, env: &StorageEnv) -> Self {
        let location = BackendKind::parse(&model.backend)
            .ok()
            .and_then(|kind| labelsync::storage::backend(kind).uri_location(&model.config, env));
        Source {
            model,
            location,
            opened: OnceCell::new(),
        }
    }

    /// The storage's client, opened once per cache entry (a failure is not
    /// kept: the next request tries again).
    pub async fn open(&self, env: &StorageEnv) -> Result<Arc<dyn Storage>> {
        self.opened
            .get_or_try_init(|| labelsync::storage::open(&self.model, env))
            .await
            .cloned()
    }
}

struct Entry {
    epoch: u64,
    loaded: Instant,
    sources: Arc<[Source]>,
}

/// See the module's contract. Cheap to share (`Arc`).
pub struct StorageCache {
    ttl: Duration,
    /// Moved on by every [`forget`](Self::forget); an entry read under an
    /// older epoch is never used, so a read racing a change cannot keep the
    /// old rows.
    epoch: AtomicU64,
    entries: Mutex<HashMap<(i64, BackendKind), Entry>>,
    /// Milliseconds after `born` of the counter's last successful read;
    /// 0 before the first.
    followed_ms: AtomicU64,
    born: Instant,
}

impl StorageCache {
    /// A cache keeping entries for `ttl` (zero: nothing is kept).
    pub fn new(ttl: Duration) -> Self {
        StorageCache {
            ttl,
            epoch: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
            followed_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Records a successful read of the change counter, now.
    fn followed(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.followed_ms.store(ms.max(1), Ordering::Release);
    }

    /// Whether the counter was read successfully within [`FOLLOW_STALE`].
    fn following(&self) -> bool {
        let at = self.followed_ms.load(Ordering::Acquire);
        at > 0 && self.born.elapsed() < Duration::from_millis(at) + FOLLOW_STALE
    }

    /// Drops the entries past their age (the follower's tick).
    fn sweep(&self) {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.keep_fresh(&mut self.lock(), epoch);
    }

    /// Keeps only the entries `fresh` would use (age and epoch).
    fn keep_fresh(&self, entries: &mut HashMap<(i64, BackendKind), Entry>, epoch: u64) {
        entries.retain(|_, e| e.epoch == epoch && e.loaded.elapsed() < self.ttl);
    }

    /// Drops every entry: a storage or project changed.
    pub fn forget(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.lock().clear();
    }

    /// The project's source storages of this backend, in id order; `None`
    /// when the project does not exist.
    pub async fn sources(
        &self,
        db: &DatabaseConnection,
        env: &StorageEnv,
        project_id: i64,
        kind: BackendKind,
    ) -> Result<Option<Arc<[Source]>>> {
        if let Some(sources) = self.fresh(project_id, kind) {
            return Ok(Some(sources));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let models =
            storages::of_project(db, project_id, Role::Source.as_str(), kind.as_str()).await?;
        // A storage's project exists (foreign key): only an empty answer
        // needs the project looked up.
        if models.is_empty() && projects::find(db, project_id).await?.is_none() {
            return Ok(None);
        }
        let sources: Arc<[Source]> = models.into_iter().map(|m| Source::new(m, env)).collect();
        self.store((project_id, kind), epoch, sources.clone());
        Ok(Some(sources))
    }

    fn fresh(&self, project_id: i64, kind: BackendKind) -> Option<Arc<[Source]>> {
        if !self.following() {
            return None;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let entries = self.lock();
        let entry = entries.get(&(project_id, kind))?;
        (entry.epoch == epoch && entry.loaded.elapsed() < self.ttl).then(|| entry.sources.clone())
    }

    fn store(&self, key: (i64, BackendKind), epoch: u64, sources: Arc<[Source]>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        // Checked under the lock `forget` clears under: a change seen since
        // the rows were read keeps them out.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            self.keep_fresh(&mut entries, epoch);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            key,
            Entry {
                epoch,
                loaded: Instant::now(),
                sources,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, BackendKind), Entry>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads the storages' change counter every second for as long as it runs,
/// and drops the cache whenever it moved: how a change made by another
/// replica or the CLI reaches this one. The first read drops the cache too
/// (entries read before it have no baseline to be checked against). While
/// reads fail the cache serves nothing (see [`FOLLOW_STALE`]).
pub async fn follow_changes(db: DatabaseConnection, cache: Arc<StorageCache>) {
    let mut seen = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match change_counters::read(&db, change_counters::STORAGES).await {
            Ok(now) => {
                if seen != Some(now) {
                    cache.forget();
                }
                seen = Some(now);
                cache.followed();
                cache.sweep();
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the storages' change counter; /resolve reads storages from the database until it can");
                }
                failing = true;
            }
        }
    }
}
