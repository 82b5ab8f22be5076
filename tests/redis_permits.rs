//! Permits (`DistributedSemaphore`) on Redis: never more holders than the limit, across lock
//! objects; waiters go in first in, first out, woken by the release rather than by polling; a
//! crashed holder's permit comes back at the end of its lease; cancelled acquires leave
//! nothing behind; hostile keys hold exactly their own permits; permits and locks of one key
//! do not meet; each caller checks its own limit; permits extend and are lost like locks.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::{
    AutoExtend, DistributedLock, DistributedRwLock, DistributedSemaphore, LockConfig, LockError,
    LockMode, RedisDistributedLock,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use common::cancel::drop_at_suspension;
use common::wait::{assert_eventually, eventually};

/// A TTL far beyond the tests' holds, a short retry interval, a generous waiting budget.
fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(10))
        .wait_timeout(Duration::from_secs(10))
}

/// The longest retry interval a waiter honours (500 ms): a subscribed waiter then looks on its
/// own only every 750 … 1,000 ms, so a waiter that gets in sooner was told.
fn rarely_polling() -> LockConfig {
    config()
        .retry_interval(Duration::from_secs(1))
        .wait_timeout(Duration::from_secs(20))
}

fn key(test: &str) -> String {
    format!("{}k", common::unique_prefix(test))
}

/// A lock object of its own (a pool and a pub/sub connection of its own: a process).
async fn lock_object(config: LockConfig) -> RedisDistributedLock {
    common::redis_conn::rw_lock(config).await
}

async fn admin() -> MultiplexedConnection {
    common::redis_conn::connection(&common::redis_url().await).await
}

/// `P{E}:permits<suffix>` of `key` (`""`, `":line"`, `":waiters"`).
fn permit_name(lock: &RedisDistributedLock, key: &str, suffix: &str) -> String {
    format!("{}:permits{suffix}", lock.redis_key(key))
}

/// How many waiters the permits' line of `key` holds.
async fn line_length(admin: &MultiplexedConnection, lock: &RedisDistributedLock, key: &str) -> u64 {
    redis::cmd("ZCARD")
        .arg(permit_name(lock, key, ":line"))
        .query_async(&mut admin.clone())
        .await
        .unwrap()
}

