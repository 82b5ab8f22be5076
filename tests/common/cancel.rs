//! Dropping a future at each of its await points in turn.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

/// Drives `future` until it has suspended `suspensions` times (returned `Pending` that many
/// times), then drops it there and returns `None`; returns `Some(output)` if it finished first.
///
/// Called with 1, 2, 3, … this cancels a future at each of its await points in turn, however
/// long each one takes: the count is of real suspensions, not of time.
pub async fn drop_at_suspension<F: Future>(future: F, suspensions: usize) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut seen = 0;
    poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => {
            seen += 1;
            if seen >= suspensions {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    })
    .await
}
