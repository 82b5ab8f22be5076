//! Redis fencing tokens never repeat or go backwards, also when the `:fence` counter comes back
//! older than the tokens already handed out: a restart from an RDB snapshot taken mid-sequence
//! (a real `SAVE` on a `redis-server` of the test's own), and a counter rewound by hand.
#![cfg(feature = "redis")]

mod common;

use common::redis_server::RedisServer;

use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::{DistributedLock, RedisDistributedLock};

/// A lock on the server at `url`, keys under a prefix of this test's own.
async fn lock_on(url: &str, prefix: &str) -> RedisDistributedLock {
    RedisDistributedLock::builder(common::redis_conn::pool(url, 2).await)
        .key_prefix(prefix)
        .build()
        .unwrap()
}

/// Takes and releases `key` `times` times; the fencing tokens, in order.
async fn tokens(lock: &RedisDistributedLock, key: &str, times: usize) -> Vec<u64> {
    let mut tokens = Vec::with_capacity(times);
    for _ in 0..times {
        let guard = lock.try_acquire(key).await.unwrap();
        tokens.push(guard.fencing_token());
        guard.release().await.unwrap();
    }
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "{tokens:?}"
    );
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_an_older_snapshot_does_not_repeat_tokens() {
    let mut server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_fencing_snapshot");
    let lock = lock_on(&server.url(), &prefix).await;
    let mut handed_out = tokens(&lock, "k", 5).await;
    let mut admin = common::redis_conn::connection(&server.url()).await;
    let fence_key = format!("{}:fence", lock.redis_key("k"));
    let saved: String = redis::cmd("GET")
        .arg(&fence_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let () = redis::cmd("SAVE").query_async(&mut admin).await.unwrap();
    handed_out.extend(tokens(&lock, "k", 5).await);

    // Killed without saving, restarted from the snapshot: the counter is back where it was.
    server.restart().await;
    let mut admin = common::redis_conn::connection(&server.url()).await;
    let restored: String = redis::cmd("GET")
        .arg(&fence_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(restored, saved, "the restart did not load the snapshot");
    assert!(restored.parse::<u64>().unwrap() < *handed_out.last().unwrap());

    let lock = lock_on(&server.url(), &prefix).await;
    let next = lock.try_acquire("k").await.unwrap();
    assert!(
        next.fencing_token() > *handed_out.last().unwrap(),
        "token {} after the restart, earlier tokens {handed_out:?}",
        next.fencing_token()
    );
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewound_counter_does_not_repeat_tokens() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_fencing_rewound");
    let lock = lock_on(&url, &prefix).await;
    let handed_out = tokens(&lock, "k", 3).await;
    let holder = lock.try_acquire("k").await.unwrap();

    // The counter goes back below the tokens handed out, as a promoted replica that missed the
    // last writes would have it, while a holder holds the lock.
    let mut admin = common::redis_conn::connection(&url).await;
    let fence_key = format!("{}:fence", lock.redis_key("k"));
    let () = redis::cmd("SET")
        .arg(&fence_key)
        .arg(handed_out[0] - 1)
        .query_async(&mut admin)
        .await
        .unwrap();
    let current = holder.fencing_token();
    holder.release().await.unwrap();

    let next = lock.try_acquire("k").await.unwrap();
    assert!(
        next.fencing_token() > current,
        "token {} after the rewind, the last holder's {current}",
        next.fencing_token()
    );
    next.release().await.unwrap();
}
