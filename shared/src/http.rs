//! The HTTP server of both binaries (the scheduler's API, the worker's
//! metrics and probes), with the limits `axum::serve` cannot be given: a
//! timeout on request heads, a deadline on request bodies and a cap on open
//! connections ([`HttpLimits`]). Without them, ~20,000 connections that each
//! sent half a request held as many file descriptors and 1.5 GB for good.
//!
//! A connection is always in one of three phases, each with its bound:
//! receiving a request head (from accept, or from the first byte after an
//! idle spell) within the header timeout; inside a request, whose body must
//! arrive within the body timeout; idle between requests, for the idle
//! timeout. The idle timeout is separate and longer because load balancers
//! keep idle upstream connections for ~60 s and must never reuse one the
//! server has just closed (hyper's own header timeout counts idle time too,
//! so it is not used).
//!
//! At the cap, a new connection is let in by closing the oldest connection
//! that is not inside a request, so slow clients cannot keep others out;
//! when every connection is inside a request, the new one waits (in the
//! kernel's backlog) for one to end.
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpLimits;

/// What a request body fails with when it has not all arrived by its
/// deadline; the API answers it with 408 (`body_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs())]
pub struct BodyTimeout(pub Duration);

/// The API's error body, `{"error": {"code", "message", "field": null}}`,
/// for listeners that have no richer error type (the worker's).
pub fn error(
    status: axum::http::StatusCode,
    code: &'static str,
    message: &'static str,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({ "error": { "code": code, "message": message, "field": null } });
    (status, axum::Json(body)).into_response()
}

/// Connections the kernel keeps waiting for `accept` (capped by
/// `net.core.somaxconn`, 4096 on current kernels).
pub const BACKLOG: u32 = 4096;

/// A listener on `addr` whose backlog is [`BACKLOG`]. tokio's
/// `TcpListener::bind` asks for 128: a burst of more new connections than
/// that (a fleet's worth of clients opening their pools at once, a page of
/// a labeling UI behind a proxy that does not reuse connections) overflowed
/// it while the accept loop was busy, and each connection it dropped waited
/// out a one-second retransmit before its first byte.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does (on Unix only: elsewhere it would let
    // another process bind the port too): a restarted server can bind at
    // once, past its old connections' TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// open connections finish their requests (idle ones close at once) and
/// returns when the last one has closed, or after [`DRAIN`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Slots::new(max));
    let stop = CancellationToken::new();
    // No timer: hyper's header timeout would also cut idle connections;
    // the phases of `ConnState` bound heads and idle spells instead.
    let builder = http1::Builder::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next_id = 0u64;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = tokio::select! {
            permit = slots.admit() => permit,
            () = &mut shutdown => break,
        };
        next_id += 1;
        let conn = Connection {
            id: next_id,
            state: slots.register(next_id),
            slots: slots.clone(),
            stop: stop.clone(),
            _permit: permit,
        };
        tokio::spawn(conn.serve(stream, builder.clone(), router.clone(), limits));
    }
    // Closed at once: a client connecting now is refused and tries another
    // replica, rather than waiting in the backlog until the process exits.
    drop(listener);
    stop.cancel();
    // Each connection holds a permit until it has closed; one still in a
    // request after DRAIN (an event stream, which never ends by itself) is
    // left to close with the process.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.permits.acquire_many(all))
        .await
        .is_err()
    {
        let open = slots.lock().len();
        tracing::warn!(
            open,
            "connections still in a request after the drain time; stopping without them"
        );
    }
}

/// How long a stopping server waits for its connections' requests to end:
/// under Kubernetes' default 30 s grace, so the process exits by itself.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(20);

/// A connection that died in the backlog is nothing; anything else (out
/// of file descriptors) passes as connections close, so pause rather than
/// spin on it.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed; pausing");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The connection cap: an open connection holds one permit. Open
/// connections are listed by age, so the oldest one outside a request can
/// be closed to make room.
struct Slots {
    permits: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    /// Signalled when a request ends: an admission waiting because every
    /// connection was inside a request looks again.
    request_ended: Notify,
}

/// How long a response must have waited for its client to read before
/// its connection may make room for a new one at the cap.
const STALLED_EVICTABLE: Duration = Duration::from_secs(10);

