//! The PostgreSQL backend: session-level advisory locks multiplexed over a few long-lived
//! connections, with leases, fencing tokens from a sequence, and LISTEN/NOTIFY wake-ups.
//!
//! Modules, one job each:
//! * `key_hash` — key → 64-bit advisory key (SHA-256 prefix).
//! * `claims` — in-process exclusion per advisory key, FIFO ([`crate::backend::claims`]).
//! * `session` — the task that owns one connection and every statement on it (locks,
//!   unlocks, lease expiry, pings, closing a doubtful connection); `session::handle` is the
//!   callers' side (command channel, guard and waiter links).
//! * `setup` — what a connection goes through before it serves as a session (taken from the
//!   pool and never given back, the pooler check, the settings); `fencing` — the fencing
//!   sequence's checks and crash epoch.
//! * `timing` — the session timeouts and what derives from them; `statement_errors` — which
//!   statement errors leave a connection intact.
//! * `notify` — the LISTEN connection that wakes waiters when another process releases.
//! * `sql` — statement text and the fencing sequence name.
//! * `wait_marks` — the marks a waiter sets on the server: the waiter flag, and the
//!   writer-waiting and readers' turn marks that order the two sides across processes.
//! * `permits` — [`DistributedSemaphore`](crate::DistributedSemaphore): slots of a key's
//!   permit base, the process's line of permit waiters.
//! * `transaction` — transaction-scoped locks on the caller's own transaction.

mod fencing;
mod key_hash;
mod notify;
mod permits;
mod session;
mod setup;
mod sql;
mod statement_errors;
mod timing;
mod transaction;
mod wait_marks;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::oneshot::error::RecvError;
use tokio::time::Instant;

use self::claims::{Claim, ClaimTable, Overdue};
use self::key_hash::{advisory_key, AdvisoryKeyCache};
use self::notify::{Listener, WakeHub};
use self::session::{Attempt, Granted, HeldLockRef, SessionHandle, TryOutcome, WaitFlag};
use self::sql::{SequenceName, Statements, DEFAULT_SEQUENCE};
use self::timing::SessionSettings;
use self::wait_marks::Marks;
use super::jitter::Jitter;
use crate::config::validate_duration;
use crate::observe::{observe_acquire, Mode, ShownKey};
use crate::{
    validate_key, DistributedLock, DistributedRwLock, LockConfig, LockError, LockGuard, LockHandle,
    LockMode,
};

pub use self::transaction::TransactionLock;

/// The in-process claims ([`crate::backend::claims`]) on advisory keys.
mod claims {
    use super::key_hash::AdvisoryKeyHashing;
    use crate::backend::claims as keyed;

    pub(super) type ClaimTable = keyed::ClaimTable<i64, AdvisoryKeyHashing>;
    pub(super) type KeyClaim = keyed::KeyClaim<i64, AdvisoryKeyHashing>;
    pub(super) type Claim = keyed::Claim<i64, AdvisoryKeyHashing>;
    pub(super) type Overdue = keyed::Overdue<i64, AdvisoryKeyHashing>;
    pub(super) type Turn = keyed::Turn<i64, AdvisoryKeyHashing>;
}

/// Without `sessions(n)`, a lock service uses half its pool's connections as lock sessions,
/// within these bounds.
const MIN_DEFAULT_SESSIONS: usize = 1;
const MAX_DEFAULT_SESSIONS: usize = 8;
/// Most lock sessions one lock service may open.
const MAX_SESSIONS: usize = 64;
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_NETWORK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_CLOSE: Duration = Duration::from_secs(60);
/// How long a task of this process that is next in line waits before retaking a lock that was
/// just released to waiters of other processes: they were notified and retry about one round
/// trip later; if one of them takes the lock, this task is notified when it is released.
/// Measured in round trips of the waiter's own session, within these bounds.
const YIELD_ROUND_TRIPS: u32 = 3;
const MIN_YIELD_HEAD_START: Duration = Duration::from_micros(200);
const MAX_YIELD_HEAD_START: Duration = Duration::from_millis(20);

