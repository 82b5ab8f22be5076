//! [`LockService`]: the middleware that takes the lock and calls the inner service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tower_service::Service;

use super::future::{Acquire, InnerService, ResponseFuture};
use super::settings::Settings;
use super::ResponseBody;
use crate::DistributedLock;

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
}

impl<S, B> LockService<S, B> {
    pub(crate) fn new(inner: S, lock: Arc<B>, settings: Arc<Settings>) -> Self {
        LockService {
            inner,
            lock,
            settings,
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
    ResBody: http_body::Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let key = (self.settings.extractor)(&parts);
        let request = Request::from_parts(parts, body);
        let Some(key) = key else {
            return ResponseFuture::unlocked(self.inner.call(request));
        };
        let grpc = is_grpc(request.headers());
        let fresh = self.inner.clone();
        let ready = mem::replace(&mut self.inner, fresh);
        let wait = self.settings.wait;
        let acquire = acquire(Arc::clone(&self.lock), key, wait);
        let service = if wait {
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

fn acquire<B: DistributedLock>(lock: Arc<B>, key: String, wait: bool) -> Acquire {
    Box::pin(async move {
        let result = if wait {
            lock.acquire(&key).await
        } else {
            lock.try_acquire(&key).await
        };
        (key, result)
    })
}

/// gRPC requests carry `content-type: application/grpc` (optionally `+proto` and the like).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

impl<S: Clone, B> Clone for LockService<S, B> {
    fn clone(&self) -> Self {
        LockService {
            inner: self.inner.clone(),
            lock: Arc::clone(&self.lock),
            settings: Arc::clone(&self.settings),
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
    }
}
