//! Permits (`DistributedSemaphore`): never more than `limit` holders of a key, waiters let in
//! first in, first out as permits come back, permits in a namespace of their own, fencing
//! tokens from the key's sequence, guards that release, extend, expire and cancel like locks.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k1s0_distributed_lock::{
    DistributedLock, DistributedSemaphore, LockConfig, LockError, LockGuard, LockMode,
};

use common::cancel::drop_at_suspension;
use common::wait::eventually;

/// Generous waiting budget, short retry interval, a TTL far beyond the tests' holds.
fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(10))
        .wait_timeout(Duration::from_secs(10))
}

fn key(test: &str) -> String {
    format!("{}k", common::unique_prefix(test))
}

fn is_already_locked(result: &Result<LockGuard, LockError>) -> bool {
    matches!(result, Err(LockError::AlreadyLocked))
}

lock_object_tests!(
    at_most_limit_permits_are_held,
    a_limit_of_zero_is_refused_and_changes_nothing,
    permits_and_locks_of_one_key_do_not_conflict,
    each_caller_checks_its_own_limit,
    permits_draw_increasing_fencing_tokens,
    a_released_permit_goes_to_the_first_waiter,
    the_in_flight_count_never_exceeds_the_limit_under_load,
    a_permit_whose_lease_ran_out_comes_back_and_is_reported_lost,
    permits_extend_like_locks,
    permit_acquires_cancelled_at_every_await_point_leave_nothing_held,
    hostile_keys_have_permits_of_their_own,
);

async fn at_most_limit_permits_are_held<L: DistributedSemaphore + DistributedLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().wait_timeout(Duration::from_millis(50))).await;
    let key = key("limit");
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
    let mut permits = Vec::new();
    for held in 1..=3 {
        let permit = lock.try_acquire_permit(&key, 3).await.unwrap();
        assert_eq!(permit.mode(), LockMode::Shared);
        permits.push(permit);
        assert_eq!(lock.permits_held(&key).await.unwrap(), held);
    }
    assert!(is_already_locked(&lock.try_acquire_permit(&key, 3).await));
    let over = tokio::time::timeout(Duration::from_secs(5), lock.acquire_permit(&key, 3))
        .await
        .expect("the wait ends with its budget");
    assert!(matches!(over, Err(LockError::Timeout)), "{over:?}");
    permits.pop().unwrap().release().await.unwrap();
    assert_eq!(lock.permits_held(&key).await.unwrap(), 2);
    permits.push(lock.try_acquire_permit(&key, 3).await.unwrap());
    drop(permits);
    assert!(
        eventually(Duration::from_secs(5), || async {
            lock.permits_held(&key).await.unwrap() == 0
        })
        .await,
        "dropped permits came back"
    );
}

async fn a_limit_of_zero_is_refused_and_changes_nothing<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("zero");
    let held = lock.try_acquire_permit(&key, 1).await.unwrap();
    for result in [
        lock.try_acquire_permit(&key, 0).await,
        lock.acquire_permit(&key, 0).await,
    ] {
        assert!(
            matches!(result, Err(LockError::InvalidConfig { ref reason }) if reason.contains('0')),
            "{result:?}"
        );
    }
    assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
    held.release().await.unwrap();
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
    assert!(matches!(
        lock.try_acquire_permit("", 1).await,
        Err(LockError::InvalidKey { .. })
    ));
}

async fn permits_and_locks_of_one_key_do_not_conflict<
    L: DistributedSemaphore + DistributedLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("namespace");
    let exclusive = lock.try_acquire(&key).await.unwrap();
    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    assert!(is_already_locked(&lock.try_acquire(&key).await));
    assert!(is_already_locked(&lock.try_acquire_permit(&key, 1).await));
    exclusive.release().await.unwrap();
    assert!(is_already_locked(&lock.try_acquire_permit(&key, 1).await));
    let again = lock.try_acquire(&key).await.unwrap();
    permit.release().await.unwrap();
    assert!(lock.is_locked(&key).await.unwrap());
    again.release().await.unwrap();
    // Permits held do not make the key locked.
    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    assert!(!lock.is_locked(&key).await.unwrap());
    permit.release().await.unwrap();
}

async fn each_caller_checks_its_own_limit<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("limits");
    let first = lock.try_acquire_permit(&key, 5).await.unwrap();
    let second = lock.try_acquire_permit(&key, 5).await.unwrap();
    assert!(
        is_already_locked(&lock.try_acquire_permit(&key, 2).await),
        "a caller with limit 2 got in while 2 permits were held"
    );
    let third = lock.try_acquire_permit(&key, 3).await.unwrap();
    assert_eq!(lock.permits_held(&key).await.unwrap(), 3);
    for permit in [first, second, third] {
        permit.release().await.unwrap();
    }
}

async fn permits_draw_increasing_fencing_tokens<
    L: DistributedSemaphore + DistributedLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("fencing");
    let mut last = 0;
    for round in 0..4 {
        let first = lock.acquire_permit(&key, 2).await.unwrap();
        let second = lock.acquire_permit(&key, 2).await.unwrap();
        assert!(first.fencing_token() > last, "round {round}");
        assert!(second.fencing_token() > first.fencing_token());
        last = second.fencing_token();
        first.release().await.unwrap();
        second.release().await.unwrap();
    }
}

