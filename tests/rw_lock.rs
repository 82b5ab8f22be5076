//! Reader-writer locks (`DistributedRwLock`): readers of a key share it, a writer holds it
//! alone; writers are not starved by readers, nor readers by writers; fencing tokens come from
//! the key's one sequence; guards of both sides behave as exclusive ones do.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::poll;

use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, DynDistributedRwLock, InMemoryDistributedLock, LockConfig,
    LockError, LockGuard, LockMode,
};

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

lock_object_tests!(
    readers_share_and_writers_exclude,
    every_guard_draws_from_one_fencing_sequence,
    a_waiting_writer_stops_new_readers,
    readers_waiting_between_writers_go_in_together,
    a_writer_that_leaves_the_line_lets_the_readers_behind_it_in,
    the_other_side_of_a_held_key_waits_like_anyone_else,
    shared_guards_extend_release_and_expire_like_exclusive_ones,
    readers_see_a_consistent_pair_while_writers_update_it,
    a_writer_gets_in_while_readers_keep_overlapping,
    shared_acquires_cancelled_at_every_await_point_leave_nothing_held,
    hostile_keys_lock_exactly_themselves_on_the_shared_side,
);

server_lock_object_tests!(
    readers_of_two_processes_share_and_a_writer_excludes_them,
    a_writer_waiting_in_one_process_stops_new_readers_of_another,
    a_writer_waiting_behind_readers_of_its_own_process_stops_readers_of_another,
    a_writer_gets_in_while_readers_of_other_processes_keep_overlapping,
);

async fn readers_share_and_writers_exclude<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("share");
    let mut readers = Vec::new();
    for _ in 0..8 {
        let reader = lock.try_acquire_shared(&key).await.unwrap();
        assert_eq!(reader.mode(), LockMode::Shared);
        assert_eq!(reader.info().mode(), LockMode::Shared);
        readers.push(reader);
    }
    assert!(lock.is_locked(&key).await.unwrap());
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    let last = readers.pop().unwrap();
    for reader in readers {
        reader.release().await.unwrap();
    }
    // One reader left: still no writer, the key still locked.
    assert!(lock.is_locked(&key).await.unwrap());
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    last.release().await.unwrap();
    assert!(!lock.is_locked(&key).await.unwrap());

    let writer = lock.try_acquire(&key).await.unwrap();
    assert_eq!(writer.mode(), LockMode::Exclusive);
    assert!(matches!(
        lock.try_acquire_shared(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    drop(writer);
    assert!(common::suites::becomes_free(&lock, &key, Duration::from_secs(5)).await);
}

async fn every_guard_draws_from_one_fencing_sequence<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("fencing");
    let mut last = 0;
    for round in 0..4 {
        let first = lock.acquire_shared(&key).await.unwrap();
        let second = lock.acquire_shared(&key).await.unwrap();
        assert!(first.fencing_token() > last, "round {round}");
        assert!(second.fencing_token() > first.fencing_token());
        last = second.fencing_token();
        first.release().await.unwrap();
        second.release().await.unwrap();
        let writer = lock.acquire(&key).await.unwrap();
        assert!(writer.fencing_token() > last);
        last = writer.fencing_token();
        writer.release().await.unwrap();
    }
}

async fn a_waiting_writer_stops_new_readers<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("writer-first");
    let reader = lock.acquire_shared(&key).await.unwrap();
    let writer = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await }
    });
    // Until the writer queues, a new reader still gets in; once it does, none does.
    assert!(
        eventually(Duration::from_secs(5), || async {
            match lock.try_acquire_shared(&key).await {
                Ok(guard) => {
                    guard.release().await.unwrap();
                    false
                }
                Err(LockError::AlreadyLocked) => true,
                Err(other) => panic!("{other:?}"),
            }
        })
        .await,
        "readers kept getting in past a waiting writer"
    );
    let late_reader = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire_shared(&key).await }
    });
    reader.release().await.unwrap();
    let writer = writer.await.unwrap().unwrap();
    assert!(!late_reader.is_finished());
    let writer_token = writer.fencing_token();
    writer.release().await.unwrap();
    let late_reader = late_reader.await.unwrap().unwrap();
    assert!(late_reader.fencing_token() > writer_token);
}

