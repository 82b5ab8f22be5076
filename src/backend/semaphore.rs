//! [`DistributedSemaphore`]: up to `limit` holders of a key at once, across processes.

use std::future::Future;
use std::sync::Arc;

use crate::{LockError, LockGuard};

/// A counting lock: up to `limit` permits of a key are held at once, whoever holds them.
///
/// Where [`DistributedLock`](crate::DistributedLock) lets one holder in,
/// `try_acquire_permit(key, limit)` lets in up to `limit`: at most 3 exports per tenant, at most
/// 10 calls to a partner API at once, across every process that uses the backend.
///
/// * **A permit is a [`LockGuard`]**: released on drop, leased (its TTL,
///   [`extend`](LockGuard::extend), [`is_lost`](LockGuard::is_lost),
///   [`lost`](LockGuard::lost)), with a [`fencing token`](LockGuard::fencing_token) drawn
///   from the key's sequence. [`LockGuard::mode`] says [`Shared`](crate::LockMode::Shared):
///   holders of a key's permits coexist, up to the limit.
/// * **Its own namespace**: a permit on `k` does not conflict with a lock on `k`, of either
///   side.
/// * **The limit is the caller's**: each acquire checks the `limit` it passes against the
///   permits of the key held at that moment, so callers that pass different limits for one
///   key each see their own (a caller with limit 2 is refused while 2 permits are held,
///   even by callers with limit 5). Pass the same limit everywhere unless that is what you
///   want.
/// * **Waiting**: `acquire_permit` is woken when a permit is released, without polling. In
///   memory and on Redis callers go in first in, first out across every process: a caller
///   gets a permit while the permits held plus the callers waiting ahead of it are fewer than
///   its limit, so a try never takes a permit that a waiter needs. On PostgreSQL that holds
///   among the tasks of one lock object; waiters of different processes race for a freed
///   permit (docs/postgres.md, "Permits", has the details).
/// * **Crashed holders**: a permit whose holder crashed comes back at the end of its TTL; on
///   PostgreSQL at once, when its session ends (waiters of other processes see it at their
///   next retry).
///
/// `limit == 0` is [`LockError::InvalidConfig`]; so is a limit above 65,536 on PostgreSQL (the
/// slots of a key).
///
/// ```
/// use k1s0_distributed_lock::{DistributedSemaphore, InMemoryDistributedLock, LockConfig, LockError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LockError> {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let first = lock.try_acquire_permit("exports:tenant-7", 2).await?;
/// let second = lock.try_acquire_permit("exports:tenant-7", 2).await?;
/// assert!(matches!(
///     lock.try_acquire_permit("exports:tenant-7", 2).await,
///     Err(LockError::AlreadyLocked)
/// ));
/// assert_eq!(lock.permits_held("exports:tenant-7").await?, 2);
/// drop(first);
/// let third = lock.try_acquire_permit("exports:tenant-7", 2).await?; // one came back
/// assert!(third.fencing_token() > second.fencing_token());
/// # Ok(())
/// # }
/// ```
pub trait DistributedSemaphore: Send + Sync + 'static {
    /// Takes one of the `limit` permits of `key` if fewer than `limit` are held and no waiter
    /// needs it (see the trait's docs for each backend); [`LockError::AlreadyLocked`]
    /// otherwise.
    fn try_acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// Takes one of the `limit` permits of `key`, waiting within the configured budget as
    /// [`acquire`](crate::DistributedLock::acquire) does (and ending the same ways:
    /// [`LockError::Timeout`] when the permits stayed taken).
    fn acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// How many permits of `key` are held right now.
    fn permits_held(&self, key: &str) -> impl Future<Output = Result<u32, LockError>> + Send;
}

impl<T: DistributedSemaphore> DistributedSemaphore for Arc<T> {
    fn try_acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).try_acquire_permit(key, limit)
    }

    fn acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).acquire_permit(key, limit)
    }

    fn permits_held(&self, key: &str) -> impl Future<Output = Result<u32, LockError>> + Send {
        (**self).permits_held(key)
    }
}

/// Refuses a limit of 0: no caller could ever get a permit.
pub(crate) fn validate_limit(limit: u32) -> Result<(), LockError> {
    if limit == 0 {
        return Err(LockError::invalid_config(
            "a permit limit of 0 lets no caller in; it must be at least 1",
        ));
    }
    Ok(())
}
