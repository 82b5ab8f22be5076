//! PostgreSQL backend benchmarks, against the server that `DATABASE_URL` names (default
//! `postgres://postgres@127.0.0.1:5432/test`).
//!
//! * `postgres_cycle/raw_floor` — the floor: `pg_try_advisory_lock($1)` then
//!   `pg_advisory_unlock($1)` on one connection with sqlx (prepared, like the backend's).
//! * `postgres_cycle/backend_sql_floor` — the backend's own two statements (the lock that also
//!   draws the fencing token, the unlock that also checks for waiters elsewhere), issued the same
//!   raw way: what the backend's SQL costs, so that the rest of the gap is the client's work.
//! * `postgres_cycle/backend` — `try_acquire` + `release` of [`PostgresDistributedLock`] on the
//!   same kind of key, measured in the same process. Target: at most 1.25x the floor.
//! * Then, printed: the same ratios from alternating batches of the three sides (medians,
//!   robust to other load on the machine), unpinned and with this process and both server processes pinned to
//!   one CPU (see [`alternating_ratio`]), and the contended hand-off latency
//!   (release called → next holder's `acquire` returns), p50 and p99, with 8 tasks on one key
//!   in one lock instance and spread over 8 instances (as 8 processes would be).
//!
//! * The shared side, printed: the shared cycle (`try_acquire_shared` + `release`) against the
//!   exclusive one in alternating batches, and 8 tasks on one key of one lock service over 2 s
//!   each, critical sections per second on the shared side against the exclusive side, with
//!   empty sections and with 1 ms holds. `BENCH_ONLY=shared` runs only this part.
//! * Permits, printed: the permit cycle (`try_acquire_permit` + `release`) against the lock
//!   cycle in alternating batches on one lock service, with limits 1 and 16, and again while
//!   1,000 other advisory locks are held on the server (the permit statement counts the key's
//!   permits in `pg_locks`, which copies the server's whole lock table).
//!   `BENCH_ONLY=permits` runs only this part.
//!
//! Run: `cargo bench --all-features --bench postgres`
mod support;

use support::pg::{self, raw_cycle};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use k1s0_distributed_lock::{
    DistributedLock, DistributedRwLock, DistributedSemaphore, LockConfig, PostgresDistributedLock,
};
use sqlx::PgConnection;
use tokio::runtime::Runtime;

/// The pool every lock service here runs on.
const POOL_SIZE: u32 = 10;

fn unique_key(name: &str) -> String {
    format!("bench:{name}:{}", uuid::Uuid::new_v4().simple())
}

/// The backend's lock and unlock statements (as docs/postgres.md gives them), on the fencing
/// sequence the backend itself uses (drawing from it only moves later tokens on).
const BACKEND_LOCK_SQL: &str = "SELECT CASE WHEN CASE WHEN pg_try_advisory_xact_lock((($1 # 6148914691236517205) >> 32)::int4, ((($1 # 6148914691236517205) << 32) >> 32)::int4) THEN false ELSE EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = (($1 # 6148914691236517205) >> 32)::int4::oid AND objid = ((($1 # 6148914691236517205) << 32) >> 32)::int4::oid AND objsubid = 2 AND mode = 'ShareLock' AND granted AND pid <> pg_backend_pid()) END THEN NULL WHEN pg_try_advisory_lock($1) THEN nextval('\"public\".\"k1s0_lock_fencing_seq\"') END";
const BACKEND_UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($1), \
     CASE WHEN pg_try_advisory_xact_lock(($1 >> 32)::int4, (($1 << 32) >> 32)::int4) THEN false \
     ELSE (set_config('synchronous_commit', 'off', true) \
     || pg_notify('k1s0_distributed_lock', $1::text)::text) IS NOT NULL END";

async fn backend_sql_cycle(conn: &mut PgConnection, key: i64) {
    let token: Option<i64> = sqlx::query_scalar(BACKEND_LOCK_SQL)
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(token.is_some());
    let (released, _notified): (bool, bool) = sqlx::query_as(BACKEND_UNLOCK_SQL)
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(released);
}

/// The two baselines of the criterion comparison.
#[derive(Clone, Copy)]
enum Floor {
    /// `pg_try_advisory_lock` + `pg_advisory_unlock`.
    Bare,
    /// The backend's own two statements.
    BackendSql,
}

impl Floor {
    async fn cycle(self, conn: &mut PgConnection, key: i64) {
        match self {
            Floor::Bare => raw_cycle(conn, key).await,
            Floor::BackendSql => backend_sql_cycle(conn, key).await,
        }
    }
}

