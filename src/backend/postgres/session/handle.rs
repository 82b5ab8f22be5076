//! The callers' side of a lock session: running a command (on the caller's own task when the
//! session is free, otherwise by the session task), and the links a guard or a waiter keeps to
//! what the session holds for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::cell::{Job, SessionCell, SessionParts};
use super::task::{self, Message};
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

/// The caller's side of a session. Its clones (in the lock service, guards and waiter flags)
/// keep the session task running; when the last one goes, the task closes the connection.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    link: Arc<Link>,
}

/// What every handle of one session shares.
pub(super) struct Link {
    /// To the session task.
    messages: mpsc::UnboundedSender<Message>,
    /// Where the session rests between commands. Weak: the task owns it, so that the session
    /// (and its connection) goes when the task goes, even if handles live on (a runtime shut
    /// down under a lock service that outlives it).
    cell: Weak<SessionCell>,
}

impl Link {
    /// Sends `message` to the task, counted as waiting for the session (callers do not take the
    /// session themselves while it waits). Fails only if the task is gone.
    fn send(&self, message: Message) -> Result<(), LockError> {
        let Some(cell) = self.cell.upgrade() else {
            return Err(session_stopped());
        };
        cell.queued(|| self.messages.send(message))
            .map_err(|_| session_stopped())
    }
}

impl SessionHandle {
    /// Starts the session task. The session opens its connection on first use, on that task.
    pub(crate) fn spawn(parts: SessionParts) -> Self {
        let (messages, receiver) = mpsc::unbounded_channel();
        let mut link = None;
        let cell = Arc::new_cyclic(|cell| {
            let shared = Arc::new(Link {
                messages,
                cell: cell.clone(),
            });
            let weak = Arc::downgrade(&shared);
            link = Some(shared);
            SessionCell::new(parts, weak)
        });
        tokio::spawn(task::run(cell, receiver));
        SessionHandle {
            link: link.expect("set while building the cell"),
        }
    }

    /// The handle of `link`, for a session that builds a guard or a flag; `None` once every
    /// handle is gone.
    pub(super) fn upgrade(link: &Weak<Link>) -> Option<Self> {
        link.upgrade().map(|link| SessionHandle { link })
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
        .await;
        answered(answer).await
    }

    /// Marks the key as awaited by this process, so that releases elsewhere `pg_notify` it.
    pub(crate) async fn set_flag(&self, key: i64) -> Result<WaitFlag, LockError> {
        let (reply, answer) = oneshot::channel();
        self.execute(Command::SetFlag { key, reply }).await;
        answered(answer).await
    }

    /// Whether any session (of any process) holds the key.
    pub(crate) async fn is_locked(&self, key: i64) -> Result<bool, LockError> {
        let (reply, answer) = oneshot::channel();
        self.execute(Command::IsLocked { key, reply }).await;
        answered(answer).await
    }

    /// Runs `command`: on the caller's task if the session is free, connected and nothing is
    /// waiting for it (one round trip, no hand-off between tasks), otherwise on the session
    /// task. Its answer is in the command's reply channel. A command the caller started always
    /// runs to completion: if the caller goes away first, the rest moves to the session task,
    /// which finishes it and undoes what the caller no longer wants (its reply channel is then
    /// closed).
    async fn execute(&self, command: Command) {
        let command = match self.link.cell.upgrade() {
            Some(cell) => match cell.lend(command) {
                Ok(job) => {
                    return FinishOnDrop {
                        job: Some(job),
                        link: &self.link,
                    }
                    .await
                }
                Err(command) => command,
            },
            None => command,
        };
        // Returns once the task has put the session back, not just answered, so that the
        // caller's next command finds the session free. On failure the command (and its reply
        // channel) is dropped: the answer says so.
        let (finished, task_done) = oneshot::channel();
        if self
            .link
            .send(Message::Run {
                command,
                finished: Some(finished),
            })
            .is_ok()
        {
            let _ = task_done.await;
        }
    }

    /// Queues `command` for the session task, for callers that cannot wait (drops).
    fn queue(&self, command: Command) -> Result<(), LockError> {
        self.link.send(Message::Run {
            command,
            finished: None,
        })
    }
}

async fn answered<T>(answer: oneshot::Receiver<Result<T, LockError>>) -> Result<T, LockError> {
    answer.await.unwrap_or_else(|_| Err(session_stopped()))
}

fn session_stopped() -> LockError {
    LockError::backend_msg("the PostgreSQL lock session stopped")
}

/// Drives a caller's command on the caller's task; dropped before it finished, it hands the
/// rest to the session task instead of abandoning a statement half-way.
///
/// The command is a shared future: the session task can drive it too. It does so whenever it
/// needs the session while the command has it, so a caller future that is polled once and then
/// kept without being polled does not hold up the session's other work (other callers, lease
/// expiry).
struct FinishOnDrop<'a> {
    job: Option<Job>,
    link: &'a Link,
}

impl Future for FinishOnDrop<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(job) = self.job.as_mut() else {
            return Poll::Ready(());
        };
        match Pin::new(job).poll(cx) {
            Poll::Ready(()) => {
                self.job = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            if job.peek().is_none() {
                // If the task is gone too (runtime shutdown), the job is dropped here, and the
                // session and its connection with it: the server frees the locks.
                let _ = self.link.send(Message::Finish(job));
            }
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
        let (reply, answer) = oneshot::channel();
        self.session
            .execute(Command::Release {
                key: self.key,
                id: self.id,
                reply: Some(reply),
            })
            .await;
        // The session answers Ok or LockLost: a failed unlock closes the session, which frees
        // the lock. If the session is gone, its connection went with it, and so did the lock.
        // Either way nothing is left to release.
        let result = answer.await.unwrap_or(Err(LockError::LockLost));
        self.settled.store(true, Ordering::Release);
        result
    }

    pub(crate) async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let (reply, answer) = oneshot::channel();
        self.session
            .execute(Command::Extend {
                key: self.key,
                id: self.id,
                ttl,
                sent_at: Instant::now(),
                reply,
            })
            .await;
        answer.await.unwrap_or(Err(LockError::LockLost))
    }
}

impl Drop for HeldLockRef {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let _ = self.session.queue(Command::Release {
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
            let _ = self.session.queue(Command::ClearFlag {
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