/// W1 holds; R1, R2, W2, R3 queue in that order. W1's release lets R1 and R2 in together; R3
/// waits behind W2.
async fn readers_waiting_between_writers_go_in_together<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("batch");
    let first_writer = lock.acquire(&key).await.unwrap();
    let mut r1 = Box::pin(lock.acquire_shared(&key));
    let mut r2 = Box::pin(lock.acquire_shared(&key));
    let mut w2 = Box::pin(lock.acquire(&key));
    let mut r3 = Box::pin(lock.acquire_shared(&key));
    queue_in_line(r1.as_mut()).await;
    queue_in_line(r2.as_mut()).await;
    queue_in_line(w2.as_mut()).await;
    queue_in_line(r3.as_mut()).await;
    let first_token = first_writer.fencing_token();
    first_writer.release().await.unwrap();
    let (r1, r2) = tokio::join!(r1, r2);
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert!(r1.fencing_token() > first_token && r2.fencing_token() > first_token);
    // R1 and R2 hold together; W2 and R3 still wait.
    assert!(poll!(w2.as_mut()).is_pending());
    assert!(poll!(r3.as_mut()).is_pending());
    r1.release().await.unwrap();
    assert!(
        poll!(w2.as_mut()).is_pending(),
        "a writer got in beside a reader"
    );
    r2.release().await.unwrap();
    let w2 = w2.await.unwrap();
    assert!(
        poll!(r3.as_mut()).is_pending(),
        "a reader got in beside a writer"
    );
    w2.release().await.unwrap();
    r3.await.unwrap().release().await.unwrap();
}

/// Polls a waiting acquire until it holds its place in the key's line (the in-memory backend
/// queues it at the first poll).
async fn queue_in_line<F: Future<Output = Result<LockGuard, LockError>>>(
    waiter: std::pin::Pin<&mut F>,
) {
    assert!(
        poll!(waiter).is_pending(),
        "the key is held: the caller waits"
    );
}

async fn a_writer_that_leaves_the_line_lets_the_readers_behind_it_in<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let key = key("writer-leaves");
    let reader = lock.acquire_shared(&key).await.unwrap();
    let mut writer = Box::pin(lock.acquire(&key));
    queue_in_line(writer.as_mut()).await;
    let mut second_reader = Box::pin(lock.acquire_shared(&key));
    queue_in_line(second_reader.as_mut()).await;
    drop(writer);
    let second_reader = tokio::time::timeout(Duration::from_secs(5), second_reader)
        .await
        .expect("the reader behind a writer that left got in")
        .unwrap();
    assert_eq!(second_reader.mode(), LockMode::Shared);
    reader.release().await.unwrap();
    second_reader.release().await.unwrap();
    assert!(common::suites::becomes_free(&lock, &key, Duration::from_secs(5)).await);
}

async fn the_other_side_of_a_held_key_waits_like_anyone_else<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().wait_timeout(Duration::from_millis(50))).await;
    let key = key("no-upgrade");
    let reader = lock.acquire_shared(&key).await.unwrap();
    assert!(matches!(lock.acquire(&key).await, Err(LockError::Timeout)));
    reader.release().await.unwrap();
    let writer = lock.acquire(&key).await.unwrap();
    assert!(matches!(
        lock.acquire_shared(&key).await,
        Err(LockError::Timeout)
    ));
    writer.release().await.unwrap();
}

async fn shared_guards_extend_release_and_expire_like_exclusive_ones<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config().ttl(Duration::from_millis(200))).await;
    let key = key("lease");
    let short = lock.acquire_shared(&key).await.unwrap();
    let kept = lock.acquire_shared(&key).await.unwrap();
    kept.extend(Duration::from_secs(30)).await.unwrap();
    short.lost().await;
    assert!(short.is_lost());
    assert!(matches!(short.release().await, Err(LockError::LockLost)));
    // The other reader still holds: no writer yet.
    assert!(!kept.is_lost());
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    kept.release().await.unwrap();
    lock.try_acquire(&key)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// Readers check that the two halves of a pair are equal; writers change both halves, with a
/// yield in between. Without exclusion a reader would see the halves differ.
async fn readers_see_a_consistent_pair_while_writers_update_it<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    const READERS: usize = 12;
    const WRITERS: usize = 4;
    const ROUNDS: u64 = 100;
    let key = key("pair");
    let pair = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let readers_inside = Arc::new(AtomicUsize::new(0));
    let most_readers = Arc::new(AtomicUsize::new(0));
    let writer_inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
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
                    tokio::task::yield_now().await;
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
                    tokio::task::yield_now().await;
                    pair.1.store(value + 1, Ordering::SeqCst);
                    writer_inside.store(false, Ordering::SeqCst);
                    guard.release().await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let writes = WRITERS as u64 * ROUNDS;
    assert_eq!(pair.0.load(Ordering::SeqCst), writes, "lost updates");
    assert_eq!(pair.1.load(Ordering::SeqCst), writes);
    assert!(
        most_readers.load(Ordering::SeqCst) >= 2,
        "readers never overlapped"
    );
}

