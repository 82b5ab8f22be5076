//! PostgreSQL backend, permits (`DistributedSemaphore`): at most `limit` holders of a key across
//! lock objects (each on its own pool, as another process would be), each caller checking its
//! own limit; permits are slots of the key's permit base, told apart within one session, taken
//! one per statement, in their own namespace (a permit never conflicts with a lock on the key);
//! waiters are woken by releases without polling, first in first out within a lock object;
//! permits expire, extend, come back at once when their session ends, and a cancelled acquire
//! leaves nothing. The statements of docs/postgres.md ("Permits") are run as a client in
//! another language would.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cancel::drop_at_suspension;
use common::hostile::hostile_key;
use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, DistributedSemaphore, LockConfig, LockError, LockGuard,
    LockMode, PostgresDistributedLock,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use sqlx::PgConnection;

/// A generous budget, a short retry interval, a TTL far beyond the tests' holds.
fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(20))
        .wait_timeout(Duration::from_secs(10))
}

/// Retries so rare that a waiter woken in time was woken by a release, not by its timer.
fn no_polling() -> LockConfig {
    config()
        .retry_interval(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(60))
}

fn key(test: &str) -> String {
    format!("{}k", common::unique_prefix(test))
}

/// The slots of `key`'s permits held on the server (granted `pg_locks` rows of its permit
/// range), as (slot, pid), lowest slot first.
async fn slots(admin: &mut PgConnection, key: &str) -> Vec<(i64, i32)> {
    let base = PostgresDistributedLock::permit_base(key) as u64;
    sqlx::query_as(
        "SELECT objid::int8 - $2, pid FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid = $1::int8::oid AND objid::int8 BETWEEN $2 AND $2 + 65535 \
         AND objsubid = 1 AND granted ORDER BY 1",
    )
    .bind((base >> 32) as i64)
    .bind((base & 0xffff_ffff) as i64)
    .fetch_all(admin)
    .await
    .expect("query pg_locks")
}

/// Just the slot numbers of [`slots`].
async fn slot_numbers(admin: &mut PgConnection, key: &str) -> Vec<i64> {
    slots(admin, key)
        .await
        .into_iter()
        .map(|(slot, _)| slot)
        .collect()
}

