//! `DynDistributedLock`: every backend behind one `Arc<dyn DynDistributedLock>` (or `Box`)
//! keeps the lock semantics, and a `LockLayer` works over one.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::backends::{AnyLock, Backend};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k1s0_distributed_lock::layer::key;
use k1s0_distributed_lock::{
    DistributedLock, DynDistributedLock, LockConfig, LockError, LockLayer,
};
use tower::{service_fn, Layer, ServiceExt};

fn config() -> LockConfig {
    LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .wait_timeout(Duration::from_secs(10))
}

/// The backend's own lock type (not the test's enum) as a trait object.
fn as_dyn(lock: AnyLock) -> Arc<dyn DynDistributedLock> {
    match lock {
        AnyLock::Memory(lock) => Arc::new(lock),
        #[cfg(feature = "postgres")]
        AnyLock::Postgres(lock) => Arc::new(lock),
        #[cfg(feature = "redis")]
        AnyLock::Redis(lock) => Arc::new(lock),
    }
}

fn as_box(lock: AnyLock) -> Box<dyn DynDistributedLock> {
    match lock {
        AnyLock::Memory(lock) => Box::new(lock),
        #[cfg(feature = "postgres")]
        AnyLock::Postgres(lock) => Box::new(lock),
        #[cfg(feature = "redis")]
        AnyLock::Redis(lock) => Box::new(lock),
    }
}

/// Every backend of this build, each as an `Arc<dyn DynDistributedLock>` in one list, runs
/// the same lock semantics; a `Box<dyn DynDistributedLock>` of the same lock object shares its
/// locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_behind_one_trait_object_type_keeps_the_lock_semantics() {
    let mut locks: Vec<(Backend, AnyLock, Arc<dyn DynDistributedLock>)> = Vec::new();
    for backend in [Backend::Memory].into_iter().chain(Backend::servers()) {
        let lock = backend.lock(config()).await;
        locks.push((backend, lock.clone(), as_dyn(lock)));
    }
    assert_eq!(locks.len(), 1 + Backend::servers().len());
    for (backend, same_object, lock) in locks {
        let key = format!("{}k", common::unique_prefix(&format!("dyn-{backend:?}")));
        lock_semantics(&lock, as_box(same_object), &key).await;
    }
}

async fn lock_semantics(
    lock: &Arc<dyn DynDistributedLock>,
    boxed: Box<dyn DynDistributedLock>,
    key: &str,
) {
    lock.validate().unwrap();
    boxed.validate().unwrap();
    assert!(matches!(
        lock.try_acquire("").await,
        Err(LockError::InvalidKey { .. })
    ));

    // Exclusion, seen through the Arc and the Box alike.
    let first = lock.try_acquire(key).await.unwrap();
    assert!(lock.is_locked(key).await.unwrap());
    assert!(boxed.is_locked(key).await.unwrap());
    assert!(matches!(
        lock.try_acquire(key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(
        boxed.try_acquire(key).await,
        Err(LockError::AlreadyLocked)
    ));

    // acquire waits (its budget is 10 s) and is handed the lock when the holder releases.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), lock.acquire(key))
            .await
            .is_err(),
        "acquire on a held key returned instead of waiting"
    );
    let waiter = tokio::spawn({
        let lock = Arc::clone(lock);
        let key = key.to_owned();
        async move { lock.acquire(&key).await }
    });
    let first_token = first.fencing_token();
    lock.release(first).await.unwrap();
    let second = waiter.await.unwrap().unwrap();
    assert!(second.fencing_token() > first_token);

    // Release through the Box; a released key is free for either.
    boxed.release(second).await.unwrap();
    assert!(!lock.is_locked(key).await.unwrap());
    let third = boxed.acquire(key).await.unwrap();
    drop(third);
    common::wait::assert_eventually("the dropped guard's lock is released", || async {
        !lock.is_locked(key).await.unwrap()
    })
    .await;
}

backend_tests!(a_lock_layer_over_a_trait_object_locks_each_request);

/// `LockLayer::new(Arc<dyn DynDistributedLock>, ..)`: a request on a held key is refused, one
/// on a free key runs its handler under the lock, which is free once the response is read.
async fn a_lock_layer_over_a_trait_object_locks_each_request(backend: Backend) {
    let lock = as_dyn(backend.lock(config()).await);
    let path = format!(
        "/{}",
        common::unique_prefix(&format!("dyn-layer-{backend:?}"))
    );
    let request = || {
        Request::post(path.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let handler_lock = Arc::clone(&lock);
    let service = LockLayer::new(Arc::clone(&lock), key::path()).layer(service_fn(
        move |req: Request<Full<Bytes>>| {
            let lock = Arc::clone(&handler_lock);
            async move {
                // The handler reports whether its own key is held while it runs.
                let held = lock.is_locked(req.uri().path()).await.unwrap();
                let answer = if held { "held" } else { "free" };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    answer.as_bytes(),
                ))))
            }
        },
    ));

    let held = lock.try_acquire(&path).await.unwrap();
    let refused = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    held.release().await.unwrap();

    let response = service.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "held",
        "the handler runs under the lock"
    );
    assert!(!lock.is_locked(&path).await.unwrap());
}
