//! PostgreSQL backend: the server's lock table bounds how many locks fit on a session.
//!
//! Advisory locks live in the server's shared lock table, of about
//! `max_locks_per_transaction × (max_connections + background processes)` entries. When it is
//! full the lock statement fails with SQLSTATE 53200 (out of shared memory): that one acquire
//! fails, and every lock already held on the session stays held. This test starts its own
//! cluster with a small lock table (see `pg_support::cluster`).
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use sqlx::Connection;

use pg_support::cluster::Cluster;

/// Granted advisory locks (bigint form) of every session on the cluster.
async fn granted_locks(admin: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lock_table_fails_one_acquire_and_keeps_every_held_lock() {
    let cluster = Cluster::create();
    cluster.start_with(&["max_locks_per_transaction=10", "max_connections=8"]);
    let pool = common::backends::postgres_pool_of(Some(cluster.url()), 3).await;
    let lock = PostgresDistributedLock::builder(pool, LockConfig::new())
        .sessions(1)
        .build()
        .unwrap();
    // Connected first: starting a connection needs a lock table entry too.
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let prefix = common::unique_prefix("pg_lock_table");
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() < 20_000, "the lock table never filled up");
        match lock.try_acquire(&format!("{prefix}{}", held.len())).await {
            Ok(guard) => held.push(guard),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(&refused, LockError::BackendError(_)),
        "{refused:?}"
    );
    assert!(
        !held.is_empty(),
        "not one lock fitted before the table was full"
    );
    assert!(
        held.iter().all(|guard| !guard.is_lost()),
        "a guard was lost when the lock table filled up"
    );
    assert_eq!(granted_locks(&mut admin).await, held.len() as i64);
    // The session goes on: a freed entry takes the next lock.
    let last = held.pop().unwrap();
    last.release().await.unwrap();
    held.push(
        lock.try_acquire(&format!("{prefix}again"))
            .await
            .expect("a lock after one was released"),
    );
    assert_eq!(granted_locks(&mut admin).await, held.len() as i64);
    for guard in held {
        guard.release().await.unwrap();
    }
    assert_eq!(granted_locks(&mut admin).await, 0);
}
