//! How long the layer holds a request's lock: kept alive past the TTL while the request runs,
//! given up at max_hold, reported lost to the handler, released before the answer goes out,
//! and never holding the answer back for a slow release.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::backends::Backend;
use common::http::{client, fetch, prefixed_path, send, serve};
use common::slow_release::SlowReleaseLock;
use futures::StreamExt;
use http::StatusCode;
use http_body_util::BodyExt;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockInfo, LockLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tower::Layer;

const TTL: Duration = Duration::from_millis(400);
const PATIENCE: Duration = Duration::from_secs(10);

fn short_ttl() -> LockConfig {
    LockConfig::new().ttl(TTL)
}

backend_tests!(
    a_request_and_its_body_longer_than_the_ttl_keep_their_lock,
    without_keep_alive_the_lock_runs_out_and_the_handler_is_told,
    past_max_hold_the_lock_runs_out_and_the_handler_is_told,
);

/// Probes `path` every half TTL for `span`: every probe must find the key locked (409).
async fn probe_locked_for(address: std::net::SocketAddr, path: &str, span: Duration) -> usize {
    let client = client();
    let until = Instant::now() + span;
    let mut probes = 0;
    while Instant::now() < until {
        let (status, _, _) = fetch(&client, address, path).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "probe {probes}: another request got in while the first still ran"
        );
        probes += 1;
        tokio::time::sleep(TTL / 2).await;
    }
    probes
}

type Chunks = Arc<Mutex<Option<mpsc::Receiver<Result<Bytes, std::io::Error>>>>>;

async fn a_request_and_its_body_longer_than_the_ttl_keep_their_lock(backend: Backend) {
    let prefix = common::unique_prefix("keep-alive");
    let key = format!("{prefix}/export");
    let lock = backend.lock(short_ttl()).await;
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let (chunks, chunk_rx) = mpsc::channel(4);
    let chunk_rx: Chunks = Arc::new(Mutex::new(Some(chunk_rx)));
    let app = Router::new()
        .route(
            "/export",
            post(move |State(chunk_rx): State<Chunks>| async move {
                // Only the first request gets the export; any other that gets in answers at
                // once, so that the probe sees it.
                let Some(rx) = chunk_rx.lock().unwrap().take() else {
                    return Body::from("a second request got in");
                };
                let (go_tx, go_rx) = oneshot::channel();
                entered_tx.send(go_tx).unwrap();
                go_rx.await.unwrap();
                Body::from_stream(ReceiverStream::new(rx))
            }),
        )
        .with_state(chunk_rx)
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)));
    let address = serve(app).await;

    let first = tokio::spawn(async move { send(&client(), address, "POST", "/export").await });
    let go = entered_rx.recv().await.unwrap();
    // The handler runs for three TTLs...
    let probes = probe_locked_for(address, "/export", 3 * TTL).await;
    assert!(probes >= 5, "only {probes} probes");
    go.send(()).unwrap();
    let response = first.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    chunks.send(Ok(Bytes::from_static(b"a,"))).await.unwrap();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a,"
    );
    // ...then its body streams for three more.
    probe_locked_for(address, "/export", 3 * TTL).await;
    chunks.send(Ok(Bytes::from_static(b"b"))).await.unwrap();
    drop(chunks);
    assert_eq!(body.collect().await.unwrap().to_bytes(), "b");
    assert!(
        !lock.is_locked(&key).await.unwrap(),
        "the lock outlived the response"
    );
}

/// A handler that waits until its lock is lost and says so.
async fn wait_until_lost(Extension(info): Extension<LockInfo>) -> String {
    tokio::time::timeout(PATIENCE, info.lost())
        .await
        .expect("the handler was never told its lock was lost");
    format!("lost={}", info.is_lost())
}

async fn without_keep_alive_the_lock_runs_out_and_the_handler_is_told(backend: Backend) {
    let prefix = common::unique_prefix("no-keep-alive");
    let lock = backend.lock(short_ttl()).await;
    let app = Router::new()
        .route("/job", post(wait_until_lost))
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)).without_keep_alive());
    let address = serve(app).await;
    let started = Instant::now();
    let (status, _, body) = fetch(&client(), address, "/job").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "lost=true"));
    assert!(started.elapsed() >= TTL);
}

async fn past_max_hold_the_lock_runs_out_and_the_handler_is_told(backend: Backend) {
    let prefix = common::unique_prefix("max-hold");
    let lock = backend.lock(short_ttl()).await;
    let max_hold = 2 * TTL;
    let app = Router::new()
        .route("/job", post(wait_until_lost))
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)).max_hold(max_hold));
    let address = serve(app).await;
    let started = Instant::now();
    let (status, _, body) = fetch(&client(), address, "/job").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "lost=true"));
    // Kept alive up to max_hold, then left to run out within one more TTL.
    assert!(started.elapsed() >= max_hold, "{:?}", started.elapsed());
}

