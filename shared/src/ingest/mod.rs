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
//! counted as `missing` and, as the storage's `on_missing` says, left as they
//! are (`keep`), their links flagged `object_exists = false` (`flag`), or
//! flagged and their unlabeled tasks deleted (`delete_unlabeled`); objects
//! listed with another etag than they were imported with are counted as
//! `changed`.
pub mod budget;
pub mod ended;
mod parquet_footer;
mod parquet_json;
mod parquet_pages;
pub mod parquet_process;
pub mod parse;
mod partitions;
pub mod reads;
mod retry;
mod task_files;

use futures::{Stream, StreamExt, TryStreamExt};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;

use std::sync::Arc;
use tokio::sync::SemaphorePermit;

use crate::attempt::Outcome;
use crate::{
    Error, Result,
    config::WorkerSettings,
    db::{
        batches,
        entities::{project, storage as storage_entity, sync_batch, sync_partition, sync_run},
        links, missing, partitions as parts,
        runs::{self, Counters, RunStatus},
        tasks::{self, NewTask},
    },
    storage::{self, Filter, ListOptions, ObjectMeta, Storage, StorageEnv, spec::OnMissing},
};
use partitions::{Head, Listing};

/// One attempt of an import run: lists the source from the run's cursor and
/// commits each page (tasks, links, errors, counters, cursor) in one
/// transaction, so an attempt killed at any point can be resumed.
pub struct ImportJob<'a> {
    pub db: &'a DatabaseConnection,
    pub env: &'a StorageEnv,
    pub run: &'a sync_run::Model,
    pub storage: &'a storage_entity::Model,
    pub project: &'a project::Model,
    pub settings: &'a WorkerSettings,
    /// Where Tasks-mode objects are handed out as batch jobs; `None` imports
    /// them in this process (the one-shot CLI).
    pub fanout: Option<&'a dyn FanOut>,
    /// The attempt's lease on the run: page checkpoints are refused once
    /// another attempt took the run over. `None` for fan-out batches, which
    /// only add counts the unique link key keeps exact.
    pub lease: Option<&'a str>,
    /// Raised on SIGTERM: stop at the next page boundary and give the run
    /// back ([`crate::Error::Transient`]) so another worker resumes it.
    pub stopping: Option<&'a std::sync::atomic::AtomicBool>,
    /// The partition this attempt lists (see [`partitions`]), `None` for
    /// the run's own job.
    pub part: Option<Part<'a>>,
    /// The process's pool of object reads, shared with its other jobs.
    pub reads: &'a reads::Reads,
}

/// A partition of a run, held by an attempt's lease: its pages move its
/// own cursor (and the run's counters), and it ends marked done.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub row: &'a sync_partition::Model,
    pub lease: &'a str,
}

/// Where a Tasks-mode run hands its batches to the fleet: the job queue
/// implements it (`jobs::Queue`), so the import does not know the queue.
#[async_trait::async_trait]
pub trait FanOut: Send + Sync {
    /// Enqueues the job of batch `batch` of run `run_id`, once (a repeated
    /// push of the same batch is absorbed). `Ok(false)`: the queue's backlog
    /// is full; the batch row stays, and the waiting sync job runs it.
    async fn push_batch(&self, run_id: &str, batch: i64) -> Result<bool>;

    /// Enqueues the job of partition `partition` of run `run_id`, once per
    /// `round` (the run's attempt that pushes it). `Ok(false)`: the backlog
    /// is full; the run's job lists the partition itself.
    async fn push_partition(&self, run_id: &str, partition: i64, round: &str) -> Result<bool>;

    /// Watches the ends of run `run_id`'s `what` jobs, which their workers
    /// announce (see [`ended`]).
    fn watch(&self, what: ended::Ended, run_id: &str) -> ended::Watch;

    /// Announces that a `what` job of run `run_id` ended, to its watchers in
    /// every process (best effort).
    async fn announce(&self, what: ended::Ended, run_id: &str);
}

/// A per-object failure: key, row (None for the whole object), message.
pub type ObjectError = (String, Option<i64>, String);

/// Whether a listed key or prefix can be stored as database text (a NUL
/// cannot).
fn storable(key: &str) -> bool {
    !key.contains('\0')
}

/// A key as a user is shown it: a NUL, which no database text can store,
/// written `\0`.
fn shown(key: &str) -> String {
    key.replace('\0', "\\0")
}

/// Takes out of `objects` those whose key holds a NUL character, which no
/// database text can store (S3 can list one, URL-encoded), and, in Files
/// mode (`uri_keys`: the backend's key shape), those a task's URI could
/// not name: `/resolve` refuses a key with a `.` or `..` segment (or an
/// empty one, where keys are paths), so such a task was a broken image
/// with no error in the run. Each the filter matches becomes a per-object
/// error naming the key (with `\0` for a NUL), and the rest of the page
/// goes on. They were listed, so the listing stays complete.
fn take_unstorable(
    objects: &mut Vec<ObjectMeta>,
    filter: &Filter,
    uri_keys: Option<storage::KeyShape>,
) -> Vec<ObjectError> {
    let refusal = |key: &str| -> Option<String> {
        if !storable(key) {
            return Some(
                "the object's key holds a NUL character, which the database cannot store; \
                 rename the object"
                    .to_owned(),
            );
        }
        let shape = uri_keys?;
        storage::check_key(key, shape).err().map(|e| {
            format!(
                "{e}; a task's URI could not name it (its media would not load): rename the object"
            )
        })
    };
    let mut refused = Vec::new();
    objects.retain(|o| match refusal(&o.key) {
        Some(why) if filter.matches(&o.key) => {
            refused.push((shown(&o.key), None, why));
            false
        }
        Some(_) => false,
        None => true,
    });
    refused
}

/// One listing page, classified: what it adds to the run's counters, which
/// objects need tasks or a re-read, and what the page's transaction records.
#[derive(Default)]
struct PagePlan {
    /// The page's last key: where a resumed run continues (none for a page
    /// of listing errors only).
    cursor: Option<String>,
    delta: Counters,
    /// Listed keys whose links this run marks as seen.
    seen_keys: Vec<String>,
    /// Matched objects not (completely) imported: new ones, those of a page
    /// replayed after a crash, and objects a stopped run left half-way.
    fresh: Vec<ToRead>,
    /// Whether some fresh object has links already (its rows may exist).
    fresh_may_exist: bool,
    /// Imported objects listed with another etag.
    changed: Vec<ObjectMeta>,
    /// Per-object errors to record with the page.
    errors: Vec<ObjectError>,
    /// Some part of the listing could not be read (its errors are among
    /// `errors`): the run's listing is incomplete.
    unlisted: bool,
    /// Fan-out batches, written with the page's checkpoint.
    batches: Vec<Vec<ToRead>>,
}

