//! The HTTP server of both binaries (the scheduler's API, the worker's
//! metrics and probes), with the limits `axum::serve` cannot be given: a
//! timeout on request heads, a deadline on request bodies and a cap on open
//! connections ([`HttpLimits`]). Without them, ~20,000 connections that each
//! sent half a request held as many file descriptors and 1.5 GB for good.
//!
//! At the cap, a new connection is let in by closing the oldest connection
//! that is not inside a request (still sending its head, or idle between
//! requests), so slow clients cannot keep others out; when every connection
//! is inside a request, the new one waits (in the kernel's backlog) for one
//! to end. Requests are bounded too: a head by the header timeout, a body by
//! the body timeout.
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
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

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// open connections finish their requests (idle ones close at once) and
/// returns when the last one has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Slots::new(max));
    let stop = CancellationToken::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
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
        tokio::spawn(conn.serve(stream, builder.clone(), router.clone(), limits.body_timeout));
    }
    stop.cancel();
    // Each connection holds a permit until it has closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _closed = slots.permits.acquire_many(all).await;
}

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

#[derive(Default)]
struct ConnState {
    /// Requests in progress (HTTP/1: 0 or 1), from the arrival of the head
    /// until the response body is sent or dropped.
    requests: AtomicUsize,
    /// Tells the connection to close now, to make room.
    close: Notify,
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
        let state = Arc::new(ConnState::default());
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
            }
        }
    }

    /// Closes the oldest connection with no request in progress; false
    /// when every connection is inside a request. A head that completes
    /// just as its connection is picked is lost with it (the client sees the
    /// connection close), which only happens at the cap.
    fn close_oldest_idle(&self) -> bool {
        let mut open = self.lock();
        let oldest = open
            .iter()
            .find(|(_, c)| c.requests.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
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
        body_timeout: Duration,
    ) {
        let (state, slots) = (self.state.clone(), self.slots.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_request = InRequest::enter(state.clone(), slots.clone());
            let req = req.map(|body| Body::new(TimedBody::new(Body::new(body), body_timeout)));
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
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let mut draining = false;
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection closed on an error");
                    }
                    break;
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

/// Marks its connection as inside a request while it lives.
struct InRequest {
    state: Arc<ConnState>,
    slots: Arc<Slots>,
}

impl InRequest {
    fn enter(state: Arc<ConnState>, slots: Arc<Slots>) -> Self {
        state.requests.fetch_add(1, Ordering::AcqRel);
        InRequest { state, slots }
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.state.requests.fetch_sub(1, Ordering::AcqRel);
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
