//! [`Side`]: what a layer takes for a request: the exclusive side of its key (the default),
//! the shared side for the requests a selector picks
//! ([`LockLayer::shared_when`](super::LockLayer::shared_when)), or one of the key's permits
//! ([`LockLayer::permits`](super::LockLayer::permits)).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::request::Parts;

use crate::{DistributedRwLock, DistributedSemaphore, LockError, LockGuard};

/// Takes the shared side of a key: `acquire_shared` when waiting, else `try_acquire_shared`.
pub(crate) type AcquireShared<B> =
    for<'a> fn(&'a B, &'a str, bool) -> BoxFuture<'a, Result<LockGuard, LockError>>;

/// Takes one of a key's `limit` permits: `acquire_permit` when waiting, else
/// `try_acquire_permit`.
pub(crate) type AcquirePermit<B> =
    for<'a> fn(&'a B, &'a str, u32, bool) -> BoxFuture<'a, Result<LockGuard, LockError>>;

/// The acquisitions a layer makes, and how it makes them for its lock type. The functions are
/// chosen where the lock is known to have a shared side or permits, so that the service,
/// written for any lock, can call them.
pub(crate) enum Side<B> {
    Exclusive,
    SharedWhen {
        select: Arc<dyn Fn(&Parts) -> bool + Send + Sync>,
        acquire: AcquireShared<B>,
    },
    Permits {
        limit: u32,
        acquire: AcquirePermit<B>,
    },
}

/// The acquisition of one request.
pub(crate) enum Chosen<B> {
    Exclusive,
    Shared(AcquireShared<B>),
    Permit(u32, AcquirePermit<B>),
}

impl<B: DistributedRwLock> Side<B> {
    pub(crate) fn shared_when(select: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        Side::SharedWhen {
            select: Arc::new(select),
            acquire: acquire_shared::<B>,
        }
    }
}

impl<B: DistributedSemaphore> Side<B> {
    pub(crate) fn permits(limit: u32) -> Self {
        Side::Permits {
            limit,
            acquire: acquire_permit::<B>,
        }
    }
}

impl<B> Side<B> {
    /// The acquisition for this request.
    pub(crate) fn for_request(&self, parts: &Parts) -> Chosen<B> {
        match self {
            Side::Exclusive => Chosen::Exclusive,
            Side::SharedWhen { select, acquire } if select(parts) => Chosen::Shared(*acquire),
            Side::SharedWhen { .. } => Chosen::Exclusive,
            Side::Permits { limit, acquire } => Chosen::Permit(*limit, *acquire),
        }
    }

    /// How the layer's `Debug` shows it.
    pub(crate) fn describe(&self) -> String {
        match self {
            Side::Exclusive => "exclusive".to_owned(),
            Side::SharedWhen { .. } => "shared when selected".to_owned(),
            Side::Permits { limit, .. } => format!("{limit} permits per key"),
        }
    }
}

impl<B> Clone for Side<B> {
    fn clone(&self) -> Self {
        match self {
            Side::Exclusive => Side::Exclusive,
            Side::SharedWhen { select, acquire } => Side::SharedWhen {
                select: Arc::clone(select),
                acquire: *acquire,
            },
            Side::Permits { limit, acquire } => Side::Permits {
                limit: *limit,
                acquire: *acquire,
            },
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

fn acquire_permit<'a, B: DistributedSemaphore>(
    lock: &'a B,
    key: &'a str,
    limit: u32,
    wait: bool,
) -> BoxFuture<'a, Result<LockGuard, LockError>> {
    if wait {
        Box::pin(lock.acquire_permit(key, limit))
    } else {
        Box::pin(lock.try_acquire_permit(key, limit))
    }
}
