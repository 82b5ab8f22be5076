//! What the layer locks: keys a client cannot dodge, what an extractor may return, and a
//! configuration refused when the layer is built.

mod common;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::routing::post;
use axum::{Extension, Router};
use common::http::{client, fetch, serve};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use k1s0_distributed_lock::layer::key;
use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockError, LockGuard, LockInfo, LockLayer,
};
use tokio::sync::{mpsc, Semaphore};

/// An app whose handler holds its first request (and so its lock) until the test lets it go;
/// a request that gets in meanwhile is answered at once, so that the test sees it.
struct Held {
    entered: mpsc::UnboundedReceiver<()>,
    gate: Arc<Semaphore>,
}

fn gated_route(path: &str) -> (Router, Held) {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let open = gate.clone();
    let inside = Arc::new(AtomicBool::new(false));
    let router = Router::new().route(
        path,
        post(move || async move {
            if inside.swap(true, Ordering::SeqCst) {
                return "got in beside the holder";
            }
            entered_tx.send(()).unwrap();
            open.acquire().await.unwrap().forget();
            inside.store(false, Ordering::SeqCst);
            "done"
        }),
    );
    (router, Held { entered, gate })
}

async fn post_with(
    address: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
) -> StatusCode {
    let mut request = Request::post(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn two_spellings_of_one_path_lock_the_same_key() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let (router, mut held) = gated_route("/orders/{id}/pay");
    let address = serve(router.layer(LockLayer::new(lock.clone(), key::path()))).await;
    let first = tokio::spawn(async move { fetch(&client(), address, "/orders/42/pay").await });
    held.entered.recv().await.unwrap();
    // axum hands both to the handler as Path(42): they must exclude each other.
    for spelling in ["/orders/%34%32/pay", "/orders/4%32/pay", "/orders/42/pay"] {
        let (status, _, _) = fetch(&client(), address, spelling).await;
        assert_eq!(status, StatusCode::CONFLICT, "{spelling} got in");
    }
    held.gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert!(!lock.is_locked("/orders/42/pay").await.unwrap());
}

#[tokio::test]
async fn a_header_that_is_not_ascii_locks_and_a_repeated_one_is_refused() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let (router, mut held) = gated_route("/pay");
    let layer = LockLayer::new(lock.clone(), key::header("Idempotency-Key"));
    let address = serve(router.layer(layer)).await;
    let cafe: &[u8] = "café".as_bytes();
    let first =
        tokio::spawn(async move { post_with(address, "/pay", &[("idempotency-key", cafe)]).await });
    held.entered.recv().await.unwrap();
    assert_eq!(
        post_with(address, "/pay", &[("idempotency-key", cafe)]).await,
        StatusCode::CONFLICT,
        "a request with the same non-ASCII key got in"
    );
    assert_eq!(
        post_with(
            address,
            "/pay",
            &[("idempotency-key", b"other"), ("idempotency-key", cafe)]
        )
        .await,
        StatusCode::BAD_REQUEST,
        "a repeated header must be refused"
    );
    held.gate.add_permits(1);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    // Without the header the request passes unlocked.
    held.gate.add_permits(1);
    assert_eq!(post_with(address, "/pay", &[]).await, StatusCode::OK);
    assert!(!lock.is_locked("idempotency-key:caf%C3%A9").await.unwrap());
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn matched_path_locks_the_route_and_the_fallback_takes_no_lock() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let (router, mut held) = gated_route("/orders/{id}/pay");
    let app = router.route_layer(LockLayer::new(lock.clone(), key::matched_path()));
    let address = serve(app).await;
    let first = tokio::spawn(async move { fetch(&client(), address, "/orders/%34%32/pay").await });
    held.entered.recv().await.unwrap();
    assert!(lock
        .is_locked("/orders/{id}/pay /orders/42/pay")
        .await
        .unwrap());
    let (status, _, _) = fetch(&client(), address, "/orders/42/pay").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A path no route matches is answered 404 by the fallback, without a lock.
    let (status, _, _) = fetch(&client(), address, "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    held.gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn an_unlocked_request_has_no_lock_info() {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let app = Router::new()
        .route(
            "/{mode}",
            post(|info: Option<Extension<LockInfo>>| async move {
                match info {
                    Some(Extension(info)) => format!("locked {}", info.key()),
                    None => "unlocked".to_owned(),
                }
            }),
        )
        .layer(LockLayer::new(lock, |req: &http::request::Parts| {
            (req.uri.path() == "/locked").then_some("the-key")
        }));
    let address = serve(app).await;
    assert_eq!(
        fetch(&client(), address, "/locked").await.2,
        "locked the-key"
    );
    assert_eq!(fetch(&client(), address, "/free").await.2, "unlocked");
}

#[test]
fn every_documented_extractor_return_type_compiles() {
    let lock = || InMemoryDistributedLock::new(LockConfig::new());
    let _ = LockLayer::new(lock(), |_| "global");
    let _ = LockLayer::new(lock(), |_| Cow::Borrowed("global"));
    let _ = LockLayer::new(lock(), |req| req.uri.path().to_owned());
    let _ = LockLayer::new(lock(), |req| Some(req.uri.path().to_owned()));
    let _ = LockLayer::new(lock(), |req| (req.method == "POST").then_some("posts"));
    let _ = LockLayer::new(lock(), |req| match req.headers.get("x-tenant") {
        Some(_) => key::KeyDecision::Lock("tenant".into()),
        None => key::KeyDecision::Refuse("a tenant header is required".into()),
    });
}

/// A lock whose configuration is refused: the layer must not be built on it.
struct Misconfigured;

impl DistributedLock for Misconfigured {
    async fn try_acquire(&self, _key: &str) -> Result<LockGuard, LockError> {
        unreachable!("never built")
    }

    async fn acquire(&self, _key: &str) -> Result<LockGuard, LockError> {
        unreachable!("never built")
    }

    async fn is_locked(&self, _key: &str) -> Result<bool, LockError> {
        unreachable!("never built")
    }

    fn validate(&self) -> Result<(), LockError> {
        Err(LockError::InvalidConfig {
            reason: "ttl 0ns must lie between 1ms and 365 days".into(),
        })
    }
}

#[test]
fn a_misconfigured_lock_is_refused_when_the_layer_is_built() {
    let error = LockLayer::try_new(Misconfigured, key::path()).unwrap_err();
    assert!(matches!(error, LockError::InvalidConfig { .. }));
    let panic = std::panic::catch_unwind(|| LockLayer::new(Misconfigured, key::path()))
        .expect_err("new must refuse it");
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("ttl 0ns"), "{message}");
}
