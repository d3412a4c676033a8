//! Import (source sync): listing pages -> filter -> dedup against links ->
//! tasks and links inserted in bulk, one transaction per page, with the run's
//! counters and resume cursor moved in that same transaction.
//!
//! Because the cursor and the data commit together, a worker killed at any
//! point leaves the run resumable from the last committed page, and the unique
//! link key makes a replayed page create nothing.
pub mod filter;

use futures::StreamExt;
use sea_orm::{DatabaseConnection, TransactionTrait};
use serde_json::json;

pub use filter::Filter;

use crate::{
    Error, Result,
    db::{
        entities::{project, storage as storage_entity, sync_run},
        links::{self, NewTask},
        runs::{self, Counters},
    },
    storage::{self, ListOptions, StorageEnv},
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
    pub page_size: usize,
}

impl ImportJob<'_> {
    /// Runs (or resumes, from `run.cursor`) a Files-mode import.
    #[tracing::instrument(skip_all, fields(run_id = %self.run.id, storage_id = self.storage.id), err)]
    pub async fn run(&self) -> Result<Outcome> {
        if self.storage.import_method != "files" {
            return Err(Error::invalid(
                "unsupported_import_method",
                Some("import_method"),
                format!(
                    "import method {:?} is not available in this build yet",
                    self.storage.import_method
                ),
            ));
        }
        let backend = storage::open(self.storage, self.env)?;
        let filter = Filter::from_storage(self.storage)?;
        let mut pages = backend.list(ListOptions {
            prefix: self.storage.prefix.clone(),
            recursive: self.storage.recursive,
            start_after: self.run.cursor.clone(),
            page_size: self.page_size,
        });
        let data_key = &self.project.data_key;
        while let Some(page) = pages.next().await {
            let page = page?;
            let Some(last) = page.objects.last() else {
                continue;
            };
            let cursor = last.key.clone();
            let listed = page.objects.len() as i64;
            let matched: Vec<_> = page
                .objects
                .into_iter()
                .filter(|o| filter.matches(&o.key))
                .collect();
            let keys: Vec<String> = matched.iter().map(|o| o.key.clone()).collect();
            let existing = links::existing_keys(self.db, self.storage.id, &keys).await?;
            let new_tasks: Vec<NewTask> = matched
                .iter()
                .filter(|o| !existing.contains(&o.key))
                .map(|o| NewTask {
                    data: json!({ data_key: backend.task_uri(&o.key) }),
                    meta: None,
                    object_key: o.key.clone(),
                    row_index: 0,
                    etag: o.etag.clone(),
                    size: o.size,
                    last_modified: o.last_modified,
                })
                .collect();

            let txn = self.db.begin().await?;
            let (created, raced) =
                links::insert_tasks(&txn, self.project.id, self.storage.id, new_tasks).await?;
            let delta = Counters {
                listed,
                matched: matched.len() as i64,
                created,
                existed: existing.len() as i64 + raced,
                ..Counters::default()
            };
            if !runs::checkpoint(&txn, &self.run.id, &delta, Some(&cursor)).await? {
                txn.rollback().await?;
                return Ok(Outcome::Stopped);
            }
            txn.commit().await?;
        }
        Ok(Outcome::Finished)
    }
}
