//! Rate-limited log lines: a flood of failing requests (an authentication loop, a full disk)
//! must not flood the log. Each kind of line may appear [`BURST`] times per [`PERIOD`]; the
//! next line of that kind that is let through says how many were left out in between.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind per period.
pub const BURST: u32 = 20;
/// The period.
pub const PERIOD: Duration = Duration::from_secs(10);

struct Window {
    started: Instant,
    count: u32,
    suppressed: u64,
}

/// Per-kind windows. Kinds are static names, so the map stays small.
#[derive(Default)]
pub struct LogLimiter {
    windows: Mutex<HashMap<&'static str, Window>>,
}

impl LogLimiter {
    /// Whether a line of `kind` may be logged now at `now`; `Some(n)` with the number of lines of
    /// this kind left out since the last one logged.
    pub fn allow_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry(kind).or_insert(Window { started: now, count: 0, suppressed: 0 });
        if now.saturating_duration_since(w.started) >= PERIOD {
            w.started = now;
            w.count = 0;
        }
        if w.count < BURST {
            w.count += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    /// [`LogLimiter::allow_at`] now.
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        self.allow_at(kind, Instant::now())
    }
}

/// The process-wide limiter.
pub fn limiter() -> &'static LogLimiter {
    static LIMITER: std::sync::OnceLock<LogLimiter> = std::sync::OnceLock::new();
    LIMITER.get_or_init(LogLimiter::default)
}

/// Logs at `warn` at most [`BURST`] lines of `kind` per [`PERIOD`], each with the number
/// left out before it (`suppressed`).
#[macro_export]
macro_rules! warn_limited {
    ($kind:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::log_limit::limiter().allow($kind) {
            tracing::warn!(suppressed, $($rest)+);
        }
    };
}

/// As [`warn_limited!`], at `info`.
#[macro_export]
macro_rules! info_limited {
    ($kind:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::log_limit::limiter().allow($kind) {
            tracing::info!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_what_it_left_out() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow_at("a", t0), Some(0));
        }
        assert_eq!(l.allow_at("a", t0), None);
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow_at("b", t0), Some(0), "kinds are separate");
        assert_eq!(l.allow_at("a", t0 + PERIOD), Some(2), "a new period says how many were left out");
        assert_eq!(l.allow_at("a", t0 + PERIOD), Some(0));
    }
}
