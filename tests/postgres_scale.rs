//! PostgreSQL backend: 1,000 locks held at once on a pool of 10 connections, while other keys
//! are still taken and given back.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use futures::future::join_all;
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_locks_on_a_pool_of_ten() {
    const HELD: usize = 1000;
    let prefix = common::unique_prefix("pg_scale");
    let pool = pg_support::pool(10).await;
    let lock = PostgresDistributedLock::new(
        pool.clone(),
        LockConfig::new()
            .retry_interval(Duration::from_millis(50))
            .max_retries(4),
    );
    let keys: Vec<String> = (0..HELD).map(|i| format!("{prefix}held:{i}")).collect();
    let guards: Vec<_> = join_all(keys.iter().map(|key| lock.try_acquire(key)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("all 1,000 locks");
    // By default a lock service uses half its pool as lock sessions (5 of 10) and keeps at most
    // those and one LISTEN connection out of the pool (`pool.size() <= 10` alone could not
    // fail: the pool is capped at 10).
    const SESSIONS: usize = 5;
    let taken = pool.size() as usize - pool.num_idle();
    assert!(
        taken <= SESSIONS + 1,
        "the backend keeps {taken} pool connections"
    );

    let mut admin = pg_support::admin().await;
    let advisory: Vec<i64> = keys
        .iter()
        .map(|k| PostgresDistributedLock::advisory_key(k))
        .collect();
    let (held, sessions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND objsubid = 1 AND granted AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
    )
    .bind(&advisory)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(held, HELD as i64);
    // 1,000 keys use every session.
    assert_eq!(sessions, SESSIONS as i64, "connections holding the locks");

    // Other keys still come and go, and a held one still times out properly.
    let other = format!("{prefix}other");
    for round in 0..100 {
        let guard = lock.acquire(&format!("{other}:{round}")).await.unwrap();
        guard.release().await.unwrap();
    }
    assert!(matches!(
        lock.acquire(&keys[17]).await,
        Err(LockError::Timeout)
    ));
    // Still no more, after the LISTEN connection was needed.
    let taken = pool.size() as usize - pool.num_idle();
    assert!(
        taken <= SESSIONS + 1,
        "the backend keeps {taken} pool connections"
    );

    drop(guards);
    // A session answers `is_locked` after the unlocks queued on it before: asking for every
    // key reaches every session.
    for locked in join_all(keys.iter().map(|key| lock.is_locked(key))).await {
        assert!(!locked.unwrap());
    }
    let still_held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
         AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
    )
    .bind(&advisory)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(still_held, 0);
}

/// Found by review: with every pool slot taken by lock sessions, starting the LISTEN connection
/// waited for a slot for the whole command timeout (5 s), far past a 300 ms waiting budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_keeps_its_budget_when_the_pool_has_no_slot_for_listen() {
    let prefix = common::unique_prefix("pg_no_listen_slot");
    let pool = pg_support::pool(2).await;
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(30))
        .max_retries(10);
    let lock = PostgresDistributedLock::builder(pool.clone(), config)
        .sessions(2)
        .build()
        .unwrap();
    // Open both lock sessions: they keep both pool slots.
    let mut held = Vec::new();
    for i in 0.. {
        held.push(lock.try_acquire(&format!("{prefix}fill{i}")).await.unwrap());
        if pool.size() == 2 && pool.num_idle() == 0 {
            break;
        }
        assert!(i < 64, "the two lock sessions never both opened");
    }
    let other = pg_support::lock(LockConfig::new()).await;
    let key = format!("{prefix}busy");
    let _holder = other.try_acquire(&key).await.unwrap();

    let started = tokio::time::Instant::now();
    let waited = lock.acquire(&key).await;
    let took = started.elapsed();
    assert!(matches!(waited, Err(LockError::Timeout)), "{waited:?}");
    assert!(
        took < config.wait_budget() + Duration::from_secs(1),
        "waited {took:?} for a {:?} budget",
        config.wait_budget()
    );
    drop(held);
}

