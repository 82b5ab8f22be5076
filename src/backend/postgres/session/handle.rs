//! The callers' side of a lock session: the command channel, and the links a guard or a waiter
//! keeps to what the session holds for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::super::sql::Statements;
use super::{Session, SessionSettings};
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
        let (sender, receiver) = mpsc::unbounded_channel();
        let session = Session::new(pool, sql, settings, sender.downgrade(), receiver);
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
        let (reply, answer) = oneshot::channel();
        let flag = flag.map(|flag| flag.id);
        let command = Command::TryLock {
            claim,
            flag,
            ttl,
            sent_at,
            reply,
        };
        ask(&self.sender, command, answer).await
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    /// `None` if a release of the key was in progress (the key is likely free: try again).
    pub(crate) async fn set_flag(&self, key: i64) -> Result<Option<WaitFlag>, LockError> {
        let (reply, answer) = oneshot::channel();
        ask(&self.sender, Command::SetFlag { key, reply }, answer).await
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        let (reply, answer) = oneshot::channel();
        ask(&self.sender, Command::IsLocked { key, reply }, answer).await
    }
}

/// Sends `command` and waits for its reply on `answer`; `None` if the session stopped first.
async fn call<T>(
    sender: &mpsc::UnboundedSender<Command>,
    command: Command,
    answer: oneshot::Receiver<T>,
) -> Option<T> {
    if sender.send(command).is_err() {
        // Failing at once, without ever awaiting anything, would let a caller retrying in a
        // loop hold its runtime's thread for ever: count it against the task's budget.
        tokio::task::coop::consume_budget().await;
    }
    answer.await.ok()
}

/// [`call`] for a caller that holds nothing on the session.
async fn ask<T>(
    sender: &mpsc::UnboundedSender<Command>,
    command: Command,
    answer: oneshot::Receiver<Result<T, LockError>>,
) -> Result<T, LockError> {
    call(sender, command, answer).await.unwrap_or_else(|| {
        Err(LockError::backend_msg(
            "the PostgreSQL lock session stopped",
        ))
    })
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
        let (reply, answer) = oneshot::channel();
        let (key, id, reply) = (self.key, self.id, Some(reply));
        let result = call(&self.sender, Command::Release { key, id, reply }, answer).await;
        self.settled.store(true, Ordering::Release);
        result.unwrap_or(Err(LockError::LockLost))
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let (reply, answer) = oneshot::channel();
        let (key, id, sent_at) = (self.key, self.id, Instant::now());
        let command = Command::Extend {
            key,
            id,
            ttl,
            sent_at,
            reply,
        };
        call(&self.sender, command, answer)
            .await
            .unwrap_or(Err(LockError::LockLost))
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let (key, id) = (self.key, self.id);
            let _ = self.sender.send(Command::Release {
                key,
                id,
                reply: None,
            });
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
            let (key, id) = (self.key, self.id);
            let _ = self.sender.send(Command::ClearFlag { key, id });
        }
    }
}

pub(super) enum Command {
    TryLock {
        claim: KeyClaim,
        flag: Option<u64>,
        ttl: Duration,
        sent_at: Instant,
        reply: oneshot::Sender<Result<TryOutcome, LockError>>,
    },
    SetFlag {
        key: i64,
        reply: oneshot::Sender<Result<Option<WaitFlag>, LockError>>,
    },
    ClearFlag {
        key: i64,
        id: u64,
    },
    Release {
        key: i64,
        id: Uuid,
        reply: Option<oneshot::Sender<Result<(), LockError>>>,
    },
    Extend {
        key: i64,
        id: Uuid,
        ttl: Duration,
        sent_at: Instant,
        reply: oneshot::Sender<Result<(), LockError>>,
    },
    IsLocked {
        key: i64,
        reply: oneshot::Sender<Result<bool, LockError>>,
    },
}
