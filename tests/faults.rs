//! Faults injected for real through a TCP proxy, per server backend: a holder cut off from the
//! server, a stalled server, and recovery of the same lock object.

#![cfg(any(feature = "postgres", feature = "redis"))]

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::time::Duration;

use common::backends::Backend;
use common::faults::{
    held_for_the_whole_budget_is_a_timeout, holder_cut_off, slow_network,
    stall_while_waiting_is_a_backend_error, stalled_acquires_fail_as_backend_errors,
    stalled_server, waiting_layer_over_a_stalled_server_answers_503,
};
use common::proxy::FaultProxy;
use k1s0_distributed_lock::LockConfig;

/// The command timeout the faulty locks run with: every call must end within about this.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// TTL of the locks in these tests: the longest a cut-off holder can keep a key from others
/// on Redis (on PostgreSQL the session ends with the connection, far sooner).
const TTL: Duration = Duration::from_secs(2);

fn config() -> LockConfig {
    LockConfig::new()
        .ttl(TTL)
        .retry_interval(Duration::from_millis(50))
        .max_retries(10)
}

/// A lock on `backend` whose every connection goes through a fault proxy of its own.
async fn lock_through_proxy(
    backend: Backend,
    config: LockConfig,
    command_timeout: Duration,
) -> (std::sync::Arc<FaultProxy>, common::backends::AnyLock) {
    let proxy = FaultProxy::start(backend.server_address().await).await;
    let url = backend.url_via(proxy.address()).await;
    let lock = backend
        .lock_at(Some(url), config, Some(command_timeout))
        .await;
    (proxy, lock)
}

async fn through_proxy(
    backend: Backend,
) -> (std::sync::Arc<FaultProxy>, common::backends::AnyLock) {
    lock_through_proxy(backend, config(), COMMAND_TIMEOUT).await
}

server_backend_tests!(
    a_slow_network_only_slows_locking_down,
    a_holder_cut_off_loses_its_lock_to_the_next_client,
    a_stalled_server_gives_errors_within_the_budget_and_recovers
);

async fn a_holder_cut_off_loses_its_lock_to_the_next_client(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    // The other client may wait for the whole TTL, and its own lock must outlive the checks.
    let direct = backend
        .lock(
            config()
                .ttl(Duration::from_secs(30))
                .retry_interval(Duration::from_millis(100))
                .max_retries(100),
        )
        .await;
    let key = format!("{}cut", common::unique_prefix("fault"));
    let measured = holder_cut_off(&via_proxy, &direct, &proxy, &key, TTL).await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_slow_network_only_slows_locking_down(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    let direct = backend.lock(config().ttl(Duration::from_secs(30))).await;
    let key = format!("{}slow", common::unique_prefix("fault"));
    // Below the command timeout, so every command still makes it.
    let measured = slow_network(&via_proxy, &direct, &proxy, &key, Duration::from_millis(40)).await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_stalled_server_gives_errors_within_the_budget_and_recovers(backend: Backend) {
    let (proxy, via_proxy) = through_proxy(backend).await;
    let key = format!("{}stall", common::unique_prefix("fault"));
    // try_acquire: one command timeout; acquire: its budget (500 ms) plus one command timeout.
    let limit = config().wait_budget() + COMMAND_TIMEOUT * 2;
    let measured = stalled_server(&via_proxy, &proxy, &key, limit).await;
    println!("{}: {measured:?}", backend.name());
}

/// Found by review: with the pub/sub connection unresponsive, a waiter used to block on its
/// subscription for a whole command timeout, let its queue entry lapse, and lose its turn.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiters_keep_their_turn_when_pub_sub_is_unresponsive() {
    use k1s0_distributed_lock::bb8_redis::redis;
    use k1s0_distributed_lock::DistributedLock;

    let url = common::redis_url().await;
    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    proxy.stall();
    let proxy_url = format!("redis://{}", proxy.address());
    // Waiters on two lock objects and the holder on a third, as three processes: the waiters
    // of one lock object queue in the process, and only the first of them in Redis.
    let waiting_lock = || async {
        common::redis_conn::lock_builder(&url, &proxy_url)
            .await
            .config(
                LockConfig::new()
                    .ttl(Duration::from_secs(10))
                    .retry_interval(Duration::from_millis(100))
                    .max_retries(50),
            )
            .key_prefix("k1s0test:")
            .command_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    };
    let (lock, other) = (waiting_lock().await, waiting_lock().await);
    let key = format!("{}turns", common::unique_prefix("pubsub-stall"));
    let queue = format!("{}:line", lock.redis_key(&key));
    let connection = common::redis_conn::connection(&url).await;
    let queue_length = move || {
        let queue = queue.clone();
        let mut connection = connection.clone();
        async move {
            redis::cmd("ZCARD")
                .arg(&queue)
                .query_async::<usize>(&mut connection)
                .await
                .unwrap()
        }
    };

    let holding = common::redis_conn::lock_builder(&url, &url)
        .await
        .key_prefix("k1s0test:")
        .build()
        .unwrap();
    let holder = holding.try_acquire(&key).await.unwrap();
    let first = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await.unwrap() }
    });
    assert!(
        common::wait::eventually(Duration::from_secs(5), || {
            let f = queue_length();
            async move { f.await == 1 }
        })
        .await
    );
    let second = tokio::spawn({
        let (other, key) = (other.clone(), key.clone());
        async move { other.acquire(&key).await.unwrap() }
    });
    assert!(
        common::wait::eventually(Duration::from_secs(5), || {
            let f = queue_length();
            async move { f.await == 2 }
        })
        .await
    );
    holding.release(holder).await.unwrap();
    let first = first.await.unwrap();
    let first_fence = first.fencing_token();
    drop(first);
    let second = second.await.unwrap();
    assert!(
        first_fence < second.fencing_token(),
        "the second waiter took the first one's turn"
    );
}

