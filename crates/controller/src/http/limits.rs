//! Rate limits: token buckets per API token, per user and, for requests
//! without valid credentials, per client address (an IPv6 client by its
//! /64, see [`super::client_addr::rate_key`]). A request draws from
//! every bucket that applies; the tightest one is reported in the
//! `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset` headers
//! (IETF draft "RateLimit header fields"), and a refusal is 429 with
//! `Retry-After`.
//!
//! Also the per-user caps on long-lived streams ([`StreamSlots`]): a
//! stream holds a slot for as long as it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One bucket's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_sec: f64,
    /// Requests that may arrive at once (bucket size).
    pub burst: u32,
}

impl Rate {
    /// A limit of `per_sec` with a bucket of `burst`.
    pub const fn new(per_sec: f64, burst: u32) -> Self {
        Rate { per_sec, burst }
    }
}

/// The limits in force.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimits {
    /// Per API token (or JWT subject, or login session).
    pub per_credential: Rate,
    /// Per user, over all their credentials.
    pub per_user: Rate,
    /// Per client address for requests without valid credentials (slows
    /// down password and token guessing).
    pub anonymous: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_credential: Rate::new(20.0, 60),
            per_user: Rate::new(40.0, 120),
            anonymous: Rate::new(5.0, 20),
        }
    }
}

impl RateLimits {
    /// Limits high enough to never bind (benchmarks).
    pub fn unlimited() -> Self {
        let r = Rate::new(1e9, u32::MAX);
        RateLimits {
            per_credential: r,
            per_user: r,
            anonymous: r,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What one bucket said about a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The bucket size.
    pub limit: u32,
    /// Whole requests left now.
    pub remaining: u32,
    /// Seconds until the bucket is full again (or, refused, until one
    /// request is allowed).
    pub reset_secs: u64,
}

/// Buckets by key (`tok:…`, `usr:…`, `ip:…`).
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Above this many buckets, full ones are dropped (they hold no state).
const PRUNE_ABOVE: usize = 10_000;

impl Limiter {
    /// Take one request from the bucket `key` with `rate`.
    pub fn check(&self, key: &str, rate: Rate, now: Instant) -> Verdict {
        let burst = f64::from(rate.burst);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate.per_sec < burst
            });
        }
        let b = map.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_sec).min(burst);
        b.at = now;
        let allowed = b.tokens >= 1.0;
        if allowed {
            b.tokens -= 1.0;
        }
        let secs = |need: f64| -> u64 {
            if rate.per_sec <= 0.0 {
                return u64::MAX;
            }
            Duration::from_secs_f64((need / rate.per_sec).clamp(0.0, 1e9))
                .as_secs_f64()
                .ceil() as u64
        };
        Verdict {
            allowed,
            limit: rate.burst,
            remaining: b.tokens.floor().max(0.0) as u32,
            reset_secs: if allowed {
                secs(burst - b.tokens)
            } else {
                secs(1.0 - b.tokens).max(1)
            },
        }
    }
}

/// The verdict to report when several buckets applied: a refusal if any
/// refused (the longest wait), else the one with the fewest requests left.
pub fn tightest(vs: &[Verdict]) -> Option<Verdict> {
    let refused = vs
        .iter()
        .filter(|v| !v.allowed)
        .max_by_key(|v| v.reset_secs)
        .copied();
    refused.or_else(|| vs.iter().min_by_key(|v| v.remaining).copied())
}

/// The kinds of long-lived stream a user's open count is kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamClass {
    /// Server-Sent Events (`/api/v1/sessions/{id}/events`).
    EventStream,
    /// WebSocket streams (desktops and terminals together).
    WebSocket,
}

impl StreamClass {
    /// How the API names it in problems.
    pub fn noun(self) -> &'static str {
        match self {
            StreamClass::EventStream => "event streams",
            StreamClass::WebSocket => "desktop and terminal WebSockets",
        }
    }
}

type OpenStreams = Arc<Mutex<HashMap<(String, StreamClass), usize>>>;

/// Open streams per (user, class).
#[derive(Debug, Default)]
pub struct StreamSlots {
    open: OpenStreams,
}

/// One open stream; the slot is given back when this is dropped (when
/// the stream ends, however it ends).
#[derive(Debug)]
pub struct StreamSlot {
    open: OpenStreams,
    key: (String, StreamClass),
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl StreamSlots {
    /// Take a slot for one more `class` stream of `user`, unless `max` are
    /// open already (`Err` with how many are).
    pub fn try_open(
        &self,
        user: &str,
        class: StreamClass,
        max: usize,
    ) -> Result<StreamSlot, usize> {
        let key = (user.to_string(), class);
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(StreamSlot {
            open: Arc::clone(&self.open),
            key,
        })
    }

    /// How many `class` streams `user` has open.
    pub fn open(&self, user: &str, class: StreamClass) -> usize {
        let m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(user.to_string(), class)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_slots_are_capped_per_user_and_class_and_given_back() {
        let s = StreamSlots::default();
        let a1 = s.try_open("a", StreamClass::WebSocket, 2).unwrap();
        let _a2 = s.try_open("a", StreamClass::WebSocket, 2).unwrap();
        assert_eq!(s.try_open("a", StreamClass::WebSocket, 2).unwrap_err(), 2);
        // Other users and the other class have their own count.
        let _b = s.try_open("b", StreamClass::WebSocket, 2).unwrap();
        let _e = s.try_open("a", StreamClass::EventStream, 2).unwrap();
        drop(a1);
        assert_eq!(s.open("a", StreamClass::WebSocket), 1);
        assert!(s.try_open("a", StreamClass::WebSocket, 2).is_ok());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_then_refills() {
        let l = Limiter::default();
        let r = Rate::new(2.0, 3);
        let t0 = Instant::now();
        let got: Vec<bool> = (0..4).map(|_| l.check("k", r, t0).allowed).collect();
        assert_eq!(got, [true, true, true, false]);
        let refused = l.check("k", r, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_secs, 1);
        // Half a second at 2/s is one request.
        let later = l.check("k", r, t0 + Duration::from_millis(500));
        assert!(later.allowed);
        assert!(!l.check("k", r, t0 + Duration::from_millis(500)).allowed);
        // Other keys are independent.
        assert!(l.check("other", r, t0).allowed);
    }

    #[test]
    fn the_tightest_verdict_is_reported() {
        let ok = |remaining| Verdict {
            allowed: true,
            limit: 10,
            remaining,
            reset_secs: 1,
        };
        let no = Verdict {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset_secs: 3,
        };
        assert_eq!(tightest(&[ok(4), ok(2)]), Some(ok(2)));
        assert_eq!(tightest(&[ok(4), no]), Some(no));
        assert_eq!(tightest(&[]), None);
    }
}
