//! The "listing" of a `retry` run (`runs::SCOPE_RETRY`): the keys its
//! original run (`retry_of`) recorded per-object errors for, a page at a
//! time in key order, each looked up in the storage so the page holds what
//! is there now. A key no longer there is left out (nothing is flagged or
//! deleted for it: a retry run does no missing-object detection); a key
//! ending in `/` (a part of the listing that could not be read) is listed
//! again whole; a key shown with `\0` is also looked for as one holding
//! NUL there (it could not be stored as it is). A key whose lookup fails
//! for good (unreadable) is an error of the retry run, as it would be of a
//! listing.
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
    if key.ends_with('/') {
        return list_under(&*backend, &key, recursive).await;
    }
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

/// Everything listed under the directory `key`.
async fn list_under(backend: &dyn Storage, key: &str, recursive: bool) -> Result<Page> {
    let mut listing = backend.list(ListOptions {
        prefix: key.to_owned(),
        recursive,
        start_after: None,
        page_size: 1000,
    });
    let mut found = Page::default();
    while let Some(mut page) = next_page(&mut listing, key, &mut found).await? {
        found.errors.append(&mut page.errors);
        found.objects.append(&mut page.objects);
    }
    Ok(found)
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
