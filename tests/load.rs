//! The layer under load on loopback with the in-memory backend: 64 connections, 10 s, hot and
//! distinct keys, clients that leave early.

mod common;

use std::time::Duration;

use common::load::{run_http_load, LoadPlan};
use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig};

/// `K1S0_SOAK_SECS` stretches the run.
pub fn load_duration() -> Duration {
    let secs = std::env::var("K1S0_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_load_on_the_in_memory_backend_keeps_every_invariant() {
    let config = LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(10))
        .max_retries(20);
    let lock = InMemoryDistributedLock::new(config);
    let plan = LoadPlan {
        connections: 64,
        duration: load_duration(),
        hot_keys: 4,
    };
    let budget = config.wait_budget();
    let report = run_http_load(lock.clone(), &common::unique_prefix("load-mem"), plan).await;
    println!("{report:?}");
    assert_eq!(report.violations, 0, "two requests held one key at once");
    assert!(
        report.other_statuses.is_empty(),
        "{:?}",
        report.other_statuses
    );
    assert!(
        report.ok > 1_000 && report.conflicts > 0 && report.abandoned > 0,
        "{report:?}"
    );
    // Generous slack for scheduling on two cores; a request that ignored its budget would wait
    // for the holder's TTL (10 s).
    assert!(
        report.longest_wait < budget + Duration::from_secs(2),
        "{report:?}"
    );
    assert!(
        report.keys_left_locked.is_empty(),
        "{:?}",
        report.keys_left_locked
    );
    assert_eq!(lock.tracked_keys(), 0);
}