/// How an attempt's listing of pages ended.
pub(super) enum Listed {
    /// The run stopped, or the attempt lost its lease.
    Stopped,
    /// Every page committed, the last leaving the cursor (the run's, or
    /// the partition's) `at`; `unlisted` when some page had parts that
    /// could not be listed.
    To { at: Option<String>, unlisted: bool },
}

/// An object for a Tasks-mode read, as a fan-out batch stores it: the
/// listed object, and whether a partial mark was on it when its page was
/// planned (an earlier run stopped in it, or it broke off half-way), which
/// a read to its end clears with its rows. Only such objects pay for the
/// clear; a mark missed (set meanwhile) costs one more read of the object
/// by the next sync, no row. A batch written before the flag reads as
/// unmarked.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ToRead {
    #[serde(flatten)]
    pub object: ObjectMeta,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub marked: bool,
}

impl From<ObjectMeta> for ToRead {
    fn from(object: ObjectMeta) -> Self {
        ToRead {
            object,
            marked: false,
        }
    }
}

impl ImportJob<'_> {
    /// Runs (or resumes, from `run.cursor`) an import: each listing page is
    /// planned, its task files read (Tasks mode), and committed in one
    /// transaction with the run's counters and cursor; after the last page,
    /// what was not listed is flagged missing. A listing that splits is
    /// listed by partitions instead (see [`partitions`]).
    #[tracing::instrument(skip_all, fields(run_id = %self.run.id, storage_id = self.storage.id), err)]
    pub async fn run(&self) -> Result<Outcome> {
        let backend = storage::open_shared(self.storage, self.env).await?;
        let head = match self.try_partitioned(&backend).await? {
            Listing::Partitioned(outcome) => return Ok(outcome),
            Listing::Sequence(head) => head,
        };
        let Listed::To { at, unlisted } = self.list_pages(&backend, head).await? else {
            return Ok(Outcome::Stopped);
        };
        let stays = runs::CursorMove {
            from: at.as_deref(),
            to: None,
        };
        self.finish_listing(End::Sequence { stays, unlisted }).await
    }

    /// Plans, reads and commits every page of the listing (which starts
    /// with `head` when discovery read it).
    async fn list_pages(&self, backend: &Arc<dyn Storage>, head: Option<Head>) -> Result<Listed> {
        let filter = Filter::from_storage(self.storage)?;
        // The cursor as this attempt last committed it: each page moves it
        // from there (see `runs::checkpoint_page`).
        let mut at = match (&head, self.part) {
            (Some(head), _) => head.committed(),
            (None, Some(part)) => part.row.cursor.clone(),
            (None, None) => self.run.cursor.clone(),
        };
        let mut unlisted = false;
        let mut pages = self.pages(backend, head);
        while let Some(page) = pages.next().await {
            self.check_stopping()?;
            let (page, cursor) = page?;
            let Some(mut plan) = self.plan_page(page, &filter).await? else {
                continue;
            };
            if cursor.is_some() {
                plan.cursor = cursor;
            }
            let (next, page_unlisted) = (plan.cursor.clone(), plan.unlisted);
            if !self.read_task_files(backend, &mut plan).await?
                || !self.commit_page(&**backend, plan, at.as_deref()).await?
            {
                return Ok(Listed::Stopped);
            }
            at = next.or(at);
            unlisted |= page_unlisted;
        }
        Ok(Listed::To { at, unlisted })
    }

    /// What the run reads, from its cursor: the storage's listing (`head`
    /// first, then what comes after it), or for a `retry` run the objects
    /// its original run failed on (each page with the cursor it moves the
    /// run to).
    fn pages(
        &self,
        backend: &Arc<dyn Storage>,
        head: Option<Head>,
    ) -> futures::stream::BoxStream<'static, Result<(storage::Page, Option<String>)>> {
        if let Some(retry_of) = self.retry_of() {
            return retry::pages(retry::Source {
                db: self.db.clone(),
                backend: backend.clone(),
                retry_of: retry_of.to_owned(),
                after: self.run.cursor.clone(),
                page_size: self.settings.page_size as u64,
                recursive: self.storage.recursive,
            });
        }
        let (prefix, recursive, start_after) = match self.part {
            Some(Part { row, .. }) => (row.prefix.clone(), row.recursive, row.cursor.clone()),
            None => (
                self.storage.prefix.clone(),
                self.storage.recursive,
                self.run.cursor.clone(),
            ),
        };
        let opts = ListOptions {
            prefix,
            recursive,
            start_after,
            page_size: self.settings.page_size,
        };
        // What is left to list after the head (`None`: nothing).
        let (head, rest) = match head {
            None => (Vec::new(), Some(opts)),
            Some(head) => {
                let (objects, after) = head.into_parts();
                let rest = after.map(|after| ListOptions {
                    start_after: Some(after),
                    ..opts
                });
                (objects, rest)
            }
        };
        let head = futures::stream::iter(head)
            .chunks(self.settings.page_size)
            .map(|objects| {
                Ok(storage::Page {
                    objects,
                    errors: Vec::new(),
                })
            });
        let rest = rest.map_or_else(
            || futures::stream::empty().boxed(),
            |opts| backend.list(opts),
        );
        let first_part =
            self.settings.concurrency.max(1) * batch_objects(self.settings.fetch_concurrency);
        split_first(head.chain(storage::prefetch(rest, 2)), first_part)
            .map_ok(|page| (page, None))
            .boxed()
    }

    /// The run whose failed objects this `retry` run reads again.
    fn retry_of(&self) -> Option<&str> {
        (self.run.scope == runs::SCOPE_RETRY)
            .then_some(self.run.retry_of.as_deref())
            .flatten()
    }

    fn tasks_mode(&self) -> bool {
        storage::spec::ImportMethod::of(self.storage) == storage::spec::ImportMethod::Tasks
    }

    /// In Files mode, how a task's URI names its object's key (see
    /// [`take_unstorable`]); `None` in Tasks mode, where keys are only read,
    /// and for a backend whose tasks' URIs `/resolve` does not serve.
    fn uri_keys(&self) -> Option<storage::KeyShape> {
        if self.tasks_mode() {
            return None;
        }
        let kind = storage::BackendKind::parse(&self.storage.backend).ok()?;
        kind.has_task_uris().then(|| kind.key_shape())
    }

    /// Classifies a page against the links the storage has. `None` for a
    /// page with nothing in it.
    async fn plan_page(
        &self,
        mut page: storage::Page,
        filter: &Filter,
    ) -> Result<Option<PagePlan>> {
        // A page may carry only listing errors (an unreadable directory):
        // they are recorded, and the cursor stays put.
        if page.objects.is_empty() && page.errors.is_empty() {
            return Ok(None);
        }
        let listed = page.objects.len() as i64;
        // Every listed object counts as present, matched or not (narrowing
        // the regex must not report the objects it now skips as missing),
        // and so does one refused below: it is still there (a task an
        // earlier version made of it is not reported missing). A key with a
        // NUL is not: no text holds it, nor ever held a link of it.
        let listed_keys: Vec<String> = page
            .objects
            .iter()
            .map(|o| o.key.clone())
            .filter(|k| storable(k))
            .collect();
        let unstorable = take_unstorable(&mut page.objects, filter, self.uri_keys());
        let refused: std::collections::HashSet<String> =
            unstorable.iter().map(|(key, _, _)| key.clone()).collect();
        let mut plan = PagePlan {
            // A resumed attempt goes on after the page's last key that can
            // be stored, refused or not (refused keys at a page's end were
            // listed, and counted, again).
            cursor: listed_keys.last().cloned(),
            unlisted: page.errors.iter().any(|e| e.incomplete),
            // An entry that could never be a key is reported where the
            // filter would have taken it.
            errors: page
                .errors
                .into_iter()
                .filter(|e| e.incomplete || filter.matches(&e.key))
                .map(|e| (e.key, None, e.message))
                .chain(unstorable)
                .collect(),
            ..PagePlan::default()
        };
        plan.delta.listed = listed;
        plan.delta.failed = plan.errors.len() as i64;
        let matched: Vec<ObjectMeta> = page
            .objects
            .into_iter()
            .filter(|o| filter.matches(&o.key))
            .collect();
        let keys: Vec<String> = matched.iter().map(|o| o.key.clone()).collect();
        let known = links::known_objects(self.db, self.storage.id, &self.run.id, &keys).await?;
        let partial = if self.tasks_mode() && !known.is_empty() {
            links::partial_among(self.db, self.storage.id, &keys).await?
        } else {
            Default::default()
        };
        // Only links made before this run need marking as seen: a matched
        // key without one gets its rows now (or from a batch) with this
        // run's id already. On a first sync that spares a 1,000-key update
        // per page that matches nothing.
        plan.seen_keys = listed_keys
            .into_iter()
            .filter(|k| known.contains_key(k) || !filter.matches(k) || refused.contains(k))
            .collect();
        plan.delta.matched = matched.len() as i64;
        self.classify(&mut plan, matched, &known, &partial);
        Ok(Some(plan))
    }

    /// Sorts matched objects into fresh (needs its rows), changed (another
    /// etag) and already imported (counted as existing).
    fn classify(
        &self,
        plan: &mut PagePlan,
        matched: Vec<ObjectMeta>,
        known: &std::collections::HashMap<String, links::Known>,
        partial: &std::collections::HashSet<String>,
    ) {
        for object in matched {
            let Some(k) = known.get(&object.key) else {
                plan.fresh.push(ToRead::from(object));
                continue;
            };
            let retried = self.retry_of().is_some() && self.tasks_mode();
            let changed = object.etag.is_some() && k.etag.is_some() && object.etag != k.etag;
            // A marked or retried object that changed is read again as a
            // changed one where the storage opts in: a file that broke,
            // then was fixed, updates the tasks of the rows it had too.
            let marked = partial.contains(&object.key);
            let reread = (marked || retried) && !(changed && self.storage.reimport_changed);
            if k.seen_by_run || reread {
                // A page replayed after a crash, or an object an earlier run
                // stopped or broke half-way through (cancelled, failed,
                // killed): its rows were counted when committed; Tasks mode
                // picks up the rows still missing; a retry run reads again
                // every object its original run failed on, keeping the rows
                // it has.
                if self.tasks_mode() {
                    plan.fresh_may_exist = true;
                    plan.fresh.push(ToRead { object, marked });
                }
                continue;
            }
            plan.delta.existed += k.rows;
            if changed {
                plan.delta.changed += 1;
                plan.changed.push(object);
            }
        }
    }

    /// Tasks mode: hands the fresh objects to fan-out batches (written with
    /// the page) or imports them here, and re-reads changed objects where the
    /// storage opts in. False when the run stopped.
    async fn read_task_files(
        &self,
        backend: &Arc<dyn Storage>,
        plan: &mut PagePlan,
    ) -> Result<bool> {
        if !self.tasks_mode() {
            return Ok(true);
        }
        if !plan.fresh.is_empty() {
            let objects = std::mem::take(&mut plan.fresh);
            if self.fanout.is_some() {
                // The batch rows are written with the page's checkpoint (so a
                // replayed page cannot make a second set) and enqueued after
                // it commits.
                plan.batches = objects
                    .chunks(batch_objects(self.settings.fetch_concurrency))
                    .map(<[_]>::to_vec)
                    .collect();
                let room = MAX_BATCHES_IN_FLIGHT.saturating_sub(plan.batches.len() as u64);
                if !self.wait_for_batches(room).await? {
                    return Ok(false);
                }
            } else if !self
                .import_into(plan, backend, objects, plan.fresh_may_exist, false)
                .await?
            {
                return Ok(false);
            }
        }
        // Changed objects are read again where the storage opts in (a
        // Files-mode task only names its object, which already serves the new
        // bytes). Done inline, not fanned out: changes are few, and the etag
        // is updated only after the rows are.
        if self.storage.reimport_changed && !plan.changed.is_empty() {
            let changed = plan.changed.iter().cloned().map(ToRead::from).collect();
            return self.import_into(plan, backend, changed, true, true).await;
        }
        Ok(true)
    }

    /// [`Self::import_objects`], its failures added to the page's.
    async fn import_into(
        &self,
        plan: &mut PagePlan,
        backend: &Arc<dyn Storage>,
        objects: Vec<ToRead>,
        may_exist: bool,
        overwrite: bool,
    ) -> Result<bool> {
        let Some(imported) = self
            .import_objects(backend, objects, may_exist, overwrite)
            .await?
        else {
            return Ok(false);
        };
        if !self
            .commit_rows(imported.rows, Vec::new(), imported.marks)
            .await?
        {
            return Ok(false);
        }
        plan.delta.failed += imported.failed;
        plan.errors.extend(imported.errors);
        Ok(true)
    }

    /// Commits a page in one transaction: Files-mode tasks, seen marks, new
    /// etags, errors, fan-out batches, and the run's counters and cursor;
    /// then hands the batches to the fleet. False when the run stopped.
    async fn commit_page(
        &self,
        backend: &dyn Storage,
        mut plan: PagePlan,
        at: Option<&str>,
    ) -> Result<bool> {
        let txn = crate::db::begin_write(self.db).await?;
        if !plan.fresh.is_empty() {
            let fresh = std::mem::take(&mut plan.fresh)
                .into_iter()
                .map(|r| r.object);
            let new = files_tasks(backend, &self.project.data_key, fresh.collect());
            let (created, raced) =
                tasks::insert_tasks(&txn, self.project.id, self.storage.id, &self.run.id, new)
                    .await?;
            plan.delta.created += created;
            plan.delta.existed += raced;
        }
        links::mark_seen(&txn, self.storage.id, &self.run.id, &plan.seen_keys).await?;
        // A changed object that could not be read again keeps its old etag,
        // so the next sync tries it again (a row's error is not the
        // object's: the rest of it was read).
        let unread: std::collections::HashSet<&str> = plan
            .errors
            .iter()
            .filter(|(_, row, _)| row.is_none())
            .map(|(key, _, _)| key.as_str())
            .collect();
        for o in plan
            .changed
            .iter()
            .filter(|o| !unread.contains(o.key.as_str()))
        {
            let etag = o.etag.as_deref();
            links::update_object(&txn, self.storage.id, &o.key, etag, o.size, o.last_modified)
                .await?;
        }
        runs::record_errors(&txn, &self.run.id, plan.errors).await?;
        if plan.unlisted {
            runs::mark_listing_incomplete(&txn, &self.run.id).await?;
        }
        let batch_ids = batches::create(&txn, &self.run.id, &plan.batches).await?;
        let moved = plan.cursor.as_deref().map(|to| runs::CursorMove {
            from: at,
            to: Some(to),
        });
        if !self.checkpoint(&txn, &plan.delta, moved).await? {
            txn.rollback().await?;
            return Ok(false);
        }
        txn.commit().await?;
        if let Some(fanout) = self.fanout {
            self.enqueue_batches(fanout, batch_ids).await;
        }
        Ok(true)
    }

    /// Adds a committed page to the run's counters and moves the cursor (the
    /// partition's when listing one) from where the attempt left it; false
    /// when the attempt lost its lease or the run stopped, a transient
    /// error when the cursor is not where the attempt left it
    /// ([`Self::check_cursor`]).
    async fn checkpoint(
        &self,
        txn: &impl ConnectionTrait,
        delta: &Counters,
        cursor: Option<runs::CursorMove<'_>>,
    ) -> Result<bool> {
        let moved = match (self.part, cursor) {
            (Some(part), cursor) => {
                parts::checkpoint(txn, part.row.id, part.lease, cursor).await?
                    && runs::checkpoint(txn, &self.run.id, delta, None, None).await?
            }
            (None, Some(cursor)) => {
                runs::checkpoint_page(txn, &self.run.id, delta, cursor, self.lease).await?
            }
            (None, None) => runs::checkpoint(txn, &self.run.id, delta, None, self.lease).await?,
        };
        if !moved && let Some(cursor) = cursor {
            self.check_cursor(txn, cursor).await?;
        }
        Ok(moved)
    }

    /// Why a page's checkpoint was refused, when it is not that the run
    /// stopped or the lease went: the run's (or partition's) cursor is not
    /// where this attempt left it, because the database lost commits it
    /// had acknowledged (a crash with `synchronous_commit` off, a failover
    /// to a replica behind). Going on would skip the pages lost: the
    /// attempt fails, and the next one lists from the cursor the database
    /// has (`Error::Transient`).
    async fn check_cursor(
        &self,
        txn: &impl ConnectionTrait,
        cursor: runs::CursorMove<'_>,
    ) -> Result<()> {
        let run = match runs::get(txn, &self.run.id).await {
            Ok(run) => run,
            // Deleted with its storage: the run stopped.
            Err(Error::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        let ours = run.status == RunStatus::Running.as_str()
            && (self.lease.is_none() || run.lease_owner.as_deref() == self.lease);
        let found = match self.part {
            Some(part) => parts::cursor_of(txn, part.row.id, part.lease).await?,
            None => ours.then_some(run.cursor),
        };
        match found {
            Some(found) if ours && found.as_deref() != cursor.from => {
                Err(Error::Transient(format!(
                    "the listing's cursor is at {found:?}, not at {:?} where this attempt committed it: the database lost commits; listing again from there",
                    cursor.from
                )))
            }
            _ => Ok(()),
        }
    }

    /// The listing is complete: once every batch is done, what was not seen
    /// is gone, and the storage's `on_missing` says what becomes of it, in
    /// one transaction with the run's last checkpoint; only if the database
    /// still has what the listing committed ([`End`]): otherwise the
    /// objects of the commits it lost would be taken for gone, and the
    /// attempt fails instead (`Error::Transient`), for the next to list
    /// them again.
    async fn finish_listing(&self, end: End<'_>) -> Result<Outcome> {
        if self.fanout.is_some() && !self.wait_for_batches(0).await? {
            return Ok(Outcome::Stopped);
        }
        let txn = crate::db::begin_write(self.db).await?;
        let (stays, unlisted) = match end {
            End::Sequence { stays, unlisted } => (Some(stays), unlisted),
            End::Partitions(written) => {
                if !self.check_partitions(&txn, written).await? {
                    txn.rollback().await?;
                    return Ok(Outcome::Stopped);
                }
                (None, false)
            }
        };
        // A retry run lists only some objects: it must not take the others
        // for gone.
        let delta = match self.retry_of() {
            Some(_) => Counters::default(),
            None => self.reconcile_missing(&txn, unlisted).await?,
        };
        if !self.checkpoint(&txn, &delta, stays).await? || !self.end_run(&txn).await? {
            txn.rollback().await?;
            return Ok(Outcome::Stopped);
        }
        txn.commit().await?;
        Ok(Outcome::Finished)
    }

    /// Ends the run in the transaction of its listing's end, `completed` or
    /// `completed_with_errors` by its counters there: apart, an attempt
    /// that died (or failed to end it) after the end committed left the
    /// next attempt to apply `on_missing` again (`missing` counted twice
    /// under `keep`), and a cancel landing between the two ended a run
    /// whose `delete_unlabeled` had deleted tasks as `cancelled`, with no
    /// `storage.objects_missing` event. False when the run stopped or the
    /// attempt lost its lease.
    async fn end_run(&self, txn: &impl ConnectionTrait) -> Result<bool> {
        let status = RunStatus::completed(runs::get(txn, &self.run.id).await?.failed);
        runs::finish_in(txn, &self.run.id, status, None, self.lease).await
    }

    /// Whether the run's partitions are the `written` this attempt listed,
    /// all done: a database that lost the commit writing them (or some of
    /// them) has fewer, and a run finished on those would take every
    /// object of the others for gone (`Error::Transient`). False when they
    /// went with the run (deleted with its storage) or the run stopped.
    async fn check_partitions(&self, txn: &impl ConnectionTrait, written: usize) -> Result<bool> {
        let (found, done) = parts::count(txn, &self.run.id).await?;
        if found == written && done == found {
            return Ok(true);
        }
        match runs::get(txn, &self.run.id).await {
            Ok(run) if run.status == RunStatus::Running.as_str() => {
                Err(partitions_lost(found, done, written))
            }
            Ok(_) | Err(Error::NotFound(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }
}

/// The error of an attempt that finds `found` partitions (`done` of them
/// done) where it wrote or listed `written`.
fn partitions_lost(found: usize, done: usize, written: usize) -> Error {
    Error::Transient(format!(
        "the run has {found} partitions ({done} done) where this attempt wrote or listed {written}: the database lost commits; listing again"
    ))
}

/// How long a waiting job lets a batch that failed for now rest before it
/// (or the batch's queued job's retry) takes it again, as the queue waits
/// before a job's retry.
const BATCH_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Renews the claim `batch`'s attempt made every `every`, for ever (see
/// `ImportJob::renewing_claim`). A renewal that fails is let go: the worst
/// it costs is the batch run twice (rows are linked once).
async fn renew_claim_every(
    db: &DatabaseConnection,
    batch: &sync_batch::Model,
    every: std::time::Duration,
) -> std::convert::Infallible {
    let mut beat = tokio::time::interval(every);
    beat.tick().await; // the first tick is at once
    loop {
        beat.tick().await;
        if let Err(err) = batches::renew_claim(db, batch.id, batch.attempts).await {
            tracing::debug!(batch_id = batch.id, error = %err, "batch claim not renewed");
        }
    }
}

/// What a listing's end must find, or the database lost commits of it.
pub(super) enum End<'a> {
    /// A sequence's: the run's cursor where its last page left it, and
    /// whether some page this attempt committed could not be listed whole
    /// (the run's flag of it may be among what was lost).
    Sequence {
        stays: runs::CursorMove<'a>,
        unlisted: bool,
    },
    /// A partitioned run's: as many partitions as this attempt listed, all
    /// done (each partition's end checked its cursor).
    Partitions(usize),
}

impl ImportJob<'_> {
    /// Counts the objects this run did not list (`missing`) and applies the
    /// storage's `on_missing` (docs/API.md, "Storages"): `keep` changes
    /// nothing, `flag` flags their links, `delete_unlabeled` flags them too,
    /// then deletes the tasks left with no link present and no annotation
    /// (`deleted`) and counts the tasks of the missing objects it keeps
    /// (`kept`), unless the listing was incomplete (then it acts as `flag`):
    /// as the run records it, or as this attempt saw it (`unlisted`).
    async fn reconcile_missing(
        &self,
        txn: &impl ConnectionTrait,
        unlisted: bool,
    ) -> Result<Counters> {
        let (storage_id, run_id) = (self.storage.id, self.run.id.as_str());
        let mut delta = Counters {
            missing: links::count_missing(txn, storage_id, run_id).await?,
            ..Counters::default()
        };
        let mut on_missing = OnMissing::of(self.storage);
        if on_missing == OnMissing::DeleteUnlabeled
            && (unlisted || runs::get(txn, run_id).await?.listing_incomplete)
        {
            // Objects in a part of the listing that could not be read were
            // not listed, not deleted: their tasks wait for a complete one.
            on_missing = OnMissing::Flag;
        }
        if on_missing == OnMissing::DeleteUnlabeled && delta.missing > 0 {
            delta.kept = missing::kept_tasks(txn, storage_id, run_id).await?;
        }
        if on_missing != OnMissing::Keep && delta.missing > 0 {
            links::flag_missing(txn, storage_id, run_id).await?;
        }
        // Also when nothing went missing this time: tasks flagged by earlier
        // runs (under `flag`, or kept while annotated) may go now.
        if on_missing == OnMissing::DeleteUnlabeled {
            delta.deleted = missing::delete_unlabeled(txn, storage_id).await?;
        }
        Ok(delta)
    }

    fn check_stopping(&self) -> Result<()> {
        crate::attempt::check_stopping(self.stopping)
    }

    /// Fetches, parses and imports Tasks-mode objects, as many at once as
    /// the process's read pool lets (see [`reads`]). `None` when the run
    /// stopped; otherwise the failures to record and the last small
    /// objects' rows, which the caller commits with what it writes next
    /// (see [`Imported`]).
    async fn import_objects(
        &self,
        backend: &Arc<dyn Storage>,
        objects: Vec<ToRead>,
        may_exist: bool,
        overwrite: bool,
    ) -> Result<Option<Imported>> {
        let importer = task_files::Importer {
            job: self,
            backend: backend.clone(),
            may_exist,
            overwrite,
        };
        // Turns in the pool for every object now, so that this job's
        // reads go before those of jobs started after it.
        let turns = self.reads.turns(objects.len());
        let mut results = futures::stream::iter(objects.into_iter().enumerate())
            .map(|(i, object)| importer.import(object, turns.nth(i)))
            .buffer_unordered(self.reads.size());
        let mut imported = Imported::default();
        // Small objects' rows, committed a chunk's worth at a time, at most
        // SMALL_COMMITS at once, while the imports go on: an import left
        // unpolled while its transaction held the run's row (its
        // checkpoint) kept a commit awaited beside it waiting for that row,
        // and neither ever ended. Rows wait in `waiting` meanwhile, holding
        // their share of the rows in flight: once a parse waits for room,
        // they go whole chunk or not (see `budget`).
        let in_flight = budget::rows_in_flight(self.settings.rows_in_flight_bytes);
        let mut waiting = SmallRows::default();
        let mut committing = futures::stream::FuturesUnordered::new();
        let mut listed_all = false;
        loop {
            // Made before the waits are looked at: one that begins after
            // that look is told to it.
            let wait_begins = in_flight.waits_begin();
            tokio::pin!(wait_begins);
            while committing.len() < SMALL_COMMITS
                && let Some(SmallChunk {
                    rows, held, marks, ..
                }) = waiting.next_chunk(in_flight.someone_waits())
            {
                committing.push(async move {
                    let kept_going = self.commit_rows(rows, Vec::new(), marks).await;
                    drop(held);
                    kept_going
                });
            }
            let may_commit = !listed_all && !waiting.is_empty() && committing.len() < SMALL_COMMITS;
            tokio::select! {
                next = results.try_next(), if !listed_all => match next? {
                    None => listed_all = true,
                    Some(None) => return Ok(None),
                    Some(Some(mut result)) => {
                        imported.failed += result.failed;
                        imported.errors.append(&mut result.errors);
                        waiting.add(std::mem::take(&mut result.deferred));
                    }
                },
                Some(kept_going) = committing.next() => {
                    if !kept_going? {
                        return Ok(None);
                    }
                }
                () = &mut wait_begins, if may_commit => {}
                else => break,
            }
        }
        let SmallChunk {
            rows, held, marks, ..
        } = waiting.into_chunk();
        (imported.rows, imported.held, imported.marks) = (rows, held, marks);
        Ok(Some(imported))
    }

    /// Hands committed batches to the fleet. A push that fails is only logged:
    /// the batch row exists, and the waiting sync job runs batches no worker
    /// started (see [`Self::wait_for_batches`]).
    async fn enqueue_batches(&self, fanout: &dyn FanOut, ids: Vec<i64>) {
        // All at once: one after another, a page's pushes (three Redis
        // round trips each) held its last batches back from idle workers by
        // tens of milliseconds on a busy machine. (Each push checks the
        // backlog alone, so a page may pass the limit by its own batches.)
        let run_id = self.run.id.as_str();
        let pushes = ids
            .into_iter()
            .map(|batch| -> futures::future::BoxFuture<'_, _> {
                Box::pin(async move { (batch, fanout.push_batch(run_id, batch).await) })
            });
        for (batch, pushed) in futures::future::join_all(pushes).await {
            match pushed {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    batch_id = batch,
                    "queue backlog full; the sync job will run this batch"
                ),
                Err(err) => {
                    tracing::warn!(batch_id = batch, error = %err, "batch not enqueued; the sync job will run it")
                }
            }
        }
    }

    /// Waits until at most `max` batches of the run are unfinished. False when
    /// the run stopped being `running` meanwhile (cancelled).
    ///
    /// This job holds a worker slot while it waits, so rather than idle it
    /// runs batches no worker has started, the newest first: the queue hands
    /// out the oldest first, so the two meet at the run's last batches, where
    /// a batch claimed here is skipped by its queued job. It also takes
    /// every batch whose claim went stale (its holder died, its job perhaps
    /// lost with it) or was given back after a failed attempt, so no batch
    /// depends on its queued job alone. (A batch run twice would cost time
    /// only: rows are linked once, and only the attempt that marks the
    /// batch done records its failures.) It is also what keeps a run going
    /// when every slot of the fleet is held by such waiting jobs.
    async fn wait_for_batches(&self, max: u64) -> Result<bool> {
        let watch = (self.fanout).map(|fanout| fanout.watch(ended::Ended::Batch, &self.run.id));
        loop {
            let ended = watch.as_ref().map(ended::Watch::next);
            self.check_stopping()?;
            let pending = batches::pending(self.db, &self.run.id).await?;
            if pending <= max {
                return Ok(true);
            }
            if runs::get(self.db, &self.run.id).await?.status != RunStatus::Running.as_str() {
                return Ok(false);
            }
            let stale = self.settings.stale_before();
            if let Some(batch) = batches::claim_unstarted(self.db, &self.run.id, stale).await? {
                if !self.run_claimed(&batch).await? {
                    return Ok(false);
                }
                continue;
            }
            // A batch's end is announced: look again then (or after a
            // poll, should the announcement be lost).
            ended::until(ended, self.settings.poll_interval).await;
        }
    }

    /// Runs a batch this waiting job claimed; false when the run stopped.
    /// As its queued job would: one whose attempts ran out (its holders kept
    /// dying, or failing) is given up, and one that fails for good too. One
    /// that fails for now is given back with its error kept, for whoever
    /// takes it next after [`BATCH_RETRY_PAUSE`] (its attempts bound the
    /// retries), instead of failing this job's own attempt, which let one
    /// bad batch fail the whole run. Only this worker's shutdown ends the
    /// job here.
    async fn run_claimed(&self, batch: &sync_batch::Model) -> Result<bool> {
        const WORKER: &str = "sync-job";
        if batch.attempts > i64::from(self.settings.max_attempts) {
            self.give_up_batch(batch, WORKER).await?;
        } else {
            match self.run_batch(batch, WORKER).await {
                Ok(Outcome::Finished) => {}
                Ok(Outcome::Stopped) => {
                    batches::release_claim(self.db, batch.id, batch.attempts).await?;
                    return Ok(false);
                }
                Err(err) => {
                    // Kept first: the next taker's "gave up" message names it.
                    let _ = batches::note_error(self.db, batch.id, &err.to_string()).await;
                    batches::release_claim(self.db, batch.id, batch.attempts).await?;
                    self.check_stopping()?;
                    if err.is_transient() {
                        tokio::time::sleep(BATCH_RETRY_PAUSE).await;
                        return Ok(true);
                    }
                    self.give_up_batch_for(batch, WORKER, err.to_string())
                        .await?;
                }
            }
        }
        // For the run's other waiters (its job, or the jobs of its other
        // partitions).
        if let Some(fanout) = self.fanout {
            fanout.announce(ended::Ended::Batch, &self.run.id).await;
        }
        Ok(true)
    }

    /// Runs one fan-out batch: imports its objects, then, in one transaction,
    /// marks it done and records its failures (so a duplicate attempt counts
    /// nothing twice).
    #[tracing::instrument(skip_all, fields(run_id = %self.run.id, batch_id = batch.id), err)]
    pub async fn run_batch(&self, batch: &sync_batch::Model, worker: &str) -> Result<Outcome> {
        let work = async {
            let backend = storage::open_shared(self.storage, self.env).await?;
            let objects: Vec<ToRead> = batches::objects(batch)?;
            let Some(imported) = self.import_objects(&backend, objects, true, false).await? else {
                return Ok(Outcome::Stopped);
            };
            self.finish_batch(batch.id, worker, imported).await
        };
        self.renewing_claim(batch, work).await
    }

    /// Runs `work` on `batch`, renewing its claim every
    /// heartbeat meanwhile, so no other job takes a batch that is only
    /// slow. The two are polled together: a renewal awaited in between
    /// polls of `work` waited for the row lock of `work`'s own commit,
    /// which waited to be polled (a deadlock a lagging database showed).
    async fn renewing_claim(
        &self,
        batch: &sync_batch::Model,
        work: impl Future<Output = Result<Outcome>>,
    ) -> Result<Outcome> {
        tokio::select! {
            outcome = work => outcome,
            never = renew_claim_every(self.db, batch, self.settings.heartbeat) => match never {},
        }
    }

    /// Gives a batch up after its attempts ran out (its last error, or that
    /// they never finished, as the reason).
    pub async fn give_up_batch(&self, batch: &sync_batch::Model, worker: &str) -> Result<()> {
        let reason = crate::attempt::gave_up(batch.attempts - 1, batch.last_error.as_deref());
        let reason = format!("batch {} {reason}", batch.id);
        self.give_up_batch_for(batch, worker, reason).await
    }

    /// Gives a batch up for `reason`: its objects with no task yet fail
    /// (rows an earlier attempt imported are kept, so their objects did
    /// not).
    pub async fn give_up_batch_for(
        &self,
        batch: &sync_batch::Model,
        worker: &str,
        reason: String,
    ) -> Result<()> {
        let objects: Vec<crate::storage::ObjectMeta> = batches::objects(batch).unwrap_or_default();
        let keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
        let linked =
            crate::db::links::known_objects(self.db, self.run.storage_id, &self.run.id, &keys)
                .await?;
        let errors: Vec<_> = keys
            .into_iter()
            .filter(|k| !linked.contains_key(k))
            .map(|k| (k, None, reason.clone()))
            .collect();
        let given_up = Imported {
            failed: errors.len() as i64,
            errors,
            ..Default::default()
        };
        self.finish_batch(batch.id, worker, given_up).await?;
        Ok(())
    }

    /// Marks a batch done with its last rows and its failures, all in one
    /// transaction (one update of the run's row per batch, where a separate
    /// commit of the rows made two). When another attempt marked it done
    /// first, nothing is written: that attempt committed the same rows, or
    /// gave the batch up and counted the objects with no task as failed.
    /// When the run is no longer running (cancelled), the batch is closed
    /// without counting or adding anything, so nothing waits on it.
    pub async fn finish_batch(&self, id: i64, worker: &str, imported: Imported) -> Result<Outcome> {
        let txn = crate::db::begin_write(self.db).await?;
        if !batches::mark_done(&txn, id, worker).await? {
            txn.rollback().await?;
            return Ok(Outcome::Finished);
        }
        let (created, _) = insert_rows(&txn, self, imported.rows, imported.marks).await?;
        let delta = Counters {
            created,
            failed: imported.failed,
            ..Counters::default()
        };
        if !runs::checkpoint(&txn, &self.run.id, &delta, None, None).await? {
            txn.rollback().await?;
            batches::mark_done(self.db, id, worker).await?;
            return Ok(Outcome::Stopped);
        }
        runs::record_errors(&txn, &self.run.id, imported.errors).await?;
        txn.commit().await?;
        Ok(Outcome::Finished)
    }

    /// Commits new rows (of one object or of several small ones, with
    /// those small objects' partial marks) and task updates in one
    /// transaction with the run's `created` counter; false when the run
    /// stopped. Rows linked meanwhile are skipped by the link key and not
    /// counted.
    pub(super) async fn commit_rows(
        &self,
        new: Vec<NewTask>,
        updates: Vec<(i64, serde_json::Value, Option<serde_json::Value>)>,
        marks: Vec<links::PartialMark>,
    ) -> Result<bool> {
        if new.is_empty() && updates.is_empty() && marks.is_empty() {
            return Ok(true);
        }
        let txn = crate::db::begin_write(self.db).await?;
        tasks::update_tasks(&txn, updates).await?;
        let (created, _) = insert_rows(&txn, self, new, marks).await?;
        let delta = Counters {
            created,
            ..Counters::default()
        };
        if !runs::checkpoint(&txn, &self.run.id, &delta, None, None).await? {
            txn.rollback().await?;
            return Ok(false);
        }
        txn.commit().await?;
        Ok(true)
    }
}

