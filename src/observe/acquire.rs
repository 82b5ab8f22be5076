//! The span and metrics of one `try_acquire` or `acquire`.

use std::future::Future;

use std::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use super::record;
use super::{Held, KeyVisibility, Mode, Outcome};
use crate::{LockError, LockGuard};

/// Runs `acquire` (a backend's `try_acquire` or `acquire` of `key`, their shared forms, or their
/// permit forms, as `lock_mode` says: `exclusive`, `shared` or `permit`) inside a `lock.acquire`
/// span, records its outcome, time waited and fencing token in the span and the metrics, and
/// marks the guard as held by `backend`.
pub(crate) fn observe_acquire<F>(
    backend: &'static str,
    keys: KeyVisibility,
    key: &str,
    mode: Mode,
    lock_mode: &'static str,
    acquire: F,
) -> impl Future<Output = Result<LockGuard, LockError>> + Send + use<F>
where
    F: Future<Output = Result<LockGuard, LockError>> + Send,
{
    let span = super::wanted(tracing::debug_span!(
        "lock.acquire",
        backend,
        key = keys.shown(key).map(display),
        mode = mode.as_str(),
        lock_mode,
        outcome = Empty,
        waited_ms = Empty,
        fencing_token = Empty,
    ));
    // The clock is read only when a span or the metrics will show the time.
    let timed = !span.is_disabled() || record::ENABLED;
    let recorded = span.clone();
    async move {
        let started = timed.then(Instant::now);
        let _waiting = (mode == Mode::Wait).then(|| Waiting::new(backend));
        let mut result = acquire.await;
        let waited = started.map(|started| started.elapsed());
        let outcome = Outcome::of(&result);
        recorded.record("outcome", outcome.label(true));
        if let Some(waited) = waited {
            recorded.record("waited_ms", waited.as_secs_f64() * 1_000.0);
        }
        match &mut result {
            Ok(guard) => {
                recorded.record("fencing_token", guard.fencing_token());
                tracing::debug!("lock acquired");
                guard.set_held(Held::new(backend, keys));
            }
            Err(error @ LockError::BackendError(_)) => {
                tracing::warn!(
                    error = &*error as &dyn std::error::Error,
                    "lock not acquired: backend error"
                );
            }
            Err(_) => tracing::debug!(outcome = outcome.label(true), "lock not acquired"),
        }
        if let Some(waited) = waited {
            record::acquired(backend, mode, outcome, waited);
        }
        result
    }
    .instrument(span)
}

/// Counts a caller in the `distributed_lock_waiting` gauge while it waits (also when its
/// acquire is dropped).
struct Waiting(&'static str);

impl Waiting {
    fn new(backend: &'static str) -> Self {
        record::waiting(backend, 1.0);
        Waiting(backend)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        record::waiting(self.0, -1.0);
    }
}
