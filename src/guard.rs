//! [`LockGuard`], the RAII handle of a held lock, and the [`LockHandle`] contract backends
//! implement behind it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use uuid::Uuid;

use tracing::Instrument;

use crate::config::validate_ttl;
use crate::keep_alive::KeepAlive;
use crate::observe::{self, Held, KeyVisibility, Outcome, ShownKey};
use crate::{Lease, LockError, LockMode};

/// What a backend does for one lock it granted. A [`LockGuard`] owns one and calls it.
///
/// Implement this (together with [`DistributedLock`](crate::DistributedLock)) to plug in a
/// backend of your own. Every method acts on the lock identified by the key and token the
/// handle was created with, and must never touch the lock of another holder.
///
/// ```
/// use std::time::Duration;
/// use futures_util::future::BoxFuture;
/// use k1s0_distributed_lock::{Lease, LockError, LockGuard, LockHandle};
///
/// struct NoopHandle;
///
/// impl LockHandle for NoopHandle {
///     fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
///         Box::pin(async { Ok(()) })
///     }
///     fn extend(&self, _ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
///         Box::pin(async { Ok(()) })
///     }
/// }
///
/// let ttl = Duration::from_secs(5);
/// let guard = LockGuard::new(
///     "job:1",
///     uuid::Uuid::new_v4(),
///     1,
///     Lease::new(tokio::time::Instant::now(), ttl),
///     NoopHandle,
/// );
/// assert_eq!(guard.key(), "job:1");
/// ```
pub trait LockHandle: Send + Sync + 'static {
    /// Releases the lock if this holder still has it.
    ///
    /// Returns [`LockError::LockLost`] when the lock expired or belongs to someone else now,
    /// without touching it. May be called again after a cancelled call: it must be idempotent.
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>>;

    /// Renews the lock for `ttl` from now, or returns [`LockError::LockLost`] if it is gone.
    fn extend(&self, ttl: Duration) -> BoxFuture<'_, Result<(), LockError>>;

    /// Releases the lock of a guard dropped without [`LockGuard::release`] (or whose release was
    /// cancelled). Must not block.
    ///
    /// The handle is shared: the guard's keep-alive (in [`LockLayer`](crate::LockLayer)) may
    /// hold a second reference while an extension is in flight.
    ///
    /// The default runs [`release`](Self::release) as a task on the current tokio runtime;
    /// outside a runtime it does nothing, and the lock runs out at its TTL. Backends that can
    /// do better (release synchronously, or close a session) override it.
    fn release_on_drop(self: Arc<Self>) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = self.release().await {
                        tracing::debug!(error = &error as &dyn std::error::Error, "background release of a dropped lock guard failed");
                    }
                });
            }
            Err(_) => tracing::warn!(
                "lock guard dropped outside a tokio runtime: the lock is freed when its TTL runs out"
            ),
        }
    }
}

/// A held lock. Dropping it releases the lock.
///
/// Every backend returns this one type. A guard carries the key, a random
/// [`token`](Self::token) that identifies this holder (UUID v4, so no other client can guess
/// it) and a [`fencing_token`](Self::fencing_token) that strictly increases per key across
/// successive holders: pass it to the resource you protect so that it can refuse writes from a
/// holder whose lock has since expired.
///
/// * [`release`](Self::release) gives the lock back and says whether it was still held.
/// * Dropping the guard inside a tokio runtime releases the lock promptly in the background
///   (the in-memory backend releases synchronously); outside a runtime the backend's own
///   fallback applies (its TTL, or the end of its session).
/// * [`extend`](Self::extend) renews the lease; [`is_lost`](Self::is_lost) tells whether the
///   lease ran out or the backend reported the lock gone, and [`lost`](Self::lost) waits for
///   it.
///
/// ```
/// use std::time::Duration;
/// use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), k1s0_distributed_lock::LockError> {
/// let lock = InMemoryDistributedLock::new(LockConfig::new().ttl(Duration::from_secs(5)));
/// let guard = lock.acquire("invoice:2024-17").await?;
/// println!("writing with fencing token {}", guard.fencing_token());
/// guard.extend(Duration::from_secs(5)).await?;
/// assert!(!guard.is_lost());
/// guard.release().await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    info: LockInfo,
    lease: Arc<Lease>,
    /// Taken only by `release` (which consumes the guard) or by `drop`: always `Some` while
    /// the guard can be used.
    handle: Option<Arc<dyn LockHandle>>,
    /// Which backend granted the lock, for spans and metrics (set by the built-in backends'
    /// acquire; `None` for a guard of a backend of one's own).
    held: Option<Held>,
}