/// Sends `POST {path}` on a raw socket and returns once the first bytes of the answer arrive.
async fn first_bytes_of_answer(address: std::net::SocketAddr, path: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = vec![0; 4096];
    let read = tokio::time::timeout(PATIENCE, socket.read(&mut buffer))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&buffer[..read]).into_owned()
}

#[tokio::test]
async fn a_body_complete_at_once_is_released_before_the_head_is_sent() {
    // A release that takes 100 ms, like a backend a long round trip away.
    let lock = SlowReleaseLock::new(Some(Duration::from_millis(100)));
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .layer(LockLayer::new(lock.clone(), |_req| "order:1"));
    let address = serve(app).await;
    let answer = first_bytes_of_answer(address, "/pay").await;
    // Nothing of the answer left before the release had finished: head and body go out
    // together (one write, so no Nagle stall between them), and the key is free by then.
    assert!(
        lock.released.load(Ordering::SeqCst),
        "the head went out before the release finished"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("content-length: 4"), "{answer}");
    assert!(!lock.is_locked("order:1").await.unwrap());
}

#[tokio::test]
async fn an_empty_answer_waits_for_its_release() {
    let lock = SlowReleaseLock::new(Some(Duration::from_millis(100)));
    let app = Router::new()
        .route("/pay", post(|| async { StatusCode::NO_CONTENT }))
        .layer(LockLayer::new(lock.clone(), |_req| "order:3"));
    let address = serve(app).await;
    let answer = first_bytes_of_answer(address, "/pay").await;
    assert!(
        lock.released.load(Ordering::SeqCst),
        "the answer went out before the release finished"
    );
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(!lock.is_locked("order:3").await.unwrap());
}

#[tokio::test]
async fn trailers_end_the_body_and_release_the_lock_before_they_are_passed_on() {
    use http_body_util::StreamBody;
    use tower::{Service, ServiceExt};

    let lock = k1s0_distributed_lock::InMemoryDistributedLock::new(LockConfig::new());
    let mut service = LockLayer::new(lock.clone(), |_req| "stream").layer(tower::service_fn(
        |_req: http::Request<String>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            // Data, then trailers, and a stream that never says it has ended (as a stream
            // body does): hyper stops polling after the trailers.
            let frames = futures::stream::iter([
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"message",
                ))),
                Ok(http_body::Frame::trailers(trailers)),
            ])
            .chain(futures::stream::pending());
            Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(frames)))
        },
    ));
    let response = service
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(String::new()))
        .await
        .unwrap();
    let mut body = response.into_body();
    let data = body.frame().await.unwrap().unwrap();
    assert!(data.is_data());
    assert!(lock.is_locked("stream").await.unwrap());
    let trailers = body.frame().await.unwrap().unwrap();
    assert!(trailers.is_trailers());
    assert!(
        !lock.is_locked("stream").await.unwrap(),
        "the trailers were passed on with the lock still held"
    );
}

#[tokio::test]
async fn a_release_that_never_finishes_does_not_hold_the_answer_back() {
    let lock = SlowReleaseLock::new(None);
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .layer(
            LockLayer::new(lock.clone(), |_req| "order:2")
                .release_timeout(Duration::from_millis(200)),
        );
    let address = serve(app).await;
    let started = Instant::now();
    let (status, _, body) = tokio::time::timeout(PATIENCE, fetch(&client(), address, "/pay"))
        .await
        .expect("the answer waited for a release that never finishes");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "paid"));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(!lock.released.load(Ordering::SeqCst));
}

#[tokio::test]
async fn max_waiters_bounds_the_requests_queued_on_a_key() {
    const REQUESTS: usize = 8;
    const MAX_WAITERS: usize = 3;
    let lock = k1s0_distributed_lock::InMemoryDistributedLock::new(
        LockConfig::new()
            .retry_interval(Duration::from_millis(100))
            .max_retries(100),
    );
    let app = Router::new()
        .route("/hot", post(|| async { "served" }))
        .layer(
            LockLayer::new(lock.clone(), |_req| "hot")
                .wait()
                .max_waiters(MAX_WAITERS),
        );
    let address = serve(app).await;
    let holder = lock.try_acquire("hot").await.unwrap();
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    for _ in 0..REQUESTS {
        let answers_tx = answers_tx.clone();
        tokio::spawn(async move {
            let (status, _, _) = fetch(&client(), address, "/hot").await;
            answers_tx.send(status).unwrap();
        });
    }
    // Those beyond the bound are refused at once, while the holder still holds the key.
    for _ in 0..REQUESTS - MAX_WAITERS {
        assert_eq!(answers.recv().await.unwrap(), StatusCode::CONFLICT);
    }
    drop(holder);
    for _ in 0..MAX_WAITERS {
        assert_eq!(answers.recv().await.unwrap(), StatusCode::OK);
    }
}
