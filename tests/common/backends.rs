//! Every backend this build has, behind one type, so that a scenario runs against each.
//!
//! `backend_tests!(scenario_a, scenario_b)` makes, for each scenario
//! `async fn scenario_a(backend: Backend)`, one test per compiled backend. Backends that need a
//! server find it through the shared helper (`DATABASE_URL` / `REDIS_URL`, local defaults,
//! testcontainers) and fail loudly if there is none.

// Built without a server backend, some parameters and arms have nothing to do.
#![cfg_attr(
    not(all(feature = "postgres", feature = "redis")),
    allow(unused_variables, unused_mut, unreachable_code, unreachable_patterns)
)]

use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockError, LockGuard,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    #[cfg(feature = "postgres")]
    Postgres,
    #[cfg(feature = "redis")]
    Redis,
}

impl Backend {
    /// Every backend that needs a server, in this build.
    pub fn servers() -> Vec<Backend> {
        vec![
            #[cfg(feature = "postgres")]
            Backend::Postgres,
            #[cfg(feature = "redis")]
            Backend::Redis,
        ]
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            #[cfg(feature = "postgres")]
            Backend::Postgres => "postgres",
            #[cfg(feature = "redis")]
            Backend::Redis => "redis",
        }
    }

    pub fn from_name(name: &str) -> Option<Backend> {
        [Backend::Memory]
            .into_iter()
            .chain(Backend::servers())
            .find(|backend| backend.name() == name)
    }

    /// A counter kept on this backend's server, updated by a non-atomic read-modify-write.
    pub async fn counter(self, name: &str) -> Counter {
        match self {
            Backend::Memory => panic!("the in-memory backend keeps no counters"),
            #[cfg(feature = "postgres")]
            Backend::Postgres => Counter::Postgres(
                super::counter::postgres::PostgresCounter::new(postgres_pool(None).await, name)
                    .await,
            ),
            #[cfg(feature = "redis")]
            Backend::Redis => Counter::Redis(
                super::counter::redis::RedisCounter::new(&super::redis_url().await, name).await,
            ),
        }
    }

    /// A fresh lock object of this backend with `config`, on the test server.
    pub async fn lock(self, config: LockConfig) -> AnyLock {
        self.lock_at(None, config, None).await
    }

    /// A fresh lock object of this backend with `config`, or the error its constructor gives
    /// for it (`InvalidConfig` for a configuration that `validate()` refuses).
    pub async fn try_lock(self, config: LockConfig) -> Result<AnyLock, LockError> {
        self.try_lock_at(None, config, None).await
    }

    /// A fresh lock object talking to the server at `url` (the test server if `None`), with a
    /// command timeout of its own if given.
    pub async fn lock_at(
        self,
        url: Option<String>,
        config: LockConfig,
        command_timeout: Option<std::time::Duration>,
    ) -> AnyLock {
        self.try_lock_at(url, config, command_timeout)
            .await
            .expect("a lock with a valid configuration")
    }

    /// [`lock_at`](Self::lock_at), or the error the backend's builder gives.
    pub async fn try_lock_at(
        self,
        url: Option<String>,
        config: LockConfig,
        command_timeout: Option<std::time::Duration>,
    ) -> Result<AnyLock, LockError> {
        Ok(match self {
            Backend::Memory => AnyLock::Memory(InMemoryDistributedLock::try_new(config)?),
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                use k1s0_distributed_lock::PostgresDistributedLock;
                let pool = postgres_pool(url).await;
                let mut builder = PostgresDistributedLock::builder(pool, config);
                if let Some(timeout) = command_timeout {
                    builder = builder.command_timeout(timeout);
                }
                AnyLock::Postgres(builder.build()?)
            }
            #[cfg(feature = "redis")]
            Backend::Redis => {
                let url = match url {
                    Some(url) => url,
                    None => super::redis_url().await,
                };
                let mut builder = super::redis_conn::lock_builder(&url, &url)
                    .await
                    .config(config)
                    .key_prefix("k1s0test:");
                if let Some(timeout) = command_timeout {
                    builder = builder.command_timeout(timeout);
                }
                AnyLock::Redis(builder.build()?)
            }
        })
    }

    /// The test server's URL with its address replaced by `address` (a proxy's).
    pub async fn url_via(self, address: std::net::SocketAddr) -> String {
        match self {
            Backend::Memory => panic!("the in-memory backend has no server"),
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let url = super::postgres_url().await;
                let host_port = host_and_port(&url);
                url.replacen(&host_port, &address.to_string(), 1)
            }
            #[cfg(feature = "redis")]
            Backend::Redis => format!("redis://{address}"),
        }
    }

    /// The test server's address, for a proxy to forward to.
    #[allow(unreachable_code)] // without server backends only the panicking arm is left
    pub async fn server_address(self) -> std::net::SocketAddr {
        let url: String = match self {
            Backend::Memory => panic!("the in-memory backend has no server"),
            #[cfg(feature = "postgres")]
            Backend::Postgres => super::postgres_url().await,
            #[cfg(feature = "redis")]
            Backend::Redis => super::redis_url().await,
        };
        let host_port = host_and_port(&url);
        let mut addresses = tokio::net::lookup_host(host_port).await.unwrap();
        addresses.next().unwrap()
    }
}

