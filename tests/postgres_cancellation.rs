//! PostgreSQL backend: an `acquire` dropped at any await point leaves no lock and no waiter
//! behind, on the server (`pg_locks`) or in the process.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use common::cancel::drop_at_suspension;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, LockGuard};

/// Cancels the acquire of a free key at its 1st, 2nd, ... suspension and after growing delays. After
/// each cancellation the key is free: not in `pg_locks`, and another instance can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acquire_of_a_free_key_leaves_nothing() {
    let prefix = common::unique_prefix("pg_cancel_free");
    let key = format!("{prefix}k");
    let lock = pg_support::lock(LockConfig::new()).await;
    let other = pg_support::lock(LockConfig::new()).await;
    let mut admin = pg_support::admin().await;
    let (mut cancelled, mut completed) = (0, 0);
    let attempts: Vec<Result<usize, Duration>> = (1..9)
        .map(Ok)
        .chain((0..40).map(|step| Err(Duration::from_micros(step * 40))))
        .collect();
    for attempt in attempts {
        let outcome: Option<Result<LockGuard, LockError>> = match attempt {
            Ok(polls) => drop_at_suspension(lock.acquire(&key), polls).await,
            Err(delay) => tokio::time::timeout(delay, lock.acquire(&key)).await.ok(),
        };
        match outcome {
            Some(granted) => {
                completed += 1;
                granted.unwrap().release().await.unwrap();
            }
            None => cancelled += 1,
        }
        // Runs on the key's session after anything the cancelled acquire left queued.
        assert!(!lock.is_locked(&key).await.unwrap(), "{attempt:?}");
        assert_eq!(
            pg_support::advisory_locks(&mut admin, &key).await,
            0,
            "{attempt:?}"
        );
        pg_support::take_and_release(&other, &key).await;
        pg_support::take_and_release(&lock, &key).await;
    }
    assert!(
        cancelled > 0 && completed > 0,
        "{cancelled} cancelled, {completed} completed"
    );
}

/// The same while the key is held by another instance, so the acquire is waiting (flagged, with
/// a listener). Afterwards no waiter flag is left, and when the holder releases nobody takes the
/// key: a cancelled waiter is not granted anything later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiter_leaves_the_key_free_for_the_next_one() {
    let prefix = common::unique_prefix("pg_cancel_waiting");
    let key = format!("{prefix}k");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .max_retries(50);
    let holder = pg_support::lock(config).await;
    let waiter = pg_support::lock(config).await;
    let mut admin = pg_support::admin().await;
    let attempts: Vec<Result<usize, Duration>> = (1..11)
        .map(Ok)
        .chain((0..25).map(|step| Err(Duration::from_micros(step * 200))))
        .collect();
    for attempt in attempts {
        let held = holder.try_acquire(&key).await.unwrap();
        let outcome = match attempt {
            Ok(polls) => drop_at_suspension(waiter.acquire(&key), polls).await,
            Err(delay) => tokio::time::timeout(delay, waiter.acquire(&key)).await.ok(),
        };
        assert!(
            outcome.is_none(),
            "the key was held: {attempt:?} {outcome:?}"
        );
        // Sync with the waiter's session (flag cleared), then free the key.
        assert!(waiter.is_locked(&key).await.unwrap());
        assert_eq!(
            pg_support::waiter_flags(&mut admin, &key).await,
            0,
            "{attempt:?}"
        );
        held.release().await.unwrap();
        assert!(!waiter.is_locked(&key).await.unwrap(), "{attempt:?}");
        assert_eq!(
            pg_support::advisory_locks(&mut admin, &key).await,
            0,
            "{attempt:?}"
        );
        // The next waiter (a fresh acquire) gets it without delay.
        let next = tokio::time::timeout(Duration::from_secs(2), waiter.acquire(&key))
            .await
            .expect("the key is free")
            .unwrap();
        next.release().await.unwrap();
    }
}

/// Tasks of one instance queued behind a local holder, cancelled: the queue skips them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_local_waiters_are_skipped() {
    let prefix = common::unique_prefix("pg_cancel_local");
    let key = format!("{prefix}k");
    let lock = pg_support::lock(
        LockConfig::new()
            .retry_interval(Duration::from_millis(100))
            .max_retries(50),
    )
    .await;
    let held = lock.acquire(&key).await.unwrap();
    // Dropped right after the first poll (queued), and while queued.
    let mut queued = Box::pin(lock.acquire(&key));
    assert!(futures::poll!(queued.as_mut()).is_pending());
    drop(queued);
    for delay_ms in [1, 5, 20] {
        let cancelled = tokio::time::timeout(Duration::from_millis(delay_ms), lock.acquire(&key));
        assert!(cancelled.await.is_err(), "the key is held locally");
    }
    // The live waiter is queued behind the cancelled ones before the release.
    let mut waiting = Box::pin(lock.acquire(&key));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    held.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the live waiter gets the lock")
        .unwrap();
    next.release().await.unwrap();
    let mut admin = pg_support::admin().await;
    assert!(!lock.is_locked(&key).await.unwrap());
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}

/// A lock service whose runtime shuts down while it holds a lock (its session task is dropped
/// with the runtime): the connection closes, so the server frees the lock at once; the guard
/// reports the loss, and the service starts a new session (with its housekeeping: lease
/// expiry) on the runtime of its next operation.
#[test]
fn a_runtime_shutdown_frees_the_locks_of_its_sessions() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let key = format!("{}k", common::unique_prefix("pg_runtime_shutdown"));
    let (lock, guard) = first.block_on(async {
        let lock = pg_support::lock(LockConfig::new()).await;
        let guard = lock.try_acquire(&key).await.unwrap();
        (lock, guard)
    });
    assert!(!guard.is_lost());
    drop(first);

    let second = runtime();
    second.block_on(async {
        assert!(guard.is_lost(), "the guard's session is gone");
        // The server notices the closed socket at once; the poll only covers its reaction.
        let admin = tokio::sync::Mutex::new(pg_support::admin().await);
        common::wait::assert_eventually("the server freed the key", || async {
            pg_support::advisory_locks(&mut *admin.lock().await, &key).await == 0
        })
        .await;
        let other = pg_support::lock(LockConfig::new()).await;
        pg_support::take_and_release(&other, &key).await;
        // The key's session (a key always uses the same one) died with its runtime: the next
        // operation starts it again here.
        let again = lock
            .try_acquire(&key)
            .await
            .expect("a new session on this runtime");
        assert!(matches!(guard.release().await, Err(LockError::LockLost)));
        again.release().await.unwrap();
    });
}