/// Three waiters queue in turn behind two held permits; each permit released goes to the
/// longest-waiting of them, woken by the release (the retry interval is far beyond the test).
async fn a_released_permit_goes_to_the_first_waiter<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let patient = config()
        .retry_interval(Duration::from_secs(20))
        .wait_timeout(Duration::from_secs(60));
    let lock = make_lock(patient).await;
    let key = key("fifo");
    let mut held = vec![
        lock.try_acquire_permit(&key, 2).await.unwrap(),
        lock.try_acquire_permit(&key, 2).await.unwrap(),
    ];
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for id in 0..3 {
        let (waiter, key_of_waiter, order) = (lock.clone(), key.clone(), Arc::clone(&order));
        let mut waiting = Box::pin(async move {
            let permit = waiter.acquire_permit(&key_of_waiter, 2).await.unwrap();
            order.lock().unwrap().push(id);
            permit
        });
        // A first poll here, in order: a backend that lines its waiters up in the process
        // does it then (PostgreSQL, behind the first waiter).
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        waiters.push(tokio::spawn(waiting));
        // The next waiter starts only once this one is in line.
        assert!(
            common::suites::waiters_in_line(&lock, &key, 2, id + 1).await,
            "waiter {id} did not queue"
        );
    }
    for expected in 0..3u32 {
        held.remove(0).release().await.unwrap();
        let permit = tokio::time::timeout(Duration::from_secs(10), waiters.remove(0))
            .await
            .expect("a release wakes the first waiter")
            .unwrap();
        assert_eq!(
            order.lock().unwrap().clone(),
            (0..=expected).collect::<Vec<_>>()
        );
        held.push(permit);
    }
    for permit in held {
        permit.release().await.unwrap();
    }
}

/// 16 tasks take a permit of one key (limit 4) in a loop; the count of tasks inside never
/// exceeds 4 and reaches it. (tests/semaphore_processes.rs does the same across processes.)
async fn the_in_flight_count_never_exceeds_the_limit_under_load<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    const LIMIT: u32 = 4;
    const TASKS: usize = 16;
    const ROUNDS: usize = 20;
    let lock = make_lock(config()).await;
    let key = key("load");
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let lock = lock.clone();
        let (key, inside, most) = (key.clone(), Arc::clone(&inside), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let permit = lock.acquire_permit(&key, LIMIT).await.unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                permit.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= LIMIT as usize, "{most} tasks held permits at once");
    assert_eq!(most, LIMIT as usize, "the limit was never reached");
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
}

async fn a_permit_whose_lease_ran_out_comes_back_and_is_reported_lost<
    L: DistributedSemaphore + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().ttl(Duration::from_millis(300))).await;
    let key = key("expiry");
    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), lock.acquire_permit(&key, 1))
        .await
        .expect("the expired permit comes back")
        .unwrap();
    next.extend(Duration::from_secs(30)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), permit.lost())
        .await
        .expect("the expired permit is reported lost");
    assert!(permit.is_lost());
    assert!(matches!(permit.release().await, Err(LockError::LockLost)));
    assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
    next.release().await.unwrap();
}

async fn permits_extend_like_locks<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().ttl(Duration::from_millis(400))).await;
    let key = key("extend");
    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    permit.extend(Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!permit.is_lost());
    assert!(is_already_locked(&lock.try_acquire_permit(&key, 1).await));
    permit.release().await.unwrap();
    lock.try_acquire_permit(&key, 1)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

async fn permit_acquires_cancelled_at_every_await_point_leave_nothing_held<
    L: DistributedSemaphore + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().wait_timeout(Duration::from_millis(300))).await;
    let prefix = key("cancel");
    let none_held = async |key: &str| {
        eventually(Duration::from_secs(5), || async {
            lock.permits_held(key).await.unwrap() == 0
        })
        .await
    };
    for waits in [false, true] {
        for n in 1.. {
            let key = format!("{prefix}:{waits}:{n}");
            let acquire = async {
                if waits {
                    lock.acquire_permit(&key, 2).await
                } else {
                    lock.try_acquire_permit(&key, 2).await
                }
            };
            match drop_at_suspension(acquire, n).await {
                Some(permit) => {
                    drop(permit.expect("a free key"));
                    break;
                }
                None => assert!(
                    none_held(&key).await,
                    "a permit acquire (waits: {waits}) cancelled at await point {n} kept a permit"
                ),
            }
        }
    }
    let key = format!("{prefix}:contended");
    for n in 1..=12 {
        let holder = lock.try_acquire_permit(&key, 1).await.expect("free key");
        let waited = drop_at_suspension(lock.acquire_permit(&key, 1), n).await;
        holder.release().await.unwrap();
        assert!(
            none_held(&key).await,
            "a waiter cancelled at await point {n} kept a permit"
        );
        match waited {
            None => {}
            Some(Err(LockError::Timeout)) => break,
            Some(other) => panic!("a waiter on a held key ended with {other:?}"),
        }
    }
}

async fn hostile_keys_have_permits_of_their_own<L: DistributedSemaphore + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    let lock = make_lock(config()).await;
    let prefix = common::unique_prefix("hostile-permits");
    let mut runner = TestRunner::deterministic();
    let mut keys = std::collections::BTreeSet::new();
    while keys.len() < 24 {
        let tail = common::hostile::hostile_key()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let key = format!("{prefix}{tail}");
        if key.len() <= k1s0_distributed_lock::MAX_KEY_LEN {
            keys.insert(key);
        }
    }
    let mut held = Vec::new();
    for key in &keys {
        held.push(lock.try_acquire_permit(key, 1).await.unwrap());
    }
    for key in &keys {
        assert!(is_already_locked(&lock.try_acquire_permit(key, 1).await));
        assert_eq!(lock.permits_held(key).await.unwrap(), 1, "{key:?}");
    }
    for permit in held {
        permit.release().await.unwrap();
    }
    for key in &keys {
        assert_eq!(lock.permits_held(key).await.unwrap(), 0, "{key:?}");
    }
}