/// Waits up to 5 s until some session flags `key`'s permits (a waiter waits on the server).
async fn wait_for_permit_flag(admin: &mut PgConnection, key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pg_support::permit_flags(admin, key).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no waiter flagged the permits of {key}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether session `pid` is idle after the statement that tries a permit (docs/postgres.md,
/// "Permits": it starts `SELECT t.slot`).
async fn idle_after_a_permit_try(admin: &mut PgConnection, pid: i32) -> bool {
    sqlx::query_scalar(
        "SELECT state = 'idle' AND query LIKE 'SELECT t.slot%' FROM pg_stat_activity \
         WHERE pid = $1",
    )
    .bind(pid)
    .fetch_one(admin)
    .await
    .expect("the session's activity")
}

async fn expect_refused(result: Result<LockGuard, LockError>, what: &str) {
    match result {
        Err(LockError::AlreadyLocked) => {}
        Ok(guard) => {
            guard.release().await.unwrap();
            panic!("{what}: got a permit");
        }
        Err(other) => panic!("{what}: {other:?}"),
    }
}

/// 16 tasks over two lock objects (8 each: several share a session, so its re-entrant advisory
/// locks must be told apart) take permits of one key with limit 3 and hold them briefly: the
/// number inside never exceeds 3 and reaches it; every token is distinct; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_limit_holders_across_two_lock_objects() {
    const LIMIT: u32 = 3;
    let key = key("pg_permits_limit");
    let locks = [
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    ];
    let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let lock = locks[task % 2].clone();
            let (key, inside, most, tokens) = (
                key.clone(),
                Arc::clone(&inside),
                Arc::clone(&most),
                Arc::clone(&tokens),
            );
            tokio::spawn(async move {
                for _ in 0..12 {
                    let permit = lock.acquire_permit(&key, LIMIT).await.unwrap();
                    assert_eq!(permit.mode(), LockMode::Shared);
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokens.lock().unwrap().push(permit.fencing_token());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    permit.release().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), LIMIT as usize);
    let mut tokens = std::mem::take(&mut *tokens.lock().unwrap());
    let taken = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), taken, "a fencing token was handed out twice");
    assert_eq!(locks[0].permits_held(&key).await.unwrap(), 0);
    let mut admin = pg_support::admin().await;
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// Each caller checks its own limit against every permit held: with two permits held at slots
/// 2 and 3 by callers with limit 5, a caller with limit 2 is refused though slots 0 and 1 are
/// free, and a caller with limit 3 gets one and then no second; a slot taken over the limit is
/// given back in the same statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_checks_its_own_limit_against_all_permits_held() {
    let key = key("pg_permits_own_limit");
    let (wide, narrow) = (
        pg_support::lock(config()).await,
        pg_support::lock(config().wait_timeout(Duration::from_millis(300))).await,
    );
    let mut admin = pg_support::admin().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(wide.try_acquire_permit(&key, 5).await.unwrap());
    }
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1, 2, 3]);
    for permit in held.drain(..2) {
        permit.release().await.unwrap();
    }
    assert_eq!(slot_numbers(&mut admin, &key).await, [2, 3]);

    expect_refused(
        narrow.try_acquire_permit(&key, 2).await,
        "limit 2 with 2 held",
    )
    .await;
    assert!(matches!(
        narrow.acquire_permit(&key, 2).await,
        Err(LockError::Timeout)
    ));
    assert_eq!(slot_numbers(&mut admin, &key).await, [2, 3]);
    let third = narrow.try_acquire_permit(&key, 3).await.unwrap();
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 2, 3]);
    expect_refused(
        narrow.try_acquire_permit(&key, 3).await,
        "limit 3 with 3 held",
    )
    .await;
    // The slot tried over the limit (1) was given back.
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 2, 3]);
    assert_eq!(narrow.permits_held(&key).await.unwrap(), 3);
    held.push(wide.try_acquire_permit(&key, 5).await.unwrap());
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1, 2, 3]);
    third.release().await.unwrap();
    for permit in held {
        permit.release().await.unwrap();
    }
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// Several permits of one key in one session (one lock object with one session): each is its
/// own slot, with its own token; each release frees its own slot and the next permit takes the
/// lowest free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_of_one_session_are_told_apart_and_released_separately() {
    let key = key("pg_permits_reentrant");
    let lock = pg_support::one_session_lock(config(), |builder| builder).await;
    let mut admin = pg_support::admin().await;
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(lock.try_acquire_permit(&key, 3).await.unwrap());
    }
    let held = slots(&mut admin, &key).await;
    assert_eq!(
        held.iter().map(|&(slot, _)| slot).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(
        held.iter().all(|&(_, pid)| pid == held[0].1),
        "one session: {held:?}"
    );
    assert!(permits[0].fencing_token() < permits[1].fencing_token());
    assert!(permits[1].fencing_token() < permits[2].fencing_token());
    expect_refused(lock.try_acquire_permit(&key, 3).await, "a fourth of three").await;
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1, 2]);

    let middle = permits.remove(1);
    middle.release().await.unwrap();
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 2]);
    assert_eq!(lock.permits_held(&key).await.unwrap(), 2);
    permits.push(lock.try_acquire_permit(&key, 3).await.unwrap());
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1, 2]);
    drop(permits.remove(0));
    assert_eq!(lock.permits_held(&key).await.unwrap(), 2);
    assert_eq!(slot_numbers(&mut admin, &key).await, [1, 2]);
    for permit in permits {
        permit.release().await.unwrap();
    }
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// One statement takes one slot however many are free: with all 65,536 free, one; with slots 1
/// to 4 and 6 held by another client, slot 0, then 5, then 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_statement_takes_exactly_one_slot() {
    let key = key("pg_permits_one_slot");
    let lock = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let mut other = pg_support::admin().await;
    let first = lock.try_acquire_permit(&key, 65_536).await.unwrap();
    assert_eq!(slot_numbers(&mut admin, &key).await, [0]);
    first.release().await.unwrap();

    let base = PostgresDistributedLock::permit_base(&key);
    for slot in [1_i64, 2, 3, 4, 6] {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(base + slot)
            .execute(&mut other)
            .await
            .unwrap();
    }
    let mut permits = Vec::new();
    for expected in [vec![0, 1, 2, 3, 4, 6], vec![0, 1, 2, 3, 4, 5, 6]] {
        permits.push(lock.try_acquire_permit(&key, 65_536).await.unwrap());
        assert_eq!(slot_numbers(&mut admin, &key).await, expected);
    }
    permits.push(lock.try_acquire_permit(&key, 65_536).await.unwrap());
    assert_eq!(
        slot_numbers(&mut admin, &key).await,
        (0..8).collect::<Vec<_>>()
    );
    // All eight taken: a limit of 8 finds none free and takes nothing.
    expect_refused(lock.try_acquire_permit(&key, 8).await, "a ninth of eight").await;
    assert_eq!(slot_numbers(&mut admin, &key).await.len(), 8);
    for permit in permits {
        permit.release().await.unwrap();
    }
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut other)
        .await
        .unwrap();
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// A permit on a key and a lock on it do not conflict, on either side of the lock, either way
/// round; `is_locked` and `permits_held` each see only their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_and_locks_of_one_key_do_not_conflict() {
    let key = key("pg_permits_namespace");
    let (first, second) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let writer = first.try_acquire(&key).await.unwrap();
    let permit = second.try_acquire_permit(&key, 1).await.unwrap();
    let own = first.try_acquire_permit(&key, 2).await.unwrap();
    assert_eq!(first.permits_held(&key).await.unwrap(), 2);
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    writer.release().await.unwrap();
    assert!(!first.is_locked(&key).await.unwrap(), "permits are no lock");
    let reader = second.try_acquire_shared(&key).await.unwrap();
    let other_reader = first.try_acquire_shared(&key).await.unwrap();
    assert_eq!(second.permits_held(&key).await.unwrap(), 2);
    reader.release().await.unwrap();
    other_reader.release().await.unwrap();
    // The permits are full for limit 2, and the lock is free.
    expect_refused(first.try_acquire_permit(&key, 2).await, "a third of two").await;
    let writer = second.try_acquire(&key).await.unwrap();
    writer.release().await.unwrap();
    permit.release().await.unwrap();
    own.release().await.unwrap();
    assert_eq!(first.permits_held(&key).await.unwrap(), 0);
    assert!(!first.is_locked(&key).await.unwrap());
}