/// What [`ImportJob::import_objects`] leaves to its caller: the objects'
/// failures, and the rows of the last small objects, not committed yet, so
/// that they go in with the caller's next write (a fan-out batch's end; on
/// their own for an import in the run's job).
#[derive(Debug, Default)]
pub struct Imported {
    pub failed: i64,
    pub errors: Vec<ObjectError>,
    pub rows: Vec<NewTask>,
    /// The rows' share of the process's rows in flight, to let go once
    /// they are committed.
    pub held: Vec<SemaphorePermit<'static>>,
    /// Their objects' partial marks, written with them.
    pub marks: Vec<links::PartialMark>,
}

/// Inserts `rows` as tasks of `job`'s run in `txn` (nothing when there are
/// none), and writes their small objects' partial `marks`: (created,
/// existed), see [`tasks::insert_tasks`].
async fn insert_rows(
    txn: &sea_orm::DatabaseTransaction,
    job: &ImportJob<'_>,
    rows: Vec<NewTask>,
    marks: Vec<links::PartialMark>,
) -> Result<(i64, i64)> {
    if !marks.is_empty() {
        links::write_marks(txn, job.storage.id, marks).await?;
    }
    if rows.is_empty() {
        return Ok((0, 0));
    }
    tasks::insert_tasks(txn, job.project.id, job.storage.id, &job.run.id, rows).await
}

