//! Checks every backend must pass, written once and run against each backend.

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, DistributedSemaphore, LockError};

use super::cancel::drop_at_suspension;
use super::wait::eventually;

/// How soon a key must be free again after a cancelled operation.
pub const FREE_AGAIN_WITHIN: Duration = Duration::from_millis(100);

/// Waits (within `within`) for `key` to be free; false if it stayed locked.
pub async fn becomes_free<L: DistributedLock>(lock: &L, key: &str, within: Duration) -> bool {
    eventually(within, || async {
        !lock.is_locked(key).await.expect("is_locked")
    })
    .await
}

/// Drops `try_acquire`, `acquire` (free and contended), `release` and `extend` at each of their
/// await points in turn (the lock's waiting budget must be shorter than its TTL); after every drop the key must be free again within
/// [`FREE_AGAIN_WITHIN`] and the lock object must keep working. Returns how many cancellation
/// points were exercised.
pub async fn cancellation_suite<L: DistributedLock>(lock: &L, prefix: &str) -> usize {
    let mut points = 0;

    for operation in ["try_acquire", "acquire"] {
        for n in 1.. {
            let key = format!("{prefix}{operation}:{n}");
            let future = async {
                match operation {
                    "try_acquire" => lock.try_acquire(&key).await,
                    _ => lock.acquire(&key).await,
                }
            };
            match drop_at_suspension(future, n).await {
                Some(result) => {
                    drop(result.expect("uncontended acquire"));
                    break;
                }
                None => points += 1,
            }
            assert!(
                becomes_free(lock, &key, FREE_AGAIN_WITHIN).await,
                "{operation} cancelled at await point {n} left {key} locked"
            );
        }
    }

    // A waiter cancelled at each point must not inherit the lock once the holder lets go. The
    // lock's waiting budget must be shorter than its TTL: the waiter then ends with Timeout.
    let key = format!("{prefix}contended");
    for n in 1..=12 {
        let holder = lock.try_acquire(&key).await.expect("free key");
        let waited = drop_at_suspension(lock.acquire(&key), n).await;
        lock.release(holder).await.expect("holder release");
        assert!(
            becomes_free(lock, &key, FREE_AGAIN_WITHIN).await,
            "a waiter cancelled at await point {n} kept {key} locked"
        );
        match waited {
            None => points += 1,
            Some(Err(LockError::Timeout)) => break,
            Some(other) => panic!("a waiter on a held lock ended with {other:?}"),
        }
    }

    for operation in ["release", "extend"] {
        for n in 1.. {
            let key = format!("{prefix}{operation}:{n}");
            let guard = lock.try_acquire(&key).await.expect("free key");
            let finished = match operation {
                "release" => drop_at_suspension(guard.release(), n)
                    .await
                    .map(|r| r.map(|_| None)),
                _ => drop_at_suspension(guard.extend(Duration::from_secs(30)), n)
                    .await
                    .map(|r| r.map(|_| Some(guard))),
            };
            match finished {
                Some(result) => {
                    drop(result.expect("operation on a live lock"));
                    assert!(becomes_free(lock, &key, FREE_AGAIN_WITHIN).await);
                    break;
                }
                None => points += 1,
            }
            // A cancelled release still releases; a cancelled extend leaves a guard whose drop
            // (the guard was moved into the future and dropped with it) releases.
            assert!(
                becomes_free(lock, &key, FREE_AGAIN_WITHIN).await,
                "{operation} cancelled at await point {n} left {key} locked"
            );
        }
    }
    // Still works afterwards.
    let guard = lock
        .try_acquire(&format!("{prefix}after"))
        .await
        .expect("lock still usable");
    lock.release(guard).await.expect("release");
    points
}

/// Bad keys give `InvalidKey` and change nothing; odd but valid keys lock exactly themselves.
pub async fn hostile_key_check<L: DistributedLock>(lock: &L, prefix: &str, key: &str) {
    let full = format!("{prefix}{key}");
    let neighbour = format!("{prefix}neighbour");
    let valid = !full.is_empty() && full.len() <= k1s0_distributed_lock::MAX_KEY_LEN;
    match lock.try_acquire(&full).await {
        Ok(guard) => {
            assert!(valid, "accepted an invalid key {full:?}");
            assert_eq!(guard.key(), full);
            assert!(lock.is_locked(&full).await.unwrap());
            assert!(
                !lock.is_locked(&neighbour).await.unwrap(),
                "{full:?} locked its neighbour"
            );
            assert!(matches!(
                lock.try_acquire(&full).await,
                Err(LockError::AlreadyLocked)
            ));
            lock.release(guard).await.unwrap();
            assert!(!lock.is_locked(&full).await.unwrap());
        }
        Err(LockError::InvalidKey { .. }) => {
            assert!(!valid, "refused a valid key {full:?}");
            assert!(matches!(
                lock.is_locked(&full).await,
                Err(LockError::InvalidKey { .. })
            ));
        }
        Err(other) => panic!("{full:?}: unexpected {other:?}"),
    }
}

/// An empty key and one byte too many are refused by `try_acquire`, `acquire` and `is_locked`.
pub async fn assert_bad_keys_refused<L: DistributedLock>(lock: &L) {
    let long = "k".repeat(k1s0_distributed_lock::MAX_KEY_LEN + 1);
    for key in ["", long.as_str()] {
        assert!(matches!(
            lock.try_acquire(key).await,
            Err(LockError::InvalidKey { .. })
        ));
        assert!(matches!(
            lock.acquire(key).await,
            Err(LockError::InvalidKey { .. })
        ));
        assert!(matches!(
            lock.is_locked(key).await,
            Err(LockError::InvalidKey { .. })
        ));
    }
}

/// Whether, within 5 s, at least `waiters` callers wait in line for `key`, whose `held` permits
/// are all held: a try with limit `held + waiters` counts the waiters ahead of it and is
/// refused only once that many wait (a try that gets in gives its permit straight back).
pub async fn waiters_in_line<L: DistributedSemaphore>(
    lock: &L,
    key: &str,
    held: u32,
    waiters: u32,
) -> bool {
    eventually(Duration::from_secs(5), || async {
        match lock.try_acquire_permit(key, held + waiters).await {
            Ok(probe) => {
                probe.release().await.unwrap();
                false
            }
            Err(LockError::AlreadyLocked) => true,
            Err(other) => panic!("{other:?}"),
        }
    })
    .await
}
