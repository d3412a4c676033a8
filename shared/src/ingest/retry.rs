//! The "listing" of a `retry` run (`runs::SCOPE_RETRY`): the keys its
//! original run (`retry_of`) recorded per-object errors for, a page at a
//! time in key order, each looked up in the storage so the page holds what
//! is there now. A key no longer there is left out (nothing is flagged or
//! deleted for it: a retry run does no missing-object detection); a key
//! ending in `/` (a part of the listing that could not be read) is listed
//! again whole. A key whose lookup fails for good (unreadable) is an error
//! of the retry run, as it would be of a listing.
use std::sync::Arc;

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
/// last error key it covers (the retry run's cursor once committed).
pub fn pages(source: Source) -> BoxStream<'static, Result<(Page, Option<String>)>> {
    futures::stream::try_unfold(source, |mut source| async move {
        let keys = runs::error_keys(
            &source.db,
            &source.retry_of,
            source.after.as_deref(),
            source.page_size.max(1),
        )
        .await?;
        let Some(last) = keys.last().cloned() else {
            return Ok(None);
        };
        let (backend, recursive) = (source.backend.clone(), source.recursive);
        let found: Vec<Page> = futures::stream::iter(keys)
            .map(|key| look_up(backend.clone(), key, recursive))
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
        source.after = Some(last.clone());
        Ok(Some(((page, Some(last)), source)))
    })
    .boxed()
}

/// What the storage holds now under one error key: the object itself, or
/// for a directory (a key ending in `/`) everything listed under it.
async fn look_up(backend: Arc<dyn Storage>, key: String, recursive: bool) -> Result<Page> {
    let dir = key.ends_with('/');
    let mut listing = backend.list(ListOptions {
        prefix: key.clone(),
        recursive: dir && recursive,
        start_after: None,
        page_size: if dir { 1000 } else { 100 },
    });
    let mut found = Page::default();
    while let Some(page) = listing.next().await {
        // A key that cannot be read is that key's error, as in a listing;
        // only a transient failure retries the run.
        let mut page = match page {
            Err(err) if !err.is_transient() => {
                found.errors.push(ListError {
                    key: key.clone(),
                    message: err.to_string(),
                    incomplete: true,
                });
                break;
            }
            other => other?,
        };
        found.errors.append(&mut page.errors);
        if dir {
            found.objects.append(&mut page.objects);
            continue;
        }
        // In key order the key itself comes before the longer keys it
        // is a prefix of.
        found
            .objects
            .extend(page.objects.into_iter().filter(|o| o.key == key));
        break;
    }
    Ok(found)
}
