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
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LockError {
    /// The key is held by another holder (`try_acquire`).
    AlreadyLocked,
    /// The key stayed held by another holder for the whole waiting budget of `acquire`
    /// ([`LockConfig::wait_budget`](crate::LockConfig::wait_budget)): the backend's last answer
    /// said it was held. A backend that did not answer in that time gives
    /// [`LockError::BackendError`], not this.
    Timeout,
    /// The backend failed or could not be reached.
    ///
    /// The error inside is the driver's own (a `sqlx::Error`, a `redis::RedisError`, ...) or a
    /// message: it is this error's [`source`](StdError::source), so walking the source chain
    /// reaches it and `downcast_ref` works on it. This error's own text only says that the
    /// backend failed; print the chain (as error reporters do) to see why.
    ///
    /// ```
    /// use std::error::Error;
    /// use k1s0_distributed_lock::LockError;
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    /// let err = LockError::backend(io);
    /// assert_eq!(err.to_string(), "the lock backend failed");
    /// let cause = err.source().unwrap().downcast_ref::<std::io::Error>().unwrap();
    /// assert_eq!(cause.kind(), std::io::ErrorKind::ConnectionRefused);
    /// ```
    BackendError(Arc<dyn StdError + Send + Sync + 'static>),
    /// The guard's lock expired or now belongs to someone else. Returned by `release` and
    /// `extend` of such a guard; the current holder's lock is left untouched.
    LockLost,
    /// The key cannot be used: it is empty or longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    InvalidKey {
        /// Why the key was refused.
        reason: String,
    },
    /// The configuration makes no sense (for example a zero TTL).
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
    /// assert!(std::error::Error::source(&err).unwrap().to_string().contains("refused"));
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

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::AlreadyLocked => f.write_str("the lock is already held"),
            LockError::Timeout => f.write_str("timed out waiting for the lock"),
            // Not the source's text: it is `source()`, and error reporters print the chain.
            LockError::BackendError(_) => f.write_str("the lock backend failed"),
            LockError::LockLost => f.write_str("the lock was lost: it expired or was taken over"),
            LockError::InvalidKey { reason } => write!(f, "invalid lock key: {reason}"),
            LockError::InvalidConfig { reason } => {
                write!(f, "invalid lock configuration: {reason}")
            }
        }
    }
}

impl StdError for LockError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            // The error inside the `Arc`, not the `Arc`: `Arc<E>`'s own `Error` impl forwards
            // `source()` to `E`'s, which would skip the driver's error and make it impossible
            // to downcast.
            LockError::BackendError(source) => Some(&**source),
            _ => None,
        }
    }
}

/// A backend failure described by a message alone.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BackendMessage(String);
