//! What an Azure endpoint can make a worker hold in memory.
//!
//! `object_store` reads some answers whole, with no limit of its own: a
//! listing page, the text of an error answer, a token endpoint's answer.
//! An endpoint is whatever URL a storage's config names, so each of those
//! is cut at [`MAX_PAGE_BYTES`] here, below the crate, where every answer
//! passes. A successful GET that is not a listing is left whole: a blob's
//! content, read as a stream by callers with limits of their own (and a
//! managed identity's token, from the server's own metadata endpoint).
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use async_trait::async_trait;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};

use crate::storage::retry::MAX_PAGE_BYTES;

/// How the error of an answer cut short begins; [`super::classify`] tells
/// it by this.
pub(super) const TOO_BIG: &str = "the storage's answer is over";

/// Our guarded `reqwest` client, with every answer but a blob's content
/// limited to [`MAX_PAGE_BYTES`].
#[derive(Debug)]
pub(super) struct BoundedAnswers(pub(super) reqwest::Client);

#[async_trait]
impl HttpService for BoundedAnswers {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let content = request.method() == http::Method::GET && !is_listing(request.uri());
        let response = self.0.call(request).await?;
        if content && response.status().is_success() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let body = HttpResponseBody::new(Capped {
            inner: body,
            left: MAX_PAGE_BYTES,
        });
        Ok(HttpResponse::from_parts(parts, body))
    }
}

/// A container listing (`comp=list`) or any other `comp=` operation: its
/// answer is a document read whole, not a blob's content.
fn is_listing(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("comp=")))
}

/// A body that fails once more than `left` bytes came, or as soon as its
/// declared length says they will.
struct Capped {
    inner: HttpResponseBody,
    left: usize,
}

impl Capped {
    fn too_big() -> HttpError {
        HttpError::new(
            HttpErrorKind::Decode,
            std::io::Error::other(format!("{TOO_BIG} {} MiB", MAX_PAGE_BYTES >> 20)),
        )
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.inner.size_hint().lower() > self.left as u64 {
            return Poll::Ready(Some(Err(Self::too_big())));
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = &frame
            && let Some(data) = data.data_ref()
        {
            match self.left.checked_sub(data.len()) {
                Some(left) => self.left = left,
                None => return Poll::Ready(Some(Err(Self::too_big()))),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_comp_operations_are_listings() {
        let uri = |s: &str| s.parse::<http::Uri>().expect("a URI");
        assert!(is_listing(&uri("http://h/a/c?restype=container&comp=list")));
        assert!(is_listing(&uri("http://h/a/c?comp=list&prefix=x")));
        assert!(!is_listing(&uri("http://h/a/c/blob.json")));
        assert!(!is_listing(&uri("http://h/a/c/blob.json?sv=1&sig=x")));
        // A blob whose name holds "comp=" is still a blob.
        assert!(!is_listing(&uri("http://h/a/c/x%3Fcomp=list")));
    }
}