/// Distributed locks on PostgreSQL advisory locks (feature `postgres`).
///
/// ```no_run
/// use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
/// let lock = PostgresDistributedLock::new(pool, LockConfig::new());
/// let guard = lock.acquire("invoice:2024-17").await?;
/// println!("fencing token {}", guard.fencing_token());
/// guard.release().await?;
/// # Ok(())
/// # }
/// ```
///
/// # How it works
///
/// * **Keys.** A key maps to the advisory key `i64::from_be_bytes(sha256(key)[..8])`; only
///   that number reaches the server (docs/postgres.md has test vectors and the SQL to compute
///   it elsewhere).
/// * **Connections.** Locks are multiplexed over a few *lock sessions* (half the pool by
///   default, [`PostgresDistributedLockBuilder::sessions`]), each a connection taken from the pool on
///   first use, plus one `LISTEN` connection once some `acquire` had to wait for another
///   process. A key always uses the same session; tasks of this process are kept apart on a
///   key by an in-process FIFO, because advisory locks are re-entrant within a session. A lock
///   session's connection is **never returned to the pool**: it is closed once it has held
///   nothing for a minute, when it fails, or when this lock service and its guards are gone.
/// * **Cancellation.** Every statement belongs to the session's task, not to the caller that
///   asked for it: a dropped `acquire` future cannot leave a statement half done; a lock
///   granted to a caller that is gone is unlocked before the session runs anything else.
///   Nothing ever waits inside the server (`pg_advisory_lock` is never used), so no queued
///   request can be granted later to nobody. A session whose task ended (its runtime shut
///   down) is started again on the runtime of the next operation.
/// * **Waiting.** Waiters in this process are woken directly by the release, first in first
///   out. A waiter whose key is held by another process flags the key (a shared advisory lock
///   in the two-integer key space); a release that finds the flag sends `pg_notify` in the same
///   statement, and the waiter retries at once. Retries every `retry_interval` (with jitter)
///   cover lost notifications. After the waiting budget ([`LockConfig::wait_budget`]):
///   [`LockError::Timeout`].
/// * **Leases.** A lock not extended within its TTL is unlocked by the session and its guard
///   reports [`is_lost`](LockGuard::is_lost). A session lock lasts only as long as its
///   connection, which can end at any moment (`pg_terminate_backend`, a crash, a failover, a
///   cut network): a guard also reports lost once its session has gone without an answer for
///   about the `network_timeout`, when the server may have freed it, but nothing can warn of
///   an abrupt end. Fencing tokens are the real protection. A session that fails (terminated
///   backend, broken network, timed-out statement) is closed and all its guards report lost.
///   A process cut off from the server loses its locks after about the
///   [`network_timeout`](PostgresDistributedLockBuilder::network_timeout) (10 s by default).
/// * **Shared side** ([`DistributedRwLock`]): `try_acquire_shared` and `acquire_shared` take
///   the key's advisory lock in shared mode; several readers of this process share their
///   session's lock (the server counts it), and guards of both sides release, extend, expire,
///   report lost and cancel alike. Within this process callers wait first in, first out, new
///   readers behind a waiting writer. **Across processes the order is phase-fair, not first in,
///   first out**: a writer waiting on the server holds a *writer-waiting mark* that keeps new
///   readers of every process out (writers are not starved), and readers that found the key
///   held by a writer hold a *readers' turn mark* while they wait, which keeps the next writer
///   out until they are in (readers are not starved). Within a phase, waiters of different
///   processes go in the order their retries reach the server. A reader refused because a
///   writer waits while another writer holds the key counts as having waited through that
///   writer, so a queue of writers cannot keep readers out. A writer that waits in this
///   process behind readers of this process sets the writer-waiting mark as soon as all those
///   readers hold their lock, so readers of other processes queue behind it; while one of
///   those readers still waits on the server (for a writer elsewhere, whose own mark keeps new
///   readers out), it does not. The SQL, for clients in other languages, is in
///   docs/postgres.md.
/// * **Permits** ([`DistributedSemaphore`](crate::DistributedSemaphore)): a key's permits are
///   the advisory locks `base + 0` to `base + limit - 1` of its [permit
///   base](Self::permit_base), so a limit is at most 65,536 (above is
///   [`LockError::InvalidConfig`]) and permits never conflict with locks. One statement takes
///   the first free slot and keeps it only if the key's permits held, counted after it in
///   `pg_locks`, are within the caller's limit. Permit guards are leased, extended, expired,
///   lost and cancelled like lock guards. Waiting: first in, first out among the tasks of this
///   lock service, woken directly by its releases; across processes the waiter flag and
///   `NOTIFY`, as for locks (not first in, first out).
/// * **Fencing tokens** come from one sequence (`public.k1s0_lock_fencing_seq`, created on first use,
///   `CACHE 1`), drawn in the same statement that takes the lock, without waiting for the
///   disk. They still increase across a server crash: the first lock session after crash
///   recovery (or a failover, or a restore) moves the sequence 2^40 ahead before any token is
///   drawn, detected by an unlogged marker table that crash recovery empties.
#[derive(Clone)]
pub struct PostgresDistributedLock {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: LockConfig,
    settings: SessionSettings,
    sql: Arc<Statements>,
    claims: Arc<ClaimTable>,
    /// The line of this process's tasks waiting for a permit, by permit base: the first holds
    /// the claim and is the one that asks the server (see `permits`).
    permit_line: Arc<ClaimTable>,
    key_cache: AdvisoryKeyCache,
    /// The lock sessions; one whose task has ended is started again on next use.
    sessions: Box<[Mutex<Option<SessionHandle>>]>,
    hub: Arc<WakeHub>,
    /// The LISTEN connection, started on first need and again if its task has ended.
    listener: tokio::sync::Mutex<Option<Listener>>,
    /// The fencing objects that transaction locks rely on were found (see `transaction`).
    transaction_fencing_ready: AtomicBool,
}

