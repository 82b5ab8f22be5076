//! PostgreSQL backend, shared side (`DistributedRwLock`): readers share a key and writers hold
//! it alone, across lock objects (each on its own pool, as another process would be) and OS
//! processes; a waiting writer stops new readers everywhere, and readers that waited through a
//! writer go in before the next writer; shared guards expire, drop and cancel cleanly.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cancel::drop_at_suspension;
use common::counter::postgres::PostgresCounter;
use common::hostile::hostile_key;
use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, LockConfig, LockError, LockGuard, LockMode,
    PostgresDistributedLock,
};
use pg_support::Mark;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const CHILD_KEY: &str = "K1S0_PG_RW_CHILD_KEY";
const CHILD_ROWS: &str = "K1S0_PG_RW_CHILD_ROWS";

/// A generous budget, a short retry interval, a TTL far beyond the tests' holds.
fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(20))
        .wait_timeout(Duration::from_secs(10))
}

fn key(test: &str) -> String {
    format!("{}k", common::unique_prefix(test))
}

async fn expect_already_locked(result: Result<LockGuard, LockError>, what: &str) {
    match result {
        Err(LockError::AlreadyLocked) => {}
        Ok(guard) => {
            let mode = guard.mode();
            guard.release().await.unwrap();
            panic!("{what}: got the {mode:?} side");
        }
        Err(other) => panic!("{what}: {other:?}"),
    }
}

/// Readers share a key within one lock object (one session: the server counts the shared locks)
/// and across two; a writer gets in only once every one of them has released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_hold_together_on_one_and_across_two_lock_objects() {
    let key = key("pg_rw_share");
    let (first, second) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let mut readers = Vec::new();
    for lock in [&first, &second, &first, &second, &first] {
        let reader = lock.try_acquire_shared(&key).await.unwrap();
        assert_eq!(reader.mode(), LockMode::Shared);
        readers.push(reader);
    }
    readers.push(second.acquire_shared(&key).await.unwrap());
    // One granted row per session holding it.
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 2);
    assert!(first.is_locked(&key).await.unwrap());
    expect_already_locked(first.try_acquire(&key).await, "a writer among readers").await;
    expect_already_locked(second.try_acquire(&key).await, "a writer among readers").await;
    // All of the first lock object's readers go: the second's still hold.
    let (of_first, of_second): (Vec<_>, Vec<_>) = readers
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0 && *i < 5);
    for (_, reader) in of_first {
        reader.release().await.unwrap();
    }
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    assert!(first.is_locked(&key).await.unwrap());
    expect_already_locked(first.try_acquire(&key).await, "a writer among readers").await;
    for (_, reader) in of_second {
        reader.release().await.unwrap();
    }
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    pg_support::take_and_release(&first, &key).await;
}

/// A writer of one lock object excludes the readers of another, and their readers exclude it:
/// `try_acquire*` answers `AlreadyLocked`, a waiting acquire ends in `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_excludes_readers_and_readers_a_writer_across_lock_objects() {
    let key = key("pg_rw_exclude");
    let short = config()
        .retry_interval(Duration::from_millis(10))
        .wait_timeout(Duration::from_millis(200));
    let (writers, readers) = (pg_support::lock(short).await, pg_support::lock(short).await);
    let writer = writers.try_acquire(&key).await.unwrap();
    expect_already_locked(
        readers.try_acquire_shared(&key).await,
        "reader beside a writer",
    )
    .await;
    assert!(matches!(
        readers.acquire_shared(&key).await,
        Err(LockError::Timeout)
    ));
    writer.release().await.unwrap();

    let reader = readers.try_acquire_shared(&key).await.unwrap();
    let other_reader = readers.acquire_shared(&key).await.unwrap();
    expect_already_locked(writers.try_acquire(&key).await, "writer beside readers").await;
    assert!(matches!(
        writers.acquire(&key).await,
        Err(LockError::Timeout)
    ));
    reader.release().await.unwrap();
    expect_already_locked(writers.try_acquire(&key).await, "writer beside a reader").await;
    other_reader.release().await.unwrap();
    pg_support::take_and_release(&writers, &key).await;
}

