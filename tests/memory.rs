//! The in-memory backend: exclusion, TTL, fencing, FIFO hand-off, cancellation, bounded memory.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::poll;
use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockError, LockGuard, MAX_KEY_LEN,
};
use tokio::time::Instant;

fn lock_with(config: LockConfig) -> InMemoryDistributedLock {
    InMemoryDistributedLock::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_tasks_keep_a_non_atomic_counter_exact() {
    const TASKS: u64 = 32;
    const ROUNDS: u64 = 200;
    let lock = Arc::new(lock_with(
        LockConfig::new()
            .retry_interval(Duration::from_millis(100))
            .max_retries(600),
    ));
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (lock, counter, inside) = (lock.clone(), counter.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = lock
                    .acquire("counter")
                    .await
                    .expect("acquire within budget");
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                // A read-modify-write split by a yield: without exclusion, updates get lost.
                let value = counter.load(Ordering::Relaxed);
                tokio::task::yield_now().await;
                counter.store(value + 1, Ordering::Relaxed);
                inside.fetch_sub(1, Ordering::SeqCst);
                lock.release(guard).await.expect("release of a live lock");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::Relaxed), TASKS * ROUNDS);
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_lets_the_next_holder_in_and_the_stale_release_is_lock_lost() {
    let ttl = Duration::from_millis(100);
    let lock = lock_with(LockConfig::new().ttl(ttl).max_retries(50));
    let start = Instant::now();
    let stale = lock.try_acquire("job").await.unwrap();

    // The waiter sleeps until the holder's TTL runs out (the paused clock jumps there).
    let fresh = lock.acquire("job").await.unwrap();
    assert!(
        Instant::now() >= start + ttl,
        "taken before the TTL ran out"
    );
    assert!(stale.is_lost());
    assert!(fresh.fencing_token() > stale.fencing_token());

    assert!(matches!(stale.extend(ttl).await, Err(LockError::LockLost)));
    assert!(matches!(stale.release().await, Err(LockError::LockLost)));
    assert!(
        lock.is_locked("job").await.unwrap(),
        "the stale release freed the new holder"
    );
    assert!(!fresh.is_lost());
    fresh.release().await.unwrap();
    assert!(!lock.is_locked("job").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn an_expired_lock_is_taken_over_by_try_acquire() {
    let lock = lock_with(LockConfig::new().ttl(Duration::from_millis(10)));
    let old = lock.try_acquire("k").await.unwrap();
    assert!(matches!(
        lock.try_acquire("k").await,
        Err(LockError::AlreadyLocked)
    ));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(!lock.is_locked("k").await.unwrap());
    let new = lock.try_acquire("k").await.unwrap();
    assert!(old.is_lost());
    assert!(matches!(old.release().await, Err(LockError::LockLost)));
    assert!(lock.is_locked("k").await.unwrap());
    drop(new);
    assert!(!lock.is_locked("k").await.unwrap());
}

#[tokio::test]
async fn fencing_tokens_strictly_increase_per_key() {
    let lock = lock_with(LockConfig::new());
    let mut last = 0;
    for round in 0..500 {
        // Other keys in between must not break the order of this one.
        let other = lock.try_acquire(&format!("other:{round}")).await.unwrap();
        let guard = lock.try_acquire("fenced").await.unwrap();
        assert!(
            guard.fencing_token() > last,
            "{} after {last}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        drop(other);
        guard.release().await.unwrap();
    }
}

#[tokio::test]
async fn tokens_are_random_v4_uuids() {
    let lock = lock_with(LockConfig::new());
    let a = lock.try_acquire("a").await.unwrap();
    let b = lock.try_acquire("b").await.unwrap();
    assert_eq!(a.token().get_version_num(), 4);
    assert_ne!(a.token(), b.token());
    assert_eq!(a.info().token(), a.token());
    assert_eq!(a.info().key(), "a");
}

#[tokio::test]
async fn a_hundred_thousand_distinct_keys_leave_no_entries_behind() {
    let lock = lock_with(LockConfig::new());
    for i in 0..100_000 {
        let guard = lock.try_acquire(&format!("key:{i}")).await.unwrap();
        guard.release().await.unwrap();
    }
    assert_eq!(lock.tracked_keys(), 0);

    let mut held = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        held.push(lock.try_acquire(&format!("held:{i}")).await.unwrap());
    }
    assert_eq!(lock.tracked_keys(), 100_000);
    drop(held);
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn expired_locks_that_nobody_released_are_swept() {
    let lock = lock_with(LockConfig::new().ttl(Duration::from_millis(50)));
    for i in 0..1_000 {
        // A holder that vanished without releasing (as a crashed task would).
        std::mem::forget(lock.try_acquire(&format!("crashed:{i}")).await.unwrap());
    }
    assert_eq!(lock.tracked_keys(), 1_000);
    tokio::time::advance(Duration::from_millis(50)).await;
    // Ordinary traffic on other keys touches every shard and sweeps the expired entries.
    for i in 0..1_000 {
        drop(lock.try_acquire(&format!("live:{i}")).await.unwrap());
    }
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_release_wakes_the_waiter_at_once_without_any_timer() {
    let lock = lock_with(LockConfig::new().max_retries(100));
    let holder = lock.try_acquire("k").await.unwrap();
    let mut waiter = Box::pin(lock.acquire("k"));
    assert!(poll!(waiter.as_mut()).is_pending());
    let before = Instant::now();
    holder.release().await.unwrap();
    // Ready at the very next poll, with the paused clock not moved: a hand-off, not polling.
    let Poll::Ready(Ok(next)) = poll!(waiter.as_mut()) else {
        panic!("the waiter was not handed the lock on release");
    };
    assert_eq!(Instant::now(), before);
    assert_eq!(next.key(), "k");
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_in_first_out() {
    let lock = lock_with(LockConfig::new().max_retries(100));
    let mut holder = lock.try_acquire("fifo").await.unwrap();
    let mut waiters: Vec<_> = (0..5).map(|_| Box::pin(lock.acquire("fifo"))).collect();
    for waiter in &mut waiters {
        assert!(poll!(waiter.as_mut()).is_pending());
    }
    for (position, waiter) in waiters.iter_mut().enumerate() {
        // Nobody behind the head of the queue gets it first, and try_acquire cannot jump in.
        assert!(matches!(
            lock.try_acquire("fifo").await,
            Err(LockError::AlreadyLocked)
        ));
        holder.release().await.unwrap();
        holder = match poll!(waiter.as_mut()) {
            Poll::Ready(Ok(guard)) => guard,
            other => panic!("waiter {position} was not next: {other:?}"),
        };
    }
    drop(holder);
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue() {
    let lock = lock_with(
        LockConfig::new()
            .ttl(Duration::from_millis(100))
            .max_retries(100),
    );
    let holder = lock.try_acquire("k").await.unwrap();
    let mut waiter = Box::pin(lock.acquire("k"));
    assert!(poll!(waiter.as_mut()).is_pending());
    drop(waiter);
    // Once the holder's TTL has run out, nothing may keep the key: a queue entry left behind
    // would still count as a claim on it.
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(
        !lock.is_locked("k").await.unwrap(),
        "the cancelled waiter is still queued"
    );
    assert!(matches!(holder.release().await, Err(LockError::LockLost)));
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_cancelled_after_being_handed_the_lock_passes_it_on() {
    let lock = lock_with(LockConfig::new().max_retries(100));
    let holder = lock.try_acquire("k").await.unwrap();
    let mut first = Box::pin(lock.acquire("k"));
    let mut second = Box::pin(lock.acquire("k"));
    assert!(poll!(first.as_mut()).is_pending());
    assert!(poll!(second.as_mut()).is_pending());
    holder.release().await.unwrap(); // hands the lock to `first`...
    drop(first); // ...which is cancelled before it ever sees it.
    let Poll::Ready(Ok(guard)) = poll!(second.as_mut()) else {
        panic!("the lock handed to a cancelled waiter was not passed on");
    };
    drop(guard);
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn acquire_gives_up_after_its_budget_and_leaves_nothing_behind() {
    let config = LockConfig::new()
        .ttl(Duration::from_secs(60))
        .retry_interval(Duration::from_millis(100))
        .max_retries(3);
    let lock = lock_with(config);
    let holder = lock.try_acquire("busy").await.unwrap();
    let start = Instant::now();
    assert!(matches!(
        lock.acquire("busy").await,
        Err(LockError::Timeout)
    ));
    assert_eq!(Instant::now() - start, config.wait_budget());
    drop(holder);
    assert_eq!(lock.tracked_keys(), 0);

    // No budget at all: a single attempt.
    let lock = lock_with(config.max_retries(0));
    let _holder = lock.try_acquire("busy").await.unwrap();
    assert!(matches!(
        lock.acquire("busy").await,
        Err(LockError::Timeout)
    ));
    assert_eq!(lock.tracked_keys(), 1);
}

#[tokio::test]
async fn bad_keys_and_bad_configurations_are_refused_and_change_nothing() {
    let lock = lock_with(LockConfig::new());
    common::suites::assert_bad_keys_refused(&lock).await;
    // The longest allowed key, and keys full of metacharacters, are ordinary keys.
    let longest = "y".repeat(MAX_KEY_LEN);
    for key in [longest.as_str(), "a b*{c}\n'\"\\\0é"] {
        let guard = lock.try_acquire(key).await.unwrap();
        assert!(lock.is_locked(key).await.unwrap());
        drop(guard);
    }

    for config in [
        LockConfig::new().ttl(Duration::ZERO),
        LockConfig::new().retry_interval(Duration::ZERO),
        LockConfig::new().ttl(Duration::MAX),
    ] {
        let Err(LockError::InvalidConfig { reason }) = InMemoryDistributedLock::try_new(config)
        else {
            panic!("{config:?} was accepted");
        };
        let panic = std::panic::catch_unwind(|| InMemoryDistributedLock::new(config))
            .expect_err("new() took a bad configuration");
        assert_eq!(
            panic.downcast_ref::<String>().unwrap(),
            &format!("invalid lock configuration: {reason}")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn extend_renews_the_lease_and_refuses_nonsense() {
    let lock = lock_with(LockConfig::new().ttl(Duration::from_millis(100)));
    let guard = lock.try_acquire("k").await.unwrap();
    tokio::time::advance(Duration::from_millis(80)).await;
    guard.extend(Duration::from_secs(1)).await.unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(!guard.is_lost());
    assert!(lock.is_locked("k").await.unwrap());
    assert!(matches!(
        guard.extend(Duration::ZERO).await,
        Err(LockError::InvalidConfig { .. })
    ));
    assert!(guard.remaining().unwrap() > Duration::from_millis(400));

    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(guard.is_lost());
    assert!(matches!(
        guard.extend(Duration::from_secs(1)).await,
        Err(LockError::LockLost)
    ));
    assert!(!lock.is_locked("k").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_shorter_extend_shortens_the_lease_on_both_sides() {
    let lock = lock_with(LockConfig::new().ttl(Duration::from_secs(30)));
    let guard = lock.try_acquire("k").await.unwrap();
    guard.extend(Duration::from_millis(50)).await.unwrap();
    tokio::time::advance(Duration::from_millis(50)).await;
    // The backend let the lock go at the new, earlier deadline: the guard must know.
    assert!(!lock.is_locked("k").await.unwrap());
    assert!(guard.is_lost());
    let next = lock.try_acquire("k").await.unwrap();
    assert!(!next.is_lost());
}

#[test]
fn dropping_a_guard_outside_any_runtime_frees_the_lock_at_once() {
    let lock = lock_with(LockConfig::new());
    let guard = futures::executor::block_on(lock.try_acquire("no-runtime")).unwrap();
    assert!(futures::executor::block_on(lock.is_locked("no-runtime")).unwrap());
    drop(guard);
    assert!(!futures::executor::block_on(lock.is_locked("no-runtime")).unwrap());
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test]
async fn clones_and_arcs_share_one_table() {
    let lock = lock_with(LockConfig::new());
    let clone = lock.clone();
    let shared = Arc::new(lock.clone());
    let guard = lock.try_acquire("shared").await.unwrap();
    assert!(matches!(
        clone.try_acquire("shared").await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(
        shared.try_acquire("shared").await,
        Err(LockError::AlreadyLocked)
    ));
    shared.release(guard).await.unwrap();
    assert!(clone.try_acquire("shared").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_descheduled_past_the_ttl_neither_panic_nor_get_expired_locks() {
    // Holders block their worker thread for half a TTL, so waiters on the same threads are
    // routinely late to look at a lock handed to them, and entries expire and get swept around
    // them. Found by review: this used to panic inside acquire.
    let lock = Arc::new(lock_with(
        LockConfig::new()
            .ttl(Duration::from_millis(1))
            .retry_interval(Duration::from_millis(1))
            .max_retries(50),
    ));
    let deadline = Instant::now() + Duration::from_secs(2);
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let lock = lock.clone();
            tokio::spawn(async move {
                let (mut granted, mut timed_out) = (0u32, 0u32);
                while Instant::now() < deadline {
                    match lock.acquire(&format!("k{}", task % 4)).await {
                        Ok(guard) => {
                            granted += 1;
                            std::thread::sleep(Duration::from_micros(500));
                            drop(guard);
                        }
                        Err(LockError::Timeout) => timed_out += 1,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
                (granted, timed_out)
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += task.await.expect("a waiter panicked").0;
    }
    assert!(granted > 0);
    assert_eq!(lock.tracked_keys(), 0);
}

#[tokio::test]
async fn try_acquire_and_is_locked_act_when_polled_not_when_called() {
    let lock = lock_with(LockConfig::new());

    // A try_acquire future that is never polled takes nothing.
    let unpolled = lock.try_acquire("lazy");
    assert!(!lock.is_locked("lazy").await.unwrap());
    let holder = lock.try_acquire("lazy").await.unwrap();
    // Polled now, it sees the key as it is now: held.
    assert!(matches!(unpolled.await, Err(LockError::AlreadyLocked)));
    drop(holder);

    // Dropped unpolled, it leaves no trace: the next holder's fencing token follows the
    // previous holder's directly.
    let before = lock.try_acquire("lazy").await.unwrap().fencing_token();
    drop(lock.try_acquire("lazy"));
    let after = lock.try_acquire("lazy").await.unwrap().fencing_token();
    assert_eq!(after, before + 1);
    assert_eq!(lock.tracked_keys(), 0);

    // is_locked answers for the moment it is polled.
    let asked_early = lock.is_locked("lazy");
    let _held = lock.try_acquire("lazy").await.unwrap();
    assert!(asked_early.await.unwrap());
}

/// A lock with 30 s leases and a waiting budget far beyond them, for the paused-clock tests of
/// when a waiter wakes.
fn thirty_second_leases() -> InMemoryDistributedLock {
    lock_with(
        LockConfig::new()
            .ttl(Duration::from_secs(30))
            .wait_timeout(Duration::from_secs(1000)),
    )
}

/// Awaits a queued acquire, failing if it took longer (on the paused clock) than `lease`, the
/// lease it waits for, plus a second.
async fn gets_in_after_the_lease(
    waiter: impl Future<Output = Result<LockGuard, LockError>>,
    lease: Duration,
) -> LockGuard {
    let started = Instant::now();
    let guard = waiter.await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited <= lease + Duration::from_secs(1),
        "the waiter waited {waited:?} for a {lease:?} lease"
    );
    guard
}

/// A writer queued behind an exclusive holder with a long lease; the holder releases, a reader
/// queued before the writer is let in with the default 30 s lease, and then hangs on to it (a
/// stuck task). The writer gets in when the reader's lease runs out, not at the end of the
/// long lease it was told of when it queued.
#[tokio::test(start_paused = true)]
async fn a_waiter_wakes_for_a_holder_let_in_after_it_queued() {
    use k1s0_distributed_lock::DistributedRwLock;
    let lock = thirty_second_leases();
    let first = lock.acquire("stuck-reader").await.unwrap();
    first.extend(Duration::from_secs(300)).await.unwrap();
    let mut reader = Box::pin(lock.acquire_shared("stuck-reader"));
    assert!(poll!(reader.as_mut()).is_pending());
    let mut writer = Box::pin(lock.acquire("stuck-reader"));
    assert!(poll!(writer.as_mut()).is_pending());
    first.release().await.unwrap();
    let stuck = reader.await.unwrap();
    let writer = gets_in_after_the_lease(writer, Duration::from_secs(30)).await;
    assert!(stuck.is_lost());
    drop((stuck, writer));
}

/// A holder shortens its lease after a waiter queued, then hangs on to the lock: the waiter
/// gets in when the shortened lease runs out.
#[tokio::test(start_paused = true)]
async fn a_waiter_wakes_when_the_holder_shortens_its_lease() {
    let lock = thirty_second_leases();
    let holder = lock.acquire("shortened").await.unwrap();
    let mut waiter = Box::pin(lock.acquire("shortened"));
    assert!(poll!(waiter.as_mut()).is_pending());
    holder.extend(Duration::from_secs(1)).await.unwrap();
    let waiter = gets_in_after_the_lease(waiter, Duration::from_secs(1)).await;
    // It got in because the lease ran out, not before.
    assert!(holder.is_lost());
    drop((holder, waiter));
}

/// The waiter ahead leaves: the one behind it, now first, gets in when the holder's shortened
/// lease runs out, not at the end of the longer lease it was told of when it queued.
#[tokio::test(start_paused = true)]
async fn a_waiter_that_becomes_first_wakes_for_the_current_lease() {
    let lock = thirty_second_leases();
    let holder = lock.acquire("first-leaves").await.unwrap();
    holder.extend(Duration::from_secs(300)).await.unwrap();
    let mut ahead = Box::pin(lock.acquire("first-leaves"));
    assert!(poll!(ahead.as_mut()).is_pending());
    let mut behind = Box::pin(lock.acquire("first-leaves"));
    assert!(poll!(behind.as_mut()).is_pending());
    // Only the first waiter hears of the shorter lease; then it leaves.
    holder.extend(Duration::from_secs(1)).await.unwrap();
    drop(ahead);
    let behind = gets_in_after_the_lease(behind, Duration::from_secs(1)).await;
    assert!(holder.is_lost());
    drop((holder, behind));
}