async fn backend_cycle(lock: &PostgresDistributedLock, key: &str) {
    let guard = lock.try_acquire(key).await.unwrap();
    guard.release().await.unwrap();
}

fn bench_cycle(c: &mut Criterion, rt: &Runtime) {
    let raw_key = PostgresDistributedLock::advisory_key(&unique_key("raw"));
    let backend_key = unique_key("backend");
    let (lock, mut raw) = rt.block_on(async {
        let lock = PostgresDistributedLock::new(pg::pool(POOL_SIZE).await, LockConfig::new());
        let raw = pg::connection().await;
        (lock, raw)
    });
    // Warm both (connections, prepared statements, the fencing sequence), then pin this
    // process and both server processes to one CPU, as the pinned alternating rounds do
    // (see `alternating_ratio`): otherwise each side's figure depends on where the scheduler
    // happened to put its server process.
    let pinned = rt.block_on(async {
        raw_cycle(&mut raw, raw_key).await;
        backend_cycle(&lock, &backend_key).await;
        // Lock sessions draw tokens without waiting for the disk; so does this floor.
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut raw)
            .await
            .unwrap();
        backend_sql_cycle(&mut raw, raw_key).await;
        let server_pids = [
            session_pid(&lock, &backend_key, &mut raw).await,
            backend_pid(&mut raw).await,
        ];
        pin_to_cpu0(&server_pids)
    });
    println!(
        "postgres_cycle: {}",
        if pinned {
            "this process and both server processes pinned to CPU 0"
        } else {
            "unpinned (taskset is not available here)"
        }
    );
    // Both sides run inside a runtime task, as a request handler would, `iters` cycles per
    // sample; the connection and the lock service move into the task and back.
    let raw = Arc::new(tokio::sync::Mutex::new(raw));
    let lock = Arc::new(lock);
    let backend_key: Arc<str> = Arc::from(backend_key);
    let mut group = c.benchmark_group("postgres_cycle");
    for (name, floor) in [
        ("raw_floor", Floor::Bare),
        ("backend_sql_floor", Floor::BackendSql),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let raw = Arc::clone(&raw);
                rt.block_on(rt.spawn(async move {
                    let mut conn = raw.lock().await;
                    let started = Instant::now();
                    for _ in 0..iters {
                        floor.cycle(&mut conn, raw_key).await;
                    }
                    started.elapsed()
                }))
                .unwrap()
            })
        });
    }
    group.bench_function("backend", |b| {
        b.iter_custom(|iters| {
            let (lock, key) = (Arc::clone(&lock), Arc::clone(&backend_key));
            rt.block_on(rt.spawn(async move {
                let started = Instant::now();
                for _ in 0..iters {
                    backend_cycle(&lock, &key).await;
                }
                started.elapsed()
            }))
            .unwrap()
        })
    });
    group.finish();
    if pinned {
        set_affinity(std::process::id() as i32, &all_cpus());
    }
    support::print_ratio("postgres_cycle", "backend", "raw_floor", "raw floor");
    support::print_ratio(
        "postgres_cycle",
        "backend_sql_floor",
        "raw_floor",
        "raw floor",
    );
    support::print_ratio(
        "postgres_cycle",
        "backend",
        "backend_sql_floor",
        "the backend's SQL",
    );

    drop((raw, lock));
    alternating_ratio(rt);
}

