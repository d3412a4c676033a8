//! Export: annotations out to a target storage.
//!
//! A run of `full` scope (a sync, on demand or on schedule) keyset-paginates
//! the project's annotations (pages of at most [`PAGE_BYTES`] of their and
//! their tasks' JSON), serializes each ([`format`]), skips those whose
//! content hash equals the export link's (`unchanged`), uploads the rest with
//! bounded concurrency (the backends retry transient failures with backoff),
//! and records links, errors and counters page by page in one transaction
//! with the run's checkpoint. Every run, full or `events`, then drains the
//! storage's outbox: the annotation events the API recorded (exports, and
//! deletes, which remove the object where `can_delete_objects`).
//!
//! A failed upload is an `object_errors` row and makes the run
//! `completed_with_errors`; it is never counted as exported, and its link is
//! not written, so the next sync uploads it again.
pub mod format;

use std::{sync::Arc, sync::atomic::AtomicBool};

use bytes::Bytes;
use futures::StreamExt;
use sea_orm::DatabaseConnection;

use crate::{
    Error, Result,
    attempt::Outcome,
    config::WorkerSettings,
    db::{
        self,
        entities::{export_link, export_outbox, project, storage, sync_run},
        exports, outbox,
        runs::{self, Counters, SCOPE_FULL},
    },
    storage::{self as backends, Storage, StorageEnv},
};

/// The object key of an annotation: `<prefix>/<id>.json`, one slash whatever
/// the prefix ends with.
pub fn object_key(prefix: &str, annotation_id: i64) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        format!("{annotation_id}.json")
    } else {
        format!("{prefix}/{annotation_id}.json")
    }
}

/// Annotation events handled per page of a drain.
const DRAIN_PAGE: u64 = 1000;
/// The most JSON text a page's annotations and their tasks may take
/// (`db::exports::annotation_page`), as for the API's pages; a page stops
/// before the annotation that would pass it (the first always comes). It
/// counts text: parsed, JSON of many small values takes a few times that.
/// Tasks are up to 16 MiB each (`LABELSYNC_MAX_TASK_BYTES`): a page of
/// 1,000 annotations of distinct large tasks held gigabytes. The bodies
/// made from them are bounded apart, by `LABELSYNC_EXPORT_CONCURRENCY`.
const PAGE_BYTES: usize = 32 << 20;
/// How many annotations a run's first page measures before it knows how
/// large they are (`db::exports::Budget`); later pages measure twice what
/// the last one took.
const FIRST_WINDOW: usize = 16;

fn first_budget() -> exports::Budget {
    exports::Budget {
        bytes: PAGE_BYTES,
        first_window: FIRST_WINDOW,
    }
}

fn next_window(taken: usize) -> usize {
    taken.saturating_mul(2).max(4)
}

/// One attempt of an export run over a target storage: a `full` run exports
/// every annotation of the project that changed, then drains the outbox;
/// an `events` run only drains the outbox. Every page commits its links,
/// errors, counters and cursor together, so a retried attempt resumes.
pub struct ExportJob<'a> {
    pub db: &'a DatabaseConnection,
    pub env: &'a StorageEnv,
    pub run: &'a sync_run::Model,
    pub storage: &'a storage::Model,
    pub project: &'a project::Model,
    pub settings: &'a WorkerSettings,
    /// The attempt's lease: every checkpoint checks it is still ours.
    pub lease: Option<&'a str>,
    pub stopping: Option<&'a AtomicBool>,
}

/// What one page of work produced, written in one transaction.
#[derive(Default)]
struct PageResult {
    delta: Counters,
    errors: Vec<(String, Option<i64>, String)>,
    links: Vec<export_link::ActiveModel>,
    /// Annotations whose upload or delete the storage refused for now
    /// (transient errors, its retries spent), with the last error: not
    /// failures of the annotation, so their events stay (see
    /// [`ExportJob::drain`]).
    unsent: Vec<(i64, String, Error)>,
}

impl PageResult {
    /// Counts the unsent as failed, each with its error (a full pass: the
    /// next one sends them).
    fn unsent_failed(&mut self) {
        for (_, key, err) in self.unsent.drain(..) {
            self.delta.failed += 1;
            self.errors.push((key, None, err.to_string()));
        }
    }
}

