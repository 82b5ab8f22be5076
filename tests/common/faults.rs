//! Fault scenarios through the [`FaultProxy`], written once for every server backend.

use std::time::Duration;

use axum::routing::post;
use axum::Router;
use http::StatusCode;
use k1s0_distributed_lock::{DistributedLock, LockError, LockLayer};
use tokio::time::Instant;

use super::http::{client, fetch, serve};
use super::proxy::FaultProxy;
use super::wait::eventually;

/// What a scenario measured, for the README's reliability table.
#[derive(Debug)]
pub struct Measured {
    pub what: &'static str,
    pub took: Duration,
}

/// A holder cut off from the server (its connections cut, new ones refused): another client
/// gets the key within `bound`, the holder's guard reports itself lost within `bound`, its
/// release says `LockLost`, and once the proxy forwards again the same lock object works.
pub async fn holder_cut_off<L: DistributedLock>(
    via_proxy: &L,
    direct: &L,
    proxy: &FaultProxy,
    key: &str,
    bound: Duration,
) -> Measured {
    let guard = via_proxy
        .try_acquire(key)
        .await
        .expect("lock through the proxy");
    proxy.refuse_new();
    proxy.cut_all();
    let cut_at = Instant::now();

    let next = tokio::time::timeout(bound + Duration::from_secs(2), direct.acquire(key))
        .await
        .expect("the key stayed held by a holder that was cut off")
        .expect("another client takes the key");
    let took = cut_at.elapsed();
    assert!(next.fencing_token() > guard.fencing_token());
    assert!(
        eventually(bound, || async { guard.is_lost() }).await,
        "the cut-off guard does not know it lost its lock"
    );
    assert!(matches!(guard.release().await, Err(LockError::LockLost)));
    assert!(
        direct.is_locked(key).await.unwrap(),
        "the stale release freed the new holder"
    );
    direct.release(next).await.expect("new holder's release");

    proxy.heal().await;
    assert_recovers(via_proxy, key).await;
    Measured {
        what: "holder cut off: key taken over after",
        took,
    }
}

/// A stalled server: `try_acquire` and `acquire` end with `BackendError` or `Timeout` within
/// `limit` instead of hanging; the layer answers 503, or lets the request through with
/// `fail_open`; once the proxy forwards again the same lock object works.
pub async fn stalled_server<L: DistributedLock + Clone>(
    via_proxy: &L,
    proxy: &FaultProxy,
    key: &str,
    limit: Duration,
) -> Measured {
    proxy.stall();
    let mut slowest = Duration::ZERO;
    for operation in ["try_acquire", "acquire"] {
        let started = Instant::now();
        let call = async {
            match operation {
                "try_acquire" => via_proxy.try_acquire(key).await,
                _ => via_proxy.acquire(key).await,
            }
        };
        let result = tokio::time::timeout(limit * 3, call)
            .await
            .unwrap_or_else(|_| panic!("{operation} hung on a stalled server"));
        let took = started.elapsed();
        assert!(
            matches!(
                result,
                Err(LockError::BackendError(_)) | Err(LockError::Timeout)
            ),
            "{operation} on a stalled server: {result:?}"
        );
        assert!(
            took <= limit,
            "{operation} took {took:?}, more than {limit:?}"
        );
        slowest = slowest.max(took);
    }

    let route = |layer: LockLayer<L>| {
        Router::new()
            .route("/pay", post(|| async { "ran" }))
            .layer(layer)
    };
    let path_key = key.to_owned();
    let closed = serve(route(LockLayer::new(via_proxy.clone(), move |_req| {
        path_key.clone()
    })))
    .await;
    let path_key = key.to_owned();
    let open = serve(route(
        LockLayer::new(via_proxy.clone(), move |_req| path_key.clone()).fail_open(),
    ))
    .await;
    let client = client();
    let (status, headers, _) = fetch(&client, closed, "/pay").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    let (status, _, body) = fetch(&client, open, "/pay").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ran"));

    proxy.heal().await;
    assert_recovers(via_proxy, key).await;
    Measured {
        what: "stalled server: slowest refusal",
        took: slowest,
    }
}

/// The same lock object takes and releases a key again within a few seconds (reconnecting).
pub async fn assert_recovers<L: DistributedLock>(lock: &L, key: &str) {
    let recovery_key = format!("{key}:recovered");
    let recovered = eventually(Duration::from_secs(10), || async {
        match lock.try_acquire(&recovery_key).await {
            Ok(guard) => lock.release(guard).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        recovered,
        "the lock object did not recover once the server answered again"
    );
}

/// A slow network (latency added each way): locking still works, just slower, and exclusion
/// holds between a slow and a fast client.
pub async fn slow_network<L: DistributedLock>(
    via_proxy: &L,
    direct: &L,
    proxy: &FaultProxy,
    key: &str,
    latency: Duration,
) -> Measured {
    proxy.set_latency(latency);
    let started = Instant::now();
    let guard = via_proxy
        .try_acquire(key)
        .await
        .expect("lock over a slow link");
    let took = started.elapsed();
    assert!(took >= latency, "the latency was not injected");
    assert!(matches!(
        direct.try_acquire(key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(!guard.is_lost());
    via_proxy
        .release(guard)
        .await
        .expect("release over a slow link");
    let fresh = direct
        .try_acquire(key)
        .await
        .expect("free after the slow release");
    direct.release(fresh).await.unwrap();
    proxy.heal().await;
    Measured {
        what: "slow network: try_acquire took",
        took,
    }
}
