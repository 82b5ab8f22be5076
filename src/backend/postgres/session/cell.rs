//! Where a session rests between commands, and who may take it.
//!
//! A caller takes the session for its own command only if it is free, connected, and nothing
//! is waiting for it on the session task ([`SessionCell::lend`]); the command then runs as a
//! [`Job`] that the caller drives and that puts the session back when it ends. Everything else
//! goes through the task, which takes the session with [`SessionCell::take`]: if a job has it,
//! the task drives that job to its end first, so no caller can keep the session from the task
//! by not polling its future.
//!
//! The session itself moves in and out of the cell. A job or task dropped while it has the
//! session (only possible when the runtime shuts down) drops the session with it: its
//! connection closes, the server frees its locks, and its guards learn they are lost.

use std::mem;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use futures_util::future::{BoxFuture, FutureExt, Shared, WeakShared};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::super::sql::Statements;
use super::handle::{Command, Link};
use super::{Session, SessionSettings};

/// A caller's command running on the session: a future that the caller and the session task
/// can both drive.
pub(super) type Job = Shared<BoxFuture<'static, ()>>;

/// What it takes to build a session.
#[derive(Clone)]
pub(crate) struct SessionParts {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Statements>,
    pub(crate) settings: SessionSettings,
}

pub(super) struct SessionCell {
    state: Mutex<CellState>,
    /// Wakes the task when housekeeping falls due earlier than it was told.
    due_changed: Notify,
    parts: SessionParts,
    link: Weak<Link>,
}

struct CellState {
    slot: Slot,
    /// Messages sent to the task and not yet finished by it.
    queued: usize,
    /// The task waits for a job to give the session back.
    task_waiting: bool,
    /// When the session next needs housekeeping (lease expiry, ping, idle close).
    due: Option<Instant>,
}

enum Slot {
    /// Resting between commands.
    Free(Box<Session>),
    /// A caller's job has it.
    Lent(WeakShared<BoxFuture<'static, ()>>),
    /// The task has it.
    WithTask,
}

impl SessionCell {
    pub(super) fn new(parts: SessionParts, link: Weak<Link>) -> Self {
        let session = Session::new(parts.clone(), link.clone());
        SessionCell {
            state: Mutex::new(CellState {
                slot: Slot::Free(Box::new(session)),
                queued: 0,
                task_waiting: false,
                due: None,
            }),
            due_changed: Notify::new(),
            parts,
            link,
        }
    }

    fn state(&self) -> MutexGuard<'_, CellState> {
        // Nothing panics while holding it; if something did, the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the session for `command` as a job that the caller drives, if the session is
    /// free, connected and nothing waits for it; otherwise gives the command back.
    pub(super) fn lend(self: &Arc<Self>, command: Command) -> Result<Job, Command> {
        let mut state = self.state();
        let available = state.queued == 0
            && !state.task_waiting
            && matches!(&state.slot, Slot::Free(session) if session.is_connected());
        if !available {
            return Err(command);
        }
        let Slot::Free(mut session) = mem::replace(&mut state.slot, Slot::WithTask) else {
            unreachable!("checked above");
        };
        let cell = Arc::clone(self);
        let job = async move {
            session.run_command(command).await;
            cell.put_back_from_job(session);
        }
        .boxed()
        .shared();
        state.slot = Slot::Lent(job.downgrade().expect("a new job has not finished"));
        Ok(job)
    }

    /// Counts a message for the task as waiting (callers stop taking the session until the
    /// task has run it) and sends it with `send`. Counted before it is sent, so that the task
    /// never finishes a message that is not counted yet.
    pub(super) fn queued<E>(&self, send: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        self.state().queued += 1;
        let sent = send();
        if sent.is_err() {
            self.finished_one();
        }
        sent
    }

    /// The task finished a message.
    pub(super) fn finished_one(&self) {
        let mut state = self.state();
        state.queued = state.queued.saturating_sub(1);
    }

    /// Takes the session for the task, first driving to its end any job that has it.
    pub(super) async fn take(&self) -> Box<Session> {
        loop {
            let job = {
                let mut state = self.state();
                match mem::replace(&mut state.slot, Slot::WithTask) {
                    Slot::Free(mut session) => {
                        state.task_waiting = false;
                        session.set_on_task(true);
                        return session;
                    }
                    Slot::Lent(weak) => match weak.upgrade() {
                        Some(job) => {
                            state.slot = Slot::Lent(weak);
                            state.task_waiting = true;
                            job
                        }
                        None => {
                            // The job was dropped unfinished, and the session with it: its
                            // connection closed and its guards were told. Start afresh.
                            state.task_waiting = false;
                            let mut session =
                                Box::new(Session::new(self.parts.clone(), self.link.clone()));
                            session.set_on_task(true);
                            return session;
                        }
                    },
                    Slot::WithTask => unreachable!("only the task takes the session"),
                }
            };
            job.await;
        }
    }

    /// The task gives the session back; housekeeping is next due when the session says.
    pub(super) fn put_back_from_task(&self, mut session: Box<Session>) {
        session.set_on_task(false);
        let mut state = self.state();
        state.due = session.next_due();
        state.slot = Slot::Free(session);
    }

    /// A job gives the session back. If it made housekeeping due earlier (a shorter lease, a
    /// newly held lock), the task is woken to re-arm its timer; a later time is not worth a
    /// wake-up (the timer fires early and the task then reads the right time).
    fn put_back_from_job(&self, session: Box<Session>) {
        let due = session.next_due();
        let mut state = self.state();
        state.slot = Slot::Free(session);
        let earlier = match (due, state.due) {
            (Some(due), Some(told)) => due < told,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if earlier {
            state.due = due;
            drop(state);
            self.due_changed.notify_one();
        }
    }

    /// When the task should next do housekeeping.
    pub(super) fn due(&self) -> Option<Instant> {
        self.state().due
    }

    /// Completes when a job moved the housekeeping time earlier.
    pub(super) async fn due_changed(&self) {
        self.due_changed.notified().await;
    }
}
