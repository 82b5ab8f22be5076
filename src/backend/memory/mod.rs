//! The in-process backend: zero setup, for examples, tests and single-process applications.

mod table;

use std::future::{ready, Future};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use self::table::{Grant, Listener, LockTable, TryTake, WaiterState};
use super::want::Want;
use crate::observe::{observe_acquire, Mode};
use crate::{
    validate_key, DistributedLock, DistributedRwLock, DistributedSemaphore, KeyVisibility,
    LockConfig, LockError, LockGuard, LockHandle, LockMode,
};

/// A lock service that lives in this process. Always compiled; no server needed.
///
/// It keeps the same contract as the distributed backends: TTLs, unguessable tokens, fencing
/// tokens that strictly increase per key (one counter for the whole table), `LockLost` for a
/// stale guard. On top of that:
///
/// * **Waiting without polling.** `acquire` queues the caller; a release hands the lock
///   straight to the longest-waiting caller (first in, first out), who wakes at once. An
///   expired holder is replaced by the first waiter when its TTL runs out.
/// * **Synchronous release on drop.** Dropping a guard frees the lock before `drop` returns,
///   with or without a runtime.
/// * **Bounded memory.** A key's entry is removed when its lock (or its last permit) is
///   released. Entries of locks that expired without release are swept by the next acquire on
///   their shard after they expire, so the table holds at most the locks alive now plus those
///   that expired since the shard last saw an acquire.
/// * **Permits** ([`DistributedSemaphore`]) live in a table of their own, with the same
///   queue, hand-over and sweeping; locks and permits draw fencing tokens from one counter.
///
/// Clones share one table, so a clone locks the same keys.
///
/// ```
/// use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LockError> {
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let first = lock.try_acquire("report:daily").await?;
/// assert!(matches!(lock.try_acquire("report:daily").await, Err(LockError::AlreadyLocked)));
/// drop(first);
/// let second = lock.try_acquire("report:daily").await?;
/// assert!(second.fencing_token() > 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InMemoryDistributedLock {
    config: LockConfig,
    table: Arc<LockTable>,
    permits: Arc<LockTable>,
}

