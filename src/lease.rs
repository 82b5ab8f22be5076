//! The lease of one held lock: when it runs out and whether it is known to be lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The local view of one lock's lease, shared between a [`LockGuard`](crate::LockGuard) and the
/// backend that granted it.
///
/// A lease runs out at a deadline measured from the moment the acquire (or extend) was *sent*,
/// so the local deadline never lies later than the backend's. A backend that learns the lock is
/// gone (its session died, a renewal found another holder, a newer holder took an expired lock
/// over) calls [`mark_lost`](Self::mark_lost). [`LockGuard::is_lost`](crate::LockGuard::is_lost)
/// reads both, and [`lost`](Self::lost) waits for either with one timer.
///
/// Once lost, a lease stays lost: a renewal that arrives after the deadline passed does not
/// revive it (the lock may have been taken by someone else in between).
///
/// Backends written outside this crate create one with [`Lease::new`] and hand it to
/// [`LockGuard::new`](crate::LockGuard::new).
#[derive(Debug)]
pub struct Lease {
    term: Mutex<Term>,
    /// For a lock that lasts only as long as its connection: how long that connection is
    /// known to keep it.
    bound: Option<Arc<ConnectionBound>>,
    lost: AtomicBool,
    /// Wakes the [`lost`](Self::lost) futures when the deadline moves or the lease is lost.
    changed: Notify,
}

/// A second deadline shared by every lease on one connection, for locks that last only as long
/// as their connection: the server can end that connection (and free the locks) once it has
/// not heard from the client for a while, so a lock is only known to be held until the send
/// time of the connection's last confirmed round trip plus that while. The backend moves it
/// forward after every answer.
#[derive(Debug)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) struct ConnectionBound {
    until: Mutex<Instant>,
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
impl ConnectionBound {
    pub(crate) fn new(until: Instant) -> Arc<Self> {
        Arc::new(ConnectionBound {
            until: Mutex::new(until),
        })
    }

    /// Moves the bound to `until`, if that is later.
    pub(crate) fn confirm(&self, until: Instant) {
        let mut current = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        *current = (*current).max(until);
    }

    pub(crate) fn until(&self) -> Instant {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
        Self::with_bound(sent_at, ttl, None)
    }