impl LockGuard {
    /// Builds a guard for a lock a backend has just granted.
    ///
    /// `token` must be unguessable (use [`Uuid::new_v4`]); `fencing_token` must be greater than
    /// every fencing token handed out for `key` before; `lease` is shared with the backend if it
    /// wants to report the lock lost; `handle` releases and extends this very lock.
    pub fn new(
        key: impl Into<Arc<str>>,
        token: Uuid,
        fencing_token: u64,
        lease: Arc<Lease>,
        handle: impl LockHandle,
    ) -> Self {
        Self::from_shared(key.into(), token, fencing_token, lease, Arc::new(handle))
    }

    pub(crate) fn from_shared(
        key: Arc<str>,
        token: Uuid,
        fencing_token: u64,
        lease: Arc<Lease>,
        handle: Arc<dyn LockHandle>,
    ) -> Self {
        LockGuard {
            info: LockInfo {
                key,
                token,
                fencing_token,
                mode: LockMode::Exclusive,
                lease: Arc::clone(&lease),
            },
            lease,
            handle: Some(handle),
            held: None,
        }
    }

    /// This guard, holding `mode`: a backend of your own that implements
    /// [`DistributedRwLock`](crate::DistributedRwLock) builds a shared guard with
    /// [`new`](Self::new) (which makes an exclusive one) and this.
    pub fn with_mode(mut self, mode: LockMode) -> Self {
        self.info.mode = mode;
        self
    }

    /// Marks the guard as held from a built-in backend (see `observe::observe_acquire`).
    pub(crate) fn set_held(&mut self, held: Held) {
        self.held = Some(held);
    }

    /// How this guard's spans and log events show its key.
    fn key_visibility(&self) -> KeyVisibility {
        self.held
            .as_ref()
            .map_or(KeyVisibility::default(), Held::keys)
    }

