//! The Redis backend: `SET NX PX` through atomic Lua scripts, fencing tokens, a fair queue of
//! waiters, wake-on-release over pub/sub and opt-in auto-extension.
//!
//! The wire protocol (key layout, values, scripts, channel) is documented in docs/redis.md.

mod acks;
mod builder;
mod connection;
mod handle;
mod keys;
mod permits;
mod scripts;
mod wake;
mod watchdog;

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bb8::Pool;
use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use self::acks::{Exclusive, ReplicaAcks};
pub use self::builder::RedisDistributedLockBuilder;
use self::connection::Connections;
use self::handle::{
    abandon_in_background, millis, release_in_background, Grant, HeldClaim, LockRef, RedisHandle,
    Token,
};
use self::keys::LockKeys;
use self::scripts::{Arg, ACQUIRE, IS_LOCKED, PERMIT_ACQUIRE};
use self::wake::{Registration, WakeHub};
pub use self::watchdog::AutoExtend;
use super::claims::{Claim, ClaimTable, KeyClaim, Overdue};
use super::jitter::Jitter;
use super::want::Want;
use crate::observe::{observe_acquire, Mode, ShownKey};
use crate::{
    validate_key, DistributedLock, DistributedRwLock, Lease, LockConfig, LockError, LockGuard,
    LockMode,
};

/// A distributed lock on Redis (feature `redis`).
///
/// * **Protocol.** A lock is the Redis key `<prefix>{<key>}` holding the holder's random token
///   with a `PX` expiry; taking, releasing and extending it are Lua scripts that compare the
///   token, so a stale holder never touches a newer holder's lock. Every key of one lock
///   shares one hash tag, so it works on Redis Cluster too. See docs/redis.md.
/// * **Fencing tokens** strictly increase per key, taken in the same script as the `SET NX`.
/// * **Fair waiting.** The tasks of one lock object queue in the process per key; a release
///   with one of them waiting passes the lock to it in the same script. Across processes,
///   `acquire` queues the caller in Redis (first in, first out); a release hands the lock to
///   the head of the line and, with
///   [`wake_on_release`](RedisDistributedLockBuilder::wake_on_release), wakes it over pub/sub
///   at once (a subscribed waiter renews its place about once a second). Without it (or while
///   the pub/sub connection is down) waiters poll every `retry_interval` (at most 500 ms) with
///   jitter. Places of waiters that vanish expire. While waiters are in line, a lock that was
///   just released is promised to the first of them:
///   `try_acquire` (which never queues) gets [`LockError::AlreadyLocked`] and `is_locked`
///   says `true` until that waiter has taken it.
/// * **Every command has a timeout** ([`command_timeout`](RedisDistributedLockBuilder::command_timeout),
///   default 1 s): Redis being down gives [`LockError::BackendError`], never a hang.
/// * **Readers and writers.** [`DistributedRwLock`] is implemented: shared holders of a key
///   are the members of `<prefix>{<key>}:readers`, scored by the end of their lease, and wait
///   in the same line as writers. A shared caller goes in while no writer holds the key or
///   waits ahead of it, so a waiting writer stops new readers of every process, and the
///   readers queued before the next writer go in together, each woken on its own channel.
///   Extend, release, drop, lease loss and cancellation work as for exclusive guards.
/// * **Permits.** [`DistributedSemaphore`](crate::DistributedSemaphore) is implemented: the
///   holders of a key's permits are the members of `<prefix>{<key>}:permits`, scored by the
///   end of their lease, with a line of their own (`…:permits:line`) and the key's fencing
///   counter. A caller gets a permit while the live holders and the waiters ahead of it are
///   fewer than its limit; each waiting task has its own place in the Redis line (the tasks
///   of a lock object take no turns in the process for permits), and a released permit wakes
///   the first waiter, which wakes the next as it goes in.
/// * **Auto-extension** is opt-in: [`AutoExtend`].
/// * **Dropping a guard** releases its lock in a task on the current Tokio runtime. Outside a
///   runtime, or while that runtime shuts down (the task is dropped before it sends the
///   release), the lock stays until its TTL runs out and a warning names the key: release
///   guards explicitly before shutting a runtime down.
///
/// Clones share the connection and the pub/sub subscriber.
///
/// ```no_run
/// use std::time::Duration;
/// use k1s0_distributed_lock::{bb8_redis, AutoExtend, DistributedLock, LockConfig, RedisDistributedLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let manager = bb8_redis::RedisConnectionManager::new("redis://127.0.0.1:6379")?;
/// let pool = bb8_redis::bb8::Pool::builder().build(manager).await?;
///
/// // The simple form: waiters poll.
/// let lock = RedisDistributedLock::new(pool.clone(), LockConfig::new());
///
/// // With wake-on-release and a watchdog.
/// let lock = RedisDistributedLock::builder(pool)
///     .config(LockConfig::new().ttl(Duration::from_secs(10)))
///     .wake_on_release(bb8_redis::redis::Client::open("redis://127.0.0.1:6379")?)
///     .auto_extend(AutoExtend::new(Duration::from_secs(300)))
///     .build()?;
///
/// let guard = lock.acquire("invoice:17").await?;
/// // ... work, passing guard.fencing_token() to storage ...
/// guard.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisDistributedLock {
    shared: Arc<Shared>,
}