/// The deadlines (server time, ms) of the places in the permits' line of `key`, first place
/// first: each look of a waiter moves its own on.
async fn place_deadlines(
    admin: &MultiplexedConnection,
    lock: &RedisDistributedLock,
    key: &str,
) -> Vec<i64> {
    let places: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(permit_name(lock, key, ":waiters"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut admin.clone())
        .await
        .unwrap();
    places.into_iter().map(|(_, deadline)| deadline).collect()
}

/// How many waiters of `key` hold a place longer than one that polls with
/// [`rarely_polling`] keeps (3 × 500 ms + 200 ms): a subscribed waiter's, which relies on the
/// release message.
async fn long_places(
    admin: &MultiplexedConnection,
    lock: &RedisDistributedLock,
    key: &str,
) -> usize {
    let (seconds, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut admin.clone())
        .await
        .unwrap();
    let now = seconds * 1000 + micros / 1000;
    place_deadlines(admin, lock, key)
        .await
        .into_iter()
        .filter(|&deadline| deadline > now + 1_700)
        .count()
}

/// How many of the names in `names` exist.
async fn existing(admin: &MultiplexedConnection, names: &[String]) -> u64 {
    redis::cmd("EXISTS")
        .arg(names)
        .query_async(&mut admin.clone())
        .await
        .unwrap()
}

/// Whether `key` has no permit held and nobody in its permits' line, within 100 ms.
async fn nothing_left(
    admin: &MultiplexedConnection,
    lock: &RedisDistributedLock,
    key: &str,
) -> bool {
    let names = [
        permit_name(lock, key, ""),
        permit_name(lock, key, ":line"),
        permit_name(lock, key, ":waiters"),
    ];
    eventually(common::suites::FREE_AGAIN_WITHIN, || async {
        lock.permits_held(key).await.unwrap() == 0 && existing(admin, &names).await == 0
    })
    .await
}

/// 16 tasks over two lock objects take permits of one key with limit 3 over and over: at no
/// moment do more than 3 hold one (counted by the tasks themselves, inside their hold, and by
/// `permits_held`), and 3 do at times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_the_limit_hold_permits() {
    const LIMIT: u32 = 3;
    const TASKS: usize = 16;
    const ROUNDS: usize = 12;
    let objects = [lock_object(config()).await, lock_object(config()).await];
    let key = key("permits-limit");
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let lock = objects[task % 2].clone();
            let (key, in_flight, most) = (key.clone(), in_flight.clone(), most.clone());
            tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let permit = lock.acquire_permit(&key, LIMIT).await.unwrap();
                    assert_eq!(permit.mode(), LockMode::Shared);
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    permit.release().await.unwrap();
                }
            })
        })
        .collect();
    let watcher = tokio::spawn({
        let (lock, key) = (objects[0].clone(), key.clone());
        async move {
            let mut most_held = 0;
            for _ in 0..200 {
                most_held = most_held.max(lock.permits_held(&key).await.unwrap());
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            most_held
        }
    });
    for task in tasks {
        task.await.unwrap();
    }
    let most_held = watcher.await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(most <= LIMIT as usize, "{most} tasks held a permit at once");
    assert_eq!(most, LIMIT as usize, "the limit was never reached");
    assert!(most_held <= LIMIT, "permits_held said {most_held}");
    assert_eq!(objects[0].permits_held(&key).await.unwrap(), 0);
}

/// Two permits held, four waiters queued in turn over two lock objects that look on their own
/// only about once a second: each release lets the first waiter in within 150 ms, in the order
/// they queued, and two permits released together let the next two in together (the first
/// woken tells the next as it goes in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_permits_wake_waiters_first_in_first_out() {
    const LIMIT: u32 = 2;
    const WOKEN_WITHIN: Duration = Duration::from_millis(150);
    let holder = lock_object(rarely_polling()).await;
    let objects = [
        lock_object(rarely_polling()).await,
        lock_object(rarely_polling()).await,
    ];
    let admin = admin().await;
    let key = key("permits-fifo");
    let first = holder.try_acquire_permit(&key, LIMIT).await.unwrap();
    let second = holder.try_acquire_permit(&key, LIMIT).await.unwrap();

    let (entered, mut entries) = mpsc::unbounded_channel();
    let mut let_go = Vec::new();
    for waiter in 0..4u64 {
        let (go, gone) = oneshot::channel::<()>();
        let_go.push(go);
        tokio::spawn({
            let lock = objects[waiter as usize % 2].clone();
            let (key, entered) = (key.clone(), entered.clone());
            async move {
                let permit = lock.acquire_permit(&key, LIMIT).await.unwrap();
                entered.send((waiter, Instant::now())).unwrap();
                let _ = gone.await;
                permit.release().await.unwrap();
            }
        });
        assert_eventually("the waiter queued", || async {
            line_length(&admin, &holder, &key).await == waiter + 1
        })
        .await;
    }
    // Every waiter's channel subscribed, and its next look (with the long place) made.
    assert_eventually("the waiters subscribed", || async {
        common::redis_conn::subscribed_waiters(&admin, &permit_name(&holder, &key, "")).await == 4
    })
    .await;
    assert_eventually("the waiters rely on the release message", || async {
        long_places(&admin, &holder, &key).await == 4
    })
    .await;
    assert!(
        entries.try_recv().is_err(),
        "a waiter got in past the limit"
    );

    let mut next_in = async |released_at: Instant| {
        let (waiter, at) = tokio::time::timeout(Duration::from_secs(3), entries.recv())
            .await
            .expect("a waiter got in")
            .unwrap();
        (waiter, at - released_at)
    };
    for (released, expected) in [(first, 0), (second, 1)] {
        let released_at = Instant::now();
        released.release().await.unwrap();
        let (waiter, after) = next_in(released_at).await;
        assert_eq!(waiter, expected, "waiters went in out of order");
        assert!(
            after < WOKEN_WITHIN,
            "waiter {waiter} got in {after:?} after the release"
        );
    }
    // Waiters 0 and 1 give their permits back together.
    let released_at = Instant::now();
    for go in let_go.drain(..2) {
        go.send(()).unwrap();
    }
    for expected in [2, 3] {
        let (waiter, after) = next_in(released_at).await;
        assert_eq!(waiter, expected, "waiters went in out of order");
        assert!(
            after < WOKEN_WITHIN,
            "waiter {waiter} got in {after:?} after the release"
        );
    }
    for go in let_go {
        go.send(()).unwrap();
    }
    assert!(nothing_left(&admin, &holder, &key).await);
}

