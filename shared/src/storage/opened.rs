//! Backends opened for saved storages, kept for the process's next jobs.
//!
//! A Tasks-mode run hands its objects to the fleet in batches, and each
//! batch (and each listing partition) opened its storage afresh: a new
//! client, new credentials and a new connection pool, so the batch's first
//! round of reads each made a new connection. Now a worker keeps what it
//! opened, per storage, while the row's backend, config and sealed secrets
//! stay the same (any change to them opens a new one) and for at most
//! [`MAX_AGE`], so credentials and resolved endpoints are not held longer
//! than a job's worth of time. A storage is opened once at a time: the
//! batches a worker starts together each opened their own backend (and
//! connection pool), and only the last one was kept.
use std::{
    collections::HashMap,
    fmt,
    future::Future,
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
pub struct Opened(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    backends: HashMap<i64, Entry>,
    /// Held while a storage is being opened, per storage.
    opening: HashMap<i64, Arc<tokio::sync::Mutex<()>>>,
}

struct Entry {
    /// What the backend was opened from (see [`inputs`]).
    inputs: String,
    at: Instant,
    backend: Arc<dyn Storage>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.0.lock().map_or(0, |k| k.backends.len());
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
    env.opened
        .get_or_open(model.id, inputs(model), super::open(model, env))
        .await
}

impl Opened {
    /// The backend kept for storage `id` opened from `inputs`, else the one
    /// `open` makes (then kept). Callers for one storage wait for the open
    /// under way and take its backend (each opens its own if that failed).
    async fn get_or_open(
        &self,
        id: i64,
        inputs: String,
        open: impl Future<Output = Result<Arc<dyn Storage>>>,
    ) -> Result<Arc<dyn Storage>> {
        if let Some(backend) = self.get(id, &inputs) {
            return Ok(backend);
        }
        let gate = self.gate(id);
        let _opening = match gate.try_lock() {
            Ok(opening) => Some(opening),
            Err(_) => {
                // Another caller is opening it: take its backend. Should its
                // open have failed, open here, not one waiter after another.
                drop(gate.lock().await);
                if let Some(backend) = self.get(id, &inputs) {
                    return Ok(backend);
                }
                None
            }
        };
        let backend = open.await?;
        self.put(id, inputs, backend.clone());
        Ok(backend)
    }

    fn get(&self, id: i64, inputs: &str) -> Option<Arc<dyn Storage>> {
        let kept = self.0.lock().ok()?;
        let entry = kept.backends.get(&id)?;
        (entry.inputs == inputs && entry.at.elapsed() < MAX_AGE).then(|| entry.backend.clone())
    }

    /// The lock held while storage `id` is opened. (Should the map be
    /// poisoned, a fresh lock: two opens at once cost time, not data.)
    fn gate(&self, id: i64) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut kept) = self.0.lock() else {
            return Arc::default();
        };
        if kept.opening.len() >= MAX_ENTRIES {
            kept.opening.clear();
        }
        kept.opening.entry(id).or_default().clone()
    }

    fn put(&self, id: i64, inputs: String, backend: Arc<dyn Storage>) {
        let Ok(mut kept) = self.0.lock() else {
            return;
        };
        if kept.backends.len() >= MAX_ENTRIES {
            kept.backends.clear();
        }
        let at = Instant::now();
        kept.backends.insert(
            id,
            Entry {
                inputs,
                at,
                backend,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A backend to hand out: a local storage of the temporary directory.
    fn local_backend() -> Result<Arc<dyn Storage>> {
        let root = std::env::temp_dir();
        let env = StorageEnv {
            document_root: Some(root.clone()),
            ..StorageEnv::default()
        };
        let config = crate::storage::local::LocalConfig {
            path: root.display().to_string(),
        };
        Ok(Arc::new(crate::storage::local::LocalStorage::new(
            config, &env,
        )?))
    }

    /// The batches a worker starts together ask for their storage at the
    /// same moment: one open, one backend for all of them.
    #[tokio::test]
    async fn callers_for_one_storage_share_one_open() {
        let opened = Opened::default();
        let opens = AtomicUsize::new(0);
        let open = || async {
            opens.fetch_add(1, Ordering::SeqCst);
            // An open takes a while (credentials, a first request).
            tokio::time::sleep(Duration::from_millis(20)).await;
            local_backend()
        };
        let backends = futures::future::try_join_all(
            (0..4).map(|_| opened.get_or_open(7, "inputs".into(), open())),
        )
        .await
        .expect("opened");
        assert_eq!(opens.load(Ordering::SeqCst), 1, "opened more than once");
        assert!(backends.iter().all(|b| Arc::ptr_eq(b, &backends[0])));

        // Changed inputs (a config change) open a new one.
        let changed = opened
            .get_or_open(7, "changed".into(), open())
            .await
            .expect("opened");
        assert_eq!(opens.load(Ordering::SeqCst), 2);
        assert!(!Arc::ptr_eq(&changed, &backends[0]));
    }

    /// An open that fails is not shared: the callers that waited for it
    /// open their own (at once, not one after another behind a lock).
    #[tokio::test]
    async fn callers_open_their_own_after_a_failed_open() {
        let opened = Opened::default();
        let opens = AtomicUsize::new(0);
        let open = || async {
            let n = opens.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if n == 0 {
                return Err(crate::Error::Transient("endpoint unreachable".into()));
            }
            local_backend()
        };
        let results = futures::future::join_all(
            (0..3).map(|_| opened.get_or_open(9, "inputs".into(), open())),
        )
        .await;
        assert!(results[0].is_err(), "the first open failed");
        assert!(results[1..].iter().all(Result::is_ok));
        assert_eq!(opens.load(Ordering::SeqCst), 3);
    }
}
