//! A synthetic S3-compatible server for benchmarks (not for correctness
//! tests, which use the real emulators): buckets in memory, path-style
//! ListObjectsV2 (prefix, delimiter, max-keys, continuation-token,
//! start-after), GetObject (with a byte range), HeadObject, PutObject (plain
//! or `aws-chunked` bodies), DeleteObject and CreateBucket, no signature
//! check. Every answer waits `rtt` first, and bodies are sent at
//! `bytes_per_second` when set, so a run against it behaves like one
//! against a distant bucket while the server itself costs next to nothing.
//! Started with a `connect` time ([`SyntheticS3::start_handshaking`]), a
//! new connection's first request is read only that long after the
//! connection was accepted: the TCP and TLS handshakes a
//! distant HTTPS endpoint costs (two round trips with TLS 1.3), which a
//! loopback connection does not. It counts the requests of each kind.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    serve::ListenerExt,
};
use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// How the server behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Waited before every answer: one round trip to a distant region.
    pub rtt: Duration,
    /// Response bodies are sent at this rate (none: as fast as possible).
    pub bytes_per_second: Option<u64>,
}

#[derive(Clone)]
struct Object {
    data: Bytes,
    etag: String,
    /// When it was written (by a PUT or [`SyntheticS3::fill`]).
    at: std::time::Instant,
}

type Buckets = HashMap<String, BTreeMap<String, Object>>;