/// Found by review: a waiter with a 2 ms poll interval cut every pub/sub connection attempt
/// short at 2 ms, so over a link slower than that no waiter ever got subscribed.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiters_get_subscribed_over_a_pub_sub_link_slower_than_their_poll() {
    use k1s0_distributed_lock::bb8_redis::redis;
    use k1s0_distributed_lock::DistributedLock;

    let url = common::redis_url().await;
    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    proxy.set_latency(Duration::from_millis(10));
    let proxy_url = format!("redis://{}", proxy.address());
    let lock = common::redis_conn::lock_builder(&url, &proxy_url)
        .await
        .config(
            LockConfig::new()
                .retry_interval(Duration::from_millis(2))
                .max_retries(5_000),
        )
        .key_prefix("k1s0test:")
        .build()
        .unwrap();
    let key = format!("{}slow-pubsub", common::unique_prefix("pubsub-slow"));
    // The waiter's own channel, `<lock key>:released:<its token>`.
    let channels = format!("{}:released:*", lock.redis_key(&key));
    let connection = common::redis_conn::connection(&url).await;

    // Held by another lock object (another process): a waiter of the holder's own lock object
    // would wait in the process and never subscribe.
    let other = common::redis_conn::lock_builder(&url, &url)
        .await
        .key_prefix("k1s0test:")
        .build()
        .unwrap();
    let holder = other.try_acquire(&key).await.unwrap();
    let waiter = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await }
    });
    common::wait::assert_eventually("the waiter subscribes to the release channel", || {
        let (mut connection, channels) = (connection.clone(), channels.clone());
        async move {
            let subscribed: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&channels)
                .query_async(&mut connection)
                .await
                .unwrap();
            subscribed.len() == 1
        }
    })
    .await;
    other.release(holder).await.unwrap();
    lock.release(waiter.await.unwrap().unwrap()).await.unwrap();
}

/// Budget and command timeout of the stall tests below: a budget well under the command
/// timeout, so that a caller reporting `Timeout` at the end of its budget is told apart from
/// one that waited for the server's (missing) answer.
const STALL_BUDGET: Duration = Duration::from_millis(500);
const STALL_COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);

fn stall_config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(20))
        .max_retries(25)
}

/// Every caller must be answered within about the budget plus one command timeout.
fn stall_limit() -> Duration {
    assert_eq!(stall_config().wait_budget(), STALL_BUDGET);
    STALL_BUDGET + STALL_COMMAND_TIMEOUT + Duration::from_millis(500)
}

