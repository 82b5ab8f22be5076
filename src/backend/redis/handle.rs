//! One granted (or being-acquired) lock: release, extend and abandon by token.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use tokio::task::AbortHandle;
use uuid::Uuid;

use super::keys::LockKeys;
use super::scripts::{Arg, ABANDON, EXTEND, RELEASE};
use super::Shared;
use crate::{LockError, LockHandle};

/// A token's claim on one key: what release, extend and the watchdog act on.
pub(crate) struct LockRef {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: Arc<str>,
    pub(crate) keys: LockKeys,
    pub(crate) token: Uuid,
}

/// The textual token as stored in Redis: a hyphenated lower-case UUID.
pub(crate) fn token_text<'b>(token: &Uuid, buffer: &'b mut [u8; 36]) -> &'b str {
    token.hyphenated().encode_lower(buffer)
}

/// Milliseconds for a `PX`/`PEXPIRE` argument: at least 1.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl LockRef {
    /// The keys and arguments of the release and abandon scripts, which take the same ones.
    fn release_input<'a>(&'a self, buffer: &'a mut [u8; 36]) -> ([&'a str; 3], [Arg<'a>; 2]) {
        let keys = [
            self.keys.lock.as_str(),
            self.keys.queue.as_str(),
            self.keys.waiters.as_str(),
        ];
        let token = token_text(&self.token, buffer);
        (keys, [Arg::Text(token), Arg::Text(&self.keys.channel)])
    }

    pub(crate) async fn release(&self) -> Result<(), LockError> {
        let mut buffer = [0u8; 36];
        let (keys, args) = self.release_input(&mut buffer);
        match self
            .shared
            .connections
            .script(&RELEASE, &keys, &args)
            .await?
        {
            1 => Ok(()),
            _ => Err(LockError::LockLost),
        }
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let mut buffer = [0u8; 36];
        let token = token_text(&self.token, &mut buffer);
        let args = [Arg::Text(token), Arg::Number(millis(ttl))];
        match self
            .shared
            .connections
            .script(&EXTEND, &[self.keys.lock.as_str()], &args)
            .await?
        {
            1 => Ok(()),
            _ => Err(LockError::LockLost),
        }
    }

    /// Leaves the queue and frees the lock if an interrupted acquire took it. Sent on
    /// `connection`, the one the interrupted acquire used, so that Redis runs this after it.
    pub(crate) async fn abandon(
        &self,
        mut connection: MultiplexedConnection,
    ) -> Result<bool, LockError> {
        let mut buffer = [0u8; 36];
        let (keys, args) = self.release_input(&mut buffer);
        let released = self
            .shared
            .connections
            .script_on(&mut connection, &ABANDON, &keys, &args)
            .await?;
        Ok(released == 1)
    }
}

/// The [`LockHandle`] behind every Redis [`LockGuard`](crate::LockGuard).
pub(crate) struct RedisHandle {
    pub(crate) lock: Arc<LockRef>,
    pub(crate) watchdog: Option<AbortHandle>,
}

impl RedisHandle {
    fn stop_watchdog(&self) {
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
    }
}

impl LockHandle for RedisHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        self.stop_watchdog();
        Box::pin(self.lock.release())
    }

    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(self.lock.extend(ttl))
    }
}

impl Drop for RedisHandle {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}
