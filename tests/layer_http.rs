//! LockLayer on a real axum server over real sockets, against every backend.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::backends::Backend;
use common::failing::FlakyLock;
use common::http::{client, fetch, prefixed_path, send, serve};
use common::suites::becomes_free;
use http::StatusCode;
use http_body_util::BodyExt;
use k1s0_distributed_lock::{
    layer::key, DistributedLock, InMemoryDistributedLock, LockConfig, LockInfo, LockLayer,
    RejectionKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Barrier, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

const PATIENCE: Duration = Duration::from_secs(10);

fn config() -> LockConfig {
    LockConfig::new()
        .retry_interval(Duration::from_millis(100))
        .max_retries(100)
}

backend_tests!(
    same_key_gives_exactly_one_200_and_409_for_the_rest,
    the_conflict_status_can_be_423_locked,
    different_keys_all_run_at_once,
    the_handler_reads_the_lock_it_runs_under,
    an_empty_body_releases_the_lock_before_the_response_arrives,
    a_streaming_body_keeps_the_lock_until_its_end,
    a_client_that_goes_away_frees_the_lock,
    wait_mode_serves_requests_one_after_another,
    wait_mode_answers_the_conflict_status_after_its_budget,
);

/// A handler that reports it has started, then waits for the test to open the gate.
#[derive(Clone)]
struct Gate {
    entered: mpsc::UnboundedSender<()>,
    open: Arc<Semaphore>,
}

async fn gated(State(gate): State<Gate>) -> &'static str {
    gate.entered.send(()).unwrap();
    gate.open.acquire().await.unwrap().forget();
    "done"
}

async fn same_key_gives_one_success_and_conflicts(
    backend: Backend,
    layer_status: Option<StatusCode>,
) {
    const REQUESTS: usize = 16;
    let (entered, mut entered_rx) = mpsc::unbounded_channel();
    let gate = Gate {
        entered,
        open: Arc::new(Semaphore::new(0)),
    };
    let prefix = common::unique_prefix("one-of-many");
    let mut layer = LockLayer::new(backend.lock(config()).await, prefixed_path(&prefix));
    if let Some(status) = layer_status {
        layer = layer.conflict_status(status);
    }
    let app = Router::new()
        .route("/orders/{id}", post(gated))
        .with_state(gate.clone())
        .layer(layer);
    let address = serve(app).await;
    let client = client();

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for _ in 0..REQUESTS {
        let (client, done_tx) = (client.clone(), done_tx.clone());
        tokio::spawn(async move {
            let (status, _, _) = fetch(&client, address, "/orders/1").await;
            done_tx.send(status).unwrap();
        });
    }
    // Every request but the lock holder's is refused while the holder waits at the gate.
    let expected_conflict = layer_status.unwrap_or(StatusCode::CONFLICT);
    for _ in 0..REQUESTS - 1 {
        let status = tokio::time::timeout(PATIENCE, done_rx.recv())
            .await
            .expect("more than one request got into the locked handler")
            .unwrap();
        assert_eq!(status, expected_conflict);
    }
    tokio::time::timeout(PATIENCE, entered_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(entered_rx.try_recv().is_err(), "a second handler ran");
    gate.open.add_permits(1);
    assert_eq!(done_rx.recv().await.unwrap(), StatusCode::OK);
}

async fn same_key_gives_exactly_one_200_and_409_for_the_rest(backend: Backend) {
    same_key_gives_one_success_and_conflicts(backend, None).await;
}

async fn the_conflict_status_can_be_423_locked(backend: Backend) {
    same_key_gives_one_success_and_conflicts(backend, Some(StatusCode::LOCKED)).await;
}

async fn different_keys_all_run_at_once(backend: Backend) {
    const REQUESTS: usize = 16;
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let app = Router::new()
        .route(
            "/orders/{id}",
            post(|State(barrier): State<Arc<Barrier>>| async move {
                // Only passes once all requests are inside their handlers together.
                barrier.wait().await;
                "ok"
            }),
        )
        .with_state(barrier)
        .layer(LockLayer::new(
            backend.lock(config()).await,
            prefixed_path(&common::unique_prefix("distinct")),
        ));
    let address = serve(app).await;
    let client = client();
    let requests = (0..REQUESTS).map(|i| {
        let client = client.clone();
        async move { fetch(&client, address, &format!("/orders/{i}")).await.0 }
    });
    let statuses = tokio::time::timeout(PATIENCE, futures::future::join_all(requests))
        .await
        .expect("requests for different keys did not run concurrently");
    assert!(
        statuses.iter().all(|status| *status == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_lets_requests_through_unlocked() {
    const REQUESTS: usize = 8;
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let app = Router::new()
        .route(
            "/health",
            post(
                |State(barrier): State<Arc<Barrier>>, info: Option<Extension<LockInfo>>| async move {
                    barrier.wait().await;
                    if info.is_some() { "locked" } else { "unlocked" }
                },
            ),
        )
        .with_state(barrier)
        .layer(LockLayer::new(InMemoryDistributedLock::new(config()), |req| {
            (req.uri.path() != "/health").then(|| "everything".to_owned())
        }));
    let address = serve(app).await;
    let client = client();
    let requests = (0..REQUESTS).map(|_| {
        let client = client.clone();
        async move { fetch(&client, address, "/health").await }
    });
    let answers = tokio::time::timeout(PATIENCE, futures::future::join_all(requests))
        .await
        .expect("unlocked requests were serialised");
    for (status, _, body) in answers {
        assert_eq!((status, body.as_str()), (StatusCode::OK, "unlocked"));
    }
}

async fn the_handler_reads_the_lock_it_runs_under(backend: Backend) {
    let prefix = common::unique_prefix("info");
    let key = format!("{prefix}/orders/9");
    let lock = backend.lock(config()).await;
    let observer = lock.clone();
    let app = Router::new()
        .route(
            "/orders/{id}",
            post(move |Extension(info): Extension<LockInfo>| async move {
                let held = observer.is_locked(info.key()).await.unwrap();
                format!(
                    "{}|{}|{}|{held}",
                    info.key(),
                    info.token(),
                    info.fencing_token()
                )
            }),
        )
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)));
    let address = serve(app).await;
    let client = client();
    let mut last_fencing = 0;
    for _ in 0..3 {
        let (status, _, body) = fetch(&client, address, "/orders/9").await;
        assert_eq!(status, StatusCode::OK);
        let fields: Vec<&str> = body.split('|').collect();
        assert_eq!(fields[0], key);
        assert_eq!(
            uuid::Uuid::parse_str(fields[1]).unwrap().get_version_num(),
            4
        );
        let fencing: u64 = fields[2].parse().unwrap();
        assert!(fencing > last_fencing);
        last_fencing = fencing;
        assert_eq!(
            fields[3], "true",
            "the lock was not held while the handler ran"
        );
    }
    // The answer was read to its end, and the layer released before passing the end on: three
    // back-to-back requests all got the lock, and it is free now, on every backend.
    assert!(!lock.is_locked(&key).await.unwrap());
}

async fn an_empty_body_releases_the_lock_before_the_response_arrives(backend: Backend) {
    let prefix = common::unique_prefix("empty");
    let key = format!("{prefix}/empty");
    let lock = backend.lock(config()).await;
    let app = Router::new()
        .route("/empty", post(|| async { StatusCode::NO_CONTENT }))
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)));
    let address = serve(app).await;
    let response = send(&client(), address, "POST", "/empty").await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // The body is not even read: the layer released before it answered.
    assert!(!lock.is_locked(&key).await.unwrap());
    drop(response);
}

