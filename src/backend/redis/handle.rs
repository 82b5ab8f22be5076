//! One granted (or being-acquired) lock: release, extend and abandon by token.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use tokio::task::{AbortHandle, JoinHandle};
use uuid::Uuid;

use tokio::time::Instant;

use super::keys::LockKeys;
use super::scripts::{Arg, ABANDON, EXTEND, HAND_OVER, PERMIT_ABANDON, PERMIT_RELEASE, RELEASE};
use super::{RedisClaim, Shared};
use crate::observe::ShownKey;
use crate::{KeyVisibility, Lease, LockError, LockHandle, LockMode};

/// A token's claim on one key: what release, extend and the watchdog act on.
pub(crate) struct LockRef {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: Arc<str>,
    pub(crate) keys: Arc<LockKeys>,
    pub(crate) token: Token,
}

/// A holder's or waiter's token: a random id, and the side of the key it is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    pub(crate) id: Uuid,
    pub(crate) mode: LockMode,
}

/// Room for the longest token text: `s:` and a hyphenated UUID.
pub(crate) type TokenBuffer = [u8; 38];

impl Token {
    pub(crate) fn new(mode: LockMode) -> Self {
        Token {
            id: Uuid::new_v4(),
            mode,
        }
    }

    /// The token as stored in Redis: the hyphenated lower-case UUID, after `s:` for the shared
    /// side (the scripts tell the sides apart by that prefix).
    pub(crate) fn text<'b>(&self, buffer: &'b mut TokenBuffer) -> &'b str {
        let (prefix, id) = match self.mode {
            LockMode::Exclusive => (0, &mut buffer[..36]),
            LockMode::Shared => {
                buffer[..2].copy_from_slice(b"s:");
                (2, &mut buffer[2..])
            }
        };
        let len = self.id.hyphenated().encode_lower(id).len();
        std::str::from_utf8(&buffer[..prefix + len]).expect("ASCII")
    }
}

impl LockRef {
    /// The key as log events show it.
    pub(crate) fn shown_key(&self) -> ShownKey<'_> {
        self.shared.config.get_trace_keys().show(&self.key)
    }
}

/// What the hand-over script did with a released lock.
enum HandedOver {
    /// It holds the lock for the next holder's token, with this fencing token.
    Passed { fence: u64, sent_at: Instant },
    /// Waiters of other processes came first: it released the lock to them.
    Released,
}

/// Milliseconds for a `PX`/`PEXPIRE` argument: at least 1.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl LockRef {
    /// The arguments of the release and abandon scripts of either kind, which take the same
    /// ones.
    fn release_args<'a>(&'a self, buffer: &'a mut TokenBuffer) -> [Arg<'a>; 2] {
        let token = self.token.text(buffer);
        [Arg::Text(token), Arg::Text(self.keys.channel())]
    }

    pub(crate) async fn release(&self) -> Result<(), LockError> {
        let mut buffer = [0u8; 38];
        let args = self.release_args(&mut buffer);
        let connections = &self.shared.connections;
        let released = match &*self.keys {
            LockKeys::Lock(names) => {
                connections
                    .script(&RELEASE, &names.freeing(), &args)
                    .await?
            }
            LockKeys::Permits(names) => {
                connections
                    .script(&PERMIT_RELEASE, &names.freeing(), &args)
                    .await?
            }
        };
        match released {
            1 => Ok(()),
            _ => Err(LockError::LockLost),
        }
    }

    /// Releases the lock and takes it for `next` in the same command, unless waiters in the
    /// Redis line come first (then it only releases).
    async fn hand_over(
        &self,
        next: Token,
        connection: &mut MultiplexedConnection,
    ) -> Result<HandedOver, LockError> {
        let LockKeys::Lock(names) = &*self.keys else {
            unreachable!("only exclusive locks are handed over; permits never are")
        };
        let shared = &self.shared;
        let (mut holder, mut successor) = ([0u8; 38], [0u8; 38]);
        let keys = names.taking();
        let args = [
            Arg::Text(self.token.text(&mut holder)),
            Arg::Text(next.text(&mut successor)),
            Arg::Number(millis(shared.config.get_ttl())),
            Arg::Number(millis(shared.fence_retention)),
            Arg::Text(&names.channel),
        ];
        let (outcome, sent_at) = shared
            .connections
            .script_on(connection, &HAND_OVER, &keys, &args)
            .await?;
        match outcome {
            fence if fence > 0 => Ok(HandedOver::Passed {
                fence: fence as u64,
                sent_at,
            }),
            0 => Ok(HandedOver::Released),
            _ => Err(LockError::LockLost),
        }
    }

    /// Renews the lock for `ttl`. With replica acknowledgement on, a renewal that the
    /// replicas did not acknowledge in time is [`LockError::BackendError`], and the lock is
    /// kept: the renewal did reach the primary, which holds the lock for `ttl` more, but a
    /// failover may lose it. The caller's lease is then not renewed (the guard keeps its
    /// earlier deadline, the watchdog retries within it).
    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let mut buffer = [0u8; 38];
        let token = self.token.text(&mut buffer);
        let args = [Arg::Text(token), Arg::Number(millis(ttl))];
        let keys = self.keys.extending();
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

    /// Leaves the queue and frees the lock (or the permit) if an interrupted acquire took it.
    /// Sent on `connection`, the one the interrupted acquire used, so that Redis runs this
    /// after it.
    pub(crate) async fn abandon(
        &self,
        mut connection: MultiplexedConnection,
    ) -> Result<bool, LockError> {
        let mut buffer = [0u8; 38];
        let args = self.release_args(&mut buffer);
        let connections = &self.shared.connections;
        let (released, _sent_at) = match &*self.keys {
            LockKeys::Lock(names) => {
                connections
                    .script_on(&mut connection, &ABANDON, &names.freeing(), &args)
                    .await?
            }
            LockKeys::Permits(names) => {
                connections
                    .script_on(&mut connection, &PERMIT_ABANDON, &names.freeing(), &args)
                    .await?
            }
        };
        Ok(released == 1)
    }
}

