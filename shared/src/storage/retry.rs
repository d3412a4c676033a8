//! Retries of storage requests: exponential backoff with full jitter on
//! transient errors (5xx, throttling, timeouts, resets), never on permanent
//! ones (403, 404, bad credentials). The S3 and Azure clients retry inside
//! their SDKs with their standard policy (the same attempts, a longer
//! backoff: 1-20 s); the hand-written HTTP calls (GCS JSON API, Databricks,
//! S3's signed GETs) and Redis use [`retry`].
use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;

use crate::{Error, Result};

/// Attempts per request, the first included.
pub const MAX_ATTEMPTS: u32 = 5;
const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(5);

/// The pause before retry `attempt` (1-based): uniform in
/// [0, min(CAP, BASE * 2^attempt)] ("full jitter"), so clients that failed
/// together do not come back together.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1 << attempt.min(16)).min(CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// Runs `op` until it succeeds, fails permanently, or has failed
/// [`MAX_ATTEMPTS`] times.
pub async fn retry<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(err) if err.is_transient() && attempt < MAX_ATTEMPTS => {
                let pause = backoff(attempt);
                tracing::debug!(what, attempt, ?pause, error = %err, "storage request failed; retrying");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Classifies an HTTP error status of a storage API.
pub fn status_error(status: StatusCode, what: &str, detail: &str) -> Error {
    let detail = detail.trim();
    let detail: String = detail.chars().take(300).collect();
    let msg = if detail.is_empty() {
        format!("{what}: HTTP {status}")
    } else {
        format!("{what}: HTTP {status}: {detail}")
    };
    match status.as_u16() {
        401 => Error::Unauthenticated(msg),
        403 => Error::PermissionDenied(msg),
        404 => Error::NotFound(msg),
        408 | 429 | 500..=599 => Error::Transient(msg),
        416 => Error::invalid("range_not_satisfiable", Some("range"), msg),
        _ => Error::invalid("storage_rejected", None, msg),
    }
}

/// The most of an error response read for its detail.
const ERROR_BODY_BYTES: usize = 8 * 1024;
/// The longest an error response's body is waited for (one trickling in
/// keeps the client's per-read timeout from firing).
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// The start of an error response's body, for its detail: at most
/// [`ERROR_BODY_BYTES`] (lossy UTF-8), whatever arrived within
/// [`ERROR_BODY_WAIT`]. A server cannot make a failed request hold memory
/// or the worker with its error body.
pub async fn error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while body.len() < ERROR_BODY_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(ERROR_BODY_WAIT, read).await;
    body.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

/// The most of a listing page's answer read (S3's XML, the GCS and
/// Databricks JSON): 1,000 entries with the longest keys, every character
/// escaped, fit several times over.
pub const MAX_PAGE_BYTES: usize = 32 << 20;

/// A listing page's JSON answer, read whole up to [`MAX_PAGE_BYTES`]
/// ([`body_up_to`]) and decoded.
pub async fn json_page<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    deadline: std::time::Duration,
    what: &str,
) -> Result<T> {
    let body = body_up_to(response, MAX_PAGE_BYTES, deadline, what).await?;
    serde_json::from_slice(&body).map_err(|e| {
        let crowded = e.to_string().contains(CROWDED);
        let message = format!("{what}: unreadable answer: {e}");
        if crowded {
            Error::invalid("storage_answer_too_big", None, message)
        } else {
            Error::Transient(message)
        }
    })
}

/// The most entries one list of a JSON listing page is read with: the
/// largest `LABELSYNC_PAGE_SIZE` (GCS and the Files API send 1,000 at
/// most). A 32 MiB page holds 2.5 million `{"name":"a"}`, which took the
/// best part of a gigabyte once parsed; such a page is refused while it is
/// parsed, before it is held.
pub const MAX_PAGE_ENTRIES: usize = 5000;

/// How the error of a page over [`MAX_PAGE_ENTRIES`] begins.
const CROWDED: &str = "a listing page crowded past";

