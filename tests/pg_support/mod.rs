//! PostgreSQL helpers shared by the `postgres_*` tests: pools on the server that
//! `common::postgres_url()` finds, and `pg_locks` inspection from an independent connection.
#![allow(dead_code)]

pub mod cluster;
pub mod pgbouncer;

use std::time::Duration;

use k1s0_distributed_lock::{
    LockConfig, LockError, LockGuard, PostgresDistributedLock, PostgresDistributedLockBuilder,
};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;

use crate::common;

/// A pool of at most `max` connections on the test server.
pub async fn pool(max: u32) -> PgPool {
    common::backends::postgres_pool_of(None, max).await
}

/// A lock service on its own pool (so it has its own sessions, like another process would).
pub async fn lock(config: LockConfig) -> PostgresDistributedLock {
    PostgresDistributedLock::new(pool(5).await, config)
}

/// A lock service with one session (all its keys share one connection) on its own pool, with
/// `options` applied to its builder (`|builder| builder` for none).
pub async fn one_session_lock(
    config: LockConfig,
    options: impl FnOnce(PostgresDistributedLockBuilder) -> PostgresDistributedLockBuilder,
) -> PostgresDistributedLock {
    options(PostgresDistributedLock::builder(pool(3).await, config).sessions(1))
        .build()
        .expect("valid lock options")
}

/// A plain connection outside every lock service: to look at the server's lock table, or to
/// play a client that is not this crate.
pub async fn admin() -> PgConnection {
    PgConnection::connect(&common::postgres_url().await)
        .await
        .expect("connect to the test PostgreSQL")
}

/// Granted advisory locks (bigint form) on `key` in this database, held by any session.
pub async fn advisory_locks(admin: &mut PgConnection, key: &str) -> i64 {
    count_locks(admin, key, 1, true).await
}

/// Waiter flags (the two-integer form of the same key) held by any session.
pub async fn waiter_flags(admin: &mut PgConnection, key: &str) -> i64 {
    count_locks(admin, key, 2, true).await
}

/// Requests for the waiter flag of `key` that wait on the server, not yet granted.
pub async fn queued_flags(admin: &mut PgConnection, key: &str) -> i64 {
    count_locks(admin, key, 2, false).await
}

/// Writer-waiting marks of `key` (its advisory key inverted, in the two-integer form) held by
/// any session: an exclusive acquire waits there.
pub async fn writer_marks(admin: &mut PgConnection, key: &str) -> i64 {
    let advisory = PostgresDistributedLock::advisory_key(key);
    count_number(admin, !advisory, 2, true).await
}

/// Readers' turn marks of `key` (its advisory key XOR 0x5555_5555_5555_5555, in the
/// two-integer form) held by any session: a shared acquire that found the key held
/// exclusively waits there.
pub async fn readers_marks(admin: &mut PgConnection, key: &str) -> i64 {
    let advisory = PostgresDistributedLock::advisory_key(key);
    count_number(admin, advisory ^ 0x5555_5555_5555_5555, 2, true).await
}

/// A mark a waiter sets on the server (see docs/postgres.md, "Reader-writer locks").
#[derive(Debug, Clone, Copy)]
pub enum Mark {
    WriterWaiting,
    ReadersTurn,
}

/// Waits up to `within` until at least `at_least` sessions hold `mark` of `key` (waiters
/// elsewhere wait on the server).
pub async fn wait_for_mark(
    admin: &mut PgConnection,
    key: &str,
    mark: Mark,
    at_least: i64,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let count = match mark {
            Mark::WriterWaiting => writer_marks(admin, key).await,
            Mark::ReadersTurn => readers_marks(admin, key).await,
        };
        if count >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {at_least} sessions held {mark:?} of {key} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn count_locks(admin: &mut PgConnection, key: &str, objsubid: i16, granted: bool) -> i64 {
    let advisory = PostgresDistributedLock::advisory_key(key);
    count_number(admin, advisory, objsubid, granted).await
}

/// Advisory locks on the halves of `number` in the bigint (`objsubid` 1) or two-integer (2)
/// form. In the two-integer form only shared ones count: the marks are shared locks, and the
/// statements that check a mark hold it exclusively for their length.
async fn count_number(admin: &mut PgConnection, number: i64, objsubid: i16, granted: bool) -> i64 {
    let advisory = number as u64;
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = $3 \
         AND granted = $4 AND (objsubid = 1 OR mode = 'ShareLock')",
    )
    .bind((advisory >> 32) as i64)
    .bind((advisory & 0xffff_ffff) as i64)
    .bind(objsubid)
    .bind(granted)
    .fetch_one(admin)
    .await
    .expect("query pg_locks")
}