/// A lock the previous holder took in Redis for the next task of its lock object as it
/// released its own (the hand-over script), riding on the key's claim to that task. Released
/// in the background if no task takes it.
pub(crate) struct Grant {
    lock: Option<LockRef>,
    fence: u64,
    sent_at: Instant,
}

impl Grant {
    /// The lock, its fencing token and when the command that took it was sent.
    pub(crate) fn into_parts(mut self) -> (LockRef, u64, Instant) {
        let lock = self
            .lock
            .take()
            .expect("a grant holds its lock until taken");
        (lock, self.fence, self.sent_at)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            release_in_background(lock, "a lock handed over to a task that left");
        }
    }
}

/// Releases `lock` in a task on the current runtime (see [`in_background`]); returns the task,
/// for a caller that waits for it.
pub(crate) fn release_in_background(lock: LockRef, what: &'static str) -> Option<JoinHandle<()>> {
    let pending = PendingRelease::of(&lock, what);
    in_background(pending, async move { lock.release().await })
}

/// Takes `lock`'s token out of the key's lock and line on `connection` (the one its last
/// command went on, so that Redis runs this after it), in a task on the current runtime (see
/// [`in_background`]).
pub(crate) fn abandon_in_background(
    lock: LockRef,
    connection: MultiplexedConnection,
    what: &'static str,
) -> Option<JoinHandle<()>> {
    let pending = PendingRelease::of(&lock, what);
    in_background(pending, async move {
        if lock.abandon(connection).await? {
            tracing::debug!(key = %lock.shown_key(), "freed {what}");
        }
        Ok(())
    })
}

/// Runs `release`, which frees the lock of `key` (`what` says which), in a task on the current
/// runtime: best effort, a lock it could not free expires at its TTL. When the release cannot
/// run at all (no runtime, or its runtime shuts down before the task runs), a warning names
/// the key: nothing in the process can send the command any more.
fn in_background(
    pending: PendingRelease,
    release: impl Future<Output = Result<(), LockError>> + Send + 'static,
) -> Option<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?; // `pending` warns
    Some(runtime.spawn(async move {
        // The whole struct moves into the task, so it is dropped with the task.
        let mut pending = pending;
        if let Err(error) = release.await {
            tracing::debug!(
                key = %pending.keys.show(&pending.key),
                error = &error as &dyn std::error::Error,
                "could not release {}; it expires at its TTL",
                pending.what
            );
        }
        pending.done = true;
    }))
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

    /// Whether another task of this lock object waits for the key, and this guard still has
    /// the turn to pass.
    fn has_successor(&self) -> bool {
        self.claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(RedisClaim::has_successor)
    }

    /// The turn itself, for a task that passes it on after its caller may have left.
    fn shared(&self) -> Arc<Mutex<Option<RedisClaim>>> {
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
        Arc::clone(&self.claim)
    }
}

