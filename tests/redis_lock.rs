//! The Redis backend's single-holder behaviour against the real server: protocol, fencing,
//! expiry, stale guards, bad input, cancellation and drop.
#![cfg(feature = "redis")]

mod common;

use common::wait::assert_eventually;
use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis::{self, AsyncCommands};
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, RedisDistributedLock};

async fn pool() -> Pool<RedisConnectionManager> {
    common::redis_conn::pool(&common::redis_url().await, 4).await
}

async fn raw() -> redis::aio::MultiplexedConnection {
    common::redis_conn::connection(&common::redis_url().await).await
}

async fn lock_with(prefix: &str, config: LockConfig) -> RedisDistributedLock {
    let url = common::redis_url().await;
    common::redis_conn::lock_builder(&url, &url)
        .await
        .config(config)
        .key_prefix(prefix)
        .build()
        .unwrap()
}

/// Every Redis key under `prefix`, sorted.
async fn keys_under(prefix: &str) -> Vec<String> {
    let mut conn = raw().await;
    let pattern = format!("{}*", glob_escape(prefix));
    let mut keys: Vec<String> = conn.keys(pattern).await.unwrap();
    keys.sort();
    keys
}

fn glob_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[tokio::test]
async fn try_acquire_excludes_and_release_frees() {
    let prefix = common::unique_prefix("redis_basic");
    let lock = lock_with(&prefix, LockConfig::new()).await;
    let guard = lock.try_acquire("order:1").await.unwrap();
    assert!(lock.is_locked("order:1").await.unwrap());
    assert!(matches!(
        lock.try_acquire("order:1").await,
        Err(LockError::AlreadyLocked)
    ));
    // The value is the guard's token, with a PX expiry within the TTL.
    let mut conn = raw().await;
    let key = lock.redis_key("order:1");
    assert_eq!(key, format!("{prefix}{{order:1}}"));
    let value: String = conn.get(&key).await.unwrap();
    assert_eq!(value, guard.token().hyphenated().to_string());
    let pttl: i64 = conn.pttl(&key).await.unwrap();
    assert!(pttl > 0 && pttl <= 30_000, "{pttl}");

    lock.release(guard).await.unwrap();
    assert!(!lock.is_locked("order:1").await.unwrap());
    let again = lock.try_acquire("order:1").await.unwrap();
    again.release().await.unwrap();
}