/// A limit of 0, or above the 65,536 slots of a key, is `InvalidConfig` for every form, before
/// anything reaches the server; 65,536 works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_out_of_range_are_refused_and_change_nothing() {
    let key = key("pg_permits_limits");
    let lock = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let held = lock.try_acquire_permit(&key, 1).await.unwrap();
    for limit in [0, 65_537, 1 << 20, u32::MAX] {
        assert!(
            matches!(
                lock.try_acquire_permit(&key, limit).await,
                Err(LockError::InvalidConfig { .. })
            ),
            "try, limit {limit}"
        );
        assert!(
            matches!(
                lock.acquire_permit(&key, limit).await,
                Err(LockError::InvalidConfig { .. })
            ),
            "acquire, limit {limit}"
        );
        assert_eq!(slot_numbers(&mut admin, &key).await, [0], "limit {limit}");
    }
    let widest = lock.acquire_permit(&key, 65_536).await.unwrap();
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1]);
    drop((held, widest));
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
}

/// A waiter is woken by a release without polling (its retry interval is 30 s): from another
/// lock object through the waiter flag and a notification, and from its own lock object
/// directly (whose release notifies nobody, as the flag is its own session's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_a_release_without_polling() {
    let (holders, others) = (
        pg_support::lock(no_polling()).await,
        pg_support::lock(no_polling()).await,
    );
    let mut admin = pg_support::admin().await;
    for same_lock_object in [false, true] {
        let key = key("pg_permits_woken");
        let waiters = if same_lock_object { &holders } else { &others };
        let held = [
            holders.try_acquire_permit(&key, 2).await.unwrap(),
            holders.try_acquire_permit(&key, 2).await.unwrap(),
        ];
        let waiting = tokio::spawn({
            let (waiters, key) = (waiters.clone(), key.clone());
            async move { waiters.acquire_permit(&key, 2).await }
        });
        wait_for_permit_flag(&mut admin, &key).await;
        // The waiter has tried again after flagging (its session's last statement is a permit
        // try), and waits.
        let pid = pg_support::permit_flag_holders(&mut admin, &key).await[0];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !idle_after_a_permit_try(&mut admin, pid).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the waiter never tried again after flagging"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!waiting.is_finished());
        let [first, second] = held;
        first.release().await.unwrap();
        let permit = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap_or_else(|_| panic!("not woken (same lock object: {same_lock_object})"))
            .unwrap()
            .unwrap();
        assert_eq!(pg_support::permit_flags(&mut admin, &key).await, 0);
        permit.release().await.unwrap();
        second.release().await.unwrap();
        assert_eq!(holders.permits_held(&key).await.unwrap(), 0);
    }
}