/// A writer waiting in one lock object (its writer-waiting mark is on the server) stops new
/// readers of the others, even of one whose reader already holds the key: `try_acquire_shared`
/// answers `AlreadyLocked` and `acquire_shared` waits. The writer gets in when the readers
/// inside release, and the late reader after the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waiting_elsewhere_stops_new_readers() {
    let key = key("pg_rw_writer_waits");
    let (writers, readers, third) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let inside = readers.acquire_shared(&key).await.unwrap();
    let writer = tokio::spawn({
        let (writers, key) = (writers.clone(), key.clone());
        async move { writers.acquire(&key).await }
    });
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    expect_already_locked(
        readers.try_acquire_shared(&key).await,
        "a new reader beside a reader, past a waiting writer",
    )
    .await;
    expect_already_locked(
        third.try_acquire_shared(&key).await,
        "a new reader past a waiting writer",
    )
    .await;
    let late = tokio::spawn({
        let (readers, key) = (readers.clone(), key.clone());
        async move { readers.acquire_shared(&key).await }
    });
    // The late reader waits on the server (its session flags the key too) before the reader
    // inside goes.
    wait_for_flags(&mut admin, &key, 2).await;
    inside.release().await.unwrap();
    let writer = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer got in once the reader inside left")
        .unwrap()
        .unwrap();
    assert!(!late.is_finished(), "a reader got in beside the writer");
    assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 0);
    let writer_token = writer.fencing_token();
    writer.release().await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(5), late)
        .await
        .expect("the late reader got in after the writer")
        .unwrap()
        .unwrap();
    assert!(late.fencing_token() > writer_token);
    late.release().await.unwrap();
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}

/// Waits up to 5 s until `sessions` sessions flag `key` (their waiters wait on the server).
async fn wait_for_flags(admin: &mut sqlx::PgConnection, key: &str, sessions: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pg_support::flag_holders(admin, key).await.len() < sessions {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {sessions} sessions flagged {key}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A writer of one lock object holds; two readers of another wait through its hold (their
/// readers' turn mark is on the server); a second writer, of a third, waits too. When the first
/// writer releases, both readers go in, together, before the second writer; it gets in once
/// they release. Several rounds, as the release notifies all of them and they race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_waited_through_a_writer_go_in_before_the_next_writer() {
    let key = key("pg_rw_readers_turn");
    let (first, readers, second) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    for round in 0..5 {
        let holder = first.acquire(&key).await.unwrap();
        let waiting_readers: Vec<_> = (0..2)
            .map(|_| {
                let (readers, key) = (readers.clone(), key.clone());
                tokio::spawn(async move { readers.acquire_shared(&key).await })
            })
            .collect();
        pg_support::wait_for_mark(
            &mut admin,
            &key,
            Mark::ReadersTurn,
            1,
            Duration::from_secs(5),
        )
        .await;
        let next_writer = tokio::spawn({
            let (second, key) = (second.clone(), key.clone());
            async move { second.acquire(&key).await }
        });
        pg_support::wait_for_mark(
            &mut admin,
            &key,
            Mark::WriterWaiting,
            1,
            Duration::from_secs(5),
        )
        .await;
        let holder_token = holder.fencing_token();
        holder.release().await.unwrap();
        let mut tokens = Vec::new();
        let mut guards = Vec::new();
        for reader in waiting_readers {
            let guard = tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a reader did not get in"))
                .unwrap()
                .unwrap_or_else(|error| panic!("round {round}: {error:?}"));
            tokens.push(guard.fencing_token());
            guards.push(guard);
        }
        assert!(
            !next_writer.is_finished(),
            "round {round}: the second writer got in before or beside the readers"
        );
        assert!(tokens.iter().all(|&token| token > holder_token));
        for guard in guards {
            guard.release().await.unwrap();
        }
        let writer = tokio::time::timeout(Duration::from_secs(5), next_writer)
            .await
            .expect("the second writer got in after the readers")
            .unwrap()
            .unwrap();
        assert!(tokens.iter().all(|&token| writer.fencing_token() > token));
        writer.release().await.unwrap();
        assert_eq!(pg_support::readers_marks(&mut admin, &key).await, 0);
        assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 0);
    }
}

/// A writer holds and a second writer, of another lock object, already waits when readers of a
/// third arrive: refused because a writer waits, they find a writer holding, so they wait
/// through its hold and go in before the waiting writer (a queue of writers cannot keep readers
/// out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_arriving_behind_a_waiting_writer_during_a_writers_hold_go_in_before_it() {
    let key = key("pg_rw_readers_after_writer");
    let (first, readers, second) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let holder = first.acquire(&key).await.unwrap();
    let next_writer = tokio::spawn({
        let (second, key) = (second.clone(), key.clone());
        async move { second.acquire(&key).await }
    });
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    let waiting_readers: Vec<_> = (0..2)
        .map(|_| {
            let (readers, key) = (readers.clone(), key.clone());
            tokio::spawn(async move { readers.acquire_shared(&key).await })
        })
        .collect();
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::ReadersTurn,
        1,
        Duration::from_secs(5),
    )
    .await;
    holder.release().await.unwrap();
    let mut guards = Vec::new();
    for reader in waiting_readers {
        let guard = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("a reader did not get in")
            .unwrap()
            .unwrap();
        guards.push(guard);
    }
    assert!(
        !next_writer.is_finished(),
        "the waiting writer got in before or beside the readers"
    );
    for guard in guards {
        guard.release().await.unwrap();
    }
    let writer = tokio::time::timeout(Duration::from_secs(5), next_writer)
        .await
        .expect("the writer got in after the readers")
        .unwrap()
        .unwrap();
    writer.release().await.unwrap();
    assert_eq!(pg_support::readers_marks(&mut admin, &key).await, 0);
    assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 0);
}

