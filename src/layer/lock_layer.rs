//! [`LockLayer`]: the configuration of the lock middleware.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use tower_layer::Layer;

use super::key::IntoLockKey;
use super::settings::Settings;
use super::side::Side;
use super::{LockService, Rejection};
use crate::{DistributedLock, DistributedRwLock, DistributedSemaphore, LockError};

/// A Tower layer that takes a lock per request, keyed by a closure over the request head.
///
/// The extractor returns a key to lock (a `String`, a `&'static str`, ...), or `None` to let the
/// request through without a lock. By default the layer fails fast (`try_acquire`) and answers
/// a taken lock with 409 Conflict; a backend failure is answered with 503 and `Retry-After`
/// (fail closed). The lock is kept alive while the request runs ([`max_hold`](Self::max_hold)).
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::post, Router};
/// use http::StatusCode;
/// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
///
/// let lock = InMemoryDistributedLock::new(LockConfig::new().ttl(Duration::from_secs(60)));
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "accepted" }))
///     .layer(
///         LockLayer::new(lock, key::header("idempotency-key"))
///             .conflict_status(StatusCode::LOCKED)
///             .wait(),
///     );
/// ```
///
/// The same layer wraps a tonic server (`Server::builder().layer(...)`); gRPC requests are
/// answered with gRPC statuses (see [`Rejection`]).
pub struct LockLayer<B> {
    lock: Arc<B>,
    settings: Settings,
    side: Side<B>,
}

impl<B: DistributedLock> LockLayer<B> {
    /// A layer locking the key `extractor` builds from each request head.
    ///
    /// `extractor` returns anything that implements [`IntoLockKey`]: a `String`, a
    /// `&'static str` or a `Cow<'static, str>` locks that key, `None` passes the request
    /// through unlocked, and a [`KeyDecision`](super::key::KeyDecision) can also refuse it.
    /// Ready-made extractors live in [`key`](super::key).
    ///
    /// # Panics
    ///
    /// If the lock's configuration is invalid ([`DistributedLock::validate`]), with the reason,
    /// so that the application stops at start-up instead of failing every request.
    /// [`try_new`](Self::try_new) returns the error instead.
    #[track_caller]
    pub fn new<F, K>(lock: B, extractor: F) -> Self
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: IntoLockKey,
    {
        match Self::try_new(lock, extractor) {
            Ok(layer) => layer,
            Err(error) => panic!("LockLayer::new: {error}"),
        }
    }

    /// Like [`new`](Self::new), returning the lock's configuration error instead of
    /// panicking.
    pub fn try_new<F, K>(lock: B, extractor: F) -> Result<Self, LockError>
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: IntoLockKey,
    {
        Self::try_from_shared(Arc::new(lock), extractor)
    }

    /// Like [`new`](Self::new), for a lock that is already shared.
    ///
    /// # Panics
    ///
    /// As [`new`](Self::new).
    #[track_caller]
    pub fn from_shared<F, K>(lock: Arc<B>, extractor: F) -> Self
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: IntoLockKey,
    {
        match Self::try_from_shared(lock, extractor) {
            Ok(layer) => layer,
            Err(error) => panic!("LockLayer::from_shared: {error}"),
        }
    }

    /// Like [`from_shared`](Self::from_shared), returning the error instead of panicking.
    pub fn try_from_shared<F, K>(lock: Arc<B>, extractor: F) -> Result<Self, LockError>
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: IntoLockKey,
    {
        lock.validate()?;
        let extractor = Arc::new(move |parts: &Parts| extractor(parts).into_lock_key());
        let settings = Settings::new(extractor, lock.key_visibility());
        Ok(LockLayer {
            lock,
            settings,
            side: Side::Exclusive,
        })
    }

    /// The status for a request whose key is locked: 409 Conflict (the default) or 423 Locked.
    ///
    /// # Panics
    ///
    /// If `status` is not a client error (4xx): a conflict must not look like success or a
    /// server fault.
    pub fn conflict_status(mut self, status: StatusCode) -> Self {
        assert!(
            status.is_client_error(),
            "LockLayer::conflict_status needs a 4xx status such as 409 or 423, not {status}"
        );
        self.settings.conflict_status = status;
        self
    }

