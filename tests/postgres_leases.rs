//! PostgreSQL backend: leases (TTL expiry, extend), dropped guards, and a session that dies.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use tokio::time::Instant;

/// A guard that is not extended is unlocked by the backend when its TTL runs out: a waiter in
/// another instance gets the key then (not before), and the old guard is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unextended_lock_expires_and_the_waiter_gets_it() {
    let prefix = common::unique_prefix("pg_ttl");
    let key = format!("{prefix}k");
    let ttl = Duration::from_millis(300);
    let holder = pg_support::lock(LockConfig::new().ttl(ttl)).await;
    let waiter = pg_support::lock(
        LockConfig::new()
            .retry_interval(Duration::from_secs(1))
            .max_retries(10),
    )
    .await;
    let acquired_at = Instant::now();
    let old = holder.acquire(&key).await.unwrap();
    assert!(!old.is_lost());
    let next = waiter
        .acquire(&key)
        .await
        .expect("the expired lock is handed on");
    assert!(
        acquired_at.elapsed() >= ttl,
        "granted after {:?}",
        acquired_at.elapsed()
    );
    assert!(old.is_lost());
    assert!(next.fencing_token() > old.fencing_token());
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    assert!(matches!(old.extend(ttl).await, Err(LockError::LockLost)));
    assert!(matches!(old.release().await, Err(LockError::LockLost)));
    // The stale release left the new holder alone.
    assert!(matches!(
        holder.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    next.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extending_keeps_the_lock_past_its_ttl() {
    let prefix = common::unique_prefix("pg_extend");
    let key = format!("{prefix}k");
    let ttl = Duration::from_millis(400);
    let holder = pg_support::lock(LockConfig::new().ttl(ttl)).await;
    let other = pg_support::lock(LockConfig::new()).await;
    let guard = holder.acquire(&key).await.unwrap();
    let until = Instant::now() + ttl * 3;
    while Instant::now() < until {
        tokio::time::sleep(ttl / 4).await;
        guard.extend(ttl).await.unwrap();
        assert!(!guard.is_lost());
        assert!(matches!(
            other.try_acquire(&key).await,
            Err(LockError::AlreadyLocked)
        ));
    }
    guard.release().await.unwrap();
    pg_support::take_and_release(&other, &key).await;
}

/// A guard dropped without release frees the key at once, inside or outside a runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_guards_release_at_once() {
    let prefix = common::unique_prefix("pg_drop");
    let lock = pg_support::lock(LockConfig::new()).await;
    let mut admin = pg_support::admin().await;
    for (round, outside_runtime) in [(0, false), (1, true)] {
        let key = format!("{prefix}{round}");
        let guard = lock.try_acquire(&key).await.unwrap();
        assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
        if outside_runtime {
            std::thread::spawn(move || drop(guard)).join().unwrap();
        } else {
            drop(guard);
        }
        // `is_locked` runs on the key's session after the queued unlock.
        assert!(!lock.is_locked(&key).await.unwrap());
        assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
        pg_support::take_and_release(&lock, &key).await;
    }
}

/// `pg_terminate_backend` on the session: the key is free at once, every guard of that session
/// learns it is lost (by the session's next ping at the latest; `lost()` completes then), and
/// locking works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_frees_the_key_and_its_guards_know() {
    let prefix = common::unique_prefix("pg_terminate");
    let (first, second) = (format!("{prefix}a"), format!("{prefix}b"));
    let lock = PostgresDistributedLock::builder(pg_support::pool(4).await, LockConfig::new())
        .sessions(1)
        .network_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let other = pg_support::lock(LockConfig::new()).await;
    let guard_a = lock.acquire(&first).await.unwrap();
    let guard_b = lock.acquire(&second).await.unwrap();
    let mut admin = pg_support::admin().await;
    let pids = pg_support::holders(&mut admin, &first).await;
    assert_eq!(pids.len(), 1);
    assert_eq!(
        pg_support::holders(&mut admin, &second).await,
        pids,
        "one session holds both"
    );
    pg_support::terminate(&mut admin, pids[0]).await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &first).await, 0);
    let taken = other.try_acquire(&first).await.expect("the key is free");
    taken.release().await.unwrap();

    // Without any call, the session's ping (every 0.5 s here) finds the session dead, and
    // lost() hears it: the lease itself runs for 30 s more.
    for guard in [&guard_a, &guard_b] {
        tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .expect("a guard was never told its session died");
        assert!(guard.is_lost());
    }
    assert!(guard_a.remaining().is_none());
    assert!(matches!(
        guard_b.extend(Duration::from_secs(5)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(guard_a.release().await, Err(LockError::LockLost)));
    assert!(matches!(guard_b.release().await, Err(LockError::LockLost)));

    // A fresh session takes over.
    let again = lock.try_acquire(&first).await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &first).await, 1);
    again.release().await.unwrap();
}