#[tokio::test]
async fn fencing_tokens_strictly_increase_even_after_the_counter_is_gone() {
    let prefix = common::unique_prefix("redis_fence");
    let first = lock_with(&prefix, LockConfig::new()).await;
    let second = lock_with(&prefix, LockConfig::new()).await;
    let mut last = 0;
    for round in 0..40 {
        let lock = if round % 2 == 0 { &first } else { &second };
        let guard = lock.try_acquire("ledger").await.unwrap();
        assert!(
            guard.fencing_token() > last,
            "{} <= {last}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    // The counter expires after the retention; simulate that: the next token still grows.
    let mut conn = raw().await;
    let fence_key = format!("{}:fence", first.redis_key("ledger"));
    let deleted: i64 = conn.del(&fence_key).await.unwrap();
    assert_eq!(deleted, 1);
    let guard = second.try_acquire("ledger").await.unwrap();
    assert!(guard.fencing_token() > last);
    guard.release().await.unwrap();
}

#[tokio::test]
async fn an_expired_guard_cannot_release_or_extend_the_new_holders_lock() {
    let prefix = common::unique_prefix("redis_stale");
    let config = LockConfig::new().ttl(Duration::from_millis(150));
    let lock = lock_with(&prefix, config).await;
    let stale = lock.try_acquire("job").await.unwrap();
    let key = lock.redis_key("job");
    let mut conn = raw().await;
    assert_eventually("the first lock expires", || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { !conn.exists::<_, bool>(&key).await.unwrap() }
    })
    .await;
    assert!(stale.is_lost());

    let newer = lock_with(&prefix, LockConfig::new()).await;
    let holder = newer.try_acquire("job").await.unwrap();
    assert!(holder.fencing_token() > stale.fencing_token());
    assert!(matches!(
        stale.extend(Duration::from_secs(5)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(stale.release().await, Err(LockError::LockLost)));
    // The newer holder's lock is untouched.
    let value: String = conn.get(&key).await.unwrap();
    assert_eq!(value, holder.token().hyphenated().to_string());
    assert!(!holder.is_lost());
    holder.release().await.unwrap();
}

#[tokio::test]
async fn extend_renews_and_a_vanished_lock_is_reported_lost() {
    let prefix = common::unique_prefix("redis_extend");
    let lock = lock_with(&prefix, LockConfig::new().ttl(Duration::from_secs(2))).await;
    let guard = lock.try_acquire("extend-me").await.unwrap();
    guard.extend(Duration::from_secs(20)).await.unwrap();
    let mut conn = raw().await;
    let key = lock.redis_key("extend-me");
    let pttl: i64 = conn.pttl(&key).await.unwrap();
    assert!(pttl > 10_000, "extend did not reach Redis: {pttl}");
    assert!(guard.remaining().unwrap() > Duration::from_secs(10));

    // Someone deletes the key (an operator, a failover): the next extend finds it gone.
    let _: i64 = conn.del(&key).await.unwrap();
    assert!(!guard.is_lost());
    assert!(matches!(
        guard.extend(Duration::from_secs(1)).await,
        Err(LockError::LockLost)
    ));
    assert!(guard.is_lost());
}

#[tokio::test]
async fn awkward_keys_each_lock_exactly_themselves_and_touch_nothing_else() {
    let prefix = common::unique_prefix("redis_keys");
    let lock = lock_with(&prefix, LockConfig::new()).await;
    let awkward = [
        "with space",
        "star*",
        "*",
        "{",
        "}",
        "{tag}",
        "a}b{c",
        "%7B",
        "%",
        "line\nbreak",
        "tab\tand\r",
        "日本語のキー",
        "emoji 🔒",
        "nul\0byte",
        "'; DEL everything; --",
        "]]-- lua",
    ];
    // Bystander keys that a broken escaping or glob would hit.
    let mut conn = raw().await;
    let bystanders = [
        format!("{prefix}bystander"),
        format!("{prefix}{{"),
        format!("{prefix}{{*"),
        format!("{prefix}{{*}}x"),
        format!("{prefix}*"),
    ];
    for (i, name) in bystanders.iter().enumerate() {
        let _: () = conn.set(name, i).await.unwrap();
    }

    let mut guards = Vec::new();
    for key in awkward {
        let guard = lock.try_acquire(key).await.unwrap();
        assert_eq!(guard.key(), key);
        guards.push(guard);
        // Every key taken so far is held; every other one is still free.
        for other in awkward {
            let held = lock.is_locked(other).await.unwrap();
            let expected = guards.iter().any(|g| g.key() == other);
            assert_eq!(held, expected, "{key:?} affected {other:?}");
        }
    }
    // One Redis key per lock, plus one fence counter; all keys of a lock share a hash tag.
    let keys = keys_under(&prefix).await;
    assert_eq!(keys.len(), bystanders.len() + 2 * awkward.len(), "{keys:?}");
    for key in awkward {
        let lock_key = lock.redis_key(key);
        assert!(keys.contains(&lock_key));
        assert!(keys.contains(&format!("{lock_key}:fence")));
        assert_eq!(hash_tag(&lock_key), hash_tag(&format!("{lock_key}:fence")));
    }
    let tags: std::collections::HashSet<_> = awkward
        .iter()
        .map(|k| hash_tag(&lock.redis_key(k)).to_owned())
        .collect();
    assert_eq!(tags.len(), awkward.len());

    for guard in guards {
        guard.release().await.unwrap();
    }
    for (i, name) in bystanders.iter().enumerate() {
        let value: usize = conn.get(name).await.unwrap();
        assert_eq!(value, i, "{name:?} was changed");
    }
    for key in awkward {
        assert!(!lock.is_locked(key).await.unwrap());
    }
}

/// Redis Cluster's hash tag of a key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[tokio::test]
async fn bad_keys_and_configurations_are_refused_and_write_nothing() {
    let prefix = common::unique_prefix("redis_bad");
    let lock = lock_with(&prefix, LockConfig::new()).await;
    common::suites::assert_bad_keys_refused(&lock).await;
    // A bad configuration is refused when the lock is built: build() and try_new return the
    // error, new() panics with it.
    let zero_ttl = LockConfig::new().ttl(Duration::ZERO);
    assert!(matches!(
        RedisDistributedLock::builder(pool().await)
            .key_prefix(prefix.clone())
            .config(zero_ttl)
            .build(),
        Err(LockError::InvalidConfig { .. })
    ));
    assert!(matches!(
        RedisDistributedLock::try_new(pool().await, zero_ttl),
        Err(LockError::InvalidConfig { .. })
    ));
    let pool_for_new = pool().await;
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        RedisDistributedLock::new(pool_for_new, zero_ttl)
    }))
    .expect_err("new() took a zero TTL");
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("invalid lock configuration: ttl"),
        "{message}"
    );

    for builder in [
        RedisDistributedLock::builder(pool().await).key_prefix("a{b"),
        RedisDistributedLock::builder(pool().await).key_prefix("a}b"),
        RedisDistributedLock::builder(pool().await).command_timeout(Duration::ZERO),
        RedisDistributedLock::builder(pool().await).fence_retention(Duration::ZERO),
        RedisDistributedLock::builder(pool().await).auto_extend(
            k1s0_distributed_lock::AutoExtend::new(Duration::from_secs(1)).renew_fraction(1.5),
        ),
        RedisDistributedLock::builder(pool().await)
            .auto_extend(k1s0_distributed_lock::AutoExtend::new(Duration::ZERO)),
    ] {
        assert!(matches!(
            builder.build(),
            Err(LockError::InvalidConfig { .. })
        ));
    }
    assert!(keys_under(&prefix).await.is_empty());
    // The default prefix namespace was not written either (the lock nor its other keys).
    assert!(keys_under("lock:{k}").await.is_empty());
}

