//! [`ResponseFuture`]: takes the lock, then drives the inner service's future while holding it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::held::HeldLock;
use super::rejection::{Outcome, Rejection, RejectionKind};
use super::settings::Settings;
use super::ResponseBody;
use crate::observe::{layer_request, LayerOutcome};
use crate::{LockError, LockGuard};

/// The lock acquisition of one request.
pub(crate) type Acquire = BoxFuture<'static, Acquired>;

/// What an acquisition ends with: the key back, the result, and whether it was for a permit
/// (whose refusal is answered as [`RejectionKind::PermitsExhausted`]).
pub(crate) struct Acquired {
    pub(crate) key: String,
    pub(crate) result: Result<LockGuard, LockError>,
    pub(crate) permit: bool,
}

pin_project! {
    /// The response future of [`LockService`](super::LockService).
    ///
    /// It first takes the lock, then calls the inner service and polls its future while holding
    /// the lock (kept alive by its keep-alive), and finally moves the lock into the
    /// [`ResponseBody`]. Before it answers, it reads the body's first frame ahead: a body that
    /// is complete at once has its lock released before the head goes out, so the whole
    /// response is written at once. Dropping it at any point (a client that went away)
    /// releases the lock, or abandons the acquisition.
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ResBody: http_body::Body,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
        // `lock.request`: entered on every poll, so the acquire's span nests inside it.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ResBody: http_body::Body,
    {
        Acquiring {
            acquire: Acquire,
            service: Option<InnerService<S>>,
            request: Option<Request<ReqBody>>,
            settings: Arc<Settings>,
            grpc: bool,
        },
        // Wait mode: the lock is held; the inner service is being readied again.
        Readying {
            service: S,
            request: Option<Request<ReqBody>>,
            lock: Option<HeldLock>,
            settings: Arc<Settings>,
            grpc: bool,
        },
        // Field order matters: the inner future is dropped before the lock, so a cancelled
        // handler stops before its lock is released.
        Calling {
            #[pin]
            future: S::Future,
            lock: Option<HeldLock>,
        },
        // The response is ready: its body's first frame is read ahead (and the lock released
        // if that ends the body) before the head is passed on.
        Answering {
            response: Option<Response<ResponseBody<ResBody>>>,
        },
        Done,
    }
}

/// The inner service a [`ResponseFuture`] will call: already readied by `poll_ready`, or to be
/// readied once the lock is held.
pub(crate) enum InnerService<S> {
    Ready(S),
    NeedsReady(S),
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ResBody: http_body::Body,
{
    pub(crate) fn unlocked(future: S::Future) -> Self {
        let span = request_span(false);
        span.in_scope(|| layer_request(LayerOutcome::Unlocked));
        ResponseFuture {
            state: State::Calling { future, lock: None },
            span,
        }
    }

    pub(crate) fn acquiring(
        acquire: Acquire,
        service: InnerService<S>,
        request: Request<ReqBody>,
        settings: Arc<Settings>,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                service: Some(service),
                request: Some(request),
                settings,
                grpc,
            },
            span: request_span(grpc),
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut state = this.state;
        loop {
            match state.as_mut().project() {
                StateProj::Acquiring {
                    acquire,
                    service,
                    request,
                    settings,
                    grpc,
                } => {
                    let Acquired {
                        key,
                        result,
                        permit,
                    } = ready!(acquire.as_mut().poll(cx));
                    let service = service.take().expect("polled after completion");
                    let mut request = request.take().expect("polled after completion");
                    let (settings, grpc) = (Arc::clone(settings), *grpc);
                    let lock = match Outcome::of(result, settings.fail_open, permit) {
                        Outcome::Locked(guard) => {
                            layer_request(LayerOutcome::Locked);
                            let lock = HeldLock::new(guard, &settings);
                            request.extensions_mut().insert(lock.info().clone());
                            Some(lock)
                        }
                        Outcome::Unlocked => {
                            layer_request(LayerOutcome::FailedOpen);
                            None
                        }
                        Outcome::Refused(kind, error) => {
                            state.set(State::Done);
                            return Poll::Ready(Ok(refusal(kind, key, error, grpc, &settings)));
                        }
                    };
                    match service {
                        InnerService::Ready(mut service) => {
                            let future = service.call(request);
                            state.set(State::Calling { future, lock });
                        }
                        InnerService::NeedsReady(service) => state.set(State::Readying {
                            service,
                            request: Some(request),
                            lock,
                            settings,
                            grpc,
                        }),
                    }
                }
                StateProj::Readying {
                    service,
                    request,
                    lock,
                    settings,
                    grpc,
                } => {
                    let readied = service.poll_ready(cx);
                    if readied.is_pending() {
                        if let Some(lock) = lock {
                            lock.keep_alive();
                        }
                    }
                    if let Err(error) = ready!(readied) {
                        state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    if let Some(lost) = lock.as_ref().filter(|lock| lock.is_lost()) {
                        // Readying outlasted the lock (past max_hold): the handler must not
                        // run unprotected.
                        let key = lost.info().key().to_owned();
                        let kind = RejectionKind::Locked;
                        let response = refusal(kind, key, LockError::LockLost, *grpc, settings);
                        state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let request = request.take().expect("polled after completion");
                    let lock = lock.take();
                    let future = service.call(request);
                    state.set(State::Calling { future, lock });
                }
                StateProj::Calling { future, lock } => {
                    let response = match future.poll(cx) {
                        Poll::Ready(Ok(response)) => response,
                        Poll::Ready(Err(error)) => {
                            state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        Poll::Pending => {
                            if let Some(lock) = lock {
                                lock.keep_alive();
                            }
                            return Poll::Pending;
                        }
                    };
                    let lock = lock.take();
                    let locked = lock.is_some();
                    let response = response.map(|body| ResponseBody::new(body, lock));
                    if !locked {
                        state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    state.set(State::Answering {
                        response: Some(response),
                    });
                }
                StateProj::Answering { response } => {
                    let body = response
                        .as_mut()
                        .expect("polled after completion")
                        .body_mut();
                    ready!(body.poll_ahead(cx));
                    // From here on nobody may poll the body for a while (a slow client).
                    body.keep_lock_alive();
                    let response = response.take().expect("polled after completion");
                    state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The answer to a refused request: the configured responder's, or the default.
fn refusal<B>(
    kind: RejectionKind,
    key: String,
    error: LockError,
    grpc: bool,
    settings: &Settings,
) -> Response<ResponseBody<B>>
where
    B: http_body::Body<Data = Bytes>,
{
    layer_request(match kind {
        RejectionKind::Locked | RejectionKind::PermitsExhausted => LayerOutcome::Conflict,
        RejectionKind::BackendUnavailable => LayerOutcome::BackendError,
        _ => LayerOutcome::Invalid,
    });
    let rejection = Rejection::new(kind, key, error, grpc, settings);
    settings.respond(&rejection).map(ResponseBody::rejection)
}

/// The span of one request through the layer; its `outcome` is recorded once decided.
fn request_span(grpc: bool) -> tracing::Span {
    crate::observe::wanted(tracing::debug_span!(
        "lock.request",
        grpc,
        outcome = tracing::field::Empty
    ))
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ResBody: http_body::Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Acquiring { .. } => "acquiring",
            State::Readying { .. } => "readying the inner service with the lock held",
            State::Calling { lock: Some(_), .. } => "calling with the lock held",
            State::Calling { lock: None, .. } => "calling unlocked",
            State::Answering { .. } => "reading the body ahead before answering",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
