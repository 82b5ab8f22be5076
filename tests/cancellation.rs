//! Every public future dropped at each of its await points, on every backend: the backend's
//! own futures and the layer's.

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::backends::{AnyLock, Backend};
use common::cancel::drop_at_suspension;
use common::suites::{becomes_free, cancellation_suite, FREE_AGAIN_WITHIN};
use common::wait::eventually;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

/// Waiting budget (200 ms) well inside the TTL (30 s).
fn memory() -> InMemoryDistributedLock {
    InMemoryDistributedLock::new(
        LockConfig::new()
            .ttl(Duration::from_secs(30))
            .retry_interval(Duration::from_millis(10))
            .max_retries(20),
    )
}

backend_tests!(backend_futures_cancelled_at_every_await_point_leave_no_lock);

async fn backend_futures_cancelled_at_every_await_point_leave_no_lock(backend: Backend) {
    let lock = backend.lock(*memory().config()).await;
    let prefix = common::unique_prefix(&format!("cancel-{backend:?}"));
    let points = cancellation_suite(&lock, &prefix).await;
    // The in-memory backend suspends only while queued: everything else completes at once.
    assert!(points >= 1, "no await point was ever cancelled");
    assert!(matches!(lock.tracked_keys(), None | Some(0)));
}

type Frames = Result<http_body::Frame<Bytes>, Infallible>;

/// An inner service that yields a few times before answering, with a body of several frames
/// that also yield between frames.
fn slow_service() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<StreamBody<futures::stream::BoxStream<'static, Frames>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|_req: Request<Full<Bytes>>| async {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let frames = futures::stream::iter(0..4)
            .then(|i| async move {
                tokio::task::yield_now().await;
                Ok(http_body::Frame::data(Bytes::from(format!("frame {i};"))))
            })
            .boxed();
        Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
    })
}

backend_tests!(the_layer_future_and_body_cancelled_at_every_await_point_leave_no_lock);

