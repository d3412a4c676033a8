//! A fault-injecting HTTP proxy for storage tests: it forwards requests to
//! an emulator unchanged (the `Host` header too, so SigV4 signatures still
//! match), and for a share of them answers 500, 503 `SlowDown`, cuts the
//! response off mid-body (a reset), stalls before forwarding, or never
//! answers at all (before or in the middle of a body). Or it
//! refuses everything with 403, to check that permanent errors are not
//! retried. Or it only adds a round trip and a bandwidth (benchmarks at
//! cloud latency). It counts what it saw, the object reads in flight and
//! ended, and the most it had in flight at once.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderName, StatusCode},
    response::{IntoResponse, Response},
};

/// What the proxy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One request in `every` fails, cycling through 500, 503 SlowDown, a
    /// cut-off body and a 1 s stall (which then succeeds).
    Flaky { every: u64 },
    /// Every request gets 403 AccessDenied.
    Forbidden,
    /// Reads pass; writes (PUT, POST, DELETE) get 403: a read-only key.
    ReadOnly,
    /// Every write (PUT) waits this long before it is forwarded.
    SlowWrites(std::time::Duration),
    /// Every object read (a GET with no query) waits this long before it
    /// is forwarded, counted in flight meanwhile; listings pass at once.
    SlowReads(std::time::Duration),
    /// Every object read (a GET with no query) waits, counted in flight,
    /// until [`FaultProxy::release_reads`]; listings pass at once.
    HeldReads,
    /// One request in `every` never gets an answer, alternately before the
    /// response starts and after half of its body: a server that stops
    /// talking without closing the connection.
    Hanging { every: u64 },
    /// No faults: every request waits the round trip before it is
    /// forwarded, and answers are paced at the bandwidth when set (a distant
    /// bucket in front of a near emulator).
    Latency(crate::synthetic_s3::Latency),
    /// The first GET of each path whose body is longer than this many
    /// bytes gets the response's head and those bytes, then a reset; later
    /// GETs of the path pass.
    CutBodiesAfter(usize),
    /// Every listing of the keys under one prefix (a GET whose query has
    /// this `prefix=` value, percent-encoded, and no delimiter) gets 500;
    /// everything else passes.
    FailListing(&'static str),
    /// Every object read of a key starting with this prefix gets 503
    /// SlowDown; every listing but the first waits (10 s at most) until
    /// such a read was refused, so the first page's reads begin before the
    /// listing goes on; everything else passes.
    FailReadsUnder(&'static str),
    /// The first this many writes (PUT) get 503 SlowDown; every later
    /// request passes: a storage down for a while.
    WritesDownFor(u64),
    /// The first write (PUT) is read whole, then waits until
    /// [`FaultProxy::release_writes`] before it is forwarded; every other
    /// request passes. A client that goes away meanwhile takes the write
    /// with it (hyper drops the handler): a storage that completes a write
    /// only if its client is still there when it gets to it.
    HeldFirstWrite,
    /// Every answer passes, but a `Content-Range` loses its total size
    /// (`bytes 0-9/*`), as some S3-compatible servers send it.
    UnknownTotals,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    mode: Mode,
    client: reqwest::Client,
    requests: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    listings: Arc<AtomicU64>,
    /// The paths whose body was cut (`Mode::CutBodiesAfter`).
    cut: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    reads: Arc<InFlight>,
    held: Arc<Gate>,
    /// Writes held (`Mode::HeldFirstWrite`): arrived, and forwarded.
    writes_held: Arc<AtomicU64>,
    writes_forwarded: Arc<AtomicU64>,
}

/// Where held reads (or the held write) wait, until it opens.
#[derive(Default)]
struct Gate {
    open: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

impl Gate {
    async fn pass(&self) {
        loop {
            // Created before the check: an opening after it is not missed.
            let opened = self.opened.notified();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.opened.notify_waiters();
    }
}

/// Object reads (GETs with no query: not listings) in flight, the most so
/// far, and those ended (answered or given up by the client).
#[derive(Default)]
struct InFlight {
    now: AtomicU64,
    most: AtomicU64,
    done: AtomicU64,
}

/// One read in flight, until dropped.
struct Reading(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> Reading {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        Reading(self.clone())
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.done.fetch_add(1, Ordering::SeqCst);
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct FaultProxy {
    pub url: String,
    requests: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    reads: Arc<InFlight>,
    held: Arc<Gate>,
    writes_held: Arc<AtomicU64>,
    writes_forwarded: Arc<AtomicU64>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, mode: Mode) -> Self {
        let shared = Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            mode,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            requests: Arc::new(AtomicU64::new(0)),
            faults: Arc::new(AtomicU64::new(0)),
            listings: Arc::default(),
            cut: Arc::default(),
            reads: Arc::default(),
            held: Arc::default(),
            writes_held: Arc::default(),
            writes_forwarded: Arc::default(),
        };
        let (requests, faults) = (shared.requests.clone(), shared.faults.clone());
        let (reads, held) = (shared.reads.clone(), shared.held.clone());
        let writes_held = shared.writes_held.clone();
        let writes_forwarded = shared.writes_forwarded.clone();
        let app = Router::new().fallback(forward).with_state(shared);
        let listener = labelsync::http::listen(crate::LOOPBACK).expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FaultProxy {
            url,
            requests,
            faults,
            reads,
            held,
            writes_held,
            writes_forwarded,
        }
    }

    /// Lets the reads held by `Mode::HeldReads` go, and every later one.
    pub fn release_reads(&self) {
        self.held.open();
    }

    /// Lets the write held by `Mode::HeldFirstWrite` go (if its client
    /// still waits for it).
    pub fn release_writes(&self) {
        self.held.open();
    }

    /// Writes held by `Mode::HeldFirstWrite` so far (0 or 1), and how many
    /// of them were forwarded once let go.
    pub fn held_writes(&self) -> (u64, u64) {
        (
            self.writes_held.load(Ordering::SeqCst),
            self.writes_forwarded.load(Ordering::SeqCst),
        )
    }

    /// The most object reads (GETs with no query) it had in flight at once.
    pub fn most_reads_in_flight(&self) -> u64 {
        self.reads.most.load(Ordering::SeqCst)
    }

    /// Object reads in flight now, and those ended so far.
    pub fn reads(&self) -> (u64, u64) {
        (
            self.reads.now.load(Ordering::SeqCst),
            self.reads.done.load(Ordering::SeqCst),
        )
    }

    /// Requests seen, and how many of them got a fault.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::SeqCst),
            self.faults.load(Ordering::SeqCst),
        )
    }
}

/// S3's answer to a client it throttles: 503 SlowDown.
fn slow_down() -> Response {
    s3_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "SlowDown",
        "Please reduce your request rate.",
    )
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [("content-type", "application/xml")], body).into_response()
}

