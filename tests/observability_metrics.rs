//! The metrics (feature `metrics`) of every backend and of the layer, read back from the
//! `metrics` facade with a debugging recorder: every series of docs/observability.md that the
//! scenario touches, with the counts it implies. One test: the recorder is global to the
//! process.
#![cfg(feature = "metrics")]

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::time::Duration;

use common::backends::Backend;
use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockError, LockLayer,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::ServiceExt;

/// A series of the snapshot: name, sorted labels, value.
type Series = (String, Vec<(String, String)>, DebugValue);

/// Every series of the snapshot.
fn series(snapshotter: &Snapshotter) -> Vec<Series> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            labels.sort();
            (key.key().name().to_owned(), labels, value)
        })
        .collect()
}

/// The value of the series `name` whose labels include all of `labels`.
fn value<'a>(all: &'a [Series], name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    all.iter()
        .find(|(series, have, _)| {
            series == name
                && labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        })
        .map(|(_, _, value)| value)
}

fn counter(all: &[Series], name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(all, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name} {labels:?} is not a counter: {other:?}"),
    }
}

fn gauge(all: &[Series], name: &str, labels: &[(&str, &str)]) -> f64 {
    match value(all, name, labels) {
        Some(DebugValue::Gauge(n)) => n.into_inner(),
        other => panic!("{name} {labels:?} is not a gauge: {other:?}"),
    }
}

fn histogram_count(all: &[Series], name: &str, labels: &[(&str, &str)]) -> usize {
    match value(all, name, labels) {
        Some(DebugValue::Histogram(samples)) => samples.len(),
        None => 0,
        other => panic!("{name} {labels:?} is not a histogram: {other:?}"),
    }
}

fn backends() -> Vec<(Backend, &'static str)> {
    vec![
        (Backend::Memory, "memory"),
        #[cfg(feature = "postgres")]
        (Backend::Postgres, "postgres"),
        #[cfg(feature = "redis")]
        (Backend::Redis, "redis"),
    ]
}

