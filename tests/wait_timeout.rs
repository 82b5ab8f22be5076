//! `LockConfig::wait_timeout` is the waiting budget of `acquire` on every backend, in place of
//! `retry_interval * max_retries`.

mod common;

use std::time::Duration;

use common::backends::Backend;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError};
use tokio::time::Instant;

backend_tests!(acquire_waits_for_the_wait_timeout_and_no_longer);

/// A held key: `acquire` gives up after the wait timeout, not after the much shorter
/// `retry_interval * max_retries`, and not long after it either.
async fn acquire_waits_for_the_wait_timeout_and_no_longer(backend: Backend) {
    const WAIT: Duration = Duration::from_millis(600);
    let key = format!("{}k", common::unique_prefix("wait-timeout"));
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .max_retries(1)
        .wait_timeout(WAIT);
    // One lock object (in-memory locks are per object); the holder only uses try_acquire.
    let waiter = backend.lock(config).await;
    let held = waiter.try_acquire(&key).await.unwrap();

    let started = Instant::now();
    assert!(matches!(
        waiter.acquire(&key).await,
        Err(LockError::Timeout)
    ));
    let waited = started.elapsed();
    assert!(
        waited >= WAIT,
        "gave up after {waited:?}, before the wait timeout"
    );
    assert!(
        waited < WAIT + Duration::from_millis(900),
        "gave up after {waited:?}, long after the wait timeout"
    );

    // A holder that leaves after retry_interval * max_retries, but within the wait timeout,
    // hands the lock to the waiter. (The sleep is the holding time under test, not a signal.)
    let waiting = tokio::spawn({
        let key = key.clone();
        async move {
            waiter
                .acquire(&key)
                .await
                .map(|guard| guard.fencing_token())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = held.fencing_token();
    held.release().await.unwrap();
    assert!(waiting.await.unwrap().unwrap() > before);
}