/// A holder that never gives its permit back (its guard forgotten, its lock object dropped: a
/// process that died) keeps it until its TTL, and no longer: the waiter first in line looks
/// again when that lease ends. (Its own looks come at about 0, 750 … 1,000 and 1,500 …
/// 2,000 ms: the 1.3 s lease ends between two of them.) The guard, where it can still be
/// seen, says it is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_permit_comes_back_at_its_ttl() {
    const TTL: Duration = Duration::from_millis(1_300);
    let key = key("permits-crash");
    let dying = lock_object(rarely_polling().ttl(TTL)).await;
    let taken_at = Instant::now();
    let crashed = dying.try_acquire_permit(&key, 1).await.unwrap();
    let lost = crashed.lost();
    std::mem::forget(crashed);
    drop(dying);

    let waiter = lock_object(rarely_polling()).await;
    let permit = waiter.acquire_permit(&key, 1).await.unwrap();
    let after = taken_at.elapsed();
    assert!(
        after >= TTL - Duration::from_millis(50),
        "in after {after:?}: the crashed holder's lease was cut short"
    );
    assert!(
        after < TTL + Duration::from_millis(150),
        "in after {after:?}: the waiter did not look again when the lease ended"
    );
    // The forgotten guard's lease ran out: its `lost()` says so.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), lost)
            .await
            .is_ok(),
        "the crashed holder's guard was not told it lost its permit"
    );
    assert_eq!(waiter.permits_held(&key).await.unwrap(), 1);
    permit.release().await.unwrap();
    assert!(nothing_left(&admin().await, &waiter, &key).await);
}

/// `acquire_permit` and `try_acquire_permit` dropped at each of their await points, on a free
/// key and behind a holder: no permit stays held, and no place in line stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_acquires_cancelled_at_every_await_point_leave_nothing_held() {
    let lock = lock_object(config().wait_timeout(Duration::from_millis(300))).await;
    let admin = admin().await;
    let prefix = key("permits-cancel");
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
            if let Some(permit) = drop_at_suspension(acquire, n).await {
                permit.expect("a free key").release().await.unwrap();
                break;
            }
            assert!(
                nothing_left(&admin, &lock, &key).await,
                "an acquire (waits: {waits}) cancelled at await point {n} left something behind"
            );
        }
    }
    let key = format!("{prefix}:contended");
    for n in 1..=12 {
        let holder = lock.try_acquire_permit(&key, 1).await.expect("a free key");
        let waited = drop_at_suspension(lock.acquire_permit(&key, 1), n).await;
        holder.release().await.unwrap();
        assert!(
            nothing_left(&admin, &lock, &key).await,
            "a waiter cancelled at await point {n} kept a permit or its place"
        );
        match waited {
            None => {}
            Some(Err(LockError::Timeout)) => break,
            Some(other) => panic!("a waiter for a held permit ended with {other:?}"),
        }
    }
    let permit = lock
        .try_acquire_permit(&key, 1)
        .await
        .expect("still usable");
    permit.release().await.unwrap();
}

