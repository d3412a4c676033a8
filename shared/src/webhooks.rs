//! Webhook delivery: Standard Webhooks signatures, the HTTP attempt, the
//! retry schedule, and the job that works through one endpoint's queue.
//!
//! Signing follows <https://www.standardwebhooks.com/>: the secret is
//! `whsec_<base64 of 24-64 random bytes>`; each attempt sends `webhook-id`
//! (the event id, the same on every retry, for receivers to deduplicate),
//! `webhook-timestamp` (Unix seconds of this attempt) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
//! (two, space-separated, while a rotated secret's predecessor still signs:
//! see [`open_secrets`]).
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use rand::Rng;
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use sea_orm::DatabaseConnection;

use crate::{
    Error, Result,
    db::{
        entities::{webhook, webhook_delivery, webhook_event},
        webhooks::{self, AfterAttempt, AttemptLog},
    },
    security::{net::NetPolicy, secrets::SecretBox},
};

const SECRET_PREFIX: &str = "whsec_";
/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of an endpoint's answer is kept with the attempt.
const BODY_KEPT: usize = 1024;
/// How long the kept part of an answer is read for once its status came:
/// the status is the answer, the body only a note for the log.
const BODY_WAIT: Duration = Duration::from_secs(2);
/// The first retry waits about this long; each next one twice as long.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const RETRY_CAP: Duration = Duration::from_secs(3600);
/// Deliveries one job sends before it hands the endpoint back to the queue
/// (the scheduler's tick pushes the next job), so one busy endpoint does
/// not hold a worker slot for ever.
pub const PER_JOB: usize = 100;
/// How long one job goes on sending before it hands the endpoint back
/// (a receiver taking 9 s an answer would keep 100 deliveries going for
/// 15 minutes).
const JOB_TIME: Duration = Duration::from_secs(60);
/// An endpoint's lease goes stale after this long without renewal (every
/// attempt renews it, and one attempt takes at most [`ATTEMPT_TIMEOUT`]).
const LEASE_TTL: Duration = Duration::from_secs(30);

/// A new random signing secret.
pub fn generate_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("no randomness for a webhook secret".into()))?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes)))
}

/// The key bytes of a `whsec_` secret; a 400 for anything else.
pub fn secret_key(secret: &str) -> Result<Vec<u8>> {
    let bad = || {
        Error::invalid(
            "invalid_secret",
            Some("secret"),
            "secret must be whsec_ followed by the base64 of 24 to 64 random bytes (omit it to have one generated)",
        )
    };
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or_else(bad)?;
    let key = STANDARD.decode(encoded).map_err(|_| bad())?;
    if !(24..=64).contains(&key.len()) {
        return Err(bad());
    }
    Ok(key)
}

/// `v1,<signature>` of one attempt.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let signed = format!("{msg_id}.{timestamp}.{body}");
    let tag = hmac::sign(&key, signed.as_bytes());
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// The AEAD context binding an endpoint's sealed secrets to its row.
pub fn secret_context(id: i64) -> String {
    format!("webhook:{id}")
}

/// Seals a secret for the endpoint `id`.
pub fn seal_secret(secrets: &SecretBox, id: i64, secret: &str) -> Result<String> {
    let mut map = serde_json::Map::new();
    map.insert("secret".into(), secret.into());
    secrets.seal(&secret_context(id), &map)
}

/// The keys an endpoint's deliveries are signed with now: its secret's,
/// then, until `previous_secret_until`, the one a rotation replaced
/// (Standard Webhooks lists a signature per key, space-separated, and a
/// receiver accepts any one it can verify: one still on the old secret
/// keeps accepting events while it is switched over).
pub fn open_secrets(secrets: &SecretBox, hook: &webhook::Model) -> Result<Vec<Vec<u8>>> {
    let mut keys = vec![open_sealed(secrets, hook.id, &hook.secret)?];
    if let Some(previous) = &hook.previous_secret
        && previous_signs_until(hook).is_some()
    {
        // The current secret is what counts: one that opens signs alone.
        match open_sealed(secrets, hook.id, previous) {
            Ok(key) => keys.push(key),
            Err(err) => {
                tracing::warn!(webhook_id = hook.id, error = %err, "the webhook's previous secret does not open; signing with its current one alone");
            }
        }
    }
    Ok(keys)
}

/// Until when the secret a rotation replaced still signs the endpoint's
/// deliveries; `None` when none does (none kept, or its time is up).
pub fn previous_signs_until(hook: &webhook::Model) -> Option<DateTime<Utc>> {
    hook.previous_secret.as_ref()?;
    signs_until(hook.previous_secret_until)
}

