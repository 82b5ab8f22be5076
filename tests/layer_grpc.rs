//! LockLayer around a real tonic server, called by a real tonic client.

mod common;

use std::time::Duration;

use common::backends::Backend;
use common::failing::FlakyLock;
use common::grpc::{health_client, health_request, serve_health};
use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockLayer};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const KEY: &str = "grpc:health";

backend_tests!(a_stream_longer_than_the_ttl_keeps_its_lock_until_it_ends);

async fn a_stream_longer_than_the_ttl_keeps_its_lock_until_it_ends(backend: Backend) {
    const TTL: Duration = Duration::from_millis(400);
    let key = format!("{}grpc:health", common::unique_prefix("grpc-stream"));
    let lock = backend.lock(LockConfig::new().ttl(TTL)).await;
    let layer_key = key.clone();
    let address = serve_health(LockLayer::new(lock.clone(), move |_req| layer_key.clone())).await;
    let mut client = health_client(address).await;

    let mut watch = client.watch(health_request()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // The stream stays open for four TTLs; every call meanwhile is refused.
    let until = Instant::now() + 4 * TTL;
    let mut probes = 0;
    while Instant::now() < until {
        let refused = client.check(health_request()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Aborted, "probe {probes} got in");
        probes += 1;
        tokio::time::sleep(TTL / 2).await;
    }
    assert!(probes >= 6, "only {probes} probes");
    drop(watch);
    assert!(
        common::suites::becomes_free(&lock, &key, Duration::from_secs(5)).await,
        "the cancelled stream kept the lock"
    );
}

fn whole_service_key(_req: &http::request::Parts) -> String {
    KEY.to_owned()
}

#[tokio::test]
async fn a_call_on_a_locked_key_gets_aborted_until_the_stream_holding_it_ends() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let address = serve_health(LockLayer::new(lock.clone(), whole_service_key)).await;
    let mut client = health_client(address).await;

    // A server-streaming call holds the lock for as long as its response stream is open.
    let mut watch = client.watch(health_request()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    assert!(lock.is_locked(KEY).await.unwrap());

    let refused = client.check(health_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted);
    assert_eq!(
        refused.message(),
        "the resource is locked by another request"
    );

    // Cancelling the stream (RST_STREAM) drops the response body on the server, which frees
    // the lock. The server learns of it asynchronously, so wait for it, within a bound.
    drop(watch);
    assert!(
        common::suites::becomes_free(&lock, KEY, Duration::from_secs(5)).await,
        "the cancelled stream kept the lock"
    );
    let answer = client.check(health_request()).await.unwrap().into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn a_unary_call_releases_its_lock_when_it_completes() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let address = serve_health(LockLayer::new(lock.clone(), whole_service_key)).await;
    let mut client = health_client(address).await;
    for _ in 0..5 {
        let answer = client.check(health_request()).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving);
    }
    // The unary body ends with its trailers, which the client has read by now.
    assert!(!lock.is_locked(KEY).await.unwrap());
}

#[tokio::test]
async fn a_failing_backend_gives_unavailable_unless_fail_open() {
    let flaky = FlakyLock::down();
    let closed = serve_health(LockLayer::new(flaky.clone(), whole_service_key)).await;
    let refused = health_client(closed)
        .await
        .check(health_request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);

    let open = serve_health(LockLayer::new(flaky.clone(), whole_service_key).fail_open()).await;
    let answer = health_client(open)
        .await
        .check(health_request())
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
}

#[tokio::test]
async fn a_refused_key_gives_invalid_argument() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let address = serve_health(LockLayer::new(lock, |_req| String::new())).await;
    let refused = health_client(address)
        .await
        .check(health_request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}
