//! [`RedisDistributedLockBuilder`]: the settings of a Redis lock beyond [`LockConfig`].

use std::sync::Arc;
use std::time::Duration;

use bb8::Pool;
use bb8_redis::RedisConnectionManager;

use super::acks::ReplicaAcks;
use super::connection::Connections;
use super::keys::{validate_prefix, DEFAULT_PREFIX};
use super::wake::WakeHub;
use super::{AutoExtend, RedisDistributedLock, Shared};
use crate::config::validate_duration;
use crate::{LockConfig, LockError, MAX_DURATION};

/// The default timeout of every Redis command.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// The default age at which the command connection is replaced by a new one.
const DEFAULT_CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// The default time a key's fencing counter outlives its last acquire.
const DEFAULT_FENCE_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Builds a [`RedisDistributedLock`] with settings beyond [`LockConfig`].
///
/// ```no_run
/// use std::time::Duration;
/// use k1s0_distributed_lock::{bb8_redis, LockConfig, RedisDistributedLock};
///
/// # async fn build() -> Result<RedisDistributedLock, Box<dyn std::error::Error>> {
/// let url = "redis://127.0.0.1:6379";
/// let pool = bb8_redis::bb8::Pool::builder()
///     .build(bb8_redis::RedisConnectionManager::new(url)?)
///     .await?;
/// let lock = RedisDistributedLock::builder(pool)
///     .config(LockConfig::new().ttl(Duration::from_secs(15)))
///     .key_prefix("billing:lock:")
///     .command_timeout(Duration::from_millis(500))
///     .wake_on_release(bb8_redis::redis::Client::open(url)?)
///     .build()?;
/// # Ok(lock)
/// # }
/// ```
#[must_use]
pub struct RedisDistributedLockBuilder {
    pool: Pool<RedisConnectionManager>,
    config: LockConfig,
    key_prefix: String,
    command_timeout: Duration,
    connection_max_age: Duration,
    fence_retention: Duration,
    auto_extend: Option<AutoExtend>,
    wake_client: Option<redis::Client>,
    replica_acks: Option<(u32, Duration)>,
}

impl RedisDistributedLockBuilder {
    pub(crate) fn new(pool: Pool<RedisConnectionManager>) -> Self {
        RedisDistributedLockBuilder {
            pool,
            config: LockConfig::new(),
            key_prefix: DEFAULT_PREFIX.to_owned(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connection_max_age: DEFAULT_CONNECTION_MAX_AGE,
            fence_retention: DEFAULT_FENCE_RETENTION,
            auto_extend: None,
            wake_client: None,
            replica_acks: None,
        }
    }

    /// TTL and waiting budget (default [`LockConfig::new`]).
    pub fn config(mut self, config: LockConfig) -> Self {
        self.config = config;
        self
    }

    /// The prefix of every Redis key and channel (default `lock:`). It may not contain `{` or
    /// `}`: the keys carry their own hash tag.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The timeout of every Redis command, including opening a connection (default 1 s). A
    /// command that runs out of time fails with [`LockError::BackendError`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long the lock uses one connection before it opens a new one (default 60 s). The
    /// lock's commands share one multiplexed connection made by the pool's manager; it is
    /// replaced at once after a connection failure or an answer that the server is not the
    /// primary (`READONLY`, `MASTERDOWN`, `LOADING`, `CLUSTERDOWN`, `MOVED`, `ASK`), and at
    /// the latest at this age, so that a process follows a failover behind a DNS name even when
    /// the old primary still answers as one.
    pub fn connection_max_age(mut self, age: Duration) -> Self {
        self.connection_max_age = age;
        self
    }

    /// How long a key's last fencing token is kept after its last acquire (default 24 h).
    /// Every token is the larger of that stored token + 1 and the server clock in
    /// microseconds (docs/redis.md): the stored token is what keeps tokens increasing across a
    /// clock that steps back, for as long as it is kept.
    pub fn fence_retention(mut self, retention: Duration) -> Self {
        self.fence_retention = retention;
        self
    }

    /// Renews held locks automatically (off by default).
    pub fn auto_extend(mut self, settings: AutoExtend) -> Self {
        self.auto_extend = Some(settings);
        self
    }

    /// Wakes waiters as soon as the lock is released, over a pub/sub connection made with
    /// `client` (which should point at the same server as the pool). Without it, waiters poll
    /// every `retry_interval`.
    ///
    /// A subscribed waiter relies on the message: it keeps a longer-lived place in the Redis
    /// line and renews it about once a second, instead of looking at the lock every poll. The
    /// connection is pinged every second; when a ping goes unanswered within the command
    /// timeout or the connection closes, the waiters poll until a new connection has
    /// subscribed them again (a `warn` event says so). See "Waiting" in docs/redis.md.
    pub fn wake_on_release(mut self, client: redis::Client) -> Self {
        self.wake_client = Some(client);
        self
    }

    /// Waits, after every acquire that took a lock and every extend that renewed one, until
    /// `replicas` replicas of the Redis primary acknowledged the write, for at most `timeout`
    /// (`WAIT replicas timeout`; off by default).
    ///
    /// Redis replicates asynchronously: without this, a lock granted by the primary can be
    /// missing on the replica promoted after the primary fails, and a second holder then gets
    /// it (its fencing token is still larger: see docs/redis.md). With it:
    ///
    /// * **Acquire**: when fewer than `replicas` acknowledge within `timeout`, the lock is
    ///   released again and the acquire (also a waiting `acquire`) returns
    ///   [`LockError::BackendError`] saying how many acknowledged. The lease still counts
    ///   from the moment the acquire script was sent, so the wait uses up part of it.
    /// * **Extend** (also the [`AutoExtend`] watchdog's renewals): when not acknowledged in
    ///   time, the lock stays renewed on the primary and `extend` returns
    ///   [`LockError::BackendError`]; the guard's lease is not renewed (it keeps its earlier
    ///   deadline), so a watchdog whose renewals are never acknowledged lets the guard be
    ///   lost when that deadline passes.
    ///
    /// What it guarantees: a lock handed out is in the memory of at least `replicas`
    /// replicas, so a failover that promotes one of them keeps it. What it does not: `WAIT`
    /// does not wait for any disk (a replica that restarts without persistence forgets the
    /// lock), does not stop a failover from promoting a replica that did not acknowledge
    /// (with Sentinel or Cluster, configure the primary's `min-replicas-to-write` /
    /// `min-replicas-max-lag` as the server-side complement), and a lock given back for want
    /// of acknowledgements can survive on a replica, held by nobody until its TTL, when a
    /// failover follows at once. Redis Cluster with one node per shard: `WAIT` counts the
    /// replicas of the node that took the lock.
    ///
    /// Cost: one more round trip per acquire that takes a lock and per extend (the time the
    /// replicas take to acknowledge), and a connection of its own for each acquire or extend
    /// in flight (`WAIT` blocks the connection it is sent on; up to 16 idle ones are kept per
    /// lock object). The Redis user needs `+wait`.
    ///
    /// [`build`](Self::build) refuses `replicas` = 0 and a `timeout` outside 1 ms ..=
    /// [`MAX_DURATION`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{bb8_redis, DistributedLock, LockError, RedisDistributedLock};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = bb8_redis::bb8::Pool::builder()
    ///     .build(bb8_redis::RedisConnectionManager::new("redis://127.0.0.1:6379")?)
    ///     .await?;
    /// let lock = RedisDistributedLock::builder(pool)
    ///     .replica_acks(1, Duration::from_millis(200))
    ///     .build()?;
    /// match lock.acquire("invoice:17").await {
    ///     Ok(guard) => guard.release().await?,
    ///     // No replica acknowledged in time (or Redis is unreachable): not locked.
    ///     Err(LockError::BackendError(error)) => eprintln!("not locked: {error}"),
    ///     Err(other) => return Err(other.into()),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_acks = Some((replicas, timeout));
        self
    }