/// Whether the server process `pid` still serves a connection.
async fn connected(admin: &mut sqlx::PgConnection, pid: i32) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// A lock session that has held nothing for `idle_session_close` closes its connection (it is
/// not kept, and not given back to the pool with anything on it); the next command opens a new
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_session_closes_its_connection() {
    let prefix = common::unique_prefix("pg_idle_close");
    let key = format!("{prefix}k");
    let lock = pg_support::one_session_lock(LockConfig::new(), |builder| {
        builder.idle_session_close(Duration::from_millis(300))
    })
    .await;
    let admin = tokio::sync::Mutex::new(pg_support::admin().await);
    let guard = lock.try_acquire(&key).await.unwrap();
    let pid = pg_support::holders(&mut *admin.lock().await, &key).await[0];
    guard.release().await.unwrap();
    common::wait::assert_eventually("the unused session closed its connection", || async {
        !connected(&mut *admin.lock().await, pid).await
    })
    .await;
    let guard = lock
        .try_acquire(&key)
        .await
        .expect("a new session connection");
    let new_pid = pg_support::holders(&mut *admin.lock().await, &key).await[0];
    assert_ne!(new_pid, pid);
    guard.release().await.unwrap();
}

/// A session kept busy with commands that leave nothing held (`is_locked` here) is in use, not
/// idle: it keeps its connection through several `idle_session_close` periods of such use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_use_is_not_closed_as_idle() {
    let prefix = common::unique_prefix("pg_busy_not_idle");
    let key = format!("{prefix}k");
    let idle_close = Duration::from_millis(300);
    let lock = pg_support::one_session_lock(LockConfig::new(), |builder| {
        builder.idle_session_close(idle_close)
    })
    .await;
    let mut admin = pg_support::admin().await;
    let guard = lock.try_acquire(&key).await.unwrap();
    let pid = pg_support::holders(&mut admin, &key).await[0];
    guard.release().await.unwrap();
    let until = tokio::time::Instant::now() + idle_close * 4;
    let mut askers = Vec::new();
    for asker in 0..8 {
        let (lock, key) = (lock.clone(), format!("{prefix}asked{asker}"));
        askers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < until {
                assert!(!lock.is_locked(&key).await.unwrap());
            }
        }));
    }
    for asker in askers {
        asker.await.unwrap();
    }
    let guard = lock.try_acquire(&key).await.unwrap();
    assert_eq!(
        pg_support::holders(&mut admin, &key).await,
        vec![pid],
        "the busy session was closed as idle and reopened"
    );
    guard.release().await.unwrap();
}

/// A session that only waited (its waiter flag was its one use) counts as idle from when the
/// wait ended, not from when it last held a lock: a waiter that gives up after longer than
/// `idle_session_close` leaves a connection that the next command still finds open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_idle_from_the_end_of_its_last_wait() {
    let prefix = common::unique_prefix("pg_idle_after_wait");
    let (key, other_key) = (format!("{prefix}k"), format!("{prefix}other"));
    let holder = pg_support::lock(LockConfig::new()).await;
    let held = holder.try_acquire(&key).await.unwrap();
    let idle_close = Duration::from_secs(3);
    let waiter = pg_support::one_session_lock(
        // Waits 4 s: longer than the idle close.
        LockConfig::new()
            .retry_interval(Duration::from_millis(200))
            .max_retries(20),
        |builder| builder.idle_session_close(idle_close),
    )
    .await;
    let admin = tokio::sync::Mutex::new(pg_support::admin().await);

    let (waiting, pid) = pg_support::spawn_flagged_waiter(
        &waiter,
        &key,
        &mut *admin.lock().await,
        Duration::from_secs(10),
    )
    .await;
    let outcome = waiting.await.unwrap();
    assert!(matches!(outcome, Err(LockError::Timeout)), "{outcome:?}");
    // The wait is over once its flag is gone.
    common::wait::assert_eventually("the waiter flag was cleared", || async {
        pg_support::flag_holders(&mut *admin.lock().await, &key)
            .await
            .is_empty()
    })
    .await;
    let guard = waiter.try_acquire(&other_key).await.unwrap();
    assert_eq!(
        pg_support::holders(&mut *admin.lock().await, &other_key).await,
        vec![pid],
        "the session kept its connection: it had been idle for less than {idle_close:?}"
    );
    guard.release().await.unwrap();
    held.release().await.unwrap();
}
