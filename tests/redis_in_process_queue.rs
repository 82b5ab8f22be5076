//! The tasks of one Redis lock object queue per key in the process: a guard kept past its TTL
//! does not keep them off a key Redis has freed, and a cancelled first-in-line does not make the
//! tasks behind it report a healthy server as silent.
#![cfg(feature = "redis")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::FaultProxy;
use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, RedisDistributedLock};

async fn lock_on(url: &str, prefix: &str, config: LockConfig) -> RedisDistributedLock {
    RedisDistributedLock::builder(common::redis_conn::pool(url, 4).await)
        .config(config)
        .key_prefix(prefix)
        .command_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The address of the shared test server, for a proxy in front of it.
fn address(url: &str) -> SocketAddr {
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// A guard whose lease ran out while its holder still keeps it (a hung handler): Redis has
/// freed the key, and the other tasks of the same lock object get it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_kept_past_its_ttl_does_not_keep_its_own_lock_object_out() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_claim_ttl");
    let config = LockConfig::new()
        .ttl(Duration::from_millis(300))
        .retry_interval(Duration::from_millis(50))
        .max_retries(10);
    let lock = lock_on(&url, &prefix, config).await;

    let kept = lock.acquire("k").await.unwrap();
    kept.lost().await;
    // Redis frees the key a moment after the holder's own deadline (which counts from the
    // send): a waiting acquire, within its budget of 500 ms.
    let next = lock
        .acquire("k")
        .await
        .expect("the key is free once the kept guard's lease ran out");
    next.release().await.unwrap();
    assert!(matches!(kept.release().await, Err(LockError::LockLost)));
}

/// The first task in line is cancelled while its command is in flight; Redis answers it (the
/// key is held by a live holder). The tasks queued behind, whose budgets run out meanwhile,
/// get `Timeout`, not a `BackendError` claiming Redis did not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_first_in_line_leaves_the_tasks_behind_with_timeout() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_claim_cancel");
    let holder = lock_on(
        &url,
        &prefix,
        LockConfig::new().ttl(Duration::from_secs(30)),
    )
    .await;
    let held = holder.acquire("k").await.unwrap();

    let proxy = FaultProxy::start(address(&url)).await;
    let budget_100_ms = LockConfig::new()
        .ttl(Duration::from_secs(5))
        .retry_interval(Duration::from_millis(25))
        .max_retries(4);
    let url_via_proxy = format!("redis://{}", proxy.address());
    let lock = lock_on(&url_via_proxy, &prefix, budget_100_ms).await;
    // The lock's connection is open before the link slows down.
    assert!(matches!(
        lock.try_acquire("k").await,
        Err(LockError::AlreadyLocked)
    ));
    proxy.set_latency(Duration::from_millis(150));

    // First in line: polled once, so its acquire script is on its way; cancelled after 150 ms,
    // half a round trip.
    let mut first = Box::pin(tokio::time::timeout(
        Duration::from_millis(150),
        lock.acquire("k"),
    ));
    assert!(futures::poll!(first.as_mut()).is_pending());
    let behind: Vec<_> = (0..2)
        .map(|_| {
            let lock = lock.clone();
            tokio::spawn(async move { lock.acquire("k").await })
        })
        .collect();
    assert!(
        (&mut first).await.is_err(),
        "the first in line ran out of time"
    );
    // Cancelled: dropped with its command in flight.
    drop(first);
    for waiter in behind {
        let result = waiter.await.unwrap();
        assert!(
            matches!(result, Err(LockError::Timeout)),
            "held key, Redis answering: {result:?}"
        );
    }
    held.release().await.unwrap();
}

/// The holder of `key` releases it while another task of the same lock object waits: that
/// task's guard, and the holder's fencing token.
async fn release_to_a_waiting_task(
    lock: &RedisDistributedLock,
    key: &str,
    before_release: impl std::future::Future<Output = ()>,
) -> (k1s0_distributed_lock::LockGuard, u64) {
    let first = lock.acquire(key).await.unwrap();
    let next = tokio::spawn({
        let (lock, key) = (lock.clone(), key.to_owned());
        async move { lock.acquire(&key).await }
    });
    // On this one-thread runtime, the spawned task runs up to its place in the local queue.
    tokio::task::yield_now().await;
    before_release.await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    let next = next.await.unwrap().expect("the next task gets the key");
    (next, first_token)
}

