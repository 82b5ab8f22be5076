//! The callers' side of a lock session: the command channel, and the links a guard or a
//! waiter keeps to what the session holds for it.

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

/// The caller's side of a session.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl SessionHandle {
    /// Starts the session task. It opens its connection on first use.
    pub(crate) fn spawn(pool: PgPool, sql: Arc<Statements>, settings: SessionSettings) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let session = Session::new(pool, sql, settings, commands.downgrade(), receiver);
        tokio::spawn(session.run());
        SessionHandle { commands }
    }

    /// Tries to take the claimed key on this session, with a lease of `ttl` from `sent_at`.
    /// With `flag`, a successful attempt also drops that waiter flag.
    pub(crate) async fn try_lock(
        &self,
        claim: KeyClaim,
        flag: Option<&WaitFlag>,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<TryOutcome, LockError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::TryLock {
            claim,
            flag: flag.map(|flag| flag.id),
            ttl,
            sent_at,
            reply,
        })?;
        answer.await.unwrap_or_else(|_| Err(session_stopped()))
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    pub(crate) async fn set_flag(&self, key: i64) -> Result<WaitFlag, LockError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetFlag { key, reply })?;
        answer.await.unwrap_or_else(|_| Err(session_stopped()))
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::IsLocked { key, reply })?;
        answer.await.unwrap_or_else(|_| Err(session_stopped()))
    }

    fn send(&self, command: Command) -> Result<(), LockError> {
        self.commands.send(command).map_err(|_| session_stopped())
    }
}

fn session_stopped() -> LockError {
    LockError::backend_msg("the PostgreSQL lock session stopped")
}

/// The guard's link to its lock on the session. Dropping it releases the lock (in the
/// background, without needing a runtime: it only queues a command).
pub(crate) struct HeldLockRef {
    pub(super) commands: mpsc::UnboundedSender<Command>,
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

    pub(crate) async fn release(&self) -> Result<(), LockError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Release {
            key: self.key,
            id: self.id,
            reply: Some(reply),
        };
        if self.commands.send(command).is_err() {
            // The session is gone, and its connection with it: so is the lock.
            self.settled.store(true, Ordering::Release);
            return Err(LockError::LockLost);
        }
        // The session answers Ok or LockLost: a failed unlock closes the session, which frees
        // the lock. Either way nothing is left to release.
        let result = answer.await.unwrap_or(Err(LockError::LockLost));
        self.settled.store(true, Ordering::Release);
        result
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Extend {
            key: self.key,
            id: self.id,
            ttl,
            sent_at: Instant::now(),
            reply,
        };
        if self.commands.send(command).is_err() {
            return Err(LockError::LockLost);
        }
        answer.await.unwrap_or(Err(LockError::LockLost))
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let _ = self.commands.send(Command::Release {
                key: self.key,
                id: self.id,
                reply: None,
            });
        }
    }
}

/// "A task of this process waits for this key": a shared advisory lock in the two-integer key
/// space, which a release elsewhere tests to decide whether to `pg_notify`. Dropping it clears
/// the flag.
pub(crate) struct WaitFlag {
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) key: i64,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for WaitFlag {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::ClearFlag {
                key: self.key,
                id: self.id,
            });
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
        reply: oneshot::Sender<Result<WaitFlag, LockError>>,
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
