//! Lock timing settings shared by every backend.

use std::time::Duration;

use crate::KeyVisibility;

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
/// * `wait_timeout` — how long `acquire` waits for a held lock before it returns
///   [`LockError::Timeout`]: the plain way to set the waiting budget. Zero means a single
///   attempt.
/// * `retry_interval` — how often a waiter looks again when no release wakes it (default
///   100 ms). Backends that can wake waiters on release do so at once; this is then only the
///   fallback polling period.
/// * `max_retries` — the older way to set the budget: without a `wait_timeout`, `acquire`
///   waits `retry_interval * max_retries` (defaults 100 ms and 10, so 1 s). Once
///   `wait_timeout` is set it is the budget, whatever `max_retries` says.
///
/// [`wait_budget`](Self::wait_budget) tells the budget that results.
///
/// Nonsense (a zero TTL, a zero retry interval with a non-zero budget, durations beyond
/// [`MAX_DURATION`]) is reported by [`validate`](Self::validate) as
/// [`LockError::InvalidConfig`], and refused when a lock is built with it (for example by
/// [`InMemoryDistributedLock::try_new`](crate::InMemoryDistributedLock::try_new)).
///
/// ```
/// use std::time::Duration;
/// use k1s0_distributed_lock::LockConfig;
///
/// let config = LockConfig::new()
///     .ttl(Duration::from_secs(10))
///     .wait_timeout(Duration::from_secs(2));
/// assert_eq!(config.wait_budget(), Duration::from_secs(2));
/// config.validate().expect("a sane configuration");
///
/// // The same budget, the older way.
/// let config = LockConfig::new()
///     .retry_interval(Duration::from_millis(50))
///     .max_retries(40);
/// assert_eq!(config.wait_budget(), Duration::from_secs(2));
///
/// assert!(LockConfig::new().ttl(Duration::ZERO).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    ttl: Duration,
    retry_interval: Duration,
    max_retries: u32,
    /// When set, the waiting budget (and `max_retries` has no effect).
    wait_timeout: Option<Duration>,
    /// How spans show keys.
    trace_keys: KeyVisibility,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl LockConfig {
    /// The defaults: TTL 30 s, retry interval 100 ms, 10 retries (a 1 s waiting budget), no
    /// `wait_timeout`.
    pub const fn new() -> Self {
        LockConfig {
            ttl: Duration::from_secs(30),
            retry_interval: Duration::from_millis(100),
            max_retries: 10,
            wait_timeout: None,
            trace_keys: KeyVisibility::Hashed,
        }
    }

    /// Sets how the `tracing` spans of lock operations show the key: as given, as a hash
    /// (the default), or not at all. Metrics never carry the key. See
    /// [`KeyVisibility`] and docs/observability.md.
    pub const fn trace_keys(mut self, keys: KeyVisibility) -> Self {
        self.trace_keys = keys;
        self
    }

    /// How the spans of lock operations show the key.
    pub const fn get_trace_keys(&self) -> KeyVisibility {
        self.trace_keys
    }

    /// Sets how long a lock lives unless released or extended.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how often a waiter looks again when no release wakes it, and the unit of the
    /// budget `retry_interval * max_retries` when no [`wait_timeout`](Self::wait_timeout) is
    /// set.
    pub const fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Sets how many retry intervals `acquire` may wait in all, when no
    /// [`wait_timeout`](Self::wait_timeout) is set (it has no effect once one is).
    pub const fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Sets how long `acquire` waits for a held lock before it gives up with
    /// [`LockError::Timeout`]; zero means a single attempt.
    ///
    /// This is the waiting budget from now on, in place of `retry_interval * max_retries`
    /// (`max_retries` is then ignored). `retry_interval` stays the fallback polling period, so
    /// a non-zero timeout needs a non-zero `retry_interval` (the default 100 ms is fine). At
    /// most [`MAX_DURATION`]; [`validate`](Self::validate) refuses more.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::LockConfig;
    ///
    /// let config = LockConfig::new().max_retries(3).wait_timeout(Duration::from_secs(5));
    /// assert_eq!(config.wait_budget(), Duration::from_secs(5));
    /// assert_eq!(config.get_wait_timeout(), Some(Duration::from_secs(5)));
    /// ```
    pub const fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = Some(timeout);
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

    /// The wait timeout, if one was set with [`wait_timeout`](Self::wait_timeout).
    pub const fn get_wait_timeout(&self) -> Option<Duration> {
        self.wait_timeout
    }

    /// How long `acquire` waits in all: the [`wait_timeout`](Self::wait_timeout) if one is
    /// set, else `retry_interval * max_retries` (saturating).
    pub fn wait_budget(&self) -> Duration {
        match self.wait_timeout {
            Some(timeout) => timeout,
            None => self
                .retry_interval
                .checked_mul(self.max_retries)
                .unwrap_or(Duration::MAX),
        }
    }

    /// Checks the configuration, so that an application can refuse to start with a bad one.
    ///
    /// The built-in backends call it when a lock is built (`try_new` and the builders' `build`
    /// return its error, `new` panics with it), so a bad configuration never yields a lock
    /// object, let alone a lock that never expires.
    pub fn validate(&self) -> Result<(), LockError> {
        validate_ttl(self.ttl)?;
        validate_duration(
            "retry_interval",
            self.retry_interval,
            Duration::ZERO,
            MAX_DURATION,
        )?;
        match self.wait_timeout {
            Some(timeout) => {
                validate_duration("wait_timeout", timeout, Duration::ZERO, MAX_DURATION)?;
                if !timeout.is_zero() && self.retry_interval.is_zero() {
                    return Err(LockError::invalid_config(
                        "retry_interval is zero while wait_timeout is not: waiters would poll without pause",
                    ));
                }
            }
            None if self.max_retries > 0 && self.retry_interval.is_zero() => {
                return Err(LockError::invalid_config(
                    "retry_interval is zero while max_retries is not: the waiting budget would be empty",
                ));
            }
            None => {}
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
    fn wait_timeout_is_the_budget_and_overrides_max_retries() {
        let config = LockConfig::new()
            .retry_interval(Duration::from_millis(10))
            .max_retries(3)
            .wait_timeout(Duration::from_secs(7));
        assert_eq!(config.wait_budget(), Duration::from_secs(7));
        assert!(config.validate().is_ok());
        // Whatever the order of the calls.
        let config = LockConfig::new()
            .wait_timeout(Duration::from_secs(7))
            .max_retries(u32::MAX);
        assert_eq!(config.wait_budget(), Duration::from_secs(7));
        assert!(config.validate().is_ok());
        // Zero: a single attempt, with any retry interval.
        let config = LockConfig::new()
            .retry_interval(Duration::ZERO)
            .wait_timeout(Duration::ZERO);
        assert_eq!(config.wait_budget(), Duration::ZERO);
        assert!(config.validate().is_ok());
        assert_eq!(LockConfig::new().get_wait_timeout(), None);
    }

    #[test]
    fn a_bad_wait_timeout_is_refused() {
        for config in [
            LockConfig::new().wait_timeout(MAX_DURATION + Duration::from_nanos(1)),
            LockConfig::new().wait_timeout(Duration::MAX),
            LockConfig::new()
                .retry_interval(Duration::ZERO)
                .max_retries(0)
                .wait_timeout(Duration::from_millis(1)),
        ] {
            match config.validate() {
                Err(LockError::InvalidConfig { reason }) => {
                    assert!(reason.contains("wait_timeout"), "{reason}")
                }
                other => panic!("{config:?}: {other:?}"),
            }
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