    /// The key as this guard's log events show it.
    fn shown_key(&self) -> ShownKey<'_> {
        self.key_visibility().show(&self.info.key)
    }

    /// A span for a release or extend of this guard.
    fn operation_span(&self, name: &'static str) -> tracing::Span {
        let backend = self.held.as_ref().map_or("custom", Held::backend);
        let key = self.key_visibility().shown(&self.info.key);
        let span = observe::wanted(match name {
            "release" => tracing::debug_span!(
                "lock.release",
                backend,
                key = key.map(tracing::field::display),
                fencing_token = self.info.fencing_token,
                outcome = tracing::field::Empty
            ),
            _ => tracing::debug_span!(
                "lock.extend",
                backend,
                key = key.map(tracing::field::display),
                fencing_token = self.info.fencing_token,
                outcome = tracing::field::Empty
            ),
        });
        span
    }

    /// Records how a release or extend ended: in its span, as an event and in the metrics; a
    /// lost lock is counted once per guard.
    fn operation_ended(&self, span: &tracing::Span, operation: &'static str, outcome: Outcome) {
        span.record("outcome", outcome.label(false));
        let backend = self.held.as_ref().map_or("custom", Held::backend);
        span.in_scope(|| observe::guard_operation(backend, operation, outcome));
        if outcome == Outcome::Lost {
            if let Some(held) = &self.held {
                span.in_scope(|| held.lost(&self.lease));
            }
        }
    }

    /// The locked key.
    pub fn key(&self) -> &str {
        &self.info.key
    }

    /// This holder's random token.
    pub fn token(&self) -> Uuid {
        self.info.token
    }

    /// The fencing token: strictly greater than that of every earlier holder of this key.
    pub fn fencing_token(&self) -> u64 {
        self.info.fencing_token
    }

    /// Which side of the key's lock this guard holds: exclusive (`try_acquire`, `acquire`) or
    /// shared (`try_acquire_shared`, `acquire_shared`).
    pub fn mode(&self) -> LockMode {
        self.info.mode
    }

    /// Key, token and fencing token, as a cheap value to hand around.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// True once the lease ran out without extension, or the backend reported the lock gone.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// How long the lease has left, or `None` once it is lost.
    pub fn remaining(&self) -> Option<Duration> {
        self.lease.remaining()
    }

    /// Renews the lease for `ttl` from now.
    ///
    /// Returns [`LockError::LockLost`] if the lease already ran out or the lock belongs to
    /// someone else now, and [`LockError::InvalidConfig`] for a TTL that
    /// [`LockConfig`](crate::LockConfig) would refuse; neither changes anything.
    pub async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let span = self.operation_span("extend");
        let result = match validate_ttl(ttl) {
            Ok(()) => {
                extend_lease(self.handle(), &self.lease, ttl)
                    .instrument(span.clone())
                    .await
            }
            Err(error) => Err(error),
        };
        self.operation_ended(&span, "extend", Outcome::of(&result));
        result
    }

    /// Completes once the lock is known to be lost: the lease ran out without extension, an
    /// extension was refused, or the backend reported the lock gone (its session or
    /// connection died). [`is_lost`](Self::is_lost) is the same signal as a poll.
    ///
    /// It costs one timer, re-armed by renewals; no polling. The future owns what it needs,
    /// so it can be spawned or kept after the guard is gone.
    ///
    /// ```
    /// use std::time::Duration;
    /// use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), k1s0_distributed_lock::LockError> {
    /// let lock = InMemoryDistributedLock::new(LockConfig::new().ttl(Duration::from_secs(30)));
    /// let guard = lock.acquire("report:daily").await?;
    /// tokio::select! {
    ///     () = guard.lost() => eprintln!("lost the lock: stop before writing anything else"),
    ///     () = async { /* the exclusive work */ } => guard.release().await?,
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lease.lost()
    }

    /// A keep-alive that extends this lock by its lease's term every third of it, from a task
    /// of its own, until it is dropped or `max_hold` has passed. See
    /// [`KeepAlive`](crate::keep_alive::KeepAlive).
    pub(crate) fn keep_alive(&self, max_hold: Duration) -> KeepAlive {
        KeepAlive::start(
            Arc::downgrade(self.handle.as_ref().expect(LIVE_GUARD)),
            Arc::clone(&self.lease),
            Arc::clone(&self.info.key),
            self.key_visibility(),
            max_hold,
        )
    }

    /// Releases the lock.
    ///
    /// Returns [`LockError::LockLost`] if the lock had expired or belongs to someone else now
    /// (the other holder's lock is left alone); a guard already known to be lost
    /// ([`is_lost`](Self::is_lost)) answers so at once, even with the backend unreachable, and
    /// cleans up in the background. If this future is dropped before it completes, the release
    /// still happens in the background.
    pub async fn release(mut self) -> Result<(), LockError> {
        let span = self.operation_span("release");
        let result = self.release_unobserved().instrument(span.clone()).await;
        self.operation_ended(&span, "release", Outcome::of(&result));
        result
    }

    async fn release_unobserved(&mut self) -> Result<(), LockError> {
        let handle = self.handle.take().expect(LIVE_GUARD);
        if self.lease.is_lost() {
            // The lease ran out or the backend said the lock is gone: the answer is LockLost
            // whatever the backend says now (it may be unreachable). Still clean up, token
            // checked, so an expired-but-untaken lock does not linger until its TTL.
            tracing::warn!(key = %self.shown_key(), "released a lock that was already lost");
            handle.release_on_drop();
            return Err(LockError::LockLost);
        }
        let pending = ReleaseOnDrop(Some(handle));
        let result = pending.handle().release().await;
        if matches!(result, Err(LockError::BackendError(_))) {
            // The lock may still be held: let the background path try once more.
            drop(pending);
        } else {
            pending.disarm();
        }
        match &result {
            Ok(()) => tracing::trace!(key = %self.shown_key(), "lock released"),
            Err(LockError::LockLost) => {
                self.lease.mark_lost();
                tracing::warn!(key = %self.shown_key(), "released a lock that was already lost");
            }
            Err(error) => {
                tracing::warn!(key = %self.shown_key(), error = error as &dyn std::error::Error, "lock release failed")
            }
        }
        result
    }
}