/// `host:port` of a `scheme://[user@]host:port[/path]` URL.
fn host_and_port(url: &str) -> String {
    let authority = url.split("://").nth(1).expect("a URL with a scheme");
    let after_user = authority.rsplit('@').next().unwrap();
    after_user.split('/').next().unwrap().to_owned()
}

/// A small pool on the test server, or on `url`.
#[cfg(feature = "postgres")]
pub async fn postgres_pool(url: Option<String>) -> sqlx::PgPool {
    postgres_pool_of(url, 5).await
}

/// A pool of at most `max` connections on the test server, or on `url`.
#[cfg(feature = "postgres")]
pub async fn postgres_pool_of(url: Option<String>, max: u32) -> sqlx::PgPool {
    let url = match url {
        Some(url) => url,
        None => super::postgres_url().await,
    };
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await
        .expect("connect to the test PostgreSQL")
}

#[derive(Clone)]
pub enum Counter {
    #[cfg(feature = "postgres")]
    Postgres(super::counter::postgres::PostgresCounter),
    #[cfg(feature = "redis")]
    Redis(super::counter::redis::RedisCounter),
}

impl Counter {
    pub async fn read(&self) -> i64 {
        match *self {
            #[cfg(feature = "postgres")]
            Counter::Postgres(ref counter) => counter.read().await,
            #[cfg(feature = "redis")]
            Counter::Redis(ref counter) => counter.read().await,
        }
    }

    pub async fn increment(&self) {
        match *self {
            #[cfg(feature = "postgres")]
            Counter::Postgres(ref counter) => counter.increment().await,
            #[cfg(feature = "redis")]
            Counter::Redis(ref counter) => counter.increment().await,
        }
    }
}

#[derive(Clone)]
pub enum AnyLock {
    Memory(InMemoryDistributedLock),
    #[cfg(feature = "postgres")]
    Postgres(k1s0_distributed_lock::PostgresDistributedLock),
    #[cfg(feature = "redis")]
    Redis(k1s0_distributed_lock::RedisDistributedLock),
}

impl AnyLock {
    /// The in-memory table's entry count; `None` for the server backends.
    pub fn tracked_keys(&self) -> Option<usize> {
        match self {
            AnyLock::Memory(lock) => Some(lock.tracked_keys()),
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(_) => None,
            #[cfg(feature = "redis")]
            AnyLock::Redis(_) => None,
        }
    }
}