/// Passes the turn on with a lock taken for the next task (released if nobody takes it).
fn pass_with(claim: &Mutex<Option<RedisClaim>>, grant: Grant) {
    let claim = claim.lock().unwrap_or_else(PoisonError::into_inner).take();
    match claim {
        Some(claim) => claim.pass_with(grant),
        None => drop(grant),
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

    /// Releases the lock and passes the key's turn on. When another task of this lock object
    /// waits for the key, the same command takes the lock for it (one round trip instead of a
    /// release and an acquire), unless waiters of other processes are in line first. With
    /// replica acknowledgement on, the next task acquires for itself (its `WAIT` included).
    async fn release_and_pass_on(&self) -> Result<(), LockError> {
        let result = if self.lock.shared.replica_acks.is_none()
            && self.lock.token.mode == LockMode::Exclusive
            && self.claim.has_successor()
        {
            // In a task of its own: once the command is sent, only its answer says who holds
            // the lock, and a caller that leaves meanwhile must not lose it.
            let (lock, claim) = (Arc::clone(&self.lock), self.claim.shared());
            match tokio::spawn(async move { hand_over(&lock, &claim).await }).await {
                Ok(Some(result)) => result,
                Ok(None) => return Ok(()), // passed over with the turn
                Err(_) => Err(LockError::backend_msg("the hand-over task was cancelled")),
            }
        } else {
            self.lock.release().await
        };
        // Released, or no longer this token's: the next task of this process may go. After
        // a backend error the lock may still be held; the background release that follows
        // passes the turn on when it is done.
        if !matches!(result, Err(LockError::BackendError(_))) {
            self.claim.pass_on();
        }
        result
    }
}

/// Runs the hand-over script for a fresh token and, when the lock passed, hands it with the
/// turn to the next task (`None`). Otherwise the holder's release result: the lock was released
/// to the waiters in the Redis line (`Ok`), was no longer the holder's (`LockLost`), or the
/// command failed (then the lock may have passed to the fresh token, which is released in the
/// background, token-checked, in case it did).
async fn hand_over(
    lock: &LockRef,
    claim: &Mutex<Option<RedisClaim>>,
) -> Option<Result<(), LockError>> {
    let next = LockRef {
        shared: Arc::clone(&lock.shared),
        key: Arc::clone(&lock.key),
        keys: Arc::clone(&lock.keys),
        token: Token::new(LockMode::Exclusive),
    };
    let mut connection = match lock.shared.connections.connection().await {
        Ok(connection) => connection,
        Err(error) => return Some(Err(error)),
    };
    match lock.hand_over(next.token, &mut connection).await {
        Ok(HandedOver::Passed { fence, sent_at }) => {
            let grant = Grant {
                lock: Some(next),
                fence,
                sent_at,
            };
            pass_with(claim, grant);
            None
        }
        Ok(HandedOver::Released) => Some(Ok(())),
        Err(error) => {
            if matches!(error, LockError::BackendError(_)) {
                // The script may still run: the clean-up goes on the same connection, so that
                // Redis runs it afterwards (token-checked, it frees only the fresh token).
                abandon_in_background(
                    next,
                    connection,
                    "a lock the failed hand-over may have taken",
                );
            }
            Some(Err(error))
        }
    }
}

impl LockHandle for RedisHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        self.stop_watchdog();
        Box::pin(self.release_and_pass_on())
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
        let pending = PendingRelease::of(&self.lock, "a dropped lock guard");
        in_background(pending, async move { self.release_and_pass_on().await });
    }
}

/// Armed while a background release has not finished; warns if its task is dropped before
/// that (its runtime shut down, or was shutting down when it was spawned) or there was no
/// runtime to spawn it on.
struct PendingRelease {
    key: Arc<str>,
    keys: KeyVisibility,
    ttl: Duration,
    what: &'static str,
    done: bool,
}

impl PendingRelease {
    /// The pending release of `lock` (`what` says which lock it is, for the logs).
    fn of(lock: &LockRef, what: &'static str) -> Self {
        PendingRelease {
            key: Arc::clone(&lock.key),
            keys: lock.shared.config.get_trace_keys(),
            ttl: lock.shared.config.get_ttl(),
            what,
            done: false,
        }
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                key = %self.keys.show(&self.key),
                ttl = ?self.ttl,
                "the release of {} did not run (no runtime, or its runtime is shutting down): \
                 the lock stays until its TTL runs out",
                self.what
            );
        }
    }
}

impl Drop for RedisHandle {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}
