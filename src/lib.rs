//! Distributed locks with fencing tokens, and a Tower layer that takes one per request.
//!
//! * [`DistributedLock`] — `try_acquire`, `acquire` (bounded waiting), `release`, `is_locked`;
//!   [`DynDistributedLock`] is its object-safe form, for a backend chosen at run time
//!   (`Arc<dyn DynDistributedLock>` is a `DistributedLock` too).
//! * [`DistributedRwLock`] — the shared (read) side: readers of a key hold it together, a
//!   writer alone ([`LockMode`]).
//! * [`DistributedSemaphore`] — permits: up to `limit` holders of a key at once, across
//!   processes.
//! * [`LockGuard`] — the held lock: released on drop, with a TTL ([`LockGuard::extend`],
//!   [`LockGuard::is_lost`]) and a [`fencing token`](LockGuard::fencing_token) that strictly
//!   increases per key.
//! * Backends: [`InMemoryDistributedLock`] (always compiled, zero setup), PostgreSQL advisory
//!   locks (feature `postgres`) and Redis (feature `redis`).
//! * [`LockLayer`] — a Tower layer for axum and tonic that locks a key built from each request,
//!   holds the lock until the response body is finished, and answers a conflict with 409 or 423
//!   (gRPC `ABORTED` for gRPC requests).
//!
//! ```
//! use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), LockError> {
//! let lock = InMemoryDistributedLock::new(LockConfig::new());
//! match lock.try_acquire("order:42").await {
//!     Ok(guard) => {
//!         // ... exclusive work, guard.fencing_token() passed to storage ...
//!         guard.release().await?;
//!     }
//!     Err(LockError::AlreadyLocked) => println!("order 42 is being handled elsewhere"),
//!     Err(other) => return Err(other),
//! }
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod config;
mod error;
mod guard;
mod keep_alive;
mod key;
pub mod layer;
mod lease;
mod mode;
mod observe;

pub use backend::dynamic::{DynDistributedLock, DynDistributedRwLock};
pub use backend::memory::InMemoryDistributedLock;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use backend::postgres::{
    PostgresDistributedLock, PostgresDistributedLockBuilder, TransactionLock,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use backend::redis::{AutoExtend, RedisDistributedLock, RedisDistributedLockBuilder};
pub use backend::rw::DistributedRwLock;
pub use backend::semaphore::DistributedSemaphore;
pub use backend::DistributedLock;
/// The bb8-redis crate this backend is built on (with its `bb8` and `redis`), so that pools and
/// clients you build have matching versions.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use bb8_redis;
pub use config::{LockConfig, MAX_DURATION};
pub use error::LockError;
pub use guard::{LockGuard, LockHandle, LockInfo};
pub use key::{validate_key, MAX_KEY_LEN};
pub use layer::{LockLayer, LockService, Rejection, RejectionKind};
pub use lease::Lease;
pub use mode::LockMode;
pub use observe::KeyVisibility;
pub use uuid::Uuid;

/// The README's code, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