impl DistributedLock for AnyLock {
    async fn try_acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.try_acquire(key).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.try_acquire(key).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.try_acquire(key).await,
        }
    }

    async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.acquire(key).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.acquire(key).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.acquire(key).await,
        }
    }

    async fn is_locked(&self, key: &str) -> Result<bool, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.is_locked(key).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.is_locked(key).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.is_locked(key).await,
        }
    }
    fn key_visibility(&self) -> k1s0_distributed_lock::KeyVisibility {
        match self {
            AnyLock::Memory(lock) => lock.key_visibility(),
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.key_visibility(),
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.key_visibility(),
        }
    }
}

/// One test per compiled backend for each scenario `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn in_memory() {
                    super::$scenario($crate::common::backends::Backend::Memory).await;
                }
                $crate::server_backend_cases!($scenario);
            }
        )*
    };
}

/// One test per compiled server backend (not the in-memory one) for each scenario.
#[macro_export]
macro_rules! server_backend_tests {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                $crate::server_backend_cases!($scenario);
            }
        )*
    };
}

/// The PostgreSQL and Redis test functions of one scenario, inside its module.
#[macro_export]
macro_rules! server_backend_cases {
    ($scenario:ident) => {
        #[cfg(feature = "postgres")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn postgres() {
            super::$scenario($crate::common::backends::Backend::Postgres).await;
        }
        #[cfg(feature = "redis")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis() {
            super::$scenario($crate::common::backends::Backend::Redis).await;
        }
    };
}

/// Permits on the backend of the lock object.
impl k1s0_distributed_lock::DistributedSemaphore for AnyLock {
    async fn try_acquire_permit(&self, key: &str, limit: u32) -> Result<LockGuard, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.try_acquire_permit(key, limit).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.try_acquire_permit(key, limit).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.try_acquire_permit(key, limit).await,
        }
    }

    async fn acquire_permit(&self, key: &str, limit: u32) -> Result<LockGuard, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.acquire_permit(key, limit).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.acquire_permit(key, limit).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.acquire_permit(key, limit).await,
        }
    }

    async fn permits_held(&self, key: &str) -> Result<u32, LockError> {
        match self {
            AnyLock::Memory(lock) => lock.permits_held(key).await,
            #[cfg(feature = "postgres")]
            AnyLock::Postgres(lock) => lock.permits_held(key).await,
            #[cfg(feature = "redis")]
            AnyLock::Redis(lock) => lock.permits_held(key).await,
        }
    }
}

/// An in-memory lock object with `config`, for scenarios that take a `make_lock`.
pub async fn memory_lock(config: LockConfig) -> InMemoryDistributedLock {
    InMemoryDistributedLock::new(config)
}

/// A PostgreSQL lock object on a pool of its own (as another process would have), with
/// `config`.
#[cfg(feature = "postgres")]
pub async fn postgres_lock(config: LockConfig) -> k1s0_distributed_lock::PostgresDistributedLock {
    k1s0_distributed_lock::PostgresDistributedLock::new(postgres_pool(None).await, config)
}

/// One test per backend for each scenario `async fn name(make_lock)`, where `make_lock(config)`
/// builds a lock object of that backend (on a server backend, with connections of its own, as
/// another process would have). Unlike [`backend_tests!`], the scenario gets the backend's own
/// type, so it can use all of its API (the shared side, permits).
#[macro_export]
macro_rules! lock_object_tests {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn in_memory() {
                    super::$scenario($crate::common::backends::memory_lock).await;
                }
                $crate::server_lock_object_cases!($scenario);
            }
        )*
    };
}

/// [`lock_object_tests!`] on the server backends only: for scenarios whose lock objects stand
/// for processes of their own.
#[macro_export]
macro_rules! server_lock_object_tests {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                $crate::server_lock_object_cases!($scenario);
            }
        )*
    };
}

/// The Redis and PostgreSQL test functions of one scenario of [`lock_object_tests!`].
#[macro_export]
macro_rules! server_lock_object_cases {
    ($scenario:ident) => {
        #[cfg(feature = "redis")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis() {
            super::$scenario($crate::common::redis_conn::rw_lock).await;
        }
        #[cfg(feature = "postgres")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn postgres() {
            super::$scenario($crate::common::backends::postgres_lock).await;
        }
    };
}