/// Tasks of one lock object waiting for a permit get them in the order they came, and a
/// `try_acquire_permit` of that lock object cannot go in ahead of them, not even with a limit
/// that leaves room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_one_lock_object_are_served_first_in_first_out() {
    let key = key("pg_permits_fifo");
    let lock = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let holder = lock.try_acquire_permit(&key, 1).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for place in 0..6 {
        let (waiters, wanted, order) = (lock.clone(), key.clone(), Arc::clone(&order));
        let mut waiter = Box::pin(async move {
            let permit = waiters.acquire_permit(&wanted, 1).await.unwrap();
            order.lock().unwrap().push(place);
            tokio::time::sleep(Duration::from_millis(5)).await;
            permit.release().await.unwrap();
        });
        // The first poll takes its place in the line.
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        tasks.push(tokio::spawn(waiter));
        if place == 0 {
            wait_for_permit_flag(&mut admin, &key).await;
        }
    }
    expect_refused(lock.try_acquire_permit(&key, 2).await, "a try past waiters").await;
    holder.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("every waiter in turn")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..6).collect::<Vec<_>>());
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
    assert_eq!(pg_support::permit_flags(&mut admin, &key).await, 0);
}

/// The session holding permits is terminated: the permits are free on the server at once
/// (another lock object takes them without waiting for any TTL), and the holder's guards
/// report lost as soon as their session notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_sessions_permits_come_back_at_once() {
    let key = key("pg_permits_terminated");
    let (holders, others) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let held = [
        holders.try_acquire_permit(&key, 2).await.unwrap(),
        holders.try_acquire_permit(&key, 2).await.unwrap(),
    ];
    expect_refused(others.try_acquire_permit(&key, 2).await, "a third of two").await;
    let pid = slots(&mut admin, &key).await[0].1;
    pg_support::terminate(&mut admin, pid).await;
    let taken = [
        others.try_acquire_permit(&key, 2).await.unwrap(),
        others.try_acquire_permit(&key, 2).await.unwrap(),
    ];
    // The holders' session finds its connection gone at its next statement.
    let _ = holders.permits_held(&key).await;
    for permit in &held {
        tokio::time::timeout(Duration::from_secs(5), permit.lost())
            .await
            .expect("the guard reports lost");
    }
    for permit in held {
        assert!(matches!(permit.release().await, Err(LockError::LockLost)));
    }
    assert_eq!(holders.permits_held(&key).await.unwrap(), 2);
    for permit in taken {
        permit.release().await.unwrap();
    }
    let again = holders.try_acquire_permit(&key, 2).await.unwrap();
    again.release().await.unwrap();
}