#[tokio::test]
async fn dropping_a_guard_releases_it_promptly() {
    let prefix = common::unique_prefix("redis_drop");
    let lock = lock_with(&prefix, LockConfig::new()).await;
    let guard = lock.try_acquire("dropped").await.unwrap();
    drop(guard);
    // A waiter is woken by the background release (the TTL is 30 s, the budget 1 s).
    let next = lock.acquire("dropped").await.unwrap();
    next.release().await.unwrap();
    assert!(keys_under(&prefix)
        .await
        .iter()
        .all(|k| k.ends_with(":fence")));
}

#[tokio::test]
async fn a_zero_budget_acquire_of_a_held_key_times_out_at_once() {
    let prefix = common::unique_prefix("redis_zero_budget");
    let config = LockConfig::new().max_retries(0);
    let lock = lock_with(&prefix, config).await;
    let guard = lock.acquire("k").await.unwrap();
    assert!(matches!(lock.acquire("k").await, Err(LockError::Timeout)));
    guard.release().await.unwrap();
}

#[tokio::test]
async fn acquire_times_out_after_its_budget_and_leaves_the_queue() {
    let prefix = common::unique_prefix("redis_timeout");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .max_retries(5);
    let lock = lock_with(&prefix, config).await;
    let guard = lock.try_acquire("busy").await.unwrap();
    assert!(matches!(
        lock.acquire("busy").await,
        Err(LockError::Timeout)
    ));
    let mut conn = raw().await;
    let queue = format!("{}:waiters", lock.redis_key("busy"));
    let waiting: i64 = conn.zcard(&queue).await.unwrap();
    assert_eq!(waiting, 0, "a timed-out waiter stayed queued");
    guard.release().await.unwrap();
}

