//! [`LockService`]: the middleware that takes the lock and calls the inner service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::ready;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use tower_service::Service;

use super::future::{Acquire, Acquired, InnerService, ResponseFuture};
use super::key::KeyDecision;
use super::settings::Settings;
use super::side::{Chosen, Side};
use super::waiters::WaiterSlot;
use super::ResponseBody;
use crate::{DistributedLock, LockError};

/// The service [`LockLayer`](super::LockLayer) wraps around an inner service.
///
/// Readiness is the inner service's. On `call` it builds the key; with a key, it moves the
/// ready inner service into the [`ResponseFuture`] (leaving a clone behind, as Tower requires),
/// takes the lock there and only then calls it. In wait mode the reservation is given back while
/// the request waits for its lock, and the service is readied again once the lock is held. It never returns an error of its own: conflicts
/// and backend failures become responses.
pub struct LockService<S, B> {
    inner: S,
    lock: Arc<B>,
    settings: Arc<Settings>,
    side: Side<B>,
}

impl<S, B> LockService<S, B> {
    pub(crate) fn new(inner: S, lock: Arc<B>, settings: Arc<Settings>, side: Side<B>) -> Self {
        LockService {
            inner,
            lock,
            settings,
            side,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for LockService<S, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    B: DistributedLock,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let decision = (self.settings.extractor)(&parts);
        // The selector runs only for a request that is to be locked.
        let chosen = match &decision {
            KeyDecision::Lock(_) => self.side.for_request(&parts),
            _ => Chosen::Exclusive,
        };
        let request = Request::from_parts(parts, body);
        let acquire = match decision {
            KeyDecision::Lock(key) => self.acquire(key, chosen),
            KeyDecision::PassUnlocked => return ResponseFuture::unlocked(self.inner.call(request)),
            KeyDecision::Refuse(reason) => refused(LockError::invalid_key(reason)),
        };
        let grpc = is_grpc(request.headers());
        let fresh = self.inner.clone();
        let ready = mem::replace(&mut self.inner, fresh);
        let service = if self.settings.wait {
            // A wait may last the whole budget: give the capacity reserved by poll_ready back
            // (a concurrency permit, a buffer slot) and reserve again once the lock is held, so
            // requests queued on a hot key do not starve requests for other keys.
            let unreserved = ready.clone();
            drop(ready);
            InnerService::NeedsReady(unreserved)
        } else {
            InnerService::Ready(ready)
        };
        ResponseFuture::acquiring(acquire, service, request, Arc::clone(&self.settings), grpc)
    }
}

impl<S, B: DistributedLock> LockService<S, B> {
    /// The acquisition of `key` as `chosen` says: at once, or in wait mode within a place
    /// among the layer's waiters (none left: refused at once, as if the key were taken).
    fn acquire(&self, key: String, chosen: Chosen<B>) -> Acquire {
        let lock = Arc::clone(&self.lock);
        let wait = self.settings.wait;
        let permit = matches!(chosen, Chosen::Permit(..));
        let slot = match self.settings.max_waiters {
            Some(max) if wait => match WaiterSlot::try_take(&self.settings.waiting, max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(key = %self.settings.keys.show(&key), max_waiters = max, "request refused: too many requests waiting for locks");
                    return Box::pin(ready(Acquired {
                        key,
                        result: Err(LockError::AlreadyLocked),
                        permit,
                    }));
                }
            },
            _ => None,
        };
        Box::pin(async move {
            let result = match chosen {
                Chosen::Shared(acquire_shared) => acquire_shared(&lock, &key, wait).await,
                Chosen::Permit(limit, acquire_permit) => {
                    acquire_permit(&lock, &key, limit, wait).await
                }
                Chosen::Exclusive if wait => lock.acquire(&key).await,
                Chosen::Exclusive => lock.try_acquire(&key).await,
            };
            drop(slot);
            Acquired {
                key,
                result,
                permit,
            }
        })
    }
}

/// An acquisition that is refused before it starts.
fn refused(error: LockError) -> Acquire {
    Box::pin(ready(Acquired {
        key: String::new(),
        result: Err(error),
        permit: false,
    }))
}

/// gRPC requests carry `content-type: application/grpc`, optionally with a codec
/// (`application/grpc+proto`), in any case. `application/grpc-web…` is another protocol, whose
/// errors need another content type: it is answered as HTTP.
fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let Some(value) = headers
        .get(http::header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
    else {
        return false;
    };
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

impl<S: Clone, B> Clone for LockService<S, B> {
    fn clone(&self) -> Self {
        LockService {
            inner: self.inner.clone(),
            lock: Arc::clone(&self.lock),
            settings: Arc::clone(&self.settings),
            side: self.side.clone(),
        }
    }
}

impl<S: fmt::Debug, B> fmt::Debug for LockService<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        assert!(!is_grpc(&headers));
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        assert!(is_grpc(&headers));
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&headers));
        for grpc in ["Application/GRPC", "application/grpc;charset=utf-8"] {
            headers.insert(http::header::CONTENT_TYPE, grpc.parse().unwrap());
            assert!(is_grpc(&headers), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/grp",
        ] {
            headers.insert(http::header::CONTENT_TYPE, other.parse().unwrap());
            assert!(!is_grpc(&headers), "{other}");
        }
    }
}
