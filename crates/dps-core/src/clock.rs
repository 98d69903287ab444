//! The clock port, so tests can move time (SAS expiry, operation retention).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> i64;

    /// Whole seconds since the Unix epoch (never negative).
    fn now_secs(&self) -> u64 {
        u64::try_from(self.now_millis() / 1000).unwrap_or(0)
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that stands still until moved: for tests of anything time-dependent (SAS expiry,
/// certificate validity, operation retention, throttling). Share it as an `Arc` and keep a
/// handle to move it while the engine holds it as `Arc<dyn Clock>`:
///
/// ```
/// use std::sync::Arc;
/// use dps_core::clock::{Clock, ManualClock};
///
/// let clock = Arc::new(ManualClock::at_secs(1_700_000_000));
/// let engine_clock: Arc<dyn Clock> = clock.clone();
/// clock.advance_secs(3600);
/// assert_eq!(engine_clock.now_secs(), 1_700_003_600);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `millis` since the Unix epoch.
    pub fn at_millis(millis: i64) -> Self {
        Self { millis: AtomicI64::new(millis) }
    }

    /// A clock standing at `secs` since the Unix epoch.
    pub fn at_secs(secs: i64) -> Self {
        Self::at_millis(secs.saturating_mul(1000))
    }

    /// A clock standing at the system clock's current time.
    pub fn now() -> Self {
        Self::at_millis(SystemClock.now_millis())
    }

    /// Sets the time, in milliseconds since the Unix epoch (it may go backwards).
    pub fn set_millis(&self, millis: i64) {
        self.millis.store(millis, Ordering::SeqCst);
    }

    /// Moves the clock by `millis` (negative goes back).
    pub fn advance_millis(&self, millis: i64) {
        self.millis.fetch_add(millis, Ordering::SeqCst);
    }

    /// Moves the clock forward by `secs`.
    pub fn advance_secs(&self, secs: i64) {
        self.advance_millis(secs.saturating_mul(1000));
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.millis.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at_secs(1_000);
        assert_eq!(clock.now_millis(), 1_000_000);
        assert_eq!(clock.now_secs(), 1_000);
        clock.advance_millis(1_500);
        assert_eq!(clock.now_millis(), 1_001_500);
        assert_eq!(clock.now_secs(), 1_001);
        clock.advance_secs(-2);
        assert_eq!(clock.now_millis(), 999_500);
        clock.set_millis(-5);
        assert_eq!(clock.now_secs(), 0, "seconds are never negative");
        let now = ManualClock::now();
        assert!((now.now_millis() - SystemClock.now_millis()).abs() < 60_000);
    }
}