#[tokio::test]
async fn cancelled_acquires_leave_no_lock_and_no_queue_entry() {
    let prefix = common::unique_prefix("redis_cancel");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(50))
        .max_retries(100);
    let lock = lock_with(&prefix, config).await;
    let key = "contended";
    let redis_key = lock.redis_key(key);
    let conn = raw().await;

    // A waiter queued behind a holder (of another lock object: a waiter of the holder's own
    // would wait in the process, not in Redis) is cancelled: it must leave the queue.
    let holding = lock_with(&prefix, LockConfig::new()).await;
    let holder = holding.try_acquire(key).await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire(key).await }
    });
    let waiters = format!("{redis_key}:waiters");
    assert_eventually("the waiter is queued", || {
        let mut conn = conn.clone();
        let waiters = waiters.clone();
        async move { conn.zcard::<_, i64>(&waiters).await.unwrap() == 1 }
    })
    .await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eventually("the cancelled waiter left the queue", || {
        let mut conn = conn.clone();
        let waiters = waiters.clone();
        async move { conn.zcard::<_, i64>(&waiters).await.unwrap() == 0 }
    })
    .await;
    holder.release().await.unwrap();
    // Nobody is promised the lock, so a plain try gets it at once.
    lock.try_acquire(key)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // Cancel acquires and tries at every point in their life (each suspension in turn, the
    // last counts beyond the end): nothing may stay behind.
    let (mut cancelled, mut completed) = (0, 0);
    for round in 0..120usize {
        let suspensions = round / 2 % 12 + 1;
        let finished = if round % 2 == 0 {
            common::cancel::drop_at_suspension(lock.try_acquire(key), suspensions)
                .await
                .is_some()
        } else {
            common::cancel::drop_at_suspension(lock.acquire(key), suspensions)
                .await
                .is_some()
        };
        if finished {
            completed += 1;
        } else {
            cancelled += 1;
        }
    }
    assert!(
        cancelled > 0 && completed > 0,
        "{cancelled} cancelled, {completed} completed: the cuts missed the calls"
    );
    assert_eventually("every interrupted acquire was cleaned up", || {
        let mut conn = conn.clone();
        let redis_key = redis_key.clone();
        let waiters = waiters.clone();
        async move {
            !conn.exists::<_, bool>(&redis_key).await.unwrap()
                && conn.zcard::<_, i64>(&waiters).await.unwrap() == 0
        }
    })
    .await;
    let guard = lock.try_acquire(key).await.unwrap();
    guard.release().await.unwrap();
}

#[tokio::test]
async fn a_crashed_waiter_holds_up_the_queue_only_until_its_entry_times_out() {
    let prefix = common::unique_prefix("redis_crashed_waiter");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .max_retries(250);
    let lock = lock_with(&prefix, config).await;
    let redis_key = lock.redis_key("k");
    let (line, waiters) = (format!("{redis_key}:line"), format!("{redis_key}:waiters"));
    // A waiter queued itself and then its process died: its entry stays until its deadline.
    let mut conn = raw().await;
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let deadline_ms = seconds * 1000 + micros / 1000 + 300;
    let ghost = "00000000-0000-4000-8000-000000000000";
    let _: () = conn.zadd(&line, ghost, 1).await.unwrap();
    let _: () = conn.zadd(&waiters, ghost, deadline_ms).await.unwrap();

    // The free lock is promised to the ghost for now…
    assert!(lock.is_locked("k").await.unwrap());
    assert!(matches!(
        lock.try_acquire("k").await,
        Err(LockError::AlreadyLocked)
    ));
    // …but a waiter gets it once the ghost's entry runs out.
    let guard = lock.acquire("k").await.unwrap();
    let left: i64 = conn.zcard(&line).await.unwrap();
    assert_eq!(left, 0, "the ghost entry was not dropped");
    guard.release().await.unwrap();
}

#[tokio::test]
async fn waiters_subscribe_to_the_release_channel_only_while_they_wait() {
    let prefix = common::unique_prefix("redis_subscription");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(100))
        .max_retries(50);
    let lock = lock_with(&prefix, config).await;
    let lock_key = lock.redis_key("k");
    let conn = raw().await;
    let subscribers = |conn: &redis::aio::MultiplexedConnection| {
        let (conn, lock_key) = (conn.clone(), lock_key.clone());
        async move { common::redis_conn::subscribed_waiters(&conn, &lock_key).await }
    };
    // Held by another lock object: only a waiter that waits in Redis subscribes.
    let holding = lock_with(&prefix, LockConfig::new()).await;
    let holder = holding.try_acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire("k").await }
    });
    assert_eventually("the waiter subscribes", || async {
        subscribers(&conn).await == 1
    })
    .await;
    holder.release().await.unwrap();
    let guard = waiter.await.unwrap().unwrap();
    assert_eventually("the channel is unsubscribed", || async {
        subscribers(&conn).await == 0
    })
    .await;
    guard.release().await.unwrap();
}
