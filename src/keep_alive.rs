//! [`KeepAlive`]: extends a held lock from a task of its own while the work it protects runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::guard::extend_lease;
use crate::{KeyVisibility, Lease, LockError, LockHandle};

/// Keeps one lock alive: every third of its lease's term, a task extends it by that term.
///
/// The task runs on its own, so the lock stays held while the work is parked (a handler
/// awaiting something, a response body waiting for a slow client to read). It stops when the
/// keep-alive is dropped, when the lock is lost (an extension refused, the lease ran out, the
/// backend reported it gone: logged at `warn`), or once `max_hold` has passed since it started:
/// then the lock is left to run out at the end of its current term, with a warning. It holds
/// the guard's handle only weakly, so dropping the guard releases the lock as usual.
#[derive(Debug)]
pub(crate) struct KeepAlive {
    task: Option<JoinHandle<()>>,
    /// Set when the work is over: an extension still in flight then (the abort takes effect
    /// at the task's next await) may find the lock released, which is no loss to report.
    stopped: Arc<AtomicBool>,
}

impl KeepAlive {
    /// Starts keeping the lock behind `handle` alive; outside a tokio runtime it does nothing
    /// (the lock lives for its TTL).
    pub(crate) fn start(
        handle: Weak<dyn LockHandle>,
        lease: Arc<Lease>,
        key: Arc<str>,
        keys: KeyVisibility,
        max_hold: Duration,
    ) -> Self {
        let stopped = Arc::new(AtomicBool::new(false));
        let task = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            runtime.spawn(keep_alive(
                handle,
                lease,
                key,
                keys,
                max_hold,
                Arc::clone(&stopped),
            ))
        });
        KeepAlive { task, stopped }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn keep_alive(
    handle: Weak<dyn LockHandle>,
    lease: Arc<Lease>,
    key: Arc<str>,
    keys: KeyVisibility,
    max_hold: Duration,
    stopped: Arc<AtomicBool>,
) {
    let key = keys.show(&key);
    let term = lease.term();
    let give_up_at = Instant::now() + max_hold;
    let mut next = lease.renewed_at() + term / 3;
    loop {
        tokio::select! {
            () = lease.lost() => break,
            () = tokio::time::sleep_until(next.min(give_up_at)) => {}
        }
        if Instant::now() >= give_up_at {
            tracing::warn!(
                key = %key,
                ?max_hold,
                "the work has held its lock for max_hold; no longer extending it, it runs out at the end of its term"
            );
            return;
        }
        let Some(handle) = handle.upgrade() else {
            return;
        };
        next = Instant::now() + term / 3;
        let extended = tokio::select! {
            extended = extend_lease(&*handle, &lease, term) => extended,
            () = lease.lost() => break,
        };
        match extended {
            Ok(()) => tracing::trace!(key = %key, "lock kept alive"),
            // The next turn of the loop reports the loss.
            Err(LockError::LockLost) => {}
            Err(error) => tracing::warn!(
                key = %key,
                error = &error as &dyn std::error::Error,
                "extending the lock failed; trying again a third of its term later"
            ),
        }
    }
    if !stopped.load(Ordering::Acquire) {
        tracing::warn!(key = %key, "the lock was lost while the work it protects was still running");
    }
}