/// What the lock object, its guards and their watchdogs share.
pub(crate) struct Shared {
    connections: Connections,
    /// The tasks of this lock object queue here per key, first in, first out; only the first
    /// in line talks to Redis, and a release hands the key to the next at once.
    claims: Arc<RedisClaims>,
    prefix: String,
    config: LockConfig,
    fence_retention: Duration,
    auto_extend: Option<AutoExtend>,
    wake: Option<WakeHub>,
    /// `WAIT` for replicas after every acquire and extend that wrote (opt-in).
    replica_acks: Option<ReplicaAcks>,
}

/// The longest a waiter sleeps between two looks at the lock when no message wakes it.
const MAX_POLL: Duration = Duration::from_millis(500);
const MIN_POLL: Duration = Duration::from_millis(2);
/// How much longer than its polling period a waiter's queue entry lives.
const QUEUE_ENTRY_SLACK: Duration = Duration::from_millis(200);
/// How often a waiter whose release channel is subscribed renews its place in line (it is
/// woken by the release message, or at the holder's expiry when it is next)…
const SUBSCRIBED_REFRESH: Duration = Duration::from_secs(1);
/// …and how long that place lives: a waiter that vanished holds the line up this long at most.
const SUBSCRIBED_ENTRY_TTL: Duration = SUBSCRIBED_REFRESH
    .saturating_mul(3)
    .saturating_add(QUEUE_ENTRY_SLACK);
/// A lock granted with less than `ttl / MIN_LEASE_LEFT_DIVISOR` of its lease left (Redis
/// answered that slowly) is given back instead of handed out.
const MIN_LEASE_LEFT_DIVISOR: u32 = 10;

impl RedisDistributedLock {
    /// A lock on this pool with the defaults: prefix `lock:`, command timeout 1 s, no
    /// auto-extension, and waiters that poll (no pub/sub connection): the queue keeps them
    /// fair, but a released lock reaches the next waiter only at its next poll, within one
    /// `retry_interval` (at most 500 ms). Use [`builder`](Self::builder) with
    /// [`wake_on_release`](RedisDistributedLockBuilder::wake_on_release) for hand-offs in
    /// about a tenth of a millisecond.
    ///
    /// Use [`builder`](Self::builder) for the other settings.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid ([`LockConfig::validate`] refuses it), with the reason.
    /// Use [`try_new`](Self::try_new) to get the error instead.
    #[track_caller]
    pub fn new(pool: Pool<RedisConnectionManager>, config: LockConfig) -> Self {
        Self::try_new(pool, config).unwrap_or_else(|error| panic!("{error}"))
    }

