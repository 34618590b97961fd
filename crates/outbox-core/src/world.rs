//! What the code takes from the world outside it: random numbers and the
//! wall clock. Everything in the workspace reads them here, so that the
//! simulator (`crates/outbox-sim`) can install its own on the thread it
//! runs a seed on: the same seed then draws the same numbers and reads the
//! same (virtual) dates, and a run replays exactly.
//!
//! Outside a simulation they are `rand`'s thread generator and the system
//! clock.

use std::cell::RefCell;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A simulated world: a seeded generator, and a wall clock that follows
/// tokio's (paused) clock from a fixed date.
struct Simulated {
    rng: StdRng,
    epoch: DateTime<Utc>,
    started: tokio::time::Instant,
}

thread_local! {
    static SIMULATED: RefCell<Option<Simulated>> = const { RefCell::new(None) };
}

/// Installs a simulated world on this thread until [`leave`]: random
/// numbers from `seed`, and a wall clock that reads `epoch` now and moves
/// with tokio's clock. Call it inside the runtime whose clock is paused.
pub fn simulate(seed: u64, epoch: DateTime<Utc>) {
    SIMULATED.with(|s| {
        *s.borrow_mut() = Some(Simulated {
            rng: StdRng::seed_from_u64(seed),
            epoch,
            started: tokio::time::Instant::now(),
        });
    });
}

/// Back to the real world on this thread.
pub fn leave() {
    SIMULATED.with(|s| *s.borrow_mut() = None);
}

/// The wall clock: the system's, or the simulation's.
pub fn now() -> DateTime<Utc> {
    SIMULATED.with(|s| match &*s.borrow() {
        Some(sim) => {
            let elapsed = chrono::Duration::from_std(sim.started.elapsed())
                .unwrap_or_else(|_| chrono::Duration::zero());
            sim.epoch + elapsed
        }
        None => Utc::now(),
    })
}

/// A random `u64`.
pub fn random_u64() -> u64 {
    with_rng(|rng| rng.random())
}

/// A random number in `range`.
pub fn random_range(range: std::ops::RangeInclusive<u64>) -> u64 {
    with_rng(|rng| rng.random_range(range))
}

/// A random fraction in `[0, 1)`.
pub fn random_fraction() -> f64 {
    with_rng(|rng| rng.random())
}

/// 16 random bytes (a version 4 UUID's worth).
pub fn random_bytes() -> [u8; 16] {
    with_rng(|rng| rng.random())
}

fn with_rng<T>(draw: impl FnOnce(&mut dyn rand::RngCore) -> T) -> T {
    SIMULATED.with(|s| match &mut *s.borrow_mut() {
        Some(sim) => draw(&mut sim.rng),
        None => draw(&mut rand::rng()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_world_draws_from_its_seed_and_reads_tokio_time() {
        let epoch = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let draw = |seed| {
            simulate(seed, epoch);
            let numbers: Vec<u64> = (0..4).map(|_| random_u64()).collect();
            leave();
            numbers
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        simulate(7, epoch);
        assert_eq!(now(), epoch);
        tokio::time::sleep(std::time::Duration::from_secs(90)).await;
        assert_eq!(now(), epoch + chrono::Duration::seconds(90));
        leave();
        assert!(now() > epoch);
    }
}