type ChunkReceiver = Arc<Mutex<Option<mpsc::Receiver<Result<Bytes, std::io::Error>>>>>;

async fn a_streaming_body_keeps_the_lock_until_its_end(backend: Backend) {
    let prefix = common::unique_prefix("stream");
    let key = format!("{prefix}/export");
    let lock = backend.lock(config()).await;
    let (chunks, chunk_rx) = mpsc::channel(4);
    let chunk_rx: ChunkReceiver = Arc::new(Mutex::new(Some(chunk_rx)));
    let app = Router::new()
        .route(
            "/export",
            post(|State(chunk_rx): State<ChunkReceiver>| async move {
                let rx = chunk_rx.lock().unwrap().take().expect("one export");
                Body::from_stream(ReceiverStream::new(rx))
            }),
        )
        .with_state(chunk_rx)
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)));
    let address = serve(app).await;
    let client = client();

    let response = send(&client, address, "POST", "/export").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    chunks
        .send(Ok(Bytes::from_static(b"first,")))
        .await
        .unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first,");

    // Mid-stream: the handler returned long ago, but the lock is still held.
    assert!(lock.is_locked(&key).await.unwrap());
    let (status, _, _) = fetch(&client, address, "/export").await;
    assert_eq!(status, StatusCode::CONFLICT);

    chunks.send(Ok(Bytes::from_static(b"last"))).await.unwrap();
    drop(chunks);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");
    assert!(
        !lock.is_locked(&key).await.unwrap(),
        "the lock outlived the body"
    );
}

/// Sends a drop signal when the handler's future is dropped.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.take().unwrap().send(());
    }
}

