//! The lease of one held lock: when it runs out and whether it is known to be lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
    term: Mutex<Term>,
    lost: AtomicBool,
}

/// The latest grant or renewal: when it was sent and the deadline it set.
#[derive(Debug, Clone, Copy)]
struct Term {
    sent_at: Instant,
    deadline: Instant,
}

impl Lease {
    /// A lease that runs out `ttl` after `sent_at`, the moment the acquire request was sent.
    pub fn new(sent_at: Instant, ttl: Duration) -> Arc<Self> {
        Arc::new(Lease {
            term: Mutex::new(Term {
                sent_at,
                deadline: deadline_after(sent_at, ttl),
            }),
            lost: AtomicBool::new(false),
        })
    }

    /// Sets the deadline to `ttl` after `sent_at` (the moment the renewal was sent), as the
    /// backend does: a shorter TTL moves it earlier. A renewal sent before the latest one
    /// applied is stale and changes nothing; a lost lease stays lost.
    pub fn renew(&self, sent_at: Instant, ttl: Duration) {
        if self.lost.load(Ordering::Acquire) {
            return;
        }
        let mut term = self.term.lock().unwrap_or_else(PoisonError::into_inner);
        if sent_at >= term.sent_at {
            *term = Term {
                sent_at,
                deadline: deadline_after(sent_at, ttl),
            };
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
        self.term
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline
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
}

/// `sent_at + ttl`, saturating far in the future instead of overflowing.
fn deadline_after(sent_at: Instant, ttl: Duration) -> Instant {
    sent_at
        .checked_add(ttl)
        .unwrap_or_else(|| sent_at + crate::MAX_DURATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_out_at_the_deadline_of_the_latest_renewal() {
        let start = Instant::now();
        let lease = Lease::new(start, Duration::from_millis(100));
        assert!(!lease.is_lost());
        assert_eq!(lease.remaining(), Some(Duration::from_millis(100)));

        tokio::time::advance(Duration::from_millis(60)).await;
        lease.renew(Instant::now(), Duration::from_millis(100));
        // A renewal sent earlier but applied late is stale.
        lease.renew(start, Duration::from_millis(10_000));
        assert_eq!(lease.deadline(), start + Duration::from_millis(160));

        // A shorter TTL moves the deadline earlier, as it does on the backend.
        lease.renew(Instant::now(), Duration::from_millis(10));
        assert_eq!(lease.deadline(), start + Duration::from_millis(70));
        tokio::time::advance(Duration::from_millis(10)).await;
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