/// The readers' turn without a race: a plain client (no notification on unlock) holds the key,
/// readers of a lock object that retries only every 10 s wait through it, and the client
/// unlocks. While those readers are not yet in, no writer gets the free key; woken, the readers
/// go in before the writer that waits meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_takes_the_key_while_readers_that_waited_through_a_writer_are_not_in() {
    let key = key("pg_rw_readers_turn_plain");
    let advisory = PostgresDistributedLock::advisory_key(&key);
    let slow_retry = LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_secs(10))
        .max_retries(3);
    let readers = pg_support::lock(slow_retry).await;
    let writers = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let mut plain = pg_support::admin().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(advisory)
        .execute(&mut plain)
        .await
        .unwrap();
    let waiting_readers: Vec<_> = (0..2)
        .map(|_| {
            let (readers, key) = (readers.clone(), key.clone());
            tokio::spawn(async move { readers.acquire_shared(&key).await })
        })
        .collect();
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::ReadersTurn,
        1,
        Duration::from_secs(5),
    )
    .await;
    // A waiter tries once more right after setting its marks (a release may have come in
    // between), then sleeps until a notification or its 5-10 s retry. Nothing shows from
    // outside that both readers are past that try: give them a moment, far below the retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(advisory)
        .execute(&mut plain)
        .await
        .unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    expect_already_locked(
        writers.try_acquire(&key).await,
        "a writer ahead of readers that waited through a writer",
    )
    .await;
    let writer = tokio::spawn({
        let (writers, key) = (writers.clone(), key.clone());
        async move { writers.acquire(&key).await }
    });
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    // Wake the readers (and the writer) as a release of the crate would.
    sqlx::query("SELECT pg_notify('k1s0_distributed_lock', $1::text)")
        .bind(advisory)
        .execute(&mut plain)
        .await
        .unwrap();
    let mut guards = Vec::new();
    for reader in waiting_readers {
        let guard = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("a reader woken by the notification got in")
            .unwrap()
            .unwrap();
        guards.push(guard);
    }
    assert!(!writer.is_finished(), "the writer got in beside readers");
    let last_reader_token = guards.iter().map(LockGuard::fencing_token).max().unwrap();
    for guard in guards {
        guard.release().await.unwrap();
    }
    let writer = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer got in after the readers")
        .unwrap()
        .unwrap();
    assert!(writer.fencing_token() > last_reader_token);
    writer.release().await.unwrap();
}

