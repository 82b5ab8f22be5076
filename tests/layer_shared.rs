//! `LockLayer::shared_when` and `shared_for_safe_methods`: reads of one key run together, a
//! write runs alone (conflict status, or waiting with `.wait()`), over HTTP (axum) and gRPC
//! (tonic).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::grpc::{health_client, health_request, serve_health};
use common::http::{client, send};
use http::StatusCode;
use k1s0_distributed_lock::{DistributedRwLock, LockConfig, LockInfo, LockLayer, LockMode};
use tokio::sync::Barrier;
use tonic::Code;

const READERS: usize = 3;

lock_object_tests!(
    gets_of_one_key_run_together_and_a_post_meanwhile_conflicts,
    in_wait_mode_a_post_waits_for_the_gets_then_runs_alone,
    grpc_calls_picked_by_path_share_the_key,
);

/// Where the GET handlers wait for each other: it opens once `READERS` of them and the test are
/// at it, and counts the handlers that reached it.
struct ReadersGate {
    barrier: Barrier,
    inside: AtomicUsize,
}

impl ReadersGate {
    fn new() -> Arc<Self> {
        // One more party than the readers: the test itself, so it can act while they are in.
        Arc::new(ReadersGate {
            barrier: Barrier::new(READERS + 1),
            inside: AtomicUsize::new(0),
        })
    }

    /// A handler arrives and waits for the others.
    async fn enter(&self) {
        self.inside.fetch_add(1, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), self.barrier.wait())
            .await
            .expect("the other readers got in beside this one");
    }

    /// Whether every reader's handler is in (each holds the shared side).
    fn all_inside(&self) -> bool {
        self.inside.load(Ordering::SeqCst) == READERS
    }

    /// The test lets the readers finish.
    async fn open(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.barrier.wait())
            .await
            .expect("every reader got in beside the others");
    }
}

/// An order resource whose GET handlers wait until `READERS` of them are inside at once, so a
/// GET can only finish if the others got in beside it; POST answers at once. Each handler
/// reports the side of the lock it ran under.
fn orders<L: DistributedRwLock + Clone>(
    prefix: &str,
    gate: Arc<ReadersGate>,
    layer: impl FnOnce(LockLayer<L>) -> LockLayer<L>,
    lock: L,
) -> Router {
    let extractor = common::http::prefixed_path(prefix);
    Router::new()
        .route(
            "/orders/{id}",
            get(move |axum::Extension(info): axum::Extension<LockInfo>| {
                let gate = Arc::clone(&gate);
                async move {
                    gate.enter().await;
                    format!("{:?}", info.mode())
                }
            })
            .post(
                |axum::Extension(info): axum::Extension<LockInfo>| async move {
                    format!("{:?}", info.mode())
                },
            ),
        )
        .layer(layer(LockLayer::new(lock, extractor)))
}

/// `READERS` concurrent `GET /orders/42`.
fn read_concurrently(
    client: &common::http::HttpClient,
    address: std::net::SocketAddr,
) -> Vec<tokio::task::JoinHandle<http::Response<hyper::body::Incoming>>> {
    (0..READERS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { send(&client, address, "GET", "/orders/42").await })
        })
        .collect()
}

async fn body(response: http::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn gets_of_one_key_run_together_and_a_post_meanwhile_conflicts<
    L: DistributedRwLock + Clone,
>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let prefix = common::unique_prefix("layer-shared");
    let lock = make_lock(LockConfig::new()).await;
    let gate = ReadersGate::new();
    let app = orders(
        &prefix,
        Arc::clone(&gate),
        |layer| layer.shared_for_safe_methods(),
        lock.clone(),
    );
    let address = common::http::serve(app).await;
    let client = client();

    let reads = read_concurrently(&client, address);
    // Every reader holds the key once its handler runs.
    common::wait::assert_eventually("the readers hold the key", || async { gate.all_inside() })
        .await;
    let refused = send(&client, address, "POST", "/orders/42").await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    // Another resource is not affected.
    let other = send(&client, address, "POST", "/orders/7").await;
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(body(other).await, format!("{:?}", LockMode::Exclusive));

    gate.open().await;
    for read in reads {
        let response = read.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, format!("{:?}", LockMode::Shared));
    }
    assert!(
        common::suites::becomes_free(
            &lock,
            &format!("{prefix}/orders/42"),
            Duration::from_secs(5)
        )
        .await
    );
    let write = send(&client, address, "POST", "/orders/42").await;
    assert_eq!(write.status(), StatusCode::OK);
}

async fn in_wait_mode_a_post_waits_for_the_gets_then_runs_alone<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let prefix = common::unique_prefix("layer-shared-wait");
    let lock = make_lock(LockConfig::new().wait_timeout(Duration::from_secs(10))).await;
    let gate = ReadersGate::new();
    let app = orders(
        &prefix,
        Arc::clone(&gate),
        |layer| {
            layer
                .shared_when(|parts| parts.method == http::Method::GET)
                .wait()
        },
        lock.clone(),
    );
    let address = common::http::serve(app).await;
    let client = client();
    let key = format!("{prefix}/orders/42");

    let reads = read_concurrently(&client, address);
    common::wait::assert_eventually("the readers hold the key", || async { gate.all_inside() })
        .await;
    let write = tokio::spawn({
        let client = client.clone();
        async move { send(&client, address, "POST", "/orders/42").await }
    });
    // The POST waits behind the readers: a new reader queues behind it (writers first).
    common::wait::assert_eventually("the POST waits for the key", || async {
        matches!(
            lock.try_acquire_shared(&key).await,
            Err(k1s0_distributed_lock::LockError::AlreadyLocked)
        )
    })
    .await;
    assert!(!write.is_finished());
    gate.open().await;
    for read in reads {
        assert_eq!(read.await.unwrap().status(), StatusCode::OK);
    }
    let write = write.await.unwrap();
    assert_eq!(write.status(), StatusCode::OK);
    assert_eq!(body(write).await, format!("{:?}", LockMode::Exclusive));
}

/// gRPC picks the shared side by path: `Watch` streams share the key, `Check` (exclusive) is
/// aborted while they run.
async fn grpc_calls_picked_by_path_share_the_key<L: DistributedRwLock + Clone>(
    make_lock: impl AsyncFn(LockConfig) -> L,
) {
    let key = format!("{}grpc:health", common::unique_prefix("grpc-shared"));
    let lock = make_lock(LockConfig::new()).await;
    let layer_key = key.clone();
    let layer = LockLayer::new(lock.clone(), move |_: &http::request::Parts| {
        layer_key.clone()
    })
    .shared_when(|parts| parts.uri.path().ends_with("/Watch"));
    let address = serve_health(layer).await;
    let mut client = health_client(address).await;

    let mut first = client.watch(health_request()).await.unwrap().into_inner();
    let mut second = client.watch(health_request()).await.unwrap().into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some());
    let refused = client.check(health_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted);

    drop(first);
    drop(second);
    assert!(
        common::suites::becomes_free(&lock, &key, Duration::from_secs(5)).await,
        "the cancelled streams kept the key"
    );
    client.check(health_request()).await.unwrap();
}
