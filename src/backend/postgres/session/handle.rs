//! The callers' side of a lock session: running a command on the caller's own task (and
//! handing it to the session task if the caller goes away), and the links a guard or a waiter
//! keeps to what the session holds for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::super::sql::Statements;
use super::task::{self, Backlog, Message, Schedule, Work};
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

/// The caller's side of a session: its state, the commands queued for it, and the channel
/// to its task.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    state: Arc<Mutex<Session>>,
    backlog: Arc<Backlog>,
    task: mpsc::UnboundedSender<Message>,
}

/// What a session keeps of its own handle, to give guards their links without keeping
/// itself alive.
pub(super) struct WeakSessionHandle {
    state: Weak<Mutex<Session>>,
    backlog: Arc<Backlog>,
    task: mpsc::WeakUnboundedSender<Message>,
}

impl WeakSessionHandle {
    /// `None` once every handle, guard and waiter is gone.
    pub(super) fn upgrade(&self) -> Option<SessionHandle> {
        Some(SessionHandle {
            state: self.state.upgrade()?,
            backlog: Arc::clone(&self.backlog),
            task: self.task.upgrade()?,
        })
    }
}

impl SessionHandle {
    /// Starts the session task. The session opens its connection on first use.
    pub(crate) fn spawn(pool: PgPool, sql: Arc<Statements>, settings: SessionSettings) -> Self {
        let (task, messages) = mpsc::unbounded_channel();
        let schedule = Arc::new(Schedule::default());
        let backlog = Arc::new(Backlog::default());
        let state = Arc::new_cyclic(|state| {
            let link = WeakSessionHandle {
                state: state.clone(),
                backlog: Arc::clone(&backlog),
                task: task.downgrade(),
            };
            Mutex::new(Session::new(
                pool,
                sql,
                settings,
                link,
                Arc::clone(&backlog),
                Arc::clone(&schedule),
            ))
        });
        tokio::spawn(task::run(Arc::clone(&state), messages, schedule));
        SessionHandle {
            state,
            backlog,
            task,
        }
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
        self.execute(Command::TryLock {
            claim,
            flag: flag.map(|flag| flag.id),
            ttl,
            sent_at,
            reply,
        })
        .await?;
        answered(answer)
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    pub(crate) async fn set_flag(&self, key: i64) -> Result<WaitFlag, LockError> {
        let (reply, answer) = oneshot::channel();
        self.execute(Command::SetFlag { key, reply }).await?;
        answered(answer)
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        let (reply, answer) = oneshot::channel();
        self.execute(Command::IsLocked { key, reply }).await?;
        answered(answer)
    }

    /// Runs `command` on the caller's task, in turn with the session's other work (after the
    /// commands queued before it). A statement always runs to completion: if the caller goes
    /// away first, the rest of the work moves to the session task, which finishes it and
    /// undoes whatever the caller no longer wants (the command's reply channel is then closed).
    ///
    /// Fails if the session task is gone (its runtime shut down): it closed the connection
    /// as it went, so the session has nothing left to work on.
    async fn execute(&self, command: Command) -> Result<(), LockError> {
        if self.task.is_closed() {
            return Err(session_stopped());
        }
        let state = Arc::clone(&self.state);
        FinishOnDrop {
            work: Some(Box::pin(async move {
                state.lock().await.handle(Some(command)).await;
                task::Done::Command
            })),
            task: &self.task,
        }
        .await;
        Ok(())
    }

    /// Queues `command` for whoever runs on the session next, for callers that cannot wait
    /// (drops): it runs before any command that starts after it.
    fn queue(&self, command: Command) {
        self.backlog.push(command);
        // Fails only when the task is gone, and the connection (and its locks) with it.
        let _ = self.task.send(Message::Backlog);
    }
}

/// The answer a command left in its reply channel before its work finished.
fn answered<T>(mut answer: oneshot::Receiver<Result<T, LockError>>) -> Result<T, LockError> {
    answer.try_recv().unwrap_or_else(|_| Err(session_stopped()))
}

fn session_stopped() -> LockError {
    LockError::backend_msg("the PostgreSQL lock session stopped")
}

/// Drives a session work item on the caller's task; dropped before it finished, it hands the
/// work to the session task instead of abandoning a statement half-way.
struct FinishOnDrop<'a> {
    work: Option<Work>,
    task: &'a mpsc::UnboundedSender<Message>,
}

impl Future for FinishOnDrop<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(work) = self.work.as_mut() else {
            return Poll::Ready(());
        };
        match work.as_mut().poll(cx) {
            Poll::Ready(_) => {
                self.work = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            // If the task is gone too (runtime shutdown), the work is dropped mid-statement;
            // the session then closes that connection before using it again.
            let _ = self.task.send(Message::Finish(work));
        }
    }
}

/// The guard's link to its lock on the session. Dropping it releases the lock (in the
/// background, without needing a runtime: it only queues a command).
pub(crate) struct HeldLockRef {
    pub(super) session: SessionHandle,
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
        let (reply, mut answer) = oneshot::channel();
        let command = Command::Release {
            key: self.key,
            id: self.id,
            reply: Some(reply),
        };
        // The session answers Ok or LockLost: a failed unlock closes the session, which frees
        // the lock; a session whose task is gone closed its connection. Either way nothing is
        // left to release.
        let result = match self.session.execute(command).await {
            Ok(()) => answer.try_recv().unwrap_or(Err(LockError::LockLost)),
            Err(_) => Err(LockError::LockLost),
        };
        self.settled.store(true, Ordering::Release);
        result
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let (reply, mut answer) = oneshot::channel();
        let command = Command::Extend {
            key: self.key,
            id: self.id,
            ttl,
            sent_at: Instant::now(),
            reply,
        };
        match self.session.execute(command).await {
            Ok(()) => answer.try_recv().unwrap_or(Err(LockError::LockLost)),
            Err(_) => Err(LockError::LockLost),
        }
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            self.session.queue(Command::Release {
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
    pub(super) session: SessionHandle,
    pub(super) key: i64,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for WaitFlag {
    fn drop(&mut self) {
        if self.armed {
            self.session.queue(Command::ClearFlag {
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