    /// Like [`new`](Self::new), but an invalid configuration is returned as
    /// [`LockError::InvalidConfig`] instead of a panic.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::bb8_redis::{bb8, RedisConnectionManager};
    /// use k1s0_distributed_lock::{LockConfig, LockError, RedisDistributedLock};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let manager = RedisConnectionManager::new("redis://127.0.0.1:6379")?;
    /// let pool = bb8::Pool::builder().build_unchecked(manager);
    /// let refused = RedisDistributedLock::try_new(pool, LockConfig::new().ttl(Duration::ZERO));
    /// assert!(matches!(refused, Err(LockError::InvalidConfig { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_new(
        pool: Pool<RedisConnectionManager>,
        config: LockConfig,
    ) -> Result<Self, LockError> {
        Self::builder(pool).config(config).build()
    }

    /// Starts building a lock on this pool with further settings.
    pub fn builder(pool: Pool<RedisConnectionManager>) -> RedisDistributedLockBuilder {
        RedisDistributedLockBuilder::new(pool)
    }

    /// The lock configuration.
    pub fn config(&self) -> &LockConfig {
        &self.shared.config
    }

    /// The prefix of every Redis key this lock uses.
    pub fn key_prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The Redis key that holds the lock of `key` (`<prefix>{<escaped key>}`), for inspection
    /// and for clients in other languages. See docs/redis.md for the escaping.
    pub fn redis_key(&self, key: &str) -> String {
        keys::lock_name(&self.shared.prefix, key)
    }

    /// `key` as this lock's log events show it.
    fn shown_key<'a>(&self, key: &'a str) -> ShownKey<'a> {
        self.shared.config.get_trace_keys().show(key)
    }

    /// Acquires what `want` says of `key`: at once or never (a try), or waiting within the
    /// budget (`wait_call`).
    async fn take(&self, key: &str, want: Want, wait_call: bool) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        want.validate()?;
        let config = &self.shared.config;
        config.validate()?;
        let ttl = config.get_ttl();
        let budget = config.wait_budget();
        let wait = wait_call && !budget.is_zero();
        let started = Instant::now();
        let poll = config.get_retry_interval().clamp(MIN_POLL, MAX_POLL);
        let claim = match want {
            // Permits skip the turns among the tasks of this lock object: several of them
            // hold a key's permits at once, and each waits in the Redis line with a token of
            // its own.
            Want::Permit { .. } => None,
            Want::Lock(mode) => {
                // Every caller takes its turn among the tasks of this lock object first, so
                // that a shared one waits for the writers of this process that hold or wait
                // for the key. A shared caller lets its turn go once its first look at Redis
                // is answered (it holds the key, or has its place in the Redis line) and goes
                // on with a token of its own, so that Redis alone orders it against every
                // writer, of this process or another: a writer of this process behind it then
                // waits in the Redis line, where it stops new readers of every process.
                let Some(mut claim) = self.claim(key, mode, wait, started + budget).await? else {
                    return Err(if wait_call {
                        LockError::Timeout
                    } else {
                        LockError::AlreadyLocked
                    });
                };
                if mode == LockMode::Exclusive {
                    if let Some(grant) = claim.take_baton() {
                        // The task before this one passed the lock over as it released it.
                        let (lock, fence, sent_at) = grant.into_parts();
                        if lease_left_is_usable(sent_at, ttl) {
                            tracing::debug!(key = %lock.shown_key(), "lock handed over");
                            return Ok(self.guard(lock, Some(claim), sent_at, ttl, fence));
                        }
                        give_back(lock).await;
                    }
                }
                Some(claim)
            }
        };
        let mut pending =
            PendingAcquire::new(&self.shared, key, want, Token::new(want.mode()), claim);
        let mut registration: Option<Registration> = None;
        let mut jitter = Jitter::new(pending.token.id);
        let mut waiting = false;
        loop {
            // A waiter whose release channel is subscribed relies on the message and keeps a
            // long-lived place in line; one that polls keeps a short one, so that if it
            // vanishes, the line moves on soon.
            let subscribed = registration
                .as_ref()
                .is_some_and(Registration::is_subscribed);
            let entry_ttl = match (wait, subscribed) {
                (false, _) => 0,
                (true, false) => millis(poll * 3 + QUEUE_ENTRY_SLACK),
                (true, true) => millis(SUBSCRIBED_ENTRY_TTL),
            };
            let answer = pending.attempt(ttl, entry_ttl).await;
            if want == Want::Lock(LockMode::Shared) {
                // Answered or not, a shared caller's turn in this process ends here.
                drop(pending.claim.take());
            }
            let (outcome, sent_at) = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    // No usable answer: the tasks queued behind cannot tell whether the key is
                    // held (the turn passes on with the answer owed).
                    drop(pending.claim.take());
                    return Err(error);
                }
            };
            if outcome > 0 {
                let acknowledged = pending.acknowledge().await;
                let token = pending.token;
                let (lock, claim) = pending.disarm();
                if let Err(error) = acknowledged {
                    // Not known to survive a failover: not handed out.
                    give_back(lock).await;
                    return Err(error);
                }
                if lease_left_is_usable(sent_at, ttl) {
                    return Ok(self.guard(lock, claim, sent_at, ttl, outcome as u64));
                }
                // The answer came so late that the lock is about to expire: give it back
                // rather than hand out a guard that is lost on arrival.
                let left = (sent_at + ttl).saturating_duration_since(Instant::now());
                tracing::warn!(
                    key = %lock.shown_key(),
                    ?ttl,
                    ?left,
                    "a lock was granted too late to use; giving it back"
                );
                give_back(lock).await;
                if !wait || Instant::now() >= started + budget {
                    return Err(LockError::backend_msg(format!(
                        "the lock was granted with {left:?} of its {ttl:?} TTL left (Redis \
                         answered too slowly to use it) and given back"
                    )));
                }
                // Wait on with the same token: its registration for wake-ups stays valid.
                pending = PendingAcquire::new(&self.shared, key, want, token, claim);
                continue;
            }
            if !wait {
                // A try without queueing wrote nothing. An acquire with an empty waiting
                // budget that found the lock taken timed out.
                pending.connection = None;
                return Err(if wait_call {
                    LockError::Timeout
                } else {
                    LockError::AlreadyLocked
                });
            }
            if !waiting {
                waiting = true;
                tracing::debug!(key = %self.shown_key(key), line = "backend", "waiting for the lock");
            }
            if registration.is_none() {
                if let Some(hub) = &self.shared.wake {
                    // Subscribe, then look again at once: a release between the first attempt
                    // and the subscription would otherwise go unnoticed.
                    let mut buffer = [0u8; 38];
                    let token = pending.token.text(&mut buffer);
                    // A channel of the waiter's own: a release reaches one subscriber, however
                    // many wait for the key.
                    let subscribing = hub.register(format!("{}:{token}", pending.keys.channel()));
                    subscribing.subscribed_within(poll).await;
                    registration = Some(subscribing);
                    continue;
                }
            }
            let now = Instant::now();
            let deadline = started + budget;
            if now >= deadline {
                pending.give_up().await;
                return Err(LockError::Timeout);
            }
            // Only while the place written just now is long-lived and the channel still
            // subscribed does the waiter look rarely.
            let relies_on_messages = subscribed
                && registration
                    .as_ref()
                    .is_some_and(Registration::is_subscribed);
            let mut wake_at = if relies_on_messages {
                now + jitter.between(SUBSCRIBED_REFRESH * 3 / 4, SUBSCRIBED_REFRESH)
            } else {
                now + jitter.between(poll / 2, poll)
            };
            if outcome < 0 {
                // Next in line: look again when the holder's lease ends at the latest.
                wake_at = wake_at.min(now + Duration::from_millis(outcome.unsigned_abs()));
            }
            let wake_at = wake_at.min(deadline);
            match &registration {
                Some(registration) => {
                    tokio::select! {
                        () = registration.notified() => {}
                        () = tokio::time::sleep_until(wake_at) => {}
                    }
                }
                None => tokio::time::sleep_until(wake_at).await,
            }
        }
    }

    /// The key's turn among the tasks of this lock object: at once or never (`None`) for a
    /// try, else within the waiting budget (queued first in, first out). A queued task whose
    /// budget runs out gets `Timeout` only if the key is known to be held; if the task ahead
    /// is still waiting for Redis to answer about it, that answer decides (see
    /// [`ClaimTable::overdue`]).
    async fn claim(
        &self,
        key: &str,
        mode: LockMode,
        wait: bool,
        deadline: Instant,
    ) -> Result<Option<RedisClaim>, LockError> {
        let claims = &self.shared.claims;
        let name: Arc<str> = Arc::from(key);
        if !wait {
            return Ok(claims.try_claim(name, mode));
        }
        let mut turn = match claims.claim_or_queue(Arc::clone(&name), mode) {
            Claim::Claimed(claim) => return Ok(Some(claim)),
            Claim::Queued(turn) => turn,
        };
        tracing::debug!(key = %self.shown_key(key), line = "process", "waiting for the lock");
        match tokio::time::timeout_at(deadline, &mut turn).await {
            Ok(Ok(claim)) => Ok(Some(claim)),
            Ok(Err(_)) => Err(LockError::backend_msg("the lock claim queue was dropped")),
            Err(_) => {
                let give_up_at = deadline + self.shared.connections.timeout();
                match claims.overdue(&name, turn, give_up_at).await {
                    Overdue::Held => Err(LockError::Timeout),
                    Overdue::Unanswered => Err(LockError::backend_msg(format!(
                        "no answer from Redis about this key: the task ahead in this process \
                         sent a command that was not answered within the waiting budget of \
                         {:?} and the command timeout",
                        self.shared.config.wait_budget()
                    ))),
                    Overdue::Claimed(claim) => Ok(Some(claim)),
                }
            }
        }
    }

    fn guard(
        &self,
        lock: LockRef,
        claim: Option<RedisClaim>,
        sent_at: Instant,
        ttl: Duration,
        fence: u64,
    ) -> LockGuard {
        let lease = Lease::new(sent_at, ttl);
        let (key, token) = (Arc::clone(&lock.key), lock.token);
        let lock = Arc::new(lock);
        let watchdog = self.shared.auto_extend.map(|settings| {
            watchdog::start(
                Arc::clone(&lock),
                Arc::clone(&lease),
                ttl,
                sent_at,
                settings,
            )
        });
        LockGuard::from_shared(
            key,
            token.id,
            fence,
            Arc::clone(&lease),
            Arc::new(RedisHandle {
                lock,
                watchdog,
                claim: HeldClaim::new(claim, &lease),
            }),
        )
        .with_mode(token.mode)
    }

    async fn locked(&self, key: &str) -> Result<bool, LockError> {
        validate_key(key)?;
        // Only the three names the script reads.
        let lock = keys::lock_name(&self.shared.prefix, key);
        let waiters = keys::with_suffix(&lock, keys::WAITERS);
        let readers = keys::with_suffix(&lock, keys::READERS);
        let held = self
            .shared
            .connections
            .script(
                &IS_LOCKED,
                &[lock.as_str(), waiters.as_str(), readers.as_str()],
                &[],
            )
            .await?;
        Ok(held == 1)
    }
}

