//! Lock timing settings shared by every backend.

use std::time::Duration;

use crate::LockError;

/// The longest TTL, retry interval or waiting budget a configuration may ask for (365 days).
///
/// Longer values are refused with [`LockError::InvalidConfig`]: they are almost certainly a
/// unit mistake, and they would overflow clock arithmetic in some backends.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How long a lock lives and how long [`acquire`](crate::DistributedLock::acquire) waits.
///
/// * `ttl` — how long a lock lives unless it is released or extended (default 30 s). A holder
///   that crashes frees its lock after at most this long.
/// * `retry_interval` and `max_retries` — the waiting budget of `acquire` is
///   `retry_interval * max_retries` (defaults 100 ms and 10, so 1 s). Backends that can wake
///   waiters on release do so at once; `retry_interval` is then only the budget's unit and the
///   fallback polling period.
///
/// Nonsense (a zero TTL, a zero retry interval with retries, durations beyond
/// [`MAX_DURATION`]) is reported by [`validate`](Self::validate), and by the first acquire at
/// the latest, as [`LockError::InvalidConfig`].
///
/// ```
/// use std::time::Duration;
/// use k1s0_distributed_lock::LockConfig;
///
/// let config = LockConfig::new()
///     .ttl(Duration::from_secs(10))
///     .retry_interval(Duration::from_millis(50))
///     .max_retries(40);
/// assert_eq!(config.wait_budget(), Duration::from_secs(2));
/// config.validate().expect("a sane configuration");
///
/// assert!(LockConfig::new().ttl(Duration::ZERO).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    ttl: Duration,
    retry_interval: Duration,
    max_retries: u32,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl LockConfig {
    /// The defaults: TTL 30 s, retry interval 100 ms, 10 retries.
    pub const fn new() -> Self {
        LockConfig {
            ttl: Duration::from_secs(30),
            retry_interval: Duration::from_millis(100),
            max_retries: 10,
        }
    }

    /// Sets how long a lock lives unless released or extended.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the unit of the waiting budget (and the fallback polling period).
    pub const fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Sets how many retry intervals `acquire` may wait in all.
    pub const fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The lock lifetime.
    pub const fn get_ttl(&self) -> Duration {
        self.ttl
    }

    /// The retry interval.
    pub const fn get_retry_interval(&self) -> Duration {
        self.retry_interval
    }

    /// The number of retries.
    pub const fn get_max_retries(&self) -> u32 {
        self.max_retries
    }

    /// How long `acquire` waits in all: `retry_interval * max_retries`, saturating.
    pub fn wait_budget(&self) -> Duration {
        self.retry_interval
            .checked_mul(self.max_retries)
            .unwrap_or(Duration::MAX)
    }

    /// Checks the configuration, so that an application can refuse to start with a bad one.
    ///
    /// Every backend also calls this before each acquire, so a bad configuration never yields a
    /// lock (let alone one that never expires).
    pub fn validate(&self) -> Result<(), LockError> {
        validate_ttl(self.ttl)?;
        validate_duration(
            "retry_interval",
            self.retry_interval,
            Duration::ZERO,
            MAX_DURATION,
        )?;
        if self.max_retries > 0 && self.retry_interval.is_zero() {
            return Err(LockError::invalid_config(
                "retry_interval is zero while max_retries is not: the waiting budget would be empty",
            ));
        }
        if self.wait_budget() > MAX_DURATION {
            return Err(LockError::invalid_config(format!(
                "the waiting budget retry_interval * max_retries = {:?} * {} is longer than the maximum {MAX_DURATION:?}",
                self.retry_interval, self.max_retries
            )));
        }
        Ok(())
    }
}

/// Checks a TTL given to a configuration or to [`LockGuard::extend`](crate::LockGuard::extend).
pub(crate) fn validate_ttl(ttl: Duration) -> Result<(), LockError> {
    validate_duration("ttl", ttl, Duration::from_millis(1), MAX_DURATION)
}

/// Checks that the setting `name` lies between `min` and `max`, inclusive.
pub(crate) fn validate_duration(
    name: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), LockError> {
    if value < min || value > max {
        return Err(LockError::invalid_config(format!(
            "{name} {value:?} must lie between {min:?} and {max:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let config = LockConfig::new();
        assert_eq!(config.get_ttl(), Duration::from_secs(30));
        assert_eq!(config.get_retry_interval(), Duration::from_millis(100));
        assert_eq!(config.get_max_retries(), 10);
        assert_eq!(config.wait_budget(), Duration::from_secs(1));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn nonsense_is_refused() {
        let bad = [
            LockConfig::new().ttl(Duration::ZERO),
            LockConfig::new().ttl(Duration::from_micros(999)),
            LockConfig::new().ttl(MAX_DURATION + Duration::from_secs(1)),
            LockConfig::new().retry_interval(Duration::ZERO),
            LockConfig::new().retry_interval(Duration::MAX),
            LockConfig::new()
                .retry_interval(Duration::from_secs(86_400))
                .max_retries(u32::MAX),
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(LockError::InvalidConfig { .. })),
                "{config:?} was accepted"
            );
        }
    }

    #[test]
    fn zero_retries_means_a_single_attempt() {
        let config = LockConfig::new()
            .max_retries(0)
            .retry_interval(Duration::ZERO);
        assert!(config.validate().is_ok());
        assert_eq!(config.wait_budget(), Duration::ZERO);
    }
}
