//! Transaction-scoped advisory locks on the caller's own transaction: the same advisory key
//! and the same fencing sequence as the session locks, released by the transaction's commit
//! or rollback.

use std::sync::atomic::Ordering;

use sqlx::{Postgres, Row, Transaction};
use tokio::time::Instant;

use super::fencing::ensure_fencing_objects;
use super::sql::EPOCH_TABLE;
use super::PostgresDistributedLock;
use crate::backend::jitter::Jitter;
use crate::{validate_key, LockError};

/// A lock taken with [`PostgresDistributedLock::try_acquire_in`] or
/// [`acquire_in`](PostgresDistributedLock::acquire_in): held by the transaction it was taken
/// in until that transaction commits or rolls back. There is nothing to release, extend or
/// lose: no lease runs, and the lock cannot outlive the transaction nor end before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionLock {
    key: String,
    fencing_token: u64,
}

impl TransactionLock {
    /// The key that was locked.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token drawn when the lock was taken, from the same sequence as the session
    /// locks' tokens: larger than the token of every earlier holder of the key, whichever kind
    /// of lock it held.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }
}

impl PostgresDistributedLock {
    /// Locks `key` inside the caller's transaction `tx` if it is free, without waiting:
    /// `pg_try_advisory_xact_lock` on the same advisory key as [`try_acquire`] (so a session
    /// lock and a transaction lock on one key exclude each other), with a fencing token from
    /// the same sequence. The lock is released when `tx` commits or rolls back, together with
    /// the data it protects: there is no lease and no window in which the lock is gone while
    /// the work goes on.
    ///
    /// Returns [`LockError::AlreadyLocked`] if another transaction or lock session holds the
    /// key, [`LockError::InvalidKey`] (before anything reaches the server) for a key that
    /// [`validate_key`](crate::validate_key) refuses, and [`LockError::BackendError`] if a
    /// statement fails. A failed statement aborts `tx`, as any failed statement does; the
    /// statements here fail only when the server or the connection does, when `tx` was
    /// already aborted by an earlier error, or when `tx` cannot write (a `READ ONLY`
    /// transaction or a standby: the token is drawn with `nextval`).
    ///
    /// Advisory locks are re-entrant within a server session: a second lock of the same key
    /// in the same transaction succeeds too. The first use of a lock service checks, on its
    /// pool, that the fencing sequence and its epoch table exist (creating them if missing).
    /// No lock session is opened, and this works behind PgBouncer in transaction mode, for
    /// the caller's transactions and for the lock service's pool alike (see the crate's
    /// `docs/postgres.md`).
    ///
    /// ```no_run
    /// use k1s0_distributed_lock::{LockConfig, PostgresDistributedLock};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// let lock = PostgresDistributedLock::new(pool.clone(), LockConfig::new());
    ///
    /// let mut tx = pool.begin().await?;
    /// let held = lock.try_acquire_in(&mut tx, "invoice:2024-17").await?;
    /// sqlx::query("UPDATE invoices SET paid = true, fence = $2 WHERE id = $1")
    ///     .bind("2024-17")
    ///     .bind(held.fencing_token() as i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?; // releases the lock, with the update
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`try_acquire`]: crate::DistributedLock::try_acquire
    pub async fn try_acquire_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        key: &str,
    ) -> Result<TransactionLock, LockError> {
        validate_key(key)?;
        let advisory = self.inner.key_cache.advisory_key(key);
        self.prepare_transaction_fencing().await?;
        match self.try_lock_in(tx, key, advisory).await? {
            Some(fencing_token) => Ok(TransactionLock {
                key: key.to_owned(),
                fencing_token,
            }),
            None => Err(LockError::AlreadyLocked),
        }
    }

    /// Like [`try_acquire_in`](Self::try_acquire_in), but waits for the key within the lock
    /// service's waiting budget ([`LockConfig::wait_budget`](crate::LockConfig::wait_budget)),
    /// trying again every [`retry_interval`](crate::LockConfig::retry_interval) (±50 %
    /// jitter) and once more at the end of the budget. Nothing waits inside the server, so
    /// `tx` never sits in a lock queue and no server-side timeout can abort it. Returns
    /// [`LockError::Timeout`] if the key stayed held for the whole budget.
    ///
    /// A waiter here is not woken by a release (a commit sends no notification, and this
    /// waiter flags nothing): it sees a release at its next try.
    ///
    /// # Cancellation
    ///
    /// Dropping the future between tries leaves `tx` as it was. Dropped while a try is in
    /// flight, the try may still be granted on the server: the key then stays locked by `tx`
    /// until `tx` commits or rolls back, and the token is not returned to anyone. The
    /// transaction is the caller's, so ending it (dropping it rolls it back) is what frees
    /// the key.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{LockConfig, LockError, PostgresDistributedLock};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// let config = LockConfig::new().wait_timeout(Duration::from_secs(3));
    /// let lock = PostgresDistributedLock::new(pool.clone(), config);
    ///
    /// let mut tx = pool.begin().await?;
    /// match lock.acquire_in(&mut tx, "report:daily").await {
    ///     Ok(held) => println!("fencing token {}", held.fencing_token()),
    ///     Err(LockError::Timeout) => return Ok(()), // still held after 3 s; `tx` rolls back
    ///     Err(other) => return Err(other.into()),
    /// }
    /// tx.commit().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        key: &str,
    ) -> Result<TransactionLock, LockError> {
        validate_key(key)?;
        let config = self.inner.config;
        config.validate()?;
        let deadline = Instant::now() + config.wait_budget();
        let advisory = self.inner.key_cache.advisory_key(key);
        self.prepare_transaction_fencing().await?;
        let mut jitter = Jitter::new(uuid::Uuid::new_v4());
        loop {
            if let Some(fencing_token) = self.try_lock_in(tx, key, advisory).await? {
                return Ok(TransactionLock {
                    key: key.to_owned(),
                    fencing_token,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Timeout);
            }
            // No notification reaches a transaction lock's waiter: it polls.
            let pause = self.poll_interval(true, &mut jitter);
            tokio::time::sleep_until((now + pause).min(deadline)).await;
        }
    }

    /// One try on `tx`: the fencing token if the key was taken, `None` if it is held.
    async fn try_lock_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        key: &str,
        advisory: i64,
    ) -> Result<Option<u64>, LockError> {
        for first in [true, false] {
            // Unnamed statement (`persistent(false)`): nothing is cached on a server
            // connection that PgBouncer may hand to another client after the transaction.
            let row = sqlx::query(&self.inner.sql.transaction_try_lock)
                .bind(advisory)
                .persistent(false)
                .fetch_one(&mut **tx)
                .await
                .map_err(LockError::backend)?;
            let epoch_current: bool = row.try_get(0).map_err(LockError::backend)?;
            let token: Option<i64> = row.try_get(1).map_err(LockError::backend)?;
            if epoch_current {
                // The sequence has MINVALUE 1.
                return Ok(token.map(|token| token as u64));
            }
            if first {
                // The server started afresh (crash recovery, failover, restore) and no lock
                // session has moved the sequence on yet: do it now, on a connection of the
                // pool, committed before this transaction draws.
                tracing::debug!(
                    advisory_key = key,
                    "fencing epoch row missing; running the epoch check"
                );
                sqlx::Executor::fetch_optional(
                    &self.inner.pool,
                    sqlx::raw_sql(&self.inner.sql.epoch_check),
                )
                .await
                .map_err(LockError::backend)?;
            }
        }
        Err(LockError::backend_msg(format!(
            "the fencing sequence {} has no current epoch row in {EPOCH_TABLE}: \
             the epoch check found it but this transaction's snapshot predates it (a REPEATABLE \
             READ or SERIALIZABLE transaction that began before the first lock after a server \
             restart: retry in a new transaction); see docs/postgres.md",
            self.inner.sql.sequence
        )))
    }

    /// Before the first transaction lock of this service: the same checks of the fencing
    /// sequence and its unlogged epoch table as a lock session's ([`ensure_fencing_objects`]:
    /// an unfit sequence is refused, what is missing is created), so that the lock statement
    /// cannot fail on a missing relation and abort the caller's transaction. Runs on a
    /// connection of the pool as simple queries, so it works behind PgBouncer in transaction
    /// mode too (no lock session is opened).
    async fn prepare_transaction_fencing(&self) -> Result<(), LockError> {
        if self.inner.transaction_fencing_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let sql = &self.inner.sql;
        let mut connection = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(LockError::backend)?;
        let usable = ensure_fencing_objects(&mut connection, sql)
            .await
            .map_err(LockError::backend)?;
        if !usable {
            return Err(LockError::backend_msg(format!(
                "transaction locks need the UNLOGGED table {EPOCH_TABLE} beside the fencing \
                 sequence {}; create it beforehand as docs/postgres.md shows",
                sql.sequence
            )));
        }
        self.inner
            .transaction_fencing_ready
            .store(true, Ordering::Release);
        Ok(())
    }
}
