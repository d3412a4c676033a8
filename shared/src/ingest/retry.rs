//! The "listing" of a `retry` run (`runs::SCOPE_RETRY`): the keys its
//! original run (`retry_of`) recorded per-object errors for, a page at a
//! time in key order, each looked up in the storage so the page holds what
//! is there now. A key no longer there is left out (nothing is flagged or
//! deleted for it: a retry run does no missing-object detection); a key
//! shown with `\0` is also looked for as one holding NUL there (it could
//! not be stored as it is). A key ending in `/` (a part of the listing
//! that could not be read) is listed again whole, a page of the storage's
//! listing at a time: each page commits on its own with its last key as
//! the run's cursor, so the objects in memory and a transaction are a
//! page's, never a directory's (the local and Databricks walkers still
//! read one directory's names at a time), and a resumed run goes on
//! inside the directory its cursor is in. A key whose lookup fails for good (unreadable) is an error of the
//! retry run, as it would be of a listing.
use std::{collections::VecDeque, sync::Arc};

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use sea_orm::DatabaseConnection;

use crate::{
    Result,
    db::runs,
    storage::{ListError, ListOptions, Page, Storage},
};

/// Keys looked up at once.
const LOOKUPS_AT_ONCE: usize = 8;

/// Where the pages come from.
pub struct Source {
    pub db: DatabaseConnection,
    pub backend: Arc<dyn Storage>,
    /// The run whose errors are read again.
    pub retry_of: String,
    /// The key the retry run got to (its cursor).
    pub after: Option<String>,
    pub page_size: u64,
    pub recursive: bool,
}

/// Pages of the objects behind the original run's errors, each with the
/// cursor its commit moves the run to: the last error key it covers, or
/// `None` for a page of a directory's listing (the page's last key then).
pub fn pages(source: Source) -> BoxStream<'static, Result<(Page, Option<String>)>> {
    let walk = Walk {
        source,
        pending: VecDeque::new(),
        dir: None,
        covered: Vec::new(),
        resumed: false,
    };
    futures::stream::try_unfold(walk, |mut walk| async move {
        Ok(walk.next_page().await?.map(|page| (page, walk)))
    })
    .boxed()
}

/// Where a retry run's reading is.
struct Walk {
    source: Source,
    /// Error keys read (up to `source.after`) and not yet looked up.
    pending: VecDeque<String>,
    /// The directory being listed again: its key and its listing.
    dir: Option<(String, BoxStream<'static, Result<Page>>)>,
    /// The directory listed last and those it lies in that were listed
    /// before it: the error keys they listed too are not looked up again.
    covered: Vec<String>,
    /// Whether the cursor the run resumed from was placed (it may be
    /// inside a directory).
    resumed: bool,
}

impl Walk {
    async fn next_page(&mut self) -> Result<Option<(Page, Option<String>)>> {
        if !self.resumed {
            self.resumed = true;
            self.resume_in_directory().await?;
        }
        loop {
            if let Some(page) = self.dir_page().await? {
                return Ok(Some((page, None)));
            }
            if self.pending.is_empty() && !self.read_keys().await? {
                return Ok(None);
            }
            if let Some(found) = self.look_up_keys().await? {
                return Ok(Some(found));
            }
        }
    }

    /// A run resumed with its cursor inside a directory it was listing
    /// again goes on listing that directory after the cursor, and then
    /// with the error keys after the directory's own. The directory is the
    /// one whose listing gives the cursor's key: of the error keys naming
    /// one of its directories, the outermost for a recursive listing
    /// (the keys under it were listed with it, never looked up); the
    /// cursor's own directory for one that is not (a key deeper down was
    /// looked up by itself, and is the cursor as an error key).
    async fn resume_in_directory(&mut self) -> Result<()> {
        let Some(after) = self.source.after.clone() else {
            return Ok(());
        };
        let mut dirs: Vec<String> = after
            .match_indices('/')
            .map(|(at, _)| after[..=at].to_owned())
            .filter(|dir| *dir != after)
            .collect();
        if !self.source.recursive {
            dirs = dirs.pop().into_iter().collect();
        }
        if dirs.is_empty() {
            return Ok(());
        }
        let (db, retry_of) = (&self.source.db, &self.source.retry_of);
        let found = runs::error_keys_among(db, retry_of, dirs).await?;
        if let Some(dir) = found.into_iter().min_by_key(String::len) {
            // The error keys are read again from the directory's: the
            // cursor is a key of the storage, which the database may sort
            // among them otherwise than by its bytes (a collation).
            self.source.after = Some(dir.clone());
            self.start_listing(dir, Some(after));
        }
        Ok(())
    }

    fn start_listing(&mut self, dir: String, start_after: Option<String>) {
        let listing = self.source.backend.list(ListOptions {
            prefix: dir.clone(),
            recursive: self.source.recursive,
            start_after,
            page_size: usize::try_from(self.source.page_size.max(1)).unwrap_or(usize::MAX),
        });
        self.dir = Some((dir, listing));
    }