    /// Checks the settings and builds the lock. The [`LockConfig`] is checked too.
    ///
    /// Returns [`LockError::InvalidConfig`] for a prefix with braces or longer than 256 bytes,
    /// a zero or overlong command timeout, connection age or fence retention, bad [`AutoExtend`] settings,
    /// bad [`replica_acks`](Self::replica_acks) settings, or an invalid [`LockConfig`].
    pub fn build(self) -> Result<RedisDistributedLock, LockError> {
        self.config.validate()?;
        validate_prefix(&self.key_prefix)?;
        for (name, value) in [
            ("command_timeout", self.command_timeout),
            ("connection_max_age", self.connection_max_age),
            ("fence_retention", self.fence_retention),
        ] {
            validate_duration(name, value, Duration::from_millis(1), MAX_DURATION)?;
        }
        if let Some(settings) = &self.auto_extend {
            settings.validate()?;
        }
        if let Some((replicas, timeout)) = self.replica_acks {
            if replicas == 0 {
                return Err(LockError::invalid_config(
                    "replica_acks needs at least 1 replica to wait for",
                ));
            }
            validate_duration(
                "replica_acks timeout",
                timeout,
                Duration::from_millis(1),
                MAX_DURATION,
            )?;
        }
        let wake = self
            .wake_client
            .map(|client| WakeHub::new(client, self.command_timeout));
        Ok(RedisDistributedLock {
            shared: Arc::new(Shared {
                connections: Connections::new(
                    self.pool,
                    self.command_timeout,
                    self.connection_max_age,
                ),
                claims: Arc::default(),
                prefix: self.key_prefix,
                config: self.config,
                fence_retention: self.fence_retention,
                auto_extend: self.auto_extend,
                wake,
                replica_acks: self
                    .replica_acks
                    .map(|(replicas, timeout)| ReplicaAcks::new(replicas, timeout)),
            }),
        })
    }
}

impl std::fmt::Debug for RedisDistributedLockBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDistributedLockBuilder")
            .field("config", &self.config)
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connection_max_age", &self.connection_max_age)
            .field("fence_retention", &self.fence_retention)
            .field("auto_extend", &self.auto_extend)
            .field("wake_on_release", &self.wake_client.is_some())
            .field("replica_acks", &self.replica_acks)
            .finish()
    }
}