/// A kept previous secret's `previous_secret_until` while it is still to
/// come; `None` once its time is up (or when none was set).
pub fn signs_until(until: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    until.filter(|until| crate::clock::now() < *until)
}

/// The key bytes of a secret sealed for the endpoint `id`.
fn open_sealed(secrets: &SecretBox, id: i64, sealed: &str) -> Result<Vec<u8>> {
    let map = secrets.open(&secret_context(id), sealed)?;
    let secret = map
        .get("secret")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Internal(format!("webhook {id} has no secret")))?;
    secret_key(secret)
}

/// The `webhook-signature` header of one attempt: `v1,<signature>` for
/// each key, space-separated.
pub fn signatures(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &str) -> String {
    let signed: Vec<String> = keys
        .iter()
        .map(|key| sign(key, msg_id, timestamp, body))
        .collect();
    signed.join(" ")
}

/// Sends events: a client with the SSRF guard's resolver, no redirects.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: NetPolicy,
}

impl Sender {
    pub fn new(policy: &NetPolicy) -> Result<Self> {
        Ok(Sender {
            client: crate::security::net::http_client(policy, ATTEMPT_TIMEOUT)?,
            policy: policy.clone(),
        })
    }

    /// One POST of `event` to `url` signed with each of `keys`, as the
    /// attempt log records it.
    pub async fn send(
        &self,
        url: &str,
        keys: &[Vec<u8>],
        event: &webhook_event::Model,
    ) -> AttemptLog {
        let started_at = crate::clock::now();
        let clock = Instant::now();
        // The lookup of a literal-free URL's name is inside the limit too
        // (a receiver's own slow DNS would hold the lease past its TTL).
        let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(url, keys, event))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())));
        // Read outside the attempt's limit: a 2xx whose body never ends
        // was an answer (it counted as none, and was sent again).
        let answer = match answer {
            Ok(response) => Ok((response.status().as_u16(), first_kb(response).await)),
            Err(error) => Err(error),
        };
        let duration_ms = clock.elapsed().as_millis() as i64;
        match answer {
            Ok((status, body)) => AttemptLog {
                started_at,
                status_code: Some(i32::from(status)),
                response_body: Some(body),
                error: (!(200..300).contains(&status)).then(|| format!("answered {status}")),
                duration_ms,
            },
            Err(error) => AttemptLog {
                started_at,
                status_code: None,
                response_body: None,
                error: Some(error),
                duration_ms,
            },
        }
    }

    async fn post(
        &self,
        url: &str,
        keys: &[Vec<u8>],
        event: &webhook_event::Model,
    ) -> std::result::Result<reqwest::Response, String> {
        // Literal addresses skip the resolver: check them here too.
        let url = self
            .policy
            .check_url(url, "url")
            .await
            .map_err(|e| e.to_string())?;
        let timestamp = Utc::now().timestamp();
        self.client
            .post(url)
            .timeout(ATTEMPT_TIMEOUT)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("labelsync-webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signatures(keys, &event.id, timestamp, &event.payload),
            )
            .body(event.payload.clone())
            .send()
            .await
            .map_err(describe)
    }
}

/// A failed attempt as the delivery log says it, without the URL (reqwest
/// quotes it, and a receiver's URL may hold its token: the log and the
/// workers' logs would show it).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    if err.is_timeout() {
        format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())
    } else if err.is_connect() {
        format!("cannot connect: {}", chain(&err))
    } else {
        chain(&err)
    }
}

/// An error with its causes, `outer: inner: ...`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The first KB of a body as text (NUL removed: no stored text holds it),
/// or what of it came within [`BODY_WAIT`]; the rest is not read.
async fn first_kb(mut response: reqwest::Response) -> String {
    let mut kept = Vec::with_capacity(BODY_KEPT);
    let deadline = tokio::time::Instant::now() + BODY_WAIT;
    while kept.len() < BODY_KEPT {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                kept.extend_from_slice(&chunk[..chunk.len().min(BODY_KEPT - kept.len())])
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&kept).replace('\0', "")
}

/// How long to wait before the next attempt at an endpoint that has been
/// failing for `failing_for` (from its first failed attempt in a row):
/// [`RETRY_BASE`] more than that, capped at [`RETRY_CAP`], with ±20 %
/// jitter so endpoints that failed together are not retried together. An
/// endpoint that refuses at once is tried after 1 s, 2 s, 4 s, ...
/// (each wait doubles the time failing). Timed by the endpoint, not by a
/// delivery's attempts: one delivery is tried at a time, and a delivery
/// queued again (redeliver) at an endpoint that works starts over at
/// 1 s, not at the hour its old attempts had reached.
pub fn retry_delay(failing_for: Duration) -> Duration {
    let base = (failing_for + RETRY_BASE).min(RETRY_CAP).as_secs_f64();
    Duration::from_secs_f64(base * rand::rng().random_range(0.8..1.2))
}

