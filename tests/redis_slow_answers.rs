//! Redis answering slowly (a proxy adds latency each way): a lease counts from the moment the
//! acquire script is sent, not from before the connection was opened; a lock granted with too
//! little of its lease left is given back, not handed out lost; the watchdog renews on the
//! lease's own schedule, so a slow link does not make it late.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use common::redis_server::RedisServer;

use k1s0_distributed_lock::{
    AutoExtend, DistributedLock, LockConfig, LockError, RedisDistributedLock,
};

/// A lock with `config` on `server` through `proxy` (`None`: directly).
async fn lock(
    server: &RedisServer,
    proxy: Option<&FaultProxy>,
    prefix: &str,
    config: LockConfig,
) -> RedisDistributedLock {
    let url = match proxy {
        Some(proxy) => format!("redis://{}", proxy.address()),
        None => server.url(),
    };
    RedisDistributedLock::builder(common::redis_conn::pool(&url, 2).await)
        .config(config)
        .key_prefix(prefix)
        .command_timeout(Duration::from_secs(5))
        .auto_extend(AutoExtend::new(Duration::from_secs(60)))
        .build()
        .unwrap()
}

/// A proxy in front of `server` that delays each way by `one_way`. The server has the scripts
/// cached first (a direct lock runs each once), so no `NOSCRIPT` round trip muddles the timing.
async fn slow_proxy(server: &RedisServer, one_way: Duration) -> std::sync::Arc<FaultProxy> {
    let warm = lock(
        server,
        None,
        &common::unique_prefix("redis_slow_warm"),
        LockConfig::new(),
    )
    .await;
    let guard = warm.try_acquire("k").await.unwrap();
    guard.extend(Duration::from_secs(1)).await.unwrap();
    guard.release().await.unwrap();
    let proxy = FaultProxy::start(server.address()).await;
    proxy.set_latency(one_way);
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_the_connection_does_not_count_against_the_lease() {
    let server = RedisServer::start().await;
    let one_way = Duration::from_millis(150);
    let proxy = slow_proxy(&server, one_way).await;
    let prefix = common::unique_prefix("redis_slow_connect");
    let ttl = Duration::from_millis(900);
    // A fresh lock: its first command opens the connection (a round trip of its own) first.
    let slow = lock(&server, Some(&proxy), &prefix, LockConfig::new().ttl(ttl)).await;
    let guard = slow.try_acquire("k").await.unwrap();
    // The script's round trip (300 ms) is gone from the lease; the connection's must not be.
    let left = guard.remaining().expect("not lost");
    assert!(
        left >= ttl - one_way * 2 - Duration::from_millis(150),
        "{left:?} left of {ttl:?}"
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_granted_too_late_to_use_is_given_back() {
    let server = RedisServer::start().await;
    let proxy = slow_proxy(&server, Duration::from_millis(150)).await;
    let prefix = common::unique_prefix("redis_slow_grant");
    // A TTL shorter than the round trip: every grant arrives with its lease already spent.
    let slow = lock(
        &server,
        Some(&proxy),
        &prefix,
        LockConfig::new().ttl(Duration::from_millis(200)),
    )
    .await;
    let refused = slow.try_acquire("k").await;
    assert!(
        matches!(&refused, Err(LockError::BackendError(error)) if error.to_string().contains("given back")),
        "{refused:?}"
    );
    let direct = lock(&server, None, &prefix, LockConfig::new()).await;
    assert!(
        !direct.is_locked("k").await.unwrap(),
        "the late lock was left held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_renews_on_time_over_a_slow_link() {
    let server = RedisServer::start().await;
    let proxy = slow_proxy(&server, Duration::from_millis(150)).await;
    let prefix = common::unique_prefix("redis_slow_watchdog");
    let ttl = Duration::from_millis(900);
    let slow = lock(&server, Some(&proxy), &prefix, LockConfig::new().ttl(ttl)).await;
    let guard = slow.try_acquire("k").await.unwrap();
    let direct = lock(&server, None, &prefix, LockConfig::new()).await;
    // Three TTLs, each renewal a 300 ms round trip: the first renewal, scheduled a third of the
    // TTL after the acquire was sent, arrives in time only if it was not scheduled from when
    // the acquire returned.
    let until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < until {
        assert!(!guard.is_lost(), "the watchdog let the lease run out");
        assert!(
            direct.is_locked("k").await.unwrap(),
            "the key expired on the server"
        );
        tokio::time::sleep(ttl / 6).await;
    }
    guard.release().await.unwrap();
}
