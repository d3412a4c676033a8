//! The wrapper every backend is opened in ([`super::open`]): each request is
//! counted and timed (`labelsync_storage_requests_total`,
//! `labelsync_storage_request_duration_seconds`) and traced (a
//! `storage.request` span with backend, operation, key and outcome).
use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use tracing::Instrument;

use super::{BackendKind, Children, GetRange, ListOptions, Object, Page, Role, Storage};
use crate::{
    Result,
    metrics::{metrics, outcome},
};

/// A backend with every request counted, timed and traced (a
/// `storage.request` span with backend, operation and key).
#[derive(Debug)]
pub struct Instrumented(pub Arc<dyn Storage>);

impl Instrumented {
    async fn call<T>(
        &self,
        operation: &'static str,
        key: &str,
        request: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let kind = self.0.kind();
        let span = request_span(kind, operation, key);
        let started = Instant::now();
        let result = request.instrument(span.clone()).await;
        let outcome = outcome(&result);
        span.record("outcome", outcome);
        metrics().record_storage_request(kind.as_str(), operation, started.elapsed(), outcome);
        result
    }
}

fn request_span(kind: BackendKind, operation: &'static str, key: &str) -> tracing::Span {
    request_span_in(&tracing::Span::current(), kind, operation, key)
}

fn request_span_in(
    parent: &tracing::Span,
    kind: BackendKind,
    operation: &'static str,
    key: &str,
) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "storage.request",
        backend = kind.as_str(),
        operation,
        key,
        outcome = tracing::field::Empty,
    )
}

#[async_trait]
impl Storage for Instrumented {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let kind = self.0.kind();
        let prefix = opts.prefix.clone();
        // One request per page: timed (and spanned) from the previous page's
        // arrival to this one's. Pages may be polled from another task (the
        // listing runs ahead of the writes), so every page's span hangs
        // under the span that asked for the listing.
        let parent = tracing::Span::current();
        let mut started = Instant::now();
        let mut span = request_span_in(&parent, kind, "list", &prefix);
        self.0
            .list(opts)
            .map(move |page| {
                let outcome = outcome(&page);
                span.record("outcome", outcome);
                metrics().record_storage_request(kind.as_str(), "list", started.elapsed(), outcome);
                started = Instant::now();
                span = request_span_in(&parent, kind, "list", &prefix);
                page
            })
            .boxed()
    }

    async fn list_children(
        &self,
        prefix: &str,
        from: Option<&str>,
        max_pages: usize,
    ) -> Result<Option<Children>> {
        self.call(
            "list",
            prefix,
            self.0.list_children(prefix, from, max_pages),
        )
        .await
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        self.call("get", key, self.0.get(key, range)).await
    }

    async fn put(&self, key: &str, body: Bytes, content_type: Option<&str>) -> Result<()> {
        self.call("put", key, self.0.put(key, body, content_type))
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.call("delete", key, self.0.delete(key)).await
    }

    async fn presign(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        self.call("presign", key, self.0.presign(key, ttl)).await
    }

    async fn check(&self, role: Role, prefix: &str) -> Result<()> {
        self.call("check", prefix, self.0.check(role, prefix)).await
    }

    fn task_uri(&self, key: &str) -> String {
        self.0.task_uri(key)
    }

    fn local_file(&self, key: &str) -> Option<Result<std::fs::File>> {
        self.0.local_file(key)
    }
}