/// An acquire dropped after its script ran in Redis but before the answer came back (through
/// a proxy that delays every chunk by 100 ms: the script runs at about 100 ms, its answer
/// would arrive at about 200 ms, the drop comes at 150 ms): the permit it took is given back,
/// and a waiter's place is given up, by the clean-up sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_acquires_dropped_after_their_script_ran_leave_nothing_held() {
    use common::backends::Backend;
    use common::proxy::FaultProxy;

    const LATENCY: Duration = Duration::from_millis(100);
    let url = common::redis_url().await;
    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    // Places in line that live 1.7 s: only the clean-up removes one within a second.
    let slow = common::redis_conn::lock_builder(&format!("redis://{}", proxy.address()), &url)
        .await
        .config(rarely_polling())
        .key_prefix("k1s0test:")
        .build()
        .unwrap();
    let direct = lock_object(config()).await;
    let admin = admin().await;
    let prefix = key("permits-dropped");
    // The slow lock object's connection is open before the delay starts.
    slow.permits_held(&prefix).await.unwrap();
    proxy.set_latency(LATENCY);
    let gone_within = Duration::from_secs(1);
    for waits in [false, true] {
        let key = format!("{prefix}:{waits}");
        let acquire = async {
            if waits {
                slow.acquire_permit(&key, 1).await
            } else {
                slow.try_acquire_permit(&key, 1).await
            }
        };
        let dropped = tokio::time::timeout(LATENCY * 3 / 2, acquire).await;
        assert!(
            dropped.is_err(),
            "the acquire finished before it was dropped"
        );
        let held_meanwhile = direct.permits_held(&key).await.unwrap();
        assert!(
            eventually(gone_within, || async {
                direct.permits_held(&key).await.unwrap() == 0
            })
            .await,
            "an acquire (waits: {waits}) dropped after its script ran kept its permit \
             (held when dropped: {held_meanwhile})"
        );
    }
    let key = format!("{prefix}:contended");
    let holder = direct.try_acquire_permit(&key, 1).await.unwrap();
    let dropped = tokio::time::timeout(LATENCY * 3 / 2, slow.acquire_permit(&key, 1)).await;
    assert!(
        dropped.is_err(),
        "the waiter finished before it was dropped"
    );
    assert!(
        eventually(gone_within, || async {
            line_length(&admin, &direct, &key).await == 0
        })
        .await,
        "a waiter dropped after its script ran kept its place"
    );
    holder.release().await.unwrap();
    assert!(nothing_left(&admin, &direct, &key).await);
}

