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

/// Hostile configurations against a real backend: building the lock is refused with
/// InvalidConfig exactly when validate() refuses the configuration, and nothing is touched;
/// a lock that was built works on the key and its lock expires within the TTL.
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
                    let valid = config.validate();
                    match backend.try_lock(config).await {
                        Ok(lock) => {
                            assert!(
                                valid.is_ok(),
                                "{config:?} built, but validate() says {valid:?}"
                            );
                            let guard = lock.try_acquire(&key).await.unwrap_or_else(|error| {
                                panic!("{config:?}: a lock that was built refused: {error:?}")
                            });
                            assert!(guard.remaining().unwrap_or_default() <= config.get_ttl());
                            // A TTL of a few milliseconds may run out before the next call:
                            // then the lock is gone and the guard knows it.
                            let short_ttl = config.get_ttl() < std::time::Duration::from_secs(1);
                            assert!(
                                lock.is_locked(&key).await.unwrap()
                                    || (short_ttl && guard.is_lost())
                            );
                            match guard.release().await {
                                Ok(()) => {}
                                Err(LockError::LockLost) => assert!(short_ttl),
                                Err(other) => panic!("{config:?}: release failed: {other:?}"),
                            }
                            assert!(!lock.is_locked(&key).await.unwrap());
                        }
                        Err(LockError::InvalidConfig { reason }) => {
                            let Err(LockError::InvalidConfig { reason: expected }) = valid else {
                                panic!("{config:?} refused ({reason}) but validate() accepts it");
                            };
                            assert_eq!(reason, expected, "{config:?}");
                        }
                        Err(other) => panic!("{config:?}: unexpected {other:?}"),
                    }
                    // Nothing is left on the server (for the in-memory backend the observer is a
                    // table of its own, and the checks above are the ones that count).
                    assert!(!observer.is_locked(&key).await.unwrap());
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
    fn any_configuration_is_built_or_refused_exactly_as_validate_says(config in hostile_config()) {
        let valid = config.validate();
        match InMemoryDistributedLock::try_new(config) {
            Ok(lock) => {
                prop_assert!(valid.is_ok(), "{:?} built, but validate() says {:?}", config, valid);
                runtime().block_on(async {
                    let guard = lock.try_acquire("k").await.unwrap();
                    // A valid TTL always expires: it is bounded.
                    assert!(guard.remaining().unwrap_or_default() <= config.get_ttl());
                    // A short budget: acquire on a held key ends (Timeout), never hangs; it
                    // gets the key only once the holder's lease has run out (a TTL of 1 ms
                    // can be over by then).
                    if config.wait_budget() <= Duration::from_millis(50) {
                        match lock.acquire("k").await {
                            Err(LockError::Timeout) => {}
                            Ok(_) => assert!(guard.is_lost(), "granted while the holder's lease lives"),
                            Err(other) => panic!("acquire on a held key: {other:?}"),
                        }
                    }
                    drop(guard);
                });
                prop_assert_eq!(lock.tracked_keys(), 0);
            }
            Err(LockError::InvalidConfig { reason }) => {
                prop_assert!(!reason.is_empty());
                prop_assert!(
                    matches!(&valid, Err(LockError::InvalidConfig { reason: expected }) if *expected == reason),
                    "{:?} refused ({}) but validate() says {:?}", config, reason, valid
                );
                // `new` panics with the same reason.
                let panicked = std::panic::catch_unwind(|| InMemoryDistributedLock::new(config))
                    .expect_err("new accepted a configuration try_new refused");
                let message = panicked
                    .downcast_ref::<String>()
                    .expect("a formatted panic message");
                prop_assert!(message.contains(&reason), "{}", message);
            }
            Err(other) => panic!("{config:?}: unexpected {other:?}"),
        }
    }
}
