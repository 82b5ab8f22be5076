//! A Redis user restricted to what docs/redis.md says a lock user needs (the `ACL SETUSER` line
//! is read from that file): locking, waiting, wake-up, extension and release all work through
//! it, of locks and of permits; without the channels, releases still succeed and waiters poll. On a `redis-server` of the
//! test's own.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;

use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::{
    DistributedLock, DistributedSemaphore, LockConfig, RedisDistributedLock,
};

const USER: &str = "locker";
const PASSWORD: &str = "locker-password";

/// The documented `ACL SETUSER` line for `prefix`, as its words.
fn documented_acl(prefix: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis.md"))
        .expect("docs/redis.md");
    let line = docs
        .lines()
        .find(|line| line.starts_with("ACL SETUSER <user>"))
        .expect("docs/redis.md gives the ACL of a lock user");
    line.replace("<user>", USER)
        .replace("<password>", PASSWORD)
        .replace("<prefix>", prefix)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Creates the user on `server` with the ACL `words` (`ACL SETUSER ...`).
async fn create_user(server: &RedisServer, words: &[String]) {
    let mut admin = common::redis_conn::connection(&server.url()).await;
    let mut command = redis::cmd(&words[0]);
    command.arg(&words[1..]);
    let () = command.query_async(&mut admin).await.unwrap();
}

/// A lock that connects as the restricted user.
async fn lock_as_user(server: &RedisServer, prefix: &str, wake: bool) -> RedisDistributedLock {
    let url = format!("redis://{USER}:{PASSWORD}@127.0.0.1:{}", server.port());
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(50))
        .max_retries(100);
    let builder = RedisDistributedLock::builder(common::redis_conn::pool(&url, 2).await)
        .config(config)
        .key_prefix(prefix);
    let builder = if wake {
        builder.wake_on_release(redis::Client::open(url.as_str()).unwrap())
    } else {
        builder
    };
    builder.build().unwrap()
}

/// Waits until a waiter of `key` is queued (and, with `subscribed`, listening for releases).
async fn until_queued(
    server: &RedisServer,
    lock: &RedisDistributedLock,
    key: &str,
    subscribed: bool,
) {
    until_queued_under(server, lock.redis_key(key), subscribed).await;
}

/// Waits until a waiter is queued in the line whose names start with `base` (the lock key, or
/// `<lock key>:permits`), and, with `subscribed`, listening for releases.
async fn until_queued_under(server: &RedisServer, base: String, subscribed: bool) {
    let admin = common::redis_conn::connection(&server.url()).await;
    common::wait::assert_eventually("the waiter queues", || {
        let (mut admin, base) = (admin.clone(), base.clone());
        async move {
            let queued: usize = redis::cmd("ZCARD")
                .arg(format!("{base}:waiters"))
                .query_async(&mut admin)
                .await
                .unwrap();
            let listening = common::redis_conn::subscribed_waiters(&admin, &base).await == 1;
            queued == 1 && (listening || !subscribed)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_is_enough_to_lock_wait_and_release() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_acl");
    create_user(&server, &documented_acl(&prefix)).await;
    // The holder and the waiter on two lock objects, as two processes (the waiters of one lock
    // object wait in the process, and only the first of them in Redis).
    let (holding, lock) = (
        lock_as_user(&server, &prefix, true).await,
        lock_as_user(&server, &prefix, true).await,
    );

    let holder = holding.try_acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    until_queued(&server, &lock, "k", true).await;
    holder.extend(Duration::from_secs(30)).await.unwrap();
    assert!(lock.is_locked("k").await.unwrap());
    let holder_token = holder.fencing_token();
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > holder_token);
    next.release().await.unwrap();
    assert!(!lock.is_locked("k").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_is_enough_for_permits() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_acl_permits");
    create_user(&server, &documented_acl(&prefix)).await;
    let (holding, lock) = (
        lock_as_user(&server, &prefix, true).await,
        lock_as_user(&server, &prefix, true).await,
    );

    let holder = holding.try_acquire_permit("k", 1).await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire_permit("k", 1).await }
    });
    until_queued_under(&server, format!("{}:permits", lock.redis_key("k")), true).await;
    holder.extend(Duration::from_secs(30)).await.unwrap();
    assert_eq!(lock.permits_held("k").await.unwrap(), 1);
    let holder_token = holder.fencing_token();
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > holder_token);
    next.release().await.unwrap();
    assert_eq!(lock.permits_held("k").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_channels_a_release_still_succeeds_and_waiters_poll() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_acl_nochannel");
    let words: Vec<String> = documented_acl(&prefix)
        .into_iter()
        .filter(|word| !word.starts_with('&'))
        .collect();
    create_user(&server, &words).await;
    let (holding, lock) = (
        lock_as_user(&server, &prefix, false).await,
        lock_as_user(&server, &prefix, false).await,
    );

    let holder = holding.try_acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    until_queued(&server, &lock, "k", false).await;
    // The release script's PUBLISH to the waiter is refused; the release happened all the same.
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    next.release().await.unwrap();
}
