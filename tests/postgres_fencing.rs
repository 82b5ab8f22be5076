//! PostgreSQL backend: fencing setups that cannot keep tokens increasing are refused with a
//! clear error, and the crash-epoch jump neither waits for a synchronous standby nor is skipped
//! by a session that cannot make it.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use pg_support::cluster::Cluster;
use sqlx::Connection;

async fn lock_with_sequence(pool: sqlx::PgPool, sequence: &str) -> PostgresDistributedLock {
    PostgresDistributedLock::builder(pool, LockConfig::new())
        .fencing_sequence(sequence)
        .command_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// Asserts that locking `key` fails with a `BackendError` whose message contains every one of
/// `expected`, and leaves nothing locked.
async fn assert_refused(lock: &PostgresDistributedLock, key: &str, expected: &[&str]) {
    let error = match lock.try_acquire(key).await {
        Ok(guard) => panic!("locked, token {}", guard.fencing_token()),
        Err(error) => error,
    };
    let message = pg_support::error_chain(&error);
    assert!(
        matches!(error, LockError::BackendError(_))
            && expected.iter().all(|part| message.contains(part)),
        "expected {expected:?} in: {message}"
    );
}

/// A sequence created beforehand with `CACHE > 1`, a non-positive increment or `CYCLE` (or a
/// relation of that name that is not a sequence) would give tokens that do not increase: every
/// lock attempt fails with an error naming the fault, and nothing is locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfit_pre_created_sequences_are_refused() {
    let prefix = common::unique_prefix("pg_unfit_seq");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let cases = [
        ("CACHE 5", "CACHE 5"),
        ("INCREMENT BY -1", "INCREMENT -1"),
        ("CYCLE", "CYCLE"),
    ];
    let mut cleanup = Vec::new();
    let mut admin = pg_support::admin().await;
    for (index, (options, _)) in cases.iter().enumerate() {
        let name = format!("k1s0_test_unfit_{index}_{suffix}");
        cleanup.push(format!("DROP SEQUENCE IF EXISTS \"{name}\""));
        sqlx::query(&format!("CREATE SEQUENCE \"{name}\" {options}"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let table = format!("k1s0_test_not_a_seq_{suffix}");
    cleanup.push(format!("DROP TABLE IF EXISTS \"{table}\""));
    let _cleanup = pg_support::DropOnExit::new(cleanup);
    sqlx::query(&format!("CREATE TABLE \"{table}\" (x int)"))
        .execute(&mut admin)
        .await
        .unwrap();

    for (index, (_, fault)) in cases.iter().enumerate() {
        let name = format!("k1s0_test_unfit_{index}_{suffix}");
        let lock = lock_with_sequence(pg_support::pool(2).await, &name).await;
        let key = format!("{prefix}k{index}");
        assert_refused(&lock, &key, &[&name, fault, "cannot give increasing"]).await;
        // Transaction locks check the same sequence the same way.
        let pool = pg_support::pool(1).await;
        let mut tx = pool.begin().await.unwrap();
        let error = lock
            .try_acquire_in(&mut tx, &key)
            .await
            .expect_err("a transaction lock on an unfit sequence");
        let message = pg_support::error_chain(&error);
        assert!(
            matches!(error, LockError::BackendError(_)) && message.contains(fault),
            "expected {fault:?} in: {message}"
        );
        drop(tx);
        assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    }
    let lock = lock_with_sequence(pg_support::pool(2).await, &table).await;
    assert_refused(&lock, &format!("{prefix}t"), &["is not a sequence"]).await;
}

/// The default sequence is `public.k1s0_lock_fencing_seq` whatever the role's `search_path`.
/// A deployment of an earlier version whose `search_path` put the sequence in another schema
/// is refused with the name to configure, instead of restarting the tokens from a new
/// sequence in `public`; naming it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sequence_is_in_public_and_an_earlier_one_elsewhere_is_not_replaced() {
    let cluster = Cluster::create();
    cluster.start();
    let key = format!("{}k", common::unique_prefix("pg_default_seq"));
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    for ddl in [
        "CREATE SCHEMA app",
        "CREATE SEQUENCE app.k1s0_lock_fencing_seq AS bigint MINVALUE 1 NO CYCLE CACHE 1",
        "SELECT setval('app.k1s0_lock_fencing_seq', 1000)",
        "ALTER ROLE postgres SET search_path = app, public",
    ] {
        sqlx::query(ddl).execute(&mut admin).await.unwrap();
    }
    let pool = common::backends::postgres_pool_of(Some(cluster.url()), 3).await;
    let default = PostgresDistributedLock::new(pool.clone(), LockConfig::new());
    assert_refused(
        &default,
        &key,
        &[
            "\"public\".\"k1s0_lock_fencing_seq\"",
            "\"app\"",
            "fencing_sequence",
        ],
    )
    .await;
    let public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public.k1s0_lock_fencing_seq')::text")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(public, None, "no new sequence was created");

    // A sequence in public as well does not make the earlier one go away.
    sqlx::query("CREATE SEQUENCE public.k1s0_lock_fencing_seq")
        .execute(&mut admin)
        .await
        .unwrap();
    let both = PostgresDistributedLock::new(pool.clone(), LockConfig::new());
    assert_refused(&both, &key, &["\"app\"", "fencing_sequence"]).await;
    sqlx::query("DROP SEQUENCE public.k1s0_lock_fencing_seq")
        .execute(&mut admin)
        .await
        .unwrap();

    let named = lock_with_sequence(pool.clone(), "app.k1s0_lock_fencing_seq").await;
    let guard = named.try_acquire(&key).await.unwrap();
    assert!(guard.fencing_token() > 1000);
    guard.release().await.unwrap();

    // Without an earlier sequence elsewhere, the default lands in public.
    sqlx::query("DROP SEQUENCE app.k1s0_lock_fencing_seq")
        .execute(&mut admin)
        .await
        .unwrap();
    let fresh = PostgresDistributedLock::new(pool, LockConfig::new());
    pg_support::take_and_release(&fresh, &key).await;
    let public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public.k1s0_lock_fencing_seq')::text")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(public.is_some(), "the default sequence is in public");
    drop((default, both, named, fresh, admin));
}

/// A role that may draw tokens but cannot make the crash-epoch jump (no `INSERT` on the epoch
/// table) must not be the first to draw after a crash: it would draw from a sequence the crash
/// took back. It is refused until a session that can jump has connected, then locks with
/// tokens above every token handed out before the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_jump_waits_for_the_jump_after_a_crash() {
    let cluster = Cluster::create();
    cluster.start();
    let key = format!("{}k", common::unique_prefix("pg_fallback_crash"));
    let owner_pool = common::backends::postgres_pool_of(Some(cluster.url()), 3).await;
    let owner = PostgresDistributedLock::new(owner_pool, LockConfig::new());
    let mut last = 0;
    for _ in 0..100 {
        let guard = owner.acquire(&key).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    for ddl in [
        "CREATE ROLE locker LOGIN",
        "GRANT USAGE ON SEQUENCE public.k1s0_lock_fencing_seq TO locker",
        "GRANT SELECT ON public.k1s0_lock_fencing_epochs TO locker",
        "CHECKPOINT",
    ] {
        sqlx::query(ddl).execute(&mut admin).await.unwrap();
    }
    drop(admin);
    // More tokens after the checkpoint, none of which waited for the disk.
    for _ in 0..100 {
        let guard = owner.acquire(&key).await.unwrap();
        last = last.max(guard.fencing_token());
        guard.release().await.unwrap();
    }
    drop(owner);
    cluster.crash();
    cluster.start();

    let locker_pool = common::backends::postgres_pool_of(Some(cluster.url_as("locker")), 3).await;
    let locker = PostgresDistributedLock::new(locker_pool.clone(), LockConfig::new());
    assert_refused(&locker, &key, &["first lock session", "INSERT"]).await;

    let owner_pool = common::backends::postgres_pool_of(Some(cluster.url()), 3).await;
    let owner = PostgresDistributedLock::new(owner_pool, LockConfig::new());
    let jumped = owner.acquire(&key).await.unwrap();
    assert!(jumped.fencing_token() > last);
    jumped.release().await.unwrap();
    let locker = PostgresDistributedLock::new(locker_pool, LockConfig::new());
    let guard = locker.acquire(&key).await.unwrap();
    assert!(
        guard.fencing_token() > last,
        "token {} after the jump, {last} before the crash",
        guard.fencing_token()
    );
    guard.release().await.unwrap();
    drop((owner, locker));
}

/// With a synchronous standby configured but absent, a commit with `synchronous_commit = on`
/// waits for ever. The first session of a crash epoch commits its jump with `local`, so it
/// locks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_jump_does_not_wait_for_a_missing_synchronous_standby() {
    let cluster = Cluster::create();
    cluster.start_with(&["synchronous_standby_names=ghost_standby"]);
    let key = format!("{}k", common::unique_prefix("pg_sync_standby"));
    let pool = common::backends::postgres_pool_of(Some(cluster.url()), 3).await;
    let lock = PostgresDistributedLock::builder(pool, LockConfig::new())
        .command_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let guard = lock
        .try_acquire(&key)
        .await
        .unwrap_or_else(|error| panic!("{}", pg_support::error_chain(&error)));
    assert!(guard.fencing_token() > 1 << 40, "the jump was made");
    guard.release().await.unwrap();
}