impl InMemoryDistributedLock {
    /// A new, empty lock table with this configuration.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid ([`LockConfig::validate`] refuses it), with the reason.
    /// Use [`try_new`](Self::try_new) to get the error instead.
    ///
    /// ```should_panic
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig};
    ///
    /// // panics: "invalid lock configuration: ttl 0ns must lie between 1ms and ..."
    /// let lock = InMemoryDistributedLock::new(LockConfig::new().ttl(Duration::ZERO));
    /// ```
    #[track_caller]
    pub fn new(config: LockConfig) -> Self {
        Self::try_new(config).unwrap_or_else(|error| panic!("{error}"))
    }

    /// A new, empty lock table with this configuration, or [`LockError::InvalidConfig`] if
    /// [`LockConfig::validate`] refuses it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig, LockError};
    ///
    /// let lock = InMemoryDistributedLock::try_new(LockConfig::new())?;
    /// assert!(matches!(
    ///     InMemoryDistributedLock::try_new(LockConfig::new().ttl(Duration::ZERO)),
    ///     Err(LockError::InvalidConfig { .. })
    /// ));
    /// # drop(lock);
    /// # Ok::<(), LockError>(())
    /// ```
    pub fn try_new(config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        let fencing = Arc::new(AtomicU64::new(1));
        Ok(InMemoryDistributedLock {
            config,
            table: Arc::new(LockTable::new(Arc::clone(&fencing))),
            permits: Arc::new(LockTable::new(fencing)),
        })
    }

    /// The configuration this lock was built with.
    pub fn config(&self) -> &LockConfig {
        &self.config
    }

    /// How many keys the table keeps state for: the keys locked or with permits held now plus
    /// expired ones not yet swept. Released keys never count.
    pub fn tracked_keys(&self) -> usize {
        self.table.len() + self.permits.len()
    }

    /// The table that keeps what `want` asks for.
    fn table_for(&self, want: Want) -> &Arc<LockTable> {
        match want {
            Want::Lock(_) => &self.table,
            Want::Permit { .. } => &self.permits,
        }
    }

    fn guard(&self, table: &Arc<LockTable>, key: Arc<str>, grant: Grant) -> LockGuard {
        let handle = MemoryHandle {
            table: Arc::clone(table),
            key: Arc::clone(&key),
            token: grant.token,
        };
        LockGuard::from_shared(
            key,
            grant.token,
            grant.fencing_token,
            grant.lease,
            Arc::new(handle),
        )
        .with_mode(grant.mode)
    }

    fn try_acquire_now(&self, key: &str, want: Want) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        want.validate()?;
        self.config.validate()?;
        let table = self.table_for(want);
        match table.try_take(key, want, self.config.get_ttl(), None) {
            TryTake::Granted(key, grant) => Ok(self.guard(table, key, grant)),
            TryTake::Held { .. } => Err(LockError::AlreadyLocked),
        }
    }

    async fn acquire_waiting(&self, key: &str, want: Want) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        want.validate()?;
        self.config.validate()?;
        let table = self.table_for(want);
        let ttl = self.config.get_ttl();
        let deadline = Instant::now() + self.config.wait_budget();
        // Each round takes a place in the queue; a waiter only needs a second round if it was
        // descheduled for so long that the lock handed to it expired before it looked.
        loop {
            let (sender, receiver) = oneshot::channel();
            let recheck = Arc::new(Notify::new());
            let listener = Listener {
                grant: sender,
                recheck: Arc::clone(&recheck),
            };
            let (key, id, holder_expires_at) = match table.try_take(key, want, ttl, Some(listener))
            {
                TryTake::Granted(key, grant) => return Ok(self.guard(table, key, grant)),
                TryTake::Held {
                    key,
                    queued_as: Some(id),
                    expires_at,
                } => (key, id, expires_at),
                TryTake::Held {
                    queued_as: None, ..
                } => return Err(LockError::Timeout),
            };
            let mut waiter = QueuedWaiter {
                table: Arc::clone(table),
                key,
                keys: self.config().get_trace_keys(),
                id,
                receiver: Some(receiver),
                recheck,
            };
            tracing::debug!(key = %waiter.keys.show(&waiter.key), line = "backend", "waiting for the lock");
            match waiter.wait(holder_expires_at, deadline).await {
                Waited::Granted(grant) => {
                    tracing::debug!(key = %waiter.keys.show(&waiter.key), "lock handed over");
                    return Ok(self.guard(table, Arc::clone(&waiter.key), grant));
                }
                Waited::GaveUp => return Err(LockError::Timeout),
                Waited::LostPlace if Instant::now() >= deadline => return Err(LockError::Timeout),
                Waited::LostPlace => continue,
            }
        }
    }
}

impl std::fmt::Debug for InMemoryDistributedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryDistributedLock")
            .field("config", &self.config)
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

impl DistributedLock for InMemoryDistributedLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.try_acquire_as(key, Want::Lock(LockMode::Exclusive))
    }

    fn acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.acquire_as(key, Want::Lock(LockMode::Exclusive))
    }

    // Looks when polled, not when called (see `try_acquire`).
    async fn is_locked(&self, key: &str) -> Result<bool, LockError> {
        validate_key(key).map(|()| self.table.is_held(key))
    }

    fn validate(&self) -> Result<(), LockError> {
        self.config().validate()
    }

    fn key_visibility(&self) -> crate::KeyVisibility {
        self.config().get_trace_keys()
    }
}

impl DistributedRwLock for InMemoryDistributedLock {
    fn try_acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.try_acquire_as(key, Want::Lock(LockMode::Shared))
    }

    fn acquire_shared(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.acquire_as(key, Want::Lock(LockMode::Shared))
    }
}

impl DistributedSemaphore for InMemoryDistributedLock {
    fn try_acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.try_acquire_as(key, Want::Permit { limit })
    }

    fn acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.acquire_as(key, Want::Permit { limit })
    }

    // Looks when polled, not when called (see `try_acquire`).
    async fn permits_held(&self, key: &str) -> Result<u32, LockError> {
        validate_key(key)?;
        Ok(u32::try_from(self.permits.holders(key)).unwrap_or(u32::MAX))
    }
}

