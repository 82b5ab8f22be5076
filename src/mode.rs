//! [`LockMode`]: which side of a key's lock a guard holds.

/// Which side of a key's lock a guard holds ([`LockGuard::mode`](crate::LockGuard::mode)).
///
/// An exclusive holder excludes every other holder of the key; shared holders exclude
/// exclusive ones and coexist with each other. `try_acquire` and `acquire` take the exclusive
/// side, [`DistributedRwLock`](crate::DistributedRwLock)'s `try_acquire_shared` and
/// `acquire_shared` the shared one.
///
/// ```
/// use k1s0_distributed_lock::{DistributedLock, DistributedRwLock, InMemoryDistributedLock, LockConfig, LockMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), k1s0_distributed_lock::LockError> {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let reader = lock.try_acquire_shared("order:42").await?;
/// let other_reader = lock.try_acquire_shared("order:42").await?;
/// assert_eq!(reader.mode(), LockMode::Shared);
/// assert!(lock.try_acquire("order:42").await.is_err());
/// # drop((reader, other_reader));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockMode {
    /// The write side: one holder, no shared holders.
    #[default]
    Exclusive,
    /// The read side: any number of holders, no exclusive one.
    Shared,
}

impl LockMode {
    /// `exclusive` or `shared`, as spans and docs write it.
    pub const fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
}
