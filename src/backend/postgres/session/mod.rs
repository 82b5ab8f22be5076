//! One lock session: a long-lived PostgreSQL connection that holds many advisory locks, owned
//! by one task (an actor) that runs every statement for them.
//!
//! Callers send commands over a channel ([`SessionHandle`]) and wait for the replies. Before
//! each command the task runs whatever housekeeping is due (a lock whose lease ran out is
//! unlocked and its lease marked lost; see [`Session::housekeeping`]), then one command at a
//! time under the command timeout, in arrival order. Every statement
//! belongs to the task, not to the caller, so a caller that gives up (a dropped `acquire`
//! future) can never leave a statement half done: the task sees the caller is gone when it
//! answers and undoes a lock it just took, before its next command. Every key always uses the
//! same session, so that undo runs before the next local attempt on the key.
//!
//! The task also pings an idle connection so the server's `idle_session_timeout` only fires
//! when this process is cut off, and treats any doubt about the connection (an I/O error, no
//! answer in time, a fatal server error) by closing it, which frees every lock it held, and
//! marking those leases lost. A connection is never given back to the pool: it is closed when
//! the session has held nothing for a while or when the lock service and all its guards are
//! gone. The task ends with its runtime; the lock service then starts a new one on the runtime
//! of the next operation.

mod handle;
mod permits;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgPool};
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

pub(super) use self::handle::{
    Attempt, Busy, Granted, HeldLockRef, PermitTry, SessionHandle, TryOutcome, WaitFlag,
};
use self::handle::{Command, Reply};
use super::claims::KeyClaim;
use super::key_hash::{pg_locks_halves, AdvisoryKeyHashing, AdvisoryKeyMap};
use super::notify::WakeHub;
use super::setup::{open_session, SessionConnection};
use super::sql::Statements;
use super::statement_errors::is_statement_error;
use super::timing::SessionSettings;
use super::wait_marks::Marks;
use crate::lease::ConnectionBound;
use crate::{Lease, LockError, LockMode};

/// A lock this session holds for a guard (its id is the key of [`Session::held`]).
struct Held {
    /// The advisory key locked (for a permit, its slot's).
    key: i64,
    hold: Hold,
    lease: Arc<Lease>,
    /// The entry in `expiries`: the lease's own deadline (the connection bound is watched
    /// once for the whole session, see [`Session::housekeeping`]).
    expires_at: Instant,
}

/// What a [`Held`] lock is.
enum Hold {
    /// A lock on a key. Its claim keeps other tasks of this process off the key (or, shared,
    /// off its exclusive side) until the server lock is gone; its mode says how to unlock.
    Lock(KeyClaim),
    /// Permit `slot` of the permit base `base` (the advisory lock `base + slot`). When it goes,
    /// the first task of this process waiting for a permit of the base is woken.
    Permit { base: i64, slot: i32 },
}

/// Why a statement failed.
enum Failure {
    /// The statement failed but the session is sound (autocommit: nothing of it remains
    /// except, possibly, a session-level advisory lock taken before the error).
    Statement(sqlx::Error),
    /// The connection is broken or in doubt; it has been closed and every lock on it is gone.
    SessionLost(LockError),
}

impl Failure {
    fn into_error(self) -> LockError {
        match self {
            Failure::Statement(error) => LockError::backend(error),
            Failure::SessionLost(error) => error,
        }
    }
}

/// What a lock statement answered.
enum Locked {
    /// The fencing token if it took the lock, else `None`; the marks it dropped.
    Token(Option<i64>, Marks),
    /// A shared attempt that heeds waiting writers found one waiting; nothing taken.
    WriterWaiting,
}