/// The ratio again, robust to this machine, twice: unpinned, then pinned to one CPU.
///
/// On a 2-vCPU VM the cost of a connection's round trip depends on where the scheduler puts
/// its server process: on the client's vCPU about 20 µs, on the other one 50-80 µs. The
/// placement is a coin flip per connection and sticks for a whole round, so one measurement
/// may compare a lucky side with an unlucky one. Hence rounds, each with a fresh raw connection
/// and a fresh lock service; in a round the three sides (the bare floor, the backend's
/// statements run raw, the backend) run in alternating batches (one side at a time), each batch
/// summarised by its median cycle. Printed: every round, the median of each round ratio, and
/// each side's best round.
///
/// Pinned: this process and both server processes (the raw connection's and the lock
/// session's, found in `pg_locks`) are put on CPU 0 with `taskset` for the round, so both sides
/// get the same placement every time and the ratio is the cost of the code and the SQL. The
/// server processes end with their connections after the round; this process is unpinned.
/// Pinning needs `taskset` and the right to set other processes' affinity (root, or the
/// server's user); without them the pinned part says so and is skipped.
fn alternating_ratio(rt: &Runtime) {
    for pinned in [false, true] {
        let label = if pinned {
            "pinned to CPU 0"
        } else {
            "unpinned"
        };
        let mut rounds: Vec<RoundMedians> = Vec::new();
        for round in 0..ROUNDS {
            let outcome = rt.block_on(rt.spawn(alternating_round(pinned))).unwrap();
            let Some(medians) = outcome else {
                println!("alternating, {label}: taskset is not available here; skipped");
                break;
            };
            println!(
                "alternating, {label}, round {round}: raw floor {:?}, backend's SQL {:?}, backend {:?}, ratio {:.3} (SQL alone {:.3}, backend against its SQL {:.3})",
                medians.raw,
                medians.backend_sql,
                medians.backend,
                medians.backend_ratio(),
                medians.sql_ratio(),
                medians.client_ratio()
            );
            rounds.push(medians);
        }
        if rounds.is_empty() {
            continue;
        }
        let median_of = |ratio: fn(&RoundMedians) -> f64| {
            let mut ratios: Vec<f64> = rounds.iter().map(ratio).collect();
            ratios.sort_by(f64::total_cmp);
            ratios[ratios.len() / 2]
        };
        println!(
            "alternating, {label}: median ratio over {} rounds of {BATCHES} x {BATCH} cycles per side: {:.3} (the backend's SQL alone: {:.3}; the backend against its own SQL run raw: {:.3})",
            rounds.len(),
            median_of(RoundMedians::backend_ratio),
            median_of(RoundMedians::sql_ratio),
            median_of(RoundMedians::client_ratio)
        );
        let best = |side: fn(&RoundMedians) -> Duration| rounds.iter().map(side).min().unwrap();
        let best = RoundMedians {
            raw: best(|m| m.raw),
            backend_sql: best(|m| m.backend_sql),
            backend: best(|m| m.backend),
        };
        println!(
            "alternating, {label}: best round raw floor {:?}, best round backend's SQL {:?}, best round backend {:?}, ratio {:.3}",
            best.raw,
            best.backend_sql,
            best.backend,
            best.backend_ratio()
        );
    }
}

/// One round's median cycle on each side.
struct RoundMedians {
    /// The bare floor ([`Floor::Bare`]).
    raw: Duration,
    /// The backend's own statements, raw ([`Floor::BackendSql`]).
    backend_sql: Duration,
    /// [`PostgresDistributedLock`].
    backend: Duration,
}

impl RoundMedians {
    fn backend_ratio(&self) -> f64 {
        self.backend.as_secs_f64() / self.raw.as_secs_f64()
    }

    fn sql_ratio(&self) -> f64 {
        self.backend_sql.as_secs_f64() / self.raw.as_secs_f64()
    }

    /// The backend against its own statements run raw: the client's share.
    fn client_ratio(&self) -> f64 {
        self.backend.as_secs_f64() / self.backend_sql.as_secs_f64()
    }
}

/// One round: fresh connections, optionally pinned, alternating batches of the three sides
/// (both floors run on one raw connection). `None` if pinning was asked for and is not
/// possible.
async fn alternating_round(pinned: bool) -> Option<RoundMedians> {
    let lock = PostgresDistributedLock::new(pg::pool(POOL_SIZE).await, LockConfig::new());
    let mut conn = pg::connection().await;
    // Lock sessions draw tokens without waiting for the disk; so does the backend's SQL here.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await
        .unwrap();
    let raw_key = PostgresDistributedLock::advisory_key(&unique_key("raw"));
    let backend_key = unique_key("backend");
    if pinned {
        let server_pids = [
            session_pid(&lock, &backend_key, &mut conn).await,
            backend_pid(&mut conn).await,
        ];
        if !pin_to_cpu0(&server_pids) {
            return None;
        }
    }
    // Warm all three, then alternate batches: one side at a time, so that each side's server
    // process gets the machine to itself while it is measured.
    for _ in 0..WARM_UP {
        raw_cycle(&mut conn, raw_key).await;
        backend_sql_cycle(&mut conn, raw_key).await;
        backend_cycle(&lock, &backend_key).await;
    }
    let (mut raw_times, mut sql_times, mut backend_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut batch = Vec::with_capacity(BATCH);
    for _ in 0..BATCHES {
        for (floor, times) in [
            (Floor::Bare, &mut raw_times),
            (Floor::BackendSql, &mut sql_times),
        ] {
            batch.clear();
            for _ in 0..BATCH {
                let started = Instant::now();
                floor.cycle(&mut conn, raw_key).await;
                batch.push(started.elapsed());
            }
            times.push(median(&mut batch));
        }
        batch.clear();
        for _ in 0..BATCH {
            let started = Instant::now();
            backend_cycle(&lock, &backend_key).await;
            batch.push(started.elapsed());
        }
        backend_times.push(median(&mut batch));
    }
    if pinned {
        set_affinity(std::process::id() as i32, &all_cpus());
    }
    Some(RoundMedians {
        raw: median(&mut raw_times),
        backend_sql: median(&mut sql_times),
        backend: median(&mut backend_times),
    })
}

/// The server process of the lock session that `key` uses (found in `pg_locks` while `key` is
/// held), asked over `conn`.
async fn session_pid(lock: &PostgresDistributedLock, key: &str, conn: &mut PgConnection) -> i32 {
    let guard = lock.try_acquire(key).await.unwrap();
    let pid = sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
         AND classid = (($1::bigint >> 32) & 4294967295)::oid \
         AND objid = ($1::bigint & 4294967295)::oid",
    )
    .bind(PostgresDistributedLock::advisory_key(key))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    guard.release().await.unwrap();
    pid
}

