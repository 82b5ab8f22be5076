//! The session task: the work that callers do not run themselves. It opens the connection,
//! runs the commands that could not run on a caller's task (the session was busy or not
//! connected) and those of dropped guards and waiter flags, finishes the jobs of callers that
//! went away, and does the housekeeping (lease expiry, pings, closing an unused connection).
//!
//! It owns the session's cell: when the task ends, or is dropped with its runtime, the session
//! and its connection go with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cell::{Job, SessionCell};
use super::handle::Command;

/// What the session task is sent.
pub(super) enum Message {
    /// Run this command; drop `finished` once the session is back in its cell.
    Run {
        command: Command,
        finished: Option<oneshot::Sender<()>>,
    },
    /// A caller went away while its job ran: finish it.
    Finish(Job),
}

/// A deadline that never comes in practice, for an idle timer: the longest duration the
/// crate accepts anywhere.
const FAR_FUTURE: Duration = crate::MAX_DURATION;

/// Runs until every handle, guard and waiter flag of the session is gone, then closes the
/// connection.
pub(super) async fn run(cell: Arc<SessionCell>, mut messages: mpsc::UnboundedReceiver<Message>) {
    // One timer, kept and moved rather than re-created, because arming a timer costs more than
    // it seems on a virtual machine.
    let timer = tokio::time::sleep_until(Instant::now() + FAR_FUTURE);
    tokio::pin!(timer);
    loop {
        let due = cell.due();
        if let Some(at) = due {
            if at != timer.deadline() {
                timer.as_mut().reset(at);
            }
        }
        tokio::select! {
            biased;
            message = messages.recv() => match message {
                Some(Message::Run { command, finished }) => {
                    let mut session = cell.take().await;
                    session.run_command(command).await;
                    cell.put_back_from_task(session);
                    cell.finished_one();
                    drop(finished);
                }
                Some(Message::Finish(job)) => {
                    job.await;
                    cell.finished_one();
                }
                None => break,
            },
            () = cell.due_changed() => {}
            () = timer.as_mut(), if due.is_some() => {
                let mut session = cell.take().await;
                session.housekeeping().await;
                cell.put_back_from_task(session);
            }
        }
    }
    let mut session = cell.take().await;
    session.close_gracefully().await;
}
