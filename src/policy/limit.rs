//! `gw.limit(key, rate, burst)`: token buckets. With the local backend the buckets are this
//! process's ([`LocalLimits`]); with Redis the fleet shares them (`src/fleet/limit.rs`), and
//! [`TokenBucket`] is the arithmetic both use.

use std::time::Instant;

use dashmap::DashMap;

/// Most buckets [`LocalLimits`] holds; past it, the full ones (which are as good as absent)
/// are dropped, and if none is full a new key is refused (its message is not admitted).
pub const MAX_BUCKETS: usize = 100_000;

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Adds what `rate` gave since the last look, up to `burst`.
    pub fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether it is full (then it is as good as absent).
    pub fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(rate, burst, now);
        copy.tokens >= burst
    }
}

/// The buckets of the local backend, shared by the workers of this process.
#[derive(Debug, Default)]
pub struct LocalLimits {
    buckets: DashMap<String, (TokenBucket, f64, f64)>,
}

impl LocalLimits {
    /// Takes one token of bucket `key`.
    pub fn take(&self, key: &str, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        if let Some(mut b) = self.buckets.get_mut(key) {
            let (bucket, r, bu) = &mut *b;
            (*r, *bu) = (rate, burst);
            return bucket.take(rate, burst, now);
        }
        if self.buckets.len() >= MAX_BUCKETS {
            self.buckets
                .retain(|_, (b, rate, burst)| !b.is_full(*rate, *burst, now));
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let mut bucket = TokenBucket::full(burst, now);
        let taken = bucket.take(rate, burst, now);
        self.buckets.insert(key.to_owned(), (bucket, rate, burst));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0, t0);
        assert!((0..3).all(|_| b.take(10.0, 3.0, t0)));
        assert!(!b.take(10.0, 3.0, t0));
        assert!(b.take(10.0, 3.0, t0 + Duration::from_millis(100)));
        assert!(!b.take(10.0, 3.0, t0 + Duration::from_millis(100)));
        assert!(b.is_full(10.0, 3.0, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn local_limits_count_per_key() {
        let l = LocalLimits::default();
        assert!(l.take("a", 1.0, 2.0) && l.take("a", 1.0, 2.0));
        assert!(!l.take("a", 1.0, 2.0));
        assert!(l.take("b", 1.0, 1.0));
    }
}