/// What bounds how long a connection may stay as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request head (or nothing yet since accept): the header
    /// timeout.
    Head,
    /// From a complete head until the response body is sent or dropped;
    /// the body timeout bounds the request body, the write timeout a
    /// response the client stopped reading.
    Request,
    /// Between requests, no byte of the next one yet: the idle timeout.
    Idle,
}

struct Timing {
    phase: Phase,
    since: Instant,
    /// Requests in progress (HTTP/1 serves one at a time; counted anyway).
    requests: usize,
    /// Since when a write waits for the client to read (none taken since).
    write_stalled: Option<Instant>,
}

struct ConnState {
    timing: Mutex<Timing>,
    /// Signalled on every change of phase, so the connection re-arms its timer.
    changed: Notify,
    /// Tells the connection to close now, to make room.
    close: Notify,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            timing: Mutex::new(Timing {
                phase: Phase::Head,
                since: Instant::now(),
                requests: 0,
                write_stalled: None,
            }),
            changed: Notify::new(),
            close: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timing> {
        self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, timing: &mut Timing, phase: Phase) {
        timing.phase = phase;
        timing.since = Instant::now();
        timing.write_stalled = None;
        self.changed.notify_one();
    }

    /// A write found the socket full: the first such write since the last
    /// progress starts the write timeout.
    fn write_waits(&self) {
        let mut timing = self.lock();
        if timing.write_stalled.is_none() {
            timing.write_stalled = Some(Instant::now());
            self.changed.notify_one();
        }
    }

    /// A write took bytes: the client reads.
    fn wrote(&self) {
        self.lock().write_stalled = None;
    }

    /// Whether the connection may be closed to make room at the cap: one
    /// outside a request, or whose response its client has not read for
    /// [`STALLED_EVICTABLE`] (a media player that paused reads again with a
    /// `Range`).
    fn evictable(&self) -> bool {
        let timing = self.lock();
        timing.phase != Phase::Request
            || timing
                .write_stalled
                .is_some_and(|at| at.elapsed() >= STALLED_EVICTABLE)
    }

    /// Bytes were read: the first ones after an idle spell start a head.
    fn bytes_arrived(&self) {
        let mut timing = self.lock();
        if timing.phase == Phase::Idle {
            self.set(&mut timing, Phase::Head);
        }
    }

    fn request_started(&self) {
        let mut timing = self.lock();
        timing.requests += 1;
        self.set(&mut timing, Phase::Request);
    }

    fn request_ended(&self) {
        let mut timing = self.lock();
        timing.requests = timing.requests.saturating_sub(1);
        if timing.requests == 0 {
            self.set(&mut timing, Phase::Idle);
        }
    }

    /// When the connection is to be closed if its phase has not changed.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        let timing = self.lock();
        match timing.phase {
            Phase::Head => Some(timing.since + limits.header_timeout),
            Phase::Idle => Some(timing.since + limits.idle_timeout),
            Phase::Request => timing.write_stalled.map(|at| at + limits.write_timeout),
        }
    }

    /// Whether the connection's deadline has passed (it may have moved
    /// since the timer was set: a stalled write went on).
    fn expired(&self, limits: &HttpLimits) -> bool {
        self.deadline(limits).is_some_and(|at| at <= Instant::now())
    }
}

