//! Property tests: any key and any configuration either works on exactly that key or gives a
//! clear error, and nothing else changes (in-memory backend; the backend suites reuse these).

mod common;

use std::time::Duration;

use common::backends::Backend;
use common::hostile::{hostile_config, hostile_key};
use common::suites::hostile_key_check;
use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockError};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

backend_tests!(
    any_key_locks_exactly_itself_on_every_backend,
    any_configuration_works_or_is_refused_on_every_backend,
);

/// Hostile configurations against a real backend: an acquire either works (and its lock
/// expires within the TTL) or is refused with InvalidConfig exactly when validate() says so,
/// and a refused configuration leaves the key free.
async fn any_configuration_works_or_is_refused_on_every_backend(backend: Backend) {
    let prefix = common::unique_prefix(&format!("hostile-config-{backend:?}"));
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(48));
    let observer = backend.lock(LockConfig::new()).await;
    let case = std::sync::atomic::AtomicUsize::new(0);
    tokio::task::block_in_place(|| {
        runner
            .run(&hostile_config(), |config| {
                let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = format!("{prefix}{n}");
                runtime.block_on(async {
                    let lock = backend.lock(config).await;
                    let valid = config.validate().is_ok();
                    match lock.try_acquire(&key).await {
                        Ok(guard) => {
                            assert!(valid, "{config:?} accepted");
                            assert!(guard.remaining().unwrap_or_default() <= config.get_ttl());
                            drop(guard);
                        }
                        Err(LockError::InvalidConfig { .. }) => {
                            assert!(!valid, "{config:?} refused");
                            assert!(matches!(
                                lock.acquire(&key).await,
                                Err(LockError::InvalidConfig { .. })
                            ));
                            assert!(!observer.is_locked(&key).await.unwrap());
                        }
                        Err(other) => panic!("{config:?}: unexpected {other:?}"),
                    }
                });
                Ok(())
            })
            .unwrap();
    });
}

/// The key property against a real backend: fewer cases, as each is a few round trips.
async fn any_key_locks_exactly_itself_on_every_backend(backend: Backend) {
    let lock = backend.lock(LockConfig::new()).await;
    let prefix = common::unique_prefix(&format!("hostile-{backend:?}"));
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(128));
    tokio::task::block_in_place(|| {
        runner
            .run(&hostile_key(), |key| {
                runtime.block_on(hostile_key_check(&lock, &prefix, &key));
                Ok(())
            })
            .unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_key_locks_exactly_itself_or_is_refused(key in hostile_key()) {
        let lock = InMemoryDistributedLock::new(LockConfig::new());
        runtime().block_on(async {
            hostile_key_check(&lock, "", &key).await;
            hostile_key_check(&lock, "p:", &key).await;
        });
        prop_assert_eq!(lock.tracked_keys(), 0);
    }

    #[test]
    fn any_configuration_works_or_is_refused_before_anything_changes(config in hostile_config()) {
        let lock = InMemoryDistributedLock::new(config);
        let valid = config.validate().is_ok();
        runtime().block_on(async {
            match lock.try_acquire("k").await {
                Ok(guard) => {
                    assert!(valid, "{config:?} was refused by validate() but accepted by try_acquire");
                    // A valid TTL always expires: it is bounded.
                    assert!(guard.remaining().unwrap_or_default() <= config.get_ttl());
                    // Zero retries or a budget: acquire on a held key ends (Timeout), never hangs.
                    if config.wait_budget() <= Duration::from_millis(50) {
                        assert!(matches!(lock.acquire("k").await, Err(LockError::Timeout) | Ok(_)));
                    }
                    drop(guard);
                }
                Err(LockError::InvalidConfig { reason }) => {
                    assert!(!valid, "{config:?} passed validate() but try_acquire refused it");
                    assert!(!reason.is_empty());
                    assert!(matches!(lock.acquire("k").await, Err(LockError::InvalidConfig { .. })));
                }
                Err(other) => panic!("{config:?}: unexpected {other:?}"),
            }
        });
        prop_assert_eq!(lock.tracked_keys(), 0);
    }
}