#[test]
fn every_backend_and_the_layer_record_the_documented_series() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    for (backend, label) in backends() {
        let kind = backend;
        runtime.block_on(async {
            let config = LockConfig::new()
                .ttl(Duration::from_millis(300))
                .retry_interval(Duration::from_millis(10))
                .wait_timeout(Duration::from_millis(50));
            let lock = backend.lock(config).await;
            let key = format!("{}metrics", common::unique_prefix("metrics"));

            let guard = lock.try_acquire(&key).await.unwrap();
            assert!(matches!(
                lock.try_acquire(&key).await,
                Err(LockError::AlreadyLocked)
            ));
            assert!(matches!(lock.acquire(&key).await, Err(LockError::Timeout)));
            guard.extend(Duration::from_millis(300)).await.unwrap();
            guard.release().await.unwrap();
            // A guard kept past its lease: lost, and counted as expired.
            let kept = lock.acquire(&key).await.unwrap();
            kept.lost().await;
            assert!(matches!(kept.release().await, Err(LockError::LockLost)));
        });

        let all = series(&snapshotter);
        let backend = ("backend", label);
        let acquired = [backend, ("mode", "try"), ("outcome", "acquired")];
        assert_eq!(
            counter(&all, "distributed_lock_acquire_total", &acquired),
            1,
            "{label}"
        );
        let conflict = [backend, ("mode", "try"), ("outcome", "conflict")];
        assert_eq!(
            counter(&all, "distributed_lock_acquire_total", &conflict),
            1,
            "{label}"
        );
        let timeout = [backend, ("mode", "wait"), ("outcome", "timeout")];
        assert_eq!(
            counter(&all, "distributed_lock_acquire_total", &timeout),
            1,
            "{label}"
        );
        let waited = [backend, ("mode", "wait"), ("outcome", "acquired")];
        assert_eq!(
            counter(&all, "distributed_lock_acquire_total", &waited),
            1,
            "{label}"
        );
        assert_eq!(
            histogram_count(&all, "distributed_lock_acquire_wait_seconds", &timeout),
            1,
            "{label}"
        );
        let released = [backend, ("operation", "release"), ("outcome", "ok")];
        assert_eq!(
            counter(&all, "distributed_lock_operations_total", &released),
            1,
            "{label}"
        );
        let lost_release = [backend, ("operation", "release"), ("outcome", "lost")];
        assert_eq!(
            counter(&all, "distributed_lock_operations_total", &lost_release),
            1,
            "{label}"
        );
        let extended = [backend, ("operation", "extend"), ("outcome", "ok")];
        assert_eq!(
            counter(&all, "distributed_lock_operations_total", &extended),
            1,
            "{label}"
        );
        let expired = [backend, ("cause", "expired")];
        assert_eq!(
            counter(&all, "distributed_lock_lost_total", &expired),
            1,
            "{label}"
        );
        assert_eq!(
            gauge(&all, "distributed_lock_held", &[backend]),
            0.0,
            "{label}"
        );
        assert_eq!(
            gauge(&all, "distributed_lock_waiting", &[backend]),
            0.0,
            "{label}"
        );
        assert_eq!(
            histogram_count(&all, "distributed_lock_hold_seconds", &[backend]),
            2,
            "{label}"
        );
        assert_eq!(
            counter(&all, "distributed_lock_backend_errors_total", &[backend]),
            0,
            "{label}"
        );
        assert!(
            all.iter()
                .all(|(_, labels, _)| labels.iter().all(|(k, _)| k != "key")),
            "no series carries the key"
        );
        // The held gauge moves while a lock is held (the counts above are read: a snapshot
        // drains the counters).
        runtime.block_on(async {
            let lock = kind.lock(LockConfig::new()).await;
            let key = format!("{}held", common::unique_prefix("metrics"));
            let guard = lock.try_acquire(&key).await.unwrap();
            let held = gauge(&series(&snapshotter), "distributed_lock_held", &[backend]);
            assert_eq!(held, 1.0, "{label}");
            guard.release().await.unwrap();
        });
    }

    // A connection cut under a server backend: the next operation fails, the one after
    // reconnects, and the reconnect is counted.
    for (backend, label) in backends().into_iter().skip(1) {
        let connection = if label == "redis" {
            "command"
        } else {
            "session"
        };
        let reconnects = [("backend", label), ("connection", connection)];
        let before = counter(
            &series(&snapshotter),
            "distributed_lock_reconnects_total",
            &reconnects,
        );
        runtime.block_on(async {
            let proxy = common::proxy::FaultProxy::start(backend.server_address().await).await;
            let url = backend.url_via(proxy.address()).await;
            let lock = backend
                .lock_at(Some(url), LockConfig::new(), Some(Duration::from_secs(2)))
                .await;
            let key = format!("{}reconnect", common::unique_prefix("metrics"));
            lock.try_acquire(&key)
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
            proxy.cut_all();
            // The cut may be noticed by this call or only by the next one.
            let mut attempts = 0;
            loop {
                attempts += 1;
                match lock.try_acquire(&key).await {
                    Ok(guard) => {
                        guard.release().await.unwrap();
                        break;
                    }
                    // Answered over the new connection, but a try cut after Redis ran it left
                    // its lock to the TTL.
                    Err(LockError::AlreadyLocked) if attempts > 1 => break,
                    Err(LockError::BackendError(_)) if attempts < 5 => {}
                    Err(error) => panic!("{label}: {error}"),
                }
            }
        });
        let after = counter(
            &series(&snapshotter),
            "distributed_lock_reconnects_total",
            &reconnects,
        );
        assert_eq!(after - before, 1, "{label}: one reconnect after the cut");
    }

    // The layer: a request under the lock, one refused because the key is held, one the key
    // extractor lets through unlocked.
    runtime.block_on(async {
        let lock = InMemoryDistributedLock::new(LockConfig::new());
        let layer = LockLayer::new(lock.clone(), |parts: &http::request::Parts| {
            match parts.uri.path() {
                "/free" => k1s0_distributed_lock::layer::KeyDecision::PassUnlocked,
                path => k1s0_distributed_lock::layer::KeyDecision::Lock(path.to_owned()),
            }
        });
        let service = tower::ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            });
        let call = |path: &'static str| {
            let request = http::Request::post(path)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            service.clone().oneshot(request)
        };
        assert_eq!(
            call("/orders/1").await.unwrap().status(),
            http::StatusCode::OK
        );
        let held = lock.try_acquire("/orders/1").await.unwrap();
        assert_eq!(
            call("/orders/1").await.unwrap().status(),
            http::StatusCode::CONFLICT
        );
        held.release().await.unwrap();
        assert_eq!(call("/free").await.unwrap().status(), http::StatusCode::OK);
    });
    let all = series(&snapshotter);
    for outcome in ["locked", "conflict", "unlocked"] {
        assert_eq!(
            counter(
                &all,
                "distributed_lock_layer_requests_total",
                &[("outcome", outcome)]
            ),
            1,
            "{outcome}"
        );
    }
}