/// `pages` with the first page cut after `first_part` objects, its listing
/// errors going with the rest. The first part is planned and committed on
/// its own, so its tasks (or a worker's first batches, at `first_part` = a
/// worker's slots x a batch) come without waiting for a whole page's
/// lookups and rows: a 1,000-key page took 15-20 ms of them before its
/// first batch could start, on every run's critical path.
fn split_first(
    pages: impl Stream<Item = Result<storage::Page>> + Send + 'static,
    first_part: usize,
) -> impl Stream<Item = Result<storage::Page>> + Send + 'static {
    pages.enumerate().flat_map(move |(i, page)| {
        let parts = match page {
            Ok(mut page) if i == 0 && page.objects.len() > first_part => {
                let rest = page.objects.split_off(first_part);
                let first = storage::Page {
                    objects: std::mem::take(&mut page.objects),
                    errors: Vec::new(),
                };
                let rest = storage::Page {
                    objects: rest,
                    errors: page.errors,
                };
                vec![Ok(first), Ok(rest)]
            }
            other => vec![other],
        };
        futures::stream::iter(parts)
    })
}

/// Objects per fan-out batch: a Tasks-mode run hands its new objects to the
/// fleet in batches of this many, at most [`MAX_BATCHES_IN_FLIGHT`] unfinished
/// (far below apalis-redis' ~8,000 due-job limit: docs/DECISIONS.md,
/// "Due-job backlog limit"). A whole number of rounds of `fetch_concurrency`
/// reads ([`BATCH_ROUNDS`]), what each slot reads at once when every slot
/// of a worker reads (see [`reads`]), so no round of a batch runs
/// part-empty (50 objects at 16 took 4 rounds for 3.1 rounds' work),
/// within 16..=1,000.
fn batch_objects(fetch_concurrency: usize) -> usize {
    (fetch_concurrency.max(1) * BATCH_ROUNDS).clamp(16, 1000)
}

