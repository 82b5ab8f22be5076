//! One granted (or being-acquired) lock: release, extend and abandon by token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use tokio::task::AbortHandle;
use uuid::Uuid;

use super::keys::LockKeys;
use super::scripts::{Arg, ABANDON, EXTEND, RELEASE};
use super::{RedisClaim, Shared};
use crate::{Lease, LockError, LockHandle};

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

    /// Renews the lock for `ttl`. With replica acknowledgement on, a renewal that the
    /// replicas did not acknowledge in time is [`LockError::BackendError`], and the lock is
    /// kept: the renewal did reach the primary, which holds the lock for `ttl` more, but a
    /// failover may lose it. The caller's lease is then not renewed (the guard keeps its
    /// earlier deadline, the watchdog retries within it).
    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let mut buffer = [0u8; 36];
        let token = token_text(&self.token, &mut buffer);
        let args = [Arg::Text(token), Arg::Number(millis(ttl))];
        let keys = [self.keys.lock.as_str()];
        let connections = &self.shared.connections;
        let renewed = match &self.shared.replica_acks {
            None => connections.script(&EXTEND, &keys, &args).await?,
            Some(acks) => {
                // The script and its `WAIT` on a connection of their own (see `acks.rs`).
                let mut exclusive = acks.take(connections).await?;
                let (renewed, _sent_at) = connections
                    .script_on(&mut exclusive.connection, &EXTEND, &keys, &args)
                    .await?;
                if renewed == 1 {
                    acks.wait(
                        connections,
                        exclusive,
                        "the lock stays renewed on the primary, but may not survive a failover",
                    )
                    .await?;
                } else {
                    acks.give_back(connections, exclusive);
                }
                renewed
            }
        };
        match renewed {
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
        let (released, _sent_at) = self
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
    /// The key's turn among the tasks of the lock object.
    pub(crate) claim: HeldClaim,
}

/// A guard's turn on its key among the tasks of its lock object: passed on once the lock is
/// released, when the handle goes (after a background release), or as soon as the lease is
/// lost. A guard kept past its TTL (a hung handler, a forgotten guard) must not keep the other
/// tasks of this process off a key that Redis has freed for everyone else.
pub(crate) struct HeldClaim {
    claim: Arc<Mutex<Option<RedisClaim>>>,
    /// Waits for the lease to be lost, then passes the turn on.
    keeper: Option<AbortHandle>,
}

impl HeldClaim {
    pub(crate) fn new(claim: Option<RedisClaim>, lease: &Arc<Lease>) -> Self {
        let claim = Arc::new(Mutex::new(claim));
        let keeper = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (claim, lost) = (Arc::clone(&claim), lease.lost());
            let keeper = async move {
                lost.await;
                pass_on(&claim);
            };
            runtime.spawn(keeper).abort_handle()
        });
        HeldClaim { claim, keeper }
    }

    fn pass_on(&self) {
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
        pass_on(&self.claim);
    }
}

fn pass_on(claim: &Mutex<Option<RedisClaim>>) {
    drop(claim.lock().unwrap_or_else(PoisonError::into_inner).take());
}

impl Drop for HeldClaim {
    fn drop(&mut self) {
        self.pass_on();
    }
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
        Box::pin(async move {
            let result = self.lock.release().await;
            // Released, or no longer this token's: the next task of this process may go. After
            // a backend error the lock may still be held; the background release that follows
            // passes the turn on when it is done.
            if !matches!(result, Err(LockError::BackendError(_))) {
                self.claim.pass_on();
            }
            result
        })
    }

    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(self.lock.extend(ttl))
    }

    /// Releases in a task on the current runtime, like the default, but says so when that
    /// task is dropped before its release went out: a guard dropped while its runtime shuts
    /// down spawns onto a runtime that runs nothing any more, and the lock then stays until its
    /// TTL. Nothing in the process can send the command at that point, so the warning is what
    /// is left.
    fn release_on_drop(self: Arc<Self>) {
        self.stop_watchdog();
        let ttl = self.lock.shared.config.get_ttl();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = ?self.lock.key,
                ?ttl,
                "lock guard dropped outside a tokio runtime: the lock stays until its TTL runs out"
            );
            return;
        };
        let pending = PendingDropRelease {
            key: Arc::clone(&self.lock.key),
            ttl,
            done: false,
        };
        runtime.spawn(async move {
            // The whole struct moves into the task (a closure would capture only the field),
            // so it is dropped with the task.
            let mut pending = pending;
            if let Err(error) = self.lock.release().await {
                tracing::debug!(
                    key = ?self.lock.key,
                    error = &error as &dyn std::error::Error,
                    "background release of a dropped lock guard failed"
                );
            }
            pending.done = true;
        });
    }
}

/// Armed while the background release of a dropped guard has not finished; warns if the task
/// is dropped before that (its runtime shut down, or was shutting down when it was spawned).
struct PendingDropRelease {
    key: Arc<str>,
    ttl: Duration,
    done: bool,
}

impl Drop for PendingDropRelease {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                key = ?self.key,
                ttl = ?self.ttl,
                "the release of a dropped lock guard did not run (its runtime is shutting down): \
                 the lock stays until its TTL runs out"
            );
        }
    }
}

impl Drop for RedisHandle {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}
