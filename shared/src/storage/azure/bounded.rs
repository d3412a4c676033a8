//! What an Azure endpoint can make a worker hold in memory.
//!
//! `object_store` reads some answers whole, with no limit of its own: a
//! listing page, the text of an error answer, a token endpoint's answer.
//! An endpoint is whatever URL a storage's config names, so each of those
//! is cut at [`MAX_PAGE_BYTES`] here, below the crate, where every answer
//! passes. A successful GET that is not a listing is left whole: a blob's
//! content, read as a stream by callers with limits of their own (and a
//! managed identity's token, from the server's own metadata endpoint).
use async_trait::async_trait;
use object_store::client::{
    HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};

use crate::storage::{
    capped::{Capped, too_big_text},
    retry::MAX_PAGE_BYTES,
};

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
        let body = HttpResponseBody::new(Capped::new(body, MAX_PAGE_BYTES, too_big));
        Ok(HttpResponse::from_parts(parts, body))
    }
}

/// A container listing (`comp=list`) or any other `comp=` operation: its
/// answer is a document read whole, not a blob's content.
fn is_listing(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("comp=")))
}

/// An answer over [`MAX_PAGE_BYTES`]'s error, as object_store's own.
fn too_big() -> HttpError {
    HttpError::new(
        HttpErrorKind::Decode,
        std::io::Error::other(too_big_text(MAX_PAGE_BYTES)),
    )
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
