//! The command connection: one multiplexed connection borrowed from the pool and reused, and a
//! timeout around every command.

use std::future::Future;
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
/// connection out of the pool and every later command reuses the clone. A command that fails
/// or times out drops the clone; the next command takes a fresh one from the pool.
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

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn store(&self, connection: Option<MultiplexedConnection>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
    }

    /// The shared connection, taken from the pool if there is none yet. Not timed: call it
    /// inside [`with_timeout`](Self::with_timeout).
    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection, LockError> {
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let pooled = self.pool.get().await.map_err(LockError::backend)?;
        let connection = MultiplexedConnection::clone(&pooled);
        drop(pooled);
        self.store(Some(connection.clone()));
        Ok(connection)
    }

    /// Runs `operation` with this lock's command timeout; a timeout or connection failure makes
    /// the next command start over with a fresh connection.
    pub(crate) async fn with_timeout<T>(
        &self,
        what: &'static str,
        operation: impl Future<Output = Result<T, LockError>>,
    ) -> Result<T, LockError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if matches!(error, LockError::BackendError(_)) {
                    self.store(None);
                }
                Err(error)
            }
            Err(_) => {
                self.store(None);
                tracing::warn!(what, timeout = ?self.timeout, "redis did not answer in time");
                Err(LockError::backend_msg(format!(
                    "redis did not answer the {what} command within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Runs one script on the shared connection, with the timeout.
    pub(crate) async fn script(
        &self,
        script: &LuaScript,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<i64, LockError> {
        self.with_timeout(script.name, async {
            let mut connection = self.connection().await?;
            run_script(&mut connection, script, keys, args)
                .await
                .map_err(redis_error)
        })
        .await
    }

    /// Runs one script on a given connection, with the timeout (for commands that must follow
    /// an earlier one on the same connection).
    pub(crate) async fn script_on(
        &self,
        connection: &mut MultiplexedConnection,
        script: &LuaScript,
        keys: &[&str],
        args: &[Arg<'_>],
    ) -> Result<i64, LockError> {
        self.with_timeout(script.name, async {
            run_script(connection, script, keys, args)
                .await
                .map_err(redis_error)
        })
        .await
    }
}

pub(crate) fn redis_error(error: RedisError) -> LockError {
    LockError::backend(error)
}
