//! The layer under load on loopback, per backend: 64 connections, 10 s, hot and distinct keys,
//! half waiting and half fail-fast, clients that leave early.

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::time::Duration;

use common::backends::Backend;
use common::load::{run_http_load, LoadPlan};
use k1s0_distributed_lock::LockConfig;

/// `K1S0_SOAK_SECS` stretches the run (default 10 s).
fn load_duration() -> Duration {
    let secs = std::env::var("K1S0_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

backend_tests!(http_load_keeps_every_invariant);

async fn http_load_keeps_every_invariant(backend: Backend) {
    let config = LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(25))
        .max_retries(20);
    let lock = backend.lock(config).await;
    let plan = LoadPlan {
        connections: 64,
        duration: load_duration(),
        hot_keys: 4,
    };
    let prefix = common::unique_prefix(&format!("load-{backend:?}"));
    let report = run_http_load(lock.clone(), &prefix, plan).await;
    println!("{backend:?}: {report:?}");
    assert_eq!(report.violations, 0, "two requests held one key at once");
    assert!(
        report.other_statuses.is_empty(),
        "{:?}",
        report.other_statuses
    );
    assert!(
        report.ok > 500 && report.conflicts > 0 && report.abandoned > 0,
        "{report:?}"
    );
    // Slack for scheduling on two cores; a request that ignored its budget would wait for the
    // holder's TTL (10 s).
    assert!(
        report.longest_wait < config.wait_budget() + Duration::from_secs(2),
        "{report:?}"
    );
    assert!(
        report.keys_left_locked.is_empty(),
        "{:?}",
        report.keys_left_locked
    );
    assert!(matches!(lock.tracked_keys(), None | Some(0)));
}