/// Options of a [`PostgresDistributedLock`] beyond [`new`](PostgresDistributedLock::new).
///
/// ```
/// use std::time::Duration;
/// use k1s0_distributed_lock::{LockConfig, PostgresDistributedLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), k1s0_distributed_lock::LockError> {
/// let pool = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1:5432/test").unwrap();
/// let lock = PostgresDistributedLock::builder(pool, LockConfig::new())
///     .sessions(4)
///     .command_timeout(Duration::from_secs(2))
///     .network_timeout(Duration::from_secs(20))
///     .fencing_sequence("locks.fencing")
///     .build()?;
/// # drop(lock);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresDistributedLockBuilder {
    pool: PgPool,
    config: LockConfig,
    /// `None`: half the pool's `max_connections` (see [`Self::sessions`]).
    sessions: Option<usize>,
    command_timeout: Duration,
    network_timeout: Duration,
    idle_close: Duration,
    sequence: String,
}

impl PostgresDistributedLockBuilder {
    /// How many lock sessions (pool connections that hold advisory locks) to use, 1 to 64.
    /// Default: half the pool's `max_connections`, from 1 to 8 (5 on a pool of 10), so that
    /// the other half stays for the application. Each session runs one statement at a time, so
    /// more sessions allow more lock operations in flight; a session takes its connection on
    /// first use and gives it up once it has held nothing for `idle_session_close`. Every lock takes an entry in the server's lock table, shared by
    /// all sessions and clients (about `max_locks_per_transaction × (max_connections +
    /// background processes)`); when it is full an acquire fails with
    /// [`LockError::BackendError`] and the locks already held stay.
    pub fn sessions(mut self, sessions: usize) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// Bound on taking a connection from the pool and on every statement (default 5 s).
    /// The server cancels a statement a little earlier (its `statement_timeout` and
    /// `lock_timeout` are this less a quarter, at most 1 s): that operation fails with
    /// [`LockError::BackendError`] and the session keeps its other locks. A statement with no
    /// answer at all by this deadline closes its session (its locks are then lost).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long the server keeps the session (and the locks) of a client it no longer hears
    /// from (default 10 s, at least 2 s). Sets the lock sessions' `idle_session_timeout`,
    /// `tcp_user_timeout` and TCP keepalives from it; the sessions ping every quarter of it.
    /// A guard counts its lock as lost (without a network call) once its session has had no
    /// answer to a statement sent in the last nine tenths of it. A quarter of it plus the
    /// [`command_timeout`](Self::command_timeout) must stay below those nine tenths
    /// ([`build`](Self::build) refuses other combinations).
    pub fn network_timeout(mut self, timeout: Duration) -> Self {
        self.network_timeout = timeout;
        self
    }

    /// Close a lock session's connection after it has held no lock for this long (default
    /// 60 s). The next lock on it takes a connection from the pool again.
    pub fn idle_session_close(mut self, idle: Duration) -> Self {
        self.idle_close = idle;
        self
    }

    /// The sequence that fencing tokens come from: `name` or `schema.name` (ASCII letters,
    /// digits, `_`). Default `public.k1s0_lock_fencing_seq`; a `name` without schema resolves
    /// through each role's `search_path`. Created with `CACHE 1` on first use if missing,
    /// together with the unlogged table `k1s0_lock_fencing_epochs` in the same schema that
    /// keeps tokens increasing across a server crash (see the crate's `docs/postgres.md`). A
    /// sequence created beforehand with `CACHE` above 1, a non-positive increment or `CYCLE` is
    /// refused when a lock session opens ([`LockError::BackendError`], nothing locked). Every
    /// process locking the same keys must use the same sequence.
    pub fn fencing_sequence(mut self, name: impl Into<String>) -> Self {
        self.sequence = name.into();
        self
    }

