//! Redis backend benchmarks, against the server at `REDIS_URL` (default redis://127.0.0.1:6379).
//!
//! * `redis_cycle/raw_floor` — the least a Redis lock can cost: `SET key token NX PX` and a
//!   compare-and-delete script (`EVALSHA`) on one multiplexed connection with the redis crate.
//! * `redis_cycle/try_acquire_release` — `RedisDistributedLock::try_acquire` + `release`.
//! * `redis_handoff/8_tasks` — contended hand-off: 8 tasks on one key, the time from the start
//!   of a release to the moment the next holder has the lock (criterion reports the mean).
//!
//! After criterion, the bench prints the cycle ratio measured by interleaving both variants,
//! and the hand-off latency p50/p99 over a 3 s run. Then, for 8 tasks on one key of one lock
//! object built with plain `RedisDistributedLock::new` (no pub/sub), over 3 s: critical
//! sections per second, hand-off p50/p99 and each task's share, against a bare polling loop
//! (8 tasks, each `SET NX PX` until it succeeds, then compare-and-delete) on one connection.
//!
//! The shared side: `redis_shared/try_acquire_shared_release` (criterion), then the shared
//! cycle against the exclusive one interleaved in the same process, and 8 tasks on one key of
//! one lock object over 2 s each: critical sections per second on the shared side against the
//! exclusive side, with empty sections and with 1 ms holds.
//!
//! Permits: `redis_permits/try_acquire_permit_release` (criterion), then the permit cycle
//! (`try_acquire_permit` + `release`, limit 4) against the lock cycle (`try_acquire` +
//! `release`) interleaved in the same process. `BENCH_ONLY=permits` runs only this part.
//!
//! Last, the cost of waiting at scale: 10, 100 and 1,000 waiters on one key, each through a
//! lock object of its own: scripts the server runs per waiter per second while they wait, and
//! hand-off latency p50/p99 as the lock passes through all of them.
//!
//! Run: `cargo bench --all-features --bench redis`

mod support;

use support::{redis_raw, redis_url};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, DistributedSemaphore, LockConfig, RedisDistributedLock,
};

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
            script: redis::Script::new(redis_raw::COMPARE_AND_DELETE),
            key: format!("{}raw", prefix()),
        }
    }

    async fn cycle(&mut self) {
        let token = redis_raw::token();
        assert!(redis_raw::set_nx_px(&mut self.connection, &self.key, &token).await);
        let (connection, script) = (&mut self.connection, &self.script);
        assert!(redis_raw::compare_and_delete(connection, script, &self.key, &token).await);
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

async fn shared_cycle(lock: &RedisDistributedLock) {
    let guard = lock.try_acquire_shared("cycle").await.unwrap();
    guard.release().await.unwrap();
}

fn shared_side(c: &mut Criterion) {
    let runtime = support::runtime();
    let lock = runtime.block_on(lock(
        LockConfig::new().wait_timeout(Duration::from_secs(60)),
    ));
    let mut group = c.benchmark_group("redis_shared");
    group.bench_function("try_acquire_shared_release", |b| {
        b.iter(|| runtime.block_on(shared_cycle(&lock)))
    });
    group.finish();

    let ratios = runtime.block_on(async {
        const ROUNDS: usize = 30;
        const CYCLES: u32 = 300;
        let mut ratios = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..CYCLES {
                our_cycle(&lock).await;
            }
            let exclusive = start.elapsed();
            let start = Instant::now();
            for _ in 0..CYCLES {
                shared_cycle(&lock).await;
            }
            ratios.push(start.elapsed().as_secs_f64() / exclusive.as_secs_f64());
        }
        ratios
    });
    println!(
        "redis_shared interleaved: shared cycle / exclusive cycle, median {:.3}x",
        support::median(ratios)
    );
    for hold in [Duration::ZERO, Duration::from_millis(1)] {
        let mut rates = Vec::new();
        for shared in [true, false] {
            let sections = 0u64;
            let run_for = Duration::from_secs(2);
            let (mut done, mut elapsed) = (sections, Duration::ZERO);
            while elapsed < run_for {
                let took =
                    runtime.block_on(support::run_eight_tasks(lock.clone(), shared, 25, hold));
                done += 25 * support::EIGHT_TASKS as u64;
                elapsed += took;
            }
            rates.push(done as f64 / elapsed.as_secs_f64());
        }
        println!(
            "redis_shared 8 tasks, one key, holds of {hold:?}: shared {:.0} sections/s, exclusive {:.0} sections/s, {:.2}x",
            rates[0],
            rates[1],
            rates[0] / rates[1]
        );
    }
}

async fn permit_cycle(lock: &RedisDistributedLock) {
    let permit = lock.try_acquire_permit("permit-cycle", 4).await.unwrap();
    permit.release().await.unwrap();
}

