//! Waiting at scale on Redis, against `redis-server` processes of the tests' own (their command
//! statistics are the tests' alone): waiters whose release channel is subscribed keep a
//! long-lived place in line and look at the lock about once a second; a pub/sub connection
//! that stops answering is noticed and its waiters poll until it is back; the channels of many
//! waiting keys are subscribed together.
#![cfg(feature = "redis")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::FaultProxy;
use common::redis_server::RedisServer;
use common::wait::{assert_eventually, assert_eventually_within};
use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::{DistributedLock, LockConfig, RedisDistributedLock};

/// 100 ms between looks for a poller, whose place in line lives 3 × 100 + 200 ms.
fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(60))
        .retry_interval(Duration::from_millis(100))
        .wait_timeout(Duration::from_secs(60))
}

/// A poller's place lives 500 ms; a subscribed waiter's 3.2 s.
const POLLER_PLACE: Duration = Duration::from_millis(500);

/// A lock object on `url` whose waiters subscribe through `pubsub_url`.
async fn lock_object(url: &str, pubsub_url: &str) -> RedisDistributedLock {
    common::redis_conn::lock_builder(url, pubsub_url)
        .await
        .config(config())
        .build()
        .unwrap()
}

/// How long each waiter's place in the line of `key` has left, by the server's clock.
async fn places_left(
    admin: &mut MultiplexedConnection,
    lock: &RedisDistributedLock,
    key: &str,
) -> Vec<Duration> {
    let waiters = format!("{}:waiters", lock.redis_key(key));
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(admin).await.unwrap();
    let now_ms = seconds * 1_000 + micros / 1_000;
    let deadlines: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(&waiters)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(admin)
        .await
        .unwrap();
    deadlines
        .into_iter()
        .map(|(_, deadline)| Duration::from_millis(deadline.saturating_sub(now_ms)))
        .collect()
}

/// 20 waiters on one key, each through a lock object of its own (20 processes, as far as Redis
/// can tell), wait while a holder keeps the key. Subscribed, they keep places that outlive a
/// poller's and run at most 2 scripts a second each (a poller at the same settings runs
/// about 13); then each gets the key in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_waiters_keep_long_places_and_look_rarely() {
    const WAITERS: usize = 20;
    const WINDOW: Duration = Duration::from_secs(3);
    let server = RedisServer::start().await;
    let url = server.url();
    let admin = common::redis_conn::connection(&url).await;
    let holder = lock_object(&url, &url).await;
    let guard = holder.acquire("k").await.unwrap();

    let taken = Arc::new(Mutex::new(0_usize));
    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        let (lock, taken) = (lock_object(&url, &url).await, Arc::clone(&taken));
        waiters.push(tokio::spawn(async move {
            let guard = lock.acquire("k").await.expect("each waiter gets the key");
            *taken.lock().unwrap() += 1;
            guard.release().await.unwrap();
        }));
    }
    assert_eventually(
        "every waiter holds a place that outlives a poller's",
        || {
            let (mut admin, holder) = (admin.clone(), holder.clone());
            async move {
                let places = places_left(&mut admin, &holder, "k").await;
                places.len() == WAITERS && places.iter().all(|left| *left > POLLER_PLACE)
            }
        },
    )
    .await;

    common::redis_conn::reset_stats(&admin).await;
    tokio::time::sleep(WINDOW).await; // the window the scripts are counted over
    let scripts = common::redis_conn::calls_run(&admin, &["evalsha", "eval"]).await;
    let per_waiter_second = scripts as f64 / WAITERS as f64 / WINDOW.as_secs_f64();
    assert!(
        per_waiter_second <= 2.0,
        "{scripts} scripts in {WINDOW:?} from {WAITERS} waiters: {per_waiter_second:.2} per waiter per second"
    );

    guard.release().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*taken.lock().unwrap(), WAITERS);
}

/// The pub/sub connection stops answering (a stalled network path: nothing closes). The lock
/// object notices within a ping and the command timeout, and its waiter falls back to polling
/// with a short place in line; once the path is back, it is subscribed again and looks rarely;
/// a release reaches it all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_connection_that_stops_answering_is_noticed() {
    let server = RedisServer::start().await;
    let url = server.url();
    let proxy = FaultProxy::start(server.address()).await;
    let proxied = format!("redis://{}", proxy.address());
    let admin = common::redis_conn::connection(&url).await;
    let holder = lock_object(&url, &url).await;
    let waiter = lock_object(&url, &proxied).await;
    let guard = holder.acquire("k").await.unwrap();
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.acquire("k").await }
    });
    let place = |wanted: fn(Duration) -> bool| {
        let (admin, holder) = (admin.clone(), holder.clone());
        move || {
            let (mut admin, holder) = (admin.clone(), holder.clone());
            async move {
                let places = places_left(&mut admin, &holder, "k").await;
                places.len() == 1 && wanted(places[0])
            }
        }
    };
    assert_eventually(
        "the subscribed waiter holds a long place",
        place(|left| left > POLLER_PLACE),
    )
    .await;

    proxy.stall();
    assert_eventually_within(
        Duration::from_secs(8),
        "the waiter falls back to polling with a short place",
        place(|left| !left.is_zero() && left <= POLLER_PLACE),
    )
    .await;

    proxy.heal().await;
    assert_eventually_within(
        Duration::from_secs(8),
        "the waiter is subscribed again and holds a long place",
        place(|left| left > POLLER_PLACE),
    )
    .await;

    guard.release().await.unwrap();
    let taken = waiting.await.unwrap().expect("the waiter gets the key");
    taken.release().await.unwrap();
}

