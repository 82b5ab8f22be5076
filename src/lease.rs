//! The lease of one held lock: when it runs out and whether it is known to be lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// The local view of one lock's lease, shared between a [`LockGuard`](crate::LockGuard) and the
/// backend that granted it.
///
/// A lease runs out at a deadline measured from the moment the acquire (or extend) was *sent*,
/// so the local deadline never lies later than the backend's. A backend that learns the lock is
/// gone (its session died, a renewal found another holder, a newer holder took an expired lock
/// over) calls [`mark_lost`](Self::mark_lost). [`LockGuard::is_lost`](crate::LockGuard::is_lost)
/// reads both.
///
/// Backends written outside this crate create one with [`Lease::new`] and hand it to
/// [`LockGuard::new`](crate::LockGuard::new).
#[derive(Debug)]
pub struct Lease {
    origin: Instant,
    /// Deadline in nanoseconds after `origin`.
    deadline_nanos: AtomicU64,
    lost: AtomicBool,
}

impl Lease {
    /// A lease that runs out `ttl` after `sent_at`, the moment the acquire request was sent.
    pub fn new(sent_at: Instant, ttl: Duration) -> Arc<Self> {
        let lease = Lease {
            origin: sent_at,
            deadline_nanos: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        };
        lease.store_deadline(sent_at, ttl);
        Arc::new(lease)
    }

    /// Moves the deadline to `ttl` after `sent_at` (the moment the renewal was sent), unless the
    /// lease is already lost. Never moves the deadline backwards.
    pub fn renew(&self, sent_at: Instant, ttl: Duration) {
        if !self.lost.load(Ordering::Acquire) {
            self.store_deadline(sent_at, ttl);
        }
    }

    /// Records that the lock is gone. Irreversible.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// True once the deadline has passed or the lock was reported gone.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire) || Instant::now() >= self.deadline()
    }

    /// The moment the lease runs out unless renewed.
    pub fn deadline(&self) -> Instant {
        self.origin + Duration::from_nanos(self.deadline_nanos.load(Ordering::Acquire))
    }

    /// How long the lease has left, or `None` once it is lost.
    pub fn remaining(&self) -> Option<Duration> {
        if self.lost.load(Ordering::Acquire) {
            return None;
        }
        self.deadline()
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }

    fn store_deadline(&self, sent_at: Instant, ttl: Duration) {
        let nanos = sent_at
            .saturating_duration_since(self.origin)
            .saturating_add(ttl)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64;
        self.deadline_nanos.fetch_max(nanos, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_out_at_the_deadline_and_renews_forward_only() {
        let start = Instant::now();
        let lease = Lease::new(start, Duration::from_millis(100));
        assert!(!lease.is_lost());
        assert_eq!(lease.remaining(), Some(Duration::from_millis(100)));

        tokio::time::advance(Duration::from_millis(60)).await;
        lease.renew(Instant::now(), Duration::from_millis(100));
        // An older renewal arriving late must not shorten the lease.
        lease.renew(start, Duration::from_millis(10));
        assert_eq!(lease.deadline(), start + Duration::from_millis(160));

        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(lease.is_lost());
        assert_eq!(lease.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn once_lost_stays_lost() {
        let lease = Lease::new(Instant::now(), Duration::from_secs(10));
        lease.mark_lost();
        lease.renew(Instant::now(), Duration::from_secs(10));
        assert!(lease.is_lost());
        assert_eq!(lease.remaining(), None);
    }
}