/// The permit cycle, by criterion and against the lock cycle in interleaved rounds.
fn permits(c: &mut Criterion) {
    let runtime = support::runtime();
    let lock = runtime.block_on(lock(LockConfig::new()));
    let mut group = c.benchmark_group("redis_permits");
    group.bench_function("try_acquire_permit_release", |b| {
        b.iter(|| runtime.block_on(permit_cycle(&lock)))
    });
    group.finish();

    let (ratios, lock_ns, permit_ns) = runtime.block_on(async {
        const ROUNDS: usize = 30;
        const CYCLES: u32 = 300;
        let (mut ratios, mut lock_ns, mut permit_ns) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..CYCLES {
                our_cycle(&lock).await;
            }
            let locks = start.elapsed();
            let start = Instant::now();
            for _ in 0..CYCLES {
                permit_cycle(&lock).await;
            }
            let permits = start.elapsed();
            ratios.push(permits.as_secs_f64() / locks.as_secs_f64());
            lock_ns.push(locks.as_nanos() as f64 / f64::from(CYCLES));
            permit_ns.push(permits.as_nanos() as f64 / f64::from(CYCLES));
        }
        (ratios, lock_ns, permit_ns)
    });
    println!(
        "redis_permits interleaved: lock cycle {:.1} µs, permit cycle {:.1} µs (medians); permit cycle / lock cycle, median {:.3}x",
        support::median(lock_ns) / 1_000.0,
        support::median(permit_ns) / 1_000.0,
        support::median(ratios)
    );
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// Runs 8 tasks on one key until `handoffs` hand-offs were seen (or `run_for` passed) and
/// returns every release→next-holder latency.
async fn handoffs(lock: &RedisDistributedLock, handoffs: u64, run_for: Duration) -> Vec<Duration> {
    handoffs_and_shares(lock, handoffs, run_for).await.0
}

/// [`handoffs`], and the critical sections each task had.
async fn handoffs_and_shares(
    lock: &RedisDistributedLock,
    handoffs: u64,
    run_for: Duration,
) -> (Vec<Duration>, Vec<u64>) {
    const TASKS: usize = 8;
    let origin = Instant::now();
    let stop_at = origin + run_for;
    // (nanoseconds since origin when the last release started, the releasing task + 1).
    let last_release = Arc::new(AtomicU64::new(0));
    let last_holder = Arc::new(AtomicU64::new(u64::MAX));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(
        handoffs.min(100_000) as usize
    )));
    let shares = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let mut tasks = Vec::new();
    for task in 0..TASKS as u64 {
        let lock = lock.clone();
        let (last_release, last_holder, samples, shares) = (
            last_release.clone(),
            last_holder.clone(),
            samples.clone(),
            shares.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= stop_at || samples.lock().unwrap().len() as u64 >= handoffs {
                    return;
                }
                let guard = lock.acquire("handoff").await.unwrap();
                shares[task as usize].fetch_add(1, Ordering::Relaxed);
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
    let shares = shares.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    (
        Arc::try_unwrap(samples).unwrap().into_inner().unwrap(),
        shares,
    )
}

/// 8 tasks on one key, each looping on `SET NX PX` (yielding between tries) until it gets the
/// key, then compare-and-delete, over one multiplexed connection for `run_for`: critical
/// sections per task.
async fn bare_polling_shares(run_for: Duration) -> Vec<u64> {
    let floor = RawFloor::new().await;
    let stop_at = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut connection, script, key) = (
            floor.connection.clone(),
            floor.script.clone(),
            floor.key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sections = 0;
            while Instant::now() < stop_at {
                let token = redis_raw::token();
                if !redis_raw::set_nx_px(&mut connection, &key, &token).await {
                    tokio::task::yield_now().await;
                    continue;
                }
                sections += 1;
                redis_raw::compare_and_delete(&mut connection, &script, &key, &token).await;
            }
            sections
        }));
    }
    let mut shares = Vec::new();
    for task in tasks {
        shares.push(task.await.unwrap());
    }
    shares
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

/// 8 tasks on one key of one lock object made with plain `new()` (no pub/sub), against the
/// bare polling loop, 3 s each.
fn contention_with_new(_: &mut Criterion) {
    let runtime = support::runtime();
    let run_for = Duration::from_secs(3);
    let config = LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(100))
        .max_retries(100);
    let lock = runtime.block_on(async {
        RedisDistributedLock::builder(pool().await)
            .config(config)
            .key_prefix(prefix())
            .build()
            .unwrap()
    });
    let (mut samples, shares) = runtime.block_on(handoffs_and_shares(&lock, u64::MAX, run_for));
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let sections: u64 = shares.iter().sum();
    let bare = runtime.block_on(bare_polling_shares(run_for));
    let bare_sections: u64 = bare.iter().sum();
    println!(
        "redis_new_contention 8 tasks, one key, one lock object from new(), 3 s: {:.0} critical sections/s, hand-off p50 {:?}, p99 {:?}, per task {shares:?}; bare SET NX PX polling loop: {:.0}/s, per task {bare:?}; ratio {:.2}",
        sections as f64 / run_for.as_secs_f64(),
        at(0.50),
        at(0.99),
        bare_sections as f64 / run_for.as_secs_f64(),
        sections as f64 / bare_sections.max(1) as f64,
    );
}

