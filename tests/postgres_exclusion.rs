//! PostgreSQL backend: mutual exclusion (tasks, lock instances, OS processes) and fair waiting.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::counter::postgres::PostgresCounter;
use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};
use tokio::time::Instant;

const CHILD_KEY: &str = "K1S0_PG_CHILD_KEY";
const CHILD_ROW: &str = "K1S0_PG_CHILD_ROW";
const CHILD_ROUNDS: &str = "K1S0_PG_CHILD_ROUNDS";

fn waiting_config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(100))
        .max_retries(300)
}

/// 32 tasks over 4 lock instances (4 × 2 sessions) do a read-then-write increment of one row
/// under the lock; any overlap would lose an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tasks_keep_a_table_counter_exact() {
    const TASKS: usize = 32;
    const ROUNDS: usize = 10;
    let prefix = common::unique_prefix("pg_counter");
    let key = format!("{prefix}counter");
    let mut admin = pg_support::admin().await;
    let counter = PostgresCounter::new(pg_support::pool(8).await, &prefix).await;
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(pg_support::lock(waiting_config()).await);
    }
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let lock = locks[task % locks.len()].clone();
        let (key, counter) = (key.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut last_token = 0;
            for _ in 0..ROUNDS {
                let guard = lock.acquire(&key).await.expect("acquire within the budget");
                assert!(guard.fencing_token() > last_token);
                last_token = guard.fencing_token();
                // Pool connections only for the increment's two statements: all 32 tasks
                // contend for the lock, none waits on the pool while others hold the lock.
                counter.increment().await;
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(counter.read().await, (TASKS * ROUNDS) as i64);
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
}

/// A second OS process (this test binary, re-run as the child test below) contends for the same
/// key and row. The child first has to wait for the parent's lock, which it gets through the
/// cross-process notification; then both increment the row in turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_contend_for_one_key() {
    const ROUNDS: usize = 100;
    let prefix = common::unique_prefix("pg_two_processes");
    let key = format!("{prefix}k");
    let mut admin = pg_support::admin().await;
    let counter = PostgresCounter::new(pg_support::pool(2).await, &prefix).await;
    let lock = pg_support::lock(waiting_config()).await;
    let held = lock.acquire(&key).await.unwrap();

    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_contender",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_KEY, &key)
        .env(CHILD_ROW, &prefix)
        .env(CHILD_ROUNDS, ROUNDS.to_string())
        .env("DATABASE_URL", common::postgres_url().await)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child process");

    // The child's first acquire waits for us: its flag shows up in pg_locks.
    pg_support::wait_for_flag(&mut admin, &key, Duration::from_secs(20)).await;
    let holders = pg_support::holders(&mut admin, &key).await;
    assert_eq!(holders.len(), 1);
    held.release().await.unwrap();

    for _ in 0..ROUNDS {
        let guard = lock.acquire(&key).await.unwrap();
        counter.increment().await;
        guard.release().await.unwrap();
    }
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The child increments ROUNDS times too (its first increment right after the handoff).
    assert_eq!(counter.read().await, 2 * ROUNDS as i64);
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}

/// The other side of `two_processes_contend_for_one_key`; run only by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of two_processes_contend_for_one_key"]
async fn child_process_contender() {
    let key = std::env::var(CHILD_KEY).expect("run by two_processes_contend_for_one_key");
    let row = std::env::var(CHILD_ROW).unwrap();
    let rounds: usize = std::env::var(CHILD_ROUNDS).unwrap().parse().unwrap();
    let lock = pg_support::lock(waiting_config()).await;
    let counter = PostgresCounter::new(pg_support::pool(1).await, &row).await;
    for _ in 0..rounds {
        let guard = lock.acquire(&key).await.expect("child acquire");
        counter.increment().await;
        guard.release().await.unwrap();
    }
}

/// 8 tasks on one key for 3 s: never two inside at once, and turns are fair (no task gets
/// fewer than half the critical sections of the busiest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_take_turns_fairly() {
    take_turns(1).await;
}

/// The same with the tasks spread over 4 lock instances (4 sets of sessions, as 4 processes
/// would have): waiters of other instances are woken by NOTIFY and get their turns too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_over_four_instances_take_turns_fairly() {
    take_turns(4).await;
}

async fn take_turns(instances: usize) {
    const TASKS: usize = 8;
    let prefix = common::unique_prefix("pg_fair");
    let key = format!("{prefix}k");
    let mut locks = Vec::new();
    for _ in 0..instances {
        locks.push(pg_support::lock(waiting_config()).await);
    }
    let inside = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let lock = locks[task % instances].clone();
        let (key, inside, counts) = (key.clone(), inside.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let guard = lock.acquire(&key).await.expect("acquire");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                counts[task].fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                inside.store(false, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counts: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
    println!("critical sections per task over {instances} instance(s): {counts:?}");
    assert!(max > 0);
    assert!(2 * min >= max, "unfair turns: {counts:?}");
}

/// A waiter in another lock instance (another session, as in another process) is woken by the
/// release through LISTEN/NOTIFY, long before its fallback retry would fire. Run on four keys,
/// one for each sign of the two 32-bit halves of the advisory key, because the releasing
/// statement computes the waiter flag's halves from the key on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_elsewhere_is_woken_by_the_release() {
    let prefix = common::unique_prefix("pg_wake");
    let mut keys = Vec::new();
    for signs in [(false, false), (false, true), (true, false), (true, true)] {
        let key = (0..)
            .map(|i| format!("{prefix}k{i}"))
            .find(|key| {
                let advisory = PostgresDistributedLock::advisory_key(key);
                ((advisory >> 32) < 0, (advisory as i32) < 0) == signs
            })
            .unwrap();
        keys.push(key);
    }
    // Fallback retries only every ~10 s: a wake-up within the test must be the notification.
    let slow_retry = LockConfig::new()
        .retry_interval(Duration::from_secs(10))
        .max_retries(3);
    let holder = pg_support::lock(slow_retry).await;
    let waiter = pg_support::lock(slow_retry).await;
    let mut admin = pg_support::admin().await;
    for key in &keys {
        for _ in 0..2 {
            let guard = holder.acquire(key).await.unwrap();
            let token = guard.fencing_token();
            let (waiting, _) =
                pg_support::spawn_flagged_waiter(&waiter, key, &mut admin, Duration::from_secs(5))
                    .await;
            guard.release().await.unwrap();
            let next = tokio::time::timeout(Duration::from_secs(4), waiting)
                .await
                .expect("woken well before the 5-15 s fallback retry")
                .unwrap()
                .unwrap();
            assert!(next.fencing_token() > token);
            assert_eq!(pg_support::waiter_flags(&mut admin, key).await, 0);
            next.release().await.unwrap();
        }
    }
}
