//! Redis behind an address that is re-pointed after a failover (as DNS-based failover does),
//! with `redis-server` processes of the test's own: the lock follows the new primary, both
//! when the old one keeps answering as a replica (`READONLY`) and when it keeps answering as a
//! primary (the connection's maximum age).
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use common::redis_server::RedisServer;

use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::{DistributedLock, LockError, RedisDistributedLock};

/// A lock that reaches Redis through `proxy`.
async fn lock_through(proxy: &FaultProxy, prefix: &str, max_age: Duration) -> RedisDistributedLock {
    let url = format!("redis://{}", proxy.address());
    RedisDistributedLock::builder(common::redis_conn::pool(&url, 2).await)
        .key_prefix(prefix)
        .connection_max_age(max_age)
        .build()
        .unwrap()
}

/// Runs `command` on `server` and expects `OK`.
async fn run(server: &RedisServer, command: &mut redis::Cmd) {
    let mut connection = common::redis_conn::connection(&server.url()).await;
    let () = command.query_async(&mut connection).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_follows_a_failover_that_leaves_the_old_primary_as_a_replica() {
    // A replica's first sync starts at once, not after the default 5 s delay.
    let old = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]).await;
    let new = RedisServer::start_with(&["--replicaof", "127.0.0.1", &old.port().to_string()]).await;
    new.await_info("replication", "master_link_status:up").await;
    let proxy = FaultProxy::start(old.address()).await;
    let prefix = common::unique_prefix("redis_failover_readonly");
    let lock = lock_through(&proxy, &prefix, Duration::from_secs(3600)).await;
    let earlier = lock.try_acquire("k").await.unwrap();
    let earlier_token = earlier.fencing_token();
    earlier.release().await.unwrap();
    let mut primary = common::redis_conn::connection(&old.url()).await;
    let acknowledged: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut primary)
        .await
        .unwrap();
    assert_eq!(
        acknowledged, 1,
        "the replica has the writes before the failover"
    );

    // The replica is promoted, the old primary follows it, and the address points at the new
    // primary; the lock's open connection still reaches the old one.
    run(&new, redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    run(
        &old,
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(new.port()),
    )
    .await;
    proxy.repoint(new.address());
    let refused = lock.try_acquire("k").await;
    assert!(
        matches!(&refused, Err(LockError::BackendError(error)) if error.to_string().contains("read only replica")),
        "the old primary answered {refused:?}"
    );
    // That answer dropped the connection: the next call reaches the new primary.
    let guard = lock
        .try_acquire("k")
        .await
        .expect("the lock follows the failover");
    assert!(new.has_key(&lock.redis_key("k")).await);
    assert!(guard.fencing_token() > earlier_token);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_follows_a_repointed_address_within_the_connection_age() {
    let first = RedisServer::start().await;
    let second = RedisServer::start().await;
    let proxy = FaultProxy::start(first.address()).await;
    let prefix = common::unique_prefix("redis_failover_age");
    let max_age = Duration::from_millis(300);
    let lock = lock_through(&proxy, &prefix, max_age).await;
    let key = lock.redis_key("k");
    common::redis_conn::take_and_release(&lock, "k").await;

    // Both servers answer as primaries: no error tells the lock to move.
    proxy.repoint(second.address());
    let guard = lock.try_acquire("k").await.unwrap();
    assert!(
        first.has_key(&key).await,
        "within its age the connection stays"
    );
    guard.release().await.unwrap();

    // The age is the signal under test: once it has passed, the next command reconnects.
    tokio::time::sleep(max_age).await;
    let guard = lock.try_acquire("k").await.unwrap();
    assert!(
        second.has_key(&key).await,
        "past its age the connection was replaced"
    );
    assert!(!first.has_key(&key).await);
    guard.release().await.unwrap();
}
