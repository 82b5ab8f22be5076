//! [`ResponseFuture`]: takes the lock, then drives the inner service's future while holding it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::release;
use super::rejection::{Outcome, Rejection};
use super::settings::Settings;
use super::ResponseBody;
use crate::{LockError, LockGuard};

/// The lock acquisition of one request; gives the key back with the result.
pub(crate) type Acquire = BoxFuture<'static, (String, Result<LockGuard, LockError>)>;

pin_project! {
    /// The response future of [`LockService`](super::LockService).
    ///
    /// It first takes the lock, then calls the inner service and polls its future while holding
    /// the lock, and finally moves the lock into the [`ResponseBody`]. Dropping it at any point
    /// (a client that went away) releases the lock, or abandons the acquisition.
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
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
            guard: Option<LockGuard>,
        },
        // Field order matters: the inner future is dropped before the guard, so a cancelled
        // handler stops before its lock is released.
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<LockGuard>,
        },
        // The response has an empty body: release, then answer.
        Releasing {
            release: BoxFuture<'static, ()>,
            response: Option<S::Response>,
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

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn unlocked(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling {
                future,
                guard: None,
            },
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
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Acquiring {
                    acquire,
                    service,
                    request,
                    settings,
                    grpc,
                } => {
                    let (key, result) = ready!(acquire.as_mut().poll(cx));
                    let service = service.take().expect("polled after completion");
                    let mut request = request.take().expect("polled after completion");
                    let guard = match Outcome::of(result, settings.fail_open) {
                        Outcome::Locked(guard) => {
                            request.extensions_mut().insert(guard.info().clone());
                            Some(guard)
                        }
                        Outcome::Unlocked => None,
                        Outcome::Refused(kind, error) => {
                            let rejection = Rejection::new(kind, key, error, *grpc, settings);
                            let response = settings.respond(&rejection);
                            state.set(State::Done);
                            return Poll::Ready(Ok(response.map(ResponseBody::rejection)));
                        }
                    };
                    match service {
                        InnerService::Ready(mut service) => {
                            let future = service.call(request);
                            state.set(State::Calling { future, guard });
                        }
                        InnerService::NeedsReady(service) => state.set(State::Readying {
                            service,
                            request: Some(request),
                            guard,
                        }),
                    }
                }
                StateProj::Readying {
                    service,
                    request,
                    guard,
                } => {
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    let request = request.take().expect("polled after completion");
                    let guard = guard.take();
                    let future = service.call(request);
                    state.set(State::Calling { future, guard });
                }
                StateProj::Calling { future, guard } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    match guard.take() {
                        // Nothing left to hold the lock for: release before answering, so the
                        // client can take the lock again as soon as it has the answer.
                        Some(guard) if response.body().is_end_stream() => {
                            state.set(State::Releasing {
                                release: release(guard),
                                response: Some(response),
                            });
                        }
                        guard => {
                            state.set(State::Done);
                            return Poll::Ready(Ok(
                                response.map(|body| ResponseBody::new(body, guard))
                            ));
                        }
                    }
                }
                StateProj::Releasing { release, response } => {
                    ready!(release.as_mut().poll(cx));
                    let response = response.take().expect("polled after completion");
                    state.set(State::Done);
                    return Poll::Ready(Ok(response.map(|body| ResponseBody::new(body, None))));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Acquiring { .. } => "acquiring",
            State::Readying { .. } => "readying the inner service with the lock held",
            State::Calling { guard: Some(_), .. } => "calling with the lock held",
            State::Calling { guard: None, .. } => "calling unlocked",
            State::Releasing { .. } => "releasing the lock of an empty response",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