/// 8 readers keep the key read-locked, each holding 20 ms, overlapping; a writer's `acquire`
/// gets in after a few reader holds (the readers that came after it wait), not never.
async fn a_writer_gets_in_while_readers_keep_overlapping<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let during =
        reader_sections_ahead_of_a_writer(std::slice::from_ref(&lock), &lock, "no-starvation")
            .await;
    // Only the readers inside when the writer queued finish before it: at most one section
    // each.
    assert!(
        during <= READERS_OVERLAPPING as u64,
        "{during} reader sections went ahead of a waiting writer"
    );
}

const READERS_OVERLAPPING: usize = 8;

/// Runs `READERS_OVERLAPPING` readers spread over `processes`, each holding the key 20 ms in a
/// loop, overlapping; once they are going, `writer` acquires the key. Returns how many reader
/// sections ended between the writer's call and its getting in.
async fn reader_sections_ahead_of_a_writer<L: DistributedRwLock + Clone>(
    processes: &[L],
    writer: &L,
    test: &str,
) -> u64 {
    let key = key(test);
    let stop = Arc::new(AtomicBool::new(false));
    let sections = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for index in 0..READERS_OVERLAPPING {
        let (lock, key, stop, sections) = (
            processes[index % processes.len()].clone(),
            key.clone(),
            Arc::clone(&stop),
            Arc::clone(&sections),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let guard = lock.acquire_shared(&key).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                sections.fetch_add(1, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        }));
    }
    // The readers are going when they have read a few times.
    assert!(
        eventually(Duration::from_secs(5), || async {
            sections.load(Ordering::SeqCst) >= READERS_OVERLAPPING as u64
        })
        .await
    );
    let before = sections.load(Ordering::SeqCst);
    let guard = writer.acquire(&key).await.expect("the writer got in");
    let during = sections.load(Ordering::SeqCst) - before;
    guard.release().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }
    during
}

/// `try_acquire_shared` and `acquire_shared` (of a free key, and of a key a writer holds)
/// dropped at each of their await points leave the key free again at once, and the lock
/// object usable.
async fn shared_acquires_cancelled_at_every_await_point_leave_nothing_held<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    use common::cancel::drop_at_suspension;
    use common::suites::{becomes_free, FREE_AGAIN_WITHIN};

    let lock = make_lock(config().wait_timeout(Duration::from_millis(300))).await;
    let prefix = key("cancel-shared");
    for waits in [false, true] {
        for n in 1.. {
            let key = format!("{prefix}:{waits}:{n}");
            let acquire = async {
                if waits {
                    lock.acquire_shared(&key).await
                } else {
                    lock.try_acquire_shared(&key).await
                }
            };
            match drop_at_suspension(acquire, n).await {
                Some(guard) => {
                    drop(guard.expect("a free key"));
                    break;
                }
                None => assert!(
                    becomes_free(&lock, &key, FREE_AGAIN_WITHIN).await,
                    "a shared acquire (waits: {waits}) cancelled at await point {n} left the key locked"
                ),
            }
        }
    }
    let key = format!("{prefix}:contended");
    for n in 1..=12 {
        let writer = lock.try_acquire(&key).await.expect("free key");
        let waited = drop_at_suspension(lock.acquire_shared(&key), n).await;
        writer.release().await.unwrap();
        assert!(
            becomes_free(&lock, &key, FREE_AGAIN_WITHIN).await,
            "a reader cancelled at await point {n} kept the key locked"
        );
        match waited {
            None => {}
            Some(Err(LockError::Timeout)) => break,
            Some(other) => panic!("a reader of a written key ended with {other:?}"),
        }
    }
    let writer = lock.try_acquire(&key).await.expect("still usable");
    writer.release().await.unwrap();
}