    /// Waits for a taken lock (the backend's `acquire`, within its waiting budget) instead of
    /// refusing at once. A request that waited the whole budget while another request held
    /// the key gets the conflict status; one whose backend did not answer gets 503 (or passes,
    /// with [`fail_open`](Self::fail_open)).
    ///
    /// Waiting requests hold a connection and memory each: bound them with
    /// [`max_waiters`](Self::max_waiters). Put a `ConcurrencyLimit` or `LoadShed` *outside*
    /// (before) this layer to bound all requests, waiting or not; one *inside* (after) it is
    /// reserved only once the lock is held, so requests waiting on a hot key do not take
    /// capacity from the others.
    pub fn wait(mut self) -> Self {
        self.settings.wait = true;
        self
    }

    /// In wait mode, lets at most `max` requests of this layer (all its clones and services)
    /// acquire at once; a request beyond that gets the conflict status at once
    /// ([`RejectionKind::Locked`](super::RejectionKind::Locked)) instead of queueing. Default:
    /// no bound. An acquire that finds its key free also takes a place, for its one round
    /// trip.
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.settings.max_waiters = Some(max);
        self
    }

    /// The longest the layer keeps a request's lock alive (default 5 minutes).
    ///
    /// While the handler runs and the response body streams, the layer extends the lock every
    /// third of its TTL, from a task of its own, so a request longer than the TTL keeps its
    /// exclusion. Past `max_hold` it stops extending, logs a warning, and the lock runs out at
    /// the end of its TTL; the handler sees it through [`LockInfo::is_lost`](crate::LockInfo).
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.settings.keep_alive_for = Some(max_hold);
        self
    }

    /// Turns the keep-alive off: a request holds its lock for at most the lock's TTL, however
    /// long it runs. For requests known to finish well within the TTL, this saves the
    /// keep-alive's task per request.
    pub fn without_keep_alive(mut self) -> Self {
        self.settings.keep_alive_for = None;
        self
    }

    /// How long the end of a response waits for its lock's release (default 1 s). The body's
    /// last frame is held back until the release returns, so a client that has the answer can
    /// lock again at once; a backend slower than this no longer holds responses back: the
    /// response finishes and the release goes on in the background (logged at `warn`).
    pub fn release_timeout(mut self, timeout: Duration) -> Self {
        self.settings.release_timeout = timeout;
        self
    }

    /// Lets requests through unlocked when the backend fails, instead of answering 503.
    /// Availability over exclusion: use it only where a duplicate is harmless.
    pub fn fail_open(mut self) -> Self {
        self.settings.fail_open = true;
        self
    }

    /// The `Retry-After` of a 503 answer to a backend failure (default 1 s, rounded up to whole
    /// seconds).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.settings.retry_after = delay;
        self
    }

    /// Answers refused requests with `responder` instead of the default responses.
    /// [`Rejection::default_response`] is there to fall back on.
    ///
    /// ```
    /// use http::{Response, StatusCode};
    /// use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig, LockLayer, RejectionKind};
    ///
    /// let layer = LockLayer::new(InMemoryDistributedLock::new(LockConfig::new()), |req| {
    ///     req.uri.path().to_owned()
    /// })
    /// .on_rejection(|rejection| match rejection.kind() {
    ///     RejectionKind::Locked if !rejection.is_grpc() => Response::builder()
    ///         .status(StatusCode::CONFLICT)
    ///         .header("content-type", "application/json")
    ///         .body(bytes::Bytes::from_static(br#"{"error":"busy"}"#))
    ///         .unwrap(),
    ///     _ => rejection.default_response(),
    /// });
    /// # let _ = layer;
    /// ```
    pub fn on_rejection<F, R>(mut self, responder: F) -> Self
    where
        F: Fn(&Rejection) -> Response<R> + Send + Sync + 'static,
        R: Into<Bytes>,
    {
        self.settings.responder = Some(Arc::new(move |rejection: &Rejection| {
            responder(rejection).map(Into::into)
        }));
        self
    }
}