impl ExportJob<'_> {
    pub async fn run(&self) -> Result<Outcome> {
        let backend = backends::open(self.storage, self.env).await?;
        if self.run.scope == SCOPE_FULL {
            // A full pass reads every annotation and link in keyset pages;
            // a few ms of ANALYZE spare each page a plan made for empty tables.
            db::refresh_stats(self.db, &["annotations", "export_links", "tasks"]).await?;
            let mut cursor: i64 = self
                .run
                .cursor
                .as_deref()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let mut budget = first_budget();
            loop {
                self.check_stopping()?;
                let limit = self.settings.page_size;
                let page =
                    exports::annotation_page(self.db, self.project.id, cursor, limit, budget)
                        .await?;
                let Some(next) = page.next else {
                    break;
                };
                cursor = next;
                budget.first_window = next_window(page.taken);
                let mut result = PageResult::default();
                self.export(&backend, page, &mut result).await?;
                result.unsent_failed();
                if !self.commit(result, Some(&cursor.to_string()), &[]).await? {
                    return Ok(Outcome::Stopped);
                }
            }
        }
        self.drain(&backend).await
    }

    fn check_stopping(&self) -> Result<()> {
        crate::attempt::check_stopping(self.stopping)
    }

    /// Writes a page's links, errors, counters (and drained events) with the
    /// checkpoint; false when the run's lease was lost.
    async fn commit(
        &self,
        result: PageResult,
        cursor: Option<&str>,
        drained: &[export_outbox::Model],
    ) -> Result<bool> {
        let txn = db::begin_write(self.db).await?;
        exports::write_links(&txn, result.links).await?;
        runs::record_errors(&txn, &self.run.id, result.errors).await?;
        outbox::remove(&txn, drained).await?;
        if !runs::checkpoint(&txn, &self.run.id, &result.delta, cursor, self.lease).await? {
            txn.rollback().await?;
            return Ok(false);
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Serializes and uploads a page of annotations, skipping unchanged ones.
    async fn export(
        &self,
        backend: &Arc<dyn Storage>,
        page: exports::Page,
        out: &mut PageResult,
    ) -> Result<()> {
        let exports::Page {
            annotations, tasks, ..
        } = page;
        if annotations.is_empty() {
            return Ok(());
        }
        // One query per page, whatever its size: the links.
        let ids: Vec<i64> = annotations.iter().map(|a| a.id).collect();
        let links = exports::links_of(self.db, self.storage.id, ids).await?;

        // Each body is made as its upload is let in (the stream is pulled as
        // uploads end): a body copies its task's data, so a page's bodies
        // made first (a page of annotations of one large task) took the
        // worker's memory by the gigabyte.
        let prefix = self.storage.prefix.as_str();
        let results: Vec<_> = futures::stream::iter(annotations)
            .map(|a| {
                let body = format::annotation_json(&a, tasks.get(&a.task_id));
                let hash = format::content_hash(&body);
                let key = object_key(prefix, a.id);
                let unchanged = links
                    .get(&a.id)
                    .is_some_and(|l| l.content_hash == hash && l.object_key == key);
                let backend = backend.clone();
                async move {
                    if unchanged {
                        return None;
                    }
                    let size = body.len() as i64;
                    let result = backend
                        .put(&key, Bytes::from(body), Some("application/json"))
                        .await;
                    Some((a.id, key, hash, size, result))
                }
            })
            .buffer_unordered(self.settings.export_concurrency.max(1))
            .collect()
            .await;
        let now = crate::clock::now();
        out.delta.unchanged += results.iter().filter(|r| r.is_none()).count() as i64;
        for (id, key, hash, size, result) in results.into_iter().flatten() {
            match result {
                Ok(()) => {
                    out.delta.exported += 1;
                    out.delta.bytes += size;
                    out.links.push(export_link::ActiveModel {
                        storage_id: sea_orm::Set(self.storage.id),
                        annotation_id: sea_orm::Set(id),
                        object_key: sea_orm::Set(key),
                        content_hash: sea_orm::Set(hash),
                        exported_at: sea_orm::Set(now),
                        ..Default::default()
                    });
                }
                // The run cannot reach the storage at all: retry the run.
                Err(e) if matches!(e, Error::Unauthenticated(_)) => return Err(e),
                Err(e) if e.is_transient() => out.unsent.push((id, key, e)),
                Err(e) => {
                    out.delta.failed += 1;
                    out.errors.push((key, None, e.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Deletes the objects of deleted annotations where the storage allows
    /// it: `gone` holds each one's id and the key its delete event kept
    /// from its export link (where it was exported, whatever the prefix is
    /// now), and the key the current prefix gives is deleted too (an export
    /// under the new prefix may have written it just before the delete,
    /// its link never committed). Fails the run when the storage refuses
    /// its credentials, as an upload does: the events stay, and no delete
    /// is dropped as a per-object failure.
    async fn delete_objects(
        &self,
        backend: &Arc<dyn Storage>,
        gone: Vec<(i64, Option<String>)>,
        out: &mut PageResult,
    ) -> Result<()> {
        if !self.storage.can_delete_objects || gone.is_empty() {
            return Ok(());
        }
        let results: Vec<_> = futures::stream::iter(gone)
            .map(|(id, kept)| {
                let backend = backend.clone();
                let current = object_key(&self.storage.prefix, id);
                let exported = kept.filter(|k| *k != current);
                async move {
                    if let Some(exported) = exported
                        && let Err(e) = backend.delete(&exported).await
                    {
                        return (id, exported, Err(e));
                    }
                    let result = backend.delete(&current).await;
                    (id, current, result)
                }
            })
            .buffer_unordered(self.settings.export_concurrency.max(1))
            .collect()
            .await;
        for (id, key, result) in results {
            match result {
                Ok(()) => out.delta.deleted += 1,
                Err(e) if matches!(e, Error::Unauthenticated(_)) => return Err(e),
                Err(e) if e.is_transient() => out.unsent.push((id, key, e)),
                Err(e) => {
                    out.delta.failed += 1;
                    out.errors.push((key, None, format!("delete: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Handles the storage's waiting annotation events, oldest first, until
    /// none waits. Each page is read from the oldest waiting event, not
    /// after the last one handled: a page's events leave the outbox with its
    /// commit, and ids are taken at insert, not at commit, so an event whose
    /// transaction committed after a newer one's would otherwise be passed
    /// over and wait for the next run (seconds to minutes under a steady
    /// stream of saves, which keeps this run going).
    async fn drain(&self, backend: &Arc<dyn Storage>) -> Result<Outcome> {
        let mut budget = first_budget();
        loop {
            self.check_stopping()?;
            let events = outbox::oldest(self.db, self.storage.id, DRAIN_PAGE).await?;
            if events.is_empty() {
                return Ok(Outcome::Finished);
            }
            let upserts: Vec<i64> = events
                .iter()
                .filter(|e| e.action == outbox::UPSERT)
                .map(|e| e.annotation_id)
                .collect();
            let (page, covered) =
                exports::annotations_of(self.db, self.project.id, &upserts, budget).await?;
            budget.first_window = next_window(page.taken);
            // The events up to the first update left for the next page.
            let first_left = upserts.get(covered).copied();
            let events: Vec<_> = events
                .into_iter()
                .take_while(|e| {
                    !(e.action == outbox::UPSERT && Some(e.annotation_id) == first_left)
                })
                .collect();
            // Deleted annotations, and updates of ones deleted since.
            let alive: Vec<i64> = page.annotations.iter().map(|a| a.id).collect();
            let gone: Vec<(i64, Option<String>)> = events
                .iter()
                .filter(|e| !alive.contains(&e.annotation_id))
                .map(|e| (e.annotation_id, e.object_key.clone()))
                .collect();
            let mut result = PageResult::default();
            self.export(backend, page, &mut result).await?;
            self.delete_objects(backend, gone, &mut result).await?;
            let sent = sent_only(events, &result);
            let unsent = self.end_of_unsent(&mut result);
            if !self.commit(result, None, &sent).await? {
                return Ok(Outcome::Stopped);
            }
            match unsent {
                Some(Ok(())) => return Ok(Outcome::Finished),
                Some(Err(err)) => return Err(err),
                None => {}
            }
        }
    }

    /// What a page's unsent changes make of the drain (`None`: it goes
    /// on). Their events stay in the outbox. An events run ends its
    /// attempt with their last error, and the queue retries it later (an
    /// annotation saved while the storage was down is not dropped; before,
    /// its event went with the page and only a full pass sent it). A full
    /// pass counts them as failed, as its own pages do, and ends: the next
    /// events run sends them.
    fn end_of_unsent(&self, result: &mut PageResult) -> Option<Result<()>> {
        if result.unsent.is_empty() {
            return None;
        }
        if self.run.scope == SCOPE_FULL {
            result.unsent_failed();
            return Some(Ok(()));
        }
        result.unsent.pop().map(|(_, _, err)| Err(err))
    }
}

/// A page's events whose change reached the storage (or failed for good,
/// as its error says).
fn sent_only(events: Vec<export_outbox::Model>, result: &PageResult) -> Vec<export_outbox::Model> {
    let unsent: std::collections::HashSet<i64> = result.unsent.iter().map(|u| u.0).collect();
    events
        .into_iter()
        .filter(|e| !unsent.contains(&e.annotation_id))
        .collect()
}
