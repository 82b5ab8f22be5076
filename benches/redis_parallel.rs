//! Parallel throughput of the Redis backend: 32 tasks locking and releasing distinct keys
//! through one `RedisDistributedLock` (plain `new()`), against the least a Redis lock can do,
//! in the same process and on the same server (`REDIS_URL`, default redis://127.0.0.1:6379).
//!
//! * `raw` — 32 tasks, each `SET key token NX PX` then a compare-and-delete script
//!   (`EVALSHA`) on its own key, over one multiplexed connection.
//! * `backend` — `try_acquire` + `release` from 32 tasks, each on a key of its own.
//!
//! The sides run in interleaved rounds (`REDIS_PARALLEL_ROUNDS`, default 5, of
//! `REDIS_PARALLEL_SECS`, default 2 s); the ratio is the median of the per-round ratios. Also
//! printed: Redis commands per cycle on each side (every command the server ran, those the
//! scripts call included, from `INFO commandstats` before and after a round). Target: the
//! backend at least 0.6x the raw side.
//!
//! Run: `cargo bench --all-features --bench redis_parallel`
mod support;

use support::{cycles_per_second, env_number, median, redis_raw, redis_url};

use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::bb8::Pool;
use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::bb8_redis::RedisConnectionManager;
use k1s0_distributed_lock::{DistributedLock, LockConfig, RedisDistributedLock};

const TASKS: usize = 32;

async fn connection() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Cycles per second of 32 tasks on their own keys, and Redis commands per cycle.
async fn raw(run: Duration, admin: &mut MultiplexedConnection) -> (f64, f64) {
    let connection = connection().await;
    let script = redis::Script::new(redis_raw::COMPARE_AND_DELETE);
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    let states = (0..TASKS)
        .map(|task| {
            let key = format!("bench:raw-parallel:{prefix}:{task}");
            (connection.clone(), script.clone(), key)
        })
        .collect();
    let before = redis_raw::commands_run(admin).await;
    let (per_second, _) = cycles_per_second(
        states,
        run,
        |(mut connection, script, key): (MultiplexedConnection, redis::Script, String)| async move {
            let token = redis_raw::token();
            assert!(redis_raw::set_nx_px(&mut connection, &key, &token).await);
            assert!(redis_raw::compare_and_delete(&mut connection, &script, &key, &token).await);
            (connection, script, key)
        },
    )
    .await;
    let commands = redis_raw::commands_run(admin).await - before;
    (per_second, per_cycle(commands, per_second, run))
}

async fn backend(
    lock: &RedisDistributedLock,
    run: Duration,
    admin: &mut MultiplexedConnection,
) -> (f64, f64) {
    let states = (0..TASKS)
        .map(|task| (lock.clone(), format!("parallel{task}")))
        .collect();
    let before = redis_raw::commands_run(admin).await;
    let (per_second, _) = cycles_per_second(
        states,
        run,
        |(lock, key): (RedisDistributedLock, String)| async move {
            let guard = lock.try_acquire(&key).await.unwrap();
            guard.release().await.unwrap();
            (lock, key)
        },
    )
    .await;
    let commands = redis_raw::commands_run(admin).await - before;
    (per_second, per_cycle(commands, per_second, run))
}

/// Commands per cycle: the round's commands over its cycles (less the two `INFO`s).
fn per_cycle(commands: u64, per_second: f64, run: Duration) -> f64 {
    commands.saturating_sub(1) as f64 / (per_second * run.as_secs_f64()).max(1.0)
}

fn main() {
    // `cargo test --benches` runs each bench binary without `--bench`: nothing to measure then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let run = Duration::from_secs(env_number("REDIS_PARALLEL_SECS", 2));
    let rounds = env_number("REDIS_PARALLEL_ROUNDS", 5).max(1);
    let runtime = support::runtime();
    runtime.block_on(async {
        let pool = Pool::builder()
            .max_size(4)
            .build(RedisConnectionManager::new(redis_url()).unwrap())
            .await
            .unwrap();
        let config = LockConfig::new();
        let lock = RedisDistributedLock::builder(pool)
            .config(config)
            .key_prefix(format!("bench:{}:", uuid::Uuid::new_v4().simple()))
            .fence_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut admin = connection().await;
        // Warm-up: connections open, scripts cached.
        raw(Duration::from_millis(300), &mut admin).await;
        backend(&lock, Duration::from_millis(300), &mut admin).await;
        let (mut floor, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floor_commands, mut our_commands) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (raw_rate, raw_commands) = raw(run, &mut admin).await;
            let (our_rate, commands) = backend(&lock, run, &mut admin).await;
            ratios.push(our_rate / raw_rate);
            floor.push(raw_rate);
            ours.push(our_rate);
            floor_commands.push(raw_commands);
            our_commands.push(commands);
        }
        println!(
            "redis_parallel: {TASKS} tasks on distinct keys, {rounds} interleaved rounds of {run:?}; cycles/s (median): raw {:.0}, backend {:.0}; Redis commands per cycle (median): raw {:.1}, backend {:.1}",
            median(floor),
            median(ours),
            median(floor_commands),
            median(our_commands),
        );
        let ratio = median(ratios);
        println!(
            "RATIO redis_parallel: backend vs raw {ratio:.3} (target >= 0.6: {})",
            if ratio >= 0.6 { "met" } else { "MISSED" }
        );
    });
}