/// The two halves of a pair, kept in memory, under load from two lock objects with readers and
/// writers each: readers always see both halves equal and never a writer inside, writers are
/// alone, and no update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_a_consistent_pair_under_load_from_two_lock_objects() {
    const READERS: usize = 6;
    const WRITERS: usize = 2;
    const ROUNDS: u64 = 25;
    let key = key("pg_rw_pair");
    let locks = [
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    ];
    let pair = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let readers_inside = Arc::new(AtomicUsize::new(0));
    let most_readers = Arc::new(AtomicUsize::new(0));
    let writer_inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for lock in &locks {
        for task in 0..READERS + WRITERS {
            let (lock, key, pair) = (lock.clone(), key.clone(), Arc::clone(&pair));
            let (readers_inside, most_readers, writer_inside) = (
                Arc::clone(&readers_inside),
                Arc::clone(&most_readers),
                Arc::clone(&writer_inside),
            );
            tasks.push(tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    if task < READERS {
                        let guard = lock.acquire_shared(&key).await.unwrap();
                        let now = readers_inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most_readers.fetch_max(now, Ordering::SeqCst);
                        assert!(
                            !writer_inside.load(Ordering::SeqCst),
                            "a writer among readers"
                        );
                        let first = pair.0.load(Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let second = pair.1.load(Ordering::SeqCst);
                        assert_eq!(first, second, "a reader saw a half-written pair");
                        readers_inside.fetch_sub(1, Ordering::SeqCst);
                        guard.release().await.unwrap();
                    } else {
                        let guard = lock.acquire(&key).await.unwrap();
                        assert!(!writer_inside.swap(true, Ordering::SeqCst), "two writers");
                        assert_eq!(readers_inside.load(Ordering::SeqCst), 0, "readers in");
                        let value = pair.0.load(Ordering::SeqCst);
                        pair.0.store(value + 1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        pair.1.store(value + 1, Ordering::SeqCst);
                        writer_inside.store(false, Ordering::SeqCst);
                        guard.release().await.unwrap();
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let writes = (locks.len() * WRITERS) as u64 * ROUNDS;
    assert_eq!(pair.0.load(Ordering::SeqCst), writes, "lost updates");
    assert_eq!(pair.1.load(Ordering::SeqCst), writes);
    assert!(
        most_readers.load(Ordering::SeqCst) >= 2,
        "readers never overlapped"
    );
}

/// `acquire_shared` of a free key dropped at its 1st, 2nd, ... suspension and after growing
/// delays: afterwards the key is free (`pg_locks` too) and another lock object can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acquire_shared_of_a_free_key_leaves_nothing() {
    let key = key("pg_rw_cancel_free");
    let lock = pg_support::lock(config()).await;
    let other = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let (mut cancelled, mut completed) = (0, 0);
    let attempts: Vec<Result<usize, Duration>> = (1..9)
        .map(Ok)
        .chain((0..40).map(|step| Err(Duration::from_micros(step * 40))))
        .collect();
    for attempt in attempts {
        let outcome = match attempt {
            Ok(polls) => drop_at_suspension(lock.acquire_shared(&key), polls).await,
            Err(delay) => tokio::time::timeout(delay, lock.acquire_shared(&key))
                .await
                .ok(),
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
    }
    assert!(
        cancelled > 0 && completed > 0,
        "{cancelled} cancelled, {completed} completed"
    );
}

/// `acquire_shared` dropped at every suspension while it waits on the server: for a key held
/// exclusively elsewhere (the reader sets the flag and the readers' turn mark), and for a key
/// read-locked elsewhere while a writer waits there (the reader, refused, sets the flag).
/// Afterwards no flag or mark of it is left, and once the holders go nobody has the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiting_acquire_shared_leaves_no_mark() {
    let key = key("pg_rw_cancel_waiting");
    let (holders, waiters, writers) = (
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
        pg_support::lock(config()).await,
    );
    let mut admin = pg_support::admin().await;
    let attempts: Vec<Result<usize, Duration>> = (1..11)
        .map(Ok)
        .chain((0..20).map(|step| Err(Duration::from_micros(step * 250))))
        .collect();
    for writer_waits in [false, true] {
        for &attempt in &attempts {
            let (held, writer) = if writer_waits {
                let reader = holders.try_acquire_shared(&key).await.unwrap();
                let writer = tokio::spawn({
                    let (writers, key) = (writers.clone(), key.clone());
                    async move { writers.acquire(&key).await }
                });
                pg_support::wait_for_mark(
                    &mut admin,
                    &key,
                    Mark::WriterWaiting,
                    1,
                    Duration::from_secs(5),
                )
                .await;
                (reader, Some(writer))
            } else {
                (holders.try_acquire(&key).await.unwrap(), None)
            };
            let outcome = match attempt {
                Ok(polls) => drop_at_suspension(waiters.acquire_shared(&key), polls).await,
                Err(delay) => tokio::time::timeout(delay, waiters.acquire_shared(&key))
                    .await
                    .ok(),
            };
            assert!(outcome.is_none(), "the key was not to be had: {attempt:?}");
            // Sync with the waiter's session (its marks cleared).
            assert!(waiters.is_locked(&key).await.unwrap());
            assert_eq!(
                pg_support::readers_marks(&mut admin, &key).await,
                0,
                "{attempt:?}"
            );
            let flags = pg_support::waiter_flags(&mut admin, &key).await;
            assert_eq!(flags, i64::from(writer_waits), "{attempt:?}");
            held.release().await.unwrap();
            if let Some(writer) = writer {
                let writer = writer.await.unwrap().unwrap();
                writer.release().await.unwrap();
            }
            assert!(!waiters.is_locked(&key).await.unwrap(), "{attempt:?}");
            assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
            assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
            let next = tokio::time::timeout(Duration::from_secs(2), waiters.acquire_shared(&key))
                .await
                .expect("the key is free")
                .unwrap();
            next.release().await.unwrap();
        }
    }
}

/// A shared guard not extended within its TTL is unlocked by its session and reports lost;
/// another reader's shared hold of the key on the same session stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_lease_that_runs_out_is_unlocked_and_reported_lost() {
    let key = key("pg_rw_lease");
    let lock = pg_support::lock(config().ttl(Duration::from_millis(300))).await;
    let other = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let short = lock.acquire_shared(&key).await.unwrap();
    let kept = lock.acquire_shared(&key).await.unwrap();
    kept.extend(Duration::from_secs(30)).await.unwrap();
    short.lost().await;
    assert!(short.is_lost());
    assert!(matches!(short.release().await, Err(LockError::LockLost)));
    assert!(!kept.is_lost());
    // The session unlocked one of its two shared locks: the key is still read-locked.
    assert!(lock.is_locked(&key).await.unwrap());
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    expect_already_locked(
        other.try_acquire(&key).await,
        "a writer beside a kept reader",
    )
    .await;
    kept.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);

    let alone = lock.acquire_shared(&key).await.unwrap();
    alone.lost().await;
    assert!(!lock.is_locked(&key).await.unwrap());
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    pg_support::take_and_release(&other, &key).await;
    assert!(matches!(alone.release().await, Err(LockError::LockLost)));
}

/// Dropping shared guards unlocks them, one shared lock each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_shared_guard_unlocks() {
    let key = key("pg_rw_drop");
    let lock = pg_support::lock(config()).await;
    let other = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let first = lock.acquire_shared(&key).await.unwrap();
    let second = lock.try_acquire_shared(&key).await.unwrap();
    drop(first);
    // Runs on the key's session after the dropped guard's unlock.
    assert!(lock.is_locked(&key).await.unwrap());
    expect_already_locked(other.try_acquire(&key).await, "a writer beside a reader").await;
    drop(second);
    assert!(!lock.is_locked(&key).await.unwrap());
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    pg_support::take_and_release(&other, &key).await;
}

/// Any key on the shared side: a valid one is read-locked exactly (not its neighbour), shared
/// with another reader and not with a writer; an invalid one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_key_works_on_the_shared_side() {
    let lock = pg_support::lock(config()).await;
    let prefix = common::unique_prefix("pg_rw_hostile");
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(64));
    tokio::task::block_in_place(|| {
        runner
            .run(&hostile_key(), |key| {
                runtime.block_on(shared_key_check(&lock, &prefix, &key));
                Ok(())
            })
            .unwrap();
    });
}

