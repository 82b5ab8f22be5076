//! A client in another language, following docs/postgres.md ("A client in another language")
//! statement by statement: the SQL is read from that section of the document itself, and run
//! on plain connections against lock services of this crate on the same keys.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;

/// The `sql` blocks of the foreign-client section, in order.
struct DocumentedSql {
    epoch_check: String,
    lock: String,
    unlock: String,
    set_marks: String,
    lock_and_unflag: String,
    clear_marks: String,
    is_locked: String,
}

fn documented_sql() -> DocumentedSql {
    let doc = include_str!("../docs/postgres.md");
    let start = doc
        .find("## A client in another language")
        .expect("docs/postgres.md has the foreign-client section");
    let section = &doc[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let blocks: Vec<String> = section
        .split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().trim().to_owned())
        .collect();
    assert_eq!(blocks.len(), 7, "the section's sql blocks: {blocks:#?}");
    let mut blocks = blocks.into_iter();
    let mut next = || blocks.next().unwrap();
    DocumentedSql {
        epoch_check: next(),
        lock: next(),
        unlock: next(),
        set_marks: next(),
        lock_and_unflag: next(),
        clear_marks: next(),
        is_locked: next(),
    }
}

/// The flag halves and the `pg_locks` halves of an advisory key, as the section defines them.
fn flag_halves(key: i64) -> (i32, i32) {
    ((key >> 32) as i32, key as i32)
}

fn pg_locks_halves(key: i64) -> (i64, i64) {
    let bits = key as u64;
    ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64)
}

/// What each test starts from: the documented SQL, a key of the test's own and its advisory
/// key, a crate lock service, a connection to look with, and a plain connection that plays the
/// client in another language.
struct Scene {
    sql: DocumentedSql,
    key: String,
    advisory: i64,
    lock: PostgresDistributedLock,
    admin: sqlx::PgConnection,
    foreign: sqlx::PgConnection,
}

impl Scene {
    async fn new(test: &str) -> Scene {
        let key = format!("{}order", common::unique_prefix(test));
        Scene {
            sql: documented_sql(),
            advisory: PostgresDistributedLock::advisory_key(&key),
            key,
            lock: pg_support::lock(config()).await,
            admin: pg_support::admin().await,
            foreign: pg_support::admin().await,
        }
    }
}

fn config() -> LockConfig {
    LockConfig::new()
        .ttl(Duration::from_secs(30))
        .retry_interval(Duration::from_millis(100))
        .wait_timeout(Duration::from_secs(30))
}

impl DocumentedSql {
    async fn lock(&self, connection: &mut PgConnection, key: i64) -> Option<i64> {
        sqlx::query_scalar(&self.lock)
            .bind(key)
            .fetch_one(connection)
            .await
            .unwrap()
    }

    async fn unlock(&self, connection: &mut PgConnection, key: i64) -> (bool, bool) {
        sqlx::query_as(&self.unlock)
            .bind(key)
            .fetch_one(connection)
            .await
            .unwrap()
    }

    async fn is_locked(&self, connection: &mut PgConnection, key: i64) -> bool {
        let (high, low) = pg_locks_halves(key);
        sqlx::query_scalar(&self.is_locked)
            .bind(high)
            .bind(low)
            .fetch_one(connection)
            .await
            .unwrap()
    }
}

#[test]
fn the_documented_halves_match_the_example() {
    let key = PostgresDistributedLock::advisory_key("order:42");
    assert_eq!(flag_halves(key), (-630_704_115, -534_594_873));
    assert_eq!(pg_locks_halves(key), (3_664_263_181, 3_760_372_423));
}

/// The documented lock, release and is_locked exclude and see the crate's locks; tokens
/// interleave in one increasing order.
#[tokio::test]
async fn a_foreign_client_and_the_crate_exclude_each_other() {
    let Scene {
        sql,
        key,
        advisory,
        lock,
        mut foreign,
        ..
    } = Scene::new("pg_foreign_excl").await;

    let crate_guard = lock.try_acquire(&key).await.unwrap();
    sqlx::raw_sql(&sql.epoch_check)
        .execute(&mut foreign)
        .await
        .unwrap();
    assert_eq!(sql.lock(&mut foreign, advisory).await, None);
    assert!(sql.is_locked(&mut foreign, advisory).await);
    let crate_token = crate_guard.fencing_token();
    crate_guard.release().await.unwrap();
    assert!(!sql.is_locked(&mut foreign, advisory).await);

    let foreign_token = sql.lock(&mut foreign, advisory).await.expect("free key");
    assert!(foreign_token as u64 > crate_token);
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(lock.is_locked(&key).await.unwrap());
    assert_eq!(sql.unlock(&mut foreign, advisory).await, (true, false));
    assert_eq!(sql.unlock(&mut foreign, advisory).await, (false, false));

    let after = lock.try_acquire(&key).await.unwrap();
    assert!(after.fencing_token() > foreign_token as u64);
    after.release().await.unwrap();
}