async fn stall_through_proxy(
    backend: Backend,
) -> (std::sync::Arc<FaultProxy>, common::backends::AnyLock) {
    lock_through_proxy(backend, stall_config(), STALL_COMMAND_TIMEOUT).await
}

server_backend_tests!(
    acquires_on_a_stalled_server_are_backend_errors_not_timeouts,
    a_waiting_layer_over_a_stalled_server_answers_503_not_409
);

backend_tests!(a_key_held_for_the_whole_budget_is_a_timeout);

async fn acquires_on_a_stalled_server_are_backend_errors_not_timeouts(backend: Backend) {
    let (proxy, via_proxy) = stall_through_proxy(backend).await;
    let key = format!("{}stalled-acquires", common::unique_prefix("fault"));
    let measured =
        stalled_acquires_fail_as_backend_errors(&via_proxy, &proxy, &key, stall_limit()).await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_waiting_layer_over_a_stalled_server_answers_503_not_409(backend: Backend) {
    let (proxy, via_proxy) = stall_through_proxy(backend).await;
    let prefix = common::unique_prefix("fault-layer");
    let measured =
        waiting_layer_over_a_stalled_server_answers_503(&via_proxy, &proxy, &prefix, stall_limit())
            .await;
    println!("{}: {measured:?}", backend.name());
}

async fn a_key_held_for_the_whole_budget_is_a_timeout(backend: Backend) {
    let holder = backend.lock(stall_config()).await;
    let prefix = common::unique_prefix("held");
    // No server trouble here: the callers end about when their budget does.
    let limit = STALL_BUDGET + Duration::from_millis(500);
    // Held by the same lock object (on PostgreSQL the holder's claim is ahead of the callers
    // in the process)...
    let key = format!("{prefix}same-object");
    held_for_the_whole_budget_is_a_timeout(&holder, &holder, &key, STALL_BUDGET, limit).await;
    if backend != Backend::Memory {
        // ...and by another one (like another process: the first caller asks the server).
        let waiters = backend.lock(stall_config()).await;
        let key = format!("{prefix}other-object");
        held_for_the_whole_budget_is_a_timeout(&holder, &waiters, &key, STALL_BUDGET, limit).await;
    }
}

/// PostgreSQL: the first waiter is waiting on the server (its flag is set), the second is
/// queued in the process behind it; then the server stalls.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiters_stalled_while_waiting_get_backend_errors() {
    let (proxy, via_proxy) = stall_through_proxy(Backend::Postgres).await;
    let holder = Backend::Postgres.lock(stall_config()).await;
    let key = format!("{}stalled-waiters", common::unique_prefix("fault"));
    let admin = pg_support::pool(1).await;
    let measured = stall_while_waiting_is_a_backend_error(
        &holder,
        &via_proxy,
        &proxy,
        &key,
        stall_limit(),
        || async {
            let mut admin = admin.acquire().await.unwrap();
            pg_support::waiter_flags(&mut admin, &key).await > 0
        },
    )
    .await;
    println!("postgres: {measured:?}");
}

/// Redis: both waiters are in the key's wait queue; then the server stalls.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiters_stalled_while_waiting_get_backend_errors() {
    use k1s0_distributed_lock::bb8_redis::redis;

    let (proxy, via_proxy) = stall_through_proxy(Backend::Redis).await;
    let holder = Backend::Redis.lock(stall_config()).await;
    let key = format!("{}stalled-waiters", common::unique_prefix("fault"));
    let common::backends::AnyLock::Redis(redis_lock) = &via_proxy else {
        unreachable!("a Redis lock")
    };
    let queue = format!("{}:line", redis_lock.redis_key(&key));
    let connection = common::redis_conn::connection(&common::redis_url().await).await;
    let measured = stall_while_waiting_is_a_backend_error(
        &holder,
        &via_proxy,
        &proxy,
        &key,
        stall_limit(),
        || {
            let (mut connection, queue) = (connection.clone(), queue.clone());
            async move {
                redis::cmd("ZCARD")
                    .arg(&queue)
                    .query_async::<usize>(&mut connection)
                    .await
                    .unwrap()
                    == 1
            }
        },
    )
    .await;
    println!("redis: {measured:?}");
}