/// The bound parameters of a statement.
enum Args {
    None,
    /// An advisory key.
    Key(i64),
    /// An advisory key and two switches.
    KeyAnd2(i64, bool, bool),
    /// An advisory key and three switches.
    KeyAnd3(i64, bool, bool, bool),
    /// The halves of an advisory key as `pg_locks` shows them (`classid`, `objid`).
    Oids(i64, i64),
    /// A permit base.
    Base(i64),
    /// A permit base and a slot.
    BaseAndSlot(i64, i32),
    /// A permit base and slots.
    BaseAndSlots(i64, Vec<i32>),
    /// A permit base, a limit, slots and a switch.
    Permit(i64, i32, Vec<i32>, bool),
}

struct Session {
    pool: PgPool,
    sql: Arc<Statements>,
    settings: SessionSettings,
    /// To build guard links and flags; weak so that the task stops once every handle is gone.
    sender: mpsc::WeakUnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    connection: Option<SessionConnection>,
    /// By hold id: a key has one exclusive hold, or any number of shared ones (the server
    /// counts a session's shared locks of one key).
    held: HashMap<Uuid, Held, AdvisoryKeyHashing>,
    /// Lease deadlines of `held`, earliest first.
    expiries: BTreeSet<(Instant, Uuid)>,
    /// The waiters' marks, by key, then by waiter: the session holds a mark of a key on the
    /// server (once) while any of its waiters has it.
    flags: AdvisoryKeyMap<HashMap<u64, Marks>>,
    /// The slots of `held`'s permits, by permit base.
    permit_slots: AdvisoryKeyMap<Vec<i32>>,
    /// Where the waiters of this lock service listen: a permit that goes wakes the first waiter
    /// of this process for its key.
    hub: Arc<WakeHub>,
    /// Last statement sent, for pings.
    last_used: Instant,
    /// Since when the session holds nothing (no lock, no waiter flag), for closing an unused
    /// connection.
    idle_since: Instant,
    /// Whether the connection was lost since the last one was opened (the next open is a
    /// reconnect, for the metrics).
    lost_since_open: bool,
    /// Until when the server keeps this connection's locks for sure: the send time of its last
    /// answered statement plus the server's bound (see [`SessionSettings::connection_bound`]).
    /// Every lease on the session runs out when it passes.
    bound: Arc<ConnectionBound>,
}

