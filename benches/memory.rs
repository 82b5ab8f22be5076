//! The in-memory backend: an uncontended try_acquire + release cycle against a bare
//! `std::sync::Mutex<HashMap>` insert + remove (the floor of any in-process lock table), and
//! the hand-off latency from `release` to the next waiter holding the lock.
//!
//! `cargo bench --bench memory`

mod support;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig};

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

criterion_group!(benches, cycle, handoff);

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
}