/// A permit not extended within its TTL is unlocked by its session (which wakes a waiter of its
/// lock object, before anything touches the expired guard) and reports lost; an extended one
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_lease_runs_out_unless_extended() {
    let key = key("pg_permits_lease");
    let lock = pg_support::lock(no_polling().ttl(Duration::from_millis(300))).await;
    let mut admin = pg_support::admin().await;
    let short = lock.try_acquire_permit(&key, 2).await.unwrap();
    let kept = lock.try_acquire_permit(&key, 2).await.unwrap();
    let waiting = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire_permit(&key, 2).await }
    });
    kept.extend(Duration::from_secs(30)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), short.lost())
        .await
        .expect("the short lease ran out");
    let next = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the waiter was woken by the expiry")
        .unwrap()
        .unwrap();
    assert!(matches!(
        short.extend(Duration::from_secs(30)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(short.release().await, Err(LockError::LockLost)));
    next.extend(Duration::from_secs(30)).await.unwrap();
    assert!(!kept.is_lost());
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1]);
    kept.release().await.unwrap();
    next.release().await.unwrap();
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// `acquire_permit` dropped at its 1st, 2nd, ... suspension and after growing delays, for a key
/// with permits free and for one whose permits another lock object holds: afterwards this lock
/// object holds no permit and no flag of the key, and the permits can all be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acquire_permit_leaves_nothing() {
    let (lock, others) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let attempts: Vec<Result<usize, Duration>> = (1..12)
        .map(Ok)
        .chain((0..30).map(|step| Err(Duration::from_micros(step * 150))))
        .collect();
    for all_held_elsewhere in [false, true] {
        let key = key("pg_permits_cancel");
        let (mut cancelled, mut completed) = (0, 0);
        for &attempt in &attempts {
            let held = if all_held_elsewhere {
                Some(others.try_acquire_permit(&key, 1).await.unwrap())
            } else {
                None
            };
            let outcome = match attempt {
                Ok(polls) => drop_at_suspension(lock.acquire_permit(&key, 1), polls).await,
                Err(delay) => tokio::time::timeout(delay, lock.acquire_permit(&key, 1))
                    .await
                    .ok(),
            };
            match outcome {
                Some(granted) => {
                    assert!(!all_held_elsewhere, "{attempt:?}");
                    completed += 1;
                    granted.unwrap().release().await.unwrap();
                }
                None => cancelled += 1,
            }
            // Runs on the key's session after anything the cancelled acquire left queued.
            let expected = u32::from(all_held_elsewhere);
            assert_eq!(
                lock.permits_held(&key).await.unwrap(),
                expected,
                "{attempt:?}"
            );
            assert_eq!(
                slot_numbers(&mut admin, &key).await.len(),
                expected as usize,
                "{attempt:?}"
            );
            assert_eq!(
                pg_support::permit_flags(&mut admin, &key).await,
                0,
                "{attempt:?}"
            );
            drop(held);
            let again = others.try_acquire_permit(&key, 1).await.unwrap();
            again.release().await.unwrap();
        }
        assert!(cancelled > 0, "{cancelled} cancelled");
        if !all_held_elsewhere {
            assert!(completed > 0, "{completed} completed");
        }
    }
}

/// A lock object on a fencing sequence of the test's own (dropped when the test ends), so that
/// the test can hold `nextval` up without stalling other tests. Returns the sequence's name.
async fn lock_on_own_sequence(
    test: &str,
) -> (PostgresDistributedLock, String, pg_support::DropOnExit) {
    let sequence = format!("k1s0_test_seq_{test}_{}", uuid::Uuid::new_v4().simple());
    let cleanup = pg_support::DropOnExit::new(vec![
        format!("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = '\"{sequence}\"'"),
        format!("DROP SEQUENCE IF EXISTS \"{sequence}\""),
    ]);
    let lock = PostgresDistributedLock::builder(pg_support::pool(3).await, config())
        .fencing_sequence(sequence.clone())
        .build()
        .unwrap();
    (lock, sequence, cleanup)
}

/// A connection that alters `sequence` (to what it is) in a transaction, whose lock on it
/// makes `nextval` wait until the transaction ends.
async fn hold_up_tokens(sequence: &str) -> PgConnection {
    let mut blocker = pg_support::admin().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query(&format!("ALTER SEQUENCE \"{sequence}\" NO CYCLE"))
        .execute(&mut blocker)
        .await
        .unwrap();
    blocker
}

