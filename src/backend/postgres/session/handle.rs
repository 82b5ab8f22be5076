//! The callers' side of a lock session: the command channel, and the links a guard or a waiter
//! keeps to what the session holds for it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::super::key_hash::AdvisoryKeyMap;
use super::super::sql::Statements;
use super::super::timing::SessionSettings;
use super::Session;
use crate::lease::ConnectionBound;
use crate::{Lease, LockError};

/// A lock taken by [`SessionHandle::try_lock`].
pub(crate) struct Granted {
    pub(crate) fencing_token: u64,
    pub(crate) lease: Arc<Lease>,
    pub(crate) lock: HeldLockRef,
}

/// What a lock attempt found.
pub(crate) enum TryOutcome {
    Granted(Granted),
    /// Another session holds the key. The caller keeps its claim, to try again.
    Busy(KeyClaim),
}

/// The caller's side of a session: sends commands to its task and waits for the replies.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    sender: mpsc::UnboundedSender<Command>,
}

impl SessionHandle {
    /// Starts the session task on the current runtime. It opens its connection on first use.
    pub(crate) fn spawn(pool: PgPool, sql: Arc<Statements>, settings: SessionSettings) -> Self {
        let (sender, commands) = mpsc::unbounded_channel();
        let session = Session {
            pool,
            sql,
            settings,
            sender: sender.downgrade(),
            commands,
            connection: None,
            held: AdvisoryKeyMap::default(),
            expiries: BTreeSet::new(),
            flags: AdvisoryKeyMap::default(),
            next_flag_id: 0,
            last_used: Instant::now(),
            idle_since: Instant::now(),
            lost_since_open: false,
            bound: ConnectionBound::new(Instant::now()),
        };
        tokio::spawn(session.run());
        SessionHandle { sender }
    }

    /// Whether the session task still runs (it ends with its runtime, or on a panic).
    pub(crate) fn is_running(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Tries to take the claimed key on this session, with a lease of `ttl` from `sent_at`.
    /// With `flag`, a successful attempt also drops that waiter flag.
    pub(crate) async fn try_lock(
        &self,
        mut claim: KeyClaim,
        flag: Option<&WaitFlag>,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<TryOutcome, LockError> {
        claim.asking_server();
        let flag = flag.map(|flag| flag.id);
        self.ask(|reply| Command::TryLock(claim, flag, ttl, sent_at, reply))
            .await
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    /// `None` if a release of the key was in progress (the key is likely free: try again).
    pub(crate) async fn set_flag(&self, key: i64) -> Result<Option<WaitFlag>, LockError> {
        self.ask(|reply| Command::SetFlag(key, reply)).await
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        self.ask(|reply| Command::IsLocked(key, reply)).await
    }

    /// Sends a command for a caller that holds nothing on the session yet.
    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, LockError> {
        let stopped = || {
            Err(LockError::backend_msg(
                "the PostgreSQL lock session stopped",
            ))
        };
        call(&self.sender, command, stopped).await
    }
}

/// Sends the command `command` builds around a reply channel and waits for the reply;
/// `if_stopped` if the session stopped first.
async fn call<T>(
    sender: &mpsc::UnboundedSender<Command>,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
    if_stopped: impl FnOnce() -> T,
) -> T {
    let (reply, answer) = oneshot::channel();
    if sender.send(command(reply)).is_err() {
        // Failing at once, without ever awaiting anything, would let a caller retrying in a
        // loop hold its runtime's thread for ever: count it against the task's budget.
        tokio::task::coop::consume_budget().await;
    }
    answer.await.unwrap_or_else(|_| if_stopped())
}

/// The guard's link to its lock on the session. Dropping it releases the lock (in the
/// background, without needing a runtime: it only queues a command).
pub(crate) struct HeldLockRef {
    pub(super) sender: mpsc::UnboundedSender<Command>,
    pub(super) key: i64,
    pub(super) id: Uuid,
    /// True once a release or loss was confirmed, so the drop has nothing left to do.
    pub(super) settled: AtomicBool,
}

impl HeldLockRef {
    /// This hold's id, also the guard's token.
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    /// The session answers Ok or LockLost: a failed unlock closes the session, which frees the
    /// lock. A session that is gone took its connection with it, and so the lock.
    pub(crate) async fn release(&self) -> Result<(), LockError> {
        let (key, id) = (self.key, self.id);
        let command = |reply| Command::Release(key, id, Some(reply));
        let result = call(&self.sender, command, || Err(LockError::LockLost)).await;
        self.settled.store(true, Ordering::Release);
        result
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let (key, id, sent_at) = (self.key, self.id, Instant::now());
        let command = |reply| Command::Extend(key, id, ttl, sent_at, reply);
        call(&self.sender, command, || Err(LockError::LockLost)).await
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let _ = self.sender.send(Command::Release(self.key, self.id, None));
        }
    }
}

/// "A task of this process waits for this key": a shared advisory lock in the two-integer key
/// space, which a release elsewhere tests to decide whether to `pg_notify`. Dropping it clears
/// the flag.
pub(crate) struct WaitFlag {
    pub(super) sender: mpsc::UnboundedSender<Command>,
    pub(super) key: i64,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for WaitFlag {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.sender.send(Command::ClearFlag(self.key, self.id));
        }
    }
}

/// Where the session answers a command.
pub(super) type Reply<T> = oneshot::Sender<Result<T, LockError>>;

/// What a caller asks of the session. Keys are advisory keys, `Uuid`s a hold's id, `u64`s a
/// waiter flag's id, `Instant`s when the caller sent the command (a lease counts from then).
pub(super) enum Command {
    /// Claim, the caller's waiter flag to drop on success, TTL, send time.
    TryLock(KeyClaim, Option<u64>, Duration, Instant, Reply<TryOutcome>),
    SetFlag(i64, Reply<Option<WaitFlag>>),
    ClearFlag(i64, u64),
    /// No reply for a guard dropped without releasing.
    Release(i64, Uuid, Option<Reply<()>>),
    /// TTL and send time of the new lease.
    Extend(i64, Uuid, Duration, Instant, Reply<()>),
    IsLocked(i64, Reply<bool>),
}
