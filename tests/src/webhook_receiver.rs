//! A webhook receiver for tests: it records every request (headers and
//! body) with the status it answered, answers what the test sets (200 by
//! default; 503 plays an endpoint that is down), and hands the requests it
//! accepted to the Standard Webhooks reference library (Python, from PyPI)
//! to verify their signatures: an implementation nobody here wrote.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    answer: AtomicU16,
    /// How long it takes to answer, in milliseconds.
    delay_ms: AtomicU64,
}

pub struct Receiver {
    pub url: String,
    shared: Arc<Shared>,
}

impl Receiver {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        shared.answer.store(200, Ordering::SeqCst);
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let listener = labelsync::http::listen(crate::LOOPBACK).expect("bind");
        let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, shared }
    }

    /// The status every next request gets.
    pub fn answer_with(&self, status: u16) {
        self.shared.answer.store(status, Ordering::SeqCst);
    }

    /// Every next request is answered `delay` after it arrived (it is
    /// recorded at once).
    pub fn answer_after(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(millis, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// The event types accepted for one run, in arrival order.
    pub fn accepted_types_of_run(&self, run_id: &str) -> Vec<String> {
        self.accepted()
            .iter()
            .map(Received::json)
            .filter(|e| e["data"]["run"]["id"] == run_id)
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until `done` holds of the accepted requests; panics after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let accepted = self.accepted();
            if done(&accepted) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver did not get what was expected within {timeout:?}; it got: {:#?}",
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Verifies every accepted request's signature with the `standardwebhooks`
    /// Python library under `secret` (and checks that a changed body or
    /// another secret fails); returns how many were verified.
    pub fn verify_with_reference_library(&self, secret: &str) -> usize {
        let accepted = self.accepted();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(
            file.path(),
            serde_json::to_vec(&accepted).expect("requests as JSON"),
        )
        .expect("write requests");
        let python = crate::repo_root().join(".ci/apivenv/bin/python");
        let out = std::process::Command::new(&python)
            .arg(crate::repo_root().join("tests/webhooks/verify.py"))
            .arg(secret)
            .arg(file.path())
            .output()
            .unwrap_or_else(|e| panic!("{} (installed by tests/run.sh): {e}", python.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "signature verification failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .trim()
            .strip_prefix("verified ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected verifier output: {stdout}"))
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let status = shared.answer.load(Ordering::SeqCst);
    let headers = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    shared.received.lock().expect("lock").push(Received {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        status,
    });
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
}