/// The backend pids holding `key`.
pub async fn holders(admin: &mut PgConnection, key: &str) -> Vec<i32> {
    pids_holding(admin, key, 1).await
}

/// The backend pids holding the waiter flag of `key`.
pub async fn flag_holders(admin: &mut PgConnection, key: &str) -> Vec<i32> {
    pids_holding(admin, key, 2).await
}

async fn pids_holding(admin: &mut PgConnection, key: &str, objsubid: i16) -> Vec<i32> {
    let advisory = PostgresDistributedLock::advisory_key(key);
    pids_holding_number(admin, advisory, objsubid).await
}

/// Waiter flags of `key`'s permits (its permit base in the two-integer form) held by any
/// session: a permit waiter waits on the server.
pub async fn permit_flags(admin: &mut PgConnection, key: &str) -> i64 {
    count_number(admin, PostgresDistributedLock::permit_base(key), 2, true).await
}

/// The backend pids holding the waiter flag of `key`'s permits.
pub async fn permit_flag_holders(admin: &mut PgConnection, key: &str) -> Vec<i32> {
    pids_holding_number(admin, PostgresDistributedLock::permit_base(key), 2).await
}

/// Waits up to 5 s until no session holds a writer-waiting or readers' turn mark of `key` (a
/// closed connection's locks go once its server process has ended); whether that came.
pub async fn no_mark_is_left(admin: &mut PgConnection, key: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while writer_marks(admin, key).await + readers_marks(admin, key).await > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

async fn pids_holding_number(admin: &mut PgConnection, number: i64, objsubid: i16) -> Vec<i32> {
    let advisory = number as u64;
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = $3 AND granted \
         AND (objsubid = 1 OR mode = 'ShareLock')",
    )
    .bind((advisory >> 32) as i64)
    .bind((advisory & 0xffff_ffff) as i64)
    .bind(objsubid)
    .fetch_all(admin)
    .await
    .expect("query pg_locks")
}

/// Waits up to `within` until some session holds the waiter flag of `key` (a waiter there
/// started waiting on the server), and returns that session's pid.
pub async fn wait_for_flag(admin: &mut PgConnection, key: &str, within: Duration) -> i32 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(&pid) = flag_holders(admin, key).await.first() {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no waiter flagged {key} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Spawns `lock.acquire(key)` while another process holds `key`, and waits up to `within`
/// until the waiter's flag is set on the server (it waits there now). Returns the waiting task
/// and the pid of the session that holds the flag.
pub async fn spawn_flagged_waiter(
    lock: &PostgresDistributedLock,
    key: &str,
    admin: &mut PgConnection,
    within: Duration,
) -> (JoinHandle<Result<LockGuard, LockError>>, i32) {
    use k1s0_distributed_lock::DistributedLock;
    let waiting = tokio::spawn({
        let (lock, key) = (lock.clone(), key.to_owned());
        async move { lock.acquire(&key).await }
    });
    let pid = wait_for_flag(admin, key, within).await;
    (waiting, pid)
}

/// Statements that remove what a test created in the shared database, run when this is
/// dropped: at the end of the test, and also when an assertion fails half-way.
pub struct DropOnExit(Vec<String>);

impl DropOnExit {
    pub fn new(statements: Vec<String>) -> Self {
        DropOnExit(statements)
    }
}

impl Drop for DropOnExit {
    fn drop(&mut self) {
        let statements = std::mem::take(&mut self.0);
        // A thread of its own, with its own runtime: this may run while a test's runtime
        // unwinds.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut admin = admin().await;
                for statement in statements {
                    if let Err(error) = sqlx::query(&statement).execute(&mut admin).await {
                        eprintln!("test clean-up {statement:?} failed: {error}");
                    }
                }
            });
        })
        .join();
    }
}

/// Terminates the server process `pid` (`pg_terminate_backend`, waiting up to 5 s for it to
/// end), failing the test if it was not there or did not end in time.
pub async fn terminate(admin: &mut PgConnection, pid: i32) {
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(admin)
        .await
        .expect("pg_terminate_backend");
    assert!(
        terminated,
        "server process {pid} was not there or did not end within 5 s"
    );
}

/// Takes `key` with `try_acquire` and releases it, failing the test if either fails: the key
/// is free and `lock` works.
pub async fn take_and_release(lock: &PostgresDistributedLock, key: &str) {
    use k1s0_distributed_lock::DistributedLock;
    lock.try_acquire(key)
        .await
        .expect("the key is free")
        .release()
        .await
        .expect("release");
}

/// The error and its sources, as a log line shows them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}
