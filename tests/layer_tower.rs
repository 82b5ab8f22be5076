//! LockService follows Tower's rules: readiness forwarded, the ready service is the one called.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures::poll;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k1s0_distributed_lock::{
    layer::key, DistributedLock, InMemoryDistributedLock, LockConfig, LockLayer,
};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

fn request(path: &str) -> Request<Full<Bytes>> {
    Request::post(path).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn the_ready_inner_service_is_the_one_called() {
    // ConcurrencyLimit hands its permit to the clone that was polled ready and panics if an
    // unpolled clone is called: the layer must move the ready one into its future.
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut service = ServiceBuilder::new()
        .layer(LockLayer::new(lock.clone(), key::path()))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(move |_req: Request<Full<Bytes>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        }));

    let first = service.ready().await.unwrap().call(request("/a"));
    // The permit went with the first call: the service is not ready until that call ends.
    assert!(
        poll!(service.ready()).is_pending(),
        "poll_ready was not forwarded"
    );
    let response = first.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A body complete at once is released before the response is handed on.
    assert!(!response.body().holds_lock());
    assert!(!lock.is_locked("/a").await.unwrap());
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "ok"
    );

    let second = service
        .ready()
        .await
        .unwrap()
        .call(request("/b"))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_request_never_reaches_the_inner_service_and_errors_are_not_used() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let _holder = lock.try_acquire("/a").await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    });
    let service = LockLayer::new(lock, key::path()).layer(inner);
    let response: Result<_, Infallible> = service.oneshot(request("/a")).await;
    assert_eq!(response.unwrap().status(), StatusCode::CONFLICT);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dropping_the_response_future_while_it_waits_leaves_the_queue() {
    let lock = InMemoryDistributedLock::new(LockConfig::new().max_retries(1000));
    let holder = lock.try_acquire("/a").await.unwrap();
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut service = LockLayer::new(lock.clone(), key::path())
        .wait()
        .layer(inner);
    let mut waiting = Box::pin(service.ready().await.unwrap().call(request("/a")));
    assert!(matches!(poll!(waiting.as_mut()), Poll::Pending));
    drop(waiting);
    drop(holder);
    assert_eq!(
        lock.tracked_keys(),
        0,
        "the abandoned request kept a place in the queue"
    );
}

#[test]
fn the_layered_service_is_clone_send_and_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>(_: &T) {}
    let inner = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let layer = LockLayer::new(InMemoryDistributedLock::new(LockConfig::new()), key::path());
    assert_traits(&layer);
    assert_traits(&layer.layer(inner));
}

#[tokio::test]
async fn a_request_waiting_for_its_lock_does_not_hold_the_inner_services_capacity() {
    // Found by review: in wait mode a request queued on a hot key kept the permit of the
    // concurrency limit behind the layer, so requests for other keys could not run.
    let lock = InMemoryDistributedLock::new(LockConfig::new().max_retries(1000));
    let holder = lock.try_acquire("/hot").await.unwrap();
    let mut service = ServiceBuilder::new()
        .layer(LockLayer::new(lock.clone(), key::path()).wait())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }));

    let mut waiting = Box::pin(service.ready().await.unwrap().call(request("/hot")));
    assert!(poll!(waiting.as_mut()).is_pending());
    // The only permit is free for another key while /hot waits.
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        service.ready().await.unwrap().call(request("/cold")),
    )
    .await
    .expect("the waiting request kept the inner service's only permit")
    .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    drop(other);

    drop(holder);
    let hot = waiting.await.unwrap();
    assert_eq!(hot.status(), StatusCode::OK);
    // The body was complete at once: released before the answer.
    assert!(!lock.is_locked("/hot").await.unwrap());
}
