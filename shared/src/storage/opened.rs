//! Backends opened for saved storages, kept for the process's next jobs.
//!
//! A Tasks-mode run hands its objects to the fleet in batches, and each
//! batch (and each listing partition) opened its storage afresh: a new
//! client, new credentials and a new connection pool, so the batch's first
//! round of reads each made a new connection. Now a worker keeps what it
//! opened, per storage, while the row's backend, config and sealed secrets
//! stay the same (any change to them opens a new one) and for at most
//! [`MAX_AGE`], so credentials and resolved endpoints are not held longer
//! than a job's worth of time.
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Storage, StorageEnv};
use crate::{Result, db::entities::storage};

/// How long an opened backend is reused.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Storages kept at most; past that the cache starts over.
const MAX_ENTRIES: usize = 256;

/// The cache; clones share it.
#[derive(Clone, Default)]
pub struct Opened(Arc<Mutex<HashMap<i64, Entry>>>);

struct Entry {
    /// What the backend was opened from (see [`inputs`]).
    inputs: String,
    at: Instant,
    backend: Arc<dyn Storage>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("Opened").field("kept", &kept).finish()
    }
}

/// Everything [`super::open`] reads from the row: equal inputs open an
/// equal backend.
fn inputs(model: &storage::Model) -> String {
    format!(
        "{}\n{}\n{}",
        model.backend,
        model.config,
        model.secrets.as_deref().unwrap_or_default()
    )
}

/// The backend of `model`: the one this process opened for it lately, or a
/// new one (then kept).
pub async fn open_shared(model: &storage::Model, env: &StorageEnv) -> Result<Arc<dyn Storage>> {
    let key = inputs(model);
    if let Some(backend) = env.opened.get(model.id, &key) {
        return Ok(backend);
    }
    let backend = super::open(model, env).await?;
    env.opened.put(model.id, key, backend.clone());
    Ok(backend)
}

impl Opened {
    fn get(&self, id: i64, inputs: &str) -> Option<Arc<dyn Storage>> {
        let kept = self.0.lock().ok()?;
        let entry = kept.get(&id)?;
        (entry.inputs == inputs && entry.at.elapsed() < MAX_AGE).then(|| entry.backend.clone())
    }

    fn put(&self, id: i64, inputs: String, backend: Arc<dyn Storage>) {
        let Ok(mut kept) = self.0.lock() else {
            return;
        };
        if kept.len() >= MAX_ENTRIES {
            kept.clear();
        }
        let at = Instant::now();
        kept.insert(
            id,
            Entry {
                inputs,
                at,
                backend,
            },
        );
    }
}
