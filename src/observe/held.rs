//! A guard's record of its lock, for its spans and the metrics.

use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Instant;

use super::record::{self, LostCause};
use super::KeyVisibility;
use crate::Lease;

/// Which backend granted a guard's lock, how the key shows in spans, and since when it is
/// held. Counted in the `distributed_lock_held` gauge until dropped, when its hold time is
/// recorded.
#[derive(Debug)]
pub(crate) struct Held {
    backend: &'static str,
    keys: KeyVisibility,
    /// When the lock was taken, for the hold-time metric (read only when metrics are on).
    since: Option<Instant>,
    /// Whether the loss of the lock was counted (once per guard).
    lost_counted: AtomicBool,
}

impl Held {
    pub(crate) fn new(backend: &'static str, keys: KeyVisibility) -> Self {
        record::held(backend, 1.0);
        Held {
            backend,
            keys,
            since: record::ENABLED.then(Instant::now),
            lost_counted: AtomicBool::new(false),
        }
    }

    pub(crate) fn backend(&self) -> &'static str {
        self.backend
    }

    pub(crate) fn keys(&self) -> KeyVisibility {
        self.keys
    }

    /// Counts the loss of the lock, once per guard: `expired` if the lease's deadline has
    /// passed, `backend` if the backend said so before that.
    pub(crate) fn lost(&self, lease: &Lease) {
        if self.lost_counted.swap(true, Ordering::Relaxed) {
            return;
        }
        let cause = if tokio::time::Instant::now() >= lease.deadline() {
            LostCause::Expired
        } else {
            LostCause::Backend
        };
        tracing::warn!(
            backend = self.backend,
            cause = cause.as_str(),
            "a lock was lost before its holder released it"
        );
        record::lost(self.backend, cause);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        record::held(self.backend, -1.0);
        if let Some(since) = self.since {
            record::hold_ended(self.backend, since.elapsed());
        }
    }
}