async fn shared_key_check(lock: &PostgresDistributedLock, prefix: &str, key: &str) {
    let full = format!("{prefix}{key}");
    let neighbour = format!("{prefix}neighbour");
    let valid = !full.is_empty() && full.len() <= k1s0_distributed_lock::MAX_KEY_LEN;
    match lock.try_acquire_shared(&full).await {
        Ok(guard) => {
            assert!(valid, "accepted an invalid key {full:?}");
            assert_eq!(guard.key(), full);
            assert!(lock.is_locked(&full).await.unwrap());
            assert!(!lock.is_locked(&neighbour).await.unwrap());
            expect_already_locked(lock.try_acquire(&full).await, &full).await;
            let second = lock.acquire_shared(&full).await.unwrap();
            guard.release().await.unwrap();
            second.release().await.unwrap();
            assert!(!lock.is_locked(&full).await.unwrap());
        }
        Err(LockError::InvalidKey { .. }) => {
            assert!(!valid, "refused a valid key {full:?}");
            assert!(matches!(
                lock.acquire_shared(&full).await,
                Err(LockError::InvalidKey { .. })
            ));
        }
        Err(other) => panic!("{full:?}: unexpected {other:?}"),
    }
}

/// A second OS process (this test binary, re-run as the child test below) reads and writes a
/// pair of rows under the same key as this one. Readers read one row, then the other, and must
/// see them equal; writers update one, then the other. No update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_keep_a_pair_of_rows_consistent() {
    let prefix = common::unique_prefix("pg_rw_two_processes");
    let key = format!("{prefix}k");
    let pair = Pair::new(&prefix).await;
    let lock = pg_support::lock(config()).await;
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_pair_worker",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_KEY, &key)
        .env(CHILD_ROWS, &prefix)
        .env("DATABASE_URL", common::postgres_url().await)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child process");
    pair_workers(&lock, &key, &pair).await;
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let writes = 2 * PAIR_WRITERS as i64 * PAIR_ROUNDS as i64;
    assert_eq!(pair.first.read().await, writes, "lost updates");
    assert_eq!(pair.second.read().await, writes);
}

