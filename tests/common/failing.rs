//! A backend of the tests' own, built on the public extension API, that fails on demand.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockError, LockGuard,
};

/// Answers every call with `BackendError` while `down` is set, and otherwise behaves like the
/// in-memory backend it wraps.
#[derive(Clone)]
pub struct FlakyLock {
    down: Arc<AtomicBool>,
    inner: InMemoryDistributedLock,
}

impl FlakyLock {
    pub fn down() -> Self {
        FlakyLock {
            down: Arc::new(AtomicBool::new(true)),
            inner: InMemoryDistributedLock::new(LockConfig::new()),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn failure(&self) -> Option<LockError> {
        self.down.load(Ordering::SeqCst).then(|| {
            LockError::backend(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "lock server unreachable",
            ))
        })
    }
}

impl DistributedLock for FlakyLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let failure = self.failure();
        let attempt = self.inner.try_acquire(key);
        async move {
            match failure {
                Some(error) => Err(error),
                None => attempt.await,
            }
        }
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let failure = self.failure();
        let attempt = self.inner.acquire(key);
        async move {
            match failure {
                Some(error) => Err(error),
                None => attempt.await,
            }
        }
    }

    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
        let failure = self.failure();
        let check = self.inner.is_locked(key);
        async move {
            match failure {
                Some(error) => Err(error),
                None => check.await,
            }
        }
    }
}
