//! `LockLayer::permits`: up to `n` requests of one key run at once; one more gets 429 with
//! `Retry-After` (or waits, with `.wait()`), over HTTP (axum) and gRPC (tonic, 8
//! `RESOURCE_EXHAUSTED`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use common::grpc::{health_client, health_request, serve_health};
use common::http::{client, send};
use http::StatusCode;
use k1s0_distributed_lock::{DistributedLock, DistributedSemaphore, LockConfig, LockLayer};
use tokio::sync::Notify;
use tonic::Code;

const PERMITS: u32 = 2;

lock_object_tests!(
    with_two_permits_a_third_slow_request_gets_429_with_retry_after,
    in_wait_mode_the_third_request_runs_once_a_permit_comes_back,
    a_grpc_call_beyond_the_permits_gets_resource_exhausted,
);

/// Slow exports: each handler counts itself in, then waits until the test lets them all go.
struct Exports {
    inside: AtomicUsize,
    most: AtomicUsize,
    go: Notify,
}

impl Exports {
    fn new() -> Arc<Self> {
        Arc::new(Exports {
            inside: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            go: Notify::new(),
        })
    }

    async fn run(&self) -> &'static str {
        let go = self.go.notified();
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        go.await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        "exported"
    }

    fn inside(&self) -> usize {
        self.inside.load(Ordering::SeqCst)
    }

    fn finish_all(&self) {
        self.go.notify_waiters();
    }
}

fn exports_app<L: DistributedSemaphore + DistributedLock>(
    prefix: &str,
    exports: Arc<Exports>,
    layer: impl FnOnce(LockLayer<L>) -> LockLayer<L>,
    lock: L,
) -> Router {
    let extractor = common::http::prefixed_path(prefix);
    Router::new()
        .route(
            "/tenants/{tenant}/exports",
            post(move || {
                let exports = Arc::clone(&exports);
                async move { exports.run().await }
            }),
        )
        .layer(layer(LockLayer::new(lock, extractor)))
}

fn start_export(
    client: &common::http::HttpClient,
    address: std::net::SocketAddr,
    tenant: &str,
) -> tokio::task::JoinHandle<http::Response<hyper::body::Incoming>> {
    let (client, path) = (client.clone(), format!("/tenants/{tenant}/exports"));
    tokio::spawn(async move { send(&client, address, "POST", &path).await })
}

async fn with_two_permits_a_third_slow_request_gets_429_with_retry_after<
    L: DistributedSemaphore + DistributedLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let prefix = common::unique_prefix("layer-permits");
    let lock = make_lock(LockConfig::new()).await;
    let exports = Exports::new();
    let app = exports_app(
        &prefix,
        Arc::clone(&exports),
        |layer| layer.permits(PERMITS).retry_after(Duration::from_secs(3)),
        lock.clone(),
    );
    let address = common::http::serve(app).await;
    let client = client();

    let running: Vec<_> = (0..PERMITS)
        .map(|_| start_export(&client, address, "7"))
        .collect();
    common::wait::assert_eventually("two exports run", || async {
        exports.inside() == PERMITS as usize
    })
    .await;
    let refused = send(&client, address, "POST", "/tenants/7/exports").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()[http::header::RETRY_AFTER], "3");
    // Another tenant has permits of its own.
    let other = start_export(&client, address, "8");
    common::wait::assert_eventually("the other tenant's export runs", || async {
        exports.inside() == PERMITS as usize + 1
    })
    .await;

    exports.finish_all();
    for export in running.into_iter().chain([other]) {
        assert_eq!(export.await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(exports.most.load(Ordering::SeqCst), PERMITS as usize + 1);
    let key = format!("{prefix}/tenants/7/exports");
    common::wait::assert_eventually("the permits come back", || async {
        lock.permits_held(&key).await.unwrap() == 0
    })
    .await;
}

async fn in_wait_mode_the_third_request_runs_once_a_permit_comes_back<
    L: DistributedSemaphore + DistributedLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let prefix = common::unique_prefix("layer-permits-wait");
    let lock = make_lock(LockConfig::new().wait_timeout(Duration::from_secs(10))).await;
    let exports = Exports::new();
    let app = exports_app(
        &prefix,
        Arc::clone(&exports),
        |layer| layer.permits(PERMITS).wait(),
        lock.clone(),
    );
    let address = common::http::serve(app).await;
    let client = client();
    let key = format!("{prefix}/tenants/7/exports");

    let running: Vec<_> = (0..PERMITS)
        .map(|_| start_export(&client, address, "7"))
        .collect();
    common::wait::assert_eventually("two exports run", || async {
        exports.inside() == PERMITS as usize
    })
    .await;
    let third = start_export(&client, address, "7");
    // The third waits in line: a try with room for one more waiter is refused.
    assert!(
        common::suites::waiters_in_line(&lock, &key, PERMITS, 1).await,
        "the third export waits for a permit"
    );
    assert_eq!(exports.inside(), PERMITS as usize);
    // The first two finish; the third gets a permit and runs.
    exports.finish_all();
    for export in running {
        assert_eq!(export.await.unwrap().status(), StatusCode::OK);
    }
    common::wait::assert_eventually("the third export runs", || async { exports.inside() == 1 })
        .await;
    exports.finish_all();
    assert_eq!(third.await.unwrap().status(), StatusCode::OK);
    assert_eq!(exports.most.load(Ordering::SeqCst), PERMITS as usize);
}

/// Two `Watch` streams hold the two permits of the key; a third call is refused with
/// `RESOURCE_EXHAUSTED` until one of them ends.
async fn a_grpc_call_beyond_the_permits_gets_resource_exhausted<
    L: DistributedSemaphore + DistributedLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let key = format!("{}grpc:health", common::unique_prefix("grpc-permits"));
    let lock = make_lock(LockConfig::new()).await;
    let layer_key = key.clone();
    let layer = LockLayer::new(lock.clone(), move |_: &http::request::Parts| {
        layer_key.clone()
    })
    .permits(PERMITS);
    let address = serve_health(layer).await;
    let mut client = health_client(address).await;

    let mut first = client.watch(health_request()).await.unwrap().into_inner();
    let mut second = client.watch(health_request()).await.unwrap().into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some());
    let refused = client.check(health_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    drop(first);
    common::wait::assert_eventually("the cancelled stream gave its permit back", || async {
        lock.permits_held(&key).await.unwrap() < PERMITS
    })
    .await;
    client.check(health_request()).await.unwrap();
    drop(second);
}
