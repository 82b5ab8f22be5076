//! PostgreSQL backend: key mapping, bad input, conflicts, fencing, a server that is down.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::time::{Duration, Instant};

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};
use sqlx::postgres::PgPoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_mapping_matches_the_documented_vector_and_the_server_side_formula() {
    // The vector in docs/postgres.md.
    assert_eq!(
        PostgresDistributedLock::advisory_key("order:42"),
        -2_708_853_543_617_250_617
    );
    let mut admin = pg_support::admin().await;
    for key in ["order:42", "ключ", "a'b\\c\0d", "\"; DROP TABLE x; --", "k"] {
        let on_server: i64 = sqlx::query_scalar(
            "SELECT ('x' || encode(substring(sha256($1::bytea) FROM 1 FOR 8), 'hex'))::bit(64)::bigint",
        )
        .bind(key.as_bytes())
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(
            PostgresDistributedLock::advisory_key(key),
            on_server,
            "{key:?}"
        );
    }
    // And the lock really sits on that advisory key.
    let prefix = common::unique_prefix("pg_vector");
    let key = format!("{prefix}k");
    let lock = pg_support::lock(LockConfig::new()).await;
    let guard = lock.try_acquire(&key).await.unwrap();
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PostgresDistributedLock::advisory_key(&key))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(!taken, "another session could take the mapped advisory key");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_bad_config_are_refused_without_locking() {
    let lock = pg_support::lock(LockConfig::new()).await;
    common::suites::assert_bad_keys_refused(&lock).await;
    let prefix = common::unique_prefix("pg_bad_config");
    let key = format!("{prefix}k");
    let pool = pg_support::pool(2).await;
    // A bad configuration is refused when the lock is built: try_new and build() return the
    // error, new() panics with it.
    let zero_ttl = LockConfig::new().ttl(Duration::ZERO);
    assert!(matches!(
        PostgresDistributedLock::try_new(pool.clone(), zero_ttl),
        Err(LockError::InvalidConfig { .. })
    ));
    assert!(matches!(
        PostgresDistributedLock::builder(pool.clone(), zero_ttl).build(),
        Err(LockError::InvalidConfig { .. })
    ));
    let for_new = pool.clone();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        PostgresDistributedLock::new(for_new, zero_ttl)
    }))
    .expect_err("new() took a zero TTL");
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("invalid lock configuration: ttl"),
        "{message}"
    );
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);

    for builder in [
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new()).sessions(0),
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new()).sessions(65),
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
            .command_timeout(Duration::ZERO),
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
            .network_timeout(Duration::from_millis(500)),
        // A cut would reach the client (ping interval + command timeout: 2.5 s + 8 s) after
        // the server had freed the locks (10 s).
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
            .command_timeout(Duration::from_secs(8)),
        PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
            .fencing_sequence("x'; DROP TABLE y; --"),
    ] {
        assert!(matches!(
            builder.build(),
            Err(LockError::InvalidConfig { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_quotes_backslashes_and_nul_are_distinct_locks() {
    let prefix = common::unique_prefix("pg_odd_keys");
    let lock = pg_support::lock(LockConfig::new()).await;
    let other = pg_support::lock(LockConfig::new()).await;
    let keys: Vec<String> = ["a'b", "a\\b", "a\0b", "a\"b", "a\nb", "a;b--", "é🔒", "a b"]
        .iter()
        .map(|suffix| format!("{prefix}{suffix}"))
        .collect();
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(
            lock.try_acquire(key)
                .await
                .unwrap_or_else(|e| panic!("{key:?}: {e}")),
        );
    }
    let mut admin = pg_support::admin().await;
    for key in &keys {
        assert!(other.is_locked(key).await.unwrap(), "{key:?}");
        assert!(matches!(
            other.try_acquire(key).await,
            Err(LockError::AlreadyLocked)
        ));
        assert_eq!(
            pg_support::advisory_locks(&mut admin, key).await,
            1,
            "{key:?}"
        );
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
    for key in &keys {
        assert!(!other.is_locked(key).await.unwrap(), "{key:?}");
        assert_eq!(
            pg_support::advisory_locks(&mut admin, key).await,
            0,
            "{key:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_within_and_across_instances_and_fencing_tokens_increase() {
    let prefix = common::unique_prefix("pg_conflict");
    let key = format!("{prefix}k");
    let lock = pg_support::lock(LockConfig::new()).await;
    let other = pg_support::lock(LockConfig::new()).await;
    let mut last_token = 0;
    for round in 0..6 {
        let (holder, contender) = if round % 2 == 0 {
            (&lock, &other)
        } else {
            (&other, &lock)
        };
        let guard = holder.try_acquire(&key).await.unwrap();
        assert!(guard.fencing_token() > last_token, "round {round}");
        last_token = guard.fencing_token();
        // Same instance (re-entrant session underneath) and another instance both refuse.
        assert!(matches!(
            holder.try_acquire(&key).await,
            Err(LockError::AlreadyLocked)
        ));
        assert!(matches!(
            contender.try_acquire(&key).await,
            Err(LockError::AlreadyLocked)
        ));
        assert!(holder.is_locked(&key).await.unwrap());
        assert!(contender.is_locked(&key).await.unwrap());
        if round % 3 == 0 {
            drop(guard);
        } else {
            holder.release(guard).await.unwrap();
        }
        assert!(!holder.is_locked(&key).await.unwrap());
    }
}

/// The jump of the fencing sequence at a new crash epoch (`EPOCH_JUMP` in the backend).
const EPOCH_JUMP: u64 = 1 << 40;

/// A lock service on its own fencing sequence, so that a test can reset that sequence's crash
/// epoch marker without touching other tests' tokens.
async fn lock_on_sequence(sequence: &str) -> PostgresDistributedLock {
    PostgresDistributedLock::builder(pg_support::pool(2).await, LockConfig::new())
        .fencing_sequence(sequence)
        .build()
        .unwrap()
}

/// What crash recovery does to the unlogged epoch table, for one sequence only.
async fn forget_epoch(sequence: &str) {
    let mut admin = pg_support::admin().await;
    sqlx::query("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = $1")
        .bind(format!("\"{sequence}\""))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Removes the test's own sequence and its epoch row when the test ends, however it ends.
fn sequence_cleanup(sequence: &str) -> pg_support::DropOnExit {
    pg_support::DropOnExit::new(vec![
        format!("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = '\"{sequence}\"'"),
        format!("DROP SEQUENCE IF EXISTS \"{sequence}\""),
    ])
}

/// Removes the test's own schema when the test ends, however it ends.
fn schema_cleanup(schema: &str) -> pg_support::DropOnExit {
    pg_support::DropOnExit::new(vec![format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")])
}

async fn token_of(lock: &PostgresDistributedLock, key: &str) -> u64 {
    let guard = lock.acquire(key).await.unwrap();
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    token
}

/// The marker table is unlogged (that is what makes crash recovery, failover and restore
/// empty it), and the first session after it was emptied jumps the sequence past every token
/// handed out before; later sessions do not jump again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_jump_past_a_new_crash_epoch_once() {
    let sequence = format!("k1s0_test_seq_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = sequence_cleanup(&sequence);
    let key = format!("{}k", common::unique_prefix("pg_epoch"));
    let before = lock_on_sequence(&sequence).await;
    let mut last = 0;
    for _ in 0..40 {
        let token = token_of(&before, &key).await;
        assert!(token > last);
        last = token;
    }
    let mut admin = pg_support::admin().await;
    let persistence: String = sqlx::query_scalar(
        "SELECT relpersistence::text FROM pg_class WHERE relname = 'k1s0_lock_fencing_epochs'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(persistence, "u", "the epoch table must be unlogged");

    forget_epoch(&sequence).await;
    let after = lock_on_sequence(&sequence).await;
    let first_after = token_of(&after, &key).await;
    assert!(
        first_after > last + EPOCH_JUMP,
        "{first_after} after {last}: no jump"
    );
    let later = lock_on_sequence(&sequence).await;
    let token = token_of(&later, &key).await;
    assert!(
        token > first_after && token < first_after + EPOCH_JUMP,
        "{token} after {first_after}: a second jump"
    );
    drop((before, after, later));
}

/// Eight services opening their first session at once in a new epoch: one of them jumps the
/// sequence, the others wait for that jump and do not jump again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sessions_of_an_epoch_jump_once() {
    let sequence = format!("k1s0_test_seq_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = sequence_cleanup(&sequence);
    let prefix = common::unique_prefix("pg_epoch_race");
    let last = token_of(&lock_on_sequence(&sequence).await, &format!("{prefix}k")).await;
    forget_epoch(&sequence).await;
    let mut services = Vec::new();
    for _ in 0..8 {
        services.push(lock_on_sequence(&sequence).await);
    }
    let keys: Vec<String> = (0..services.len())
        .map(|i| format!("{prefix}{i}"))
        .collect();
    let tokens = futures::future::join_all(
        services
            .iter()
            .zip(&keys)
            .map(|(lock, key)| token_of(lock, key)),
    )
    .await;
    for token in &tokens {
        assert!(
            *token > last + EPOCH_JUMP && *token < last + 2 * EPOCH_JUMP,
            "{tokens:?} after {last}: not exactly one jump"
        );
    }
    drop(services);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_gives_backend_error_quickly() {
    // A loopback port that nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/test"))
        .unwrap();
    let lock = PostgresDistributedLock::builder(pool, LockConfig::new())
        .command_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        lock.try_acquire("k").await,
        Err(LockError::BackendError(_))
    ));
    assert!(matches!(
        lock.acquire("k").await,
        Err(LockError::BackendError(_))
    ));
    assert!(matches!(
        lock.is_locked("k").await,
        Err(LockError::BackendError(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Several lock services start at once on a sequence that does not exist yet, in a schema of
/// its own (so that its epoch table does not exist either): both creations race, nobody
/// fails, and tokens still increase per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_sequence_is_created_once_under_concurrent_first_use() {
    let prefix = common::unique_prefix("pg_sequence");
    let schema = format!("k1s0_test_schema_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = schema_cleanup(&schema);
    let mut admin = pg_support::admin().await;
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let sequence = format!("{schema}.fencing");
    let mut locks = Vec::new();
    for _ in 0..6 {
        locks.push(
            PostgresDistributedLock::builder(pg_support::pool(2).await, LockConfig::new())
                .fencing_sequence(sequence.clone())
                .build()
                .unwrap(),
        );
    }
    let key = format!("{prefix}shared");
    let first_keys: Vec<String> = (0..locks.len()).map(|i| format!("{prefix}{i}")).collect();
    let firsts = futures::future::join_all(
        locks
            .iter()
            .zip(&first_keys)
            .map(|(lock, key)| lock.try_acquire(key)),
    )
    .await;
    for guard in firsts {
        guard
            .expect("first use creates or finds the sequence")
            .release()
            .await
            .unwrap();
    }
    let mut last = 0;
    for lock in locks.iter().chain(locks.iter()) {
        let guard = lock.acquire(&key).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    assert_eq!(
        epoch_rows(&mut admin, &schema).await,
        1,
        "one epoch row for the one sequence"
    );
    drop(locks);
}

/// The rows of the epoch table in `schema`.
async fn epoch_rows(admin: &mut sqlx::PgConnection, schema: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".k1s0_lock_fencing_epochs"
    ))
    .fetch_one(admin)
    .await
    .unwrap()
}

/// An epoch table created beforehand as an ordinary (logged) table would never be emptied by a
/// crash, so the jump could never happen: the backend notices, does not rely on it (no row is
/// written), draws its tokens waiting for the disk instead, and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_epoch_table_is_not_relied_on() {
    let prefix = common::unique_prefix("pg_logged_epochs");
    let schema = format!("k1s0_test_schema_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = schema_cleanup(&schema);
    let mut admin = pg_support::admin().await;
    for ddl in [
        format!("CREATE SCHEMA \"{schema}\""),
        format!("CREATE TABLE \"{schema}\".k1s0_lock_fencing_epochs (sequence text PRIMARY KEY)"),
    ] {
        sqlx::query(&ddl).execute(&mut admin).await.unwrap();
    }
    let lock = lock_on_sequence(&format!("{schema}.fencing")).await;
    let key = format!("{prefix}k");
    let mut last = 0;
    for _ in 0..40 {
        let token = token_of(&lock, &key).await;
        assert!(token > last);
        last = token;
    }
    assert_eq!(
        epoch_rows(&mut admin, &schema).await,
        0,
        "a logged epoch table must not be used"
    );
    drop(lock);
}

/// A login role of its own, dropped with its sessions and grants at the end. It gets no
/// `CREATE` anywhere; the test gives it `USAGE` on a schema of the test's own.
struct RestrictedRole {
    name: String,
    _cleanup: pg_support::DropOnExit,
}

impl RestrictedRole {
    async fn create(admin: &mut sqlx::PgConnection) -> Self {
        let name = format!("k1s0_test_role_{}", uuid::Uuid::new_v4().simple());
        let cleanup = pg_support::DropOnExit::new(vec![
            format!("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{name}'"),
            format!("DROP OWNED BY \"{name}\""),
            format!("DROP ROLE IF EXISTS \"{name}\""),
        ]);
        sqlx::query(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD 'k1s0-test'"
        ))
        .execute(&mut *admin)
        .await
        .unwrap();
        RestrictedRole {
            name,
            _cleanup: cleanup,
        }
    }

    /// A pool of this role's connections on the test server.
    async fn pool(&self) -> sqlx::PgPool {
        let options: sqlx::postgres::PgConnectOptions =
            common::postgres_url().await.parse().unwrap();
        PgPoolOptions::new()
            .max_connections(3)
            .connect_with(options.username(&self.name).password("k1s0-test"))
            .await
            .expect("connect as the restricted role")
    }
}

/// A deployment whose role may use the fencing sequence but not create the epoch table next to
/// it: the session takes the fallback (tokens drawn with `synchronous_commit = on`,
/// docs/postgres.md, "Fencing tokens") instead of failing, so locks still work, tokens still
/// increase and no epoch table appears. (That the fallback really switches `synchronous_commit`
/// is not visible from outside the session; the test shows the path is taken.) Without the
/// sequence, which it cannot create either, every lock attempt is a clear `BackendError` that
/// leaves nothing locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_create_objects_still_locks_with_a_prepared_sequence() {
    let prefix = common::unique_prefix("pg_no_create");
    let schema = format!("k1s0_test_schema_{}", uuid::Uuid::new_v4().simple());
    let mut admin = pg_support::admin().await;
    // Dropped in reverse order: the schema (and the grants on it) before the role.
    let role = RestrictedRole::create(&mut admin).await;
    let _schema_cleanup = schema_cleanup(&schema);
    for ddl in [
        format!("CREATE SCHEMA \"{schema}\""),
        format!("CREATE SEQUENCE \"{schema}\".fencing"),
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO \"{}\"", role.name),
        format!(
            "GRANT USAGE, UPDATE ON SEQUENCE \"{schema}\".fencing TO \"{}\"",
            role.name
        ),
    ] {
        sqlx::query(&ddl).execute(&mut admin).await.unwrap();
    }
    let pool = role.pool().await;
    let key = format!("{prefix}k");

    let lock = PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
        .fencing_sequence(format!("{schema}.fencing"))
        .build()
        .unwrap();
    let mut last = 0;
    for _ in 0..20 {
        let token = token_of(&lock, &key).await;
        assert!(token > last, "{token} after {last}");
        last = token;
    }
    let epoch_table: Option<String> = sqlx::query_scalar(&format!(
        "SELECT to_regclass('\"{schema}\".k1s0_lock_fencing_epochs')::text"
    ))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(epoch_table, None, "the role could not have created it");

    let without_sequence = PostgresDistributedLock::builder(pool.clone(), LockConfig::new())
        .fencing_sequence(format!("{schema}.missing"))
        .build()
        .unwrap();
    let other_key = format!("{prefix}other");
    assert!(matches!(
        without_sequence.try_acquire(&other_key).await,
        Err(LockError::BackendError(_))
    ));
    assert_eq!(pg_support::advisory_locks(&mut admin, &other_key).await, 0);
    drop((lock, without_sequence));
    pool.close().await;
}

/// A `try_acquire` that failed with `BackendError` has let go of the key in this process by the
/// time it returns: the next `try_acquire` on the free key never sees it claimed
/// (`AlreadyLocked`). Here every lock statement fails (the fencing sequence was dropped after
/// the session opened), so every attempt must be a `BackendError`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_try_acquire_leaves_the_key_free_for_the_next() {
    let sequence = format!("k1s0_test_seq_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = sequence_cleanup(&sequence);
    let key = format!("{}k", common::unique_prefix("pg_failed_try"));
    let lock = lock_on_sequence(&sequence).await;
    token_of(&lock, &key).await;
    let mut admin = pg_support::admin().await;
    sqlx::query(&format!("DROP SEQUENCE \"{sequence}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    for attempt in 0..2000 {
        match lock.try_acquire(&key).await {
            Err(LockError::BackendError(_)) => {}
            Err(other) => panic!("attempt {attempt}: {other:?}"),
            Ok(_) => panic!("attempt {attempt}: locked without a fencing sequence"),
        }
    }
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
}