    /// Checks the options and the [`LockConfig`] and builds the lock service. Connections are
    /// opened on first use.
    ///
    /// Returns [`LockError::InvalidConfig`] for an invalid [`LockConfig`] or an option out of
    /// its range.
    pub fn build(self) -> Result<PostgresDistributedLock, LockError> {
        self.config.validate()?;
        let sessions = self.sessions.unwrap_or_else(|| {
            let half_the_pool = self.pool.options().get_max_connections() as usize / 2;
            half_the_pool.clamp(MIN_DEFAULT_SESSIONS, MAX_DEFAULT_SESSIONS)
        });
        if !(1..=MAX_SESSIONS).contains(&sessions) {
            return Err(LockError::invalid_config(format!(
                "sessions must be between 1 and {MAX_SESSIONS}, not {sessions}"
            )));
        }
        validate_duration(
            "command_timeout",
            self.command_timeout,
            Duration::from_millis(1),
            crate::MAX_DURATION,
        )?;
        validate_duration(
            "network_timeout",
            self.network_timeout,
            Duration::from_secs(2),
            Duration::from_secs(24 * 60 * 60),
        )?;
        validate_duration(
            "idle_session_close",
            self.idle_close,
            Duration::from_nanos(1),
            crate::MAX_DURATION,
        )?;
        let sequence = SequenceName::parse(&self.sequence)?;
        let settings = SessionSettings {
            command_timeout: self.command_timeout,
            network_timeout: self.network_timeout,
            idle_close: self.idle_close,
        };
        if settings.ping_interval() + settings.command_timeout >= settings.connection_bound() {
            return Err(LockError::invalid_config(format!(
                "command_timeout {:?} plus the ping interval {:?} (a quarter of \
                 network_timeout) must stay below {:?} (network_timeout {:?} less a tenth): \
                 otherwise the server may free the locks of a cut-off session before this \
                 process can know",
                settings.command_timeout,
                settings.ping_interval(),
                settings.connection_bound(),
                settings.network_timeout
            )));
        }
        Ok(PostgresDistributedLock {
            inner: Arc::new(Inner {
                pool: self.pool,
                config: self.config,
                settings,
                sql: Arc::new(Statements::new(&sequence)),
                claims: Arc::new(ClaimTable::default()),
                permit_line: Arc::new(ClaimTable::default()),
                key_cache: AdvisoryKeyCache::default(),
                sessions: (0..sessions).map(|_| Mutex::new(None)).collect(),
                hub: Arc::new(WakeHub::default()),
                listener: tokio::sync::Mutex::new(None),
                transaction_fencing_ready: AtomicBool::new(false),
            }),
        })
    }
}

impl PostgresDistributedLock {
    /// A lock service on `pool` with the default options (half the pool's connections as lock sessions, 1 to 8; 5 s command
    /// timeout, 10 s network timeout, sequence `public.k1s0_lock_fencing_seq`). Nothing is opened
    /// until the first lock operation, so this may run outside a runtime.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid ([`LockConfig::validate`] refuses it), with the reason.
    /// Use [`try_new`](Self::try_new) to get the error instead.
    #[track_caller]
    pub fn new(pool: PgPool, config: LockConfig) -> Self {
        Self::try_new(pool, config).unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`new`](Self::new), but an invalid configuration is returned as
    /// [`LockError::InvalidConfig`] instead of a panic.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{LockConfig, LockError, PostgresDistributedLock};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let pool = sqlx::PgPool::connect_lazy("postgres://postgres@127.0.0.1:5432/test").unwrap();
    /// let refused = PostgresDistributedLock::try_new(pool, LockConfig::new().ttl(Duration::ZERO));
    /// assert!(matches!(refused, Err(LockError::InvalidConfig { .. })));
    /// # }
    /// ```
    pub fn try_new(pool: PgPool, config: LockConfig) -> Result<Self, LockError> {
        Self::builder(pool, config).build()
    }

    /// Starts building a lock service with non-default options.
    pub fn builder(pool: PgPool, config: LockConfig) -> PostgresDistributedLockBuilder {
        PostgresDistributedLockBuilder {
            pool,
            config,
            sessions: None,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            network_timeout: DEFAULT_NETWORK_TIMEOUT,
            idle_close: DEFAULT_IDLE_CLOSE,
            sequence: DEFAULT_SEQUENCE.to_owned(),
        }
    }

    /// The configuration this lock service was built with.
    pub fn config(&self) -> &LockConfig {
        &self.inner.config
    }

    /// The 64-bit advisory lock key that `key` maps to: the first 8 bytes of SHA-256 of its
    /// UTF-8 bytes, big-endian. Look it up in `pg_locks` (`classid` = high 32 bits, `objid` =
    /// low 32 bits, `objsubid` = 1), or take it from another client with
    /// `pg_advisory_lock(bigint)`.
    ///
    /// ```
    /// use k1s0_distributed_lock::PostgresDistributedLock;
    ///
    /// assert_eq!(PostgresDistributedLock::advisory_key("order:42"), -2708853543617250617);
    /// ```
    pub fn advisory_key(key: &str) -> i64 {
        advisory_key(key)
    }

