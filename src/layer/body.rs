//! [`ResponseBody`]: the response body, holding the request's lock until it is finished.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::LockGuard;

pin_project! {
    /// The body of a response that passed through [`LockLayer`](super::LockLayer).
    ///
    /// It holds the request's lock until the body is finished. At the end of the stream (after
    /// the last frame) the lock is released *before* the end is passed on, so a client that has
    /// read the whole response can take the lock again at once. On a body error, or when the
    /// body is dropped, the guard is dropped (released in the background). A refused request
    /// carries the rejection's short body.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

/// The last frame of a finished body, kept until the lock is released.
type LastFrame<B> = Option<Result<Frame<Bytes>, <B as Body>::Error>>;

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        // The inner service's body, with the lock (if any).
        Inner {
            #[pin]
            body: B,
            guard: Option<LockGuard>,
        },
        // The inner body ended; its last frame waits for the release to finish.
        Releasing {
            release: BoxFuture<'static, ()>,
            last: LastFrame<B>,
        },
        // Everything was passed on.
        Finished,
        // The layer's own answer to a refused request.
        Rejection {
            data: Option<Bytes>,
        },
    }
}

/// Releases `guard`, logging a failure (the guard's lease will run out on its own).
pub(crate) fn release(guard: LockGuard) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        if let Err(error) = guard.release().await {
            tracing::debug!(%error, "releasing the lock of a finished response failed");
        }
    })
}

impl<B: Body> ResponseBody<B> {
    /// A body holding `guard` until it is finished. An empty body must not hold a lock: the
    /// response future releases before answering.
    pub(crate) fn new(body: B, guard: Option<LockGuard>) -> Self {
        debug_assert!(guard.is_none() || !body.is_end_stream());
        ResponseBody {
            kind: Kind::Inner { body, guard },
        }
    }

    pub(crate) fn rejection(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Rejection {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether this body still holds a lock.
    pub fn holds_lock(&self) -> bool {
        matches!(
            self.kind,
            Kind::Inner { guard: Some(_), .. } | Kind::Releasing { .. }
        )
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Inner { mut body, guard } => {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    let ended = match &frame {
                        Some(Ok(_)) => body.is_end_stream(),
                        None => true,
                        Some(Err(_)) => {
                            // A broken body: drop the guard (background release), report at once.
                            drop(guard.take());
                            return Poll::Ready(frame);
                        }
                    };
                    match guard.take() {
                        Some(guard) if ended => kind.set(Kind::Releasing {
                            release: release(guard),
                            last: frame,
                        }),
                        guard_or_none => {
                            *guard = guard_or_none;
                            return Poll::Ready(frame);
                        }
                    }
                }
                KindProj::Releasing { release, last } => {
                    ready!(release.as_mut().poll(cx));
                    let last = last.take();
                    kind.set(Kind::Finished);
                    return Poll::Ready(last);
                }
                KindProj::Finished => return Poll::Ready(None),
                KindProj::Rejection { data } => {
                    return Poll::Ready(data.take().map(|data| Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Releasing { .. } => false,
            Kind::Finished => true,
            Kind::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Releasing { last, .. } => match last {
                Some(Ok(frame)) => {
                    SizeHint::with_exact(frame.data_ref().map_or(0, |data| data.len() as u64))
                }
                _ => SizeHint::with_exact(0),
            },
            Kind::Finished => SizeHint::with_exact(0),
            Kind::Rejection { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Inner { guard: Some(_), .. } => "streaming with the lock held",
            Kind::Inner { guard: None, .. } => "streaming unlocked",
            Kind::Releasing { .. } => "releasing the lock",
            Kind::Finished => "finished",
            Kind::Rejection { .. } => "rejection",
        };
        f.debug_struct("ResponseBody")
            .field("state", &state)
            .finish()
    }
}
