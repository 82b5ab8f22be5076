//! Replica acknowledgement (`replica_acks`) with a real primary and replica (`redis-server`
//! processes of the test's own; the replica reaches the primary through a fault proxy, so the
//! test can delay or cut replication): a lock acquired with it survives the primary's death
//! and the replica's promotion; without it, a lock the replica missed is lost in the failover
//! and a second holder gets in; with it, an acquire or extend that no replica acknowledges is
//! refused (the acquire gives the lock up, the extend keeps it).
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::FaultProxy;
use common::redis_server::RedisServer;
use tokio::time::Instant;

use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::{
    AutoExtend, DistributedLock, LockConfig, LockError, RedisDistributedLock,
    RedisDistributedLockBuilder,
};

/// A primary and a replica that reaches it through `link`.
struct Replicated {
    primary: RedisServer,
    replica: RedisServer,
    link: Arc<FaultProxy>,
}

impl Replicated {
    async fn start() -> Replicated {
        // A replica's first sync starts at once, not after the default 5 s delay.
        let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]).await;
        let link = FaultProxy::start(primary.address()).await;
        let link_port = link.address().port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &link_port]).await;
        replica
            .await_info("replication", "master_link_status:up")
            .await;
        // The primary counts the replica's acknowledgements once it has finished the sync.
        primary.await_info("replication", "state=online").await;
        Replicated {
            primary,
            replica,
            link,
        }
    }

    /// The primary dies (`SIGKILL`), whatever it had not yet passed to the replica is lost
    /// with it (the link is cut, also what the proxy was still holding back), and the replica
    /// is promoted.
    async fn fail_over(&mut self) {
        self.primary.kill();
        self.link.refuse_new();
        self.link.cut_all();
        let mut connection = common::redis_conn::connection(&self.replica.url()).await;
        let () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

/// A lock builder on the server at `url` (30 s TTL), keys under `prefix`.
async fn builder_on(url: &str, prefix: &str) -> RedisDistributedLockBuilder {
    RedisDistributedLock::builder(common::redis_conn::pool(url, 2).await)
        .key_prefix(prefix)
        .config(LockConfig::new().ttl(Duration::from_secs(30)))
}

/// The remaining time to live of `key` on the server at `url`, in milliseconds.
async fn pttl(url: &str, key: &str) -> i64 {
    let mut connection = common::redis_conn::connection(url).await;
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Asserts that `result` is a `BackendError` whose message contains `needle`.
fn assert_not_acknowledged<T: std::fmt::Debug>(result: &Result<T, LockError>, needle: &str) {
    assert!(
        matches!(result, Err(LockError::BackendError(error)) if error.to_string().contains(needle)),
        "expected a BackendError saying {needle:?}, got {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_lock_survives_the_failover() {
    let mut servers = Replicated::start().await;
    // The lock reaches the primary through `front`, re-pointed to the promoted replica after
    // the failover (as a DNS name would be).
    let front = FaultProxy::start(servers.primary.address()).await;
    let prefix = common::unique_prefix("redis_acks_survives");
    let lock = builder_on(&format!("redis://{}", front.address()), &prefix)
        .await
        .replica_acks(1, Duration::from_secs(2))
        .build()
        .unwrap();
    // Replication lags by 100 ms: without waiting for the replica, the lock would still be on
    // its way when the primary dies.
    servers.link.set_latency(Duration::from_millis(100));
    let guard = lock.try_acquire("k").await.expect("acknowledged in time");

    servers.fail_over().await;
    front.repoint(servers.replica.address());
    front.cut_all();

    let new_primary = builder_on(&servers.replica.url(), &prefix)
        .await
        .build()
        .unwrap();
    assert!(
        new_primary.is_locked("k").await.unwrap(),
        "the lock did not survive the failover"
    );
    assert!(matches!(
        new_primary.try_acquire("k").await,
        Err(LockError::AlreadyLocked)
    ));
    // The holder's lock object follows the failover (its first command finds the connection
    // gone) and still holds the lock there.
    common::wait::assert_eventually("the holder's lock object reaches the new primary", || {
        let lock = lock.clone();
        async move { matches!(lock.is_locked("k").await, Ok(true)) }
    })
    .await;
    let token = guard.fencing_token();
    guard
        .release()
        .await
        .expect("the holder still holds the lock on the new primary");
    let next = new_primary.try_acquire("k").await.unwrap();
    assert!(next.fencing_token() > token);
    next.release().await.unwrap();
}

/// The replica misses everything from here on: the link forwards nothing, also no
/// acknowledgement back to the primary.
fn cut_replication_off(servers: &Replicated) {
    servers.link.stall();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_acks_a_lock_the_replica_missed_is_lost_in_the_failover() {
    let mut servers = Replicated::start().await;
    let prefix = common::unique_prefix("redis_acks_lost");
    let lock = builder_on(&servers.primary.url(), &prefix)
        .await
        .build()
        .unwrap();
    cut_replication_off(&servers);
    let first = lock.try_acquire("k").await.expect("granted by the primary");

    servers.fail_over().await;

    // The documented weakness of asynchronous replication: a second holder gets in while the
    // first still believes it holds the lock (its lease has 30 s left).
    let new_primary = builder_on(&servers.replica.url(), &prefix)
        .await
        .build()
        .unwrap();
    let second = new_primary
        .try_acquire("k")
        .await
        .expect("the promoted replica never saw the first lock");
    assert!(!first.is_lost());
    // What still holds: the second holder's fencing token is the larger one, so a resource
    // that checks tokens refuses the first holder's writes from now on.
    assert!(second.fencing_token() > first.fencing_token());
    second.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acks_a_lock_the_replica_missed_is_refused_and_given_up() {
    let mut servers = Replicated::start().await;
    let prefix = common::unique_prefix("redis_acks_refused");
    let timeout = Duration::from_millis(300);
    let lock = builder_on(&servers.primary.url(), &prefix)
        .await
        .replica_acks(1, timeout)
        .build()
        .unwrap();
    cut_replication_off(&servers);
    let started = Instant::now();
    let refused = lock.try_acquire("k").await;
    let took = started.elapsed();
    assert_not_acknowledged(&refused, "0 of the 1 Redis replicas asked for acknowledged");
    assert_not_acknowledged(&refused, "given back");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(
        !servers.primary.has_key(&lock.redis_key("k")).await,
        "the refused lock was left on the primary"
    );

    servers.fail_over().await;
    let new_primary = builder_on(&servers.replica.url(), &prefix)
        .await
        .build()
        .unwrap();
    new_primary
        .try_acquire("k")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acks_and_no_replica_an_acquire_fails_and_leaves_nothing_locked() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_acks_alone");
    let timeout = Duration::from_millis(200);
    let lock = builder_on(&server.url(), &prefix)
        .await
        .replica_acks(1, timeout)
        .build()
        .unwrap();
    for waiting in [false, true] {
        let started = Instant::now();
        let refused = if waiting {
            lock.acquire("k").await
        } else {
            lock.try_acquire("k").await
        };
        let took = started.elapsed();
        assert_not_acknowledged(&refused, "0 of the 1 Redis replicas asked for acknowledged");
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "waiting {waiting}: took {took:?}"
        );
        assert!(!lock.is_locked("k").await.unwrap());
        assert!(!server.has_key(&lock.redis_key("k")).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acks_an_unacknowledged_extend_fails_and_keeps_the_lock() {
    let servers = Replicated::start().await;
    let prefix = common::unique_prefix("redis_acks_extend");
    let lock = builder_on(&servers.primary.url(), &prefix)
        .await
        .config(LockConfig::new().ttl(Duration::from_secs(5)))
        .replica_acks(1, Duration::from_secs(1))
        .build()
        .unwrap();
    let key = lock.redis_key("k");
    let guard = lock.try_acquire("k").await.unwrap();

    // Acknowledged: when extend returns, the replica has the renewal, though replication
    // lags by 50 ms.
    servers.link.set_latency(Duration::from_millis(50));
    guard.extend(Duration::from_secs(20)).await.unwrap();
    assert!(pttl(&servers.replica.url(), &key).await > 10_000);

    // Not acknowledged: an error, the primary keeps the renewed lock, the guard its lease.
    cut_replication_off(&servers);
    let before = guard.remaining().unwrap();
    let refused = guard.extend(Duration::from_secs(60)).await;
    assert_not_acknowledged(&refused, "0 of the 1 Redis replicas asked for acknowledged");
    assert_not_acknowledged(&refused, "stays renewed on the primary");
    assert!(pttl(&servers.primary.url(), &key).await > 50_000);
    assert!(!guard.is_lost());
    assert!(
        guard.remaining().unwrap() <= before,
        "the lease was renewed by an unacknowledged extend"
    );

    servers.link.heal().await;
    guard.release().await.unwrap();
    assert!(!servers.primary.has_key(&key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acks_a_watchdog_whose_renewals_go_unacknowledged_loses_the_guard() {
    let servers = Replicated::start().await;
    let prefix = common::unique_prefix("redis_acks_watchdog");
    let ttl = Duration::from_millis(600);
    let lock = builder_on(&servers.primary.url(), &prefix)
        .await
        .config(LockConfig::new().ttl(ttl))
        .replica_acks(1, Duration::from_millis(100))
        .auto_extend(AutoExtend::new(Duration::from_secs(60)))
        .build()
        .unwrap();
    let guard = lock.try_acquire("k").await.unwrap();
    cut_replication_off(&servers);
    let cut_at = Instant::now();
    tokio::time::timeout(ttl + Duration::from_secs(2), guard.lost())
        .await
        .expect("the guard stayed valid without acknowledged renewals");
    assert!(
        cut_at.elapsed() <= ttl + Duration::from_millis(500),
        "lost only after {:?}",
        cut_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_cancelled_while_it_waits_for_replicas_gives_the_lock_up() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_acks_cancelled");
    // The acknowledgement timeout is longer than the command timeout: the clean-up waits
    // behind the `WAIT` on the same connection for longer than a command may take.
    let lock = builder_on(&server.url(), &prefix)
        .await
        .command_timeout(Duration::from_millis(200))
        .replica_acks(1, Duration::from_millis(1500))
        .build()
        .unwrap();
    let key = lock.redis_key("k");
    let cancelled = tokio::time::timeout(Duration::from_millis(300), lock.try_acquire("k")).await;
    assert!(cancelled.is_err(), "not cancelled: {cancelled:?}");
    assert!(
        server.has_key(&key).await,
        "the lock is taken while its WAIT runs"
    );
    // Freed once the WAIT is over, long before its 30 s TTL.
    let server = &server;
    common::wait::assert_eventually("the cancelled acquire's lock is freed", || {
        let key = key.clone();
        async move { !server.has_key(&key).await }
    })
    .await;
    assert!(!lock.is_locked("k").await.unwrap());
}

#[tokio::test]
async fn replica_ack_settings_are_checked() {
    let manager =
        k1s0_distributed_lock::bb8_redis::RedisConnectionManager::new("redis://127.0.0.1:1")
            .unwrap();
    let pool = k1s0_distributed_lock::bb8_redis::bb8::Pool::builder().build_unchecked(manager);
    let build = |replicas, timeout| {
        RedisDistributedLock::builder(pool.clone())
            .replica_acks(replicas, timeout)
            .build()
    };
    for (replicas, timeout) in [
        (0, Duration::from_secs(1)),
        (1, Duration::ZERO),
        (1, Duration::from_micros(999)),
        (
            1,
            k1s0_distributed_lock::MAX_DURATION + Duration::from_secs(1),
        ),
    ] {
        let refused = build(replicas, timeout);
        assert!(
            matches!(refused, Err(LockError::InvalidConfig { .. })),
            "replicas {replicas}, timeout {timeout:?}: {refused:?}"
        );
    }
    let lock = build(2, Duration::from_millis(1)).unwrap();
    assert!(format!("{lock:?}").contains("replica_acks: Some((2, 1ms))"));
}
