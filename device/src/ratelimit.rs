//! Rate limiting for log lines a guest can provoke at will (a rejected feature negotiation, a
//! failed activation): a guest looping on them must not flood the host's log.

use std::time::{Duration, Instant};

/// Allows `burst` lines per `period`; the first line after a quiet spell says how many were
/// suppressed.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// At most `burst` lines per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        RateLimit {
            burst,
            period,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged at `now`; if so, how many were suppressed before it.
    pub fn allow_at(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if expired {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// [`RateLimit::allow_at`] now.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }
}

/// Logs a warning through `limit`, adding how many similar lines were suppressed before it.
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            if suppressed > 0 {
                log::warn!("{} ({} similar warnings suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_period_and_counts_the_rest() {
        let mut limit = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let allowed = (0..10_000).filter(|_| limit.allow_at(t0).is_some()).count();
        assert_eq!(allowed, 3);
        // The next period: allowed again, reporting what was suppressed.
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(10)), Some(9_997));
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(10)), Some(0));
    }
}
