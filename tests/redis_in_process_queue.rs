//! The tasks of one Redis lock object queue per key in the process: a guard kept past its TTL
//! does not keep them off a key Redis has freed, and a cancelled first-in-line does not make the
//! tasks behind it report a healthy server as silent.
#![cfg(feature = "redis")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::FaultProxy;
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
