//! Recording metrics through the `metrics` facade (feature `metrics`); without the feature,
//! every function here does nothing and compiles away.
//!
//! Names and labels are listed in docs/observability.md. Labels are few and bounded: never
//! the key.

use std::time::Duration;

use super::{Mode, Outcome};

/// Whether metrics are recorded (the feature `metrics`).
pub(crate) const ENABLED: bool = cfg!(feature = "metrics");

/// Why a guard's lock was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LostCause {
    /// Its lease ran out before it was released or renewed.
    Expired,
    /// The backend said it was gone before the lease ran out (taken over, a session that
    /// ended, a failover).
    Backend,
}

impl LostCause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LostCause::Expired => "expired",
            LostCause::Backend => "backend",
        }
    }
}

/// How the layer dealt with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerOutcome {
    /// It ran under the lock.
    Locked,
    /// It was refused: the key was locked (409/423, gRPC `ABORTED`).
    Conflict,
    /// It was refused: the backend failed (503, gRPC `UNAVAILABLE`).
    BackendError,
    /// It was refused: no lockable key, or a misconfigured lock (400/500).
    Invalid,
    /// It ran without a lock: the key extractor passed it.
    Unlocked,
    /// It ran without a lock: the backend failed and `fail_open` let it through.
    FailedOpen,
}

impl LayerOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LayerOutcome::Locked => "locked",
            LayerOutcome::Conflict => "conflict",
            LayerOutcome::BackendError => "backend_error",
            LayerOutcome::Invalid => "invalid",
            LayerOutcome::Unlocked => "unlocked",
            LayerOutcome::FailedOpen => "failed_open",
        }
    }
}

#[cfg(feature = "metrics")]
mod sink {
    use super::*;
    use metrics::{counter, gauge, histogram};

    /// The counter of acquisitions, by backend, mode and outcome.
    const ACQUIRE_TOTAL: &str = "distributed_lock_acquire_total";
    /// The histogram of the time an acquire took (waited), by backend, mode and outcome.
    const ACQUIRE_WAIT_SECONDS: &str = "distributed_lock_acquire_wait_seconds";
    /// The gauge of callers inside a waiting `acquire`, by backend.
    const WAITING: &str = "distributed_lock_waiting";
    /// The gauge of locks held by guards of this process, by backend.
    const HELD: &str = "distributed_lock_held";
    /// The histogram of how long guards held their lock, by backend.
    const HOLD_SECONDS: &str = "distributed_lock_hold_seconds";
    /// The counter of guards that lost their lock, by backend and cause.
    const LOST_TOTAL: &str = "distributed_lock_lost_total";
    /// The counter of releases and extensions, by backend, operation and outcome.
    const OPERATIONS_TOTAL: &str = "distributed_lock_operations_total";
    /// The counter of backend failures, by backend and operation.
    const BACKEND_ERRORS_TOTAL: &str = "distributed_lock_backend_errors_total";
    /// The counter of connections opened again after one failed, by backend and connection.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    const RECONNECTS_TOTAL: &str = "distributed_lock_reconnects_total";
    /// The counter of requests through `LockLayer`, by outcome.
    const LAYER_REQUESTS_TOTAL: &str = "distributed_lock_layer_requests_total";

    pub(crate) fn acquired(backend: &'static str, mode: Mode, outcome: Outcome, waited: Duration) {
        let labels = [
            ("backend", backend),
            ("mode", mode.as_str()),
            ("outcome", outcome.label(true)),
        ];
        counter!(ACQUIRE_TOTAL, &labels).increment(1);
        histogram!(ACQUIRE_WAIT_SECONDS, &labels).record(waited.as_secs_f64());
        if outcome == Outcome::Error {
            counter!(BACKEND_ERRORS_TOTAL, "backend" => backend, "operation" => "acquire")
                .increment(1);
        }
    }

    pub(crate) fn waiting(backend: &'static str, delta: f64) {
        gauge!(WAITING, "backend" => backend).increment(delta);
    }

    pub(crate) fn held(backend: &'static str, delta: f64) {
        gauge!(HELD, "backend" => backend).increment(delta);
    }

    pub(crate) fn hold_ended(backend: &'static str, held_for: Duration) {
        histogram!(HOLD_SECONDS, "backend" => backend).record(held_for.as_secs_f64());
    }

    pub(crate) fn lost(backend: &'static str, cause: LostCause) {
        counter!(LOST_TOTAL, "backend" => backend, "cause" => cause.as_str()).increment(1);
    }

    pub(crate) fn operation(backend: &'static str, operation: &'static str, outcome: Outcome) {
        let labels = [
            ("backend", backend),
            ("operation", operation),
            ("outcome", outcome.label(false)),
        ];
        counter!(OPERATIONS_TOTAL, &labels).increment(1);
        if outcome == Outcome::Error {
            counter!(BACKEND_ERRORS_TOTAL, "backend" => backend, "operation" => operation)
                .increment(1);
        }
    }

    pub(crate) fn layer_request(outcome: LayerOutcome) {
        counter!(LAYER_REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    }

    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn reconnected(backend: &'static str, connection: &'static str) {
        counter!(RECONNECTS_TOTAL, "backend" => backend, "connection" => connection).increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod sink {
    use super::*;

    pub(crate) fn acquired(_: &'static str, _: Mode, _: Outcome, _: Duration) {}
    pub(crate) fn waiting(_: &'static str, _: f64) {}
    pub(crate) fn held(_: &'static str, _: f64) {}
    pub(crate) fn hold_ended(_: &'static str, _: Duration) {}
    pub(crate) fn lost(_: &'static str, _: LostCause) {}
    pub(crate) fn operation(_: &'static str, _: &'static str, _: Outcome) {}
    pub(crate) fn layer_request(_: LayerOutcome) {}
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn reconnected(_: &'static str, _: &'static str) {}
}

pub(crate) use sink::{acquired, held, hold_ended, lost, waiting};

/// Records how the layer dealt with one request: in the request's span (the current one), and
/// in the metric.
pub(crate) fn layer_request(outcome: LayerOutcome) {
    tracing::Span::current().record("outcome", outcome.as_str());
    sink::layer_request(outcome);
}

/// Records that `backend` opened a `connection` (`command`, `pubsub`, `session`) again after
/// the previous one failed.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn reconnected(backend: &'static str, connection: &'static str) {
    tracing::info!(
        backend,
        connection,
        "reconnected after a connection failure"
    );
    sink::reconnected(backend, connection);
}

/// Records the end of a release or extend of a guard from `backend`.
pub(crate) fn guard_operation(backend: &'static str, operation: &'static str, outcome: Outcome) {
    operation_event(operation, outcome);
    sink::operation(backend, operation, outcome);
}

fn operation_event(operation: &'static str, outcome: Outcome) {
    let outcome = outcome.label(false);
    if outcome == "error" {
        tracing::warn!(operation, outcome, "lock operation failed: backend error");
    } else if outcome == "lost" {
        tracing::warn!(operation, outcome, "lock operation found the lock lost");
    } else {
        tracing::debug!(operation, outcome, "lock operation done");
    }
}