impl Session {
    /// Housekeeping when it is due (expiry first, even under load), else one command at a time.
    async fn run(mut self) {
        // One timer for all housekeeping. It is only ever moved earlier between two runs of
        // it: waking before something is due costs one look, whereas re-arming after every
        // statement (the ping moves later each time) would cost a timer update per command.
        let timer = tokio::time::sleep_until(far_future());
        tokio::pin!(timer);
        loop {
            if let Some(due) = self.next_due().filter(|&due| due < timer.deadline()) {
                timer.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                () = &mut timer => {
                    timer.as_mut().reset(far_future());
                    self.housekeeping().await;
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
            }
        }
        debug_assert!(self.held.is_empty(), "every guard link releases on drop");
        self.close_gracefully().await;
    }

    /// Whether the session holds no lock and no waiter flag.
    fn holds_nothing(&self) -> bool {
        self.held.is_empty() && self.flags.is_empty()
    }

    /// Restarts the idle clock while the session holds nothing: the idle close counts from the
    /// last command, or from when the last lock or waiter flag went, whichever came last.
    fn note_if_idle(&mut self) {
        if self.holds_nothing() {
            self.idle_since = Instant::now();
        }
    }

    /// When [`housekeeping`](Self::housekeeping) next has something to do: the first lease
    /// expiry, the connection bound while anything is held, the ping, the idle close. Nothing
    /// without a connection (losing it dropped every lock and flag).
    fn next_due(&self) -> Option<Instant> {
        self.connection.as_ref()?;
        let ping = self.last_used + self.settings.ping_interval();
        let due = match self.expiries.first() {
            Some(&(expiry, _)) => ping.min(expiry).min(self.bound.until()),
            None if self.holds_nothing() => ping.min(self.idle_since + self.settings.idle_close),
            None => ping,
        };
        Some(due)
    }

    /// Whatever is due: losing a session that has not been heard from within its bound
    /// (its runtime was frozen, say: the server may have ended it, and every guard on it
    /// already counts its lock lost), then lease expiries, then the idle close or the ping.
    async fn housekeeping(&mut self) {
        let now = Instant::now();
        if !self.held.is_empty() && now >= self.bound.until() {
            self.lose_session(LockError::backend_msg(
                "no answer from the PostgreSQL server within the connection bound",
            ));
            return;
        }
        while let Some(&(at, id)) = self.expiries.first().filter(|&&(at, _)| at <= now) {
            self.expiries.remove(&(at, id));
            if let Some(held) = self.held.get(&id) {
                held.lease.mark_lost();
                tracing::debug!(advisory_key = held.key, "lease ran out; unlocking");
                let _ = self.unlock_held(id).await;
            }
        }
        if self.connection.is_none() {
            return;
        }
        if self.holds_nothing() && now >= self.idle_since + self.settings.idle_close {
            tracing::debug!("closing an unused lock session");
            self.close_gracefully().await;
        } else if now >= self.last_used + self.settings.ping_interval() {
            if let Err(Failure::Statement(error)) =
                self.query::<(i32,)>(|sql| sql.ping, Args::None).await
            {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "lock session ping failed"
                );
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::TryLock(claim, attempt, flag, ttl, sent_at, reply) => {
                self.try_lock(claim, attempt, flag, ttl, sent_at, reply)
                    .await;
            }
            Command::SetMarks(key, id, wanted, reply) => {
                self.set_marks(key, id, wanted, reply).await;
            }
            Command::ClearFlag(key, id) => self.clear_flag(key, id).await,
            Command::Release(key, id, reply) => {
                let result = self.release(key, id).await;
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Extend(key, id, ttl, sent_at, reply) => {
                let _ = reply.send(self.extend(key, id, ttl, sent_at).await);
            }
            Command::TryPermit(attempt, reply) => self.try_permit(attempt, reply).await,
            Command::PermitsHeld(base, reply) => self.permits_held(base, reply).await,
            Command::IsLocked(key, reply) => {
                if !reply.is_closed() {
                    let (high, low) = pg_locks_halves(key);
                    let result = self.query(|sql| sql.is_locked, Args::Oids(high, low)).await;
                    let _ = reply.send(result.map(|(locked,)| locked).map_err(Failure::into_error));
                }
            }
        }
        // A session in use is not idle, even when what it did left nothing held.
        self.note_if_idle();
    }

    async fn try_lock(
        &mut self,
        mut claim: KeyClaim,
        attempt: Attempt,
        flag: Option<u64>,
        ttl: Duration,
        sent_at: Instant,
        reply: Reply<TryOutcome>,
    ) {
        if reply.is_closed() {
            // The caller gave up before its turn; dropping the claim lets the next one in.
            claim.not_asked();
            return;
        }
        let key = *claim.key();
        let mode = claim.mode();
        // The marks the statement drops if it takes the lock: those of this waiter that no
        // other waiter of this session holds.
        let to_drop = flag.map_or(Marks::NONE, |id| self.marks_only_of(key, id));
        // The fencing sequence was created (if missing) when the connection opened; if it has
        // been dropped since, this fails rather than silently restarting the tokens from 1.
        let answer = self.lock_statement(key, mode, attempt, to_drop).await;
        let (token, dropped) = match answer {
            Ok(Locked::Token(token, dropped)) => (token, dropped),
            Ok(Locked::WriterWaiting) => {
                claim.answered();
                let marks = self.waiter_marks(key, flag);
                let _ = reply.send(Ok(TryOutcome::Busy(claim, Busy::WriterWaiting, marks)));
                return;
            }
            // The claim passes on with the answer still owed (see `ClaimTable::overdue`).
            Err(failure) => {
                if let Failure::Statement(_) = &failure {
                    // A session lock taken before the error would survive it.
                    self.force_unlock(key, mode).await;
                }
                // Let go of the key before answering, so that the caller's next attempt finds
                // it free in this process.
                drop(claim);
                let _ = reply.send(Err(failure.into_error()));
                return;
            }
        };
        claim.answered();
        let Some(token) = token else {
            let marks = self.waiter_marks(key, flag);
            let _ = reply.send(Ok(TryOutcome::Busy(claim, Busy::Held, marks)));
            return;
        };
        if let Some(id) = flag {
            // The statement dropped the marks this waiter alone held, as far as it could.
            let left = self.forget_flag(key, id) - dropped;
            if !left.is_empty() {
                if let Err(lost) = self.clear_marks(key, left).await {
                    // The lock went with the session.
                    drop(claim);
                    let _ = reply.send(Err(lost));
                    return;
                }
            }
        }
        claim.mark_granted();
        let Some((id, granted)) = self
            .record_hold(key, Hold::Lock(claim), sent_at, ttl, token)
            .await
        else {
            return;
        };
        if let Err(Ok(TryOutcome::Granted(unwanted))) = reply.send(Ok(TryOutcome::Granted(granted)))
        {
            tracing::debug!(
                advisory_key = key,
                "acquire cancelled as the lock was granted; unlocking"
            );
            self.undo_unwanted(id, unwanted).await;
        }
    }

    /// Records `hold` of `key`, granted by a statement sent at `sent_at` (its lease counts from
    /// then), with its expiry, and returns its id and the guard's part of it; `None` if nobody
    /// can release it any more (the lock service is gone), and then it is unlocked at once.
    async fn record_hold(
        &mut self,
        key: i64,
        hold: Hold,
        sent_at: Instant,
        ttl: Duration,
        token: i64,
    ) -> Option<(Uuid, Granted)> {
        let lease = Lease::bounded(sent_at, ttl, Arc::clone(&self.bound));
        let (id, expires_at) = (Uuid::new_v4(), lease.term_deadline());
        self.expiries.insert((expires_at, id));
        let held = Held {
            key,
            hold,
            lease: Arc::clone(&lease),
            expires_at,
        };
        self.held.insert(id, held);
        let Some(sender) = self.sender.upgrade() else {
            let _ = self.unlock_held(id).await;
            return None;
        };
        let granted = Granted {
            fencing_token: u64::try_from(token).unwrap_or(0),
            lease,
            lock: HeldLockRef {
                sender,
                key,
                id,
                settled: AtomicBool::new(false),
            },
        };
        Some((id, granted))
    }

    /// Unlocks hold `id` at once: the acquire it was granted to was cancelled while the
    /// statement ran, and its grant came back undelivered.
    async fn undo_unwanted(&mut self, id: Uuid, unwanted: Granted) {
        unwanted.lock.settled.store(true, Ordering::Release);
        let _ = self.unlock_held(id).await;
    }

    /// Runs the statement that tries `key` on the side `mode`, dropping the marks `to_drop`
    /// (as far as that side's statement can) if it takes the lock.
    async fn lock_statement(
        &mut self,
        key: i64,
        mode: LockMode,
        attempt: Attempt,
        to_drop: Marks,
    ) -> Result<Locked, Failure> {
        match mode {
            LockMode::Exclusive => {
                let to_drop = to_drop - Marks::READERS_TURN;
                if to_drop.is_empty() {
                    let (token,) = self
                        .query::<(Option<i64>,)>(|sql| &sql.try_lock, Args::Key(key))
                        .await?;
                    return Ok(Locked::Token(token, Marks::NONE));
                }
                let (flag, writer, _) = to_drop.as_params();
                let (token, flag, writer) = self
                    .query::<(Option<i64>, Option<bool>, Option<bool>)>(
                        |sql| &sql.try_lock_unflag,
                        Args::KeyAnd2(key, flag, writer),
                    )
                    .await?;
                Ok(Locked::Token(
                    token,
                    Marks::from_answers((flag, writer, None)),
                ))
            }
            LockMode::Shared => {
                let (flag, _, readers) = (to_drop - Marks::WRITER_WAITING).as_params();
                let (writer_free, token, writer_holds, flag, readers) = self
                    .query::<(bool, Option<i64>, bool, Option<bool>, Option<bool>)>(
                        |sql| &sql.try_lock_shared,
                        Args::KeyAnd3(key, attempt.heed_waiting_writers, flag, readers),
                    )
                    .await?;
                // Refused for a waiting writer while another writer holds the key: this caller
                // waits through that writer's hold (goes in before the waiting one), as if the
                // key had been found held.
                if !writer_free && !writer_holds {
                    return Ok(Locked::WriterWaiting);
                }
                Ok(Locked::Token(
                    token,
                    Marks::from_answers((flag, None, readers)),
                ))
            }
        }
    }

    /// The hold `id` on `key`, or `LockLost` if it is gone.
    fn hold(&mut self, key: i64, id: Uuid) -> Result<&mut Held, LockError> {
        let held = self.held.get_mut(&id).filter(|held| held.key == key);
        held.ok_or(LockError::LockLost)
    }

    async fn release(&mut self, key: i64, id: Uuid) -> Result<(), LockError> {
        let expired = self.hold(key, id)?.lease.is_lost();
        let result = self.unlock_held(id).await;
        if expired {
            Err(LockError::LockLost)
        } else {
            result
        }
    }

    async fn extend(
        &mut self,
        key: i64,
        id: Uuid,
        ttl: Duration,
        sent_at: Instant,
    ) -> Result<(), LockError> {
        if self.hold(key, id)?.lease.is_lost() {
            let _ = self.unlock_held(id).await;
            return Err(LockError::LockLost);
        }
        // A live connection still holds every lock it took: proving it alive proves the lock.
        match self.query::<(i32,)>(|sql| sql.ping, Args::None).await {
            Ok(_) => {}
            Err(Failure::Statement(error)) => return Err(LockError::backend(error)),
            Err(Failure::SessionLost(_)) => return Err(LockError::LockLost),
        }
        let held = self.hold(key, id)?;
        held.lease.renew(sent_at, ttl);
        let (scheduled, expires_at) = (held.expires_at, held.lease.term_deadline());
        held.expires_at = expires_at;
        self.expiries.remove(&(scheduled, id));
        self.expiries.insert((expires_at, id));
        Ok(())
    }

    /// Sets the marks `wanted` for waiter `id` of `key`: on the server, those that no waiter
    /// of this session holds yet. Answers the marks the waiter now holds.
    async fn set_marks(&mut self, key: i64, id: u64, wanted: Marks, reply: Reply<Marks>) {
        if reply.is_closed() {
            return;
        }
        let held = self.server_marks(key);
        let mut got = wanted & held;
        let needed = wanted - held;
        if !needed.is_empty() {
            let (flag, writer, readers) = needed.as_params();
            let set = self
                .query::<(Option<bool>, Option<bool>, Option<bool>)>(
                    |sql| &sql.set_marks,
                    Args::KeyAnd3(key, flag, writer, readers),
                )
                .await;
            match set {
                // A mark not set: a statement that checks it holds it for its length.
                Ok(answers) => got = got | Marks::from_answers(answers),
                Err(Failure::Statement(error)) if !(needed - Marks::FLAG).is_empty() => {
                    // The statement may have set a mark before it failed (a cancel by the
                    // statement timeout after its try ran): left on the server unrecorded, it
                    // would keep the other side of every process out for as long as the
                    // connection lives. Only closing it drops it for sure.
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        advisory_key = key,
                        "could not set a lock waiter's marks; closing its session"
                    );
                    let cause = LockError::backend(error);
                    self.lose_session(cause.clone());
                    let _ = reply.send(Err(cause));
                    return;
                }
                Err(failure) => {
                    let _ = reply.send(Err(failure.into_error()));
                    return;
                }
            }
        }
        let marks = self.flags.entry(key).or_default().entry(id).or_default();
        *marks = *marks | got;
        // A caller gone by now dropped its `WaitFlag`, whose `ClearFlag` comes next.
        let _ = reply.send(Ok(*marks));
    }

    /// The marks of `key` the session holds on the server for waiter `id` (none without a
    /// waiter, or once the connection they were taken on is gone).
    fn waiter_marks(&self, key: i64, id: Option<u64>) -> Marks {
        id.and_then(|id| self.flags.get(&key)?.get(&id).copied())
            .unwrap_or(Marks::NONE)
    }

    async fn clear_flag(&mut self, key: i64, id: u64) {
        let unused = self.forget_flag(key, id);
        if !unused.is_empty() {
            // A lost session has told its guards.
            let _ = self.clear_marks(key, unused).await;
        }
    }

    /// Drops `marks` of `key` on the server. An error means the session was lost (the marks
    /// and every lock of the session with it).
    async fn clear_marks(&mut self, key: i64, marks: Marks) -> Result<(), LockError> {
        let (flag, writer, readers) = marks.as_params();
        let result = self
            .query::<(Option<bool>, Option<bool>, Option<bool>)>(
                |sql| &sql.clear_marks,
                Args::KeyAnd3(key, flag, writer, readers),
            )
            .await;
        let error = match result {
            Ok(_) => return Ok(()),
            Err(Failure::SessionLost(cause)) => return Err(cause),
            Err(Failure::Statement(error)) => error,
        };
        if marks == Marks::FLAG {
            // A stale flag only costs other processes a needless notification; closing the
            // session to drop it would cost every lock on it.
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                advisory_key = key,
                "could not clear a lock waiter's flag"
            );
            return Ok(());
        }
        // A stale writer-waiting mark would keep the readers of every process out of the key,
        // a stale readers' turn mark its writers, for as long as this connection lives: only
        // closing it drops the mark for sure (and every lock it holds, reported lost).
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            advisory_key = key,
            "could not clear a lock waiter's marks; closing its session"
        );
        let cause = LockError::backend(error);
        self.lose_session(cause.clone());
        Err(cause)
    }

    /// The marks of `key` this session holds on the server: those of any of its waiters.
    fn server_marks(&self, key: i64) -> Marks {
        self.flags.get(&key).map_or(Marks::NONE, |waiters| {
            waiters
                .values()
                .fold(Marks::NONE, |all, &marks| all | marks)
        })
    }

    /// The marks of waiter `id` of `key` that no other waiter of this session holds.
    fn marks_only_of(&self, key: i64, id: u64) -> Marks {
        let Some(waiters) = self.flags.get(&key) else {
            return Marks::NONE;
        };
        let others = waiters
            .iter()
            .filter(|(&other, _)| other != id)
            .fold(Marks::NONE, |all, (_, &marks)| all | marks);
        waiters
            .get(&id)
            .map_or(Marks::NONE, |&marks| marks - others)
    }

    /// Forgets waiter `id` of `key`; returns the marks it alone held, which are to go from
    /// the server.
    fn forget_flag(&mut self, key: i64, id: u64) -> Marks {
        let unused = self.marks_only_of(key, id);
        let Some(waiters) = self.flags.get_mut(&key) else {
            return Marks::NONE;
        };
        waiters.remove(&id);
        if waiters.is_empty() {
            self.flags.remove(&key);
            self.note_if_idle();
        }
        unused
    }

    /// Unlocks the hold `id` (notifying other processes' waiters), removes it from the session
    /// and passes its claim on. On any failure the session is closed, which frees the lock too.
    async fn unlock_held(&mut self, id: Uuid) -> Result<(), LockError> {
        let Some(held) = self.held.get(&id) else {
            return Err(LockError::LockLost);
        };
        let key = held.key;
        let (sql, args): (for<'s> fn(&'s Statements) -> &'s str, _) = match &held.hold {
            Hold::Lock(claim) if claim.mode() == LockMode::Exclusive => {
                (|sql| &sql.unlock, Args::Key(key))
            }
            Hold::Lock(_) => (|sql| &sql.unlock_shared, Args::Key(key)),
            &Hold::Permit { base, slot } => {
                (|sql| &sql.unlock_permit, Args::BaseAndSlot(base, slot))
            }
        };
        let result = self.query::<(bool, bool)>(sql, args).await;
        match result {
            Ok((true, notified)) => {
                if notified {
                    tracing::trace!(
                        advisory_key = key,
                        "released a lock that another process awaits"
                    );
                }
                self.held_remove_notified(id, notified);
                Ok(())
            }
            Ok((false, _)) => {
                tracing::warn!(
                    key,
                    "the server did not hold a lock this session had granted"
                );
                if let Some(held) = self.held_remove(id) {
                    held.lease.mark_lost();
                }
                Err(LockError::LockLost)
            }
            Err(Failure::Statement(error)) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    key,
                    "unlock failed; closing the session to free the lock"
                );
                self.lose_session(LockError::backend(error));
                Err(LockError::LockLost)
            }
            // `query` closed the session and marked every lease lost.
            Err(Failure::SessionLost(_)) => Err(LockError::LockLost),
        }
    }

    fn held_remove(&mut self, id: Uuid) -> Option<Held> {
        self.held_remove_notified(id, false)
    }

    /// Removes the hold `id` once the server no longer has it; `notified` says that its
    /// release notified waiters of other processes, who should then go first: a lock's claim
    /// passes on marked so, a permit's waiter here is woken told so.
    fn held_remove_notified(&mut self, id: Uuid, notified: bool) -> Option<Held> {
        let mut held = self.held.remove(&id)?;
        self.expiries.remove(&(held.expires_at, id));
        match &mut held.hold {
            Hold::Lock(claim) if notified => claim.set_yield_to_others(),
            Hold::Lock(_) => {}
            &mut Hold::Permit { base, slot } => {
                self.forget_permit_slot(base, slot);
                self.hub.wake_local(base, notified);
            }
        }
        self.note_if_idle();
        Some(held)
    }

    /// After a failed lock statement: makes sure the key is not left locked on this session
    /// (on the side `mode`).
    async fn force_unlock(&mut self, key: i64, mode: LockMode) {
        let sql: for<'s> fn(&'s Statements) -> &'s str = match mode {
            LockMode::Exclusive => |_| "SELECT pg_advisory_unlock($1)",
            LockMode::Shared => {
                if self.held.values().any(|held| held.key == key) {
                    // The server counts this session's shared locks of the key, and nothing
                    // tells whether the failed statement took one: unlocking one could take
                    // the lock from another holder. Closing the session frees them all, and
                    // their guards report lost.
                    self.lose_session(LockError::backend_msg(
                        "a shared lock statement failed on a key this session holds shared",
                    ));
                    return;
                }
                |_| "SELECT pg_advisory_unlock_shared($1)"
            }
        };
        let result = self.query::<(bool,)>(sql, Args::Key(key)).await;
        if let Err(Failure::Statement(error)) = result {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                key,
                "cleanup unlock failed; closing the session"
            );
            self.lose_session(LockError::backend(error));
        }
    }

    /// Runs one statement (the text `sql` picks, with `args`) on the session's connection,
    /// opening it if needed, under the command timeout. Any doubt about the connection closes
    /// it: see [`Failure`].
    async fn query<T>(
        &mut self,
        sql: for<'s> fn(&'s Statements) -> &'s str,
        args: Args,
    ) -> Result<T, Failure>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin + 'static,
    {
        if self.connection.is_none() {
            self.connection = Some(self.connect().await.map_err(Failure::SessionLost)?);
        }
        let connection = self
            .connection
            .as_mut()
            .and_then(SessionConnection::get_mut)
            .expect("connected above");
        let sent_at = Instant::now();
        self.last_used = sent_at;
        let query = sqlx::query_as::<_, T>(sql(&self.sql));
        let query = match args {
            Args::None => query,
            Args::Key(key) => query.bind(key),
            Args::KeyAnd2(key, first, second) => query.bind(key).bind(first).bind(second),
            Args::KeyAnd3(key, first, second, third) => {
                query.bind(key).bind(first).bind(second).bind(third)
            }
            Args::Oids(high, low) => query.bind(high).bind(low),
            Args::Base(base) => query.bind(base),
            Args::BaseAndSlot(base, slot) => query.bind(base).bind(slot),
            Args::BaseAndSlots(base, slots) => query.bind(base).bind(slots),
            Args::Permit(base, limit, slots, switch) => {
                query.bind(base).bind(limit).bind(slots).bind(switch)
            }
        };
        let timeout = self.settings.command_timeout;
        let outcome = tokio::time::timeout(timeout, query.fetch_one(connection)).await;
        let answered = match &outcome {
            Ok(Ok(_)) => true,
            Ok(Err(error)) => is_statement_error(error),
            Err(_) => false,
        };
        if answered {
            // The server answered and the session goes on: it had this connection (and its
            // locks) at `sent_at`.
            self.bound
                .confirm(sent_at + self.settings.connection_bound());
        }
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if is_statement_error(&error) => return Err(Failure::Statement(error)),
            Ok(Err(error)) => LockError::backend(error),
            Err(_) => LockError::backend_msg(format!(
                "a PostgreSQL lock statement took longer than {timeout:?}"
            )),
        };
        self.lose_session(error.clone());
        Err(Failure::SessionLost(error))
    }

    /// Opens the session's connection ([`open_session`]); an answer from the server counts
    /// from when the opening started.
    async fn connect(&mut self) -> Result<SessionConnection, LockError> {
        let started = Instant::now();
        let connection = open_session(&self.pool, &self.settings, &self.sql).await?;
        tracing::debug!("opened a PostgreSQL lock session");
        if std::mem::take(&mut self.lost_since_open) {
            crate::observe::reconnected("postgres", "session");
        }
        self.bound
            .confirm(started + self.settings.connection_bound());
        self.last_used = Instant::now();
        self.idle_since = Instant::now();
        Ok(connection)
    }

    /// The connection broke or is in doubt: close it at once (the server then drops every
    /// lock and flag it held), mark every lease lost and let the waiting tasks of this process
    /// in.
    fn lose_session(&mut self, cause: LockError) {
        // Dropping the connection closes its socket at once, without a goodbye to the server.
        self.connection = None;
        self.lost_since_open = true;
        if !self.held.is_empty() {
            tracing::warn!(
                locks = self.held.len(),
                %cause,
                "PostgreSQL lock session lost; its locks are gone"
            );
        }
        // Every claim is let go before any guard hears of the loss, so a guard that reacts
        // (takes its key again, checks its neighbours) finds the session's state settled.
        let leases: Vec<Arc<Lease>> = self.held.drain().map(|(_, held)| held.lease).collect();
        self.expiries.clear();
        self.flags.clear();
        for (base, _) in self.permit_slots.drain() {
            self.hub.wake_local(base, false);
        }
        self.idle_since = Instant::now();
        for lease in leases {
            lease.mark_lost();
        }
    }

    async fn close_gracefully(&mut self) {
        if !self.holds_nothing() {
            self.lose_session(LockError::backend_msg("lock session closed"));
            return;
        }
        if let Some(connection) = self.connection.take() {
            connection.close(self.settings.command_timeout).await;
        }
    }
}

/// A session dropped without closing (its task was dropped with its runtime): the connection
/// closes with it, and so every lock it held is gone; its guards must say so.
impl Drop for Session {
    fn drop(&mut self) {
        self.lose_session(LockError::backend_msg(
            "the lock session was dropped with its runtime",
        ));
    }
}

/// A timer deadline that stands for "not armed".
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 60 * 60)
}
