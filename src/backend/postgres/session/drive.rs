//! Who polls a session: its own task, or a caller that waits for a reply.
//!
//! The session is one future (see [`Session::run`](super::Session)) kept in a [`SessionCell`].
//! Its task polls it whenever it is woken. A caller that has sent a command and waits for the
//! reply polls it too, if nobody else is polling it at that moment: an uncontended lock or
//! release then runs in the caller's own task, from command to reply, without waking another
//! task. (Handing every command to the session task and the reply back cost two task switches
//! per statement, and on a multi-threaded runtime tokio caps such ping-pong between two tasks
//! and wakes a second worker thread when the cap is reached: most of the backend's own cost in
//! the benchmark was that.)
//!
//! The session's own wake-ups are routed by a [`Router`]:
//! * the command channel and the statement's socket wake whoever polled the session last (the
//!   caller waiting for that statement, usually), or the task once that caller has its reply or
//!   is gone;
//! * its timers (lease expiry, pings, a statement's deadline) always wake the task, and while
//!   more than one caller waits, so does every other wake-up: a caller that polled once and was
//!   then never polled again holds up nothing but its own statement, and that only until the
//!   next caller or the statement's deadline timer comes;
//! * opening and closing the connection run only in the task ([`Router::in_own_task`]): a
//!   socket belongs to the runtime that opens it, and a caller may be on a runtime that ends
//!   sooner than the lock service.
//!
//! The task owns the cell; callers hold it weakly, so that a session dropped with its runtime
//! closes its connection (and frees its locks) even while callers elsewhere still wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::oneshot;

use super::connection::SessionConnection;

/// How often one `drive` polls the session again when it was woken during the poll, before it
/// leaves the rest to the task.
const REPOLLS: usize = 4;

/// Routes the session's wake-ups (see the module docs).
pub(crate) struct Router {
    /// Who gets the next wake-up of the command channel or the statement's socket: the last
    /// party that polled the session, or the task after a caller left.
    driver: Mutex<Option<Waker>>,
    /// Set by every routed wake-up; cleared when a poll starts. A wake-up that finds no driver
    /// is not lost: whoever polls next, or leaves, looks at this.
    woken: AtomicBool,
    /// The session task's waker, known from its first poll on.
    task: OnceLock<Waker>,
    /// The task found the session busy (a caller was polling it) and wants another turn.
    task_wanted: AtomicBool,
    /// Only the task may poll the session now (it opens or closes the connection).
    task_only: AtomicBool,
    /// Whether the poll in progress is the task's (written under the cell's lock).
    polled_by_task: AtomicBool,
    /// Callers waiting for a reply right now. With more than one, a routed wake-up goes to the
    /// task too: the driver may be a caller that is not being polled any more, and the others'
    /// statements must not wait for it.
    waiting: AtomicUsize,
    /// Connections given up during a caller's poll, closed by the task (on its runtime) the
    /// next time it runs.
    closing: Mutex<Vec<SessionConnection>>,
}

impl Router {
    fn new() -> Self {
        Router {
            driver: Mutex::new(None),
            woken: AtomicBool::new(false),
            task: OnceLock::new(),
            task_wanted: AtomicBool::new(false),
            task_only: AtomicBool::new(false),
            polled_by_task: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            closing: Mutex::new(Vec::new()),
        }
    }