    /// A lease that also runs out when `bound` passes (see [`ConnectionBound`]).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn bounded(
        sent_at: Instant,
        ttl: Duration,
        bound: Arc<ConnectionBound>,
    ) -> Arc<Self> {
        Self::with_bound(sent_at, ttl, Some(bound))
    }

    fn with_bound(
        sent_at: Instant,
        ttl: Duration,
        bound: Option<Arc<ConnectionBound>>,
    ) -> Arc<Self> {
        Arc::new(Lease {
            term: Mutex::new(Term {
                sent_at,
                deadline: deadline_after(sent_at, ttl),
            }),
            bound,
            lost: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// Sets the deadline to `ttl` after `sent_at` (the moment the renewal was sent), as the
    /// backend does: a shorter TTL moves it earlier. A renewal sent before the latest one
    /// applied is stale and changes nothing; a lost lease stays lost, and so does one whose
    /// deadline has passed by the time the renewal is applied.
    pub fn renew(&self, sent_at: Instant, ttl: Duration) {
        if self.lost.load(Ordering::Acquire) {
            return;
        }
        {
            let mut term = self.term.lock().unwrap_or_else(PoisonError::into_inner);
            if Instant::now() >= term.deadline {
                // Somebody may already have seen this lease as lost: it must stay so.
                drop(term);
                self.mark_lost();
                return;
            }
            if sent_at < term.sent_at {
                return;
            }
            *term = Term {
                sent_at,
                deadline: deadline_after(sent_at, ttl),
            };
        }
        self.changed.notify_waiters();
    }

    /// Records that the lock is gone. Irreversible.
    pub fn mark_lost(&self) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    /// True once the deadline has passed or the lock was reported gone. Never turns false
    /// again.
    pub fn is_lost(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.lost.store(true, Ordering::Release);
            return true;
        }
        false
    }

    /// Completes once the lease is lost: its deadline passed without renewal, or the backend
    /// reported the lock gone. One timer, re-armed when a renewal moves the deadline.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::Lease;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let lease = Lease::new(tokio::time::Instant::now(), Duration::from_secs(5));
    /// tokio::select! {
    ///     () = lease.lost() => println!("lost: stop writing"),
    ///     () = tokio::time::sleep(Duration::from_secs(1)) => println!("work finished in time"),
    /// }
    /// # }
    /// ```
    pub fn lost(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lease = Arc::clone(self);
        async move {
            loop {
                let changed = lease.changed.notified();
                tokio::pin!(changed);
                // Registered before the check, so a change in between is not missed.
                changed.as_mut().enable();
                if lease.is_lost() {
                    return;
                }
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep_until(lease.deadline()) => {}
                }
            }
        }
    }

    /// The length of the latest grant or renewal: the TTL a keep-alive renews with.
    pub fn term(&self) -> Duration {
        let term = self.term.lock().unwrap_or_else(PoisonError::into_inner);
        term.deadline.saturating_duration_since(term.sent_at)
    }

    /// When the latest grant or renewal was sent.
    pub fn renewed_at(&self) -> Instant {
        self.term
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sent_at
    }

    /// The moment the lease runs out unless renewed (or, for a lock that lasts only as long as
    /// its connection, unless the connection is heard from again, whichever comes first).
    pub fn deadline(&self) -> Instant {
        let deadline = self.term_deadline();
        match &self.bound {
            Some(bound) => deadline.min(bound.until()),
            None => deadline,
        }
    }

    /// The deadline of the latest grant or renewal alone, without the connection bound: when
    /// the backend is to expire the lock.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn term_deadline(&self) -> Instant {
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
    async fn a_bounded_lease_runs_out_at_its_connection_bound_unless_confirmed() {
        let start = Instant::now();
        let bound = ConnectionBound::new(start + Duration::from_secs(2));
        let lease = Lease::bounded(start, Duration::from_secs(30), Arc::clone(&bound));
        assert_eq!(lease.deadline(), start + Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(1)).await;
        bound.confirm(start + Duration::from_secs(3));
        bound.confirm(start + Duration::from_secs(2)); // older: ignored
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!lease.is_lost());
        lease.lost().await;
        assert_eq!(Instant::now(), start + Duration::from_secs(3));
        assert!(lease.is_lost() && lease.remaining().is_none());
    }

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
    async fn a_renewal_applied_after_the_deadline_does_not_revive_the_lease() {
        let start = Instant::now();
        let lease = Lease::new(start, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(90)).await;
        let sent_at = Instant::now();
        // The answer to the renewal arrives after the deadline: too late.
        tokio::time::advance(Duration::from_millis(20)).await;
        lease.renew(sent_at, Duration::from_millis(100));
        assert!(lease.is_lost());
        assert_eq!(lease.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_completes_at_the_deadline_of_the_latest_renewal() {
        let start = Instant::now();
        let lease = Lease::new(start, Duration::from_millis(100));
        let lost = tokio::spawn(lease.lost());
        tokio::time::advance(Duration::from_millis(50)).await;
        lease.renew(Instant::now(), Duration::from_millis(100));
        tokio::time::sleep_until(start + Duration::from_millis(120)).await;
        assert!(
            !lost.is_finished(),
            "the renewal moved the deadline to 150 ms"
        );
        tokio::time::sleep_until(start + Duration::from_millis(150)).await;
        tokio::task::yield_now().await;
        lost.await.unwrap();
        assert!(lease.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn lost_completes_when_the_backend_reports_the_lock_gone() {
        let lease = Lease::new(Instant::now(), Duration::from_secs(3600));
        let lost = tokio::spawn(lease.lost());
        tokio::task::yield_now().await;
        assert!(!lost.is_finished());
        lease.mark_lost();
        lost.await.unwrap();
        // A lost() started afterwards completes at once.
        lease.lost().await;
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
