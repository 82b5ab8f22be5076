//! The error type shared by every backend and the layer.

use std::error::Error as StdError;
use std::sync::Arc;

/// What can go wrong when taking, keeping or giving back a lock.
///
/// Match on the unit variants directly:
///
/// ```
/// use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let _held = lock.try_acquire("order:7").await.unwrap();
/// match lock.try_acquire("order:7").await {
///     Err(LockError::AlreadyLocked) => println!("somebody else is working on order 7"),
///     other => panic!("unexpected: {other:?}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The key is held by another holder (`try_acquire`).
    #[error("the lock is already held")]
    AlreadyLocked,
    /// The key stayed held by another holder for the whole waiting budget of `acquire`
    /// (`retry_interval * max_retries`): the backend's last answer said it was held. A backend
    /// that did not answer in that time gives [`LockError::BackendError`], not this.
    #[error("timed out waiting for the lock")]
    Timeout,
    /// The backend failed or could not be reached. The source error says why.
    #[error("lock backend error: {0}")]
    BackendError(#[source] Arc<dyn StdError + Send + Sync + 'static>),
    /// The guard's lock expired or now belongs to someone else. Returned by `release` and
    /// `extend` of such a guard; the current holder's lock is left untouched.
    #[error("the lock was lost: it expired or was taken over")]
    LockLost,
    /// The key cannot be used: it is empty or longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    #[error("invalid lock key: {reason}")]
    InvalidKey {
        /// Why the key was refused.
        reason: String,
    },
    /// The configuration makes no sense (for example a zero TTL).
    #[error("invalid lock configuration: {reason}")]
    InvalidConfig {
        /// Which setting is wrong and why.
        reason: String,
    },
}

impl LockError {
    /// Wraps a backend failure (a driver, pool or I/O error) as [`LockError::BackendError`].
    ///
    /// ```
    /// use k1s0_distributed_lock::LockError;
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    /// let err = LockError::backend(io);
    /// assert!(matches!(err, LockError::BackendError(_)));
    /// assert!(err.to_string().contains("refused"));
    /// ```
    pub fn backend<E>(error: E) -> Self
    where
        E: StdError + Send + Sync + 'static,
    {
        LockError::BackendError(Arc::new(error))
    }

    /// Builds a [`LockError::BackendError`] from a message, for backends whose failure has no
    /// error value of its own (a timeout of a backend command, say).
    pub fn backend_msg(message: impl Into<String>) -> Self {
        LockError::BackendError(Arc::new(BackendMessage(message.into())))
    }

    pub(crate) fn invalid_config(reason: impl Into<String>) -> Self {
        LockError::InvalidConfig {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_key(reason: impl Into<String>) -> Self {
        LockError::InvalidKey {
            reason: reason.into(),
        }
    }
}

/// A backend failure described by a message alone.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BackendMessage(String);
