//! Auto-extension (the watchdog) of Redis locks against the real server.
#![cfg(feature = "redis")]

mod common;

use common::wait::assert_eventually;
use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::redis::{self, AsyncCommands};
use k1s0_distributed_lock::{
    AutoExtend, DistributedLock, LockConfig, LockError, RedisDistributedLock,
};

const TTL: Duration = Duration::from_millis(200);

async fn lock(prefix: &str, auto_extend: Option<AutoExtend>) -> RedisDistributedLock {
    let url = common::redis_url().await;
    let mut builder = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(
            LockConfig::new()
                .ttl(TTL)
                .retry_interval(Duration::from_millis(50))
                .max_retries(100),
        )
        .key_prefix(prefix);
    if let Some(settings) = auto_extend {
        builder = builder.auto_extend(settings);
    }
    builder.build().unwrap()
}

async fn raw() -> redis::aio::MultiplexedConnection {
    common::redis_conn::connection(&common::redis_url().await).await
}

async fn exists(key: &str) -> bool {
    raw().await.exists(key).await.unwrap()
}

#[tokio::test]
async fn the_watchdog_keeps_a_lock_past_several_ttls_and_stops_after_drop() {
    let prefix = common::unique_prefix("redis_watchdog");
    let holder_lock = lock(&prefix, Some(AutoExtend::new(Duration::from_secs(30)))).await;
    let other = lock(&prefix, None).await;
    let guard = holder_lock.try_acquire("long-job").await.unwrap();
    let token = guard.token().hyphenated().to_string();
    let key = holder_lock.redis_key("long-job");

    // Hold for six TTLs; the lock must stay ours the whole time.
    for _ in 0..12 {
        tokio::time::sleep(TTL / 2).await;
        assert!(!guard.is_lost());
        assert!(matches!(
            other.try_acquire("long-job").await,
            Err(LockError::AlreadyLocked)
        ));
    }
    drop(guard);
    let next = other.acquire("long-job").await.unwrap();
    next.release().await.unwrap();

    // Were the watchdog still running, it would keep renewing a lock stored under the old
    // token: put one back and watch it expire.
    assert_not_renewed(&key, &token).await;
}

/// Puts a lock back under `token` and watches it expire: a watchdog still running for that
/// token would keep renewing it.
async fn assert_not_renewed(key: &str, token: &str) {
    let mut conn = raw().await;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eventually("the old token's lock expires without renewal", || async {
        !exists(key).await
    })
    .await;
}

#[tokio::test]
async fn the_watchdog_stops_on_release_too() {
    let prefix = common::unique_prefix("redis_watchdog_release");
    let lock = lock(&prefix, Some(AutoExtend::new(Duration::from_secs(30)))).await;
    let guard = lock.try_acquire("job").await.unwrap();
    let token = guard.token().hyphenated().to_string();
    let key = lock.redis_key("job");
    guard.release().await.unwrap();
    assert_not_renewed(&key, &token).await;
}

#[tokio::test]
async fn a_renewal_that_finds_the_lock_gone_marks_the_guard_lost() {
    let prefix = common::unique_prefix("redis_watchdog_lost");
    let lock = lock(&prefix, Some(AutoExtend::new(Duration::from_secs(30)))).await;
    let guard = lock.try_acquire("job").await.unwrap();
    let key = lock.redis_key("job");
    let mut conn = raw().await;
    let deleted: i64 = conn.del(&key).await.unwrap();
    assert_eq!(deleted, 1);
    assert!(!guard.is_lost());
    // Someone else (another lock object, as another process) takes it; the watchdog must
    // notice and must not extend their lock.
    let elsewhere = self::lock(&prefix, None).await;
    let other = elsewhere.try_acquire("job").await.unwrap();
    assert_eventually("the watchdog marks the guard lost", || async {
        guard.is_lost()
    })
    .await;
    assert!(!other.is_lost());
    assert!(matches!(guard.release().await, Err(LockError::LockLost)));
    other.release().await.unwrap();
}

#[tokio::test]
async fn the_watchdog_gives_up_at_max_hold() {
    let prefix = common::unique_prefix("redis_watchdog_max");
    let max_hold = Duration::from_millis(600);
    let lock = lock(
        &prefix,
        Some(AutoExtend::new(max_hold).renew_fraction(0.25)),
    )
    .await;
    let guard = lock.try_acquire("stuck").await.unwrap();
    let key = lock.redis_key("stuck");
    // Past two TTLs the watchdog has kept it.
    tokio::time::sleep(TTL * 2).await;
    assert!(exists(&key).await, "the watchdog did not renew");
    assert!(!guard.is_lost());
    // Then it stops renewing: the lock runs out although the guard lives.
    assert_eventually("the lock runs out after max_hold", || async {
        !exists(&key).await
    })
    .await;
    assert_eventually("the guard's lease runs out", || async { guard.is_lost() }).await;
    // The same lock object takes the key again (waiting: the lost guard's turn passes on as
    // its lease's loss is noticed).
    let next = lock.acquire("stuck").await.unwrap();
    next.release().await.unwrap();
    drop(guard);
}

#[tokio::test]
async fn the_watchdog_keeps_a_shared_lock_past_several_ttls_and_stops_after_drop() {
    use k1s0_distributed_lock::DistributedRwLock;

    let prefix = common::unique_prefix("redis_watchdog_shared");
    let holder_lock = lock(&prefix, Some(AutoExtend::new(Duration::from_secs(30)))).await;
    let other = lock(&prefix, None).await;
    let guard = holder_lock.try_acquire_shared("long-read").await.unwrap();
    let readers = format!("{}:readers", holder_lock.redis_key("long-read"));

    // Hold for six TTLs; the read lock must stay ours the whole time, and keep writers out.
    for _ in 0..12 {
        tokio::time::sleep(TTL / 2).await;
        assert!(!guard.is_lost());
        assert!(matches!(
            other.try_acquire("long-read").await,
            Err(LockError::AlreadyLocked)
        ));
    }
    drop(guard);
    let writer = other.acquire("long-read").await.unwrap();
    assert!(
        !exists(&readers).await,
        "the readers' set outlived its last member"
    );
    writer.release().await.unwrap();
}