/// A task of the same lock object waits for the key: the release takes the lock for it in the
/// same script (one round trip, not a release and then an acquire), with a larger fencing
/// token, and its guard holds the key in Redis until it releases.
#[tokio::test]
async fn a_release_hands_the_lock_to_the_next_task_in_one_script() {
    let server = common::redis_server::RedisServer::start().await;
    let config = LockConfig::new().wait_timeout(Duration::from_secs(5));
    let lock = lock_on(&server.url(), "handover:", config).await;
    let admin = common::redis_conn::connection(&server.url()).await;
    // Once first, so that the server has every script cached (no `NOSCRIPT` round trips).
    let (warm_up, _) = release_to_a_waiting_task(&lock, "warm-up", async {}).await;
    warm_up.release().await.unwrap();

    let reset = async {
        common::redis_conn::reset_stats(&admin).await;
    };
    let (next, first_token) = release_to_a_waiting_task(&lock, "k", reset).await;
    assert_eq!(
        common::redis_conn::calls_run(&admin, &["evalsha", "eval"]).await,
        1,
        "one script from the release to the next holder"
    );
    assert!(next.fencing_token() > first_token);
    assert!(server.has_key(&lock.redis_key("k")).await);
    next.release().await.unwrap();
    assert!(!server.has_key(&lock.redis_key("k")).await);
}

