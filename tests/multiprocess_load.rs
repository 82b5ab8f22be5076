//! Several OS processes, each running many tasks, contend for a few keys through each server
//! backend for 10 s (`K1S0_SOAK_SECS` to change). Under the lock every task bumps a counter kept
//! on the server by a separate read and write; the counters must end exact.
//!
//! No harness: run plainly, this binary is the parent and starts itself as the children
//! (selected by `K1S0_LOAD_CHILD=<backend>`).

mod common;

use std::collections::HashMap;
use std::process::Stdio;

use std::time::Duration;
use tokio::process::Command;

use common::backends::Backend;
use k1s0_distributed_lock::{DistributedLock, LockConfig};
use rand::Rng;
use tokio::time::Instant;

const CHILD_VARIABLE: &str = "K1S0_LOAD_CHILD";
const PREFIX_VARIABLE: &str = "K1S0_LOAD_PREFIX";
const PROCESSES: usize = 3;
const TASKS_PER_PROCESS: usize = 16;
const KEYS: usize = 3;

fn soak() -> Duration {
    let secs = std::env::var("K1S0_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

fn config() -> LockConfig {
    // A budget that waiting tasks can meet under this load, and a TTL no section comes near.
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(100))
        .max_retries(300)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(name) = std::env::var(CHILD_VARIABLE) {
        let backend = Backend::from_name(&name).expect("a compiled backend");
        let prefix = std::env::var(PREFIX_VARIABLE).unwrap();
        runtime.block_on(child(backend, prefix));
        return;
    }
    let backends = Backend::servers();
    let results = runtime.block_on(futures::future::join_all(
        backends.iter().map(|&b| parent(b)),
    ));
    for (backend, sections) in backends.iter().zip(&results) {
        println!(
            "test {}_processes_contend_through_{} ... ok ({sections} critical sections)",
            PROCESSES,
            backend.name()
        );
    }
    println!("{} passed, 0 failed", results.len());
}

/// Starts the children, waits for them, and checks the counters against the sections they did.
async fn parent(backend: Backend) -> u64 {
    let prefix = common::unique_prefix(&format!("multiprocess-{}", backend.name()));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .env(CHILD_VARIABLE, backend.name())
                .env(PREFIX_VARIABLE, &prefix)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // A parent that fails early must not leave its children running.
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs = futures::future::join_all(
        children
            .into_iter()
            .map(|child| async move { child.wait_with_output().await.unwrap() }),
    )
    .await;

    let mut per_key: HashMap<String, u64> = HashMap::new();
    for (index, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "{} child {index} failed",
            backend.name()
        );
        let mut done_by_child = 0;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let (key, count) = line.split_once(' ').expect("key count");
            let count: u64 = count.parse().unwrap();
            *per_key.entry(key.to_owned()).or_default() += count;
            done_by_child += count;
        }
        assert!(
            done_by_child > 0,
            "{} child {index} never got the lock",
            backend.name()
        );
    }
    let mut total = 0;
    for key in 0..KEYS {
        let name = format!("{prefix}counter{key}");
        let sections = per_key.get(&name).copied().unwrap_or(0);
        let counted = backend.counter(&name).await.read().await;
        assert_eq!(
            counted as u64,
            sections,
            "{}: {name} counted {counted} increments for {sections} critical sections",
            backend.name()
        );
        total += sections;
    }
    assert!(total > 0);
    total
}

/// Many tasks take one of a few keys at random, bump its counter under the lock, and release.
async fn child(backend: Backend, prefix: String) {
    let lock = backend.lock(config()).await;
    let deadline = Instant::now() + soak();
    let mut counters = Vec::new();
    for key in 0..KEYS {
        counters.push(backend.counter(&format!("{prefix}counter{key}")).await);
    }
    let tasks: Vec<_> = (0..TASKS_PER_PROCESS)
        .map(|_| {
            let (lock, counters, prefix) = (lock.clone(), counters.clone(), prefix.clone());
            tokio::spawn(async move {
                let mut done = vec![0u64; KEYS];
                while Instant::now() < deadline {
                    let key = rand::rng().random_range(0..KEYS);
                    let guard = lock
                        .acquire(&format!("{prefix}key{key}"))
                        .await
                        .expect("acquire within the budget");
                    counters[key].increment().await;
                    done[key] += 1;
                    lock.release(guard).await.expect("release of a held lock");
                }
                done
            })
        })
        .collect();
    let mut done = vec![0u64; KEYS];
    for task in tasks {
        for (key, count) in task.await.unwrap().into_iter().enumerate() {
            done[key] += count;
        }
    }
    for (key, count) in done.into_iter().enumerate() {
        println!("{prefix}counter{key} {count}");
    }
}
