//! A backend of the tests' own whose release takes as long as a test says: the in-memory
//! backend behind a release that waits first (or never finishes), like a server in a brown-out.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, Lease, LockConfig, LockError, LockGuard, LockHandle,
};
use tokio::time::Instant;

/// Takes locks like the in-memory backend; each release first waits `release_delay` (`None`:
/// forever), then frees the key and sets `released`.
#[derive(Clone)]
pub struct SlowReleaseLock {
    pub inner: InMemoryDistributedLock,
    release_delay: Option<Duration>,
    /// Set once a release has finished freeing its key.
    pub released: Arc<AtomicBool>,
}

impl SlowReleaseLock {
    pub fn new(release_delay: Option<Duration>) -> Self {
        SlowReleaseLock {
            inner: InMemoryDistributedLock::new(LockConfig::new()),
            release_delay,
            released: Arc::new(AtomicBool::new(false)),
        }
    }

    fn wrap(&self, inner: LockGuard) -> LockGuard {
        let ttl = inner.remaining().unwrap_or(Duration::from_millis(1));
        LockGuard::new(
            inner.key().to_owned(),
            inner.token(),
            inner.fencing_token(),
            Lease::new(Instant::now(), ttl),
            SlowHandle {
                inner: Mutex::new(Some(inner)),
                release_delay: self.release_delay,
                released: Arc::clone(&self.released),
            },
        )
    }
}

struct SlowHandle {
    inner: Mutex<Option<LockGuard>>,
    release_delay: Option<Duration>,
    released: Arc<AtomicBool>,
}

impl LockHandle for SlowHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(async move {
            // Woken several times along the way, as a release driven over a socket is.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            match self.release_delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
            let guard = self.inner.lock().unwrap().take();
            if let Some(guard) = guard {
                guard.release().await?;
            }
            self.released.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(async move {
            let guard = self.inner.lock().unwrap().take();
            let Some(guard) = guard else {
                return Err(LockError::LockLost);
            };
            let result = guard.extend(ttl).await;
            *self.inner.lock().unwrap() = Some(guard);
            result
        })
    }
}

impl DistributedLock for SlowReleaseLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let attempt = self.inner.try_acquire(key);
        let this = self.clone();
        async move { attempt.await.map(|guard| this.wrap(guard)) }
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let attempt = self.inner.acquire(key);
        let this = self.clone();
        async move { attempt.await.map(|guard| this.wrap(guard)) }
    }

    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
        self.inner.is_locked(key)
    }
}
