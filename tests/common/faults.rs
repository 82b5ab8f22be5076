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

/// A stalled server: `try_acquire` and `acquire` end with `BackendError` (never `Timeout`:
/// nothing said the key was held) within `limit` instead of hanging; the layer answers 503, or lets the request through with
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
            matches!(result, Err(LockError::BackendError(_))),
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

/// A stalled server under callers that wait: three `acquire`s of one key on the same lock
/// object (on PostgreSQL two of them queue in the process behind the first, whose statement
/// gets no answer) each end with `BackendError`, never `Timeout`, within `limit`. The lock
/// has worked on this key before the stall, so the stall hits a connection in use.
pub async fn stalled_acquires_fail_as_backend_errors<L: DistributedLock>(
    via_proxy: &L,
    proxy: &FaultProxy,
    key: &str,
    limit: Duration,
) -> Measured {
    let warm = via_proxy
        .try_acquire(key)
        .await
        .expect("lock before the stall");
    via_proxy
        .release(warm)
        .await
        .expect("release before the stall");
    proxy.stall();
    let started = Instant::now();
    let outcomes = futures::future::join_all((0..3).map(|_| async {
        let result = tokio::time::timeout(limit * 3, via_proxy.acquire(key))
            .await
            .expect("acquire hung on a stalled server");
        (result, started.elapsed())
    }))
    .await;
    let mut slowest = Duration::ZERO;
    for (caller, (result, took)) in outcomes.into_iter().enumerate() {
        assert!(
            matches!(result, Err(LockError::BackendError(_))),
            "caller {caller} on a stalled server, after {took:?}: {result:?}"
        );
        assert!(
            took <= limit,
            "caller {caller} took {took:?}, more than {limit:?}"
        );
        slowest = slowest.max(took);
    }
    proxy.heal().await;
    assert_recovers(via_proxy, key).await;
    Measured {
        what: "stalled server: slowest of three waiting acquires",
        took: slowest,
    }
}

/// A stalled server under callers that have already been told the key is held: `holder`
/// (not through the proxy) holds `key`; two `acquire`s on `via_proxy` start waiting (the
/// first is waiting once `first_waits` says so, the second has been polled once); then the
/// server stalls. Neither may report `Timeout`: after the stall nobody could tell whether the
/// key was still held. Both end with `BackendError` within `limit` of their start.
pub async fn stall_while_waiting_is_a_backend_error<L, F, Fut>(
    holder: &L,
    via_proxy: &L,
    proxy: &FaultProxy,
    key: &str,
    limit: Duration,
    mut both_wait: F,
) -> Measured
where
    L: DistributedLock,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let held = holder
        .try_acquire(key)
        .await
        .expect("the holder takes the key");
    let started = Instant::now();
    let timed = |future| async move {
        let result = tokio::time::timeout(limit * 3, future)
            .await
            .expect("acquire hung on a stalled server");
        (result, started.elapsed())
    };
    let mut first = std::pin::pin!(timed(via_proxy.acquire(key)));
    let mut second = std::pin::pin!(timed(via_proxy.acquire(key)));
    // Poll both once (the second queues behind the first), then drive them until they wait.
    assert!(futures::poll!(first.as_mut()).is_pending());
    assert!(futures::poll!(second.as_mut()).is_pending());
    let waiting = async {
        while !both_wait().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        () = waiting => {}
        (result, _) = &mut first => panic!("the first waiter ended before the stall: {result:?}"),
        (result, _) = &mut second => panic!("the second waiter ended before the stall: {result:?}"),
    }
    proxy.stall();
    let ((first, first_took), (second, second_took)) = futures::join!(first, second);
    for (name, result, took) in [
        ("first", first, first_took),
        ("second", second, second_took),
    ] {
        assert!(
            matches!(result, Err(LockError::BackendError(_))),
            "{name} waiter, stalled while waiting, after {took:?}: {result:?}"
        );
        assert!(
            took <= limit,
            "{name} waiter took {took:?}, more than {limit:?}"
        );
    }
    holder.release(held).await.expect("the holder's release");
    proxy.heal().await;
    assert_recovers(via_proxy, key).await;
    Measured {
        what: "stalled while waiting: slowest waiter",
        took: first_took.max(second_took),
    }
}

/// The other side of the stall tests: `holder` holds `key` for the whole budget, and three
/// `acquire`s of `waiters` (one lock object, so on PostgreSQL two queue in the process) each
/// get `Timeout`, after at least the budget and within `limit`.
pub async fn held_for_the_whole_budget_is_a_timeout<L: DistributedLock>(
    holder: &L,
    waiters: &L,
    key: &str,
    budget: Duration,
    limit: Duration,
) {
    let held = holder
        .try_acquire(key)
        .await
        .expect("the holder takes the key");
    let started = Instant::now();
    let outcomes = futures::future::join_all((0..3).map(|_| async {
        let result = waiters.acquire(key).await;
        (result, started.elapsed())
    }))
    .await;
    for (caller, (result, took)) in outcomes.into_iter().enumerate() {
        assert!(
            matches!(result, Err(LockError::Timeout)),
            "caller {caller} behind a live holder, after {took:?}: {result:?}"
        );
        assert!(
            took >= budget && took <= limit,
            "caller {caller} took {took:?}: not within {budget:?}..{limit:?}"
        );
    }
    assert!(!held.is_lost());
    holder.release(held).await.expect("the holder's release");
}

/// A waiting `LockLayer` (`.wait()`) over a stalled server: three concurrent requests for
/// one path each get 503 with `Retry-After` (a backend failure), never 409 (a conflict),
/// within `limit`.
pub async fn waiting_layer_over_a_stalled_server_answers_503<L: DistributedLock + Clone>(
    via_proxy: &L,
    proxy: &FaultProxy,
    prefix: &str,
    limit: Duration,
) -> Measured {
    let prefix = prefix.to_owned();
    let layer = LockLayer::new(via_proxy.clone(), move |req| {
        format!("{prefix}{}", req.uri.path())
    })
    .wait();
    let address = serve(
        Router::new()
            .route("/pay", post(|| async { "ran" }))
            .layer(layer),
    )
    .await;
    let client = client();
    // One request that works first, so that the stall hits connections in use.
    let (status, _, body) = fetch(&client, address, "/pay").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ran"));
    proxy.stall();
    let started = Instant::now();
    let answers = futures::future::join_all((0..3).map(|_| async {
        let answer = fetch(&client, address, "/pay").await;
        (answer, started.elapsed())
    }))
    .await;
    let mut slowest = Duration::ZERO;
    for (request, ((status, headers, body), took)) in answers.into_iter().enumerate() {
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "request {request} after {took:?}: {body}"
        );
        assert!(headers.contains_key("retry-after"), "request {request}");
        assert!(
            took <= limit,
            "request {request} took {took:?}, more than {limit:?}"
        );
        slowest = slowest.max(took);
    }
    proxy.heal().await;
    let recovered = eventually(Duration::from_secs(10), || async {
        fetch(&client, address, "/pay").await.0 == StatusCode::OK
    })
    .await;
    assert!(
        recovered,
        "the layer did not recover once the server answered again"
    );
    Measured {
        what: "stalled server, waiting layer: slowest 503",
        took: slowest,
    }
}
