//! Parallel throughput of the PostgreSQL backend: 32 tasks locking and releasing distinct keys
//! through one `PostgresDistributedLock` with default settings on a pool of 10 connections,
//! against what 10 connections give without the library, in the same process.
//!
//! * `ten_connections` — the floor: 10 plain connections, each driven by its own task in a loop
//!   of `pg_try_advisory_lock($1)` + `pg_advisory_unlock($1)`.
//! * `sqlx_pool` — the same two statements from 32 tasks through a sqlx pool of 10, one
//!   connection taken from the pool per cycle.
//! * `backend` — `try_acquire` + `release` from 32 tasks, each on a key of its own, through
//!   one lock built with `PostgresDistributedLock::new(pool of 10, LockConfig::new())`.
//!
//! The three sides run in interleaved rounds (`PG_PARALLEL_ROUNDS`, default 5, of
//! `PG_PARALLEL_SECS`, default 2 s, each); each ratio is the median of the per-round ratios.
//! Target: `backend` at least 0.8x `ten_connections`. `PG_PARALLEL_SESSIONS=n` builds the lock
//! with `n` sessions instead of the default.
//!
//! Run: `cargo bench --all-features --bench postgres_parallel`
mod support;

use support::pg::{self, raw_cycle};
use support::{cycles_per_second, env_number, median};

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};
use sqlx::{PgConnection, PgPool};

const TASKS: usize = 32;
const CONNECTIONS: u32 = 10;

/// A random advisory key per task, far from any other bench's or test's.
fn advisory_key() -> i64 {
    rand::random::<i64>()
}

/// The sides, each ready to run for a while and count its cycles.
struct Sides {
    connections: Vec<PgConnection>,
    pool: PgPool,
    lock: PostgresDistributedLock,
}

impl Sides {
    async fn new() -> Sides {
        let mut connections = Vec::new();
        for _ in 0..CONNECTIONS {
            connections.push(pg::connection().await);
        }
        let lock_pool = pg::pool(CONNECTIONS).await;
        Sides {
            connections,
            pool: pg::pool(CONNECTIONS).await,
            lock: match std::env::var("PG_PARALLEL_SESSIONS") {
                // To see what each session adds: `PG_PARALLEL_SESSIONS=4`.
                Ok(sessions) => PostgresDistributedLock::builder(lock_pool, LockConfig::new())
                    .sessions(sessions.parse().expect("PG_PARALLEL_SESSIONS: a number"))
                    .build()
                    .expect("lock"),
                Err(_) => PostgresDistributedLock::new(lock_pool, LockConfig::new()),
            },
        }
    }

    /// Cycles per second of the floor: each connection in a loop of its own.
    async fn ten_connections(&mut self, run: Duration) -> f64 {
        let states = std::mem::take(&mut self.connections)
            .into_iter()
            .map(|conn| (conn, advisory_key()))
            .collect();
        let (per_second, states) = cycles_per_second(
            states,
            run,
            |(mut conn, key): (PgConnection, i64)| async move {
                raw_cycle(&mut conn, key).await;
                (conn, key)
            },
        )
        .await;
        self.connections = states.into_iter().map(|(conn, _)| conn).collect();
        per_second
    }

    /// Cycles per second of 32 tasks through the sqlx pool.
    async fn sqlx_pool(&self, run: Duration) -> f64 {
        let states = (0..TASKS)
            .map(|_| (self.pool.clone(), advisory_key()))
            .collect();
        let (per_second, _) =
            cycles_per_second(states, run, |(pool, key): (PgPool, i64)| async move {
                raw_cycle(&mut pool.acquire().await.unwrap(), key).await;
                (pool, key)
            })
            .await;
        per_second
    }

    /// Cycles per second of 32 tasks through the lock.
    async fn backend(&self, run: Duration) -> f64 {
        let states = (0..TASKS)
            .map(|_| {
                let key = format!("bench:parallel:{}", uuid::Uuid::new_v4().simple());
                (self.lock.clone(), key)
            })
            .collect();
        let (per_second, _) = cycles_per_second(
            states,
            run,
            |(lock, key): (PostgresDistributedLock, String)| async move {
                let guard = lock.try_acquire(&key).await.unwrap();
                guard.release().await.unwrap();
                (lock, key)
            },
        )
        .await;
        per_second
    }
}

fn main() {
    // `cargo test --benches` runs each bench binary without `--bench`: nothing to measure then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let run = Duration::from_secs(env_number("PG_PARALLEL_SECS", 2));
    let rounds = env_number("PG_PARALLEL_ROUNDS", 5).max(1);
    let runtime = support::runtime();
    runtime.block_on(async {
        let mut sides = Sides::new().await;
        // Warm-up: every connection opened, every statement prepared.
        sides.ten_connections(Duration::from_millis(300)).await;
        sides.sqlx_pool(Duration::from_millis(300)).await;
        sides.backend(Duration::from_millis(300)).await;
        let (mut floor, mut pooled, mut backend) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            floor.push(sides.ten_connections(run).await);
            pooled.push(sides.sqlx_pool(run).await);
            backend.push(sides.backend(run).await);
        }
        let ratio = |side: &[f64], base: &[f64]| {
            median(side.iter().zip(base).map(|(s, b)| s / b).collect())
        };
        println!(
            "postgres_parallel: {TASKS} tasks, {rounds} interleaved rounds of {run:?}; cycles/s (median): ten_connections {:.0}, sqlx_pool {:.0}, backend {:.0}",
            median(floor.clone()),
            median(pooled.clone()),
            median(backend.clone()),
        );
        let against_floor = ratio(&backend, &floor);
        println!(
            "RATIO postgres_parallel: backend vs ten_connections {against_floor:.3} (target >= 0.8: {}), backend vs sqlx_pool {:.3}, sqlx_pool vs ten_connections {:.3}",
            if against_floor >= 0.8 { "met" } else { "MISSED" },
            ratio(&backend, &pooled),
            ratio(&pooled, &floor),
        );
    });
}
