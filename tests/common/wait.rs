//! Waiting, within a bound, for a condition that sends no signal (a background release, a
//! server noticing a closed connection, a lease running out).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Checks `done` every 5 ms for at most `within`; true as soon as it holds.
pub async fn eventually<F, Fut>(within: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`eventually`] with a 5 s bound, failing the test with `what` if it never holds.
pub async fn assert_eventually<F, Fut>(what: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert_eventually_within(Duration::from_secs(5), what, done).await;
}

/// Like [`eventually`], failing the test with `what` if it does not hold within `within`.
pub async fn assert_eventually_within<F, Fut>(within: Duration, what: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(eventually(within, done).await, "never happened: {what}");
}
