//! [`RedisDistributedLockBuilder`]: the settings of a Redis lock beyond [`LockConfig`].

use std::sync::Arc;
use std::time::Duration;

use bb8::Pool;
use bb8_redis::RedisConnectionManager;

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
    /// `client` (which should point at the same server as the pool). Without it, waiters poll.
    pub fn wake_on_release(mut self, client: redis::Client) -> Self {
        self.wake_client = Some(client);
        self
    }

    /// Checks the settings and builds the lock. The [`LockConfig`] is checked too.
    ///
    /// Returns [`LockError::InvalidConfig`] for a prefix with braces or longer than 256 bytes,
    /// a zero or overlong command timeout, connection age or fence retention, bad [`AutoExtend`] settings, or
    /// an invalid [`LockConfig`].
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
            .finish()
    }
}
