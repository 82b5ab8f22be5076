//! PostgreSQL backend behind a real PgBouncer: refused with a clear error in transaction and
//! statement pool mode (where advisory locks would have two holders), working in session mode.
//!
//! Each test starts its own `pgbouncer` (the Debian package; `.ci/run` installs it) on a free
//! loopback port in front of the test server, and stops it when the test ends, also when an
//! assertion fails. Run as root, PgBouncer runs as the `postgres` user (`-u postgres`).
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use pg_support::pgbouncer::PgBouncer;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};

/// Another client of the same PgBouncer, an application using it with sqlx as usual: its
/// statements are prepared on the server backend that the lock session gets next.
async fn application_uses(bouncer: &PgBouncer) -> sqlx::PgPool {
    let app = common::backends::postgres_pool_of(Some(bouncer.url()), 1).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(one, 1);
    app
}

/// What an earlier lock session of another process leaves on its server backend behind a
/// transaction-mode pooler: its session marker. Set here by a plain client with the simple
/// query protocol (no prepared statement), which then disconnects.
async fn earlier_lock_session_marks_backend(bouncer: &PgBouncer) {
    use sqlx::Connection;
    let mut earlier = sqlx::PgConnection::connect(&bouncer.url()).await.unwrap();
    sqlx::Executor::execute(
        &mut earlier,
        sqlx::raw_sql("SELECT set_config('k1s0.session_marker', 'earlier', false)"),
    )
    .await
    .unwrap();
    earlier.close().await.unwrap();
}

/// Another client of `bouncer` used it first, then a lock service on its own pool tries a
/// key: refused with a clear error, nothing locked.
async fn refused_behind(pool_mode: &str, earlier_client: Earlier) {
    let bouncer = PgBouncer::start(pool_mode, 20).await;
    let key = format!("{}k", common::unique_prefix("pg_bouncer"));
    let _app = match earlier_client {
        Earlier::Application => Some(application_uses(&bouncer).await),
        Earlier::LockSession => {
            earlier_lock_session_marks_backend(&bouncer).await;
            None
        }
        Earlier::Nobody | Earlier::OwnPool => None,
    };
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 3).await;
    if let Earlier::OwnPool = earlier_client {
        // Two connections (the lock session takes one, the other stays idle), each used with
        // a simple query only: no prepared statement stays on a server backend.
        let mut connections = [pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
        for connection in &mut connections {
            sqlx::Executor::execute(&mut **connection, sqlx::raw_sql("SELECT 1"))
                .await
                .unwrap();
        }
        drop(connections);
        let idle =
            common::wait::eventually(Duration::from_secs(5), || async { pool.num_idle() == 2 })
                .await;
        assert!(idle, "the pool kept its connections");
    }
    let lock = PostgresDistributedLock::new(pool, LockConfig::new());

    let error = lock.try_acquire(&key).await.expect_err("refused");
    let message = pg_support::error_chain(&error);
    assert!(
        matches!(error, LockError::BackendError(_))
            && message.contains("PgBouncer")
            && message.contains("pool_mode = transaction")
            && message.contains("pool_mode = statement")
            && !message.contains("sqlx_s_"),
        "unclear error: {message}"
    );
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    // Nothing was left behind: the key is free for a direct client.
    let direct = pg_support::lock(LockConfig::new()).await;
    pg_support::take_and_release(&direct, &key).await;
}

/// Who used the PgBouncer before the lock service.
enum Earlier {
    /// An application querying with sqlx (its prepared statements stay on the backend).
    Application,
    /// A lock session of another process (its marker stays on the backend).
    LockSession,
    /// Nobody: the lock session is PgBouncer's first client.
    Nobody,
    /// Only the lock's own pool, with simple queries, whose connection then waits idle in it.
    OwnPool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_is_refused_with_a_clear_error() {
    refused_behind("transaction", Earlier::Application).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_after_an_earlier_lock_session_is_refused() {
    refused_behind("transaction", Earlier::LockSession).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_is_refused_even_for_its_first_client() {
    refused_behind("transaction", Earlier::Nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_is_refused_when_only_its_own_pool_used_it() {
    refused_behind("transaction", Earlier::OwnPool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pool_mode_is_refused_with_a_clear_error() {
    refused_behind("statement", Earlier::Application).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pool_mode_is_refused_even_for_its_first_client() {
    refused_behind("statement", Earlier::Nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_mode_locks_exclude_direct_clients_and_release() {
    let bouncer = PgBouncer::start("session", 20).await;
    let key = format!("{}k", common::unique_prefix("pg_bouncer"));
    let _app = application_uses(&bouncer).await;
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 3).await;
    let behind = PostgresDistributedLock::new(pool, LockConfig::new());
    let direct = pg_support::lock(LockConfig::new()).await;
    let mut admin = pg_support::admin().await;

    let guard = behind
        .try_acquire(&key)
        .await
        .expect("lock through PgBouncer");
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    assert!(matches!(
        direct.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    guard.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    let direct_guard = direct.try_acquire(&key).await.expect("free after release");
    assert!(matches!(
        behind.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    direct_guard.release().await.unwrap();
    pg_support::take_and_release(&behind, &key).await;
}

/// Session mode with every PgBouncer server connection taken (the application holds one, the
/// lock session the other) and no idle connection in the pool: the witness's new client waits
/// in PgBouncer's queue, and that wait only costs the witness's patience, not the lock session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_mode_with_every_server_connection_taken_still_locks() {
    let bouncer = PgBouncer::start("session", 2).await;
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 2).await;
    let _application = pool.acquire().await.unwrap();
    let lock = PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
        .sessions(1)
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let key = format!("{}k", common::unique_prefix("pg_bouncer_full"));
    let guard = lock
        .try_acquire(&key)
        .await
        .unwrap_or_else(|error| panic!("{}", pg_support::error_chain(&error)));
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    guard.release().await.unwrap();
}