/// What the worker needs to deliver.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub db: &'a DatabaseConnection,
    pub secrets: Option<&'a SecretBox>,
    pub sender: &'a Sender,
    /// `LABELSYNC_WEBHOOK_MAX_AGE_SECS`: an endpoint failing this long is disabled.
    pub max_age: Duration,
    /// Set when the worker shuts down: the job ends after the attempt
    /// under way (the endpoint's next job goes on from there).
    pub stopping: &'a AtomicBool,
}

/// Why [`Delivery::send_due`] stopped.
#[derive(Debug, PartialEq)]
enum Stop {
    /// Nothing due is left: an event recorded meanwhile may be.
    Drained,
    /// Disabled, deleted, failing, its lease taken, or this job's share
    /// (time, deliveries) used: the next job goes on.
    HandedBack,
}

/// What is left of one job's share.
struct Share {
    sends: usize,
    until: tokio::time::Instant,
}

impl Delivery<'_> {
    /// Sends an endpoint's due deliveries, oldest first, while it accepts
    /// them; stops at the first failure (its retry is scheduled: later
    /// events wait behind it, so each run's events arrive in order), and
    /// after [`PER_JOB`] deliveries or [`JOB_TIME`], so that no endpoint
    /// keeps a worker slot for long.
    pub async fn run(&self, webhook_id: i64) -> Result<()> {
        let owner = ulid::Ulid::new().to_string();
        let mut share = Share {
            sends: PER_JOB,
            until: tokio::time::Instant::now() + JOB_TIME,
        };
        loop {
            if !webhooks::take_lease(self.db, webhook_id, &owner, LEASE_TTL).await? {
                // Another job delivers; what it leaves, the next dispatch pushes.
                return Ok(());
            }
            let result = self.send_due(webhook_id, &owner, &mut share).await;
            webhooks::release_lease(self.db, webhook_id, &owner).await?;
            // An event recorded while the lease was held had its job turned
            // away: look once more now that the lease is free.
            if result? == Stop::HandedBack || !self.head_is_due(webhook_id).await? {
                return Ok(());
            }
        }
    }

    async fn head_is_due(&self, webhook_id: i64) -> Result<bool> {
        Ok(webhooks::next_pending(self.db, webhook_id)
            .await?
            .is_some_and(|(d, _)| d.next_attempt_at <= crate::clock::now()))
    }

    async fn send_due(&self, webhook_id: i64, owner: &str, share: &mut Share) -> Result<Stop> {
        loop {
            if share.sends == 0
                || tokio::time::Instant::now() >= share.until
                || self.stopping.load(Ordering::Relaxed)
            {
                return Ok(Stop::HandedBack);
            }
            let Some(hook) = webhooks::find(self.db, webhook_id).await? else {
                return Ok(Stop::HandedBack); // deleted
            };
            if !hook.enabled {
                return Ok(Stop::HandedBack);
            }
            let Some((delivery, event)) = webhooks::next_pending(self.db, webhook_id).await? else {
                return Ok(Stop::Drained);
            };
            if delivery.next_attempt_at > crate::clock::now() {
                return Ok(Stop::Drained);
            }
            let after = self.attempt(&hook, &delivery, &event).await?;
            share.sends -= 1;
            if !matches!(after, AfterAttempt::Delivered)
                || !webhooks::take_lease(self.db, webhook_id, owner, LEASE_TTL).await?
            {
                return Ok(Stop::HandedBack);
            }
        }
    }

    /// Sends one delivery and records the attempt; returns what became of it.
    async fn attempt(
        &self,
        hook: &webhook::Model,
        delivery: &webhook_delivery::Model,
        event: &webhook_event::Model,
    ) -> Result<AfterAttempt> {
        let secrets = self.secrets.ok_or_else(|| {
            Error::Internal("webhooks need LABELSYNC_SECRET_KEY to open their secrets".into())
        })?;
        let keys = open_secrets(secrets, hook)?;
        let log = self.sender.send(&hook.url, &keys, event).await;
        let after = self.after(hook, &log);
        tracing::info!(
            webhook_id = hook.id,
            delivery_id = delivery.id,
            event_type = %event.event_type,
            status = log.status_code,
            error = log.error.as_deref(),
            "webhook attempt"
        );
        webhooks::record_attempt(self.db, delivery, &log, &after, webhooks::Sent::Queued).await?;
        Ok(after)
    }

    fn after(&self, hook: &webhook::Model, log: &AttemptLog) -> AfterAttempt {
        if log.error.is_none() {
            return AfterAttempt::Delivered;
        }
        let now = crate::clock::now();
        let since = hook.failing_since.unwrap_or(now);
        let max_age = chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX);
        if now - since >= max_age {
            return AfterAttempt::GiveUp {
                disable: Some(format!(
                    "every attempt failed from {} to {} (LABELSYNC_WEBHOOK_MAX_AGE_SECS = {}); \
                     fix the endpoint, then PATCH {{\"enabled\": true}} and redeliver what you need",
                    since.to_rfc3339(),
                    now.to_rfc3339(),
                    self.max_age.as_secs()
                )),
            };
        }
        let failing_for = (now - since).to_std().unwrap_or_default();
        let wait = chrono::Duration::from_std(retry_delay(failing_for)).unwrap_or_default();
        AfterAttempt::RetryAt(now + wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A previous secret that does not open (sealed under an earlier key)
    /// is skipped: deliveries are signed with the current one alone, not
    /// failed for the grace period.
    #[test]
    fn a_previous_secret_that_does_not_open_signs_nothing() {
        let now = crate::clock::now();
        let boxed = |byte: u8| SecretBox::from_base64(&STANDARD.encode([byte; 32])).unwrap();
        let (current, earlier) = (boxed(7), boxed(9));
        let secret = generate_secret().unwrap();
        let previous = generate_secret().unwrap();
        let hook = webhook::Model {
            id: 1,
            project_id: None,
            url: "https://hooks.example/in".into(),
            events: ",*,".into(),
            secret: seal_secret(&current, 1, &secret).unwrap(),
            previous_secret: Some(seal_secret(&earlier, 1, &previous).unwrap()),
            previous_secret_until: Some(now + chrono::Duration::hours(1)),
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            lease_owner: None,
            lease_at: None,
            created_at: now,
            updated_at: now,
        };
        assert!(open_sealed(&current, 1, hook.previous_secret.as_deref().unwrap()).is_err());
        let keys = open_secrets(&current, &hook).unwrap();
        assert_eq!(keys, vec![secret_key(&secret).unwrap()]);
        let opening = webhook::Model {
            previous_secret: Some(seal_secret(&current, 1, &previous).unwrap()),
            ..hook
        };
        assert_eq!(open_secrets(&current, &opening).unwrap().len(), 2);
    }

    /// The example of the Standard Webhooks specification's test vectors.
    #[test]
    fn signature_matches_the_specification_example() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// An endpoint that answers 200 and then never ends its body: its
    /// answer is the status (the attempt counted as unanswered after 10 s
    /// before), with the part of the body that came.
    #[tokio::test]
    async fn an_answer_is_its_status_whatever_its_body_does() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nreceived";
            conn.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let sender = Sender::new(&NetPolicy::allow_all()).unwrap();
        let event = webhook_event::Model {
            id: "msg_1".into(),
            event_type: "webhook.test".into(),
            project_id: None,
            payload: "{}".into(),
            created_at: crate::clock::now(),
        };
        let log = sender.send(&url, &[b"key".to_vec()], &event).await;
        assert_eq!(log.status_code, Some(200), "{:?}", log.error);
        assert_eq!(log.error, None);
        assert_eq!(log.response_body.as_deref(), Some("received"));
        assert!(log.duration_ms < 5_000, "{} ms", log.duration_ms);
    }

    /// A receiver's URL may hold its token: a failed attempt does not
    /// quote it.
    #[tokio::test]
    async fn a_failed_attempt_does_not_quote_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://127.0.0.1:{port}/hooks/SECRET?token=SECRET");
        let err = reqwest::Client::new().post(&url).send().await.unwrap_err();
        let described = describe(err);
        assert!(described.starts_with("cannot connect"), "{described}");
        assert!(!described.contains("SECRET"), "{described}");
    }

    #[test]
    fn secrets_are_checked_and_generated_in_the_whsec_form() {
        let made = generate_secret().unwrap();
        assert_eq!(secret_key(&made).unwrap().len(), 32);
        for bad in [
            "",
            "whsec_",
            "whsec_!!!",
            "sk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_c2hvcnQ=",
        ] {
            assert!(secret_key(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn retries_double_and_stop_growing_at_an_hour() {
        let first = retry_delay(Duration::ZERO).as_secs_f64();
        assert!((0.8..1.2).contains(&first), "{first}");
        // After 1, 2, 4 and 8 s of waiting: the fifth wait.
        let fifth = retry_delay(Duration::from_secs(15)).as_secs_f64();
        assert!((12.8..19.2).contains(&fifth), "{fifth}");
        let late = retry_delay(Duration::from_secs(86_400 * 40)).as_secs_f64();
        assert!((2880.0..4320.0).contains(&late), "{late}");
    }
}
