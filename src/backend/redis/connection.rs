//! The command connection: one multiplexed connection made by the pool's manager and reused,
//! with the lock's command timeout on every command, re-opened after a connection failure, a
//! failover, or a maximum age.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use bb8::Pool;
use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, RedisError};

use super::scripts::{run_script, Arg, LuaScript};
use crate::LockError;

/// Hands out the multiplexed connection every command of this lock goes over.
///
/// A `MultiplexedConnection` pipelines concurrent requests over one socket, so one is enough;
/// it is made by the pool's manager ([`Pool::dedicated_connection`]: the same URL, credentials
/// and database) but kept outside the pool, and reused by every command. Checking one out of
/// the pool per command would cost a `PING` per command (bb8 tests connections on checkout), and
/// a pooled connection could come back after a failover still pointing at the old primary.
///
/// The connection is dropped, and the next command opens a new one (resolving the URL's host
/// again, as DNS-based failover needs), when a command fails for a connection reason (I/O,
/// closed connection, timeout), when the server answers that it is not the primary that can
/// take the command (`READONLY`, `MASTERDOWN`, `LOADING`, `CLUSTERDOWN`, `MOVED`, `ASK`: a
/// failover or a resharding happened behind the address), and once it is older than
/// `max_age`, so a process follows a failover that left the old primary answering.
///
/// Timeouts: opening a connection is bounded by the command timeout, and the connection's
/// response timeout is set to it, so every command (each `EVALSHA`, and the `EVAL` after a
/// `NOSCRIPT`) fails with [`LockError::BackendError`] when Redis does not answer in
/// time.
pub(crate) struct Connections {
    pool: Pool<RedisConnectionManager>,
    current: Mutex<Option<Current>>,
    timeout: Duration,
    max_age: Duration,
    /// Whether the server's eviction policy was looked at (once, on the first connection).
    policy_checked: AtomicBool,
    /// Whether the shared connection failed since the last one was opened (the next open is
    /// a reconnect, for the metrics).
    failed_since_open: AtomicBool,
    /// Bumped whenever a connection failed or reached the wrong server, so that connections
    /// opened before (the replica-ack connections, see `acks.rs`) are not used again.
    generation: AtomicU64,
}

/// The connection in use and when it was opened.
struct Current {
    connection: MultiplexedConnection,
    opened_at: Instant,
}

impl Connections {
    pub(crate) fn new(
        pool: Pool<RedisConnectionManager>,
        timeout: Duration,
        max_age: Duration,
    ) -> Self {
        Connections {
            pool,
            current: Mutex::new(None),
            timeout,
            max_age,
            policy_checked: AtomicBool::new(false),
            failed_since_open: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Changes after every connection failure or answer from a server that is not the primary.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared connection, opened (within the command timeout) if there is none yet or it
    /// has reached its maximum age.
    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection, LockError> {
        if let Some(current) = self
            .slot()
            .as_ref()
            .filter(|current| current.opened_at.elapsed() < self.max_age)
        {
            return Ok(current.connection.clone());
        }
        let connection = self.open().await?;
        if self.failed_since_open.swap(false, Ordering::Relaxed) {
            crate::observe::reconnected("redis", "command");
        }
        *self.slot() = Some(Current {
            connection: connection.clone(),
            opened_at: Instant::now(),
        });
        Ok(connection)
    }

    /// A new connection of its own, made by the pool's manager within the command timeout,
    /// with the command timeout as its response timeout.
    pub(crate) async fn open(&self) -> Result<MultiplexedConnection, LockError> {
        let opened = tokio::time::timeout(self.timeout, self.pool.dedicated_connection()).await;
        let mut connection = match opened {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(LockError::backend(error)),
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "no redis connection within the command timeout");
                return Err(LockError::backend_msg(format!(
                    "no redis connection within the command timeout of {:?}",
                    self.timeout
                )));
            }
        };
        connection.set_response_timeout(self.timeout);
        if !self.policy_checked.swap(true, Ordering::Relaxed) {
            warn_unless_noeviction(&mut connection).await;
        }
        Ok(connection)
    }

    /// Runs one script on the shared connection.
    pub(crate) async fn script(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<i64, LockError> {
        let mut connection = self.connection().await?;
        let (value, _sent_at) = self.script_on(&mut connection, script, keys, args).await?;
        Ok(value)
    }

    /// Runs one script on a given connection (one from [`connection`](Self::connection)), for
    /// commands that must reach Redis after an earlier one on the same connection. Returns the
    /// result and when the command that ran the script was sent.
    pub(crate) async fn script_on(
        &self,
        connection: &mut MultiplexedConnection,
        script: &LuaScript,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<(i64, Instant), LockError> {
        run_script(connection, script, keys, args)
            .await
            .map_err(|error| self.failed(script.name, error))
    }

    /// Turns a failed command's error into a [`LockError`], dropping the shared connection
    /// (and outdating every other) when the failure says the connection is broken or reaches
    /// the wrong server.
    pub(crate) fn failed(&self, what: &'static str, error: RedisError) -> LockError {
        if error.is_timeout()
            || error.is_io_error()
            || error.is_connection_dropped()
            || error.is_unrecoverable_error()
            || is_not_the_primary(&error)
        {
            tracing::debug!(what, %error, "redis connection failed or points at the wrong server; the next command reconnects");
            *self.slot() = None;
            self.failed_since_open.store(true, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        LockError::backend(error)
    }
}

/// Warns when the server may evict keys under memory pressure (`maxmemory-policy` other than
/// `noeviction`): an evicted lock key is a lock silently released, and an evicted fencing token
/// lets the clock take over early. A server that refuses `CONFIG GET` (a managed service, an ACL
/// without `+config|get`) is not checked.
async fn warn_unless_noeviction(connection: &mut MultiplexedConnection) {
    let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(connection)
        .await;
    match answer.as_deref() {
        Ok([_, policy]) if policy == "noeviction" => {}
        Ok([_, policy]) => tracing::warn!(
            policy = policy.as_str(),
            "Redis may evict lock keys under memory pressure (maxmemory-policy is not \
             noeviction): an evicted lock is released without its holder knowing"
        ),
        Ok(_) => {}
        Err(error) => {
            tracing::debug!(%error, "could not read the Redis maxmemory-policy; not checked")
        }
    }
}

/// The server behind the address is not (or not yet) the primary that takes this command: a
/// replica after a failover, a node still loading its data, a cluster that moved the slot.
fn is_not_the_primary(error: &RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, BusyLoading, ClusterDown, MasterDown, Moved, ReadOnly};
    matches!(
        error.kind(),
        ErrorKind::Server(ReadOnly | MasterDown | BusyLoading | ClusterDown | Moved | Ask)
    )
}