/// Terminated between two calls, with no ping in between: the next call on the guard reports
/// the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_the_session_died_is_lock_lost() {
    let prefix = common::unique_prefix("pg_terminate_release");
    let key = format!("{prefix}k");
    let lock = pg_support::lock(LockConfig::new()).await;
    let guard = lock.acquire(&key).await.unwrap();
    let mut admin = pg_support::admin().await;
    let pids = pg_support::holders(&mut admin, &key).await;
    pg_support::terminate(&mut admin, pids[0]).await;
    assert!(matches!(guard.release().await, Err(LockError::LockLost)));
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}

/// A holder that goes silent (its whole runtime frozen, as when cut off from the network) does
/// not keep the lock: the server's `idle_session_timeout`, set from `network_timeout`, ends its
/// session, and when the holder wakes its guard already reports the loss, before any network
/// call (its TTL of 60 s is far from over: the bound is the session's last confirmed round
/// trip plus the network timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_loses_the_lock_after_the_network_timeout() {
    let prefix = common::unique_prefix("pg_silent");
    let key = format!("{prefix}k");
    let network_timeout = Duration::from_secs(2);
    let url = common::postgres_url().await;
    let (acquired_tx, acquired_rx) = tokio::sync::oneshot::channel();
    // Told by the test once the server freed the lock, so the frozen holder wakes then.
    let (freed_tx, freed_rx) = std::sync::mpsc::channel::<()>();
    let holder_key = key.clone();
    let holder = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let pool = common::backends::postgres_pool_of(Some(url), 2).await;
            let lock = PostgresDistributedLock::builder(
                pool,
                LockConfig::new().ttl(Duration::from_secs(60)),
            )
            .network_timeout(network_timeout)
            .command_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
            let guard = lock.acquire(&holder_key).await.unwrap();
            acquired_tx.send(Instant::now()).unwrap();
            // Freeze (no task of this runtime runs, so no ping reaches the server) until the
            // test saw the lock freed, or at most three network timeouts.
            let _ = freed_rx.recv_timeout(network_timeout * 3);
            assert!(
                guard.is_lost(),
                "the woken holder believes it holds the lock"
            );
            assert!(guard.remaining().is_none());
            assert!(matches!(guard.release().await, Err(LockError::LockLost)));
            // The session gave up its doubtful connection; the same lock service locks again
            // (waiting, as the release of a lost lock finishes in the background).
            let again = lock.acquire(&holder_key).await.unwrap();
            assert!(!again.is_lost());
            again.release().await.unwrap();
        });
    });
    let acquired_at = acquired_rx.await.unwrap();
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    let deadline = acquired_at + network_timeout + Duration::from_millis(1500);
    let admin = tokio::sync::Mutex::new(admin);
    let freed = common::wait::eventually(
        deadline.saturating_duration_since(Instant::now()),
        || async { pg_support::advisory_locks(&mut *admin.lock().await, &key).await == 0 },
    )
    .await;
    assert!(freed, "the silent holder kept the lock");
    assert!(acquired_at.elapsed() >= network_timeout - Duration::from_millis(100));
    let _ = freed_tx.send(());
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
}
