//! Redis connections for the tests: a pool, a direct connection, and a lock builder on a given
//! server (the shared test server, a proxy in front of it, or a `redis-server` a test started).

use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::RedisDistributedLockBuilder;

/// A pool of at most `max` connections to `url`.
pub async fn pool(url: &str, max: u32) -> Pool<RedisConnectionManager> {
    let manager = RedisConnectionManager::new(url).expect("redis url");
    Pool::builder()
        .max_size(max)
        .build(manager)
        .await
        .expect("redis pool")
}

/// A direct connection to `url`, to look at or change keys behind the lock's back.
pub async fn connection(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// A lock builder on a pool of 10 to `url`, whose waiters subscribe to releases through
/// `pubsub_url` (the same server, or a proxy in front of it).
pub async fn lock_builder(url: &str, pubsub_url: &str) -> RedisDistributedLockBuilder {
    k1s0_distributed_lock::RedisDistributedLock::builder(pool(url, 10).await)
        .wake_on_release(redis::Client::open(pubsub_url).expect("redis url"))
}

/// A lock with wake-ups on the test server, keys under `k1s0test:`, with `config`.
pub async fn rw_lock(
    config: k1s0_distributed_lock::LockConfig,
) -> k1s0_distributed_lock::RedisDistributedLock {
    let url = super::redis_url().await;
    lock_builder(&url, &url)
        .await
        .config(config)
        .key_prefix("k1s0test:")
        .build()
        .expect("a valid lock")
}

/// A lock on a pool of 2 to `url` with keys under `prefix`, the other settings the defaults.
pub async fn plain_lock(url: &str, prefix: &str) -> k1s0_distributed_lock::RedisDistributedLock {
    k1s0_distributed_lock::RedisDistributedLock::builder(pool(url, 2).await)
        .key_prefix(prefix)
        .build()
        .expect("a valid lock")
}

/// Takes `key` with `lock` and releases it; fails the test if either fails.
pub async fn take_and_release(lock: &impl k1s0_distributed_lock::DistributedLock, key: &str) {
    let guard = lock.try_acquire(key).await.expect("take the key");
    guard.release().await.expect("release the key");
}

/// How many waiters' channels of the lock `lock_key` (`<lock key>:released:<token>`, one per
/// waiter) have a subscriber. `lock_key` must not contain glob characters (`*?[\`).
pub async fn subscribed_waiters(connection: &MultiplexedConnection, lock_key: &str) -> usize {
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("{lock_key}:released:*"))
        .query_async(&mut connection.clone())
        .await
        .expect("PUBSUB CHANNELS");
    channels.len()
}

/// Calls of the commands named in `counted` (`"evalsha"`, `"subscribe"`…) since the server's
/// statistics were last reset (`INFO commandstats`; commands that scripts call are counted
/// too). Meaningful on a server of the test's own.
pub async fn calls_run(connection: &MultiplexedConnection, counted: &[&str]) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection.clone())
        .await
        .expect("INFO commandstats");
    // cmdstat_evalsha:calls=12,usec=...
    stats
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            counted.contains(&name).then(|| calls.parse::<u64>().ok())?
        })
        .sum()
}

/// Resets the server's statistics (`CONFIG RESETSTAT`), so that [`calls_run`] counts from now.
pub async fn reset_stats(connection: &MultiplexedConnection) {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection.clone())
        .await
        .expect("CONFIG RESETSTAT");
}
