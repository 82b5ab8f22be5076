//! PostgreSQL sessions terminated (`pg_terminate_backend`) while acquires wait on them: the
//! waiter behind a terminated holder gets the key, and a waiter whose own session is
//! terminated still ends within its budget with the key, leaving nothing behind.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError};
use tokio::time::Instant;

fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(100))
        .max_retries(100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_session_terminated_hands_the_key_to_the_waiter() {
    let key = format!("{}held", common::unique_prefix("pg_terminate_holder"));
    let holder_lock = pg_support::lock(config()).await;
    let waiter_lock = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;

    let held = holder_lock.acquire(&key).await.unwrap();
    let (waiter, _) =
        pg_support::spawn_flagged_waiter(&waiter_lock, &key, &mut admin, Duration::from_secs(5))
            .await;
    let holder_pid = pg_support::holders(&mut admin, &key).await[0];
    let terminated_at = Instant::now();
    pg_support::terminate(&mut admin, holder_pid).await;

    let next = waiter.await.unwrap().expect("the waiter gets the key");
    let took = terminated_at.elapsed();
    println!("waiter took the key {took:?} after the holder's session was terminated");
    assert!(took < config().wait_budget());
    assert!(next.fencing_token() > held.fencing_token());
    common::wait::assert_eventually_within(
        Duration::from_secs(15),
        "the holder learned its session died",
        || async { held.is_lost() },
    )
    .await;
    assert!(matches!(held.release().await, Err(LockError::LockLost)));
    next.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_session_is_terminated_still_gets_the_key_within_its_budget() {
    let key = format!("{}waiting", common::unique_prefix("pg_terminate_waiter"));
    let holder_lock = pg_support::lock(config()).await;
    let waiter_lock = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;

    let held = holder_lock.acquire(&key).await.unwrap();
    let started = Instant::now();
    let (waiter, waiter_pid) =
        pg_support::spawn_flagged_waiter(&waiter_lock, &key, &mut admin, Duration::from_secs(5))
            .await;
    pg_support::terminate(&mut admin, waiter_pid).await;
    // The terminated session's flag went with it (the waiter may already have flagged the key
    // again from a new session).
    assert_ne!(
        pg_support::flag_holders(&mut admin, &key)
            .await
            .first()
            .copied(),
        Some(waiter_pid)
    );
    held.release().await.unwrap();

    let next = waiter
        .await
        .unwrap()
        .expect("the waiter recovers from its lost session and takes the key");
    assert!(started.elapsed() < config().wait_budget());
    assert!(!next.is_lost());
    next.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
}
