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
    let prefix = common::unique_prefix("redis_outage");
    let lock = RedisDistributedLock::builder(pool)
        .config(
            LockConfig::new()
                .retry_interval(Duration::from_millis(20))
                .max_retries(50),
        )
        .key_prefix(&prefix)
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
    // The restarted server lost every key (no persistence): the old guard learns its lock is
    // gone at its next renewal, once the same lock object has reconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match bounded(before.extend(Duration::from_secs(30))).await {
            Err(LockError::LockLost) => break,
            Err(LockError::BackendError(error)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never reconnected: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("the lock survived a restart without persistence: {other:?}"),
        }
    }
    assert!(before.is_lost());
    // Its turn in this process passes on with it: the same lock object takes the key again.
    let after = loop {
        match bounded(lock.try_acquire("survivor")).await {
            Ok(guard) => break guard,
            Err(LockError::BackendError(_) | LockError::AlreadyLocked)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
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
    // The fencing token still grows: it is floored by the server clock.
    assert!(after.fencing_token() > before.fencing_token());

    // Waiting works again, woken by the release: the key held by another lock object (as
    // another process), so that this one waits in Redis, queued and subscribed.
    after.release().await.unwrap();
    let holding = RedisDistributedLock::builder(common::redis_conn::pool(&url, 2).await)
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let held = holding.try_acquire("survivor").await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("survivor").await }
    });
    // Queued in Redis and subscribed to the release channel before the release.
    let base = lock.redis_key("survivor");
    let waiters = format!("{base}:waiters");
    let observer = common::redis_conn::connection(&server.url()).await;
    common::wait::assert_eventually("the waiter queues and subscribes again", || {
        let (mut observer, waiters, base) = (observer.clone(), waiters.clone(), base.clone());
        async move {
            let queued: usize = redis::cmd("ZCARD")
                .arg(&waiters)
                .query_async(&mut observer)
                .await
                .unwrap();
            queued == 1 && common::redis_conn::subscribed_waiters(&observer, &base).await == 1
        }
    })
    .await;
    held.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > before.fencing_token());
    next.release().await.unwrap();
}