/// Keys with braces, percent signs, quotes, Lua and SQL text, control and non-ASCII characters
/// and the shared tokens' own prefix hold exactly their own permits (pairs that a careless
/// escaping would merge included), and any key from the hostile strategy either does so or is
/// refused, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_hold_exactly_their_own_permits() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    let lock = lock_object(config()).await;
    let prefix = key("permits-hostile");
    let odd = [
        "{",
        "%7B",
        "}",
        "%7D",
        "%",
        "%25",
        "{x}",
        "a}b{c",
        "s:",
        "s:x",
        "'; DROP TABLE t; --",
        "]] redis.call('FLUSHALL') --[[",
        "\\0\\n",
        "\u{0}",
        "\n\r\t",
        "日本 *",
        "$1",
        ":permits",
    ];
    let mut runner = TestRunner::deterministic();
    let generated: Vec<String> = (0..48)
        .map(|_| {
            common::hostile::hostile_key()
                .new_tree(&mut runner)
                .unwrap()
                .current()
        })
        .collect();
    let all_odd: Vec<String> = odd.iter().map(|tail| format!("{prefix}{tail}")).collect();
    let generated: Vec<String> = generated
        .iter()
        .map(|tail| format!("{prefix}{tail}"))
        .collect();
    for key in all_odd.iter().chain(&generated) {
        let valid = !key.is_empty() && key.len() <= k1s0_distributed_lock::MAX_KEY_LEN;
        match lock.try_acquire_permit(key, 1).await {
            Ok(permit) => {
                assert!(valid, "accepted an invalid key {key:?}");
                assert_eq!(permit.key(), key);
                assert_eq!(lock.permits_held(key).await.unwrap(), 1);
                for other in all_odd.iter().filter(|other| *other != key) {
                    assert_eq!(
                        lock.permits_held(other).await.unwrap(),
                        0,
                        "a permit of {key:?} counts for {other:?}"
                    );
                }
                assert!(matches!(
                    lock.try_acquire_permit(key, 1).await,
                    Err(LockError::AlreadyLocked)
                ));
                assert!(
                    !lock.is_locked(key).await.unwrap(),
                    "{key:?}: a permit locked the key"
                );
                permit.release().await.unwrap();
                assert_eq!(lock.permits_held(key).await.unwrap(), 0);
            }
            Err(LockError::InvalidKey { .. }) => {
                assert!(!valid, "refused a valid key {key:?}");
                assert!(matches!(
                    lock.acquire_permit(key, 1).await,
                    Err(LockError::InvalidKey { .. })
                ));
                assert!(matches!(
                    lock.permits_held(key).await,
                    Err(LockError::InvalidKey { .. })
                ));
            }
            Err(other) => panic!("{key:?}: unexpected {other:?}"),
        }
    }
}

/// A key's permits and its lock are namespaces of their own: permits are taken while the key
/// is locked (either side) and the lock while every permit is taken; a writer waiting for the
/// lock does not stop permits, nor a waiter for a permit the lock. Fencing tokens of both come
/// from the key's one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_and_locks_of_one_key_do_not_conflict() {
    let lock = lock_object(config()).await;
    let other = lock_object(config()).await;
    let key = key("permits-namespace");

    let writer = lock.try_acquire(&key).await.unwrap();
    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    assert!(permit.fencing_token() > writer.fencing_token());
    assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
    // Every permit taken: the lock still has its own holder, and after it a reader gets in.
    writer.release().await.unwrap();
    assert!(
        !lock.is_locked(&key).await.unwrap(),
        "a permit locked the key"
    );
    let reader = lock.try_acquire_shared(&key).await.unwrap();
    assert!(reader.fencing_token() > permit.fencing_token());

    // A writer of another lock object waits behind the reader; a waiter for a permit waits
    // behind the permit. Neither line holds up the other side.
    let waiting_writer = tokio::spawn({
        let (other, key) = (other.clone(), key.clone());
        async move { other.acquire(&key).await }
    });
    let waiting_permit = tokio::spawn({
        let (other, key) = (other.clone(), key.clone());
        async move { other.acquire_permit(&key, 1).await }
    });
    let admin = admin().await;
    assert_eventually("both wait in their lines", || async {
        let writers: u64 = redis::cmd("ZCARD")
            .arg(format!("{}:line", lock.redis_key(&key)))
            .query_async(&mut admin.clone())
            .await
            .unwrap();
        writers == 1 && line_length(&admin, &lock, &key).await == 1
    })
    .await;
    // The waiting permit counts: room for a try only with limit 3.
    assert!(matches!(
        lock.try_acquire_permit(&key, 2).await,
        Err(LockError::AlreadyLocked)
    ));
    let second_permit = lock.try_acquire_permit(&key, 3).await.unwrap();
    assert!(matches!(
        lock.try_acquire_shared(&key).await,
        Err(LockError::AlreadyLocked)
    ));

    reader.release().await.unwrap();
    let writer = waiting_writer.await.unwrap().unwrap();
    assert_eq!(lock.permits_held(&key).await.unwrap(), 2);
    permit.release().await.unwrap();
    second_permit.release().await.unwrap();
    let third = waiting_permit.await.unwrap().unwrap();
    assert!(third.fencing_token() > writer.fencing_token());
    assert!(lock.is_locked(&key).await.unwrap());
    writer.release().await.unwrap();
    third.release().await.unwrap();
    assert!(nothing_left(&admin, &lock, &key).await);
    assert!(!lock.is_locked(&key).await.unwrap());
}

