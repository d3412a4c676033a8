//! Open event streams (`/events`, `/runs/{id}/events`), counted per caller
//! and in all. A stream holds its connection for as long as it watches,
//! and `/events` never ends by itself: without a limit one token could hold
//! every connection the server takes (`LABELSYNC_MAX_CONNECTIONS`), and the
//! probes, on the same port, with them. Every stream ends when the server
//! begins to stop ([`Streams::close_all`]). Proxied `/resolve` bodies are
//! counted the same way ([`Streams::proxied`]): one from a storage that
//! trickles holds its connection as long as the storage likes.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::http::StatusCode;
use tokio::sync::watch;

use super::{ApiError, ApiResult, access::Caller};

/// Streams one caller (a token; the open mode; the bootstrap tokens) may
/// hold open at once.
pub const PER_CALLER: usize = 16;

/// The streams open now; clones share the count.
#[derive(Debug, Clone)]
pub struct Streams {
    open: Arc<Mutex<Open>>,
    /// What is counted, for refusals: a per-caller cap, a code, a name.
    kind: Kind,
    /// Set when the server begins to stop: every stream ends then, so its
    /// client reconnects (to another replica) at once, not when the
    /// server's drain time runs out.
    closing: Arc<watch::Sender<bool>>,
}

#[derive(Debug, Clone, Copy)]
struct Kind {
    per_caller: usize,
    /// Of every caller together.
    most: usize,
    code: &'static str,
    what: &'static str,
    /// The `Retry-After` of a refusal: about how soon a place frees up.
    retry_after: u32,
}

impl Streams {
    /// Event streams of a server that takes `max_connections`
    /// (`LABELSYNC_MAX_CONNECTIONS`): [`PER_CALLER`] per caller, half the
    /// connections in all, so requests and probes still get in.
    pub fn events(max_connections: usize) -> Self {
        Streams::of(Kind {
            per_caller: PER_CALLER,
            most: (max_connections / 2).max(1),
            code: "too_many_streams",
            what: "event streams",
            // Streams last: a client that tries again at once is refused
            // again.
            retry_after: 30,
        })
    }
}

#[derive(Debug, Default)]
struct Open {
    by_caller: HashMap<String, usize>,
    total: usize,
}

/// One open stream's place, given back when it drops (the stream ended or
/// its client went away).
#[derive(Debug)]
pub struct Slot {
    streams: Streams,
    key: String,
}

impl Streams {
    fn of(kind: Kind) -> Self {
        Streams {
            open: Arc::default(),
            kind,
            closing: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Proxied `/resolve` bodies (`too_many_downloads`), each held until
    /// it is sent: a storage that trickles holds its connection as long as
    /// it likes, so one caller's may take an eighth of the connections the
    /// server takes, and all of them a quarter (with event streams' half,
    /// a quarter is left to other requests).
    pub fn proxied(max_connections: usize) -> Self {
        Streams::of(Kind {
            per_caller: (max_connections / 8).max(1),
            most: (max_connections / 4).max(1),
            code: "too_many_downloads",
            what: "proxied downloads",
            // A download's place frees up as soon as its body is sent.
            retry_after: 1,
        })
    }

    /// A place for one more stream of `caller`, if it holds fewer than its
    /// kind's per-caller cap and all callers fewer than its total (else
    /// `429`, with a `Retry-After`).
    pub fn open(&self, caller: &Caller) -> ApiResult<Slot> {
        // Each bootstrap token is a caller of its own (they shared one
        // count, their common name's).
        let key = caller.key.clone();
        // A poisoned count is still a count.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.by_caller.get(&key).copied().unwrap_or(0);
        let Kind {
            per_caller,
            most,
            code,
            what,
            retry_after,
        } = self.kind;
        let refuse = |message: String| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(retry_after)
        };
        if mine >= per_caller {
            return Err(refuse(format!(
                "at most {per_caller} {what} of one token are open at once; close one first"
            )));
        }
        if open.total >= most {
            return Err(refuse(format!(
                "the server holds {most} {what}, its most; try again later"
            )));
        }
        open.by_caller.insert(key.clone(), mine + 1);
        open.total += 1;
        Ok(Slot {
            streams: self.clone(),
            key,
        })
    }

    /// Ends every stream, open now or opened later: the server is stopping.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves when [`Self::close_all`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut closing = self.closing.subscribe();
        async move {
            // An error: the sender is gone with the server.
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.by_caller.get_mut(&self.key) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.by_caller.remove(&self.key);
            }
        }
    }
}
