//! [`Rejection`]: why the layer refused a request, and the default answers (HTTP and gRPC).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::settings::Settings;
use crate::{LockError, LockGuard};

/// Why [`LockLayer`](super::LockLayer) refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// Another request holds the key (or held it for the whole waiting budget in wait mode, or
    /// [`max_waiters`](super::LockLayer::max_waiters) requests were waiting already).
    /// HTTP: the conflict status (409, or 423 if configured). gRPC: 10 `ABORTED`.
    Locked,
    /// All the permits of the key are taken ([`LockLayer::permits`](super::LockLayer::permits)),
    /// or were for the whole waiting budget in wait mode, or
    /// [`max_waiters`](super::LockLayer::max_waiters) requests were waiting already.
    /// HTTP: 429 Too Many Requests with `Retry-After`
    /// ([`retry_after`](super::LockLayer::retry_after), default 1 s). gRPC: 8
    /// `RESOURCE_EXHAUSTED`.
    PermitsExhausted,
    /// The extractor built a key the backend refuses (empty or too long), or refused the
    /// request itself ([`KeyDecision::Refuse`](super::KeyDecision::Refuse)).
    /// HTTP: 400. gRPC: 3 `INVALID_ARGUMENT`.
    InvalidKey,
    /// The lock's configuration is invalid (a server-side mistake).
    /// HTTP: 500. gRPC: 13 `INTERNAL`.
    Misconfigured,
    /// The backend failed or could not be reached, and the layer fails closed.
    /// HTTP: 503 with `Retry-After`. gRPC: 14 `UNAVAILABLE`.
    BackendUnavailable,
}

/// A refused request: what went wrong, for which key, and how the default answer looks.
///
/// A custom responder ([`LockLayer::on_rejection`](super::LockLayer::on_rejection)) receives
/// this and may fall back on [`default_response`](Self::default_response).
pub struct Rejection {
    kind: RejectionKind,
    key: String,
    error: LockError,
    grpc: bool,
    conflict_status: StatusCode,
    retry_after: Duration,
}

impl Rejection {
    pub(crate) fn new(
        kind: RejectionKind,
        key: String,
        error: LockError,
        grpc: bool,
        settings: &Settings,
    ) -> Self {
        let key_shown = settings.keys.show(&key);
        match kind {
            RejectionKind::Locked => {
                tracing::debug!(key = %key_shown, "request refused: the key is locked")
            }
            RejectionKind::PermitsExhausted => {
                tracing::debug!(key = %key_shown, "request refused: every permit of the key is taken")
            }
            // The client's doing: nothing for an operator to act on.
            RejectionKind::InvalidKey => {
                tracing::debug!(key = %key_shown, error = &error as &dyn std::error::Error, "request refused: no lockable key")
            }
            _ => {
                tracing::warn!(key = %key_shown, error = &error as &dyn std::error::Error, ?kind, "request refused: the lock could not be taken")
            }
        }
        Rejection {
            kind,
            key,
            error,
            grpc,
            conflict_status: settings.conflict_status,
            retry_after: settings.retry_after,
        }
    }

    /// Why the request was refused.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The key the request asked for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The backend's error.
    pub fn error(&self) -> &LockError {
        &self.error
    }

    /// Whether the request was a gRPC call (`content-type: application/grpc…`).
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// The layer's own answer: an HTTP status with a short text body, or for gRPC a
    /// trailers-only response carrying `grpc-status` and `grpc-message`.
    pub fn default_response(&self) -> Response<Bytes> {
        let (status, grpc_code, message) = match self.kind {
            RejectionKind::Locked => (
                self.conflict_status,
                GRPC_ABORTED,
                "the resource is locked by another request",
            ),
            RejectionKind::PermitsExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                GRPC_RESOURCE_EXHAUSTED,
                "every permit of the resource is taken by other requests",
            ),
            RejectionKind::InvalidKey => (
                StatusCode::BAD_REQUEST,
                GRPC_INVALID_ARGUMENT,
                "the request does not name a lockable resource",
            ),
            RejectionKind::Misconfigured => (
                StatusCode::INTERNAL_SERVER_ERROR,
                GRPC_INTERNAL,
                "the lock is misconfigured",
            ),
            RejectionKind::BackendUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                GRPC_UNAVAILABLE,
                "the lock service is unavailable",
            ),
        };
        if self.grpc {
            return grpc_trailers_only(grpc_code, message);
        }
        let mut response = Response::new(Bytes::from_static(message.as_bytes()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self.kind,
            RejectionKind::BackendUnavailable | RejectionKind::PermitsExhausted
        ) {
            headers.insert(header::RETRY_AFTER, retry_after_seconds(self.retry_after));
        }
        response
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("kind", &self.kind)
            .field("key", &self.key)
            .field("error", &self.error)
            .field("grpc", &self.grpc)
            .finish()
    }
}

