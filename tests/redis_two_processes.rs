//! Two OS processes contend for one Redis lock.
//!
//! This test binary has no harness: run plainly, it starts itself twice as child processes
//! (selected by `K1S0_REDIS_CHILD`). Each child takes the lock many times and, under it, bumps
//! a counter kept in Redis by GET then SET, printing the value it wrote and its fencing token.
//! The parent checks that the counter is exact, that fencing tokens grow in the order of the
//! counter, and that the lock really went back and forth between the processes.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::counter::redis::RedisCounter;
use k1s0_distributed_lock::{DistributedLock, LockConfig};

const CHILD_VARIABLE: &str = "K1S0_REDIS_CHILD";
const ROUNDS: u64 = 150;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match std::env::var(CHILD_VARIABLE) {
        Ok(prefix) => runtime.block_on(child(prefix)),
        Err(_) => {
            runtime.block_on(parent());
            println!("test two_processes_contend_for_one_key ... ok");
        }
    }
}

async fn parent() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_two_processes");
    let children = common::redis_children::spawn(CHILD_VARIABLE, &prefix, &url, 2);
    let pids: Vec<u32> = children.iter().map(|c| c.id().unwrap()).collect();
    assert_ne!(pids[0], pids[1]);

    // Start both children together, once both are connected.
    let mut conn = common::redis_conn::connection(&url).await;
    common::redis_children::start_together(&mut conn, &prefix, 2).await;

    let mut sections = Vec::new(); // (counter value written, fencing token, child)
    for (index, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().await.unwrap();
        assert!(output.status.success(), "child {index} failed");
        for line in String::from_utf8(output.stdout).unwrap().lines() {
            let mut fields = line.split_whitespace();
            let value: i64 = fields.next().unwrap().parse().unwrap();
            let fence: u64 = fields.next().unwrap().parse().unwrap();
            sections.push((value, fence, index));
        }
    }
    let counter = RedisCounter::new(&url, &format!("{prefix}counter")).await;
    assert_eq!(
        counter.read().await,
        2 * ROUNDS as i64,
        "the counter lost increments"
    );
    assert_eq!(sections.len() as u64, 2 * ROUNDS);
    sections.sort();
    for (expected, (value, _, _)) in (1..).zip(&sections) {
        assert_eq!(*value, expected, "two sections wrote the same value");
    }
    for pair in sections.windows(2) {
        assert!(
            pair[1].1 > pair[0].1,
            "fencing tokens out of order: {pair:?}"
        );
    }
    let switches = sections.windows(2).filter(|p| p[0].2 != p[1].2).count();
    eprintln!(
        "two processes: {} sections, the lock switched process {switches} times",
        sections.len()
    );
    assert!(
        switches >= 20,
        "the processes barely contended: {switches} switches"
    );
}

async fn child(prefix: String) {
    let url = common::redis_url().await;
    let lock = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(
            LockConfig::new()
                .ttl(Duration::from_secs(10))
                .retry_interval(Duration::from_millis(50))
                .max_retries(400),
        )
        .key_prefix(prefix.clone())
        .build()
        .unwrap();
    let mut conn = common::redis_conn::connection(&url).await;
    common::redis_children::ready_then_go(&mut conn, &prefix).await;

    let counter = RedisCounter::new(&url, &format!("{prefix}counter")).await;
    let mut lines = String::new();
    for _ in 0..ROUNDS {
        let guard = lock.acquire("shared-resource").await.unwrap();
        let next = counter.read().await + 1;
        tokio::task::yield_now().await;
        counter.write(next).await;
        lines.push_str(&format!("{next} {}\n", guard.fencing_token()));
        guard.release().await.unwrap();
    }
    print!("{lines}");
}
