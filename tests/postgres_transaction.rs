//! PostgreSQL transaction-scoped locks (`try_acquire_in`, `acquire_in`) on the caller's own
//! transaction, against the real server: exclusion with other transactions and with session
//! locks on the same key, release by commit and rollback, fencing tokens from the one
//! sequence, waiting, invalid keys, and a non-atomic counter kept exact.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use common::cancel::drop_at_suspension;
use common::counter::postgres::PostgresCounter;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(20))
        .wait_timeout(Duration::from_secs(30))
}

/// A lock service and a pool for the caller's transactions.
async fn setup(config: LockConfig) -> (PostgresDistributedLock, PgPool) {
    (pg_support::lock(config).await, pg_support::pool(8).await)
}

async fn backend_pid(tx: &mut Transaction<'_, Postgres>) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **tx)
        .await
        .expect("pg_backend_pid")
}

/// Advisory locks (bigint form) held by the backend `pid`, on any key.
async fn advisory_locks_of(admin: &mut PgConnection, pid: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted",
    )
    .bind(pid)
    .fetch_one(admin)
    .await
    .expect("query pg_locks")
}

#[tokio::test]
async fn a_transaction_lock_excludes_another_transaction_until_commit_or_rollback() {
    let key = format!("{}order", common::unique_prefix("pg_tx_excl"));
    let (lock, pool) = setup(config()).await;
    let mut admin = pg_support::admin().await;

    let mut first = pool.begin().await.unwrap();
    let first_pid = backend_pid(&mut first).await;
    let held = lock.try_acquire_in(&mut first, &key).await.unwrap();
    assert_eq!(held.key(), key);
    assert_eq!(pg_support::holders(&mut admin, &key).await, vec![first_pid]);

    let mut second = pool.begin().await.unwrap();
    assert!(matches!(
        lock.try_acquire_in(&mut second, &key).await,
        Err(LockError::AlreadyLocked)
    ));
    // A refused try leaves the transaction usable.
    sqlx::query("SELECT 1").execute(&mut *second).await.unwrap();

    first.commit().await.unwrap();
    assert!(pg_support::holders(&mut admin, &key).await.is_empty());
    let after_commit = lock.try_acquire_in(&mut second, &key).await.unwrap();
    assert!(after_commit.fencing_token() > held.fencing_token());

    second.rollback().await.unwrap();
    assert!(pg_support::holders(&mut admin, &key).await.is_empty());
    let mut third = pool.begin().await.unwrap();
    let after_rollback = lock.try_acquire_in(&mut third, &key).await.unwrap();
    assert!(after_rollback.fencing_token() > after_commit.fencing_token());
    // Dropping a transaction rolls it back, which frees the key too. sqlx sends that rollback
    // in the background, when the connection goes back to the pool: wait for it within the
    // lock's budget.
    drop(third);
    let mut fourth = pool.begin().await.unwrap();
    lock.acquire_in(&mut fourth, &key).await.unwrap();
}

