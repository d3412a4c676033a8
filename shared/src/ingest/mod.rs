//! Import (source sync): listing pages -> filter -> what is already linked
//! (one grouped query per page) -> new tasks -> one transaction per page that
//! also moves the run's counters and resume cursor.
//!
//! Files mode makes one task per new object inside the page transaction.
//! Tasks mode fetches and parses new objects (`tasks`), a bounded number at
//! once, and commits their rows in chunks as they stream in; the page
//! transaction then records per-object errors, marks the listed objects as
//! seen and moves the cursor. A worker killed at any point leaves the run
//! resumable from its last committed page; rows committed after it are found
//! again through the unique link key and not counted twice, because every link
//! carries the run that last saw it (`seen_run_id`).
//!
//! After the last page, objects linked before but not listed by this run are
//! flagged `object_exists = false` and counted as `missing`; objects listed
//! with another etag than they were imported with are counted as `changed`.
pub mod filter;
pub mod parse;
mod tasks;

use futures::{StreamExt, TryStreamExt};
use sea_orm::DatabaseConnection;
use serde_json::json;

pub use filter::Filter;

use crate::{
    Result,
    config::WorkerSettings,
    db::{
        entities::{project, storage as storage_entity, sync_run},
        links::{self, NewTask},
        runs::{self, Counters},
    },
    storage::{self, ListOptions, ObjectMeta, Storage, StorageEnv},
};

/// How an import ended (errors are returned as `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every page was committed.
    Finished,
    /// The run stopped being `running` under us (cancelled): nothing more was written.
    Stopped,
}

pub struct ImportJob<'a> {
    pub db: &'a DatabaseConnection,
    pub env: &'a StorageEnv,
    pub run: &'a sync_run::Model,
    pub storage: &'a storage_entity::Model,
    pub project: &'a project::Model,
    pub settings: &'a WorkerSettings,
}

/// A per-object failure: key, row (None for the whole object), message.
pub type ObjectError = (String, Option<i64>, String);

impl ImportJob<'_> {
    /// Runs (or resumes, from `run.cursor`) an import.
    #[tracing::instrument(skip_all, fields(run_id = %self.run.id, storage_id = self.storage.id), err)]
    pub async fn run(&self) -> Result<Outcome> {
        let backend = storage::open(self.storage, self.env)?;
        let filter = Filter::from_storage(self.storage)?;
        let tasks_mode = self.storage.import_method == "tasks";
        let mut pages = backend.list(ListOptions {
            prefix: self.storage.prefix.clone(),
            recursive: self.storage.recursive,
            start_after: self.run.cursor.clone(),
            page_size: self.settings.page_size,
        });
        while let Some(page) = pages.next().await {
            let page = page?;
            let Some(last) = page.objects.last() else {
                continue;
            };
            let cursor = last.key.clone();
            let listed = page.objects.len() as i64;
            let matched: Vec<ObjectMeta> = page
                .objects
                .into_iter()
                .filter(|o| filter.matches(&o.key))
                .collect();
            let keys: Vec<String> = matched.iter().map(|o| o.key.clone()).collect();
            let known = links::known_objects(self.db, self.storage.id, &self.run.id, &keys).await?;

            let mut delta = Counters {
                listed,
                matched: matched.len() as i64,
                ..Counters::default()
            };
            let mut fresh = Vec::new();
            let mut seen = Vec::new();
            let mut changed = Vec::new();
            for object in matched {
                let Some(k) = known.get(&object.key) else {
                    fresh.push(object);
                    continue;
                };
                seen.push(object.key.clone());
                if k.seen_by_run {
                    // A page replayed after a crash: its rows were counted when
                    // committed; Tasks mode picks up the rows still missing.
                    if tasks_mode {
                        fresh.push(object);
                    }
                    continue;
                }
                delta.existed += k.rows;
                if object.etag.is_some() && k.etag.is_some() && object.etag != k.etag {
                    delta.changed += 1;
                    changed.push(object);
                }
            }

            let mut errors = Vec::new();
            if tasks_mode {
                // Only objects of a replayed page can have rows already.
                let may_exist = fresh.iter().any(|o| known.contains_key(&o.key));
                let objects = tasks::Importer {
                    job: self,
                    backend: backend.clone(),
                    may_exist,
                };
                let results: Vec<Option<tasks::ObjectResult>> =
                    futures::stream::iter(fresh.drain(..))
                        .map(|object| objects.import(object))
                        .buffer_unordered(self.settings.fetch_concurrency.max(1))
                        .try_collect()
                        .await?;
                for result in results {
                    let Some(result) = result else {
                        return Ok(Outcome::Stopped);
                    };
                    delta.failed += result.failed;
                    errors.extend(result.errors);
                }
            }

            let txn = crate::db::begin_write(self.db).await?;
            if !fresh.is_empty() {
                let new = files_tasks(&*backend, &self.project.data_key, fresh);
                let (created, raced) =
                    links::insert_tasks(&txn, self.project.id, self.storage.id, &self.run.id, new)
                        .await?;
                delta.created += created;
                delta.existed += raced;
            }
            links::mark_seen(&txn, self.storage.id, &self.run.id, &seen).await?;
            for o in &changed {
                links::update_object(
                    &txn,
                    self.storage.id,
                    &o.key,
                    o.etag.as_deref(),
                    o.size,
                    o.last_modified,
                )
                .await?;
            }
            runs::record_errors(&txn, &self.run.id, errors).await?;
            if !runs::checkpoint(&txn, &self.run.id, &delta, Some(&cursor)).await? {
                txn.rollback().await?;
                return Ok(Outcome::Stopped);
            }
            txn.commit().await?;
        }

        // The listing is complete: what was not seen is gone.
        let txn = crate::db::begin_write(self.db).await?;
        let missing = links::mark_missing(&txn, self.storage.id, &self.run.id).await?;
        let delta = Counters {
            missing,
            ..Counters::default()
        };
        if !runs::checkpoint(&txn, &self.run.id, &delta, None).await? {
            txn.rollback().await?;
            return Ok(Outcome::Stopped);
        }
        txn.commit().await?;
        Ok(Outcome::Finished)
    }
}

/// Files mode: one task per object, `{data_key: <the object's URI>}`.
fn files_tasks(backend: &dyn Storage, data_key: &str, objects: Vec<ObjectMeta>) -> Vec<NewTask> {
    objects
        .into_iter()
        .map(|o| NewTask {
            data: json!({ data_key: backend.task_uri(&o.key) }),
            object_key: o.key,
            row_index: 0,
            etag: o.etag,
            size: o.size,
            last_modified: o.last_modified,
            ..NewTask::default()
        })
        .collect()
}