/// Commits of small objects' rows one job has in flight at once.
const SMALL_COMMITS: usize = 2;

/// Small objects' rows waiting to be committed, object by object, with
/// their size in memory, their share of the rows in flight and their partial
/// marks.
#[derive(Default)]
struct SmallRows {
    objects: std::collections::VecDeque<SmallChunk>,
    rows: usize,
    bytes: usize,
}

/// Rows to commit together (one small object's, or several), about how
/// many bytes they take in memory, their share of the rows in flight, held
/// until their transaction ends, and their objects' partial marks.
#[derive(Debug, Default)]
struct SmallChunk {
    rows: Vec<NewTask>,
    bytes: usize,
    held: Vec<SemaphorePermit<'static>>,
    marks: Vec<links::PartialMark>,
}

impl SmallChunk {
    fn append(&mut self, mut other: SmallChunk) {
        self.rows.append(&mut other.rows);
        self.bytes += other.bytes;
        self.held.append(&mut other.held);
        self.marks.append(&mut other.marks);
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.marks.is_empty()
    }
}

impl SmallRows {
    /// Takes an object's small rows (`task_files::ObjectResult::deferred`).
    fn add(&mut self, object: SmallChunk) {
        if !object.is_empty() {
            self.rows += object.rows.len();
            self.bytes += object.bytes;
            self.objects.push_back(object);
        }
    }

    fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The first objects' rows that fit in one chunk (at least one
    /// object's; each is smaller than a chunk): once they hold a chunk's
    /// worth, or at once when `any`.
    fn next_chunk(&mut self, any: bool) -> Option<SmallChunk> {
        let full = self.rows >= task_files::CHUNK_ROWS || self.bytes >= task_files::CHUNK_BYTES;
        if !full && !any {
            return None;
        }
        let mut chunk = SmallChunk::default();
        while let Some(next) = self.objects.front() {
            let fits = chunk.rows.len() + next.rows.len() <= task_files::CHUNK_ROWS
                && chunk.bytes + next.bytes <= task_files::CHUNK_BYTES;
            if !chunk.is_empty() && !fits {
                break;
            }
            let Some(object) = self.objects.pop_front() else {
                break;
            };
            self.rows -= object.rows.len();
            self.bytes -= object.bytes;
            chunk.append(object);
        }
        (!chunk.is_empty()).then_some(chunk)
    }

    /// Every row still waiting, in one chunk.
    fn into_chunk(self) -> SmallChunk {
        let mut chunk = SmallChunk::default();
        self.objects
            .into_iter()
            .for_each(|object| chunk.append(object));
        chunk
    }
}

/// Rounds of reads per fan-out batch (see [`batch_objects`]).
const BATCH_ROUNDS: usize = 4;
/// Unfinished batches one run may have at once.
const MAX_BATCHES_IN_FLIGHT: u64 = 64;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn page(keys: std::ops::Range<usize>, errors: &[&str]) -> storage::Page {
        storage::Page {
            objects: keys
                .map(|i| ObjectMeta {
                    key: format!("k{i:04}"),
                    size: None,
                    last_modified: None,
                    etag: None,
                })
                .collect(),
            errors: errors
                .iter()
                .map(|k| storage::ListError {
                    key: (*k).to_owned(),
                    message: "unreadable".into(),
                    incomplete: true,
                })
                .collect(),
        }
    }

    /// Keys and listing errors of each page `split_first` gives.
    async fn split(pages: Vec<storage::Page>, first_part: usize) -> Vec<(Vec<String>, usize)> {
        let pages = futures::stream::iter(pages.into_iter().map(Ok));
        split_first(pages, first_part)
            .map(|page| {
                let page = page.expect("a page");
                let keys = page.objects.into_iter().map(|o| o.key).collect();
                (keys, page.errors.len())
            })
            .collect()
            .await
    }

    /// The first page is cut after `first_part` objects, in key order, its
    /// listing errors with the rest; later pages, and a first page no
    /// longer than the part, pass whole.
    #[tokio::test]
    async fn the_first_page_is_cut_after_its_first_part() {
        let keys = |r: std::ops::Range<usize>| r.map(|i| format!("k{i:04}")).collect::<Vec<_>>();
        let pages = vec![page(0..10, &["dir/"]), page(10..20, &[])];
        assert_eq!(
            split(pages, 4).await,
            vec![(keys(0..4), 0), (keys(4..10), 1), (keys(10..20), 0)]
        );
        let pages = vec![page(0..4, &[]), page(4..10, &[])];
        assert_eq!(
            split(pages, 4).await,
            vec![(keys(0..4), 0), (keys(4..10), 0)]
        );
    }

    fn rows(count: usize) -> Vec<NewTask> {
        (0..count)
            .map(|i| NewTask {
                object_key: "k".into(),
                row_index: i as i64,
                data: json!({}),
                meta: None,
                annotations: Vec::new(),
                predictions: Vec::new(),
                etag: None,
                size: None,
                last_modified: None,
            })
            .collect()
    }

    /// A batch's objects are stored as JSON: one written before the mark
    /// was stored reads as unmarked, an unmarked one is written as before,
    /// and a marked one still reads as a listed object (what a batch given
    /// up reads its objects as, `jobs::give_up_batch`).
    #[test]
    fn a_batch_object_reads_with_or_without_its_mark() {
        let listed = json!([{"key": "a.json", "size": 3, "last_modified": null, "etag": "e"}]);
        let read: Vec<ToRead> = serde_json::from_value(listed.clone()).expect("old form");
        assert!(!read[0].marked);
        assert_eq!(serde_json::to_value(&read).expect("json"), listed);
        let marked = ToRead {
            marked: true,
            ..read[0].clone()
        };
        let stored = serde_json::to_value(vec![marked]).expect("json");
        assert_eq!(stored[0]["marked"], true);
        let again: Vec<ToRead> = serde_json::from_value(stored.clone()).expect("new form");
        assert!(again[0].marked);
        let objects: Vec<ObjectMeta> = serde_json::from_value(stored).expect("as listed");
        assert_eq!(objects[0], read[0].object);
    }

    /// Small objects' rows go out in chunks of whole objects, within a
    /// chunk's rows and bytes (at least one object each), once a chunk's
    /// worth waits; what is left goes back to the caller.
    #[test]
    fn small_rows_go_out_a_chunk_of_whole_objects_at_a_time() {
        let mut waiting = SmallRows::default();
        let add = |waiting: &mut SmallRows, count: usize, bytes: usize| {
            waiting.add(SmallChunk {
                rows: rows(count),
                bytes,
                ..Default::default()
            })
        };
        let next = |waiting: &mut SmallRows, any| waiting.next_chunk(any).map(|c| c.rows.len());
        for _ in 0..5 {
            add(&mut waiting, 1000, 1 << 20);
        }
        assert_eq!(next(&mut waiting, false), Some(4000));
        assert_eq!(next(&mut waiting, false), None, "1,000 rows wait");
        for _ in 0..3 {
            add(&mut waiting, 10, 7 << 20);
        }
        // 22 MiB wait: the 1 MiB object and the first 7 MiB one, then one
        // 7 MiB object at a time.
        assert_eq!(next(&mut waiting, false), Some(1010));
        assert_eq!(next(&mut waiting, false), Some(10));
        assert_eq!(next(&mut waiting, false), None, "7 MiB wait");
        // Once a parse waits for room, what waits goes, whole chunk or not.
        add(&mut waiting, 5, 1 << 10);
        assert_eq!(next(&mut waiting, true), Some(15));
        assert_eq!(next(&mut waiting, true), None, "nothing waits");
        add(&mut waiting, 3, 1 << 10);
        assert_eq!(waiting.into_chunk().rows.len(), 3);
    }
}
