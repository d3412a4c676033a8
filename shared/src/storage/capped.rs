//! A response body cut at a number of bytes, for the answers an HTTP
//! library reads whole with no limit of its own (a listing page, an error's
//! text, a token endpoint's answer): an endpoint is whatever URL a
//! storage's config names, so a server could make a process hold anything.
//! Wrapped around each library's body type below the library, where every
//! answer passes (`azure::bounded`, `s3::bounded`).
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// How the error of an answer cut short begins: the backends' error
/// classifiers tell it by this (`storage_answer_too_big`).
pub(super) const TOO_BIG: &str = "the storage's answer is over";

/// The text of the error of an answer over `limit` bytes.
pub(super) fn too_big_text(limit: usize) -> String {
    format!("{TOO_BIG} {} MiB", limit >> 20)
}

/// `inner`, failing once more than `left` bytes came, or as soon as its
/// declared length says they will, with the error `too_big` makes.
pub(super) struct Capped<B: Body> {
    inner: B,
    left: usize,
    too_big: fn() -> B::Error,
}

impl<B: Body> Capped<B> {
    pub(super) fn new(inner: B, limit: usize, too_big: fn() -> B::Error) -> Self {
        Capped {
            inner,
            left: limit,
            too_big,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Capped<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.inner.size_hint().lower() > self.left as u64 {
            return Poll::Ready(Some(Err((self.too_big)())));
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = &frame
            && let Some(data) = data.data_ref()
        {
            match self.left.checked_sub(data.len()) {
                Some(left) => self.left = left,
                None => return Poll::Ready(Some(Err((self.too_big)()))),
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