/// The server process of `conn`.
async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Pins this process and `server_pids` to CPU 0; on failure unpins this process and says
/// false (server processes end with their connections).
fn pin_to_cpu0(server_pids: &[i32]) -> bool {
    let this = std::process::id() as i32;
    let pinned = std::iter::once(&this)
        .chain(server_pids)
        .all(|&pid| set_affinity(pid, "0"));
    if !pinned {
        set_affinity(this, &all_cpus());
    }
    pinned
}

/// Sets the CPU affinity of every thread of process `pid` with `taskset`; false if it failed.
fn set_affinity(pid: i32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Every online CPU, as `taskset` takes them (not `available_parallelism`, which follows this
/// process's own, possibly pinned, affinity).
fn all_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|cpus| cpus.trim().to_owned())
        .unwrap_or_else(|_| "0-1023".to_owned())
}

/// Rounds of the alternating comparison, and cycles of each kind per round (after a warm-up of
/// `WARM_UP` alternating cycles, about a third of a second, that is not counted: right after
/// the connections open, the server processes' placement is still settling).
const ROUNDS: usize = 11;
const WARM_UP: usize = 1_000;
const BATCHES: usize = 6;
const BATCH: usize = 500;
fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// 8 tasks loop acquire → release on one key for `run`; each grant records how long after the
/// previous holder called `release` it came.
async fn handoff_latencies(locks: &[PostgresDistributedLock], run: Duration) -> Vec<Duration> {
    let key = unique_key("handoff");
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + run;
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let lock = locks[task % locks.len()].clone();
            let (key, released_at, latencies) =
                (key.clone(), released_at.clone(), latencies.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let guard = lock.acquire(&key).await.expect("acquire");
                    if let Some(at) = released_at.lock().unwrap().take() {
                        latencies.lock().unwrap().push(at.elapsed());
                    }
                    tokio::task::yield_now().await;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    guard.release().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report_handoff(rt: &Runtime) {
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(100))
        .max_retries(100);
    rt.block_on(async {
        let one = vec![PostgresDistributedLock::new(
            pg::pool(POOL_SIZE).await,
            config,
        )];
        let mut eight = Vec::new();
        for _ in 0..8 {
            eight.push(PostgresDistributedLock::new(
                pg::pool(POOL_SIZE).await,
                config,
            ));
        }
        for (name, locks) in [("1 instance", &one), ("8 instances", &eight)] {
            // Warm-up, then the measured run.
            let _ = handoff_latencies(locks, Duration::from_millis(500)).await;
            let sorted = handoff_latencies(locks, Duration::from_secs(3)).await;
            println!(
                "handoff, 8 tasks on one key, {name}: {} handoffs in 3 s, p50 {:?}, p99 {:?}",
                sorted.len(),
                percentile(&sorted, 0.50),
                percentile(&sorted, 0.99)
            );
        }
    });
}

/// The shared cycle against the exclusive one, and 8 tasks on one key on each side.
fn report_shared_side(rt: &Runtime) {
    let lock = rt.block_on(async {
        PostgresDistributedLock::new(
            pg::pool(POOL_SIZE).await,
            LockConfig::new().wait_timeout(Duration::from_secs(60)),
        )
    });
    let key = unique_key("shared-cycle");
    let ratios = rt.block_on(async {
        const ROUNDS: usize = 30;
        const CYCLES: u32 = 200;
        let mut ratios = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..CYCLES {
                backend_cycle(&lock, &key).await;
            }
            let exclusive = start.elapsed();
            let start = Instant::now();
            for _ in 0..CYCLES {
                let guard = lock.try_acquire_shared(&key).await.unwrap();
                guard.release().await.unwrap();
            }
            ratios.push(start.elapsed().as_secs_f64() / exclusive.as_secs_f64());
        }
        ratios
    });
    println!(
        "postgres_shared alternating: shared cycle / exclusive cycle, median {:.3}x",
        support::median(ratios)
    );
    for hold in [Duration::ZERO, Duration::from_millis(1)] {
        let mut rates = Vec::new();
        for shared in [true, false] {
            const ROUND: u64 = 25;
            let (mut done, mut elapsed) = (0, Duration::ZERO);
            while elapsed < Duration::from_secs(2) {
                elapsed += rt.block_on(support::run_eight_tasks(lock.clone(), shared, ROUND, hold));
                done += ROUND * support::EIGHT_TASKS as u64;
            }
            rates.push(done as f64 / elapsed.as_secs_f64());
        }
        println!(
            "postgres_shared 8 tasks, one key, holds of {hold:?}: shared {:.0} sections/s, exclusive {:.0} sections/s, {:.2}x",
            rates[0],
            rates[1],
            rates[0] / rates[1]
        );
    }
}

