//! Throttling as Azure DPS does it: token buckets that answer `429` with the seconds until
//! the next request would pass (`Retry-After`). The engine keeps two (registrations of the
//! whole instance, requests per registration ID); transports keep one per source address for
//! failed authentications. Each node counts on its own.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// A rate: `burst` requests at once, refilled at `per_minute` per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests allowed at once (the bucket's size), at least 1.
    pub burst: u32,
    /// Refill per minute, more than 0.
    pub per_minute: u32,
}

impl RateLimit {
    fn refill_per_ms(self) -> f64 {
        f64::from(self.per_minute) / 60_000.0
    }
}

/// Keys tracked at most per table; beyond it, full buckets are forgotten first, and if all are
/// in use a new key is let through untracked rather than growing without bound.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct Buckets<K> {
    limit: RateLimit,
    table: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> Buckets<K> {
    /// Empty buckets (every key starts full).
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit: RateLimit { burst: limit.burst.max(1), per_minute: limit.per_minute.max(1) },
            table: Mutex::default(),
        }
    }

    fn refilled(&self, b: Bucket, now_ms: i64) -> Bucket {
        let elapsed = now_ms.saturating_sub(b.at_ms).max(0) as f64;
        Bucket {
            tokens: (b.tokens + elapsed * self.limit.refill_per_ms()).min(f64::from(self.limit.burst)),
            at_ms: now_ms,
        }
    }

    /// Seconds until one token is there, at least 1.
    fn wait_secs(&self, tokens: f64) -> u32 {
        let ms = (1.0 - tokens).max(0.0) / self.limit.refill_per_ms();
        ((ms / 1000.0).ceil() as u32).max(1)
    }

    /// Takes a token for `key`, or says how many seconds to wait.
    pub fn take(&self, key: &K, now_ms: i64) -> Result<(), u32> {
        self.update(key, now_ms, true)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K, now_ms: i64) -> Result<(), u32> {
        self.update(key, now_ms, false)
    }

    fn update(&self, key: &K, now_ms: i64, take: bool) -> Result<(), u32> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let full = Bucket { tokens: f64::from(self.limit.burst), at_ms: now_ms };
        let current = table.get(key).map_or(full, |b| self.refilled(*b, now_ms));
        if current.tokens < 1.0 {
            table.insert(key.clone(), current);
            return Err(self.wait_secs(current.tokens));
        }
        if !take {
            return Ok(());
        }
        if !table.contains_key(key) && table.len() >= MAX_KEYS {
            let burst = f64::from(self.limit.burst);
            table.retain(|_, b| self.refilled(*b, now_ms).tokens < burst);
            if table.len() >= MAX_KEYS {
                return Ok(());
            }
        }
        table.insert(key.clone(), Bucket { tokens: current.tokens - 1.0, at_ms: now_ms });
        Ok(())
    }

    /// Keys tracked now (for tests).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_and_says_how_long_to_wait() {
        let b = Buckets::new(RateLimit { burst: 2, per_minute: 30 }); // one every 2 s
        assert_eq!(b.take(&"d", 0), Ok(()));
        assert_eq!(b.take(&"d", 0), Ok(()));
        assert_eq!(b.take(&"d", 0), Err(2));
        assert_eq!(b.take(&"d", 1_000), Err(1), "half a token after 1 s");
        assert_eq!(b.check(&"d", 2_000), Ok(()));
        assert_eq!(b.take(&"d", 2_000), Ok(()));
        assert_eq!(b.take(&"d", 2_000), Err(2));
        assert_eq!(b.take(&"other", 2_000), Ok(()), "keys are separate");
        assert_eq!(b.take(&"d", 60_000), Ok(()), "never more than the burst");
        assert_eq!(b.take(&"d", 60_000), Ok(()));
        assert_eq!(b.take(&"d", 60_000), Err(2));
    }

    #[test]
    fn check_does_not_take() {
        let b = Buckets::new(RateLimit { burst: 1, per_minute: 1 });
        for _ in 0..5 {
            assert_eq!(b.check(&1, 0), Ok(()));
        }
        assert_eq!(b.take(&1, 0), Ok(()));
        assert_eq!(b.check(&1, 0), Err(60));
    }

    #[test]
    fn the_table_is_bounded() {
        let b = Buckets::new(RateLimit { burst: 1, per_minute: 60_000 });
        for k in 0..MAX_KEYS {
            b.take(&k, 0).unwrap();
        }
        // A millisecond later every bucket is full again: they are forgotten to make room.
        b.take(&MAX_KEYS, 1).unwrap();
        assert!(b.len() <= 2, "{}", b.len());
    }
}
