//! Faults injected for real through a TCP proxy, per server backend: a holder cut off from the
//! server, a stalled server, and recovery of the same lock object.

#![cfg(any(feature = "postgres", feature = "redis"))]

mod common;

use std::time::Duration;

use common::backends::Backend;
use common::faults::{holder_cut_off, slow_network, stalled_server};
use common::proxy::FaultProxy;
use k1s0_distributed_lock::LockConfig;

/// The command timeout the faulty locks run with: every call must end within about this.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// TTL of the locks in these tests: the longest a cut-off holder can keep a key from others
/// on Redis (on PostgreSQL the session ends with the connection, far sooner).
const TTL: Duration = Duration::from_secs(2);

fn config() -> LockConfig {
    LockConfig::new()
        .ttl(TTL)
        .retry_interval(Duration::from_millis(50))
        .max_retries(10)
}

async fn through_proxy(
    backend: Backend,
) -> (std::sync::Arc<FaultProxy>, common::backends::AnyLock) {
    let proxy = FaultProxy::start(backend.server_address().await).await;
    let url = backend.url_via(proxy.address()).await;
    let lock = backend
        .lock_at(Some(url), config(), Some(COMMAND_TIMEOUT))
        .await;
    (proxy, lock)
}

server_backend_tests!(
    a_slow_network_only_slows_locking_down,
    a_holder_cut_off_loses_its_lock_to_the_next_client,
    a_stalled_server_gives_errors_within_the_budget_and_recovers
);

async fn a_holder_cut_off_loses_its_lock_to_the_next_client(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    // The other client may wait for the whole TTL, and its own lock must outlive the checks.
    let direct = backend
        .lock(
            config()
                .ttl(Duration::from_secs(30))
                .retry_interval(Duration::from_millis(100))
                .max_retries(100),
        )
        .await;
    let key = format!("{}cut", common::unique_prefix("fault"));
    let measured = holder_cut_off(&via_proxy, &direct, &proxy, &key, TTL).await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_slow_network_only_slows_locking_down(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    let direct = backend.lock(config().ttl(Duration::from_secs(30))).await;
    let key = format!("{}slow", common::unique_prefix("fault"));
    // Below the command timeout, so every command still makes it.
    let measured = slow_network(&via_proxy, &direct, &proxy, &key, Duration::from_millis(40)).await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_stalled_server_gives_errors_within_the_budget_and_recovers(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    let key = format!("{}stall", common::unique_prefix("fault"));
    // try_acquire: one command timeout; acquire: its budget (500 ms) plus one command timeout.
    let limit = config().wait_budget() + COMMAND_TIMEOUT * 2;
    let measured = stalled_server(&via_proxy, &proxy, &key, limit).await;
    println!("{}: {measured:?}", backend.name());
}

/// Found by review: with the pub/sub connection unresponsive, a waiter used to block on its
/// subscription for a whole command timeout, let its queue entry lapse, and lose its turn.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiters_keep_their_turn_when_pub_sub_is_unresponsive() {
    use k1s0_distributed_lock::bb8_redis::redis;
    use k1s0_distributed_lock::DistributedLock;

    let url = common::redis_url().await;
    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    proxy.stall();
    let proxy_url = format!("redis://{}", proxy.address());
    let lock = common::redis_conn::lock_builder(&url, &proxy_url)
        .await
        .config(
            LockConfig::new()
                .ttl(Duration::from_secs(10))
                .retry_interval(Duration::from_millis(100))
                .max_retries(50),
        )
        .key_prefix("k1s0test:")
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let key = format!("{}turns", common::unique_prefix("pubsub-stall"));
    let queue = format!("{}:queue", lock.redis_key(&key));
    let connection = common::redis_conn::connection(&url).await;
    let queue_length = move || {
        let queue = queue.clone();
        let mut connection = connection.clone();
        async move {
            redis::cmd("LLEN")
                .arg(&queue)
                .query_async::<usize>(&mut connection)
                .await
                .unwrap()
        }
    };

    let holder = lock.try_acquire(&key).await.unwrap();
    let first = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await.unwrap() }
    });
    assert!(
        common::wait::eventually(Duration::from_secs(5), || {
            let f = queue_length();
            async move { f.await == 1 }
        })
        .await
    );
    let second = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await.unwrap() }
    });
    assert!(
        common::wait::eventually(Duration::from_secs(5), || {
            let f = queue_length();
            async move { f.await == 2 }
        })
        .await
    );
    lock.release(holder).await.unwrap();
    let first = first.await.unwrap();
    let first_fence = first.fencing_token();
    drop(first);
    let second = second.await.unwrap();
    assert!(
        first_fence < second.fencing_token(),
        "the second waiter took the first one's turn"
    );
}

/// Found by review: a waiter with a 2 ms poll interval cut every pub/sub connection attempt
/// short at 2 ms, so over a link slower than that no waiter ever got subscribed.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiters_get_subscribed_over_a_pub_sub_link_slower_than_their_poll() {
    use k1s0_distributed_lock::bb8_redis::redis;
    use k1s0_distributed_lock::DistributedLock;

    let url = common::redis_url().await;
    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    proxy.set_latency(Duration::from_millis(10));
    let proxy_url = format!("redis://{}", proxy.address());
    let lock = common::redis_conn::lock_builder(&url, &proxy_url)
        .await
        .config(
            LockConfig::new()
                .retry_interval(Duration::from_millis(2))
                .max_retries(5_000),
        )
        .key_prefix("k1s0test:")
        .build()
        .unwrap();
    let key = format!("{}slow-pubsub", common::unique_prefix("pubsub-slow"));
    let channel = format!("{}:released", lock.redis_key(&key));
    let connection = common::redis_conn::connection(&url).await;

    let holder = lock.try_acquire(&key).await.unwrap();
    let waiter = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await }
    });
    common::wait::assert_eventually("the waiter subscribes to the release channel", || {
        let (mut connection, channel) = (connection.clone(), channel.clone());
        async move {
            let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut connection)
                .await
                .unwrap();
            counts
                .first()
                .is_some_and(|(_, subscribers)| *subscribers == 1)
        }
    })
    .await;
    lock.release(holder).await.unwrap();
    lock.release(waiter.await.unwrap().unwrap()).await.unwrap();
}
