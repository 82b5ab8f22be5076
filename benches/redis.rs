//! Redis backend benchmarks, against the server at `REDIS_URL` (default redis://127.0.0.1:6379).
//!
//! * `redis_cycle/raw_floor` — the least a Redis lock can cost: `SET key token NX PX` and a
//!   compare-and-delete script (`EVALSHA`) on one multiplexed connection with the redis crate.
//! * `redis_cycle/try_acquire_release` — `RedisDistributedLock::try_acquire` + `release`.
//! * `redis_handoff/8_tasks` — contended hand-off: 8 tasks on one key, the time from the start
//!   of a release to the moment the next holder has the lock (criterion reports the mean).
//!
//! After criterion, the bench prints the cycle ratio measured by interleaving both variants,
//! and the hand-off latency p50/p99 over a 3 s run.
//!
//! Run: `cargo bench --all-features --bench redis`

mod support;

use support::redis_url;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{DistributedLock, LockConfig, RedisDistributedLock};

const COMPARE_AND_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn prefix() -> String {
    format!("bench:{}:", uuid::Uuid::new_v4().simple())
}

struct RawFloor {
    connection: MultiplexedConnection,
    script: redis::Script,
    key: String,
}

impl RawFloor {
    async fn new() -> Self {
        let connection = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        RawFloor {
            connection,
            script: redis::Script::new(COMPARE_AND_DELETE),
            key: format!("{}raw", prefix()),
        }
    }

    async fn cycle(&mut self) {
        let token = uuid::Uuid::new_v4().hyphenated().to_string();
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut self.connection)
            .await
            .unwrap();
        assert!(set.is_some());
        let deleted: i64 = self
            .script
            .key(&self.key)
            .arg(&token)
            .invoke_async(&mut self.connection)
            .await
            .unwrap();
        assert_eq!(deleted, 1);
    }
}

async fn pool() -> Pool<RedisConnectionManager> {
    Pool::builder()
        .max_size(4)
        .build(RedisConnectionManager::new(redis_url()).unwrap())
        .await
        .unwrap()
}

async fn lock(config: LockConfig) -> RedisDistributedLock {
    RedisDistributedLock::builder(pool().await)
        .config(config)
        .key_prefix(prefix())
        .wake_on_release(redis::Client::open(redis_url()).unwrap())
        .build()
        .unwrap()
}

async fn our_cycle(lock: &RedisDistributedLock) {
    let guard = lock.try_acquire("cycle").await.unwrap();
    guard.release().await.unwrap();
}

fn cycle(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut floor = runtime.block_on(RawFloor::new());
    let lock = runtime.block_on(lock(LockConfig::new()));
    let mut group = c.benchmark_group("redis_cycle");
    group.bench_function("raw_floor", |b| b.iter(|| runtime.block_on(floor.cycle())));
    group.bench_function("try_acquire_release", |b| {
        b.iter(|| runtime.block_on(our_cycle(&lock)))
    });
    group.finish();

    // Interleaved short blocks, paired: a load spike on the machine hits both variants of a
    // round alike, and the median of the per-round ratios ignores the rounds it distorted.
    let (ratios, floor_ns, ours_ns) = runtime.block_on(async {
        const ROUNDS: usize = 40;
        const CYCLES: u32 = 300;
        let (mut floor_samples, mut our_samples, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..CYCLES {
                floor.cycle().await;
            }
            let floor_ns = start.elapsed().as_nanos() as f64 / f64::from(CYCLES);
            let start = Instant::now();
            for _ in 0..CYCLES {
                our_cycle(&lock).await;
            }
            let ours_ns = start.elapsed().as_nanos() as f64 / f64::from(CYCLES);
            floor_samples.push(floor_ns);
            our_samples.push(ours_ns);
            ratios.push(ours_ns / floor_ns);
        }
        (ratios, median(&mut floor_samples), median(&mut our_samples))
    });
    let mut ratios = ratios;
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let quartile = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    println!(
        "redis_cycle interleaved: raw floor {:.1} µs, try_acquire+release {:.1} µs (medians); \
         ratio median {:.3}x (quartiles {:.3}x .. {:.3}x)",
        floor_ns / 1_000.0,
        ours_ns / 1_000.0,
        quartile(0.5),
        quartile(0.25),
        quartile(0.75)
    );
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// Runs 8 tasks on one key until `handoffs` hand-offs were seen (or `run_for` passed) and
/// returns every release→next-holder latency.
async fn handoffs(lock: &RedisDistributedLock, handoffs: u64, run_for: Duration) -> Vec<Duration> {
    const TASKS: usize = 8;
    let origin = Instant::now();
    let stop_at = origin + run_for;
    // (nanoseconds since origin when the last release started, the releasing task + 1).
    let last_release = Arc::new(AtomicU64::new(0));
    let last_holder = Arc::new(AtomicU64::new(u64::MAX));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(
        handoffs.min(100_000) as usize
    )));
    let mut tasks = Vec::new();
    for task in 0..TASKS as u64 {
        let lock = lock.clone();
        let (last_release, last_holder, samples) =
            (last_release.clone(), last_holder.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= stop_at || samples.lock().unwrap().len() as u64 >= handoffs {
                    return;
                }
                let guard = lock.acquire("handoff").await.unwrap();
                let now = origin.elapsed().as_nanos() as u64;
                let previous = last_holder.swap(task, Ordering::AcqRel);
                if previous != u64::MAX && previous != task {
                    let released = last_release.load(Ordering::Acquire);
                    samples
                        .lock()
                        .unwrap()
                        .push(Duration::from_nanos(now.saturating_sub(released)));
                }
                tokio::task::yield_now().await;
                last_release.store(origin.elapsed().as_nanos() as u64, Ordering::Release);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(samples).unwrap().into_inner().unwrap()
}

fn handoff(c: &mut Criterion) {
    let runtime = support::runtime();
    let config = LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(100))
        .max_retries(100);
    let lock = runtime.block_on(lock(config));
    let mut group = c.benchmark_group("redis_handoff");
    group.sample_size(20);
    group.bench_function("8_tasks", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let samples = handoffs(&lock, iters, Duration::from_secs(60)).await;
                let total: Duration = samples.iter().sum();
                total * iters as u32 / samples.len().max(1) as u32
            })
        })
    });
    group.finish();

    let mut samples = runtime.block_on(handoffs(&lock, u64::MAX, Duration::from_secs(3)));
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "redis_handoff 8 tasks, 3 s: {} hand-offs, p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        samples.last().unwrap()
    );
}

criterion_group!(benches, cycle, handoff);
criterion_main!(benches);