async fn forward(State(s): State<Shared>, req: Request) -> Response {
    let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let object_read = req.method() == axum::http::Method::GET && req.uri().query().is_none();
    let _reading = object_read.then(|| s.reads.enter());
    let fault = match s.mode {
        Mode::Forbidden => {
            s.faults.fetch_add(1, Ordering::SeqCst);
            return s3_error(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied");
        }
        Mode::ReadOnly if req.method() != axum::http::Method::GET => {
            s.faults.fetch_add(1, Ordering::SeqCst);
            return s3_error(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied");
        }
        Mode::ReadOnly => None,
        Mode::SlowWrites(pause) => {
            if req.method() == axum::http::Method::PUT {
                tokio::time::sleep(pause).await;
            }
            None
        }
        Mode::SlowReads(pause) => {
            if object_read {
                tokio::time::sleep(pause).await;
            }
            None
        }
        Mode::HeldReads => {
            if object_read {
                s.held.pass().await;
            }
            None
        }
        Mode::Flaky { every } if n % every == 0 => Some((n / every) % 4),
        Mode::Flaky { .. } => None,
        Mode::Hanging { every } if n % every == 0 => {
            s.faults.fetch_add(1, Ordering::SeqCst);
            if (n / every) % 2 == 0 {
                return futures::future::pending().await;
            }
            let (parts, body) = send(&s, req).await;
            let half = body.slice(..body.len() / 2);
            let stalled = futures::StreamExt::chain(
                futures::stream::once(async move { Ok::<_, std::io::Error>(half) }),
                futures::stream::pending(),
            );
            return parts.body(Body::from_stream(stalled)).unwrap_or_default();
        }
        Mode::Hanging { .. } => None,
        Mode::CutBodiesAfter(after) => return cut_body_once(&s, req, after).await,
        Mode::FailListing(prefix) => {
            let query = req.uri().query().unwrap_or_default();
            let listing = query.split('&').any(|p| p == format!("prefix={prefix}"))
                && !query.contains("delimiter=");
            if listing {
                s.faults.fetch_add(1, Ordering::SeqCst);
                return s3_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected",
                );
            }
            None
        }
        Mode::FailReadsUnder(prefix) => {
            if !object_read && s.listings.fetch_add(1, Ordering::SeqCst) > 0 {
                let refused = || s.faults.load(Ordering::SeqCst) > 0;
                for _ in 0..1000 {
                    if refused() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            } else if object_read && req.uri().path().contains(&format!("/{prefix}")) {
                s.faults.fetch_add(1, Ordering::SeqCst);
                return slow_down();
            }
            None
        }
        Mode::WritesDownFor(refused) => {
            let write = req.method() == axum::http::Method::PUT;
            if write && s.faults.load(Ordering::SeqCst) < refused {
                s.faults.fetch_add(1, Ordering::SeqCst);
                return slow_down();
            }
            None
        }
        Mode::HeldFirstWrite => {
            let write = req.method() == axum::http::Method::PUT;
            let first = || {
                let taken =
                    s.writes_held
                        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
                taken.is_ok()
            };
            if write && first() {
                return held_write(&s, req).await;
            }
            None
        }
        Mode::UnknownTotals => {
            let (mut builder, bytes) = send(&s, req).await;
            if let Some(headers) = builder.headers_mut()
                && let Some(range) = headers.get("content-range").and_then(|v| v.to_str().ok())
                && let Some((known, _total)) = range.rsplit_once('/')
                && let Ok(unknown) = axum::http::HeaderValue::from_str(&format!("{known}/*"))
            {
                headers.insert("content-range", unknown);
            }
            return builder.body(Body::from(bytes)).unwrap_or_default();
        }
        Mode::Latency(latency) => {
            tokio::time::sleep(latency.rtt).await;
            let (builder, bytes) = send(&s, req).await;
            let body = match latency.bytes_per_second {
                Some(rate) => crate::synthetic_s3::paced(bytes, rate),
                None => Body::from(bytes),
            };
            return builder.body(body).unwrap_or_default();
        }
    };
    if let Some(kind) = fault {
        s.faults.fetch_add(1, Ordering::SeqCst);
        match kind {
            0 => {
                return s3_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected",
                );
            }
            1 => {
                return slow_down();
            }
            2 => {
                // Headers, then a body that breaks off: the connection dies
                // mid-response, as on a reset.
                let broken = futures::stream::iter([
                    Ok(Bytes::from_static(b"<?xml")),
                    Err(std::io::Error::other("injected reset")),
                ]);
                return Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/xml")
                    .header("content-length", "4096")
                    .body(Body::from_stream(broken))
                    .unwrap_or_default();
            }
            _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
    let (builder, bytes) = send(&s, req).await;
    builder.body(Body::from(bytes)).unwrap_or_default()
}

/// [`Mode::CutBodiesAfter`]: forwards `req`, and cuts the body after
/// `after` bytes when it is longer and its path was not cut before.
async fn cut_body_once(s: &Shared, req: Request, after: usize) -> Response {
    let path = req.uri().path().to_owned();
    let get = req.method() == axum::http::Method::GET;
    let (builder, bytes) = send(s, req).await;
    let first = get && bytes.len() > after && s.cut.lock().expect("cut paths").insert(path);
    if !first {
        return builder.body(Body::from(bytes)).unwrap_or_default();
    }
    s.faults.fetch_add(1, Ordering::SeqCst);
    let broken = futures::stream::iter([
        Ok(bytes.slice(..after)),
        Err(std::io::Error::other("injected reset")),
    ]);
    builder.body(Body::from_stream(broken)).unwrap_or_default()
}

/// A write read whole, held until the gate opens, then forwarded. Its
/// client going away drops this future (hyper does), and the write with it.
async fn held_write(s: &Shared, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    s.held.pass().await;
    s.writes_forwarded.fetch_add(1, Ordering::SeqCst);
    let (builder, bytes) = send(s, Request::from_parts(parts, Body::from(body))).await;
    builder.body(Body::from(bytes)).unwrap_or_default()
}

/// Forwards a request upstream; the response's head and whole body (a 400
/// or 502 of the proxy's own when that fails).
async fn send(s: &Shared, req: Request) -> (axum::http::response::Builder, Bytes) {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return (
            Response::builder().status(StatusCode::BAD_REQUEST),
            Bytes::new(),
        );
    };
    let mut upstream = s
        .client
        .request(parts.method.clone(), format!("{}{path}", s.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        // Host is kept as the client sent it: SigV4 signed it.
        if name != HeaderName::from_static("content-length") {
            upstream = upstream.header(name, value);
        }
    }
    let Ok(resp) = upstream.send().await else {
        return (
            Response::builder().status(StatusCode::BAD_GATEWAY),
            Bytes::new(),
        );
    };
    let mut builder = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        builder = builder.header(name, value);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    (builder, bytes)
}
