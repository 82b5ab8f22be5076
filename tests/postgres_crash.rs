//! PostgreSQL backend: fencing tokens keep increasing across a real server crash.
//!
//! The lock sessions draw tokens without waiting for the disk, so a crash can take the
//! sequence back below tokens already handed out; the first session after crash recovery must
//! jump it ahead. This test starts its own PostgreSQL cluster (initdb on a free loopback port,
//! as the `postgres` user when run as root), draws tokens, crashes the server with
//! `pg_ctl stop -m immediate` (no shutdown checkpoint: the next start runs crash recovery), and
//! checks the next token. It needs the server binaries (`initdb`, `pg_ctl`): found under
//! `/usr/lib/postgresql/<version>/bin`, or in `PG_BIN`.
#![cfg(feature = "postgres")]

mod common;
mod pg_cluster;

use pg_cluster::Cluster;

use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};
use sqlx::Connection;

async fn lock_on(url: &str) -> PostgresDistributedLock {
    let pool = common::backends::postgres_pool_of(Some(url.to_owned()), 3).await;
    PostgresDistributedLock::new(pool, LockConfig::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_keep_increasing_across_a_server_crash() {
    let cluster = Cluster::create();
    cluster.start();
    let key = format!("{}k", common::unique_prefix("pg_crash"));

    // Tokens drawn right before the crash: over several of the sequence's 32-value write-ahead
    // steps, none of which waited for the disk.
    let lock = lock_on(&cluster.url()).await;
    let mut last = 0;
    for _ in 0..100 {
        let guard = lock.acquire(&key).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    let held = lock.acquire(&key).await.unwrap();
    last = last.max(held.fencing_token());
    cluster.crash();
    cluster.start();

    // Crash recovery emptied the unlogged epoch table: the premise of the jump.
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let markers: i64 = sqlx::query_scalar("SELECT count(*) FROM k1s0_lock_fencing_epochs")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(markers, 0, "crash recovery keeps unlogged tables empty");

    let after = lock_on(&cluster.url()).await;
    let guard = after.acquire(&key).await.unwrap();
    assert!(
        guard.fencing_token() > last,
        "token {} after the crash, {last} before it",
        guard.fencing_token()
    );
    assert!(held.is_lost() || held.release().await.is_err());
    guard.release().await.unwrap();
    drop((lock, after, admin));
}