/// The other side of `two_processes_keep_a_pair_of_rows_consistent`; run only by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of two_processes_keep_a_pair_of_rows_consistent"]
async fn child_process_pair_worker() {
    let key =
        std::env::var(CHILD_KEY).expect("run by two_processes_keep_a_pair_of_rows_consistent");
    let rows = std::env::var(CHILD_ROWS).unwrap();
    let lock = pg_support::lock(config()).await;
    pair_workers(&lock, &key, &Pair::new(&rows).await).await;
}

const PAIR_READERS: usize = 3;
const PAIR_WRITERS: usize = 2;
const PAIR_ROUNDS: usize = 15;

/// Two counter rows that the writers keep equal.
struct Pair {
    first: PostgresCounter,
    second: PostgresCounter,
}

impl Pair {
    async fn new(prefix: &str) -> Pair {
        let pool = pg_support::pool(4).await;
        Pair {
            first: PostgresCounter::new(pool.clone(), &format!("{prefix}first")).await,
            second: PostgresCounter::new(pool, &format!("{prefix}second")).await,
        }
    }
}

async fn pair_workers(lock: &PostgresDistributedLock, key: &str, pair: &Pair) {
    let mut tasks = Vec::new();
    for task in 0..PAIR_READERS + PAIR_WRITERS {
        let (lock, key) = (lock.clone(), key.to_owned());
        let (first, second) = (pair.first.clone(), pair.second.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..PAIR_ROUNDS {
                if task < PAIR_READERS {
                    let guard = lock.acquire_shared(&key).await.unwrap();
                    let (a, b) = (first.read().await, second.read().await);
                    assert_eq!(a, b, "a reader saw a half-written pair");
                    guard.release().await.unwrap();
                } else {
                    let guard = lock.acquire(&key).await.unwrap();
                    let value = first.read().await;
                    first.write(value + 1).await;
                    second.write(value + 1).await;
                    guard.release().await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Readers of two lock objects try the shared side over and over while a third holds it, and
/// no writer is anywhere: every try gets in. (The statement-scoped check of the writer-waiting
/// mark in one try refuses the same check in a concurrent try; that alone must not count as a
/// waiting writer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shared_tries_with_no_writer_all_get_in() {
    const TRIES: usize = 400;
    let key = key("pg_rw_no_writer");
    let holder = pg_support::lock(config()).await;
    let held = holder.acquire_shared(&key).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let lock = pg_support::lock(config()).await;
        for _ in 0..2 {
            let (lock, key) = (lock.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let mut refused = 0;
                for _ in 0..TRIES {
                    match lock.try_acquire_shared(&key).await {
                        Ok(guard) => guard.release().await.unwrap(),
                        Err(LockError::AlreadyLocked) => refused += 1,
                        Err(other) => panic!("{other:?}"),
                    }
                }
                refused
            }));
        }
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    held.release().await.unwrap();
    assert_eq!(
        refused, 0,
        "{refused} shared tries refused with no writer anywhere"
    );
}

/// A writer waits on the server (its writer-waiting mark set) when its session's connection is
/// terminated and another key's statement on that session finds out: the server dropped the
/// mark with the connection, and the writer sets it again on the new one at its next try, so
/// readers of other processes stay behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_session_was_lost_while_it_waited_marks_the_key_again() {
    let key = key("pg_rw_mark_again");
    let other_key = format!("{key}:other");
    let holder = pg_support::lock(config()).await;
    // Retries far apart, so that the statement about the other key finds the loss first.
    let writers =
        pg_support::one_session_lock(config().retry_interval(Duration::from_secs(2)), |builder| {
            builder
        })
        .await;
    let mut admin = pg_support::admin().await;
    let held = holder.acquire(&key).await.unwrap();
    let writer = tokio::spawn({
        let (writers, key) = (writers.clone(), key.clone());
        async move { writers.acquire(&key).await }
    });
    let pid = pg_support::wait_for_flag(&mut admin, &key, Duration::from_secs(5)).await;
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    pg_support::terminate(&mut admin, pid).await;
    // The session learns of the loss from a statement about another key.
    let _ = writers.is_locked(&other_key).await;
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    held.release().await.unwrap();
    let writer = writer.await.unwrap().unwrap();
    writer.release().await.unwrap();
}

/// A lock object (one session) whose connections resolve `function` (a `CREATE FUNCTION` text
/// for a function of the schema `{schema}`, shadowing one of `pg_catalog`) before PostgreSQL's
/// own: a fault that a real server raises, at a statement of the test's choosing. The schema
/// goes when the returned guard drops.
async fn lock_with_shadowed(
    config: LockConfig,
    function: &str,
) -> (PostgresDistributedLock, pg_support::DropOnExit) {
    let schema = format!("k1s0_fault_{}", uuid::Uuid::new_v4().simple());
    let mut admin = pg_support::admin().await;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let drop_schema = pg_support::DropOnExit::new(vec![format!("DROP SCHEMA {schema} CASCADE")]);
    sqlx::query(&function.replace("{schema}", &schema))
        .execute(&mut admin)
        .await
        .unwrap();
    let options = common::postgres_url()
        .await
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .options([("search_path", format!("{schema},pg_catalog,public"))]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with(options)
        .await
        .unwrap();
    let lock = PostgresDistributedLock::builder(pool, config)
        .sessions(1)
        .build()
        .unwrap();
    (lock, drop_schema)
}

/// Refuses the statement that drops a waiter's marks with "permission denied", an error that
/// leaves the session sound.
const CLEAR_REFUSED: &str = "CREATE FUNCTION {schema}.pg_advisory_unlock_shared(integer, integer) \
     RETURNS boolean LANGUAGE plpgsql AS $body$ BEGIN \
     IF current_query() LIKE 'SELECT CASE WHEN $2 THEN pg_advisory_unlock_shared%' THEN \
     RAISE EXCEPTION 'the test refuses to clear marks' USING ERRCODE = '42501'; END IF; \
     RETURN pg_catalog.pg_advisory_unlock_shared($1, $2); END $body$";

/// A writer gives up its wait while its session cannot drop its writer-waiting mark: the
/// session closes, since a mark left on it would keep the readers of every process out of the
/// key for as long as the connection lives. Its other lock is reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_mark_cannot_be_cleared_closes_its_session() {
    a_mark_that_cannot_be_cleared_closes_its_session(LockMode::Exclusive).await;
}

/// The same for a reader that gave up waiting through a writer's hold: its readers' turn mark
/// would keep the writers of every process out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_mark_cannot_be_cleared_closes_its_session() {
    a_mark_that_cannot_be_cleared_closes_its_session(LockMode::Shared).await;
}