/// Requests seen, by operation.
#[derive(Default, Debug)]
pub struct Counts {
    pub list: AtomicU64,
    /// Listing pages the AWS SDK sent; the S3 backend signs its own once
    /// it knows the bucket's endpoint.
    pub sdk_list: AtomicU64,
    pub get: AtomicU64,
    /// GETs the AWS SDK sent (they carry its `amz-sdk-invocation-id`);
    /// the S3 backend signs its own after its first object request.
    pub sdk_get: AtomicU64,
    pub head: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
    pub other: AtomicU64,
    /// Connections accepted (not requests: `total` leaves them out).
    pub connections: AtomicU64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        [
            &self.list,
            &self.get,
            &self.head,
            &self.put,
            &self.delete,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

#[derive(Clone)]
struct Shared {
    buckets: Arc<Mutex<Buckets>>,
    latency: Latency,
    counts: Arc<Counts>,
}

/// A running server; it stops when dropped.
pub struct SyntheticS3 {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub counts: Arc<Counts>,
    buckets: Arc<Mutex<Buckets>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SyntheticS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SyntheticS3 {
    pub async fn start(latency: Latency) -> Self {
        SyntheticS3::start_handshaking(latency, Duration::ZERO).await
    }

    /// A server whose new connections are read `connect` after their
    /// accept (see the module's documentation).
    pub async fn start_handshaking(latency: Latency, connect: Duration) -> Self {
        let shared = Shared {
            buckets: Arc::default(),
            latency,
            counts: Arc::default(),
        };
        let listener = labelsync::http::listen(crate::LOOPBACK).expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let (buckets, counts) = (shared.buckets.clone(), shared.counts.clone());
        let accepted = counts.clone();
        let listener = Handshaking { listener, connect }.tap_io(move |_| {
            accepted.connections.fetch_add(1, Ordering::Relaxed);
        });
        let app = Router::new().fallback(handle).with_state(shared);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SyntheticS3 {
            endpoint,
            counts,
            buckets,
            task,
        }
    }

    /// Puts objects straight into `bucket` (made if missing), without
    /// requests or delays: the benchmark's data set.
    pub fn fill(&self, bucket: &str, objects: impl IntoIterator<Item = (String, Bytes)>) {
        let mut buckets = self.buckets.lock().expect("lock");
        let bucket = buckets.entry(bucket.to_owned()).or_default();
        for (key, data) in objects {
            let etag = etag_of(&data);
            let at = std::time::Instant::now();
            bucket.insert(key, Object { data, etag, at });
        }
    }

    /// When each object of `bucket` was last written, by key.
    pub fn written(&self, bucket: &str) -> HashMap<String, std::time::Instant> {
        let buckets = self.buckets.lock().expect("lock");
        buckets.get(bucket).map_or_else(HashMap::new, |b| {
            b.iter().map(|(k, o)| (k.clone(), o.at)).collect()
        })
    }

    /// How many objects `bucket` holds now.
    pub fn len(&self, bucket: &str) -> usize {
        let buckets = self.buckets.lock().expect("lock");
        buckets.get(bucket).map_or(0, BTreeMap::len)
    }
}

/// The listener, with each accepted connection read only `connect` after
/// its accept (see the module's documentation); accepts are not delayed.
struct Handshaking {
    listener: tokio::net::TcpListener,
    connect: Duration,
}

impl axum::serve::Listener for Handshaking {
    type Io = Handshake;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Handshake, std::net::SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        let wait = (!self.connect.is_zero()).then(|| Box::pin(tokio::time::sleep(self.connect)));
        (Handshake { io, wait }, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection whose first read waits for its handshake's end.
struct Handshake {
    io: tokio::net::TcpStream,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for Handshake {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(wait) = self.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            self.wait = None;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Handshake {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn etag_of(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"{hex}\"")
}

/// Half the round trip before the request is handled (the request's way
/// there) and half after (the answer's way back), so a write lands when it
/// would in a distant bucket. Both halves are timed from the request's
/// arrival, so the server's own work, up to half the round trip, is
/// hidden in it: a listing page of 1,000 keys takes this server 6-20 ms on
/// a busy 2-core machine, an artefact of the harness sharing the cores
/// with what it measures, which must not count as the storage's latency.
async fn handle(State(s): State<Shared>, req: Request) -> Response {
    let arrived = tokio::time::Instant::now();
    tokio::time::sleep_until(arrived + s.latency.rtt / 2).await;
    let response = answer(&s, req).await;
    tokio::time::sleep_until(arrived + s.latency.rtt).await;
    response
}

async fn answer(s: &Shared, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(&v.replace('+', " ")))
                })
                .collect()
        })
        .unwrap_or_default();
    let (bucket, key) = match path.split_once('/') {
        Some((bucket, "")) => (decode(bucket), None),
        Some((bucket, key)) => (decode(bucket), Some(decode(key))),
        None => (decode(&path), None),
    };
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 1 << 30)
        .await
        .unwrap_or_default();
    let c = &s.counts;
    match (method, key) {
        (Method::GET, None) if query.get("list-type").map(String::as_str) == Some("2") => {
            c.list.fetch_add(1, Ordering::Relaxed);
            if headers.contains_key("amz-sdk-invocation-id") {
                c.sdk_list.fetch_add(1, Ordering::Relaxed);
            }
            list(s, &bucket, &query)
        }
        (Method::GET, Some(key)) => {
            c.get.fetch_add(1, Ordering::Relaxed);
            if headers.contains_key("amz-sdk-invocation-id") {
                c.sdk_get.fetch_add(1, Ordering::Relaxed);
            }
            get(s, &bucket, &key, &headers, true)
        }
        (Method::HEAD, Some(key)) => {
            c.head.fetch_add(1, Ordering::Relaxed);
            get(s, &bucket, &key, &headers, false)
        }
        (Method::PUT, Some(key)) => {
            c.put.fetch_add(1, Ordering::Relaxed);
            put(s, &bucket, key, &headers, body)
        }
        (Method::DELETE, Some(key)) => {
            c.delete.fetch_add(1, Ordering::Relaxed);
            if let Some(objects) = s.buckets.lock().expect("lock").get_mut(&bucket) {
                objects.remove(&key);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::PUT | Method::HEAD, None) => {
            c.other.fetch_add(1, Ordering::Relaxed);
            s.buckets.lock().expect("lock").entry(bucket).or_default();
            StatusCode::OK.into_response()
        }
        _ => {
            c.other.fetch_add(1, Ordering::Relaxed);
            error(
                StatusCode::NOT_IMPLEMENTED,
                "NotImplemented",
                "not in the synthetic server",
            )
        }
    }
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Characters S3 leaves alone in `encoding-type=url` answers.
const KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// One page of a listing: object keys with their etag and size, common
/// prefixes, and where the next page starts (inclusive), if there is one.
#[derive(Default)]
struct ListPage {
    objects: Vec<(String, String, usize)>,
    prefixes: Vec<String>,
    next: Option<String>,
}

/// The smallest string after every string that starts with `prefix`
/// (its last character incremented).
fn past(prefix: &str) -> String {
    let mut out: String = prefix.to_owned();
    match out.pop().and_then(|c| char::from_u32(c as u32 + 1)) {
        Some(c) => out.push(c),
        None => out.push(char::MAX),
    }
    out
}

/// Up to `max` entries under `prefix` from `start` on: a common prefix is one
/// entry, and the walk jumps past its keys rather than stepping through them.
fn page_of(
    objects: &BTreeMap<String, Object>,
    prefix: &str,
    delimiter: Option<&str>,
    mut start: String,
    max: usize,
) -> ListPage {
    let mut page = ListPage::default();
    if start.as_str() < prefix {
        start = prefix.to_owned();
    }
    loop {
        let Some((key, object)) = objects.range::<String, _>(start.clone()..).next() else {
            return page;
        };
        if !key.starts_with(prefix) {
            return page;
        }
        if page.objects.len() + page.prefixes.len() == max {
            page.next = Some(start);
            return page;
        }
        let rest = &key[prefix.len()..];
        match delimiter.and_then(|d| rest.find(d).map(|i| &key[..prefix.len() + i + d.len()])) {
            Some(common) => {
                start = past(common);
                page.prefixes.push(common.to_owned());
            }
            None => {
                start = format!("{key}\0");
                let entry = (key.clone(), object.etag.clone(), object.data.len());
                page.objects.push(entry);
            }
        }
    }
}

fn list(s: &Shared, bucket: &str, q: &HashMap<String, String>) -> Response {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let delimiter = q.get("delimiter").cloned().filter(|d| !d.is_empty());
    let max = q
        .get("max-keys")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(1000)
        .clamp(1, 1000);
    let start = match (q.get("continuation-token"), q.get("start-after")) {
        (Some(token), _) => unhex(token),
        (None, Some(after)) => format!("{after}\0"),
        (None, None) => String::new(),
    };
    let url = q.get("encoding-type").map(String::as_str) == Some("url");
    let text = |v: &str| match url {
        true => utf8_percent_encode(v, KEEP).to_string(),
        false => xml(v),
    };
    let page = {
        let buckets = s.buckets.lock().expect("lock");
        let Some(objects) = buckets.get(bucket) else {
            return error(StatusCode::NOT_FOUND, "NoSuchBucket", "no such bucket");
        };
        page_of(objects, &prefix, delimiter.as_deref(), start, max)
    };
    let count = page.objects.len() + page.prefixes.len();
    let mut body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <Name>{}</Name><Prefix>{}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>{max}</MaxKeys>\
         <IsTruncated>{}</IsTruncated>",
        xml(bucket),
        text(&prefix),
        page.next.is_some()
    );
    for (key, etag, size) in &page.objects {
        body.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified>\
             <ETag>{}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            text(key),
            xml(etag)
        ));
    }
    for p in &page.prefixes {
        body.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            text(p)
        ));
    }
    if let Some(d) = &delimiter {
        body.push_str(&format!("<Delimiter>{}</Delimiter>", text(d)));
    }
    if url {
        body.push_str("<EncodingType>url</EncodingType>");
    }
    if let Some(next) = &page.next {
        body.push_str(&format!(
            "<NextContinuationToken>{}</NextContinuationToken>",
            hex(next)
        ));
    }
    body.push_str("</ListBucketResult>");
    ([(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn get(s: &Shared, bucket: &str, key: &str, headers: &HeaderMap, body: bool) -> Response {
    let found = s
        .buckets
        .lock()
        .expect("lock")
        .get(bucket)
        .and_then(|b| b.get(key).cloned());
    let Some(object) = found else {
        return match body {
            true => error(StatusCode::NOT_FOUND, "NoSuchKey", "no such key"),
            false => StatusCode::NOT_FOUND.into_response(),
        };
    };
    let size = object.data.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            if a.is_empty() {
                // `bytes=-N`: the last N bytes.
                let n: usize = b.parse().ok()?;
                return (n > 0 && size > 0).then(|| (size.saturating_sub(n), size - 1));
            }
            let a: usize = a.parse().ok()?;
            let b: usize = match b {
                "" => size.saturating_sub(1),
                b => b.parse().ok()?,
            };
            (a <= b && a < size).then_some((a, b.min(size - 1)))
        });
    // A Range header we cannot satisfy (or parse) is a 416, as S3 answers.
    let range = match range {
        Some(None) => {
            return error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                "bad range",
            );
        }
        Some(Some(r)) => Some(r),
        None => None,
    };
    let (status, data) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, object.data.slice(a..=b)),
        None => (StatusCode::OK, object.data.clone()),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, data.len())
        .header(header::ETAG, &object.etag)
        .header(header::LAST_MODIFIED, "Tue, 01 Dec 2026 00:00:00 GMT")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some((a, b)) = range {
        response = response.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"));
    }
    let body = match (body, s.latency.bytes_per_second) {
        (false, _) => Body::empty(),
        (true, None) => Body::from(data),
        (true, Some(rate)) => paced(data, rate),
    };
    response
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `data` sent in 16 KiB pieces at `rate` bytes per second.
pub fn paced(data: Bytes, rate: u64) -> Body {
    const PIECE: usize = 16 * 1024;
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(PIECE)
        .map(|at| data.slice(at..(at + PIECE).min(data.len())))
        .collect();
    let stream = futures::stream::iter(pieces).then(move |piece| async move {
        let wait = Duration::from_secs_f64(piece.len() as f64 / rate.max(1) as f64);
        tokio::time::sleep(wait).await;
        Ok::<_, std::io::Error>(piece)
    });
    Body::from_stream(stream)
}

fn put(s: &Shared, bucket: &str, key: String, headers: &HeaderMap, body: Bytes) -> Response {
    let chunked = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("aws-chunked"))
        || headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("STREAMING-"));
    let data = match chunked {
        true => match unchunk(&body) {
            Some(data) => data,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    "bad aws-chunked body",
                );
            }
        },
        false => body,
    };
    let etag = etag_of(&data);
    let mut buckets = s.buckets.lock().expect("lock");
    let Some(objects) = buckets.get_mut(bucket) else {
        return error(StatusCode::NOT_FOUND, "NoSuchBucket", "no such bucket");
    };
    objects.insert(
        key,
        Object {
            data,
            etag: etag.clone(),
            at: std::time::Instant::now(),
        },
    );
    ([(header::ETAG, etag)], "").into_response()
}

/// The payload of an `aws-chunked` body: `SIZE-IN-HEX[;ext]\r\nDATA\r\n`
/// pieces up to a zero-size one (trailers after it are ignored).
fn unchunk(body: &[u8]) -> Option<Bytes> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(Bytes::from(out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> = (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