/// A limit of 0 is `InvalidConfig` from both acquires, before anything is sent: no key, line or
/// fencing counter appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_zero_is_refused_and_writes_nothing() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("permits-zero");
    let lock = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(config())
        .key_prefix(prefix.as_str())
        .build()
        .unwrap();
    let busy = lock.try_acquire_permit("busy", 1).await.unwrap();
    for key in ["free", "busy"] {
        assert!(matches!(
            lock.try_acquire_permit(key, 0).await,
            Err(LockError::InvalidConfig { .. })
        ));
        assert!(matches!(
            lock.acquire_permit(key, 0).await,
            Err(LockError::InvalidConfig { .. })
        ));
    }
    let mut names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut admin().await)
        .await
        .unwrap();
    names.sort();
    let busy_key = lock.redis_key("busy");
    assert_eq!(
        names,
        [format!("{busy_key}:fence"), format!("{busy_key}:permits")]
    );
    busy.release().await.unwrap();
}

/// Each caller checks its own limit against the permits held at that moment: with 2 held, a
/// caller with limit 2 is refused while one with limit 3 gets in; a waiter with limit 3 goes
/// in when one of 4 permits comes back, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_checks_its_own_limit() {
    let lock = lock_object(config()).await;
    let key = key("permits-limits");
    let mut held = vec![
        lock.try_acquire_permit(&key, 5).await.unwrap(),
        lock.try_acquire_permit(&key, 5).await.unwrap(),
    ];
    assert!(matches!(
        lock.try_acquire_permit(&key, 2).await,
        Err(LockError::AlreadyLocked)
    ));
    held.push(lock.try_acquire_permit(&key, 3).await.unwrap());
    assert!(matches!(
        lock.try_acquire_permit(&key, 3).await,
        Err(LockError::AlreadyLocked)
    ));
    held.push(lock.try_acquire_permit(&key, 5).await.unwrap());
    assert_eq!(lock.permits_held(&key).await.unwrap(), 4);

    let waiter = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire_permit(&key, 3).await }
    });
    let admin = admin().await;
    assert_eventually("the waiter queued", || async {
        line_length(&admin, &lock, &key).await == 1
    })
    .await;
    // 4 held: the waiter with limit 3 stays out when one comes back (it looks again, woken by
    // the release, and is refused), and goes in at the next.
    let place = place_deadlines(&admin, &lock, &key).await;
    held.pop().unwrap().release().await.unwrap();
    assert_eventually("the waiter looked again after the release", || async {
        place_deadlines(&admin, &lock, &key).await != place
    })
    .await;
    assert!(
        !waiter.is_finished(),
        "a caller with limit 3 got in beside 3 holders"
    );
    held.pop().unwrap().release().await.unwrap();
    let permit = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the waiter got in once 2 were held")
        .unwrap()
        .unwrap();
    assert_eq!(lock.permits_held(&key).await.unwrap(), 3);
    permit.release().await.unwrap();
    for permit in held {
        permit.release().await.unwrap();
    }
}

