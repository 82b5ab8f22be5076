//! The command connection: one multiplexed connection borrowed from the pool and reused, with
//! the lock's command timeout on every command.

use std::sync::Mutex;
use std::time::Duration;

use bb8::Pool;
use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use redis::RedisError;

use super::scripts::{run_script, Arg, LuaScript};
use crate::LockError;

/// Hands out the multiplexed connection every command of this lock goes over.
///
/// bb8-redis pools `MultiplexedConnection`s, which are cheap handles that pipeline concurrent
/// requests over one socket. Checking one out of the pool per command would cost a `PING` per
/// command (bb8 tests connections on checkout by default), so the first command clones a
/// connection out of the pool and later commands reuse the clone. A command that fails for a
/// connection reason (I/O, closed connection, timeout) drops the clone; the next command takes
/// a fresh one from the pool.
///
/// Timeouts: taking a connection from the pool is bounded by the command timeout, and the
/// clone's response timeout is set to it, so every command (each `EVALSHA`, and the
/// `SCRIPT LOAD` after a `NOSCRIPT`) fails with [`LockError::BackendError`] when Redis does not
/// answer in time.
pub(crate) struct Connections {
    pool: Pool<RedisConnectionManager>,
    current: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl Connections {
    pub(crate) fn new(pool: Pool<RedisConnectionManager>, timeout: Duration) -> Self {
        Connections {
            pool,
            current: Mutex::new(None),
            timeout,
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared connection, taken from the pool (within the command timeout) if there is
    /// none yet.
    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection, LockError> {
        if let Some(connection) = self.slot().as_ref() {
            return Ok(connection.clone());
        }
        let pooled = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(pooled)) => pooled,
            // The redis client's own error, not bb8's wrapper (which would show it twice).
            Ok(Err(bb8::RunError::User(error))) => return Err(LockError::backend(error)),
            Ok(Err(error)) => return Err(LockError::backend(error)),
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "no redis connection within the command timeout");
                return Err(LockError::backend_msg(format!(
                    "no redis connection within the command timeout of {:?}",
                    self.timeout
                )));
            }
        };
        let mut connection = MultiplexedConnection::clone(&pooled);
        drop(pooled);
        connection.set_response_timeout(self.timeout);
        *self.slot() = Some(connection.clone());
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
        self.script_on(&mut connection, script, keys, args).await
    }

    /// Runs one script on a given connection (one from [`connection`](Self::connection)), for
    /// commands that must reach Redis after an earlier one on the same connection.
    pub(crate) async fn script_on(
        &self,
        connection: &mut MultiplexedConnection,
        script: &LuaScript,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<i64, LockError> {
        run_script(connection, script, keys, args)
            .await
            .map_err(|error| self.failed(script.name, error))
    }

    fn failed(&self, what: &'static str, error: RedisError) -> LockError {
        if error.is_timeout()
            || error.is_io_error()
            || error.is_connection_dropped()
            || error.is_unrecoverable_error()
        {
            tracing::debug!(what, %error, "redis connection failed; the next command reconnects");
            *self.slot() = None;
        }
        LockError::backend(error)
    }
}
