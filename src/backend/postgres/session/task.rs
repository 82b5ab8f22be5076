//! The session task: the work nobody waits for. It finishes statements whose callers went
//! away, runs the commands of dropped guards and waiter flags, and does the housekeeping at
//! the times the session publishes (lease expiry, pings, closing an unused connection).
//!
//! Everything it runs takes the session's lock first, like the callers' own work, so work runs
//! one item at a time in arrival order. It drives all of its work items together, so an
//! abandoned statement that holds the session's lock always gets finished, whatever else the
//! task is waiting for.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::time::Instant;

use super::handle::Command;
use super::Session;

/// A unit of session work, run under the session's lock.
pub(crate) type Work = Pin<Box<dyn Future<Output = Done> + Send>>;

/// What the session task is told.
pub(crate) enum Message {
    /// Work a caller started and abandoned: finish it.
    Finish(Work),
    /// A command was queued in the backlog: run it unless a caller does first.
    Backlog,
}

/// Commands queued by drops, run in order by whoever takes the session's lock next.
#[derive(Default)]
pub(crate) struct Backlog(StdMutex<VecDeque<Command>>);

impl Backlog {
    pub(super) fn push(&self, command: Command) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(command);
    }

    pub(super) fn pop(&self) -> Option<Command> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// Which kind of work finished.
pub(crate) enum Done {
    Command,
    Housekeeping,
}

/// When the session next needs housekeeping; written by the session under its lock, read by
/// the task.
#[derive(Default)]
pub(crate) struct Schedule {
    due: StdMutex<Option<Instant>>,
    changed: Notify,
}

impl Schedule {
    /// Sets the next housekeeping time and wakes the task to re-arm its timer.
    pub(super) fn publish(&self, due: Option<Instant>) {
        *self.due.lock().unwrap_or_else(PoisonError::into_inner) = due;
        self.changed.notify_one();
    }

    fn due(&self) -> Option<Instant> {
        *self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A deadline that never comes in practice, for an idle timer: the longest duration the
/// crate accepts anywhere.
const FAR_FUTURE: Duration = crate::MAX_DURATION;

/// Runs until every handle, guard and waiter flag of the session is gone, then closes the
/// connection.
pub(super) async fn run(
    state: Arc<Mutex<Session>>,
    mut messages: mpsc::UnboundedReceiver<Message>,
    schedule: Arc<Schedule>,
) {
    // Declared first, so dropped last: after the work items, which may hold the lock.
    let _close_on_exit = CloseOnExit(Arc::clone(&state));
    let mut work: FuturesUnordered<Work> = FuturesUnordered::new();
    // One timer, kept and moved, because arming a timer costs more than it seems on a VM.
    let timer = tokio::time::sleep_until(Instant::now() + FAR_FUTURE);
    tokio::pin!(timer);
    let mut housekeeping_queued = false;
    loop {
        let due = if housekeeping_queued {
            None
        } else {
            schedule.due()
        };
        if let Some(at) = due {
            if at != timer.deadline() {
                timer.as_mut().reset(at);
            }
        }
        tokio::select! {
            biased;
            Some(done) = work.next(), if !work.is_empty() => {
                if let Done::Housekeeping = done {
                    housekeeping_queued = false;
                }
            }
            message = messages.recv() => match message {
                Some(Message::Finish(abandoned)) => work.push(abandoned),
                Some(Message::Backlog) => {
                    let state = Arc::clone(&state);
                    work.push(Box::pin(async move {
                        state.lock().await.handle(None).await;
                        Done::Command
                    }));
                }
                None => break,
            },
            () = schedule.changed.notified() => {}
            () = timer.as_mut(), if due.is_some() => {
                housekeeping_queued = true;
                let state = Arc::clone(&state);
                work.push(Box::pin(async move {
                    state.lock().await.housekeeping().await;
                    Done::Housekeeping
                }));
            }
        }
    }
    while work.next().await.is_some() {}
    let mut session = state.lock().await;
    session.handle(None).await;
    debug_assert!(session.holds_nothing(), "every guard link releases on drop");
    session.close_gracefully().await;
}

/// Closes the connection if the task ends without closing it itself: when its runtime shuts
/// down, the task is dropped with its work, and the connection (with every lock on it) must
/// not outlive it in the handles' shared state.
struct CloseOnExit(Arc<Mutex<Session>>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        match self.0.try_lock() {
            Ok(mut session) => session.lose_session(crate::LockError::backend_msg(
                "the lock session's runtime shut down",
            )),
            Err(_) => tracing::warn!(
                "a lock session ended while a statement held it; its connection closes with the last handle"
            ),
        }
    }
}
