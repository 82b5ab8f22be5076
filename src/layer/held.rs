//! [`HeldLock`]: the lock a request runs under, kept alive until the response is finished.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::settings::Settings;
use crate::keep_alive::KeepAlive;
use crate::{LockError, LockGuard, LockInfo};

/// The guard of one request's lock, with its keep-alive. Dropping it stops the keep-alive and
/// drops the guard (released in the background); [`release`](Self::release) releases it with
/// a bounded wait.
#[derive(Debug)]
pub(crate) struct HeldLock {
    // Field order matters: the keep-alive stops before the guard is dropped.
    keep_alive: Option<KeepAlive>,
    guard: LockGuard,
    release_timeout: Duration,
}

impl HeldLock {
    pub(crate) fn new(guard: LockGuard, settings: &Settings) -> Self {
        HeldLock {
            keep_alive: settings
                .keep_alive_for
                .map(|max_hold| guard.keep_alive(max_hold)),
            guard,
            release_timeout: settings.release_timeout,
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
        } = self;
        drop(keep_alive);
        let key = guard.info().clone();
        Box::pin(async move {
            match tokio::time::timeout(release_timeout, guard.release()).await {
                // The guard logs a lost lock and a failed release itself.
                Ok(Ok(()) | Err(LockError::LockLost | LockError::BackendError(_))) => {}
                Ok(Err(error)) => {
                    tracing::debug!(key = ?key.key(), %error, "releasing the lock of a finished response failed")
                }
                Err(_) => tracing::warn!(
                    key = ?key.key(),
                    ?release_timeout,
                    "releasing the lock took longer than release_timeout; the response goes on and the release finishes in the background"
                ),
            }
        })
    }
}
