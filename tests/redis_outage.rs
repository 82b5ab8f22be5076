//! A Redis server that dies and comes back: commands fail fast with `BackendError`, then the
//! same lock object recovers. Runs its own `redis-server` on a free loopback port.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;

use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, RedisDistributedLock};

/// Fails the test if `operation` hangs instead of failing fast.
async fn bounded<T>(operation: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), operation)
        .await
        .expect("a command hung while Redis was down")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_gives_backend_errors_then_the_same_lock_recovers() {
    let mut server = RedisServer::start().await;
    let url = server.url();
    let pool = Pool::builder()
        .max_size(2)
        .build(RedisConnectionManager::new(url.as_str()).unwrap())
        .await
        .unwrap();
    let lock = RedisDistributedLock::builder(pool)
        .config(
            LockConfig::new()
                .retry_interval(Duration::from_millis(20))
                .max_retries(50),
        )
        .key_prefix(common::unique_prefix("redis_outage"))
        .command_timeout(Duration::from_millis(300))
        .wake_on_release(redis::Client::open(url.as_str()).unwrap())
        .build()
        .unwrap();

    let before = lock.try_acquire("survivor").await.unwrap();
    server.kill();

    let backend_error =
        |result: &Result<_, LockError>| matches!(result, Err(LockError::BackendError(_)));
    assert!(backend_error(
        &bounded(lock.try_acquire("other")).await.map(drop)
    ));
    assert!(backend_error(
        &bounded(lock.acquire("other")).await.map(drop)
    ));
    assert!(backend_error(
        &bounded(lock.is_locked("other")).await.map(drop)
    ));
    assert!(backend_error(
        &bounded(before.extend(Duration::from_secs(30))).await
    ));
    assert!(!before.is_lost(), "a failed extend is not a lost lock");

    server.restart().await;
    // The same lock object reconnects (the pool may need a moment to notice).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        match bounded(lock.try_acquire("survivor")).await {
            Ok(guard) => break guard,
            Err(LockError::BackendError(error)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never recovered: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("unexpected error after the restart: {other:?}"),
        }
    };
    // The restarted server lost every key (no persistence): the old guard's lock is gone, and
    // the fencing token still grows because it is floored by the server clock.
    assert!(after.fencing_token() > before.fencing_token());
    assert!(matches!(
        before.extend(Duration::from_secs(30)).await,
        Err(LockError::LockLost)
    ));
    assert!(before.is_lost());

    // Waiting works again, woken by the release.
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("survivor").await }
    });
    // Queued in Redis and subscribed to the release channel before the release.
    let (waiters, channel) = {
        let base = lock.redis_key("survivor");
        (format!("{base}:waiters"), format!("{base}:released"))
    };
    let observer = common::redis_conn::connection(&server.url()).await;
    common::wait::assert_eventually("the waiter queues and subscribes again", || {
        let (mut observer, waiters, channel) = (observer.clone(), waiters.clone(), channel.clone());
        async move {
            let queued: usize = redis::cmd("ZCARD")
                .arg(&waiters)
                .query_async(&mut observer)
                .await
                .unwrap();
            let subscribed: Vec<(String, usize)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut observer)
                .await
                .unwrap();
            queued == 1 && subscribed.first().is_some_and(|(_, n)| *n == 1)
        }
    })
    .await;
    after.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > before.fencing_token());
    next.release().await.unwrap();
}
