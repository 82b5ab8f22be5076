//! examples/observability.rs under load: its `/metrics`, scraped over HTTP as Prometheus would,
//! has every series docs/observability.md lists for what the load does, with values that add
//! up.
#![cfg(feature = "metrics")]

#[allow(dead_code)]
#[path = "../examples/observability.rs"]
mod example;

use std::time::Duration;

use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig};

/// The value of the sample `series` (name and labels exactly as exported), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_exports_the_documented_series() {
    let metrics = example::install_prometheus().unwrap();
    let lock = InMemoryDistributedLock::new(LockConfig::new().wait_timeout(Duration::from_secs(2)));
    let address = example::serve(example::app(lock, metrics), "127.0.0.1:0")
        .await
        .unwrap();
    let answered = example::generate_load(address, Duration::from_secs(1)).await;
    let text = example::scrape(address).await.unwrap();

    let count = |series: &str| sample(&text, series).unwrap_or(0.0);
    let acquired_try =
        count(r#"distributed_lock_acquire_total{backend="memory",mode="try",outcome="acquired"}"#);
    let conflicts =
        count(r#"distributed_lock_acquire_total{backend="memory",mode="try",outcome="conflict"}"#);
    let acquired_wait =
        count(r#"distributed_lock_acquire_total{backend="memory",mode="wait",outcome="acquired"}"#);
    assert!(
        acquired_try > 0.0 && conflicts > 0.0 && acquired_wait > 0.0,
        "{text}"
    );

    let locked = count(r#"distributed_lock_layer_requests_total{outcome="locked"}"#);
    let refused = count(r#"distributed_lock_layer_requests_total{outcome="conflict"}"#);
    assert_eq!(
        locked,
        acquired_try + acquired_wait,
        "every lock taken served a request"
    );
    assert_eq!(
        locked + refused,
        answered as f64,
        "every answered request is counted once"
    );
    assert_eq!(
        refused,
        conflicts
            + count(
                r#"distributed_lock_acquire_total{backend="memory",mode="wait",outcome="timeout"}"#
            )
    );

    let released = count(
        r#"distributed_lock_operations_total{backend="memory",operation="release",outcome="ok"}"#,
    );
    assert_eq!(released, locked, "every lock was released");
    assert_eq!(
        sample(&text, r#"distributed_lock_held{backend="memory"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"distributed_lock_waiting{backend="memory"}"#),
        Some(0.0)
    );
    assert_eq!(
        count(r#"distributed_lock_hold_seconds_count{backend="memory"}"#),
        locked
    );
    // Waits are histograms with buckets: the waiting shipments waited for each other.
    let waits = r#"distributed_lock_acquire_wait_seconds_bucket{backend="memory",mode="wait",outcome="acquired",le="+Inf"}"#;
    assert_eq!(count(waits), acquired_wait);
    let quick = r#"distributed_lock_acquire_wait_seconds_bucket{backend="memory",mode="wait",outcome="acquired",le="0.0005"}"#;
    assert!(
        count(quick) < acquired_wait,
        "some shipments waited more than 0.5 ms"
    );
    assert!(!text.contains("order"), "no series carries a key");
}
