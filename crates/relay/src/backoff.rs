//! Exponential backoff with full jitter.

use std::time::Duration;

/// Waits grow as `base * 2^attempt`, capped, and each wait is drawn
/// uniformly from zero up to that bound ("full jitter"), so replicas that
/// failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        bound.mul_f64(outbox_core::world::random_fraction())
    }

    /// After a success: start small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_the_growing_bound_and_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..10 {
            let bound = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            assert!(backoff.next_delay() <= bound);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