impl Slots {
    fn new(max: usize) -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(max)),
            open: Mutex::new(BTreeMap::new()),
            request_ended: Notify::new(),
        }
    }

    fn register(&self, id: u64) -> Arc<ConnState> {
        let state = Arc::new(ConnState::new());
        self.lock().insert(id, state.clone());
        state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnState>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A permit for a new connection: a free one, or the one of the oldest
    /// connection outside a request, closed for it; else waits for one.
    async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return permit;
            }
            let closing = self.close_oldest_idle();
            let ended = self.request_ended.notified();
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    return permit.expect("the connection semaphore is never closed");
                }
                () = ended, if !closing => {}
                // A stalled response becomes evictable with time.
                () = tokio::time::sleep(Duration::from_secs(1)), if !closing => {}
            }
        }
    }

    /// Closes the oldest connection with no request in progress (or a
    /// response stalled: see [`ConnState::evictable`]); false when every
    /// connection is inside a request. A head that completes
    /// just as its connection is picked is lost with it (the client sees the
    /// connection close), which only happens at the cap.
    fn close_oldest_idle(&self) -> bool {
        let mut open = self.lock();
        let oldest = open.iter().find(|(_, c)| c.evictable()).map(|(id, _)| *id);
        match oldest.and_then(|id| open.remove(&id)) {
            Some(conn) => {
                conn.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// One accepted connection and what it holds of the server.
struct Connection {
    id: u64,
    state: Arc<ConnState>,
    slots: Arc<Slots>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(
        self,
        stream: TcpStream,
        builder: http1::Builder,
        router: Router,
        limits: HttpLimits,
    ) {
        let (state, slots) = (self.state.clone(), self.slots.clone());
        // The peer's address, as axum's `ConnectInfo` (audit rows name it).
        let peer = stream.peer_addr().ok().map(axum::extract::ConnectInfo);
        // Without it, the small last write of a streamed body (a proxied
        // object) can wait for the client's delayed ACK (Nagle): ~40 ms.
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_request = InRequest::enter(state.clone(), slots.clone());
            let timeout = limits.body_timeout;
            let mut req = req.map(|body| Body::new(TimedBody::new(Body::new(body), timeout)));
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            let router = router.clone();
            async move {
                let response = router.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(response.map(|inner| {
                    Body::new(HeldBody {
                        inner,
                        _in_request: in_request,
                    })
                }))
            }
        });
        let io = WatchedIo {
            inner: stream,
            state: self.state.clone(),
        };
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        let mut draining = false;
        loop {
            let deadline = self.state.deadline(&limits);
            let expired = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection closed on an error");
                    }
                    break;
                }
                () = self.state.changed.notified() => {}
                () = expired => {
                    if self.state.expired(&limits) {
                        tracing::debug!("closed a connection: no complete request head, idle, or its response not read, for too long");
                        break;
                    }
                }
                () = self.state.close.notified() => {
                    tracing::debug!("closed a connection outside a request to let a new one in");
                    break;
                }
                () = self.stop.cancelled(), if !draining => {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
        self.slots.lock().remove(&self.id);
    }
}

/// The connection's socket, telling its state when request bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        read
    }
}

impl WatchedIo {
    /// Tells the connection's state whether the client takes what is
    /// written (see [`ConnState::write_waits`]).
    fn watch_write(&self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match &written {
            Poll::Pending => self.state.write_waits(),
            Poll::Ready(Ok(n)) if *n > 0 => self.state.wrote(),
            Poll::Ready(_) => {}
        }
        written
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch_write(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_write(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Marks its connection as inside a request while it lives.
struct InRequest {
    state: Arc<ConnState>,
    slots: Arc<Slots>,
}

impl InRequest {
    fn enter(state: Arc<ConnState>, slots: Arc<Slots>) -> Self {
        state.request_started();
        InRequest { state, slots }
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.state.request_ended();
        self.slots.request_ended.notify_one();
    }
}

/// A response body that keeps its connection marked as inside a request
/// until it is sent (or dropped), so a long download is never closed to
/// make room.
struct HeldBody {
    inner: Body,
    _in_request: InRequest,
}

impl HttpBody for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyTimeout`] when it has not ended by
/// its deadline (counted from the head's arrival). The timer is armed only
/// once the body is read, so requests whose bodies nobody reads cost none.
struct TimedBody {
    inner: Body,
    timeout: Duration,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(inner: Body, timeout: Duration) -> Self {
        TimedBody {
            inner,
            timeout,
            deadline: Instant::now() + timeout,
            timer: None,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
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

    /// More new connections than tokio's default backlog (128) arrive
    /// while nothing accepts: each completes its handshake at once and
    /// waits in the backlog, instead of a second for a retransmit.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Over 128 and under `net.core.somaxconn` (4096 on current kernels).
        let connects = (0..300)
            .map(|_| tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)));
        let streams = futures::future::join_all(connects).await;
        let connected = streams.iter().filter(|s| matches!(s, Ok(Ok(_)))).count();
        assert_eq!(connected, 300, "connections made within 500 ms");
        drop(listener);
    }
}