const GRPC_INVALID_ARGUMENT: u16 = 3;
const GRPC_RESOURCE_EXHAUSTED: u16 = 8;
const GRPC_ABORTED: u16 = 10;
const GRPC_INTERNAL: u16 = 13;
const GRPC_UNAVAILABLE: u16 = 14;

/// A gRPC error as a trailers-only response: HTTP 200, the status in the headers, no body.
fn grpc_trailers_only(code: u16, message: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    // Our messages are plain ASCII, so they need no percent-encoding.
    headers.insert(
        "grpc-message",
        HeaderValue::from_str(message).expect("ASCII message"),
    );
    response
}

fn retry_after_seconds(delay: Duration) -> HeaderValue {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

/// What the layer does with the result of an acquisition.
pub(crate) enum Outcome {
    Locked(LockGuard),
    /// Let the request through without a lock (fail-open on a backend failure).
    Unlocked,
    Refused(RejectionKind, LockError),
}

impl Outcome {
    /// `permit`: the acquisition was for one of the key's permits.
    pub(crate) fn of(result: Result<LockGuard, LockError>, fail_open: bool, permit: bool) -> Self {
        let error = match result {
            Ok(guard) => return Outcome::Locked(guard),
            Err(error) => error,
        };
        let kind = match error {
            LockError::AlreadyLocked | LockError::Timeout if permit => {
                RejectionKind::PermitsExhausted
            }
            LockError::AlreadyLocked | LockError::Timeout => RejectionKind::Locked,
            LockError::InvalidKey { .. } => RejectionKind::InvalidKey,
            LockError::InvalidConfig { .. } => RejectionKind::Misconfigured,
            _ if fail_open => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "lock backend failed; letting the request through unlocked (fail-open)"
                );
                return Outcome::Unlocked;
            }
            _ => RejectionKind::BackendUnavailable,
        };
        Outcome::Refused(kind, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), "3");
        assert_eq!(retry_after_seconds(Duration::ZERO), "1");
    }

    #[test]
    fn errors_map_to_kinds_and_fail_open_only_covers_backend_failures() {
        let backend = || LockError::backend_msg("down");
        for permit in [false, true] {
            let taken = if permit {
                RejectionKind::PermitsExhausted
            } else {
                RejectionKind::Locked
            };
            let cases = [
                (LockError::AlreadyLocked, Some(taken)),
                (LockError::Timeout, Some(taken)),
                (
                    LockError::invalid_key("empty"),
                    Some(RejectionKind::InvalidKey),
                ),
                (
                    LockError::invalid_config("ttl"),
                    Some(RejectionKind::Misconfigured),
                ),
                (backend(), Some(RejectionKind::BackendUnavailable)),
            ];
            for (error, expected) in cases {
                let closed = match Outcome::of(Err(error.clone()), false, permit) {
                    Outcome::Refused(kind, _) => Some(kind),
                    _ => None,
                };
                assert_eq!(closed, expected, "{error:?}, permit: {permit}");
            }
            assert!(matches!(
                Outcome::of(Err(backend()), true, permit),
                Outcome::Unlocked
            ));
            assert!(matches!(
                Outcome::of(Err(LockError::AlreadyLocked), true, permit),
                Outcome::Refused(kind, _) if kind == taken
            ));
        }
    }
}
