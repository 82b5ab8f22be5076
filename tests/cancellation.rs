//! Every public future dropped at each of its await points: the in-memory backend and the layer.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::backends::Backend;
use common::cancel::drop_at_suspension;
use common::suites::cancellation_suite;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use k1s0_distributed_lock::{
    layer::key, DistributedLock, InMemoryDistributedLock, LockConfig, LockLayer,
};
use tower::{service_fn, Layer, ServiceExt};

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

#[tokio::test]
async fn the_layer_future_and_body_cancelled_at_every_await_point_leave_no_lock() {
    let lock = memory();
    let service = LockLayer::new(lock.clone(), key::path()).layer(slow_service());
    let request = || Request::post("/job").body(Full::new(Bytes::new())).unwrap();

    // The response future, dropped at each await point.
    let mut points = 0;
    for n in 1.. {
        match drop_at_suspension(service.clone().oneshot(request()), n).await {
            Some(response) => {
                drop(response.unwrap());
                break;
            }
            None => points += 1,
        }
        assert!(
            !lock.is_locked("/job").await.unwrap(),
            "response future dropped at {n}"
        );
    }
    assert!(
        points >= 3,
        "the inner service's await points were not reached"
    );

    // The body, dropped at each await point while it is being read.
    for n in 1.. {
        let response = service.clone().oneshot(request()).await.unwrap();
        assert!(lock.is_locked("/job").await.unwrap());
        let read = drop_at_suspension(response.into_body().collect(), n).await;
        assert!(
            !lock.is_locked("/job").await.unwrap(),
            "body dropped at {n}"
        );
        if read.is_some() {
            break;
        }
    }

    // The waiting response future (wait mode), dropped while queued behind a holder.
    let waiting = LockLayer::new(lock.clone(), key::path())
        .wait()
        .layer(slow_service());
    let holder = lock.try_acquire("/job").await.unwrap();
    for n in 1.. {
        match drop_at_suspension(waiting.clone().oneshot(request()), n).await {
            None => {}
            // Waited out its budget: the last point was passed.
            Some(response) => {
                assert_eq!(response.unwrap().status(), http::StatusCode::CONFLICT);
                break;
            }
        }
    }
    drop(holder);
    assert_eq!(
        lock.tracked_keys(),
        0,
        "a cancelled waiting request kept its place"
    );
}
