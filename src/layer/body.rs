//! [`ResponseBody`]: the response body, holding the request's lock until it is finished.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::held::HeldLock;

/// The body of a response that passed through [`LockLayer`](super::LockLayer).
///
/// It holds the request's lock until the body is finished. When the inner body has produced
/// its last data (it reports the end of the stream, or its exact size hint reaches zero) the
/// lock is released *before* that last frame is passed on, so a client that has read the whole
/// response can take the lock again at once. On a body error, or when the body is dropped, the
/// guard is dropped (released in the background). A refused request carries the rejection's
/// short body.
///
/// The response future reads the first frame ahead before it answers
/// ([`ResponseFuture`](super::ResponseFuture)): a body that is complete at once (a string, a
/// JSON value) is released and sent together with the head, in one write.
pub struct ResponseBody<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    /// The inner service's body, with the lock (if any), in one allocation.
    Inner(Pin<Box<Inner<B>>>),
    /// The layer's own answer to a refused request.
    Rejection { data: Option<Bytes> },
}

/// One frame as the body passes it on; `None` is the end of the stream.
type Polled<B> = Option<Result<Frame<Bytes>, <B as Body>::Error>>;

pin_project! {
    struct Inner<B: Body> {
        #[pin]
        body: B,
        lock: Option<HeldLock>,
        // The release under way; the frame that ended the body waits in `ahead` for it.
        releasing: Option<BoxFuture<'static, ()>>,
        // A frame already taken from `body` and not yet passed on.
        ahead: Option<Polled<B>>,
    }
}

impl<B: Body<Data = Bytes>> ResponseBody<B> {
    /// A body holding `lock` until it is finished.
    pub(crate) fn new(body: B, lock: Option<HeldLock>) -> Self {
        ResponseBody {
            kind: Kind::Inner(Box::pin(Inner {
                body,
                lock,
                releasing: None,
                ahead: None,
            })),
        }
    }

    pub(crate) fn rejection(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Rejection {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether this body still holds a lock that is not known to be lost.
    pub fn holds_lock(&self) -> bool {
        match &self.kind {
            Kind::Inner(inner) => {
                inner.releasing.is_some() || inner.lock.as_ref().is_some_and(|lock| !lock.is_lost())
            }
            Kind::Rejection { .. } => false,
        }
    }

    /// Starts keeping the lock alive, if the body still holds it.
    pub(crate) fn keep_lock_alive(&mut self) {
        if let Kind::Inner(inner) = &mut self.kind {
            if let Some(lock) = inner.as_mut().project().lock {
                lock.keep_alive();
            }
        }
    }

    /// Takes the first frame ahead while the lock is held, and finishes the release if that
    /// frame ends the body. Ready once there is nothing more to gain before the head goes out:
    /// the release (if one started) has finished and a frame is in hand, or the body is not
    /// ready yet.
    pub(crate) fn poll_ahead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Kind::Inner(inner) = &mut self.kind else {
            return Poll::Ready(());
        };
        let reading = inner.lock.is_some() && inner.ahead.is_none();
        if inner.releasing.is_none() && !reading {
            return Poll::Ready(());
        }
        // Drives the release under way, or reads one frame (which may start one).
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                *inner.as_mut().project().ahead = Some(frame);
                Poll::Ready(())
            }
            Poll::Pending if inner.releasing.is_some() => Poll::Pending,
            Poll::Pending => Poll::Ready(()),
        }
    }
}

impl<B: Body<Data = Bytes>> Inner<B> {
    /// The one release mechanism: passes frames on while holding the lock; at the end of the
    /// inner body, releases before passing the last frame (or the end) on.
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B>> {
        let mut this = self.project();
        loop {
            if let Some(release) = this.releasing {
                ready!(release.as_mut().poll(cx));
                *this.releasing = None;
            }
            if let Some(frame) = this.ahead.take() {
                return Poll::Ready(frame);
            }
            let frame = ready!(this.body.as_mut().poll_frame(cx));
            let Some(lock) = this.lock.take() else {
                return Poll::Ready(frame);
            };
            match &frame {
                Some(Err(_)) => {
                    // A broken body: drop the guard (background release), report at once.
                    drop(lock);
                    return Poll::Ready(frame);
                }
                Some(Ok(next)) if !next.is_trailers() && !inner_finished(this.body.as_ref()) => {
                    *this.lock = Some(lock);
                    return Poll::Ready(frame);
                }
                _ => {
                    *this.releasing = Some(lock.release());
                    *this.ahead = Some(frame);
                }
            }
        }
    }
}

/// The inner body has no more data: it says so, or its exact size is used up (hyper stops
/// polling a body whose `Content-Length` has been sent). Frames that may still follow
/// (trailers) are passed on after the release. Trailers end a body too: hyper stops polling
/// after them.
fn inner_finished<B: Body>(body: Pin<&B>) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
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
        match &mut self.get_mut().kind {
            Kind::Inner(inner) => inner.as_mut().poll_frame(cx),
            Kind::Rejection { data } => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            // Not finished while the release runs: the end waits for it.
            Kind::Inner(inner) if inner.releasing.is_some() => false,
            Kind::Inner(inner) => match &inner.ahead {
                Some(frame) => frame.is_none(),
                None => {
                    inner.lock.is_none() && inner.releasing.is_none() && inner.body.is_end_stream()
                }
            },
            Kind::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = match &self.kind {
            Kind::Inner(inner) => inner,
            Kind::Rejection { data } => {
                return SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
        };
        let ahead_len = match &inner.ahead {
            Some(Some(Ok(frame))) => frame.data_ref().map_or(0, |data| data.len() as u64),
            Some(None) if inner.releasing.is_none() => return SizeHint::with_exact(0),
            Some(_) | None => 0,
        };
        if inner.releasing.is_some() {
            // Never an exact size while the release runs: hyper would stop polling a body
            // whose length is used up, and the release would miss the end it must come before.
            let mut hint = SizeHint::new();
            hint.set_lower(ahead_len);
            return hint;
        }
        let rest = inner.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(ahead_len));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(ahead_len));
        }
        hint
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Inner(inner) if inner.releasing.is_some() => "releasing the lock",
            Kind::Inner(inner) => match &inner.lock {
                Some(lock) if lock.is_lost() => "streaming; the lock was lost",
                Some(_) => "streaming with the lock held",
                None => "streaming unlocked",
            },
            Kind::Rejection { .. } => "rejection",
        };
        f.debug_struct("ResponseBody")
            .field("state", &state)
            .finish()
    }
}
