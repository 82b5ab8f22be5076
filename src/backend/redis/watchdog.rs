//! Opt-in automatic extension of held locks (a watchdog, as in Redisson).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::handle::LockRef;
use crate::config::validate_duration;
use crate::{Lease, LockError, MAX_DURATION};

/// Settings of the watchdog that keeps held Redis locks alive.
///
/// While a guard lives, its lock is renewed for another TTL every `renew_fraction × TTL`
/// (default a third of the TTL), for at most `max_hold` in all, counted from the acquire. The
/// watchdog stops when the guard is released or dropped. When a renewal finds the lock gone
/// (it expired or was taken over), the guard is marked lost
/// ([`LockGuard::is_lost`](crate::LockGuard::is_lost)) and the watchdog stops. Renewals are
/// scheduled from the moment the acquire was sent. A renewal that fails because Redis cannot be
/// reached is retried (every quarter period, or sooner, at half the lease left) until the
/// lease runs out.
///
/// When `max_hold` is reached the last renewal is cut to end exactly then, so a holder that
/// never releases (a stuck task) frees the lock after `max_hold`.
///
/// ```
/// use std::time::Duration;
/// use k1s0_distributed_lock::AutoExtend;
///
/// let watchdog = AutoExtend::new(Duration::from_secs(600)).renew_fraction(0.5);
/// assert_eq!(watchdog.get_max_hold(), Duration::from_secs(600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoExtend {
    renew_fraction: f64,
    max_hold: Duration,
}

impl AutoExtend {
    /// Renew every third of the TTL, for at most `max_hold` in all.
    pub const fn new(max_hold: Duration) -> Self {
        AutoExtend {
            renew_fraction: 1.0 / 3.0,
            max_hold,
        }
    }

    /// Renews every `fraction × TTL`; must lie in `[0.05, 0.9]`.
    pub const fn renew_fraction(mut self, fraction: f64) -> Self {
        self.renew_fraction = fraction;
        self
    }

    /// The fraction of the TTL between renewals.
    pub const fn get_renew_fraction(&self) -> f64 {
        self.renew_fraction
    }

    /// The upper bound on the total hold time.
    pub const fn get_max_hold(&self) -> Duration {
        self.max_hold
    }

    pub(crate) fn validate(&self) -> Result<(), LockError> {
        if !(0.05..=0.9).contains(&self.renew_fraction) {
            return Err(LockError::invalid_config(format!(
                "auto-extension renew_fraction {} is outside [0.05, 0.9]",
                self.renew_fraction
            )));
        }
        validate_duration(
            "auto-extension max_hold",
            self.max_hold,
            Duration::from_nanos(1),
            MAX_DURATION,
        )
    }
}

/// Starts the watchdog of one lock; abort the handle to stop it.
pub(crate) fn start(
    lock: Arc<LockRef>,
    lease: Arc<Lease>,
    ttl: Duration,
    acquired_at: Instant,
    settings: AutoExtend,
) -> AbortHandle {
    tokio::spawn(renew_until_stopped(lock, lease, ttl, acquired_at, settings)).abort_handle()
}

async fn renew_until_stopped(
    lock: Arc<LockRef>,
    lease: Arc<Lease>,
    ttl: Duration,
    acquired_at: Instant,
    settings: AutoExtend,
) {
    let period = ttl
        .mul_f64(settings.renew_fraction)
        .max(Duration::from_millis(1));
    let hold_until = acquired_at + settings.max_hold;
    // From the moment the lease counts from, not from when this task first runs.
    let mut next = acquired_at + period;
    loop {
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        let Some(hold_left) = hold_until.checked_duration_since(now) else {
            tracing::debug!(key = %lock.shown_key(), "auto-extension reached max_hold; letting the lock expire");
            return;
        };
        let renew_for = ttl.min(hold_left);
        if renew_for < Duration::from_millis(1) {
            return;
        }
        match lock.extend(renew_for).await {
            Ok(()) => {
                lease.renew(now, renew_for);
                if lease.is_lost() {
                    // Renewed in Redis only after the local deadline: the guard already counts
                    // the lock lost (and its turn has passed on), so stop keeping it alive.
                    tracing::warn!(key = %lock.shown_key(), "auto-extension answered after the lease ran out; stopping");
                    return;
                }
                tracing::trace!(key = %lock.shown_key(), "lock auto-extended");
                next = now + period;
            }
            Err(LockError::LockLost) => {
                tracing::warn!(key = %lock.shown_key(), "auto-extension found the lock gone; marking it lost");
                lease.mark_lost();
                return;
            }
            Err(error) => {
                if lease.is_lost() {
                    tracing::warn!(key = %lock.shown_key(), error = &error as &dyn std::error::Error, "auto-extension failed until the lease ran out");
                    lease.mark_lost();
                    return;
                }
                tracing::debug!(key = %lock.shown_key(), error = &error as &dyn std::error::Error, "auto-extension failed; retrying");
                // Retry within what is left of the lease: a quarter period, or half the slack.
                let slack = lease.remaining().unwrap_or_default();
                let retry_in = (period / 4).min(slack / 2);
                next = Instant::now() + retry_in.max(Duration::from_millis(1));
            }
        }
    }
}
