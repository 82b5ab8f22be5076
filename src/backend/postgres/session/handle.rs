//! The callers' side of a lock session: the command channel, and the links a guard or a waiter
//! keeps to what the session holds for it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::super::claims::KeyClaim;
use super::super::key_hash::{AdvisoryKeyHashing, AdvisoryKeyMap};
use super::super::notify::WakeHub;
use super::super::sql::Statements;
use super::super::timing::SessionSettings;
use super::super::wait_marks::Marks;
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
    /// The key is not to be had now. The caller keeps its claim, to try again, and learns the
    /// marks the session now holds for it (none once a lost connection took them).
    Busy(KeyClaim, Busy, Marks),
}

/// What a permit attempt found.
pub(crate) enum PermitTry {
    Granted(Granted),
    /// No permit within the caller's limit now. The marks the session now holds for the
    /// caller's waiter flag (none once a lost connection took them).
    Busy(Marks),
}

/// A permit attempt: the permit base, the caller's limit, its waiter flag (to drop on success),
/// the TTL and send time of the lease.
pub(super) struct PermitAttempt {
    pub(super) base: i64,
    pub(super) limit: u32,
    pub(super) flag: Option<u64>,
    pub(super) ttl: Duration,
    pub(super) sent_at: Instant,
}

/// Why a lock attempt took nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Another session holds the key (exclusively, for a shared attempt), or, for an exclusive
    /// attempt, readers that waited through a writer are about to go in.
    Held,
    /// A shared attempt that heeds waiting writers found one waiting.
    WriterWaiting,
}

/// How a lock attempt goes about the key, beyond its claim's mode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attempt {
    /// A shared attempt takes nothing while a writer waits (see [`Busy::WriterWaiting`]). False
    /// for a shared caller that has found the key held exclusively: it waited through that
    /// writer and goes in before the next one.
    pub(crate) heed_waiting_writers: bool,
}

impl Attempt {
    /// A caller's first attempt.
    pub(crate) const FIRST: Attempt = Attempt {
        heed_waiting_writers: true,
    };

    /// The next attempt after one that found the key `busy`.
    pub(crate) fn after(self, busy: Busy) -> Attempt {
        Attempt {
            heed_waiting_writers: self.heed_waiting_writers && busy != Busy::Held,
        }
    }
}

/// The caller's side of a session: sends commands to its task and waits for the replies.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    sender: mpsc::UnboundedSender<Command>,
}

impl SessionHandle {
    /// Starts the session task on the current runtime. It opens its connection on first use.
    /// `hub` is where this lock service's waiters listen (a permit released wakes its key's).
    pub(crate) fn spawn(
        pool: PgPool,
        sql: Arc<Statements>,
        settings: SessionSettings,
        hub: Arc<WakeHub>,
    ) -> Self {
        let (sender, commands) = mpsc::unbounded_channel();
        let session = Session {
            pool,
            sql,
            settings,
            sender: sender.downgrade(),
            commands,
            connection: None,
            held: HashMap::with_hasher(AdvisoryKeyHashing::default()),
            expiries: BTreeSet::new(),
            flags: AdvisoryKeyMap::default(),
            permit_slots: AdvisoryKeyMap::default(),
            hub,
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

    /// Tries to take the claimed key, on the side its claim has, on this session, with a
    /// lease of `ttl` from `sent_at`. With `flag`, a successful attempt also drops the marks
    /// that waiter holds.
    pub(crate) async fn try_lock(
        &self,
        mut claim: KeyClaim,
        attempt: Attempt,
        flag: Option<&WaitFlag>,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<TryOutcome, LockError> {
        claim.asking_server();
        let flag = flag.map(|flag| flag.id);
        self.ask(|reply| Command::TryLock(claim, attempt, flag, ttl, sent_at, reply))
            .await
    }

    /// Tries to take a permit of the permit base `base` within `limit` on this session, with a
    /// lease of `ttl` from `sent_at`. With `flag`, a successful attempt also drops that waiter's
    /// flag.
    pub(crate) async fn try_permit(
        &self,
        base: i64,
        limit: u32,
        flag: Option<&WaitFlag>,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<PermitTry, LockError> {
        let attempt = PermitAttempt {
            base,
            limit,
            flag: flag.map(|flag| flag.id),
            ttl,
            sent_at,
        };
        self.ask(|reply| Command::TryPermit(attempt, reply)).await
    }

    /// How many permits of the permit base `base` are held, by any session.
    pub(crate) async fn permits_held(&self, base: i64) -> Result<u32, LockError> {
        self.ask(|reply| Command::PermitsHeld(base, reply)).await
    }

    /// A waiter's link to the marks it will set on `key` (none yet). Dropping it drops them.
    pub(crate) fn wait_flag(&self, key: i64) -> WaitFlag {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        WaitFlag {
            sender: self.sender.clone(),
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Sets `wanted` for the waiter `flag` (see [`super::super::wait_marks`]): the waiter flag
    /// has releases elsewhere `pg_notify` the key. Returns the marks the waiter now holds; one
    /// missing was refused because a statement was checking it at that moment (a release, or
    /// a lock attempt of the other side): try again.
    pub(crate) async fn set_marks(
        &self,
        flag: &WaitFlag,
        wanted: Marks,
    ) -> Result<Marks, LockError> {
        let (key, id) = (flag.key, flag.id);
        self.ask(|reply| Command::SetMarks(key, id, wanted, reply))
            .await
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

/// "A task of this process waits for this key": its link to the marks it set on the server
/// (the waiter flag, which a release elsewhere tests to decide whether to `pg_notify`, and the
/// writer-waiting or readers' turn mark). Dropping it drops the marks that no other waiter of
/// this session holds.
pub(crate) struct WaitFlag {
    sender: mpsc::UnboundedSender<Command>,
    key: i64,
    id: u64,
}

impl Drop for WaitFlag {
    fn drop(&mut self) {
        let _ = self.sender.send(Command::ClearFlag(self.key, self.id));
    }
}

/// Where the session answers a command.
pub(super) type Reply<T> = oneshot::Sender<Result<T, LockError>>;

/// What a caller asks of the session. Keys are advisory keys, `Uuid`s a hold's id, `u64`s a
/// waiter flag's id, `Instant`s when the caller sent the command (a lease counts from then).
pub(super) enum Command {
    /// Claim, how to try, the caller's waiter flag to drop on success, TTL, send time.
    TryLock(
        KeyClaim,
        Attempt,
        Option<u64>,
        Duration,
        Instant,
        Reply<TryOutcome>,
    ),
    /// The marks a waiter wants.
    SetMarks(i64, u64, Marks, Reply<Marks>),
    ClearFlag(i64, u64),
    /// No reply for a guard dropped without releasing.
    Release(i64, Uuid, Option<Reply<()>>),
    /// TTL and send time of the new lease.
    Extend(i64, Uuid, Duration, Instant, Reply<()>),
    IsLocked(i64, Reply<bool>),
    TryPermit(PermitAttempt, Reply<PermitTry>),
    /// A permit base.
    PermitsHeld(i64, Reply<u32>),
}