/// The layer's response future (from the service's `call`), its body, and a waiting request,
/// each dropped at every await point in turn, with the fail-fast and the waiting layer: after
/// each drop the key is free again within [`FREE_AGAIN_WITHIN`] (or, for a dropped waiter,
/// still held by its holder only), and once the holder is gone nothing is left on the backend:
/// no lock, no queue entry or waiter flag, and the next request takes the key.
async fn the_layer_future_and_body_cancelled_at_every_await_point_leave_no_lock(backend: Backend) {
    let lock = backend.lock(*memory().config()).await;
    let prefix = common::unique_prefix(&format!("layer-cancel-{backend:?}"));
    let key = format!("{prefix}/job");
    let probe = Probe::new(&lock).await;
    let layer = {
        let prefix = prefix.clone();
        LockLayer::new(lock.clone(), move |req| {
            format!("{prefix}{}", req.uri.path())
        })
    };
    let request = || Request::post("/job").body(Full::new(Bytes::new())).unwrap();
    let free_again = || async {
        assert!(
            becomes_free(&lock, &key, FREE_AGAIN_WITHIN).await,
            "the key stayed locked"
        );
        // Free for the lock object's own tasks too: a dropped guard's background release is
        // answered a moment after the server freed the key, and only then does its turn among
        // the tasks of the lock object pass on (until then `try_acquire` says `AlreadyLocked`).
        let taken = eventually(FREE_AGAIN_WITHIN, || async {
            match lock.try_acquire(&key).await {
                Ok(guard) => guard.release().await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        assert!(
            taken,
            "the key stayed taken for the lock object's own tasks"
        );
        probe.assert_nothing_left(&key).await;
    };

    for (mode, layer) in [
        ("fail-fast", layer.clone()),
        ("waiting", layer.clone().wait()),
    ] {
        let service = layer.layer(slow_service());

        // The response future, dropped at each await point.
        let mut points = 0;
        for n in 1.. {
            let mut ready = service.clone();
            ready.ready().await.unwrap();
            match drop_at_suspension(ready.call(request()), n).await {
                Some(response) => {
                    drop(response.unwrap());
                    break;
                }
                None => points += 1,
            }
            println!("{mode}: response future dropped at {n}");
            free_again().await;
        }
        assert!(
            points >= 3,
            "{mode}: the inner service's await points were not reached"
        );
        free_again().await;

        // The body, dropped at each await point while it is being read.
        for n in 1.. {
            let response = service.clone().oneshot(request()).await.unwrap();
            assert!(lock.is_locked(&key).await.unwrap(), "{mode}: body unlocked");
            let read = drop_at_suspension(response.into_body().collect(), n).await;
            println!("{mode}: body dropped at {n}");
            free_again().await;
            if read.is_some() {
                break;
            }
        }
    }

    // The waiting response future, dropped while it waits behind a holder: one on the same
    // lock object (queued in the process) and, for the server backends, one on another (like
    // another process: waiting on the server, with its flag or queue entry there).
    let waiting = layer.wait().layer(slow_service());
    let mut holders = vec![("same object", lock.clone())];
    if backend != Backend::Memory {
        holders.push(("other object", backend.lock(*memory().config()).await));
    }
    for (side, holding) in holders {
        let holder = holding.try_acquire(&key).await.unwrap();
        let mut points = 0;
        for n in 1.. {
            let mut ready = waiting.clone();
            ready.ready().await.unwrap();
            match drop_at_suspension(ready.call(request()), n).await {
                None => points += 1,
                // Waited out its budget: the last point was passed.
                Some(response) => {
                    assert_eq!(response.unwrap().status(), http::StatusCode::CONFLICT);
                    break;
                }
            }
            assert!(
                lock.is_locked(&key).await.unwrap() && !holder.is_lost(),
                "{side}: a waiter dropped at {n} disturbed the holder"
            );
            probe.assert_no_waiter_within(&key, FREE_AGAIN_WITHIN).await;
        }
        println!("{side}: waiting request dropped at {points} points");
        assert!(points >= 1, "{side}: the waiting request never suspended");
        holding.release(holder).await.unwrap();
        free_again().await;
        // Nobody was granted the key for a cancelled waiter: the next request takes it.
        let next = lock
            .try_acquire(&key)
            .await
            .expect("the key is free for the next one");
        lock.release(next).await.unwrap();
        probe.assert_nothing_left(&key).await;
    }
}

/// Looks at what a backend keeps for a key, from outside the lock object.
enum Probe {
    Memory(InMemoryDistributedLock),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    #[cfg(feature = "redis")]
    Redis(
        k1s0_distributed_lock::RedisDistributedLock,
        k1s0_distributed_lock::bb8_redis::redis::aio::MultiplexedConnection,
    ),
}

impl Probe {
    async fn new(lock: &AnyLock) -> Probe {
        match lock {
            AnyLock::Memory(lock) => Probe::Memory(lock.clone()),
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(_) => Probe::Postgres(pg_support::pool(1).await),
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => Probe::Redis(
                lock.clone(),
                common::redis_conn::connection(&common::redis_url().await).await,
            ),
        }
    }

    /// Locks and waiters the backend keeps for `key` (in-memory: table entries, which hold
    /// both).
    async fn counts(&self, key: &str) -> (i64, i64) {
        match self {
            Probe::Memory(lock) => {
                let _ = key; // the table is private to this test's lock: every entry is ours
                (lock.tracked_keys() as i64, 0)
            }
            #[cfg(feature = "postgres")]
            Probe::Postgres(pool) => {
                let mut admin = pool.acquire().await.unwrap();
                let locks = pg_support::advisory_locks(&mut admin, key).await;
                let flags = pg_support::waiter_flags(&mut admin, key).await
                    + pg_support::queued_flags(&mut admin, key).await;
                (locks, flags)
            }
            #[cfg(feature = "redis")]
            Probe::Redis(lock, connection) => {
                use k1s0_distributed_lock::bb8_redis::redis;
                let name = lock.redis_key(key);
                let mut connection = connection.clone();
                let locks: i64 = redis::cmd("EXISTS")
                    .arg(&name)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                let waiting: i64 = redis::cmd("EXISTS")
                    .arg(format!("{name}:line"))
                    .arg(format!("{name}:waiters"))
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                (locks, waiting)
            }
        }
    }

    /// No lock and no waiter left for `key`.
    async fn assert_nothing_left(&self, key: &str) {
        let (locks, waiting) = self.counts(key).await;
        assert_eq!((locks, waiting), (0, 0), "locks and waiters left for {key}");
    }

    /// The waiter that was dropped has left the queue within `within` (the holder stays).
    async fn assert_no_waiter_within(&self, key: &str, within: Duration) {
        let left = eventually(within, || async { self.counts(key).await.1 == 0 }).await;
        assert!(left, "a dropped waiter is still queued for {key}");
    }
}
