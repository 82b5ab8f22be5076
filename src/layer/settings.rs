//! What a [`LockLayer`](super::LockLayer) was configured with, shared by its services.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use super::key::KeyDecision;
use super::Rejection;
use crate::KeyVisibility;

pub(crate) type KeyExtractor = dyn Fn(&Parts) -> KeyDecision + Send + Sync;
pub(crate) type Responder = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// The default of [`LockLayer::max_hold`](super::LockLayer::max_hold).
pub(crate) const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(5 * 60);
/// The default of [`LockLayer::release_timeout`](super::LockLayer::release_timeout).
pub(crate) const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) extractor: Arc<KeyExtractor>,
    pub(crate) wait: bool,
    pub(crate) conflict_status: StatusCode,
    pub(crate) fail_open: bool,
    pub(crate) retry_after: Duration,
    pub(crate) responder: Option<Arc<Responder>>,
    /// Extend the lock while the request runs, for at most this long; `None`: never extend.
    pub(crate) keep_alive_for: Option<Duration>,
    pub(crate) release_timeout: Duration,
    pub(crate) max_waiters: Option<usize>,
    /// Requests of this layer (all its services) acquiring in wait mode now.
    pub(crate) waiting: Arc<AtomicUsize>,
    /// How the layer's log events show keys: as the lock's own do.
    pub(crate) keys: KeyVisibility,
}

impl Settings {
    pub(crate) fn new(extractor: Arc<KeyExtractor>, keys: KeyVisibility) -> Self {
        Settings {
            extractor,
            wait: false,
            conflict_status: StatusCode::CONFLICT,
            fail_open: false,
            retry_after: Duration::from_secs(1),
            responder: None,
            keep_alive_for: Some(DEFAULT_MAX_HOLD),
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            max_waiters: None,
            waiting: Arc::new(AtomicUsize::new(0)),
            keys,
        }
    }

    /// The response for a refused request: the custom responder's, or the default one.
    pub(crate) fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        match &self.responder {
            Some(responder) => responder(rejection),
            None => rejection.default_response(),
        }
    }
}