    /// The next page of the directory being listed; `None` when there is
    /// none or its listing ended. A listing that fails for good ends with
    /// a page holding its error, as a listing's part that cannot be read
    /// does (only a transient failure retries the run).
    async fn dir_page(&mut self) -> Result<Option<Page>> {
        let Some((dir, listing)) = &mut self.dir else {
            return Ok(None);
        };
        let failed = match listing.next().await {
            Some(Ok(page)) => return Ok(Some(page)),
            Some(Err(err)) if err.is_transient() => return Err(err),
            Some(Err(err)) => Some(ListError {
                key: dir.clone(),
                message: err.to_string(),
                incomplete: true,
            }),
            None => None,
        };
        if let Some((dir, _)) = self.dir.take() {
            // In byte order no later key lies under a listed directory
            // but this one or one holding it (the database's order may
            // differ: a key is then at worst looked up again).
            self.covered.retain(|outer| dir.starts_with(outer.as_str()));
            self.covered.push(dir);
        }
        Ok(failed.map(|error| Page {
            objects: Vec::new(),
            errors: vec![error],
        }))
    }

    /// Reads the next error keys; false when none is left.
    async fn read_keys(&mut self) -> Result<bool> {
        let source = &self.source;
        let keys = runs::error_keys(
            &source.db,
            &source.retry_of,
            source.after.as_deref(),
            source.page_size.max(1),
        )
        .await?;
        let Some(last) = keys.last() else {
            return Ok(false);
        };
        self.source.after = Some(last.clone());
        self.pending.extend(keys);
        Ok(true)
    }

    /// Looks up the pending keys before the next directory's, as one page
    /// whose cursor is the last of them; at a directory's key, starts
    /// listing it instead (`None`).
    async fn look_up_keys(&mut self) -> Result<Option<(Page, Option<String>)>> {
        let mut keys = Vec::new();
        while let Some(key) = self.pending.pop_front() {
            if self.covers(&key) {
                continue;
            }
            if key.ends_with('/') {
                if keys.is_empty() {
                    self.start_listing(key, None);
                    return Ok(None);
                }
                self.pending.push_front(key);
                break;
            }
            keys.push(key);
        }
        let Some(last) = keys.last().cloned() else {
            return Ok(None);
        };
        let backend = &self.source.backend;
        let found: Vec<Page> = futures::stream::iter(keys)
            .map(|key| look_up(backend.clone(), key))
            .buffered(LOOKUPS_AT_ONCE)
            .try_collect()
            .await?;
        let mut page = Page::default();
        for mut one in found {
            page.objects.append(&mut one.objects);
            page.errors.append(&mut one.errors);
        }
        page.objects.sort_by(|a, b| a.key.cmp(&b.key));
        page.objects.dedup_by(|a, b| a.key == b.key);
        Ok(Some((page, Some(last))))
    }

    /// Whether a directory listed listed `key` too.
    fn covers(&self, key: &str) -> bool {
        self.covered.iter().any(|dir| {
            key.strip_prefix(dir.as_str())
                .is_some_and(|rest| self.source.recursive || !rest.contains('/'))
        })
    }
}

/// What the storage holds now under one error key (not a directory's).
async fn look_up(backend: Arc<dyn Storage>, key: String) -> Result<Page> {
    let found = find_object(&*backend, &key, &key).await?;
    // A key shown with `\0` may stand for one holding NUL (which no error
    // row can store): looked for from the part before it.
    match key.find("\\0") {
        Some(at) if found.objects.is_empty() && found.errors.is_empty() => {
            find_object(&*backend, &key[..at], &key).await
        }
        _ => Ok(found),
    }
}

/// The object shown as `key`, listed from `from`: the key itself, where it
/// comes first among the keys it is a prefix of, or the part of it before
/// a NUL, where the keys holding a NUL there come first (NUL sorts before
/// every other character).
async fn find_object(backend: &dyn Storage, from: &str, key: &str) -> Result<Page> {
    let mut listing = backend.list(ListOptions {
        prefix: from.to_owned(),
        // The part before a NUL may be in the middle of a folder's name.
        recursive: from != key,
        start_after: None,
        page_size: 100,
    });
    let nul_run = format!("{from}\0");
    let mut found = Page::default();
    while let Some(mut page) = next_page(&mut listing, key, &mut found).await? {
        found.errors.append(&mut page.errors);
        let mut past = from == key;
        for object in page.objects {
            if super::shown(&object.key) == key {
                found.objects.push(object);
            } else if object.key != from && !object.key.starts_with(&nul_run) {
                past = true;
            }
        }
        if past {
            break;
        }
    }
    Ok(found)
}

/// The listing's next page; `None` at its end or when it cannot be read,
/// which is then `key`'s error in `found`, as in a listing (only a
/// transient failure retries the run).
async fn next_page(
    listing: &mut BoxStream<'_, Result<Page>>,
    key: &str,
    found: &mut Page,
) -> Result<Option<Page>> {
    match listing.next().await {
        Some(Err(err)) if !err.is_transient() => {
            found.errors.push(ListError {
                key: key.to_owned(),
                message: err.to_string(),
                incomplete: true,
            });
            Ok(None)
        }
        other => other.transpose(),
    }
}