/// Keys with braces, percent signs, quotes, Lua and SQL text, control and non-ASCII
/// characters, and the shared tokens' own prefix lock exactly themselves on the shared side;
/// an empty key and one too long are refused and change nothing.
async fn hostile_keys_lock_exactly_themselves_on_the_shared_side<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let lock = make_lock(config()).await;
    let prefix = key("hostile-shared");
    let neighbour = format!("{prefix}neighbour");
    let odd = [
        "{",
        "}",
        "{x}",
        "a}b{c",
        "%",
        "%7B",
        "s:",
        "s:x",
        "'; DROP TABLE t; --",
        "redis.call('FLUSHALL')",
        "\\0\\n",
        "\u{0}",
        "\n\r\t",
        "日本 *",
        "$1",
    ];
    for tail in odd {
        let key = format!("{prefix}{tail}");
        let first = lock.try_acquire_shared(&key).await.unwrap();
        let second = lock.acquire_shared(&key).await.unwrap();
        assert_eq!(first.key(), key);
        assert!(lock.is_locked(&key).await.unwrap());
        assert!(
            !lock.is_locked(&neighbour).await.unwrap(),
            "{key:?} locked its neighbour"
        );
        assert!(matches!(
            lock.try_acquire(&key).await,
            Err(LockError::AlreadyLocked)
        ));
        first.release().await.unwrap();
        second.release().await.unwrap();
        assert!(
            !lock.is_locked(&key).await.unwrap(),
            "{key:?} stayed locked"
        );
    }
    let too_long = "k".repeat(k1s0_distributed_lock::MAX_KEY_LEN + 1);
    for bad in [String::new(), too_long] {
        assert!(matches!(
            lock.try_acquire_shared(&bad).await,
            Err(LockError::InvalidKey { .. })
        ));
        assert!(matches!(
            lock.acquire_shared(&bad).await,
            Err(LockError::InvalidKey { .. })
        ));
    }
}

/// Readers of two processes hold one key together; a writer of either process is kept out
/// until the last reader of both has gone, and then keeps out the readers of both.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
async fn readers_of_two_processes_share_and_a_writer_excludes_them<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let (one, other) = (make_lock(config()).await, make_lock(config()).await);
    let key = key("two-processes");
    let reader = one.acquire_shared(&key).await.unwrap();
    let other_reader = other.acquire_shared(&key).await.unwrap();
    for lock in [&one, &other] {
        assert!(matches!(
            lock.try_acquire(&key).await,
            Err(LockError::AlreadyLocked)
        ));
    }
    reader.release().await.unwrap();
    assert!(matches!(
        one.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    other_reader.release().await.unwrap();
    let writer = one.acquire(&key).await.unwrap();
    for lock in [&one, &other] {
        assert!(matches!(
            lock.try_acquire_shared(&key).await,
            Err(LockError::AlreadyLocked)
        ));
    }
    let waiting_reader = tokio::spawn({
        let (other, key) = (other.clone(), key.clone());
        async move { other.acquire_shared(&key).await }
    });
    let writer_token = writer.fencing_token();
    writer.release().await.unwrap();
    let reader = waiting_reader.await.unwrap().unwrap();
    assert!(reader.fencing_token() > writer_token);
    reader.release().await.unwrap();
}

/// A writer of one process waits behind a reader; from then on readers of another process are
/// kept out (`try_acquire_shared` answers `AlreadyLocked`, `acquire_shared` waits), and the
/// writer goes in when the reader leaves, before them.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
async fn a_writer_waiting_in_one_process_stops_new_readers_of_another<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    a_waiting_writer_keeps_out_readers_of_another_process(make_lock, false).await;
}

/// The same with the writer waiting behind a reader of its own process.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
async fn a_writer_waiting_behind_readers_of_its_own_process_stops_readers_of_another<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    a_waiting_writer_keeps_out_readers_of_another_process(make_lock, true).await;
}

/// A reader of one process holds the key; a writer waits for it, in that process
/// (`behind_its_own_reader`) or in a second one; readers of the process the writer is not in
/// are then kept out, and the writer goes in before them once the reader leaves.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
async fn a_waiting_writer_keeps_out_readers_of_another_process<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
    behind_its_own_reader: bool,
) {
    let (first, second) = (make_lock(config()).await, make_lock(config()).await);
    let key = key("writer-first-across");
    let reader = first.acquire_shared(&key).await.unwrap();
    let (writers, others) = if behind_its_own_reader {
        (first, second)
    } else {
        (second, first)
    };
    let writer = tokio::spawn({
        let (writers, key) = (writers.clone(), key.clone());
        async move { writers.acquire(&key).await }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            match others.try_acquire_shared(&key).await {
                Ok(guard) => {
                    guard.release().await.unwrap();
                    false
                }
                Err(LockError::AlreadyLocked) => true,
                Err(other) => panic!("{other:?}"),
            }
        })
        .await,
        "readers of another process kept getting in past a waiting writer"
    );
    let late_reader = tokio::spawn({
        let (others, key) = (others.clone(), key.clone());
        async move { others.acquire_shared(&key).await }
    });
    reader.release().await.unwrap();
    let writer = writer.await.unwrap().unwrap();
    assert!(
        !late_reader.is_finished(),
        "a reader got in beside the writer"
    );
    let writer_token = writer.fencing_token();
    writer.release().await.unwrap();
    let late_reader = late_reader.await.unwrap().unwrap();
    assert!(late_reader.fencing_token() > writer_token);
    late_reader.release().await.unwrap();
}