impl<B: DistributedRwLock> LockLayer<B> {
    /// Takes the shared (read) side of the key for the requests `select` picks, the exclusive
    /// side for the others: the picked requests of one key run together, and never alongside
    /// an exclusive one. Waiting, conflicts, keep-alive and the rest work as for exclusive
    /// requests; a shared request refused because a writer holds the key (or waits for it)
    /// gets the conflict status. Only for a lock with a shared side ([`DistributedRwLock`]).
    ///
    /// This replaces [`permits`](Self::permits) if that was called before (the last of the
    /// two decides).
    ///
    /// A gRPC service picks by path, the method's name being its last segment:
    ///
    /// ```
    /// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
    ///
    /// let lock = InMemoryDistributedLock::new(LockConfig::new());
    /// let layer = LockLayer::new(lock, key::header("x-order-id"))
    ///     .shared_when(|parts| parts.uri.path().ends_with("/Get"));
    /// # drop(layer);
    /// ```
    pub fn shared_when<F>(mut self, select: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.side = Side::shared_when(select);
        self
    }

    /// Takes the shared side for requests with a safe method (GET, HEAD, OPTIONS, TRACE) and
    /// the exclusive side for the others: reads of one resource run together, a write runs
    /// alone. See [`shared_when`](Self::shared_when).
    ///
    /// ```
    /// use axum::{routing::get, Router};
    /// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
    ///
    /// let lock = InMemoryDistributedLock::new(LockConfig::new());
    /// let app: Router = Router::new()
    ///     .route("/orders/{id}", get(|| async { "order" }).post(|| async { "updated" }))
    ///     .layer(LockLayer::new(lock, key::path()).shared_for_safe_methods());
    /// ```
    pub fn shared_for_safe_methods(self) -> Self {
        self.shared_when(|parts| parts.method.is_safe())
    }
}

impl<B: DistributedSemaphore> LockLayer<B> {
    /// Lets up to `limit` requests of one key run at once, across every process that uses the
    /// backend: each request takes one of the key's `limit` permits
    /// ([`DistributedSemaphore`]) instead of its lock, and holds it until its response is
    /// finished. A request that finds all of them taken gets 429 Too Many Requests with
    /// `Retry-After` (gRPC 8 `RESOURCE_EXHAUSTED`), see
    /// [`RejectionKind::PermitsExhausted`](super::RejectionKind::PermitsExhausted);
    /// [`wait`](Self::wait) makes it wait for a permit instead, and
    /// [`fail_open`](Self::fail_open), the keep-alive, [`on_rejection`](Self::on_rejection)
    /// and the rest apply as for locks. Permits live apart from locks: a permit of a key does
    /// not conflict with a lock of it.
    ///
    /// This replaces [`shared_when`](Self::shared_when) if that was called before (the last of
    /// the two decides).
    ///
    /// ```
    /// use axum::{routing::post, Router};
    /// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
    ///
    /// let lock = InMemoryDistributedLock::new(LockConfig::new());
    /// // At most 3 exports per tenant at once, whichever replica takes them.
    /// let app: Router = Router::new()
    ///     .route("/tenants/{tenant}/exports", post(|| async { "started" }))
    ///     .layer(LockLayer::new(lock, key::path()).permits(3));
    /// ```
    ///
    /// A limit the backend refuses (above 65,536 on PostgreSQL) answers every request with 500
    /// ([`RejectionKind::Misconfigured`](super::RejectionKind::Misconfigured)).
    ///
    /// # Panics
    ///
    /// If `limit` is 0, which would refuse every request.
    pub fn permits(mut self, limit: u32) -> Self {
        assert!(
            limit > 0,
            "LockLayer::permits needs a limit of at least 1: 0 would refuse every request"
        );
        self.side = Side::permits(limit);
        self
    }
}

impl<B> Clone for LockLayer<B> {
    fn clone(&self) -> Self {
        LockLayer {
            lock: Arc::clone(&self.lock),
            settings: self.settings.clone(),
            side: self.side.clone(),
        }
    }
}

impl<B> fmt::Debug for LockLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("wait", &self.settings.wait)
            .field("conflict_status", &self.settings.conflict_status)
            .field("fail_open", &self.settings.fail_open)
            .field("retry_after", &self.settings.retry_after)
            .field("custom_responder", &self.settings.responder.is_some())
            .field("max_hold", &self.settings.keep_alive_for)
            .field("release_timeout", &self.settings.release_timeout)
            .field("max_waiters", &self.settings.max_waiters)
            .field("side", &self.side.describe())
            .finish_non_exhaustive()
    }
}

impl<S, B: DistributedLock> Layer<S> for LockLayer<B> {
    type Service = LockService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(
            inner,
            Arc::clone(&self.lock),
            Arc::new(self.settings.clone()),
            self.side.clone(),
        )
    }
}
