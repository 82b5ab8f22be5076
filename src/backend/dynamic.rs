//! [`DynDistributedLock`]: the object-safe form of [`DistributedLock`], for choosing a backend
//! at run time.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::{DistributedLock, DistributedRwLock, LockError, LockGuard};

/// [`DistributedLock`] with boxed futures, so that it can be a trait object.
///
/// `DistributedLock` returns `impl Future`, so `dyn DistributedLock` does not exist. This trait
/// does: every `DistributedLock` is a `DynDistributedLock` (a blanket implementation), and
/// `Arc<dyn DynDistributedLock>` and `Box<dyn DynDistributedLock>` are `DistributedLock`
/// again, so they go wherever a lock goes, [`LockLayer`](crate::LockLayer) included. Each call
/// costs one allocation for its boxed future.
///
/// The methods carry a `dyn_` prefix so that they never clash with those of
/// `DistributedLock` when both traits are in scope: call `try_acquire`, `acquire`, ... on the
/// `Arc` or `Box`, as on any lock.
///
/// ```
/// use std::sync::Arc;
/// use k1s0_distributed_lock::{
///     DistributedLock, DynDistributedLock, InMemoryDistributedLock, LockConfig, LockError,
///     LockLayer,
/// };
///
/// /// The backend is chosen at run time (from the environment, a config file...).
/// fn lock_from_settings() -> Arc<dyn DynDistributedLock> {
///     Arc::new(InMemoryDistributedLock::new(LockConfig::new()))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LockError> {
/// let lock = lock_from_settings();
/// let guard = lock.try_acquire("order:42").await?;
/// assert!(lock.is_locked("order:42").await?);
/// lock.release(guard).await?;
///
/// // A layer over whichever backend it is.
/// let layer = LockLayer::new(lock, |req| format!("order:{}", req.uri.path()));
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
pub trait DynDistributedLock: Send + Sync + 'static {
    /// [`DistributedLock::try_acquire`], boxed.
    fn dyn_try_acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockGuard, LockError>>;

    /// [`DistributedLock::acquire`], boxed.
    fn dyn_acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockGuard, LockError>>;

    /// [`DistributedLock::release`], boxed.
    fn dyn_release(&self, guard: LockGuard) -> BoxFuture<'_, Result<(), LockError>>;

    /// [`DistributedLock::is_locked`], boxed.
    fn dyn_is_locked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LockError>>;

    /// [`DistributedLock::validate`].
    fn dyn_validate(&self) -> Result<(), LockError>;

    /// [`DistributedLock::key_visibility`].
    fn dyn_key_visibility(&self) -> crate::KeyVisibility;
}

impl<T: DistributedLock> DynDistributedLock for T {
    fn dyn_try_acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockGuard, LockError>> {
        Box::pin(self.try_acquire(key))
    }

    fn dyn_acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockGuard, LockError>> {
        Box::pin(self.acquire(key))
    }

    fn dyn_release(&self, guard: LockGuard) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(self.release(guard))
    }

    fn dyn_is_locked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(self.is_locked(key))
    }

    fn dyn_validate(&self) -> Result<(), LockError> {
        self.validate()
    }

    fn dyn_key_visibility(&self) -> crate::KeyVisibility {
        self.key_visibility()
    }
}

/// Implements [`DistributedLock`] for a pointer to `dyn DynDistributedLock`.
///
/// The `async move` blocks are needed: the boxed future borrows `self` and `key` for one
/// lifetime, shorter than either, which an `impl Future` here cannot name; an `async` block
/// holds the two borrows separately (and costs no extra allocation).
macro_rules! distributed_lock_for_pointer {
    ($pointer:ty) => {
        impl DistributedLock for $pointer {
            fn try_acquire(
                &self,
                key: &str,
            ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
                async move { (**self).dyn_try_acquire(key).await }
            }

            fn acquire(
                &self,
                key: &str,
            ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
                async move { (**self).dyn_acquire(key).await }
            }

            fn release(
                &self,
                guard: LockGuard,
            ) -> impl Future<Output = Result<(), LockError>> + Send {
                (**self).dyn_release(guard)
            }

            fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
                async move { (**self).dyn_is_locked(key).await }
            }

            fn validate(&self) -> Result<(), LockError> {
                (**self).dyn_validate()
            }

            fn key_visibility(&self) -> crate::KeyVisibility {
                (**self).dyn_key_visibility()
            }
        }
    };
}

distributed_lock_for_pointer!(Arc<dyn DynDistributedLock>);
distributed_lock_for_pointer!(Box<dyn DynDistributedLock>);

/// [`DistributedRwLock`] with boxed futures, so that a backend with a shared side can be
/// chosen at run time: `Arc<dyn DynDistributedRwLock>` and `Box<dyn DynDistributedRwLock>`
/// are `DistributedLock` and `DistributedRwLock` again (a
/// [`LockLayer`](crate::LockLayer) over them offers `shared_when`).
///
/// ```
/// use std::sync::Arc;
/// use k1s0_distributed_lock::{
///     DistributedLock, DistributedRwLock, DynDistributedRwLock, InMemoryDistributedLock,
///     LockConfig, LockError,
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LockError> {
/// let lock: Arc<dyn DynDistributedRwLock> =
///     Arc::new(InMemoryDistributedLock::new(LockConfig::new()));
/// let reader = lock.try_acquire_shared("order:42").await?;
/// assert!(lock.try_acquire("order:42").await.is_err());
/// lock.release(reader).await?;
/// # Ok(())
/// # }
/// ```
pub trait DynDistributedRwLock: DynDistributedLock {
    /// [`DistributedRwLock::try_acquire_shared`], boxed.
    fn dyn_try_acquire_shared<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<LockGuard, LockError>>;

    /// [`DistributedRwLock::acquire_shared`], boxed.
    fn dyn_acquire_shared<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<LockGuard, LockError>>;
}

impl<T: DistributedRwLock> DynDistributedRwLock for T {
    fn dyn_try_acquire_shared<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<LockGuard, LockError>> {
        Box::pin(self.try_acquire_shared(key))
    }

    fn dyn_acquire_shared<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<LockGuard, LockError>> {
        Box::pin(self.acquire_shared(key))
    }
}

distributed_lock_for_pointer!(Arc<dyn DynDistributedRwLock>);
distributed_lock_for_pointer!(Box<dyn DynDistributedRwLock>);

/// Implements [`DistributedRwLock`] for a pointer to `dyn DynDistributedRwLock` (the `async
/// move` blocks as in `distributed_lock_for_pointer`).
macro_rules! distributed_rw_lock_for_pointer {
    ($pointer:ty) => {
        impl DistributedRwLock for $pointer {
            fn try_acquire_shared(
                &self,
                key: &str,
            ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
                async move { (**self).dyn_try_acquire_shared(key).await }
            }

            fn acquire_shared(
                &self,
                key: &str,
            ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
                async move { (**self).dyn_acquire_shared(key).await }
            }
        }
    };
}

distributed_rw_lock_for_pointer!(Arc<dyn DynDistributedRwLock>);
distributed_rw_lock_for_pointer!(Box<dyn DynDistributedRwLock>);
