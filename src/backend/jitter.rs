//! Jitter for the retries of waiting acquires, shared by the server backends.

use std::time::Duration;

use uuid::Uuid;

/// A small SplitMix64 generator for polling jitter, seeded from a waiter's random token (one
/// OS random draw per wait, not one per retry).
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(token: Uuid) -> Self {
        let bits = token.as_u128();
        Jitter((bits as u64) ^ ((bits >> 64) as u64))
    }

    /// A duration in `low..=high`.
    pub(crate) fn between(&mut self, low: Duration, high: Duration) -> Duration {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        low + (high.saturating_sub(low)).mul_f64(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bounds_and_varies() {
        let mut jitter = Jitter::new(Uuid::new_v4());
        let (low, high) = (Duration::from_millis(50), Duration::from_millis(100));
        let draws: Vec<_> = (0..1_000).map(|_| jitter.between(low, high)).collect();
        assert!(draws.iter().all(|d| *d >= low && *d <= high));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 900);
    }
}