async fn a_mark_that_cannot_be_cleared_closes_its_session(waiter_mode: LockMode) {
    let key = key("pg_rw_stale_mark");
    let (waiters, _schema) = lock_with_shadowed(config(), CLEAR_REFUSED).await;
    let holder = pg_support::lock(config()).await;
    let others = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;

    // The waiters' session holds another key, so it has no reason to close on its own.
    let kept = waiters.acquire(&format!("{key}:other")).await.unwrap();
    let held = holder.acquire(&key).await.unwrap();
    let waiting = tokio::spawn({
        let (waiters, key) = (waiters.clone(), key.clone());
        async move {
            match waiter_mode {
                LockMode::Exclusive => waiters.acquire(&key).await,
                LockMode::Shared => waiters.acquire_shared(&key).await,
            }
        }
    });
    let mark = match waiter_mode {
        LockMode::Exclusive => Mark::WriterWaiting,
        LockMode::Shared => Mark::ReadersTurn,
    };
    pg_support::wait_for_mark(&mut admin, &key, mark, 1, Duration::from_secs(5)).await;
    // Giving up drops the waiter's marks.
    waiting.abort();
    tokio::time::timeout(Duration::from_secs(5), kept.lost())
        .await
        .expect("the session that could not clear its mark is closed");
    assert!(
        pg_support::no_mark_is_left(&mut admin, &key).await,
        "a mark was left"
    );
    held.release().await.unwrap();
    // The other side gets in: no mark of the gone waiter keeps it out.
    let other_side = match waiter_mode {
        LockMode::Exclusive => others.try_acquire_shared(&key).await,
        LockMode::Shared => others.try_acquire(&key).await,
    };
    other_side
        .expect("no waiter is left: the other side gets in")
        .release()
        .await
        .unwrap();
    // The lock object goes on with a new session.
    pg_support::take_and_release(&waiters, &key).await;
}

