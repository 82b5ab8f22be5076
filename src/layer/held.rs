//! [`HeldLock`]: the lock a request runs under, kept alive until the response is finished.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::settings::Settings;
use crate::keep_alive::KeepAlive;
use crate::{KeyVisibility, LockError, LockGuard, LockInfo};

/// The guard of one request's lock, with its keep-alive. Dropping it stops the keep-alive and
/// drops the guard (released in the background); [`release`](Self::release) releases it with
/// a bounded wait.
///
/// The keep-alive starts the first time the request waits with the lock held
/// ([`keep_alive`](Self::keep_alive)): a request that runs to its end in one go (a handler
/// that awaits nothing, a body complete at once) is over long before its TTL, and never pays
/// for a keep-alive task.
#[derive(Debug)]
pub(crate) struct HeldLock {
    // Field order matters: the keep-alive stops before the guard is dropped.
    keep_alive: Option<KeepAlive>,
    guard: LockGuard,
    /// Until when the lock may be kept alive; `None`: never.
    keep_alive_until: Option<Instant>,
    release_timeout: Duration,
    /// How log events show the key.
    keys: KeyVisibility,
}

impl HeldLock {
    pub(crate) fn new(guard: LockGuard, settings: &Settings) -> Self {
        HeldLock {
            keep_alive: None,
            guard,
            keep_alive_until: settings
                .keep_alive_for
                .map(|max_hold| Instant::now() + max_hold),
            release_timeout: settings.release_timeout,
            keys: settings.keys,
        }
    }

    /// Starts the keep-alive if it has not started yet: the request is about to wait (its
    /// handler is pending, or its response leaves with the body still holding the lock), and
    /// may wait longer than the TTL. `max_hold` counts from the acquisition.
    pub(crate) fn keep_alive(&mut self) {
        if let (None, Some(until)) = (&self.keep_alive, self.keep_alive_until) {
            let max_hold = until.saturating_duration_since(Instant::now());
            self.keep_alive = Some(self.guard.keep_alive(max_hold));
        }
    }

    pub(crate) fn info(&self) -> &LockInfo {
        self.guard.info()
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Stops the keep-alive and releases the lock, waiting at most the layer's
    /// `release_timeout`; past it the release goes on in the background.
    pub(crate) fn release(self) -> BoxFuture<'static, ()> {
        let HeldLock {
            keep_alive,
            guard,
            release_timeout,
            keys,
            ..
        } = self;
        drop(keep_alive);
        let key = guard.info().clone();
        Box::pin(async move {
            match tokio::time::timeout(release_timeout, guard.release()).await {
                // The guard logs a lost lock and a failed release itself.
                Ok(Ok(()) | Err(LockError::LockLost | LockError::BackendError(_))) => {}
                Ok(Err(error)) => {
                    tracing::debug!(key = %keys.show(key.key()), error = &error as &dyn std::error::Error, "releasing the lock of a finished response failed")
                }
                Err(_) => tracing::warn!(
                    key = %keys.show(key.key()),
                    ?release_timeout,
                    "releasing the lock took longer than release_timeout; the response goes on and the release finishes in the background"
                ),
            }
        })
    }
}