#[tokio::test]
async fn session_and_transaction_locks_on_one_key_exclude_each_other_both_ways() {
    let key = format!("{}order", common::unique_prefix("pg_tx_session"));
    let (lock, pool) = setup(config()).await;
    // Another lock service, as another process would have.
    let other = pg_support::lock(config()).await;

    // A session lock first: the transaction cannot take the key.
    let session_guard = other.try_acquire(&key).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        lock.try_acquire_in(&mut tx, &key).await,
        Err(LockError::AlreadyLocked)
    ));
    // The same lock service's sessions are excluded as well.
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    let session_token = session_guard.fencing_token();
    session_guard.release().await.unwrap();

    // Then the transaction: no session can take the key until it ends.
    let held = lock.try_acquire_in(&mut tx, &key).await.unwrap();
    assert!(held.fencing_token() > session_token);
    assert!(matches!(
        other.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(other.is_locked(&key).await.unwrap());
    tx.rollback().await.unwrap();

    let after = other.try_acquire(&key).await.unwrap();
    assert!(after.fencing_token() > held.fencing_token());
    after.release().await.unwrap();
}

#[tokio::test]
async fn fencing_tokens_increase_across_session_and_transaction_holders() {
    let key = format!("{}order", common::unique_prefix("pg_tx_tokens"));
    let (lock, pool) = setup(config()).await;
    let mut last = 0;
    for round in 0..6 {
        let token = if round % 2 == 0 {
            let mut tx = pool.begin().await.unwrap();
            let token = lock
                .acquire_in(&mut tx, &key)
                .await
                .unwrap()
                .fencing_token();
            tx.commit().await.unwrap();
            token
        } else {
            let guard = lock.acquire(&key).await.unwrap();
            let token = guard.fencing_token();
            guard.release().await.unwrap();
            token
        };
        assert!(token > last, "round {round}: token {token} after {last}");
        last = token;
    }
}

#[tokio::test]
async fn acquire_in_waits_for_a_release() {
    let key = format!("{}order", common::unique_prefix("pg_tx_wait"));
    let (lock, pool) = setup(config()).await;
    let mut admin = pg_support::admin().await;

    let mut holder = pool.begin().await.unwrap();
    let held = lock.try_acquire_in(&mut holder, &key).await.unwrap();

    let mut waiter_tx = pool.begin().await.unwrap();
    let waiter_pid = backend_pid(&mut waiter_tx).await;
    let waiter = {
        let (lock, key) = (lock.clone(), key.clone());
        tokio::spawn(async move {
            let result = lock.acquire_in(&mut waiter_tx, &key).await;
            (result, waiter_tx)
        })
    };
    // The waiter has tried and been refused: its transaction ran the lock statement, holds
    // nothing, and the task is still waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last_statement: String =
            sqlx::query_scalar("SELECT query FROM pg_stat_activity WHERE pid = $1")
                .bind(waiter_pid)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if last_statement.contains("pg_try_advisory_xact_lock") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiter never tried"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!waiter.is_finished());
    assert_eq!(advisory_locks_of(&mut admin, waiter_pid).await, 0);

    holder.commit().await.unwrap();
    let (result, waiter_tx) = waiter.await.unwrap();
    let taken = result.expect("the waiter takes the key once the holder commits");
    assert!(taken.fencing_token() > held.fencing_token());
    assert_eq!(
        pg_support::holders(&mut admin, &key).await,
        vec![waiter_pid]
    );
    waiter_tx.commit().await.unwrap();
}

#[tokio::test]
async fn acquire_in_times_out_against_a_holder_that_stays() {
    let key = format!("{}order", common::unique_prefix("pg_tx_timeout"));
    let short = config().wait_timeout(Duration::from_millis(300));
    let (lock, pool) = setup(short).await;
    let mut admin = pg_support::admin().await;

    // One holder of each kind in turn.
    let session_guard = lock.try_acquire(&key).await.unwrap();
    let mut waiter_tx = pool.begin().await.unwrap();
    let waiter_pid = backend_pid(&mut waiter_tx).await;
    assert!(matches!(
        lock.acquire_in(&mut waiter_tx, &key).await,
        Err(LockError::Timeout)
    ));
    assert_eq!(advisory_locks_of(&mut admin, waiter_pid).await, 0);
    session_guard.release().await.unwrap();

    let mut holder = pool.begin().await.unwrap();
    let holder_pid = backend_pid(&mut holder).await;
    lock.try_acquire_in(&mut holder, &key).await.unwrap();
    assert!(matches!(
        lock.acquire_in(&mut waiter_tx, &key).await,
        Err(LockError::Timeout)
    ));
    assert_eq!(
        pg_support::holders(&mut admin, &key).await,
        vec![holder_pid]
    );
    // The waiter's transaction is still usable after its timeouts.
    sqlx::query("SELECT 1")
        .execute(&mut *waiter_tx)
        .await
        .unwrap();
    holder.commit().await.unwrap();
}

#[tokio::test]
async fn invalid_keys_are_refused_and_change_nothing() {
    let (lock, pool) = setup(config()).await;
    let mut admin = pg_support::admin().await;
    let mut tx = pool.begin().await.unwrap();
    let pid = backend_pid(&mut tx).await;
    let too_long = "k".repeat(k1s0_distributed_lock::MAX_KEY_LEN + 1);
    for key in ["", too_long.as_str()] {
        assert!(matches!(
            lock.try_acquire_in(&mut tx, key).await,
            Err(LockError::InvalidKey { .. })
        ));
        assert!(matches!(
            lock.acquire_in(&mut tx, key).await,
            Err(LockError::InvalidKey { .. })
        ));
    }
    assert_eq!(advisory_locks_of(&mut admin, pid).await, 0);
    // Nothing reached the transaction: it is still usable.
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

/// 16 tasks, each round in a transaction of its own: lock, read the counter row, yield,
/// write it back plus one, commit. Without exclusion, updates are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_keep_a_non_atomic_counter_exact() {
    const TASKS: usize = 16;
    const ROUNDS: usize = 10;
    let prefix = common::unique_prefix("pg_tx_counter");
    let key = format!("{prefix}counter");
    let (lock, pool) = setup(config()).await;
    let counter = PostgresCounter::new(pool.clone(), &prefix).await;
    count_in_transactions(&lock, &pool, &key, &prefix, TASKS, ROUNDS, true).await;
    assert_eq!(counter.read().await, (TASKS * ROUNDS) as i64);
}

/// Crash recovery empties the epoch table; a transaction lock that finds its sequence's row
/// missing must move the sequence past the previous epoch's tokens before it draws one.
/// (Emptied here by hand, on a sequence of this test's own.)
#[tokio::test]
async fn a_missing_epoch_row_moves_the_sequence_on_before_a_token_is_drawn() {
    let prefix = common::unique_prefix("pg_tx_epoch");
    let key = format!("{prefix}order");
    let sequence = format!("k1s0_tx_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = pg_support::DropOnExit::new(vec![
        format!("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = '\"{sequence}\"'"),
        format!("DROP SEQUENCE IF EXISTS \"{sequence}\""),
    ]);
    let lock = PostgresDistributedLock::builder(pg_support::pool(3).await, config())
        .fencing_sequence(&sequence)
        .build()
        .unwrap();
    let pool = pg_support::pool(2).await;
    let mut admin = pg_support::admin().await;

    let mut tx = pool.begin().await.unwrap();
    let before = lock.try_acquire_in(&mut tx, &key).await.unwrap();
    tx.commit().await.unwrap();

    sqlx::query("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = $1")
        .bind(format!("\"{sequence}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let after = lock.try_acquire_in(&mut tx, &key).await.unwrap();
    tx.commit().await.unwrap();
    assert!(
        after.fencing_token() > before.fencing_token() + (1 << 40) - 1,
        "token {} after {}: the sequence was not moved on",
        after.fencing_token(),
        before.fencing_token()
    );
}

/// `acquire_in` dropped at each of its await points in turn: the transaction stays usable,
/// the key is held by nobody but that transaction, and ending the transaction frees it.
#[tokio::test]
async fn a_dropped_acquire_in_leaves_at_most_its_own_transaction_holding_the_key() {
    let key = format!("{}order", common::unique_prefix("pg_tx_cancel"));
    let (lock, pool) = setup(config()).await;
    let mut admin = pg_support::admin().await;

    // On a free key, until the future completes.
    for n in 1.. {
        let mut tx = pool.begin().await.unwrap();
        let pid = backend_pid(&mut tx).await;
        let outcome = drop_at_suspension(lock.acquire_in(&mut tx, &key), n).await;
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        let holders = pg_support::holders(&mut admin, &key).await;
        assert!(
            holders.is_empty() || holders == vec![pid],
            "n = {n}: {holders:?}"
        );
        tx.rollback().await.unwrap();
        assert!(pg_support::holders(&mut admin, &key).await.is_empty());
        pg_support::take_and_release(&lock, &key).await;
        if let Some(result) = outcome {
            result.unwrap();
            break;
        }
    }

    // On a key another holder keeps: dropped while trying or while pausing between tries.
    let holder = lock.try_acquire(&key).await.unwrap();
    for n in 1..=8 {
        let mut tx = pool.begin().await.unwrap();
        let pid = backend_pid(&mut tx).await;
        assert!(drop_at_suspension(lock.acquire_in(&mut tx, &key), n)
            .await
            .is_none());
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        assert_eq!(advisory_locks_of(&mut admin, pid).await, 0, "n = {n}");
        tx.rollback().await.unwrap();
    }
    holder.release().await.unwrap();
}

/// Behind PgBouncer in transaction mode (where session locks cannot work), transaction locks
/// exclude each other and a direct session lock, are freed by commit, and keep a counter
/// exact over transactions that PgBouncer puts on whichever server connection is free. The
/// lock service's own pool goes through PgBouncer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_locks_work_behind_pgbouncer_in_transaction_mode() {
    const TASKS: usize = 4;
    const ROUNDS: usize = 10;
    let bouncer = pg_support::pgbouncer::PgBouncer::start("transaction", 3).await;
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 6).await;
    let lock = PostgresDistributedLock::new(pool.clone(), config());
    let direct = pg_support::lock(config()).await;
    let mut admin = pg_support::admin().await;
    let prefix = common::unique_prefix("pg_tx_bouncer");
    let key = format!("{prefix}order");

    let mut first = pool.begin().await.unwrap();
    let first_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .persistent(false)
        .fetch_one(&mut *first)
        .await
        .unwrap();
    let held = lock.try_acquire_in(&mut first, &key).await.unwrap();
    assert_eq!(pg_support::holders(&mut admin, &key).await, vec![first_pid]);
    let mut second = pool.begin().await.unwrap();
    assert!(matches!(
        lock.try_acquire_in(&mut second, &key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(
        direct.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    first.commit().await.unwrap();
    let next = lock.try_acquire_in(&mut second, &key).await.unwrap();
    assert!(next.fencing_token() > held.fencing_token());
    second.commit().await.unwrap();
    // No server connection that PgBouncer hands out holds the key any more.
    assert!(pg_support::holders(&mut admin, &key).await.is_empty());
    pg_support::take_and_release(&direct, &key).await;

    let counter = PostgresCounter::new(pg_support::pool(2).await, &prefix).await;
    // Unnamed statements only: PgBouncer in transaction mode moves the client between server
    // connections, where sqlx's named statements would not exist.
    count_in_transactions(&lock, &pool, &key, &prefix, TASKS, ROUNDS, false).await;
    assert_eq!(counter.read().await, (TASKS * ROUNDS) as i64);
    drop((lock, pool));
    drop(bouncer);
}

/// `tasks` tasks, `rounds` rounds each, every round in a transaction of its own: lock `key`
/// with `acquire_in`, read the counter row `name`, yield, write it back plus one, commit.
/// Without exclusion, updates are lost. `persistent`: whether sqlx may name its statements.
async fn count_in_transactions(
    lock: &PostgresDistributedLock,
    pool: &PgPool,
    key: &str,
    name: &str,
    tasks: usize,
    rounds: usize,
    persistent: bool,
) {
    let tasks: Vec<_> = (0..tasks)
        .map(|_| {
            let (lock, pool) = (lock.clone(), pool.clone());
            let (key, name) = (key.to_owned(), name.to_owned());
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let mut tx = pool.begin().await.unwrap();
                    lock.acquire_in(&mut tx, &key)
                        .await
                        .expect("acquire within the budget");
                    let value: i64 =
                        sqlx::query_scalar("SELECT value FROM k1s0_test_counters WHERE name = $1")
                            .bind(&name)
                            .persistent(persistent)
                            .fetch_one(&mut *tx)
                            .await
                            .unwrap();
                    tokio::task::yield_now().await;
                    sqlx::query("UPDATE k1s0_test_counters SET value = $2 WHERE name = $1")
                        .bind(&name)
                        .bind(value + 1)
                        .persistent(persistent)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}