    /// The session of `key`, started on the current Tokio runtime if this is its first use or
    /// its task has ended (its runtime shut down): an error outside any runtime, as the
    /// session's task and connection need one.
    fn session_for(&self, key: i64) -> Result<SessionHandle, LockError> {
        let index = (key as u64 % self.inner.sessions.len() as u64) as usize;
        let mut slot = self.inner.sessions[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = slot.as_ref().filter(|session| session.is_running()) {
            return Ok(session.clone());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LockError::backend_msg(
                "a PostgreSQL lock session starts on the Tokio runtime of its first operation, \
                 and this operation runs outside any",
            ));
        }
        let session = SessionHandle::spawn(
            self.inner.pool.clone(),
            Arc::clone(&self.inner.sql),
            self.inner.settings,
            Arc::clone(&self.inner.hub),
        );
        Ok(slot.insert(session).clone())
    }

    fn guard(&self, key: &str, mode: LockMode, granted: Granted) -> LockGuard {
        let Granted {
            fencing_token,
            lease,
            lock,
        } = granted;
        LockGuard::from_shared(
            Arc::from(key),
            lock.id(),
            fencing_token,
            lease,
            Arc::new(PostgresLockHandle { lock }),
        )
        .with_mode(mode)
    }

    /// `key` as this lock's log events show it.
    fn shown_key<'a>(&self, key: &'a str) -> ShownKey<'a> {
        self.inner.config.get_trace_keys().show(key)
    }

    async fn try_acquire_once(&self, key: &str, mode: LockMode) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        self.inner.config.validate()?;
        let advisory = self.inner.key_cache.advisory_key(key);
        let Some(claim) = self.inner.claims.try_claim(advisory, mode) else {
            return Err(LockError::AlreadyLocked);
        };
        let session = self.session_for(advisory)?;
        let ttl = self.inner.config.get_ttl();
        match session
            .try_lock(claim, Attempt::FIRST, None, ttl, Instant::now())
            .await?
        {
            TryOutcome::Granted(granted) => Ok(self.guard(key, mode, granted)),
            TryOutcome::Busy(..) => Err(LockError::AlreadyLocked),
        }
    }

    async fn acquire_waiting(&self, key: &str, mode: LockMode) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        let config = self.inner.config;
        config.validate()?;
        let deadline = Instant::now() + config.wait_budget();
        let advisory = self.inner.key_cache.advisory_key(key);
        self.wait_again_if_session_lost(key, deadline, || {
            self.wait_for_lock(key, advisory, mode, deadline)
        })
        .await
    }

    /// Runs `wait` (one wait for `key` until `deadline`), and once more if the session died
    /// under a waiter that held nothing (terminated, or its connection broke): nothing was
    /// lost, so it waits on with a fresh session. A server that is really gone fails that
    /// second attempt at its first statement.
    async fn wait_again_if_session_lost<F, W>(
        &self,
        key: &str,
        deadline: Instant,
        wait: F,
    ) -> Result<LockGuard, LockError>
    where
        F: Fn() -> W,
        W: Future<Output = Result<LockGuard, WaitError>>,
    {
        match wait().await {
            Err(WaitError::SessionLostWhileWaiting(error)) if Instant::now() < deadline => {
                tracing::debug!(
                    error = &error as &dyn std::error::Error,
                    key = %self.shown_key(key),
                    "lock session lost while waiting; waiting on with a new one"
                );
                wait().await.map_err(WaitError::into_lock_error)
            }
            other => other.map_err(WaitError::into_lock_error),
        }
    }

    /// One wait for the side `mode` of `key` (whose advisory key is `advisory`) until
    /// `deadline`: in this process's queue, then on the server.
    async fn wait_for_lock(
        &self,
        key: &str,
        advisory: i64,
        mode: LockMode,
        deadline: Instant,
    ) -> Result<LockGuard, WaitError> {
        let config = self.inner.config;
        let ttl = config.get_ttl();

        // A writer's mark set while it waited in the process (see `wait_turn_marked`): kept
        // until this wait has set its own, so that readers elsewhere find the key marked
        // throughout.
        let mut early_mark: Option<WaitFlag> = None;
        // First in line among the tasks of this process.
        let claim = match self.inner.claims.claim_or_queue(advisory, mode) {
            Claim::Claimed(claim) => claim,
            Claim::Queued(mut turn) => {
                tracing::debug!(key = %self.shown_key(key), line = "process", "waiting for the lock");
                let waited = match mode {
                    LockMode::Exclusive => {
                        self.wait_turn_marked(advisory, &mut turn, deadline, &mut early_mark)
                            .await?
                    }
                    LockMode::Shared => tokio::time::timeout_at(deadline, &mut turn).await.ok(),
                };
                self.turn_taken(&self.inner.claims, advisory, turn, waited, deadline)
                    .await?
            }
        };
        let session = self.session_for(advisory)?;
        // The previous holder released while other processes waited: they were notified, so
        // let them go first instead of retaking the lock at once (fairness across processes).
        let yield_first = claim.yield_to_others();
        let mut attempt = Attempt::FIRST;
        let mut claim = if yield_first {
            claim
        } else {
            match session
                .try_lock(claim, attempt, None, ttl, Instant::now())
                .await?
            {
                TryOutcome::Granted(granted) => return Ok(self.guard(key, mode, granted)),
                TryOutcome::Busy(claim, busy, _) => {
                    attempt = attempt.after(busy);
                    claim
                }
            }
        };
        if Instant::now() >= deadline {
            return Err(LockError::Timeout.into());
        }

        // Another process holds it: listen, flag the key, retry on notification or timer.
        tracing::debug!(key = %self.shown_key(key), line = "backend", "waiting for the lock");
        let woken = self.inner.hub.subscribe(advisory);
        let flag_sent_at = Instant::now();
        let flag = session.wait_flag(advisory);
        let mut marked =
            Self::mark(&session, &mut claim, &flag, wanted_marks(mode, attempt)).await?;
        let mark_round_trip = flag_sent_at.elapsed();
        // This wait's own marks are set: the one of the wait in the process can go.
        drop(early_mark);
        // The marks first (a writer's keeps new readers out from now on), then the LISTEN
        // connection.
        let listening = self.listening_by(deadline).await;
        let head_start = self.head_start(mark_round_trip);
        let mut jitter = Jitter::new(uuid::Uuid::new_v4());
        if yield_first && marked.contains(Marks::FLAG) {
            let retry_at = (Instant::now() + head_start).min(deadline);
            tokio::select! {
                _ = woken.woken() => {}
                () = tokio::time::sleep_until(retry_at) => {}
            }
        }
        // A mark was refused because a statement was checking it (a release, an attempt of the
        // other side): retry at once, once.
        let mut retry_now = !marked.contains(wanted_marks(mode, attempt));
        // Races lost after a notification: each one shortens this waiter's random delay.
        let mut races_lost = 0;
        loop {
            match session
                .try_lock(claim, attempt, Some(&flag), ttl, Instant::now())
                .await
                .map_err(WaitError::while_waiting)?
            {
                TryOutcome::Granted(granted) => return Ok(self.guard(key, mode, granted)),
                TryOutcome::Busy(returned, busy, still_marked) => {
                    claim = returned;
                    attempt = attempt.after(busy);
                    // Marks lost with a connection are set again below.
                    marked = still_marked;
                }
            }
            if Instant::now() >= deadline {
                return Err(LockError::Timeout.into());
            }
            let wanted = wanted_marks(mode, attempt);
            if !marked.contains(wanted) {
                marked = Self::mark(&session, &mut claim, &flag, wanted).await?;
                if !marked.contains(wanted) && !std::mem::replace(&mut retry_now, true) {
                    continue;
                }
            }
            retry_now = false;
            // Without a flag no release notifies this process: poll.
            let notifiable = listening && marked.contains(Marks::FLAG);
            let now = Instant::now();
            let retry_at = (now + self.poll_interval(notifiable, &mut jitter)).min(deadline);
            let notified = tokio::select! {
                _ = woken.woken() => true,
                () = tokio::time::sleep_until(retry_at) => false,
            };
            if notified {
                // Waiters of several processes are notified by the same release and race for
                // the lock: the first statement to arrive wins. A random delay below the head
                // start makes each race a draw, so that a process whose notifications arrive a
                // little later does not lose every time; a waiter that lost races draws from a
                // shorter range, so it ages ahead of waiters that just arrived.
                let draw = jitter.between(Duration::ZERO, head_start / (1 + races_lost));
                tokio::time::sleep_until((Instant::now() + draw).min(deadline)).await;
                races_lost += 1;
            }
        }
    }

    /// The claim of a task queued in `table` for `key` (its place is `turn`) once it has
    /// `waited` for it until `deadline` (`None`: the budget ran out first). Then only the task
    /// ahead talks to the server: `Timeout` only if the key is known to be held, not when the
    /// server owes an answer (see [`ClaimTable::overdue`]).
    async fn turn_taken(
        &self,
        table: &Arc<ClaimTable>,
        key: i64,
        turn: claims::Turn,
        waited: Option<Result<claims::KeyClaim, RecvError>>,
        deadline: Instant,
    ) -> Result<claims::KeyClaim, WaitError> {
        match waited {
            Some(Ok(claim)) => Ok(claim),
            Some(Err(_)) => Err(LockError::backend_msg("the lock claim queue was dropped").into()),
            None => {
                let give_up_at = deadline + self.inner.settings.command_timeout;
                match table.overdue(&key, turn, give_up_at).await {
                    Overdue::Held => Err(LockError::Timeout.into()),
                    Overdue::Unanswered => Err(no_answer(self.inner.config.wait_budget()).into()),
                    Overdue::Claimed(claim) => Ok(claim),
                }
            }
        }
    }

    /// Sets the marks `wanted` of the waiter `flag` on the claimed key (see
    /// [`SessionHandle::set_marks`]); answers those it holds.
    async fn mark(
        session: &SessionHandle,
        claim: &mut claims::KeyClaim,
        flag: &WaitFlag,
        wanted: Marks,
    ) -> Result<Marks, WaitError> {
        claim.asking_server();
        // Dropped mid-way (the caller left), the question is withdrawn: the session skips a
        // command whose caller is gone, so nothing is owed.
        let question = OpenQuestion(claim);
        match session.set_marks(flag, wanted).await {
            Ok(marked) => {
                question.0.answered();
                Ok(marked)
            }
            Err(error) => {
                question.0.failed();
                Err(WaitError::while_waiting(error))
            }
        }
    }

    /// A writer's wait for its turn in this process, until `deadline` (`None` once it passes).
    /// Once it is next in line behind shared claims whose holders all have their lock on the
    /// server, the writer marks the key as awaited by a writer (W), so that readers of other
    /// processes queue behind it as they would behind a writer waiting on the server; from then
    /// on nothing can go in before it here, and the mark goes when its turn comes (its wait on
    /// the server sets W again). It marks nothing behind readers still waiting on the server:
    /// they wait for a writer elsewhere, whose own mark keeps new readers out, and marking past
    /// them could close a cycle with the same situation in another process. The mark only
    /// orders readers: a session that cannot set it leaves the writer waiting unmarked.
    async fn wait_turn_marked(
        &self,
        advisory: i64,
        turn: &mut claims::Turn,
        deadline: Instant,
        mark: &mut Option<WaitFlag>,
    ) -> Result<Option<Result<claims::KeyClaim, RecvError>>, LockError> {
        // False once the session failed to set the mark; `refused` until the next change after
        // the server refused it twice.
        let (mut marking, mut refused) = (true, false);
        loop {
            let signal = self.inner.claims.grant_signal(&advisory);
            // Made before the look below, so a change right after the look is not missed (a
            // `Notified` hears every `notify_waiters` from its creation on).
            let changed = signal.as_ref().map(|signal| signal.notified());
            let changed = async {
                match changed {
                    Some(changed) => changed.await,
                    None => std::future::pending().await,
                }
            };
            let next = marking
                && !refused
                && mark.is_none()
                && self.inner.claims.is_next_behind_granted_readers(turn);
            let marked = async {
                if next {
                    self.mark_writer_waiting(advisory).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                claim = &mut *turn => return Ok(Some(claim)),
                set = marked => match set {
                    Ok(set) => {
                        refused = set.is_none();
                        *mark = set;
                    }
                    Err(error) => {
                        tracing::debug!(
                            error = &error as &dyn std::error::Error,
                            advisory_key = advisory,
                            "could not mark the key as awaited by a writer; waiting unmarked"
                        );
                        marking = false;
                    }
                },
                () = changed, if marking && mark.is_none() && !next => refused = false,
                () = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    /// Sets the writer-waiting mark of `advisory` for a writer waiting in this process; dropping
    /// the returned link drops the mark. A mark refused because a reader's statement was
    /// checking it at that moment is tried once more; refused again, `None`: the writer tries
    /// again at the next change in its line.
    async fn mark_writer_waiting(&self, advisory: i64) -> Result<Option<WaitFlag>, LockError> {
        let session = self.session_for(advisory)?;
        let flag = session.wait_flag(advisory);
        for _ in 0..2 {
            let marked = session.set_marks(&flag, Marks::WRITER_WAITING).await?;
            if marked.contains(Marks::WRITER_WAITING) {
                return Ok(Some(flag));
            }
        }
        Ok(None)
    }

    /// The fallback retry period while waiting for another process: `retry_interval` with
    /// ±50 % jitter (so waiters of several processes spread out), shorter without a listener.
    fn poll_interval(&self, listening: bool, jitter: &mut Jitter) -> Duration {
        let base = self.inner.config.get_retry_interval();
        let base = if listening {
            base
        } else {
            base.min(Duration::from_millis(50))
        };
        jitter.between(base / 2, base).max(Duration::from_millis(1))
    }

    /// Makes sure the LISTEN connection runs ([`listener`](Self::listener)), giving up at
    /// `deadline`: its start takes a pool slot and may wait for one, never past the waiter's own
    /// deadline (a cancelled start leaves the cell for the next waiter). Whether it runs: if
    /// not, the waiter polls.
    async fn listening_by(&self, deadline: Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.listener()).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot LISTEN for lock releases; waiting by polling"
                );
                false
            }
            Err(_) => {
                tracing::debug!("no LISTEN connection within the waiting budget; polling");
                false
            }
        }
    }

    /// How long a waiter of this process lets waiters of other processes go first, from the
    /// round trip of its session: long enough for a notified waiter elsewhere to retry (about a
    /// round trip after the notification), short enough to cost little if none does.
    fn head_start(&self, round_trip: Duration) -> Duration {
        (round_trip * YIELD_ROUND_TRIPS)
            .clamp(MIN_YIELD_HEAD_START, MAX_YIELD_HEAD_START)
            .min(self.inner.config.get_retry_interval())
    }

    /// Makes sure the LISTEN connection runs, starting it (again) on the current runtime.
    async fn listener(&self) -> Result<(), LockError> {
        let mut listener = self.inner.listener.lock().await;
        if listener.as_ref().is_some_and(Listener::is_running) {
            return Ok(());
        }
        let started = Listener::start(
            &self.inner.pool,
            Arc::clone(&self.inner.hub),
            self.inner.settings.command_timeout,
        )
        .await?;
        *listener = Some(started);
        Ok(())
    }

    async fn is_locked_now(&self, key: &str) -> Result<bool, LockError> {
        validate_key(key)?;
        let advisory = self.inner.key_cache.advisory_key(key);
        self.session_for(advisory)?.is_locked(advisory).await
    }
}

