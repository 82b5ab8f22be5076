//! The callers' side of a lock session: the command channel (whose callers drive the session
//! while they wait, see [`drive`](super::drive)), and the links a guard or a waiter keeps to
//! what the session holds for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::super::sql::Statements;
use super::drive::{SessionCell, SessionLink};
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

/// The command channel of a session, with the link that lets a waiting caller drive it.
#[derive(Clone)]
pub(crate) struct Commands {
    sender: mpsc::UnboundedSender<Command>,
    link: SessionLink,
}

impl Commands {
    pub(super) fn new(sender: mpsc::UnboundedSender<Command>, link: SessionLink) -> Self {
        Commands { sender, link }
    }

    /// Sends `command` and waits for its reply on `answer`, driving the session meanwhile.
    /// `None` if the session stopped first.
    async fn call<T>(&self, command: Command, answer: oneshot::Receiver<T>) -> Option<T> {
        self.link.before_call();
        if self.sender.send(command).is_err() {
            // The session is gone: failing at once, without ever awaiting anything, would let
            // a caller retrying in a loop hold its runtime's thread for ever (even through the
            // runtime's shutdown). Count it against the task's budget, as a channel would.
            tokio::task::coop::consume_budget().await;
            return None;
        }
        self.link.reply(answer).await.ok()
    }

    /// Sends a command that nobody waits for; the session task runs it.
    fn send_detached(&self, command: Command) {
        if self.sender.send(command).is_ok() {
            self.link.wake_task();
        }
    }
}

/// The caller's side of a session.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    commands: Commands,
}

impl SessionHandle {
    /// Starts the session task. It opens its connection on first use.
    pub(crate) fn spawn(pool: PgPool, sql: Arc<Statements>, settings: SessionSettings) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        let weak_sender = sender.downgrade();
        let (link, task) = SessionCell::with_session(|router, link| {
            Session::new(pool, sql, settings, weak_sender, link, router, receiver).run()
        });
        tokio::spawn(task);
        SessionHandle {
            commands: Commands::new(sender, link),
        }
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
        let command = Command::TryLock {
            claim,
            flag: flag.map(|flag| flag.id),
            ttl,
            sent_at,
            reply,
        };
        self.call(command, answer).await
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    /// `None` if a release of the key was in progress (the key is likely free: try again).
    pub(crate) async fn set_flag(&self, key: i64) -> Result<Option<WaitFlag>, LockError> {
        let (reply, answer) = oneshot::channel();
        self.call(Command::SetFlag { key, reply }, answer).await
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        let (reply, answer) = oneshot::channel();
        self.call(Command::IsLocked { key, reply }, answer).await
    }

    async fn call<T>(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<T, LockError>>,
    ) -> Result<T, LockError> {
        self.commands
            .call(command, answer)
            .await
            .unwrap_or_else(|| Err(session_stopped()))
    }
}

fn session_stopped() -> LockError {
    LockError::backend_msg("the PostgreSQL lock session stopped")
}

/// The guard's link to its lock on the session. Dropping it releases the lock (in the
/// background, without needing a runtime: it only queues a command).
pub(crate) struct HeldLockRef {
    pub(super) commands: Commands,
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
        // The session answers Ok or LockLost: a failed unlock closes the session, which frees
        // the lock. Either way nothing is left to release. A session that is gone took its
        // connection with it: so is the lock.
        let result = self
            .commands
            .call(command, answer)
            .await
            .unwrap_or(Err(LockError::LockLost));
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
        self.commands
            .call(command, answer)
            .await
            .unwrap_or(Err(LockError::LockLost))
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            self.commands.send_detached(Command::Release {
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
    pub(super) commands: Commands,
    pub(super) key: i64,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for WaitFlag {
    fn drop(&mut self) {
        if self.armed {
            self.commands.send_detached(Command::ClearFlag {
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