/// A crate waiter flags the key; the documented release notifies it, and it takes the key.
#[tokio::test]
async fn the_documented_release_notifies_a_waiting_crate_client() {
    let Scene {
        sql,
        key,
        advisory,
        lock,
        mut admin,
        mut foreign,
    } = Scene::new("pg_foreign_notify").await;

    let token = sql.lock(&mut foreign, advisory).await.expect("free key");
    let (waiter, _) =
        pg_support::spawn_flagged_waiter(&lock, &key, &mut admin, Duration::from_secs(10)).await;
    assert_eq!(sql.unlock(&mut foreign, advisory).await, (true, true));
    let guard = waiter.await.unwrap().expect("the waiter takes the key");
    assert!(guard.fencing_token() > token as u64);
    guard.release().await.unwrap();
}

/// A foreign waiter flags the key as documented; the crate's release notifies it with the
/// documented payload, and the documented lock-and-unflag takes the key and drops the flag.
#[tokio::test]
async fn a_foreign_waiter_is_notified_by_the_crate_release() {
    let Scene {
        sql,
        key,
        advisory,
        lock,
        mut admin,
        mut foreign,
    } = Scene::new("pg_foreign_wait").await;
    let mut listener = PgListener::connect(&common::postgres_url().await)
        .await
        .unwrap();
    listener.listen("k1s0_distributed_lock").await.unwrap();

    let guard = lock.try_acquire(&key).await.unwrap();
    assert_eq!(sql.lock(&mut foreign, advisory).await, None);
    // A writer waiting: the flag and the writer-waiting mark.
    let set: (Option<bool>, Option<bool>, Option<bool>) = sqlx::query_as(&sql.set_marks)
        .bind(advisory)
        .bind(true)
        .bind(true)
        .bind(false)
        .fetch_one(&mut foreign)
        .await
        .unwrap();
    assert_eq!(set, (Some(true), Some(true), None));
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 1);
    assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 1);
    let crate_token = guard.fencing_token();
    guard.release().await.unwrap();

    let payload = advisory.to_string();
    loop {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10 s")
            .unwrap();
        if notification.payload() == payload {
            break;
        }
    }
    let (token, unflagged, unmarked): (Option<i64>, Option<bool>, Option<bool>) =
        sqlx::query_as(&sql.lock_and_unflag)
            .bind(advisory)
            .bind(true)
            .bind(true)
            .fetch_one(&mut foreign)
            .await
            .unwrap();
    assert!(token.expect("the key is free") as u64 > crate_token);
    assert_eq!((unflagged, unmarked), (Some(true), Some(true)));
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
    assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 0);
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert_eq!(sql.unlock(&mut foreign, advisory).await, (true, false));

    // A waiter that gives up drops its marks as documented.
    for statement in [&sql.set_marks, &sql.clear_marks] {
        sqlx::query(statement)
            .bind(advisory)
            .bind(true)
            .bind(true)
            .bind(true)
            .execute(&mut foreign)
            .await
            .unwrap();
    }
    assert_eq!(pg_support::waiter_flags(&mut admin, &key).await, 0);
    assert_eq!(pg_support::writer_marks(&mut admin, &key).await, 0);
    assert_eq!(pg_support::readers_marks(&mut admin, &key).await, 0);
}

/// A client that only calls `pg_advisory_lock` excludes the crate's locks, and is excluded.
#[tokio::test]
async fn a_plain_pg_advisory_lock_client_excludes_the_crate() {
    let key = format!("{}order", common::unique_prefix("pg_foreign_plain"));
    let advisory = PostgresDistributedLock::advisory_key(&key);
    let lock = pg_support::lock(config()).await;
    let mut plain = pg_support::admin().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(advisory)
        .execute(&mut plain)
        .await
        .unwrap();
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(advisory)
        .execute(&mut plain)
        .await
        .unwrap();
    let guard = lock.try_acquire(&key).await.unwrap();
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(advisory)
        .fetch_one(&mut plain)
        .await
        .unwrap();
    assert!(!held);
    guard.release().await.unwrap();
}