impl std::fmt::Debug for RedisDistributedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDistributedLock")
            .field("config", &self.shared.config)
            .field("prefix", &self.shared.prefix)
            .field("command_timeout", &self.shared.connections.timeout())
            .field("fence_retention", &self.shared.fence_retention)
            .field("auto_extend", &self.shared.auto_extend)
            .field("wake_on_release", &self.shared.wake.is_some())
            .field(
                "replica_acks",
                &self
                    .shared
                    .replica_acks
                    .as_ref()
                    .map(|acks| (acks.replicas(), acks.timeout())),
            )
            .finish()
    }
}

impl DistributedLock for RedisDistributedLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Try,
            LockMode::Exclusive.as_str(),
            self.take(key, Want::Lock(LockMode::Exclusive), false),
        )
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Wait,
            LockMode::Exclusive.as_str(),
            self.take(key, Want::Lock(LockMode::Exclusive), true),
        )
    }

    fn is_locked(&self, key: &str) -> impl Future<Output = Result<bool, LockError>> + Send {
        self.locked(key)
    }

    fn validate(&self) -> Result<(), LockError> {
        self.config().validate()
    }

    fn key_visibility(&self) -> crate::KeyVisibility {
        self.config().get_trace_keys()
    }
}

impl DistributedRwLock for RedisDistributedLock {
    fn try_acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Try,
            LockMode::Shared.as_str(),
            self.take(key, Want::Lock(LockMode::Shared), false),
        )
    }

    fn acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Wait,
            LockMode::Shared.as_str(),
            self.take(key, Want::Lock(LockMode::Shared), true),
        )
    }
}