impl InMemoryDistributedLock {
    // `async`, not `ready(..)`: the lock is taken when the future is polled, so a future that
    // is created and dropped unpolled takes nothing (as on the other backends).
    fn try_acquire_as<'s, 'k>(
        &'s self,
        key: &'k str,
        want: Want,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send + use<'s, 'k> {
        let keys = self.config().get_trace_keys();
        observe_acquire("memory", keys, key, Mode::Try, want.label(), async move {
            self.try_acquire_now(key, want)
        })
    }

    fn acquire_as<'s, 'k>(
        &'s self,
        key: &'k str,
        want: Want,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send + use<'s, 'k> {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "memory",
            keys,
            key,
            Mode::Wait,
            want.label(),
            self.acquire_waiting(key, want),
        )
    }
}

/// A caller queued for a key. Dropping it (a cancelled `acquire`) leaves the queue, and if the
/// lock was handed over in the meantime, passes it on at once.
struct QueuedWaiter {
    table: Arc<LockTable>,
    key: Arc<str>,
    /// How log events show the key.
    keys: KeyVisibility,
    id: u64,
    /// `None` once the grant was taken.
    receiver: Option<oneshot::Receiver<Grant>>,
    /// Notified when the moment to look again may have come earlier.
    recheck: Arc<Notify>,
}

enum Waited {
    Granted(Grant),
    /// The waiting budget ran out (dropping the waiter leaves the queue).
    GaveUp,
    /// Neither queued nor holding a live lock any more: queue again.
    LostPlace,
}

impl QueuedWaiter {
    /// Waits for the lock to be handed over, waking when the first holder's lease or the
    /// budget runs out (or the table says that moment came earlier) to let itself in past
    /// expired holders or give up.
    async fn wait(&mut self, mut holder_expires_at: Instant, deadline: Instant) -> Waited {
        loop {
            let receiver = self.receiver.as_mut().expect("kept until granted");
            tokio::select! {
                biased;
                granted = receiver => {
                    self.receiver = None;
                    return match granted {
                        Ok(grant) => self.accept(grant),
                        Err(_) => Waited::LostPlace,
                    };
                }
                () = tokio::time::sleep_until(holder_expires_at.min(deadline)) => {}
                () = self.recheck.notified() => {}
            }
            let receiver = self.receiver.as_mut().expect("kept until granted");
            match self
                .table
                .recheck_waiter(&self.key, self.id, || receiver.try_recv().ok())
            {
                WaiterState::Granted(grant) => {
                    self.receiver = None;
                    return self.accept(grant);
                }
                WaiterState::NotQueued => return Waited::LostPlace,
                WaiterState::Queued { .. } if Instant::now() >= deadline => return Waited::GaveUp,
                WaiterState::Queued {
                    holder_expires_at: at,
                } => holder_expires_at = at,
            }
        }
    }

    /// Takes a grant, unless it expired before this waiter got to look at it (a task
    /// descheduled for longer than the TTL): that lock is given back and the caller queues again.
    fn accept(&self, grant: Grant) -> Waited {
        if grant.lease.is_lost() {
            tracing::debug!(key = %self.keys.show(&self.key), "a lock handed over expired before the waiter woke; queueing again");
            let _ = self.table.release(&self.key, grant.token);
            return Waited::LostPlace;
        }
        Waited::Granted(grant)
    }
}

impl Drop for QueuedWaiter {
    fn drop(&mut self) {
        if let Some(receiver) = self.receiver.take() {
            if self.table.abandon_wait(&self.key, self.id, receiver) {
                tracing::debug!(
                    key = %self.keys.show(&self.key),
                    "an acquire was cancelled just as it was granted; passing the lock on"
                );
            }
        }
    }
}

/// Releases and extends one in-memory lock.
struct MemoryHandle {
    table: Arc<LockTable>,
    key: Arc<str>,
    token: Uuid,
}

impl LockHandle for MemoryHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(ready(self.table.release(&self.key, self.token)))
    }

    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(ready(self.table.extend(&self.key, self.token, ttl)))
    }

    fn release_on_drop(self: Arc<Self>) {
        // Synchronous: the lock is free before the guard's drop returns.
        let _ = self.table.release(&self.key, self.token);
    }
}