async fn a_client_that_goes_away_frees_the_lock(backend: Backend) {
    let prefix = common::unique_prefix("gone");
    let key = format!("{prefix}/slow");
    let lock = backend.lock(config()).await;
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<oneshot::Receiver<()>>();
    let app = Router::new()
        .route(
            "/slow",
            post(move || async move {
                let (dropped_tx, dropped_rx) = oneshot::channel();
                let _signal = DropSignal(Some(dropped_tx));
                entered_tx.send(dropped_rx).unwrap();
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .layer(LockLayer::new(lock.clone(), prefixed_path(&prefix)));
    let address = serve(app).await;

    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket
        .write_all(b"POST /slow HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let handler_dropped = entered_rx.recv().await.unwrap();
    assert!(lock.is_locked(&key).await.unwrap());
    drop(socket);
    tokio::time::timeout(PATIENCE, handler_dropped)
        .await
        .expect("the server kept the abandoned request running")
        .unwrap();
    // The guard is dropped right after the handler, on the server's thread.
    assert!(becomes_free(&lock, &key, Duration::from_secs(1)).await);
}

async fn wait_mode_serves_requests_one_after_another(backend: Backend) {
    const REQUESTS: u64 = 16;
    #[derive(Clone, Default)]
    struct Shared {
        counter: Arc<AtomicU64>,
        inside: Arc<AtomicUsize>,
    }
    let shared = Shared::default();
    let app = Router::new()
        .route(
            "/counter",
            post(|State(shared): State<Shared>| async move {
                assert_eq!(
                    shared.inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two requests inside"
                );
                let value = shared.counter.load(Ordering::Relaxed);
                tokio::task::yield_now().await;
                shared.counter.store(value + 1, Ordering::Relaxed);
                shared.inside.fetch_sub(1, Ordering::SeqCst);
                "counted"
            }),
        )
        .with_state(shared.clone())
        .layer(
            LockLayer::new(
                backend.lock(config()).await,
                prefixed_path(&common::unique_prefix("wait")),
            )
            .wait(),
        );
    let address = serve(app).await;
    let client = client();
    let requests = (0..REQUESTS).map(|_| {
        let client = client.clone();
        async move { fetch(&client, address, "/counter").await.0 }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(shared.counter.load(Ordering::Relaxed), REQUESTS);
}

async fn wait_mode_answers_the_conflict_status_after_its_budget(backend: Backend) {
    let prefix = common::unique_prefix("budget");
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(10))
        .max_retries(3);
    let lock = backend.lock(config).await;
    let _holder = lock.try_acquire(&format!("{prefix}/busy")).await.unwrap();
    let app = Router::new()
        .route("/busy", post(|| async { "ran" }))
        .layer(LockLayer::new(lock, prefixed_path(&prefix)).wait());
    let address = serve(app).await;
    let (status, _, _) = fetch(&client(), address, "/busy").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_failing_backend_gives_503_with_retry_after_unless_fail_open() {
    let flaky = FlakyLock::down();
    let app = |layer: LockLayer<FlakyLock>| {
        Router::new()
            .route(
                "/pay",
                post(|info: Option<Extension<LockInfo>>| async move {
                    if info.is_some() {
                        "locked"
                    } else {
                        "unlocked"
                    }
                }),
            )
            .layer(layer)
    };
    let client = client();

    let closed = serve(app(LockLayer::new(flaky.clone(), key::path()))).await;
    let (status, headers, _) = fetch(&client, closed, "/pay").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");

    let later = serve(app(
        LockLayer::new(flaky.clone(), key::path()).retry_after(Duration::from_millis(2500))
    ))
    .await;
    assert_eq!(fetch(&client, later, "/pay").await.1["retry-after"], "3");

    let open = serve(app(LockLayer::new(flaky.clone(), key::path()).fail_open())).await;
    let (status, _, body) = fetch(&client, open, "/pay").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "unlocked"));

    // Once the backend is back, the same layers lock again.
    flaky.set_down(false);
    let (status, _, body) = fetch(&client, closed, "/pay").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "locked"));
    let (status, _, body) = fetch(&client, open, "/pay").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "locked"));
}

#[tokio::test]
async fn a_key_the_backend_refuses_gives_400_and_the_handler_never_runs() {
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let app = Router::new()
        .route(
            "/pay",
            post(move || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "ran"
            }),
        )
        .layer(
            LockLayer::new(InMemoryDistributedLock::new(config()), |_req| String::new())
                .fail_open(),
        );
    let address = serve(app).await;
    let (status, _, _) = fetch(&client(), address, "/pay").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_custom_responder_shapes_the_refusal() {
    let lock = InMemoryDistributedLock::new(config());
    let _holder = lock.try_acquire("/pay").await.unwrap();
    let layer = LockLayer::new(lock, key::path()).on_rejection(|rejection| {
        assert_eq!(rejection.kind(), RejectionKind::Locked);
        http::Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .body(format!("{{\"busy\":\"{}\"}}", rejection.key()))
            .unwrap()
    });
    let app = Router::new()
        .route("/pay", post(|| async { "ran" }))
        .layer(layer);
    let address = serve(app).await;
    let (status, _, body) = fetch(&client(), address, "/pay").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body, r#"{"busy":"/pay"}"#);
}

#[tokio::test]
async fn raw_socket_sees_a_plain_conflict_answer() {
    // What a client without any HTTP library sees: a complete 409 with a short text body.
    let lock = InMemoryDistributedLock::new(config());
    let _holder = lock.try_acquire("/pay").await.unwrap();
    let app = Router::new()
        .route("/pay", post(|| async { "ran" }))
        .layer(LockLayer::new(lock, key::path()));
    let address = serve(app).await;
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket
        .write_all(
            b"POST /pay HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 409 Conflict\r\n"), "{answer}");
    assert!(
        answer.ends_with("the resource is locked by another request"),
        "{answer}"
    );
}
