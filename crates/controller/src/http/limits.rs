//! Rate limits: token buckets per API token, per user and, for requests
//! without valid credentials, per client address. A request draws from
//! every bucket that applies; the tightest one is reported in the
//! `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset` headers
//! (IETF draft "RateLimit header fields"), and a refusal is 429 with
//! `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
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

#[cfg(test)]
mod tests {
    use super::*;

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