/// The hand-over does not pass waiters of other processes: one waits in the Redis line when
/// the holder releases with a task of its own lock object queued, and it goes first.
#[tokio::test]
async fn a_hand_over_lets_waiters_of_other_processes_go_first() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_handover_fair");
    let config = LockConfig::new().wait_timeout(Duration::from_secs(5));
    let (lock, other) = (
        lock_on(&url, &prefix, config).await,
        lock_on(&url, &prefix, config).await,
    );
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = lock.acquire("k").await.unwrap();

    let other_process = tokio::spawn({
        let order = order.clone();
        async move {
            let guard = other.acquire("k").await.unwrap();
            order.lock().unwrap().push("other process");
            guard.release().await.unwrap();
        }
    });
    let line = format!("{}:line", lock.redis_key("k"));
    let admin = common::redis_conn::connection(&url).await;
    common::wait::assert_eventually("the other process waits in the Redis line", || {
        let (mut admin, line) = (admin.clone(), line.clone());
        async move {
            redis::cmd("ZCARD")
                .arg(&line)
                .query_async::<u64>(&mut admin)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    let same_object = tokio::spawn({
        let (lock, order) = (lock.clone(), order.clone());
        async move {
            let guard = lock.acquire("k").await.unwrap();
            order.lock().unwrap().push("same lock object");
            guard.release().await.unwrap();
        }
    });
    tokio::task::yield_now().await;
    held.release().await.unwrap();
    other_process.await.unwrap();
    same_object.await.unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["other process", "same lock object"]
    );
}

/// The task the lock is being handed over to leaves while the hand-over is on its way (Redis is
/// 100 ms away, behind a proxy): the lock taken for it is released, and the key is free for
/// everyone long before its TTL.
#[tokio::test]
async fn a_lock_handed_over_to_a_task_that_left_is_released() {
    let url = common::redis_url().await;
    let proxy = FaultProxy::start(address(&url)).await;
    let prefix = common::unique_prefix("redis_handover_left");
    let config = LockConfig::new()
        .ttl(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(5));
    let lock = lock_on(&format!("redis://{}", proxy.address()), &prefix, config).await;
    let held = lock.acquire("k").await.unwrap();
    let leaving = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    // On this one-thread runtime, the spawned task runs up to its place in the local queue.
    tokio::task::yield_now().await;

    proxy.set_latency(Duration::from_millis(100));
    let release = tokio::spawn(held.release());
    // The hand-over is on its way when the task it is for leaves.
    tokio::time::sleep(Duration::from_millis(20)).await;
    leaving.abort();
    assert!(leaving.await.unwrap_err().is_cancelled());
    release.await.unwrap().unwrap();

    proxy.heal().await;
    let other = lock_on(&url, &prefix, config).await;
    common::wait::assert_eventually("the key is free again", || {
        let other = other.clone();
        async move { !other.is_locked("k").await.unwrap() }
    })
    .await;
    common::redis_conn::take_and_release(&other, "k").await;
}

/// The hand-over is delayed on its connection past the command timeout (a slow path to the
/// server), while new connections reach Redis directly; the task it was for gives up. The
/// clean-up of the fresh token goes to the same connection, so Redis runs it after the delayed
/// hand-over: the key is not left to a token nobody knows until its TTL.
#[tokio::test]
async fn a_hand_over_delayed_past_the_command_timeout_leaves_no_lock() {
    let url = common::redis_url().await;
    // Commands go through `entry`, which forwards to `slow`, which forwards to Redis: `slow`
    // delays the connection open now; `entry` sends new connections straight to Redis.
    let slow = FaultProxy::start(address(&url)).await;
    let entry = FaultProxy::start(slow.address()).await;
    let prefix = common::unique_prefix("redis_handover_delayed");
    let config = LockConfig::new()
        .ttl(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(4));
    let lock = RedisDistributedLock::builder(
        common::redis_conn::pool(&format!("redis://{}", entry.address()), 4).await,
    )
    .config(config)
    .key_prefix(&prefix)
    .command_timeout(Duration::from_millis(300))
    .build()
    .unwrap();
    let held = lock.acquire("k").await.unwrap();
    let next = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    tokio::task::yield_now().await;

    slow.set_latency(Duration::from_millis(1_500));
    entry.repoint(address(&url));
    // The background release hands over, on the slow connection.
    drop(held);
    // The hand-over has timed out (300 ms) and the task it was for gives up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !next.is_finished(),
        "the task got the lock: no delayed hand-over to test"
    );
    next.abort();
    assert!(next.await.unwrap_err().is_cancelled());

    let admin = common::redis_conn::connection(&url).await;
    let key = lock.redis_key("k");
    common::wait::assert_eventually(
        "no token holds the key after the delayed hand-over ran",
        || {
            let (mut admin, key) = (admin.clone(), key.clone());
            async move {
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<i64>(&mut admin)
                    .await
                    .unwrap()
                    == 0
            }
        },
    )
    .await;
}

/// A release with a task of the same lock object waiting behind it is given up by its caller
/// while its command is on the way (Redis is 100 ms away, behind a proxy): the lock reaches the
/// waiting task, not a token nobody knows that holds the key until its TTL, and nothing is left
/// once that task releases.
#[tokio::test]
async fn a_release_given_up_while_it_hands_over_loses_no_lock() {
    let url = common::redis_url().await;
    let proxy = FaultProxy::start(address(&url)).await;
    let prefix = common::unique_prefix("redis_handover_given_up");
    // The waiting budget is far below the TTL: a lock orphaned by the hand-over would make the
    // waiting task time out.
    let config = LockConfig::new()
        .ttl(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(3));
    let lock = lock_on(&format!("redis://{}", proxy.address()), &prefix, config).await;
    let held = lock.acquire("k").await.unwrap();
    let next = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    // On this one-thread runtime, the spawned task runs up to its place in the local queue.
    tokio::task::yield_now().await;

    proxy.set_latency(Duration::from_millis(100));
    let given_up = tokio::time::timeout(Duration::from_millis(20), held.release()).await;
    assert!(
        given_up.is_err(),
        "the release answered within 20 ms through a 100 ms proxy"
    );
    let next = next
        .await
        .unwrap()
        .expect("the waiting task gets the key within its budget");
    next.release().await.unwrap();
    assert!(
        common::suites::becomes_free(&lock, "k", Duration::from_secs(2)).await,
        "a lock was left behind"
    );
}