/// The cost of waiting at scale: `n` waiters on one key, each through a lock object of its own
/// (as `n` processes would have), with wake-on-release and the default 100 ms retry interval.
/// While a holder keeps the key for `window`, the scripts the server runs per second (from
/// `INFO commandstats`); then, as the lock passes through every waiter (each
/// releases at once), the latency of each hand-off (from the start of a release to the return
/// of the next `acquire`).
async fn waiters_at_scale(n: usize, window: Duration) -> (f64, Vec<Duration>) {
    let pool = Pool::builder()
        .max_size(4)
        .build(RedisConnectionManager::new(redis_url()).unwrap())
        .await
        .unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let prefix = prefix();
    let config = LockConfig::new()
        .ttl(Duration::from_secs(60))
        .retry_interval(Duration::from_millis(100))
        .max_retries(3_000);
    let lock_object = || {
        RedisDistributedLock::builder(pool.clone())
            .config(config)
            .key_prefix(prefix.clone())
            .wake_on_release(client.clone())
            .build()
            .unwrap()
    };
    let holder = lock_object();
    let guard = holder.acquire("crowded").await.unwrap();
    let origin = Instant::now();
    let last_release = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let waiters: Vec<_> = (0..n)
        .map(|_| {
            let (lock, last_release, samples) =
                (lock_object(), last_release.clone(), samples.clone());
            tokio::spawn(async move {
                let guard = lock.acquire("crowded").await.unwrap();
                let now = origin.elapsed().as_nanos() as u64;
                let released = last_release.load(Ordering::Acquire);
                samples
                    .lock()
                    .unwrap()
                    .push(Duration::from_nanos(now.saturating_sub(released)));
                last_release.store(origin.elapsed().as_nanos() as u64, Ordering::Release);
                guard.release().await.unwrap();
            })
        })
        .collect();

    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    // Every waiter queued and subscribed (its own channel, `<lock key>:released:<token>`).
    let waiters_key = format!("{}:waiters", holder.redis_key("crowded"));
    let channels = format!("{}:released:*", holder.redis_key("crowded"));
    let give_up_at = Instant::now() + Duration::from_secs(60);
    loop {
        let queued: usize = redis::cmd("ZCARD")
            .arg(&waiters_key)
            .query_async(&mut admin)
            .await
            .unwrap();
        let subscribed: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(&channels)
            .query_async(&mut admin)
            .await
            .unwrap();
        if queued == n && subscribed.len() == n {
            break;
        }
        assert!(
            Instant::now() < give_up_at,
            "{queued} of {n} waiters queued, {} subscribed",
            subscribed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Their places are long-lived from their next look (at most a poll interval away).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = redis_raw::scripts_run(&mut admin).await;
    tokio::time::sleep(window).await;
    let scripts = redis_raw::scripts_run(&mut admin).await - before;

    last_release.store(origin.elapsed().as_nanos() as u64, Ordering::Release);
    guard.release().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    let per_second = scripts as f64 / window.as_secs_f64();
    let samples = Arc::try_unwrap(samples).unwrap().into_inner().unwrap();
    (per_second, samples)
}

fn waiting_at_scale(_: &mut Criterion) {
    let runtime = support::runtime();
    let window = Duration::from_secs(support::env_number("REDIS_WAITERS_WINDOW_SECS", 5));
    for n in [10, 100, 1_000] {
        let (scripts, mut samples) = runtime.block_on(waiters_at_scale(n, window));
        let per_waiter = scripts / n as f64;
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "redis_waiters {n} waiters on one key (a lock object each, wake-on-release, 100 ms retry interval): \
             {scripts:.0} scripts/s on the server while waiting ({window:?}), {per_waiter:.2} per waiter per second; hand-off p50 {:?}, p99 {:?}, max {:?}",
            at(0.50),
            at(0.99),
            samples.last().unwrap()
        );
    }
}

criterion_group!(
    benches,
    cycle,
    shared_side,
    permits,
    handoff,
    contention_with_new,
    waiting_at_scale
);
criterion_group!(permits_only, permits);

/// `criterion_main!`, with `BENCH_ONLY=permits` running only the permits.
fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("permits") {
        permits_only();
    } else {
        benches();
    }
    Criterion::default().configure_from_args().final_summary();
}