/// A permit is a lease like a lock: extending it keeps it past its TTL, the watchdog keeps it
/// as long as it lives, and one that ran out is lost (its guard says so, and its extend and
/// release answer `LockLost` without touching the permit that took its place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_extend_and_are_lost_like_locks() {
    const TTL: Duration = Duration::from_millis(400);
    let lock = lock_object(config().ttl(TTL)).await;
    let key = key("permits-lease");

    let permit = lock.try_acquire_permit(&key, 1).await.unwrap();
    assert!(permit.remaining().unwrap() <= TTL);
    permit.extend(Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    assert!(!permit.is_lost());
    assert_eq!(
        lock.permits_held(&key).await.unwrap(),
        1,
        "the extension did not reach Redis"
    );
    assert!(matches!(
        lock.try_acquire_permit(&key, 1).await,
        Err(LockError::AlreadyLocked)
    ));
    permit.release().await.unwrap();

    // Not renewed: lost at its TTL. Its extend and release answer `LockLost`, both while its
    // ended lease is still in the holders' set and after the next acquire dropped it, and
    // leave the next holder's permit alone.
    let stale = [
        lock.try_acquire_permit(&key, 2).await.unwrap(),
        lock.try_acquire_permit(&key, 2).await.unwrap(),
    ];
    let lost = stale[1].lost();
    tokio::time::timeout(TTL * 2, lost)
        .await
        .expect("lost at its TTL");
    assert!(stale.iter().all(|permit| permit.is_lost()));
    // The server's lease ends a little after the guard's (counted from when it was sent).
    assert_eventually("the server's leases end", || async {
        lock.permits_held(&key).await.unwrap() == 0
    })
    .await;
    let [ended, stale] = stale;
    assert!(matches!(
        ended.extend(Duration::from_secs(5)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(ended.release().await, Err(LockError::LockLost)));
    let next = lock.try_acquire_permit(&key, 1).await.unwrap();
    assert!(next.fencing_token() > stale.fencing_token());
    assert!(matches!(
        stale.extend(Duration::from_secs(5)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(stale.release().await, Err(LockError::LockLost)));
    assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
    assert!(!next.is_lost());
    next.release().await.unwrap();

    // With the watchdog: held for three TTLs and more.
    let url = common::redis_url().await;
    let watched = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(config().ttl(TTL))
        .key_prefix("k1s0test:")
        .auto_extend(AutoExtend::new(Duration::from_secs(60)))
        .build()
        .unwrap();
    let permit = watched.try_acquire_permit(&key, 1).await.unwrap();
    tokio::time::sleep(TTL * 3).await;
    assert!(!permit.is_lost());
    assert_eq!(watched.permits_held(&key).await.unwrap(), 1);
    permit.release().await.unwrap();
    assert_eq!(watched.permits_held(&key).await.unwrap(), 0);
}

/// `try_acquire_permit` never jumps the line: a permit released while a waiter is queued is
/// free but promised to it until it takes it, and a try is refused meanwhile. (The waiter polls
/// every 250 … 500 ms, which leaves that window open long enough to see.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_never_jumps_the_line() {
    let holder = lock_object(config()).await;
    let polling = RedisDistributedLock::builder(
        common::redis_conn::pool(&common::redis_url().await, 2).await,
    )
    .config(rarely_polling())
    .key_prefix("k1s0test:")
    .build()
    .unwrap();
    let key = key("permits-line");
    let admin = admin().await;
    let first = holder.try_acquire_permit(&key, 2).await.unwrap();
    let second = holder.try_acquire_permit(&key, 2).await.unwrap();
    let waiter = tokio::spawn({
        let (polling, key) = (polling.clone(), key.clone());
        async move { polling.acquire_permit(&key, 2).await }
    });
    assert_eventually("the waiter queued", || async {
        line_length(&admin, &holder, &key).await == 1
    })
    .await;
    first.release().await.unwrap();
    assert_eq!(holder.permits_held(&key).await.unwrap(), 1);
    let tried = holder.try_acquire_permit(&key, 2).await;
    assert!(
        matches!(tried, Err(LockError::AlreadyLocked)),
        "a try took the permit promised to the waiter: {tried:?}"
    );
    let permit = waiter.await.unwrap().unwrap();
    assert_eq!(holder.permits_held(&key).await.unwrap(), 2);
    permit.release().await.unwrap();
    second.release().await.unwrap();
    assert!(nothing_left(&admin, &holder, &key).await);
}
