//! Per-caller rate limit (`LABELSYNC_RATE_LIMIT_PER_MINUTE`; 0, the
//! default, turns it off): a token bucket per bearer token holding a
//! minute's worth of requests and refilled continuously, so a client may
//! burst up to the limit and then goes at the limit's pace. Past it a
//! request is `429 rate_limited` with `Retry-After`. The buckets live in
//! the scheduler process: with N replicas behind a balancer a token gets up
//! to N times the limit.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiError, AppState, access::Caller};

/// Callers remembered at most; past it, buckets that are full again (their
/// callers idle for a minute) are forgotten first.
const MAX_CALLERS: usize = 10_000;

#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `caller`'s bucket: `Ok`, or how long until
    /// the next one is allowed.
    fn take(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            forget_full(&mut buckets, capacity, per_second, now);
        }
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let refilled = bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = refilled.min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

fn forget_full(
    buckets: &mut HashMap<String, Bucket>,
    capacity: f64,
    per_second: f64,
    now: Instant,
) {
    buckets
        .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_second < capacity);
}

/// Whose bucket a request takes from: its caller's key (see
/// [`Caller::key`]: a bootstrap token's sessions are that token's caller).
fn bucket_key(req: &Request) -> String {
    req.extensions()
        .get::<Caller>()
        .map(|caller| caller.key.clone())
        .unwrap_or_default()
}

/// The middleware, after authentication: only callers let in are counted.
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.limiter.per_minute == 0 {
        return next.run(req).await;
    }
    // Without tokens (the open loopback mode) there is one caller.
    let caller = bucket_key(&req);
    match state.limiter.take(&caller, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests a minute with this token; retry after {seconds} s",
                    state.limiter.per_minute
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_the_limit_then_the_limits_pace() {
        let limiter = RateLimiter::new(60);
        let start = Instant::now();
        for _ in 0..60 {
            assert!(limiter.take("a", start).is_ok());
        }
        let wait = limiter
            .take("a", start)
            .expect_err("the 61st request waits");
        assert!((0.9..=1.0).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(limiter.take("b", start).is_ok(), "buckets are per caller");
        let later = start + Duration::from_millis(1500);
        assert!(
            limiter.take("a", later).is_ok(),
            "one request refilled in a second"
        );
        assert!(limiter.take("a", later).is_err());
    }
}