/// The marks a waiter for the side `mode` sets while it waits on the server: the waiter flag,
/// and for a writer the writer-waiting mark, for a reader that found the key held
/// exclusively the readers' turn mark.
fn wanted_marks(mode: LockMode, attempt: Attempt) -> Marks {
    match mode {
        LockMode::Exclusive => Marks::FLAG | Marks::WRITER_WAITING,
        LockMode::Shared if attempt.heed_waiting_writers => Marks::FLAG,
        LockMode::Shared => Marks::FLAG | Marks::READERS_TURN,
    }
}

/// A claim's question to the server, withdrawn if it is dropped before it ends.
struct OpenQuestion<'a>(&'a mut claims::KeyClaim);

impl Drop for OpenQuestion<'_> {
    fn drop(&mut self) {
        // After `answered` or `failed` there is nothing left to withdraw.
        self.0.not_asked();
    }
}

/// A queued caller's budget ran out while the server owed an answer about its key.
fn no_answer(budget: Duration) -> LockError {
    LockError::backend_msg(format!(
        "no answer from the PostgreSQL server about this key: the task ahead in this process \
         sent a statement that was not answered within the waiting budget of {budget:?} and \
         the command timeout"
    ))
}

/// Why one wait for a lock ended without it.
enum WaitError {
    Lock(LockError),
    /// A backend failure after the server had answered this wait (it found the key held):
    /// the session was lost under a waiter that held nothing.
    SessionLostWhileWaiting(LockError),
}

