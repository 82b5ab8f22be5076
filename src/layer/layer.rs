//! [`LockLayer`]: the configuration of the lock middleware.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use tower_layer::Layer;

use super::settings::Settings;
use super::{LockService, Rejection};
use crate::DistributedLock;

/// A Tower layer that takes a lock per request, keyed by a closure over the request head.
///
/// The extractor returns a `String` to lock that key, or `None` to let the request through
/// without a lock. By default the layer fails fast (`try_acquire`) and answers a taken lock
/// with 409 Conflict; a backend failure is answered with 503 and `Retry-After` (fail closed).
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
}

impl<B: DistributedLock> LockLayer<B> {
    /// A layer locking the key `extractor` builds from each request head.
    ///
    /// `extractor` returns anything that converts into `Option<String>`: a `String` locks that
    /// key, `None` passes the request through unlocked. Ready-made extractors live in
    /// [`key`](super::key).
    pub fn new<F, K>(lock: B, extractor: F) -> Self
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: Into<Option<String>>,
    {
        Self::from_shared(Arc::new(lock), extractor)
    }

    /// Like [`new`](Self::new), for a lock that is already shared.
    pub fn from_shared<F, K>(lock: Arc<B>, extractor: F) -> Self
    where
        F: Fn(&Parts) -> K + Send + Sync + 'static,
        K: Into<Option<String>>,
    {
        LockLayer {
            lock,
            settings: Settings::new(Arc::new(move |parts: &Parts| extractor(parts).into())),
        }
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
    /// refusing at once. A request that waited the whole budget gets the conflict status.
    pub fn wait(mut self) -> Self {
        self.settings.wait = true;
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

impl<B> Clone for LockLayer<B> {
    fn clone(&self) -> Self {
        LockLayer {
            lock: Arc::clone(&self.lock),
            settings: self.settings.clone(),
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
        )
    }
}
