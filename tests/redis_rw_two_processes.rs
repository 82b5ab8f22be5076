//! Two OS processes share one Redis reader-writer lock: readers of both overlap, a writer of
//! either excludes every reader of both.
//!
//! This test binary has no harness: run plainly, it starts itself twice as child processes
//! (selected by `K1S0_REDIS_RW_CHILD`). Each child runs readers and writers on one key. The
//! state they guard lives in Redis as two plain keys: a writer bumps both halves of a pair by
//! GET then SET, one after the other; a reader reads both halves and counts itself in and out
//! of an in-flight counter. The parent checks that no reader saw the halves differ, that no
//! writer saw a reader in flight, that no update was lost, and that readers of the two
//! processes did overlap.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::redis::{self, AsyncCommands};
use k1s0_distributed_lock::{DistributedLock, DistributedRwLock, LockConfig};

const CHILD_VARIABLE: &str = "K1S0_REDIS_RW_CHILD";
const READERS: usize = 3;
const ROUNDS: u64 = 40;

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
            println!("test readers_and_writers_of_two_processes ... ok");
        }
    }
}

async fn parent() {
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("redis_rw_two_processes");
    let children = common::redis_children::spawn(CHILD_VARIABLE, &prefix, &url, 2);

    let mut conn = common::redis_conn::connection(&url).await;
    common::redis_children::start_together(&mut conn, &prefix, 2).await;

    let mut reports = Vec::new();
    for (index, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().await.unwrap();
        assert!(output.status.success(), "child {index} failed");
        reports.push(String::from_utf8(output.stdout).unwrap());
    }
    let field = |name: &str| -> Vec<u64> {
        reports
            .iter()
            .map(|report| {
                report
                    .split_whitespace()
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("{name} missing in {report:?}"))
                    .parse()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(field("torn"), [0, 0], "a reader saw a half-written pair");
    assert_eq!(
        field("crowded"),
        [0, 0],
        "a writer held the key with a reader in flight"
    );
    let (first, second): (Option<u64>, Option<u64>) = redis::pipe()
        .get(format!("{prefix}first"))
        .get(format!("{prefix}second"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(first, Some(2 * ROUNDS), "writers lost updates");
    assert_eq!(second, Some(2 * ROUNDS));
    let most_readers: Option<u64> = conn.get(format!("{prefix}most")).await.unwrap();
    eprintln!("two processes: at most {most_readers:?} readers at once");
    assert!(
        most_readers.unwrap_or(0) >= 2,
        "readers never overlapped: {most_readers:?}"
    );
}

async fn child(prefix: String) {
    let url = common::redis_url().await;
    let lock = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(
            LockConfig::new()
                .ttl(Duration::from_secs(10))
                .retry_interval(Duration::from_millis(20))
                .wait_timeout(Duration::from_secs(60)),
        )
        .key_prefix(prefix.clone())
        .build()
        .unwrap();
    let mut conn = common::redis_conn::connection(&url).await;
    common::redis_children::ready_then_go(&mut conn, &prefix).await;

    let names = Names::new(&prefix);
    let writer = tokio::spawn({
        let (lock, names, url) = (lock.clone(), names.clone(), url.clone());
        async move {
            let mut conn = common::redis_conn::connection(&url).await;
            let mut crowded = 0;
            for _ in 0..ROUNDS {
                let guard = lock.acquire("pair").await.unwrap();
                let in_flight: Option<u64> = conn.get(&names.in_flight).await.unwrap();
                crowded += u64::from(in_flight.unwrap_or(0) > 0);
                for half in [&names.first, &names.second] {
                    let value: Option<u64> = conn.get(half).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let _: () = conn.set(half, value.unwrap_or(0) + 1).await.unwrap();
                }
                guard.release().await.unwrap();
            }
            crowded
        }
    });
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (lock, names, url) = (lock.clone(), names.clone(), url.clone());
            tokio::spawn(async move {
                let mut conn = common::redis_conn::connection(&url).await;
                let mut torn = 0;
                for _ in 0..ROUNDS {
                    let guard = lock.acquire_shared("pair").await.unwrap();
                    let now: u64 = conn.incr(&names.in_flight, 1).await.unwrap();
                    let _: () = redis::Script::new(
                        "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) \
                         then redis.call('SET', KEYS[1], ARGV[1]) end",
                    )
                    .key(&names.most)
                    .arg(now)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                    let first: Option<u64> = conn.get(&names.first).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let second: Option<u64> = conn.get(&names.second).await.unwrap();
                    torn += u64::from(first != second);
                    let _: u64 = conn.decr(&names.in_flight, 1).await.unwrap();
                    guard.release().await.unwrap();
                }
                torn
            })
        })
        .collect();
    let crowded = writer.await.unwrap();
    let mut torn = 0;
    for reader in readers {
        torn += reader.await.unwrap();
    }
    println!("torn={torn} crowded={crowded}");
}

/// The plain Redis keys the children share.
#[derive(Clone)]
struct Names {
    first: String,
    second: String,
    in_flight: String,
    most: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Names {
            first: format!("{prefix}first"),
            second: format!("{prefix}second"),
            in_flight: format!("{prefix}in-flight"),
            most: format!("{prefix}most"),
        }
    }
}
