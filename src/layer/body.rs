//! [`ResponseBody`]: the response body, holding the request's lock until it is finished.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::LockGuard;

pin_project! {
    /// The body of a response that passed through [`LockLayer`](super::LockLayer).
    ///
    /// It holds the request's lock until the body is finished: the lock is released when the
    /// last frame is read, at end of stream, on a body error, or when the body is dropped. An
    /// empty body releases at once. A refused request carries the rejection's short body.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // The inner service's body, with the lock (if any).
        Inner {
            #[pin]
            body: B,
            guard: Option<LockGuard>,
        },
        // The layer's own answer to a refused request.
        Rejection {
            data: Option<Bytes>,
        },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn new(body: B, guard: Option<LockGuard>) -> Self {
        let guard = if body.is_end_stream() { None } else { guard };
        ResponseBody {
            kind: Kind::Inner { body, guard },
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn rejection(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Rejection {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether this body still holds a lock.
    pub fn holds_lock(&self) -> bool {
        matches!(self.kind, Kind::Inner { guard: Some(_), .. })
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
        match self.project().kind.project() {
            KindProj::Inner { mut body, guard } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let finished = match &frame {
                    Some(Ok(_)) => body.is_end_stream(),
                    Some(Err(_)) | None => true,
                };
                if finished {
                    // Dropping the guard releases the lock.
                    drop(guard.take());
                }
                Poll::Ready(frame)
            }
            KindProj::Rejection { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Rejection { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { guard, .. } => f
                .debug_struct("ResponseBody")
                .field("guard", guard)
                .finish_non_exhaustive(),
            Kind::Rejection { data } => f
                .debug_struct("ResponseBody")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}
