//! [`DistributedRwLock`]: the shared (read) side of a key's lock.

use std::future::Future;
use std::sync::Arc;

use super::DistributedLock;
use crate::{LockError, LockGuard};

/// A lock with a shared side: readers of a key hold it together, a writer alone.
///
/// [`try_acquire`](DistributedLock::try_acquire) and [`acquire`](DistributedLock::acquire)
/// take the exclusive (write) side; `try_acquire_shared` and `acquire_shared` the shared (read)
/// side. On one key an exclusive holder excludes every shared holder and the other way round;
/// any number of shared holders coexist. [`is_locked`](DistributedLock::is_locked) is true
/// while the key has any holder.
///
/// * **Fencing**: every guard, shared or exclusive, draws its fencing token from the key's one
///   sequence, so a token is larger than that of every holder that released before it
///   acquired.
/// * **Fairness**: callers wait first in, first out. Once an exclusive `acquire` waits for a
///   key, new shared callers (of any process) queue behind it, so writers are not starved by a
///   stream of readers; when a writer is done, the shared callers queued before the next
///   writer go in together, so readers are not starved by a queue of writers. A
///   `try_acquire_shared` while a writer waits answers [`LockError::AlreadyLocked`].
///   `PostgresDistributedLock` (feature `postgres`) keeps this order within a process; across
///   processes its order is phase-fair rather than first in, first out (see its
///   documentation).
/// * **No upgrade or downgrade**: a holder that asks for the other side of a key it holds
///   waits like anyone else, behind itself: `acquire` then ends with
///   [`LockError::Timeout`] when its budget runs out (and `try_acquire` with
///   `AlreadyLocked`). Release first, then take the other side.
///
/// Guards of both sides are released, extended, lost and cancelled exactly like exclusive
/// ones; [`LockGuard::mode`] says which side a guard holds.
///
/// ```
/// use k1s0_distributed_lock::{DistributedLock, DistributedRwLock, InMemoryDistributedLock, LockConfig, LockError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LockError> {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let first = lock.acquire_shared("order:42").await?;
/// let second = lock.acquire_shared("order:42").await?; // readers share
/// assert!(matches!(lock.try_acquire("order:42").await, Err(LockError::AlreadyLocked)));
/// assert!(second.fencing_token() > first.fencing_token());
/// first.release().await?;
/// second.release().await?;
/// let writer = lock.try_acquire("order:42").await?; // free again
/// # drop(writer);
/// # Ok(())
/// # }
/// ```
pub trait DistributedRwLock: DistributedLock {
    /// Takes the shared side if no exclusive holder has the key and no exclusive caller waits
    /// for it; [`LockError::AlreadyLocked`] otherwise.
    fn try_acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// Takes the shared side, waiting within the configured budget as
    /// [`acquire`](DistributedLock::acquire) does (and ending the same ways).
    fn acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send;
}

impl<T: DistributedRwLock> DistributedRwLock for Arc<T> {
    fn try_acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).try_acquire_shared(key)
    }

    fn acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).acquire_shared(key)
    }
}
