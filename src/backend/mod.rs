//! The [`DistributedLock`] trait and its backends.

use std::future::Future;
use std::sync::Arc;

use crate::{LockError, LockGuard};

#[cfg(any(feature = "postgres", feature = "redis"))]
pub(crate) mod claims;
pub(crate) mod dynamic;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub(crate) mod jitter;
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod rw;
pub(crate) mod semaphore;
pub(crate) mod want;

/// A lock service: takes, tests and gives back named locks.
///
/// Implemented by [`InMemoryDistributedLock`](crate::InMemoryDistributedLock) and the
/// PostgreSQL and Redis backends (features `postgres` and `redis`), by `Arc<T>` of any of
/// them, and by `Arc<dyn DynDistributedLock>` and `Box<dyn DynDistributedLock>`: this trait
/// returns `impl Future` and cannot be a trait object, so use
/// [`DynDistributedLock`](crate::DynDistributedLock) to pick a backend at run time. Every
/// future is `Send`, so the trait works from spawned tasks and in Tower services.
///
/// ```
/// use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockError};
///
/// async fn settle(lock: &impl DistributedLock, order: u64) -> Result<(), LockError> {
///     let guard = lock.acquire(&format!("order:{order}")).await?;
///     // ... work on the order, passing guard.fencing_token() to storage ...
///     lock.release(guard).await
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// settle(&lock, 7).await.unwrap();
/// # }
/// ```
///
/// # Implementing a backend
///
/// A backend of your own returns guards built with [`LockGuard::new`] from the key, a random
/// token, a fencing token, a [`Lease`](crate::Lease) and a [`LockHandle`](crate::LockHandle)
/// that releases and extends exactly that lock.
pub trait DistributedLock: Send + Sync + 'static {
    /// Takes the lock if it is free; [`LockError::AlreadyLocked`] if someone holds it.
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// Takes the lock, waiting up to the configured budget
    /// ([`LockConfig::wait_budget`](crate::LockConfig::wait_budget): the `wait_timeout`, or
    /// `retry_interval * max_retries`) for it to come free.
    ///
    /// [`LockError::Timeout`] means the key was held by another holder for the whole budget:
    /// the backend's last answer before the budget ran out said so. When the backend could not
    /// answer (a stalled or unreachable server, a command timeout, or, on PostgreSQL, a task
    /// of this process queued ahead on the same key whose statement got no answer) the result
    /// is [`LockError::BackendError`] instead, within about the budget plus the backend's
    /// command timeout. A Tower [`LockLayer`](crate::LockLayer) in `.wait()` mode answers the
    /// first with a conflict (409) and the second with 503.
    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// Gives the lock back; [`LockError::LockLost`] if it had expired or was taken over.
    ///
    /// The guard knows which backend granted it, so this is the same as
    /// [`LockGuard::release`]: a guard from another lock object is released on its own backend.
    fn release(&self, guard: LockGuard) -> impl Future<Output = Result<(), LockError>> + Send {
        guard.release()
    }

    /// Whether someone holds the lock right now.
    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send;

    /// Checks that this lock can work as configured, without touching the backend.
    ///
    /// [`LockLayer::try_new`](crate::LockLayer::try_new) calls it, so that a bad
    /// configuration stops the application at start-up instead of failing every request.
    /// The built-in backends check their [`LockConfig`](crate::LockConfig); the default
    /// accepts.
    fn validate(&self) -> Result<(), LockError> {
        Ok(())
    }

    /// How this lock's spans and log events show keys
    /// ([`LockConfig::trace_keys`](crate::LockConfig::trace_keys)). A
    /// [`LockLayer`](crate::LockLayer) over the lock logs its decisions the same way. The
    /// built-in backends answer from their configuration; the default is
    /// [`KeyVisibility::Hashed`](crate::KeyVisibility::Hashed).
    fn key_visibility(&self) -> crate::KeyVisibility {
        crate::KeyVisibility::default()
    }
}

impl<T: DistributedLock> DistributedLock for Arc<T> {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).try_acquire(key)
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        (**self).acquire(key)
    }

    fn release(&self, guard: LockGuard) -> impl Future<Output = Result<(), LockError>> + Send {
        (**self).release(guard)
    }

    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
        (**self).is_locked(key)
    }

    fn validate(&self) -> Result<(), LockError> {
        (**self).validate()
    }

    fn key_visibility(&self) -> crate::KeyVisibility {
        (**self).key_visibility()
    }
}