/// Whether a lease granted by a command sent at `sent_at` has enough left to hand out: Redis
/// may answer so late that the lock is about to expire.
fn lease_left_is_usable(sent_at: Instant, ttl: Duration) -> bool {
    (sent_at + ttl).saturating_duration_since(Instant::now()) >= ttl / MIN_LEASE_LEFT_DIVISOR
}

/// Releases a granted lock that is not handed out (best effort: it expires at its TTL), and
/// waits for it. In a task of its own: a caller that gives up meanwhile must not leave the lock
/// held until its TTL.
async fn give_back(lock: LockRef) {
    if let Some(task) = release_in_background(lock, "a lock granted but not handed out") {
        let _ = task.await;
    }
}

/// An acquire in progress. If it is dropped after a command may have reached Redis (the
/// acquire was cancelled or failed), it leaves the queue and frees the lock in case the
/// interrupted command took it, in the background and on the same connection, so that Redis
/// runs the clean-up after the interrupted command.
struct PendingAcquire<'a> {
    shared: &'a Arc<Shared>,
    key: &'a str,
    want: Want,
    keys: Arc<LockKeys>,
    token: Token,
    /// The connection the acquire script was sent on; `Some` exactly while a clean-up may be
    /// needed (the drop sends it there).
    connection: Option<MultiplexedConnection>,
    /// With replica acknowledgement: the connection of its own that took the lock, kept for
    /// the `WAIT` that follows (see `acks.rs`).
    exclusive: Option<Exclusive>,
    /// This task's turn among the tasks of the lock object; passed on when the acquire ends
    /// without the lock, or moved into the guard.
    claim: Option<RedisClaim>,
}

