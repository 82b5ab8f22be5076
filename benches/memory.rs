//! The in-memory backend: an uncontended try_acquire + release cycle against a bare
//! `std::sync::Mutex<HashMap>` insert + remove (the floor of any in-process lock table), and
//! the hand-off latency from `release` to the next waiter holding the lock; the shared
//! (read) cycle against the exclusive one, and 8 tasks on one key on either side; the permit
//! cycle (`try_acquire_permit` + release) against the lock cycle.
//!
//! `cargo bench --bench memory`

mod support;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, DistributedSemaphore, InMemoryDistributedLock, LockConfig,
};

fn cycle(c: &mut Criterion) {
    let runtime = support::runtime();
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    let table: Mutex<HashMap<String, u64>> = Mutex::default();
    let mut group = c.benchmark_group("memory_cycle");
    group.bench_function("floor_mutex_hashmap", |b| {
        b.iter(|| {
            table.lock().unwrap().insert("order:42".to_owned(), 1);
            table.lock().unwrap().remove("order:42");
        })
    });
    group.bench_function("try_acquire_release", |b| {
        b.to_async(&runtime).iter(|| async {
            let guard = lock.try_acquire("order:42").await.unwrap();
            guard.release().await.unwrap();
        })
    });
    group.bench_function("try_acquire_shared_release", |b| {
        b.to_async(&runtime).iter(|| async {
            let guard = lock.try_acquire_shared("order:42").await.unwrap();
            guard.release().await.unwrap();
        })
    });
    group.bench_function("try_acquire_permit_release", |b| {
        b.to_async(&runtime).iter(|| async {
            let guard = lock.try_acquire_permit("order:42", 4).await.unwrap();
            guard.release().await.unwrap();
        })
    });
    group.finish();
}

/// 8 tasks on one key, each taking and releasing it in a loop: on the shared side (they hold
/// together) and on the exclusive side (one at a time, each waiting for the others).
fn eight_tasks_one_key(c: &mut Criterion) {
    let runtime = support::runtime();
    let lock = InMemoryDistributedLock::new(LockConfig::new().max_retries(100_000));
    let mut group = c.benchmark_group("memory_eight_tasks");
    for shared in [true, false] {
        let name = if shared { "shared" } else { "exclusive" };
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iterations| {
                let sections = iterations.div_ceil(support::EIGHT_TASKS as u64);
                support::run_eight_tasks(lock.clone(), shared, sections, Duration::ZERO)
            })
        });
    }
    group.finish();
}

/// Time from the holder's `release` call to the waiting task holding the lock.
fn handoff(c: &mut Criterion) {
    let runtime = support::runtime();
    let lock = InMemoryDistributedLock::new(LockConfig::new().max_retries(1000));
    let mut group = c.benchmark_group("memory_handoff");
    group.bench_function("release_to_waiter_holding", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let lock = lock.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let holder = lock.try_acquire("hot").await.unwrap();
                    let (queued_tx, queued_rx) = tokio::sync::oneshot::channel::<()>();
                    let waiter_lock = lock.clone();
                    let waiter = tokio::spawn(async move {
                        let acquire = waiter_lock.acquire("hot");
                        tokio::pin!(acquire);
                        // Poll once so the waiter is queued before the release.
                        assert!(futures::poll!(acquire.as_mut()).is_pending());
                        queued_tx.send(()).unwrap();
                        let guard = acquire.await.unwrap();
                        let held_at = Instant::now();
                        drop(guard);
                        held_at
                    });
                    queued_rx.await.unwrap();
                    let released_at = Instant::now();
                    holder.release().await.unwrap();
                    total += waiter.await.unwrap() - released_at;
                }
                total
            }
        })
    });
    group.finish();
}

criterion_group!(benches, cycle, eight_tasks_one_key, handoff);

fn main() {
    support::observe_from_env();
    benches();
    Criterion::default().configure_from_args().final_summary();
    support::print_ratio(
        "memory_cycle",
        "try_acquire_release",
        "floor_mutex_hashmap",
        "floor",
    );
    support::print_ratio(
        "memory_cycle",
        "try_acquire_shared_release",
        "try_acquire_release",
        "exclusive cycle",
    );
    support::print_ratio(
        "memory_cycle",
        "try_acquire_permit_release",
        "try_acquire_release",
        "lock cycle",
    );
    support::print_ratio("memory_eight_tasks", "shared", "exclusive", "exclusive");
    eight_tasks_holding_a_millisecond();
}

/// 8 tasks on one key, each holding it 1 ms per section (work a reader would do), 100
/// sections each: sections per second on the shared side against the exclusive side.
fn eight_tasks_holding_a_millisecond() {
    const SECTIONS: u64 = 100;
    let runtime = support::runtime();
    let lock = InMemoryDistributedLock::new(LockConfig::new().max_retries(100_000));
    let mut rates = Vec::new();
    for shared in [true, false] {
        let elapsed = runtime.block_on(support::run_eight_tasks(
            lock.clone(),
            shared,
            SECTIONS,
            Duration::from_millis(1),
        ));
        let rate = (support::EIGHT_TASKS as u64 * SECTIONS) as f64 / elapsed.as_secs_f64();
        let side = if shared { "shared" } else { "exclusive" };
        println!("memory_eight_tasks_holding_1ms/{side}: {rate:.0} sections/s");
        rates.push(rate);
    }
    println!(
        "RATIO memory_eight_tasks_holding_1ms: shared {:.0} vs exclusive {:.0} sections/s = {:.2}x",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );
}