/// Waits up to 5 s until `key` has exactly the permit slots `expected` on the server.
async fn wait_for_slots(admin: &mut PgConnection, key: &str, expected: &[i64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while slot_numbers(admin, key).await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never had the slots {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An `acquire_permit` cancelled while its statement runs (held up after taking its slot, at
/// `nextval`): the statement still grants the permit, to nobody, and the session gives it back
/// before it runs anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_granted_to_a_cancelled_acquire_is_given_back() {
    let key = key("pg_permits_cancel_in_flight");
    let (lock, sequence, _cleanup) = lock_on_own_sequence("cancel").await;
    let mut admin = pg_support::admin().await;
    let first = lock.try_acquire_permit(&key, 1).await.unwrap();
    first.release().await.unwrap();
    let mut blocker = hold_up_tokens(&sequence).await;
    let acquiring = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire_permit(&key, 1).await }
    });
    // The slot is taken; the statement waits for the sequence.
    wait_for_slots(&mut admin, &key, &[0]).await;
    acquiring.abort();
    assert!(acquiring.await.unwrap_err().is_cancelled());
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    // Runs on the key's session after the statement and its undo.
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
    assert!(slots(&mut admin, &key).await.is_empty());
    let next = lock.try_acquire_permit(&key, 1).await.unwrap();
    next.release().await.unwrap();
}

/// A permit statement that fails after taking its slot (its `nextval` waits past the session's
/// `lock_timeout`) leaves that slot behind on the server, and the session unlocks it before
/// answering: only it, not the permit the session holds for a guard. The session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_permit_statement_leaves_no_slot() {
    let key = key("pg_permits_failed");
    let (lock, sequence, _cleanup) = lock_on_own_sequence("failed").await;
    let mut admin = pg_support::admin().await;
    let kept = lock.try_acquire_permit(&key, 2).await.unwrap();
    let blocker = hold_up_tokens(&sequence).await;
    match lock.try_acquire_permit(&key, 2).await {
        Err(LockError::BackendError(_)) => {}
        other => panic!("expected the lock_timeout to fail the statement: {other:?}"),
    }
    assert_eq!(slot_numbers(&mut admin, &key).await, [0]);
    drop(blocker);
    assert!(!kept.is_lost());
    assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
    let next = lock.try_acquire_permit(&key, 2).await.unwrap();
    assert_eq!(slot_numbers(&mut admin, &key).await, [0, 1]);
    next.release().await.unwrap();
    kept.release().await.unwrap();
    assert!(slots(&mut admin, &key).await.is_empty());
}

/// Any key for permits: a valid one has its own permits (not its neighbour's) and no lock; an
/// invalid one is refused by every form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_key_works_for_permits() {
    let lock = pg_support::lock(config()).await;
    let prefix = common::unique_prefix("pg_permits_hostile");
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(64));
    tokio::task::block_in_place(|| {
        runner
            .run(&hostile_key(), |key| {
                runtime.block_on(permit_key_check(&lock, &prefix, &key));
                Ok(())
            })
            .unwrap();
    });
}

async fn permit_key_check(lock: &PostgresDistributedLock, prefix: &str, key: &str) {
    let full = format!("{prefix}{key}");
    let neighbour = format!("{prefix}neighbour");
    let valid = !full.is_empty() && full.len() <= k1s0_distributed_lock::MAX_KEY_LEN;
    match lock.try_acquire_permit(&full, 2).await {
        Ok(permit) => {
            assert!(valid, "accepted an invalid key {full:?}");
            assert_eq!(permit.key(), full);
            assert_eq!(lock.permits_held(&full).await.unwrap(), 1);
            assert_eq!(lock.permits_held(&neighbour).await.unwrap(), 0);
            assert!(!lock.is_locked(&full).await.unwrap());
            let second = lock.acquire_permit(&full, 2).await.unwrap();
            expect_refused(lock.try_acquire_permit(&full, 2).await, &full).await;
            permit.release().await.unwrap();
            second.release().await.unwrap();
            assert_eq!(lock.permits_held(&full).await.unwrap(), 0);
        }
        Err(LockError::InvalidKey { .. }) => {
            assert!(!valid, "refused a valid key {full:?}");
            assert!(matches!(
                lock.acquire_permit(&full, 2).await,
                Err(LockError::InvalidKey { .. })
            ));
            assert!(matches!(
                lock.permits_held(&full).await,
                Err(LockError::InvalidKey { .. })
            ));
        }
        Err(other) => panic!("{full:?}: unexpected {other:?}"),
    }
}