/// A writer takes the key, but the statement that took it could not drop its writer-waiting
/// mark (the unlock answers "not held" without unlocking) and the clear that follows is refused:
/// the session closes, taking the lock with it, and the writer's `acquire` takes the key again
/// on a new session within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_granted_with_a_mark_it_cannot_clear_takes_the_key_on_a_new_session() {
    let key = key("pg_rw_grant_mark");
    let function = "CREATE FUNCTION {schema}.pg_advisory_unlock_shared(integer, integer) \
         RETURNS boolean LANGUAGE plpgsql AS $body$ BEGIN \
         IF current_query() LIKE 'SELECT CASE WHEN $2 THEN pg_advisory_unlock_shared%' THEN \
         RAISE EXCEPTION 'the test refuses to clear marks' USING ERRCODE = '42501'; END IF; \
         IF current_query() LIKE 'SELECT t.token,%' THEN RETURN false; END IF; \
         RETURN pg_catalog.pg_advisory_unlock_shared($1, $2); END $body$";
    let (writers, _schema) = lock_with_shadowed(config(), function).await;
    let holder = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;

    let kept = writers.acquire(&format!("{key}:other")).await.unwrap();
    let held = holder.acquire(&key).await.unwrap();
    let writer = tokio::spawn({
        let (writers, key) = (writers.clone(), key.clone());
        async move { writers.acquire(&key).await }
    });
    pg_support::wait_for_mark(
        &mut admin,
        &key,
        Mark::WriterWaiting,
        1,
        Duration::from_secs(5),
    )
    .await;
    held.release().await.unwrap();
    let writer = writer
        .await
        .unwrap()
        .expect("the writer takes the key on a new session");
    assert!(kept.is_lost(), "the session with the stale mark was closed");
    assert!(!writer.is_lost());
    assert_eq!(
        pg_support::advisory_locks(&mut admin, &key).await,
        1,
        "the writer holds the key"
    );
    writer.release().await.unwrap();
}

/// The statement that sets a writer's marks fails after it set the writer-waiting mark (here a
/// cancel, as a statement timeout would): the session closes, so that no mark stays on the
/// server unrecorded, keeping the readers of every process out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_set_by_a_failed_statement_does_not_outlive_the_session() {
    let key = key("pg_rw_set_mark_fails");
    let writer_mark = !PostgresDistributedLock::advisory_key(&key);
    let (high, low) = ((writer_mark >> 32) as i32, writer_mark as i32);
    let function = format!(
        "CREATE FUNCTION {{schema}}.pg_try_advisory_lock_shared(integer, integer) \
         RETURNS boolean LANGUAGE plpgsql AS $body$ DECLARE taken boolean; BEGIN \
         taken := pg_catalog.pg_try_advisory_lock_shared($1, $2); \
         IF $1 = {high} AND $2 = {low} THEN \
         RAISE EXCEPTION 'canceled by the test after the try' USING ERRCODE = '57014'; END IF; \
         RETURN taken; END $body$"
    );
    let (writers, _schema) =
        lock_with_shadowed(config().wait_timeout(Duration::from_secs(1)), &function).await;
    let holder = pg_support::lock(config()).await;
    let readers = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;

    let kept = writers.acquire(&format!("{key}:other")).await.unwrap();
    let held = holder.acquire(&key).await.unwrap();
    let result = writers.acquire(&key).await;
    assert!(
        matches!(result, Err(LockError::BackendError(_))),
        "the writer cannot wait marked: {result:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), kept.lost())
        .await
        .expect("the session whose statement failed is closed");
    assert!(
        pg_support::no_mark_is_left(&mut admin, &key).await,
        "a mark was left"
    );
    held.release().await.unwrap();
    readers
        .try_acquire_shared(&key)
        .await
        .expect("no writer waits: a reader gets in")
        .release()
        .await
        .unwrap();
}