    fn driver(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.driver.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the session task (for work that no caller will drive: a dropped guard's release).
    pub(crate) fn wake_task(&self) {
        if let Some(task) = self.task.get() {
            task.wake_by_ref();
        }
    }

    /// Whether the session is being polled by its own task right now.
    pub(crate) fn polled_by_task(&self) -> bool {
        self.polled_by_task.load(Ordering::Acquire)
    }

    /// Before a caller sends a command it will drive itself: takes the driver out, so that the
    /// command does not wake the task (which would then take the statement's wake-ups too).
    fn quiet(&self) {
        let driver = self.driver().take();
        drop(driver);
    }

    /// Leaves `connection` for the task to close (see `closing`), and wakes it.
    pub(crate) fn close_later(&self, connection: SessionConnection) {
        self.closing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
        self.wake_task();
    }

    /// Makes `waker` the driver; the one it replaces is dropped after the lock is released.
    fn set_driver(&self, waker: &Waker) {
        let previous = self.driver().replace(waker.clone());
        drop(previous);
    }

    /// A caller that cannot poll the session now (another party is polling it, or only the
    /// task may) but waits for a reply: it took the driver out before sending its command
    /// ([`quiet`](Self::quiet)), and the party polling may already have started that command's
    /// statement, so it stands in as the driver. A wake-up that came while the slot was empty
    /// goes to the task (which clears the flag when it polls; the caller would only find the
    /// session busy again).
    fn stand_in(&self, caller: &Waker) {
        self.set_driver(caller);
        if self.woken.load(Ordering::SeqCst) {
            self.wake_task();
        }
    }

    /// A caller that polled the session is done with it (its reply came, or it gave up): the
    /// task takes over the wake-ups, and is woken if one came since that caller last polled.
    fn hand_back(&self, caller: &Waker) {
        let mut driver = self.driver();
        let ours = driver
            .as_ref()
            .is_none_or(|driver| driver.will_wake(caller));
        if !ours {
            return;
        }
        let previous = std::mem::replace(&mut *driver, self.task.get().cloned());
        drop(driver);
        drop(previous);
        if self.woken.load(Ordering::SeqCst) {
            self.wake_task();
        }
    }

    /// Polls `work` with every wake-up going to the session task: timers, and the parts that
    /// must run in the task (see [`in_own_task`](Self::in_own_task)).
    pub(crate) fn on_task_waker<F: Future>(&self, work: F) -> OnTaskWaker<'_, F> {
        OnTaskWaker { router: self, work }
    }

    /// Runs `work` in the session task only: a caller that reaches this point in its poll
    /// leaves the session to the task, and no caller polls the session until `work` is done.
    /// For opening and closing the connection (see the module docs).
    pub(crate) async fn in_own_task<T>(&self, work: impl Future<Output = T>) -> T {
        self.task_only.store(true, Ordering::SeqCst);
        let output = InOwnTask { router: self, work }.await;
        self.task_only.store(false, Ordering::SeqCst);
        output
    }
}

pin_project_lite::pin_project! {
    /// See [`Router::in_own_task`]: checked at every poll, as a caller may still get hold of
    /// the session between the flag being set and its own check of it.
    struct InOwnTask<'r, F> {
        router: &'r Router,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for InOwnTask<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !this.router.polled_by_task() {
            this.router.wake_task();
            return Poll::Pending;
        }
        let task = this.router.task.get().expect("the task polls");
        this.work.poll(&mut Context::from_waker(task))
    }
}

impl Wake for Router {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let driver = self.driver().take();
        if let Some(driver) = driver {
            driver.wake();
        }
        if self.waiting.load(Ordering::SeqCst) > 1 {
            self.wake_task();
        }
    }
}

pin_project_lite::pin_project! {
    /// A future whose wake-ups all go to the session task; see [`Router::on_task_waker`].
    pub(crate) struct OnTaskWaker<'r, F> {
        router: &'r Router,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for OnTaskWaker<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.router.task.get() {
            Some(task) => this.work.poll(&mut Context::from_waker(task)),
            // The task has not run yet; it will, and poll this again with its own waker.
            None => this.work.poll(cx),
        }
    }
}

type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The session future, its router, and the waker that routes through it.
pub(crate) struct SessionCell {
    router: Arc<Router>,
    routed: Waker,
    session: Mutex<Option<SessionFuture>>,
}

impl SessionCell {
    /// A cell for the session that `make` builds from the router and a link to the cell;
    /// polled by its task (the returned future, to be spawned) and by callers holding links.
    pub(crate) fn with_session<F>(
        make: impl FnOnce(Arc<Router>, SessionLink) -> F,
    ) -> (SessionLink, SessionTask)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let router = Arc::new(Router::new());
        let cell = Arc::new_cyclic(|cell: &Weak<SessionCell>| {
            let session: SessionFuture =
                Box::pin(make(Arc::clone(&router), SessionLink::new(cell.clone())));
            SessionCell {
                routed: Waker::from(Arc::clone(&router)),
                router,
                session: Mutex::new(Some(session)),
            }
        });
        (
            SessionLink::new(Arc::downgrade(&cell)),
            SessionTask { cell },
        )
    }

    /// Polls the session if nobody else is, with `waker` as its driver. Ready when the session
    /// has ended.
    fn drive(&self, waker: &Waker, by_task: bool) -> Poll<()> {
        let router = &self.router;
        if !by_task && router.task_only.load(Ordering::SeqCst) {
            router.stand_in(waker);
            return Poll::Pending;
        }
        let mut session = match self.session.try_lock() {
            Ok(session) => session,
            // Only a panic outside the session's poll could poison it (that one is caught):
            // treat the session as ended, and let the task see it too.
            Err(std::sync::TryLockError::Poisoned(_)) => {
                router.wake_task();
                return Poll::Ready(());
            }
            Err(std::sync::TryLockError::WouldBlock) if by_task => {
                // Whoever polls now looks at this once done; if it already has, the lock is
                // free again.
                router.task_wanted.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.session.try_lock() {
                    Ok(session) => session,
                    Err(_) => return Poll::Pending,
                }
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                router.stand_in(waker);
                return Poll::Pending;
            }
        };
        let Some(future) = session.as_mut() else {
            return Poll::Ready(());
        };
        router.polled_by_task.store(by_task, Ordering::Release);
        let mut ended = false;
        for _ in 0..REPOLLS {
            router.set_driver(waker);
            router.woken.store(false, Ordering::SeqCst);
            let poll = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                future.as_mut().poll(&mut Context::from_waker(&self.routed))
            }));
            match poll {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(())) => {
                    ended = true;
                    break;
                }
                Err(_) => {
                    // As when the session ran only in its task: the session ends (its guards
                    // report lost, waiting callers get an error), the caller does not panic.
                    // When a caller was polling, the connection is dropped on its thread.
                    tracing::error!("the PostgreSQL lock session panicked; it is closed");
                    ended = true;
                    break;
                }
            }
            // Woken while polling (a command sent by a caller that found the session busy):
            // poll again, unless only the task may go on.
            if !router.woken.load(Ordering::SeqCst)
                || (!by_task && router.task_only.load(Ordering::SeqCst))
            {
                break;
            }
        }
        let ended_here = if ended { session.take() } else { None };
        drop(session);
        if let Some(finished) = ended_here {
            // The task ends too (if it was not the one polling). Woken first, so that it does
            // not wait on whatever dropping the finished session costs.
            router.wake_task();
            drop(finished);
            return Poll::Ready(());
        }
        fence(Ordering::SeqCst);
        // A party that found the session busy relies on this check, made after the lock is
        // released: its command (or the task's turn) was flagged before it tried the lock.
        if router.task_wanted.swap(false, Ordering::SeqCst) || router.woken.load(Ordering::SeqCst) {
            router.wake_task();
        }
        Poll::Pending
    }
}