const LIVE_GUARD: &str = "a guard keeps its handle until release or drop";

/// Extends the lock behind `handle` and records the outcome in its lease: renewed from the
/// moment the request was sent, or lost for good if the backend says the lock is gone.
pub(crate) async fn extend_lease(
    handle: &dyn LockHandle,
    lease: &Lease,
    ttl: Duration,
) -> Result<(), LockError> {
    if lease.is_lost() {
        return Err(LockError::LockLost);
    }
    let sent_at = Instant::now();
    match handle.extend(ttl).await {
        Ok(()) => {
            lease.renew(sent_at, ttl);
            // A renewal that came back after the deadline does not count.
            if lease.is_lost() {
                return Err(LockError::LockLost);
            }
            Ok(())
        }
        Err(LockError::LockLost) => {
            lease.mark_lost();
            Err(LockError::LockLost)
        }
        Err(other) => Err(other),
    }
}

impl LockGuard {
    fn handle(&self) -> &dyn LockHandle {
        self.handle.as_deref().expect(LIVE_GUARD)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // Dropped without `release`: a loss not yet seen is counted now.
            if let Some(held) = self.held.as_ref().filter(|_| self.lease.is_lost()) {
                held.lost(&self.lease);
            }
            tracing::trace!(key = %self.shown_key(), "lock guard dropped; releasing");
            handle.release_on_drop();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.info.key)
            .field("token", &self.info.token)
            .field("fencing_token", &self.info.fencing_token)
            .field("mode", &self.info.mode)
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// Hands the handle to `release_on_drop` if a release future is dropped mid-way.
struct ReleaseOnDrop(Option<Arc<dyn LockHandle>>);

impl ReleaseOnDrop {
    fn handle(&self) -> &dyn LockHandle {
        self.0.as_deref().expect("armed until disarmed or dropped")
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            tracing::debug!("lock release cancelled; finishing it in the background");
            handle.release_on_drop();
        }
    }
}

/// Which lock a piece of work runs under: key, token and fencing token, and whether that lock
/// is still held.
///
/// [`LockLayer`](crate::LockLayer) puts one into the request extensions, so a handler can read
/// the lock it runs under and pass the fencing token on to storage, and a long handler can stop
/// work it no longer owns ([`is_lost`](Self::is_lost), [`lost`](Self::lost)). In axum, read it
/// as `Option<Extension<LockInfo>>`: a request the key extractor left unlocked, or one let
/// through by `fail_open`, has none.
///
/// ```
/// use axum::{routing::post, Extension, Router};
/// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockInfo, LockLayer};
///
/// async fn pay(lock: Option<Extension<LockInfo>>) -> String {
///     match lock {
///         Some(Extension(lock)) if lock.is_lost() => "lock lost: not paying".to_owned(),
///         Some(Extension(lock)) => format!("paid under fencing token {}", lock.fencing_token()),
///         None => "paid without a lock".to_owned(),
///     }
/// }
///
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let app: Router = Router::new()
///     .route("/orders/{id}/pay", post(pay))
///     .layer(LockLayer::new(lock, key::path()));
/// ```
///
/// Equality compares the key, the token, the fencing token and the mode.
#[derive(Clone)]
pub struct LockInfo {
    key: Arc<str>,
    token: Uuid,
    fencing_token: u64,
    mode: LockMode,
    lease: Arc<Lease>,
}

impl PartialEq for LockInfo {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.token == other.token
            && self.fencing_token == other.fencing_token
            && self.mode == other.mode
    }
}

impl Eq for LockInfo {}

impl fmt::Debug for LockInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockInfo")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("fencing_token", &self.fencing_token)
            .field("mode", &self.mode)
            .field("lost", &self.lease.is_lost())
            .finish()
    }
}

impl LockInfo {
    /// The locked key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The holder's random token.
    pub fn token(&self) -> Uuid {
        self.token
    }

    /// The fencing token of this hold.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Which side of the key's lock is held: exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// True once the lock is known to be lost (see [`LockGuard::is_lost`]). Never turns false
    /// again.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Completes once the lock is known to be lost (see [`LockGuard::lost`]).
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lease.lost()
    }
}
