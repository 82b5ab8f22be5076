//! Shared by the benchmarks: where the servers are, settings from the environment, reading
//! criterion's estimates back to print ratios, and running wrk.
#![allow(dead_code)]

#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "redis")]
pub mod redis_raw;
pub mod wrk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k1s0_distributed_lock::DistributedRwLock;

/// The Redis server `REDIS_URL` names, or the local one this project's machines run.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The whole number in the environment variable `name`, or `default` when it is not set.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: a whole number")),
        Err(_) => default,
    }
}

/// The mean time per iteration, in nanoseconds, that criterion measured for `group/bench`
/// in this run.
pub fn mean_nanos(group: &str, bench: &str) -> Option<f64> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let path = target
        .join("criterion")
        .join(group)
        .join(bench)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{"confidence_interval":{...},"point_estimate":123.4,...},...}
    let mean = &text[text.find("\"mean\"")?..];
    let start = mean.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let end = start + mean[start..].find([',', '}'])?;
    mean[start..end].trim().parse().ok()
}

/// Prints `measured / baseline` for two benchmarks of one group.
pub fn print_ratio(group: &str, measured: &str, baseline: &str, what: &str) {
    match (mean_nanos(group, measured), mean_nanos(group, baseline)) {
        (Some(m), Some(b)) => println!(
            "RATIO {group}: {measured} {m:.0} ns vs {baseline} {b:.0} ns per iteration = {:.3}x time, {:.1}% of {what} throughput",
            m / b,
            100.0 * b / m
        ),
        _ => println!("RATIO {group}: estimates not found (run without --test / filters)"),
    }
}

/// The runtime every benchmark runs on: multi-threaded, one worker per core of this machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Spawns one task per state of `states`, each running `cycle` on its own state in a loop until
/// `run` has passed. Returns the cycles per second of all the tasks together, and the states
/// back in their order.
pub async fn cycles_per_second<S, C, F>(
    states: Vec<S>,
    run: std::time::Duration,
    cycle: C,
) -> (f64, Vec<S>)
where
    S: Send + 'static,
    C: Fn(S) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = S> + Send,
{
    let until = std::time::Instant::now() + run;
    let tasks: Vec<_> = states
        .into_iter()
        .map(|mut state| {
            let cycle = cycle.clone();
            tokio::spawn(async move {
                let mut cycles = 0_u64;
                while std::time::Instant::now() < until {
                    state = cycle(state).await;
                    cycles += 1;
                }
                (cycles, state)
            })
        })
        .collect();
    let (mut cycles, mut states) = (0, Vec::with_capacity(tasks.len()));
    for task in tasks {
        let (counted, state) = task.await.unwrap();
        cycles += counted;
        states.push(state);
    }
    (cycles as f64 / run.as_secs_f64(), states)
}

/// What the run observes, from the environment, printed so that the figures say it:
/// `BENCH_METRICS=prometheus` installs the Prometheus exporter's recorder (feature `metrics`;
/// no HTTP listener, the series just accumulate), `BENCH_TRACING=<filter>` installs a
/// `tracing-subscriber` formatter with that filter (say `k1s0_distributed_lock=debug`) writing
/// to a sink. Without them nothing listens: spans and metrics cost only their checks.
pub fn observe_from_env() -> String {
    let mut what = Vec::new();
    match std::env::var("BENCH_METRICS").as_deref() {
        Ok("prometheus") => {
            #[cfg(feature = "metrics")]
            {
                let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                    .install_recorder()
                    .expect("install the Prometheus recorder");
                // As the exporter's own listener does: drain the histograms' samples every
                // 5 s (without it they pile up for the whole run), and render every 15 s, as
                // a scrape would.
                std::thread::spawn(move || {
                    for tick in 1u64.. {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        handle.run_upkeep();
                        if tick % 3 == 0 {
                            drop(handle.render());
                        }
                    }
                });
                what.push(
                    "Prometheus recorder installed (upkeep every 5 s, rendered every 15 s)"
                        .to_owned(),
                );
            }
            #[cfg(not(feature = "metrics"))]
            panic!("BENCH_METRICS=prometheus needs the feature `metrics`");
        }
        Ok(other) => panic!("BENCH_METRICS: only `prometheus` is known, not {other:?}"),
        Err(_) if cfg!(feature = "metrics") => what.push("feature metrics, no recorder".to_owned()),
        Err(_) => what.push("without the feature metrics".to_owned()),
    }
    if let Ok(filter) = std::env::var("BENCH_TRACING") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&filter))
            .with_writer(std::io::sink)
            .init();
        what.push(format!(
            "tracing subscriber with filter {filter:?} (to a sink)"
        ));
    } else {
        what.push("no tracing subscriber".to_owned());
    }
    let what = what.join(", ");
    println!("OBSERVING: {what}");
    what
}

/// How many tasks [`run_eight_tasks`] runs.
pub const EIGHT_TASKS: usize = 8;

/// Runs 8 tasks that each take `lock`'s key "hot" `sections` times on one side, holding it
/// `hold` each time; returns how long all of them took.
pub async fn run_eight_tasks<L: DistributedRwLock + Clone>(
    lock: L,
    shared: bool,
    sections: u64,
    hold: Duration,
) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..EIGHT_TASKS)
        .map(|_| {
            let lock = lock.clone();
            tokio::spawn(async move {
                for _ in 0..sections {
                    let guard = if shared {
                        lock.acquire_shared("hot").await
                    } else {
                        lock.acquire("hot").await
                    };
                    if !hold.is_zero() {
                        tokio::time::sleep(hold).await;
                    }
                    guard.unwrap().release().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}