/// 8 readers on 4 processes keep the key read-locked, each holding 20 ms, overlapping; a
/// writer of a fifth process gets in after a few reader holds, not never.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
async fn a_writer_gets_in_while_readers_of_other_processes_keep_overlapping<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let mut processes = Vec::new();
    for _ in 0..4 {
        processes.push(make_lock(config()).await);
    }
    let writers = make_lock(config()).await;
    let during =
        reader_sections_ahead_of_a_writer(&processes, &writers, "no-starvation-across").await;
    // The readers inside when the writer queued finish before it, and those on their way in
    // (between their release and their next acquire), while the writer's first look and its
    // mark reach the server: a few sections each at most (a starved writer sees hundreds).
    assert!(
        during <= 3 * READERS_OVERLAPPING as u64,
        "{during} reader sections went ahead of a waiting writer"
    );
}

#[tokio::test]
async fn a_dyn_lock_offers_the_shared_side() {
    let lock: Arc<dyn DynDistributedRwLock> = Arc::new(InMemoryDistributedLock::new(config()));
    let key = key("dyn");
    let first = lock.try_acquire_shared(&key).await.unwrap();
    let second = lock.acquire_shared(&key).await.unwrap();
    assert_eq!(second.mode(), LockMode::Shared);
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    lock.release(first).await.unwrap();
    lock.release(second).await.unwrap();
    assert!(!lock.is_locked(&key).await.unwrap());
}

/// W1 holds; R1, R2, W2 and R3, each of a process of its own, queue in the Redis line in that
/// order. W1's release lets R1 and R2 in together; W2 goes in once both are gone, and R3 only
/// after W2.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_between_writers_of_other_processes_go_in_together_on_redis() {
    use k1s0_distributed_lock::bb8_redis::redis::AsyncCommands;

    let make = || common::redis_conn::rw_lock(config());
    let (first_writer, r1, r2, w2, r3) = (
        make().await,
        make().await,
        make().await,
        make().await,
        make().await,
    );
    let key = key("batch-across");
    let url = common::redis_url().await;
    let mut conn = common::redis_conn::connection(&url).await;
    let line = format!("{}:line", first_writer.redis_key(&key));

    let holder = first_writer.acquire(&key).await.unwrap();
    let mut waiting = Vec::new();
    for (place, lock) in [r1, r2, w2, r3].into_iter().enumerate() {
        let key = key.clone();
        waiting.push(tokio::spawn(async move {
            if place == 2 {
                lock.acquire(&key).await
            } else {
                lock.acquire_shared(&key).await
            }
        }));
        assert!(
            eventually(Duration::from_secs(5), || {
                let (mut conn, line) = (conn.clone(), line.clone());
                async move { conn.zcard::<_, usize>(&line).await.unwrap() == place + 1 }
            })
            .await,
            "waiter {place} never queued"
        );
    }
    let mut waiting = waiting.into_iter();
    let (r1, r2, w2, r3) = (
        waiting.next().unwrap(),
        waiting.next().unwrap(),
        waiting.next().unwrap(),
        waiting.next().unwrap(),
    );
    holder.release().await.unwrap();
    let (r1, r2) = (r1.await.unwrap().unwrap(), r2.await.unwrap().unwrap());
    assert!(!w2.is_finished() && !r3.is_finished());
    r1.release().await.unwrap();
    assert!(!w2.is_finished(), "a writer got in beside a reader");
    r2.release().await.unwrap();
    let w2 = w2.await.unwrap().unwrap();
    assert!(!r3.is_finished(), "a reader got in beside a writer");
    let w2_token = w2.fencing_token();
    w2.release().await.unwrap();
    let r3 = r3.await.unwrap().unwrap();
    assert!(r3.fencing_token() > w2_token);
    r3.release().await.unwrap();
    let _: () = conn.del(&line).await.unwrap();
}