impl WaitError {
    fn while_waiting(error: LockError) -> Self {
        match error {
            LockError::BackendError(_) => WaitError::SessionLostWhileWaiting(error),
            other => WaitError::Lock(other),
        }
    }

    fn into_lock_error(self) -> LockError {
        match self {
            WaitError::Lock(error) | WaitError::SessionLostWhileWaiting(error) => error,
        }
    }
}

impl From<LockError> for WaitError {
    fn from(error: LockError) -> Self {
        WaitError::Lock(error)
    }
}

impl std::fmt::Debug for PostgresDistributedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDistributedLock")
            .field("config", &self.inner.config)
            .field("sessions", &self.inner.sessions.len())
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl DistributedLock for PostgresDistributedLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Try,
            LockMode::Exclusive.as_str(),
            self.try_acquire_once(key, LockMode::Exclusive),
        )
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Wait,
            LockMode::Exclusive.as_str(),
            self.acquire_waiting(key, LockMode::Exclusive),
        )
    }

    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
        self.is_locked_now(key)
    }

    fn validate(&self) -> Result<(), LockError> {
        self.config().validate()
    }

    fn key_visibility(&self) -> crate::KeyVisibility {
        self.config().get_trace_keys()
    }
}

impl DistributedRwLock for PostgresDistributedLock {
    fn try_acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Try,
            LockMode::Shared.as_str(),
            self.try_acquire_once(key, LockMode::Shared),
        )
    }

    fn acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Wait,
            LockMode::Shared.as_str(),
            self.acquire_waiting(key, LockMode::Shared),
        )
    }
}

/// Releases and extends one PostgreSQL lock through its session.
struct PostgresLockHandle {
    lock: HeldLockRef,
}

impl LockHandle for PostgresLockHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(self.lock.release())
    }

    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(self.lock.extend(ttl))
    }

    fn release_on_drop(self: Arc<Self>) {
        // Dropping the last link queues the unlock on the session at once; no runtime needed.
        drop(self);
    }
}