/// Tasks of one lock object wait on 20 keys at once while the pub/sub path is slow: their
/// channels are subscribed together, in a few `SUBSCRIBE` commands, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channels_of_many_waiting_keys_are_subscribed_together() {
    const KEYS: usize = 20;
    let server = RedisServer::start().await;
    let url = server.url();
    let proxy = FaultProxy::start(server.address()).await;
    proxy.set_latency(Duration::from_millis(100));
    let proxied = format!("redis://{}", proxy.address());
    let admin = common::redis_conn::connection(&url).await;
    let holder = lock_object(&url, &url).await;
    let waiter = lock_object(&url, &proxied).await;
    let keys: Vec<String> = (0..KEYS).map(|n| format!("k{n}")).collect();
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(holder.acquire(key).await.unwrap());
    }

    common::redis_conn::reset_stats(&admin).await;
    let mut waiting = Vec::new();
    for key in keys.clone() {
        let waiter = waiter.clone();
        waiting.push(tokio::spawn(async move { waiter.acquire(&key).await }));
    }
    // Each waiter has a channel of its own, `<lock key>:released:<token>`; this server serves
    // only this test.
    assert_eventually("every waiting task's channel is subscribed", || {
        let mut admin = admin.clone();
        async move {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("*:released:*")
                .query_async(&mut admin)
                .await
                .unwrap();
            channels.len() == KEYS
        }
    })
    .await;
    let subscribes = common::redis_conn::calls_run(&admin, &["subscribe"]).await;
    assert!(
        subscribes <= 3,
        "{subscribes} SUBSCRIBE commands for {KEYS} channels"
    );

    for guard in guards {
        guard.release().await.unwrap();
    }
    for task in waiting {
        task.await.unwrap().unwrap().release().await.unwrap();
    }
}

/// The pub/sub connection's task runs on the runtime of the lock object's first waiter. When
/// that runtime shuts down while a waiter on another runtime relies on the connection, that
/// waiter falls back to polling (not to rare looks on a connection that is gone), the task
/// starts again on the waiter's runtime, and the waiter is subscribed again.
#[test]
fn a_waiter_outlives_the_runtime_that_started_the_pubsub_task() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let (first, second) = (runtime(), runtime());
    let server = second.block_on(RedisServer::start());
    let url = server.url();
    let (lock, holder, admin) = second.block_on(async {
        let lock = lock_object(&url, &url).await;
        let holder = lock_object(&url, &url).await;
        (lock, holder, common::redis_conn::connection(&url).await)
    });
    // The lock object's command connection lives on the second runtime (a connection's task
    // runs on the runtime that opened it).
    second.block_on(common::redis_conn::take_and_release(&lock, "warm-up"));
    let (held_a, held_b) = second.block_on(async {
        let a = holder.acquire("a").await.unwrap();
        (a, holder.acquire("b").await.unwrap())
    });
    let place_of = |key: &'static str, wanted: fn(Duration) -> bool| {
        let (admin, holder) = (admin.clone(), holder.clone());
        move || {
            let (mut admin, holder) = (admin.clone(), holder.clone());
            async move {
                let places = places_left(&mut admin, &holder, key).await;
                places.len() == 1 && wanted(places[0])
            }
        }
    };

    // The first waiter, on the first runtime, starts the task there.
    let _waiting_a = first.spawn({
        let lock = lock.clone();
        async move { lock.acquire("a").await }
    });
    second.block_on(assert_eventually(
        "the first waiter holds a long place",
        place_of("a", |left| left > POLLER_PLACE),
    ));
    let waiting_b = second.spawn({
        let lock = lock.clone();
        async move { lock.acquire("b").await }
    });
    second.block_on(assert_eventually(
        "the second waiter holds a long place",
        place_of("b", |left| left > POLLER_PLACE),
    ));

    drop(first);
    second.block_on(assert_eventually(
        "the second waiter falls back to polling",
        place_of("b", |left| !left.is_zero() && left <= POLLER_PLACE),
    ));
    second.block_on(assert_eventually(
        "the second waiter is subscribed again",
        place_of("b", |left| left > POLLER_PLACE),
    ));
    second.block_on(async {
        held_b.release().await.unwrap();
        waiting_b.await.unwrap().unwrap().release().await.unwrap();
        held_a.release().await.unwrap();
    });
}