async fn permit_cycle(lock: &PostgresDistributedLock, key: &str, limit: u32) {
    let permit = lock.try_acquire_permit(key, limit).await.unwrap();
    permit.release().await.unwrap();
}

/// Holds `count` advisory locks (on numbers no key of these benches maps to, in practice) on a
/// connection of its own, until it is dropped.
async fn hold_other_locks(count: i64) -> PgConnection {
    let mut conn = pg::connection().await;
    let first = PostgresDistributedLock::advisory_key(&unique_key("crowd"));
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_try_advisory_lock($1 + n)) \
         FROM generate_series(0, $2 - 1) AS n",
    )
    .bind(first.min(i64::MAX - count))
    .bind(count)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(held, count);
    conn
}

/// The permit cycle against the lock cycle: alternating batches on one lock service, medians.
fn report_permits(rt: &Runtime) {
    const ROUNDS: usize = 30;
    const CYCLES: u32 = 200;
    let lock = rt.block_on(async {
        PostgresDistributedLock::new(pg::pool(POOL_SIZE).await, LockConfig::new())
    });
    let (lock_key, permit_key) = (unique_key("lock-cycle"), unique_key("permit-cycle"));
    let mut crowd = None;
    for other_locks in [0, 1_000] {
        if other_locks > 0 {
            crowd = Some(rt.block_on(hold_other_locks(other_locks)));
        }
        for limit in [1, 16] {
            let (lock_times, permit_times, ratios) = rt.block_on(async {
                for _ in 0..CYCLES {
                    backend_cycle(&lock, &lock_key).await;
                    permit_cycle(&lock, &permit_key, limit).await;
                }
                let (mut lock_times, mut permit_times, mut ratios) =
                    (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    let start = Instant::now();
                    for _ in 0..CYCLES {
                        backend_cycle(&lock, &lock_key).await;
                    }
                    let locks = start.elapsed() / CYCLES;
                    let start = Instant::now();
                    for _ in 0..CYCLES {
                        permit_cycle(&lock, &permit_key, limit).await;
                    }
                    let permits = start.elapsed() / CYCLES;
                    ratios.push(permits.as_secs_f64() / locks.as_secs_f64());
                    lock_times.push(locks);
                    permit_times.push(permits);
                }
                (lock_times, permit_times, ratios)
            });
            let (mut lock_times, mut permit_times) = (lock_times, permit_times);
            println!(
                "postgres_permits alternating, limit {limit}, {other_locks} other advisory locks held: permit cycle {:?}, lock cycle {:?} (medians of {ROUNDS} batches of {CYCLES}), permit / lock median {:.3}x",
                median(&mut permit_times),
                median(&mut lock_times),
                support::median(ratios)
            );
        }
    }
    drop(crowd);
}

fn main() {
    let rt = support::runtime();
    match std::env::var("BENCH_ONLY").as_deref() {
        Ok("shared") => {
            report_shared_side(&rt);
            return;
        }
        Ok("permits") => {
            report_permits(&rt);
            return;
        }
        _ => {}
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_cycle(&mut criterion, &rt);
    report_handoff(&rt);
    report_shared_side(&rt);
    report_permits(&rt);
    criterion.final_summary();
}