/// The `sql` blocks of docs/postgres.md's "Permits" section, in order.
struct DocumentedSql {
    base: String,
    try_permit: String,
    unlock_permit: String,
    permits_held: String,
}

fn documented_sql() -> DocumentedSql {
    let doc = include_str!("../docs/postgres.md");
    let start = doc.find("## Permits").expect("the Permits section");
    let section = &doc[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let blocks: Vec<String> = section
        .split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().trim().to_owned())
        .collect();
    assert_eq!(blocks.len(), 5, "the section's sql blocks: {blocks:#?}");
    let base = blocks[0]
        .split(';')
        .next()
        .unwrap()
        .replace("<advisory key>", "$1");
    DocumentedSql {
        base,
        try_permit: blocks[1].clone(),
        unlock_permit: blocks[2].clone(),
        permits_held: blocks[3].clone(),
    }
}

/// A client in another language follows the section: it computes the permit base in SQL,
/// takes and releases permits with the documented statements on a plain connection, and the
/// crate counts them against its own limits and the other way round. The statement's plan is
/// the one its "one slot" argument rests on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_another_language_shares_permits_with_the_crate() {
    let sql = documented_sql();
    let key = key("pg_permits_foreign");
    let lock = pg_support::lock(config()).await;
    let mut foreign = pg_support::admin().await;
    let advisory = PostgresDistributedLock::advisory_key(&key);
    let base: i64 = sqlx::query_scalar(&sql.base)
        .bind(advisory)
        .fetch_one(&mut foreign)
        .await
        .unwrap();
    assert_eq!(base, PostgresDistributedLock::permit_base(&key));

    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) {}", sql.try_permit))
        .bind(base)
        .bind(2_i32)
        .bind(Vec::<i32>::new())
        .bind(false)
        .fetch_all(&mut foreign)
        .await
        .unwrap();
    let plan = plan.join("\n");
    let limit = plan.find("->  Limit").expect(&plan);
    let filtered = plan[limit..]
        .find("Filter: CASE WHEN (g.slot = ANY")
        .expect(&plan);
    assert!(
        plan[limit + filtered..].contains("->  ProjectSet"),
        "{plan}"
    );

    let take = |held: Vec<i32>| {
        sqlx::query_as::<_, (Option<i32>, Option<i64>, Option<bool>, Option<bool>)>(&sql.try_permit)
            .bind(base)
            .bind(2_i32)
            .bind(held)
            .bind(false)
    };
    let (slot, token, _, _) = take(vec![]).fetch_one(&mut foreign).await.unwrap();
    assert_eq!(slot, Some(0));
    let crate_permit = lock.try_acquire_permit(&key, 2).await.unwrap();
    assert!(crate_permit.fencing_token() as i64 > token.unwrap());
    expect_refused(lock.try_acquire_permit(&key, 2).await, "a third of two").await;
    expect_refused(
        lock.try_acquire_permit(&key, 1).await,
        "limit 1 with 2 held",
    )
    .await;
    // The foreign client, holding slot 0, is refused in turn, and takes nothing.
    let (slot, token, _, _) = take(vec![0]).fetch_one(&mut foreign).await.unwrap();
    assert_eq!((slot, token), (None, None));
    let held: i64 = sqlx::query_scalar(&sql.permits_held)
        .bind(base)
        .fetch_one(&mut foreign)
        .await
        .unwrap();
    assert_eq!(held, 2);
    crate_permit.release().await.unwrap();
    let (released, _): (bool, bool) = sqlx::query_as(&sql.unlock_permit)
        .bind(base)
        .bind(0_i32)
        .fetch_one(&mut foreign)
        .await
        .unwrap();
    assert!(released);
    assert_eq!(lock.permits_held(&key).await.unwrap(), 0);
}