/// A task's turn on one key among the tasks of one lock object (see [`ClaimTable`]).
pub(crate) type RedisClaim = KeyClaim<Arc<str>, RandomState, Grant>;
/// The turns of the tasks of one lock object, per key.
type RedisClaims = ClaimTable<Arc<str>, RandomState, Grant>;

impl<'a> PendingAcquire<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        key: &'a str,
        want: Want,
        token: Token,
        claim: Option<RedisClaim>,
    ) -> Self {
        PendingAcquire {
            shared,
            key,
            want,
            keys: Arc::new(LockKeys::of(want, &shared.prefix, key)),
            token,
            connection: None,
            exclusive: None,
            claim,
        }
    }

    /// Runs the acquire script once: the fencing token (> 0) when taken, else `-pttl` of the
    /// holder or 0; and when the command that ran it was sent (after the connection was open,
    /// and the `EVAL` after a `NOSCRIPT`), from which a lease granted by it counts.
    async fn attempt(
        &mut self,
        ttl: Duration,
        entry_ttl_ms: u64,
    ) -> Result<(i64, Instant), LockError> {
        let connections = &self.shared.connections;
        if let Some(claim) = self.claim.as_mut() {
            claim.asking_server();
        }
        let answer = match &self.shared.replica_acks {
            None => {
                let mut connection = connections.connection().await?;
                self.connection = Some(connection.clone());
                self.run_script(&mut connection, ttl, entry_ttl_ms).await?
            }
            Some(acks) => {
                // The script goes over the connection its `WAIT` will be sent on. The clean-up
                // goes there too, and may wait behind that `WAIT` (or, once the connection is
                // back among the idle ones, behind another operation's).
                let mut exclusive = acks.take(connections).await?;
                self.connection = Some(acks.patient(connections, &exclusive));
                let answer = self
                    .run_script(&mut exclusive.connection, ttl, entry_ttl_ms)
                    .await?;
                if answer.0 > 0 {
                    self.exclusive = Some(exclusive);
                } else {
                    acks.give_back(connections, exclusive);
                }
                answer
            }
        };
        if let Some(claim) = self.claim.as_mut() {
            claim.answered();
        }
        Ok(answer)
    }

    /// Sends the acquire script on `connection`: the lock's, or the permits' with the caller's
    /// limit and the prefix of the line's channels (it tells the next waiter when it lets the
    /// caller in from the line).
    async fn run_script(
        &self,
        connection: &mut MultiplexedConnection,
        ttl: Duration,
        entry_ttl_ms: u64,
    ) -> Result<(i64, Instant), LockError> {
        let mut buffer = [0u8; 38];
        let token = Arg::Text(self.token.text(&mut buffer));
        let ttl = Arg::Number(millis(ttl));
        let entry_ttl = Arg::Number(entry_ttl_ms);
        let retention = Arg::Number(millis(self.shared.fence_retention));
        let connections = &self.shared.connections;
        match (&*self.keys, self.want) {
            (LockKeys::Lock(names), _) => {
                let args = [token, ttl, entry_ttl, retention];
                connections
                    .script_on(connection, &ACQUIRE, &names.taking(), &args)
                    .await
            }
            (LockKeys::Permits(names), Want::Permit { limit }) => {
                let limit = Arg::Number(u64::from(limit));
                let args = [
                    token,
                    ttl,
                    entry_ttl,
                    retention,
                    limit,
                    Arg::Text(&names.channel),
                ];
                connections
                    .script_on(connection, &PERMIT_ACQUIRE, &names.taking(), &args)
                    .await
            }
            (LockKeys::Permits(_), Want::Lock(_)) => {
                unreachable!("the keys are made from what is wanted")
            }
        }
    }

    /// With replica acknowledgement on, after an attempt that took the lock: `WAIT` for the
    /// replicas on the connection that took it. If this is dropped while it waits, the drop's
    /// clean-up goes to that connection too, so Redis frees the lock after the `WAIT`.
    async fn acknowledge(&mut self) -> Result<(), LockError> {
        let (Some(acks), Some(exclusive)) = (&self.shared.replica_acks, self.exclusive.take())
        else {
            return Ok(());
        };
        acks.wait(
            &self.shared.connections,
            exclusive,
            "the lock was given back",
        )
        .await
    }

    /// The acquire succeeded: hand over the lock.
    fn disarm(mut self) -> (LockRef, Option<RedisClaim>) {
        self.connection = None;
        self.exclusive = None;
        (self.lock_ref(), self.claim.take())
    }

    /// The waiting budget ran out: leave the queue now (best effort; the entry times out
    /// anyway).
    /// Stays armed until the clean-up is done, so that if this is cancelled too, the clean-up
    /// is sent again in the background (it is idempotent).
    async fn give_up(mut self) {
        let Some(connection) = self.connection.clone() else {
            return;
        };
        let lock = self.lock_ref();
        if let Some(claim) = self.claim.as_mut() {
            claim.asking_server();
        }
        let answered = lock.abandon(connection).await;
        if let Err(error) = &answered {
            tracing::debug!(key = %lock.shown_key(), error = error as &dyn std::error::Error, "could not leave the wait queue; the entry times out");
        }
        if let Some(claim) = self.claim.as_mut() {
            match answered {
                Ok(_) => claim.answered(),
                Err(_) => claim.failed(),
            }
        }
        self.connection = None;
    }

    fn lock_ref(&self) -> LockRef {
        // The claim's copy of the key, when there is one: no second allocation.
        let key = match &self.claim {
            Some(claim) => Arc::clone(claim.key()),
            None => Arc::from(self.key),
        };
        LockRef {
            shared: Arc::clone(self.shared),
            key,
            keys: Arc::clone(&self.keys),
            token: self.token,
        }
    }
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        // The next task of this process may go at once: it asks Redis itself, and the clean-up
        // below touches only this acquire's token. (After a failed command `take` has passed
        // the turn on already, with the answer still owed; see `ClaimTable::overdue`.)
        if let Some(claim) = self.claim.take() {
            claim.withdraw();
        }
        let Some(connection) = self.connection.take() else {
            return;
        };
        let lock = self.lock_ref();
        tracing::debug!(key = %lock.shown_key(), "acquire interrupted; cleaning up in the background");
        abandon_in_background(
            lock,
            connection,
            "a lock an interrupted acquire may have taken",
        );
    }
}