/// The session's own task: polls the session until it ends. Dropping it (with its runtime)
/// drops the session, which closes its connection.
pub(crate) struct SessionTask {
    cell: Arc<SessionCell>,
}

impl Future for SessionTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let router = &self.cell.router;
        if router.task.get().is_none() {
            let _ = router.task.set(cx.waker().clone());
        }
        let closing = std::mem::take(
            &mut *router
                .closing
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        drop(closing);
        self.cell.drive(cx.waker(), true)
    }
}

/// The session goes with its task (a runtime shutting down drops its tasks before its
/// drivers): no caller elsewhere can keep it, and its timers and connection, past the runtime.
impl Drop for SessionTask {
    fn drop(&mut self) {
        let session = self
            .cell
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(session);
        let closing = std::mem::take(
            &mut *self
                .cell
                .router
                .closing
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        drop(closing);
    }
}

/// Sends commands to a session and waits for replies, driving the session meanwhile.
#[derive(Clone)]
pub(crate) struct SessionLink {
    cell: Weak<SessionCell>,
}

impl SessionLink {
    pub(crate) fn new(cell: Weak<SessionCell>) -> Self {
        SessionLink { cell }
    }

    /// Before sending a command that the caller will wait for: see [`Router::quiet`].
    pub(crate) fn before_call(&self) {
        if let Some(cell) = self.cell.upgrade() {
            cell.router.quiet();
        }
    }

    /// After sending a command that nobody will wait for (a dropped guard's release): wakes the
    /// task to run it.
    pub(crate) fn wake_task(&self) {
        if let Some(cell) = self.cell.upgrade() {
            cell.router.wake_task();
        }
    }

    /// Waits for `reply`, polling the session whenever nobody else is.
    pub(crate) fn reply<T>(&self, reply: oneshot::Receiver<T>) -> Reply<'_, T> {
        Reply {
            link: self,
            reply,
            drove: None,
        }
    }
}

/// See [`SessionLink::reply`].
pub(crate) struct Reply<'a, T> {
    link: &'a SessionLink,
    reply: oneshot::Receiver<T>,
    /// The waker this wait drove the session with, to hand the session back when done.
    drove: Option<Waker>,
}

impl<T> Future for Reply<'_, T> {
    type Output = Result<T, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(cell) = self.link.cell.upgrade() {
            // A reply sent while this caller drives the session would wake this very task,
            // which tokio then runs again as a yield, waking another worker thread: park a no-op
            // waker on the reply while driving. The reply is looked at right after, with the
            // real waker, so none is missed.
            if let Poll::Ready(result) =
                Pin::new(&mut self.reply).poll(&mut Context::from_waker(Waker::noop()))
            {
                self.hand_back();
                return Poll::Ready(result);
            }
            // Counted as waiting before driving: a wake-up routed while this caller drives must
            // already see it, or a second waiting caller could miss its turn.
            if !self
                .drove
                .as_ref()
                .is_some_and(|drove| drove.will_wake(cx.waker()))
            {
                if self.drove.is_none() {
                    cell.router.waiting.fetch_add(1, Ordering::SeqCst);
                }
                self.drove = Some(cx.waker().clone());
            }
            // The session ending also ends the reply (its sender is dropped).
            let _ = cell.drive(cx.waker(), false);
        }
        let result = std::task::ready!(Pin::new(&mut self.reply).poll(cx));
        self.hand_back();
        Poll::Ready(result)
    }
}

impl<T> Reply<'_, T> {
    fn hand_back(&mut self) {
        if let Some(waker) = self.drove.take() {
            if let Some(cell) = self.link.cell.upgrade() {
                cell.router.waiting.fetch_sub(1, Ordering::SeqCst);
                cell.router.hand_back(&waker);
            }
        }
    }
}

impl<T> Drop for Reply<'_, T> {
    fn drop(&mut self) {
        self.hand_back();
    }
}