/// serde's `deserialize_with` for a list of a listing page's entries: at
/// most [`MAX_PAGE_ENTRIES`].
pub fn at_most_a_page<'de, D, T>(deserializer: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Entries<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Entries<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<T>, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = seq.next_element()? {
                if entries.len() == MAX_PAGE_ENTRIES {
                    return Err(serde::de::Error::custom(format!(
                        "{CROWDED} {MAX_PAGE_ENTRIES} entries"
                    )));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(Entries(std::marker::PhantomData))
}

/// The whole body of a successful answer that is read in memory (a
/// listing page), refused with a permanent error once it passes `limit`
/// bytes: a server cannot make a worker hold more. A body cut off
/// midway is transient, as its request is, and so is one not whole within
/// `deadline` (the storage's request timeout): the client's read timeout
/// waits for the next bytes only, so a server that sent one byte now and
/// then held a worker slot, or an API request validating a storage, for
/// ever.
pub async fn body_up_to(
    mut response: reqwest::Response,
    limit: usize,
    deadline: std::time::Duration,
    what: &str,
) -> Result<bytes::Bytes> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_big(what, limit));
    }
    let read = async {
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Error::Transient(format!("{what}: {}", body_error(e))))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_big(what, limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| {
        Error::Transient(format!(
            "{what}: the storage's answer did not arrive whole within {} s (LABELSYNC_STORAGE_TIMEOUT_SECS)",
            deadline.as_secs()
        ))
    })?
}

fn too_big(what: &str, limit: usize) -> Error {
    Error::invalid(
        "storage_answer_too_big",
        None,
        format!("{what}: the storage's answer is over {} MiB", limit >> 20),
    )
}

/// An object from a successful GET (of `range`, if any) of a hand-written
/// HTTP backend: the whole size from `Content-Range` on a 206 (else
/// `Content-Length`), the first of `etag_headers` present, the content
/// type, and the body streamed. A server may answer a ranged GET with the
/// whole object (200, as HTTP allows): the body is then cut to the range,
/// which callers count on (`/resolve` answers 206 with it; a resumed
/// parse reads on from an offset).
pub fn object_of(
    resp: reqwest::Response,
    etag_headers: &[reqwest::header::HeaderName],
    range: Option<super::GetRange>,
) -> Result<super::Object> {
    use futures::{StreamExt, TryStreamExt};
    use reqwest::header;
    let text = |name: &header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
    let size = if partial {
        text(&header::CONTENT_RANGE).and_then(|cr| cr.rsplit('/').next()?.parse().ok())
    } else {
        resp.content_length()
    };
    let etag = etag_headers.iter().find_map(text);
    let content_type = text(&header::CONTENT_TYPE);
    let body = resp.bytes_stream().map_err(body_error).boxed();
    let body = match (range, size) {
        (Some(range), Some(size)) if !partial => window(body, range, size),
        // With no size stated the whole object is passed on as the whole
        // (a 200 with no range), which is still a true answer.
        _ => body,
    };
    Ok(super::Object {
        body,
        size,
        etag,
        content_type,
    })
}

/// The part of a whole object's `body` (`size` bytes) that `range` asks
/// for: its first bytes skipped, and the stream ended once the range is
/// read (the rest is not downloaded). For a server that answered a ranged
/// GET with the whole object (200, as HTTP allows).
pub(super) fn window(
    body: super::ByteStream,
    range: super::GetRange,
    size: u64,
) -> super::ByteStream {
    use futures::StreamExt;
    let (skip, take) = match range {
        super::GetRange::Bounded { start, end } => {
            (start, Some(end.saturating_sub(start).saturating_add(1)))
        }
        super::GetRange::From(start) => (start, None),
        super::GetRange::Suffix(n) => (size.saturating_sub(n), Some(n)),
    };
    let cut = futures::stream::unfold(
        (body, skip, take),
        |(mut body, mut skip, left)| async move {
            loop {
                if left == Some(0) {
                    return None;
                }
                let mut chunk = match body.next().await? {
                    Ok(chunk) => chunk,
                    Err(err) => return Some((Err(err), (body, 0, Some(0)))),
                };
                let dropped = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                chunk = chunk.slice(dropped..);
                skip -= dropped as u64;
                let left = left.map(|left| {
                    let kept = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                    chunk.truncate(kept);
                    left - kept as u64
                });
                if !chunk.is_empty() || left == Some(0) {
                    return Some((Ok(chunk), (body, skip, left)));
                }
            }
        },
    );
    cut.boxed()
}

