//! The Redis backend under contention: mutual exclusion with a read-modify-write counter kept
//! in Redis, and the fairness of the wait queue (hand-offs and per-task shares).
#![cfg(feature = "redis")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::counter::redis::RedisCounter;
use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{DistributedLock, LockConfig, RedisDistributedLock};

async fn pool() -> Pool<RedisConnectionManager> {
    common::redis_conn::pool(&common::redis_url().await, 8).await
}

fn waiting_config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(50))
        .max_retries(600)
}

async fn waking_lock(prefix: &str) -> RedisDistributedLock {
    let url = common::redis_url().await;
    common::redis_conn::lock_builder(&url, &url)
        .await
        .config(waiting_config())
        .key_prefix(prefix)
        .build()
        .unwrap()
}

/// A lock without pub/sub: its waiters poll every 5 ms, up to `max_retries` times.
async fn polling_lock(prefix: &str, max_retries: u32) -> RedisDistributedLock {
    RedisDistributedLock::builder(pool().await)
        .config(
            LockConfig::new()
                .ttl(Duration::from_secs(10))
                .retry_interval(Duration::from_millis(5))
                .max_retries(max_retries),
        )
        .key_prefix(prefix)
        .build()
        .unwrap()
}

/// 32 tasks (on four lock objects, as four clients would) increment a counter kept in Redis
/// by GET, yield, SET (the shared non-atomic counter): any overlap of two critical sections
/// loses an increment.
async fn counter_stays_exact(locks: Vec<RedisDistributedLock>, prefix: &str) {
    const TASKS: usize = 32;
    const ROUNDS: usize = 8;
    let counter = RedisCounter::new(&common::redis_url().await, &format!("{prefix}counter")).await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let lock = locks[task % locks.len()].clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_fence = 0;
            for _ in 0..ROUNDS {
                let guard = lock.acquire("counter").await.unwrap();
                assert!(guard.fencing_token() > last_fence);
                last_fence = guard.fencing_token();
                counter.increment().await;
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(counter.read().await, (TASKS * ROUNDS) as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tasks_never_overlap_with_wake_on_release() {
    let prefix = common::unique_prefix("redis_mutex_wake");
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(waking_lock(&prefix).await);
    }
    counter_stays_exact(locks, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tasks_never_overlap_when_polling() {
    let prefix = common::unique_prefix("redis_mutex_poll");
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(polling_lock(&prefix, 6_000).await);
    }
    counter_stays_exact(locks, &prefix).await;
}

/// What the fairness run saw: the order of holders and the sections per task.
struct Turns {
    holders: Vec<usize>,
    per_task: Vec<usize>,
}

impl Turns {
    /// Releases, and those after which another task held the lock next.
    fn handoffs(&self) -> (usize, usize) {
        let releases = self.holders.len() - 1;
        let handoffs = self
            .holders
            .windows(2)
            .filter(|pair| pair[0] != pair[1])
            .count();
        (releases, handoffs)
    }

    /// The sections of the busiest and of the idlest task.
    fn extremes(&self) -> (usize, usize) {
        let busiest = *self.per_task.iter().max().unwrap();
        let idlest = *self.per_task.iter().min().unwrap();
        (busiest, idlest)
    }
}

/// 8 tasks loop acquire → short critical section → release on one key for `run_for`.
async fn contend(locks: Vec<RedisDistributedLock>, run_for: Duration) -> Turns {
    const TASKS: usize = 8;
    let holders = Arc::new(Mutex::new(Vec::new()));
    let stop_at = tokio::time::Instant::now() + run_for;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let lock = locks[task % locks.len()].clone();
        let holders = Arc::clone(&holders);
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < stop_at {
                let guard = lock.acquire("fair").await.unwrap();
                holders.lock().unwrap().push(task);
                tokio::task::yield_now().await;
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let holders = Arc::try_unwrap(holders).unwrap().into_inner().unwrap();
    let mut per_task = vec![0; TASKS];
    for &task in &holders {
        per_task[task] += 1;
    }
    Turns { holders, per_task }
}

fn soak_or(default: Duration) -> Duration {
    match std::env::var("REDIS_FAIRNESS_SECS") {
        Ok(secs) => Duration::from_secs_f64(secs.parse().expect("REDIS_FAIRNESS_SECS is a number")),
        Err(_) => default,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_changes_hands_and_no_task_starves() {
    let prefix = common::unique_prefix("redis_fair");
    let mut locks = Vec::new();
    for _ in 0..2 {
        locks.push(waking_lock(&prefix).await);
    }
    let turns = contend(locks, soak_or(Duration::from_millis(1500))).await;
    let (releases, handoffs) = turns.handoffs();
    let (busiest, idlest) = turns.extremes();
    eprintln!(
        "{} sections, {handoffs} hand-offs of {releases} releases, per task {:?}",
        turns.holders.len(),
        turns.per_task
    );
    assert!(releases >= 80, "too few sections to judge: {releases}");
    assert!(
        handoffs * 100 >= releases * 80,
        "the lock changed hands on only {handoffs} of {releases} releases"
    );
    assert!(
        idlest * 2 >= busiest,
        "a task starved: per-task sections {:?}",
        turns.per_task
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_fair_without_pub_sub_too() {
    let prefix = common::unique_prefix("redis_fair_poll");
    let lock = polling_lock(&prefix, 2_000).await;
    let turns = contend(vec![lock], Duration::from_millis(800)).await;
    let (releases, handoffs) = turns.handoffs();
    let (busiest, idlest) = turns.extremes();
    assert!(releases >= 16, "too few sections to judge: {releases}");
    assert!(handoffs * 100 >= releases * 80, "{handoffs} of {releases}");
    assert!(idlest * 2 >= busiest, "{:?}", turns.per_task);
}
