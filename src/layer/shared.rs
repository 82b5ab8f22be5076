//! [`SharedSide`]: which requests take the shared side of their key, for a layer whose lock
//! has one ([`LockLayer::shared_when`](super::LockLayer::shared_when)).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::request::Parts;

use crate::{DistributedRwLock, LockError, LockGuard};

/// Takes the shared side of a key: `acquire_shared` when waiting, else `try_acquire_shared`.
pub(crate) type AcquireShared<B> =
    for<'a> fn(&'a B, &'a str, bool) -> BoxFuture<'a, Result<LockGuard, LockError>>;

/// The requests a layer locks on the shared side, and how it does so for its lock type. The
/// function is chosen where the lock is known to be a [`DistributedRwLock`], so that the
/// service, written for any lock, can call it.
pub(crate) struct SharedSide<B> {
    select: Arc<dyn Fn(&Parts) -> bool + Send + Sync>,
    acquire: AcquireShared<B>,
}

impl<B: DistributedRwLock> SharedSide<B> {
    pub(crate) fn new(select: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        SharedSide {
            select: Arc::new(select),
            acquire: acquire_shared::<B>,
        }
    }
}

impl<B> SharedSide<B> {
    /// The shared acquisition for this request, if it is one of those selected.
    pub(crate) fn for_request(&self, parts: &Parts) -> Option<AcquireShared<B>> {
        (self.select)(parts).then_some(self.acquire)
    }
}

impl<B> Clone for SharedSide<B> {
    fn clone(&self) -> Self {
        SharedSide {
            select: Arc::clone(&self.select),
            acquire: self.acquire,
        }
    }
}

fn acquire_shared<'a, B: DistributedRwLock>(
    lock: &'a B,
    key: &'a str,
    wait: bool,
) -> BoxFuture<'a, Result<LockGuard, LockError>> {
    if wait {
        Box::pin(lock.acquire_shared(key))
    } else {
        Box::pin(lock.try_acquire_shared(key))
    }
}