/// An error while a response body streams in: a timeout says which
/// setting bounds it, and every error keeps its causes in its message.
fn body_error(err: reqwest::Error) -> std::io::Error {
    let chain = error_chain(&err);
    if err.is_timeout() {
        return std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data within the storage timeout (LABELSYNC_STORAGE_TIMEOUT_SECS): {chain}"),
        );
    }
    std::io::Error::other(chain)
}

/// Classifies a transport error of reqwest (the request never got an answer).
pub fn transport_error(err: &reqwest::Error, what: &str) -> Error {
    // The SSRF guard refuses in the resolver; that is not worth retrying.
    let chain = error_chain(err);
    if chain.contains("LABELSYNC_ALLOW_PRIVATE_ENDPOINTS") {
        return Error::invalid(
            "endpoint_not_allowed",
            Some("config"),
            format!("{what}: {chain}"),
        );
    }
    Error::Transient(format!("{what}: {chain}"))
}

/// An error and its sources on one line (reqwest's top message alone is
/// often just "error sending request").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A server that answers a ranged GET with the whole object (200):
    /// the body is cut to the range asked for (it was served from byte 0
    /// under the range's `Content-Range`, the wrong bytes).
    #[tokio::test]
    async fn a_whole_object_answered_for_a_range_is_cut_to_it() {
        use super::super::GetRange;
        use futures::TryStreamExt;
        let whole = || {
            let answer = http::Response::builder()
                .status(200)
                .header("content-length", "10")
                .body("0123456789")
                .unwrap();
            reqwest::Response::from(answer)
        };
        for (range, expected) in [
            (GetRange::Bounded { start: 2, end: 4 }, "234"),
            (GetRange::From(7), "789"),
            (GetRange::Suffix(3), "789"),
            (GetRange::Bounded { start: 8, end: 20 }, "89"),
        ] {
            let object = object_of(whole(), &[], Some(range)).unwrap();
            assert_eq!(object.size, Some(10), "the whole size");
            let chunks: Vec<bytes::Bytes> = object.body.try_collect().await.unwrap();
            assert_eq!(chunks.concat(), expected.as_bytes(), "{range:?}");
        }
        // With no size stated, the whole object is passed on as it came.
        let unsized_answer = http::Response::builder()
            .status(200)
            .body(reqwest::Body::wrap_stream(futures::stream::iter([Ok::<
                _,
                std::io::Error,
            >(
                bytes::Bytes::from_static(b"0123456789"),
            )])))
            .unwrap();
        let range = Some(GetRange::Bounded { start: 2, end: 4 });
        let object = object_of(reqwest::Response::from(unsized_answer), &[], range).unwrap();
        assert_eq!(object.size, None);
        let chunks: Vec<bytes::Bytes> = object.body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"0123456789");
        let object = object_of(whole(), &[], None).unwrap();
        let chunks: Vec<bytes::Bytes> = object.body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"0123456789");
    }

    /// A one-connection HTTP server on loopback answering `head` and then
    /// `chunks` of `size` bytes each; its URL.
    async fn answering(head: &'static str, chunks: usize, size: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket.read(&mut [0; 4096]).await;
            let _ = socket.write_all(head.as_bytes()).await;
            for _ in 0..chunks {
                let chunk = format!("{size:x}\r\n{}\r\n", "x".repeat(size));
                if socket.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = socket.write_all(b"0\r\n\r\n").await;
        });
        url
    }

    #[tokio::test]
    async fn answers_read_whole_stop_at_their_limit() {
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let get = async |url: String| reqwest::get(url).await.unwrap();
        // Within the limit: read whole.
        let small = get(answering(chunked, 4, 1000).await).await;
        assert_eq!(
            body_up_to(small, 4000, LONG, "t").await.unwrap().len(),
            4000
        );
        // Streamed past it: refused as soon as it passes, whatever follows.
        let endless = get(answering(chunked, usize::MAX, 1 << 16).await).await;
        match body_up_to(endless, 1 << 20, LONG, "list x").await {
            Err(Error::Invalid { code, message, .. }) => {
                assert_eq!(code, "storage_answer_too_big");
                assert!(message.starts_with("list x: "), "{message}");
            }
            other => panic!("{:?}", other.map(|b| b.len())),
        }
        // Announced past it: refused before a byte of the body is read.
        let announced = "HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n";
        let big = get(answering(announced, 0, 0).await).await;
        assert!(matches!(
            body_up_to(big, 1 << 20, LONG, "t").await,
            Err(Error::Invalid { .. })
        ));
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(30);

    /// A page that is not JSON is transient whatever its listing is called:
    /// a crowded page was told by the whole message, which names the
    /// prefix, so a prefix holding those words made every bad page a
    /// permanent `storage_answer_too_big`.
    #[tokio::test]
    async fn a_page_is_crowded_by_its_own_error_not_by_its_name() {
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let answer = reqwest::get(answering(head, 1, 8).await).await.unwrap();
        let what = format!("list gs://b/{CROWDED} 5000 entries/");
        let page: Result<serde_json::Value> = json_page(answer, LONG, &what).await;
        assert!(matches!(page, Err(Error::Transient(_))), "{page:?}");
    }

    /// A page that trickles (a byte every 100 ms, for ever) is refused once
    /// its deadline passes: the client's read timeout, which waits for the
    /// next bytes only, never fired and the read went on for good.
    #[tokio::test]
    async fn an_answer_read_whole_has_a_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket.read(&mut [0; 4096]).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            while socket.write_all(b"1\r\nx\r\n").await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        let trickle = reqwest::get(url).await.unwrap();
        let started = std::time::Instant::now();
        let deadline = std::time::Duration::from_secs(1);
        match body_up_to(trickle, 1 << 20, deadline, "list x").await {
            Err(Error::Transient(message)) => {
                assert!(
                    message.contains("did not arrive whole within 1 s"),
                    "{message}"
                );
            }
            other => panic!("{:?}", other.map(|b| b.len())),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_only() {
        let calls = AtomicU32::new(0);
        let out: Result<()> = retry("t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::Transient("503".into()))
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);

        calls.store(0, Ordering::SeqCst);
        let out: Result<()> = retry("t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::PermissionDenied("403".into()))
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let out = retry("t", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Error::Transient("reset".into()))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn error_bodies_are_read_up_to_a_size_and_a_time() {
        use axum::http;
        use bytes::Bytes;
        use futures::StreamExt;
        let big = reqwest::Response::from(http::Response::new(vec![b'x'; 20_000]));
        assert_eq!(error_body(big).await.len(), ERROR_BODY_BYTES);
        // A first piece, then nothing for ever: what came is kept.
        let trickle =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from("<Error>")) })
                .chain(futures::stream::pending());
        let body = reqwest::Body::wrap_stream(trickle);
        let stuck = reqwest::Response::from(http::Response::new(body));
        assert_eq!(error_body(stuck).await, "<Error>");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            assert!(backoff(attempt) <= CAP);
        }
        assert_eq!(
            status_error(StatusCode::FORBIDDEN, "x", "").to_string(),
            "x: HTTP 403 Forbidden"
        );
        assert!(status_error(StatusCode::SERVICE_UNAVAILABLE, "x", "").is_transient());
        assert!(matches!(
            status_error(StatusCode::UNAUTHORIZED, "x", ""),
            Error::Unauthenticated(_)
        ));
    }
}
