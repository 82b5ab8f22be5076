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
    //! Every series' `Key` is built once, on first use, and reused: a call records through the
    //! installed recorder without building a key (no allocation, no hashing of labels).

    use std::sync::OnceLock;

    use metrics::{Key, Label, Level, Metadata};

    use super::*;

    const ACQUIRE_TOTAL: &str = "distributed_lock_acquire_total";
    const ACQUIRE_WAIT_SECONDS: &str = "distributed_lock_acquire_wait_seconds";
    const WAITING: &str = "distributed_lock_waiting";
    const HELD: &str = "distributed_lock_held";
    const HOLD_SECONDS: &str = "distributed_lock_hold_seconds";
    const LOST_TOTAL: &str = "distributed_lock_lost_total";
    const OPERATIONS_TOTAL: &str = "distributed_lock_operations_total";
    const BACKEND_ERRORS_TOTAL: &str = "distributed_lock_backend_errors_total";
    #[cfg(any(feature = "redis", feature = "postgres"))]
    const RECONNECTS_TOTAL: &str = "distributed_lock_reconnects_total";
    const LAYER_REQUESTS_TOTAL: &str = "distributed_lock_layer_requests_total";

    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    const BACKENDS: [&str; 4] = ["memory", "postgres", "redis", "custom"];
    const MODES: [Mode; 2] = [Mode::Try, Mode::Wait];
    const OUTCOMES: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Conflict,
        Outcome::Timeout,
        Outcome::Lost,
        Outcome::Error,
        Outcome::Invalid,
    ];
    const OPERATIONS: [&str; 3] = ["acquire", "release", "extend"];
    const CAUSES: [LostCause; 2] = [LostCause::Expired, LostCause::Backend];
    const LAYER_OUTCOMES: [LayerOutcome; 6] = [
        LayerOutcome::Locked,
        LayerOutcome::Conflict,
        LayerOutcome::BackendError,
        LayerOutcome::Invalid,
        LayerOutcome::Unlocked,
        LayerOutcome::FailedOpen,
    ];
    #[cfg(any(feature = "redis", feature = "postgres"))]
    const CONNECTIONS: [(&str, &str); 3] = [
        ("redis", "command"),
        ("redis", "pubsub"),
        ("postgres", "session"),
    ];

    fn backend_at(backend: &str) -> usize {
        BACKENDS.iter().position(|b| *b == backend).unwrap_or(3)
    }

    fn at<T: PartialEq>(all: &[T], item: T) -> usize {
        all.iter().position(|one| *one == item).unwrap_or(0)
    }

    /// The keys of every series, by the positions of their label values in the tables above.
    struct Keys {
        acquire_total: Vec<Key>,
        acquire_wait: Vec<Key>,
        per_backend: Vec<[Key; 3]>,
        lost: Vec<Key>,
        operations: Vec<Key>,
        backend_errors: Vec<Key>,
        layer: Vec<Key>,
        #[cfg(any(feature = "redis", feature = "postgres"))]
        reconnects: Vec<Key>,
    }

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect();
        Key::from_parts(name, labels)
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut keys = Keys {
                acquire_total: Vec::new(),
                acquire_wait: Vec::new(),
                per_backend: Vec::new(),
                lost: Vec::new(),
                operations: Vec::new(),
                backend_errors: Vec::new(),
                layer: Vec::new(),
                #[cfg(any(feature = "redis", feature = "postgres"))]
                reconnects: Vec::new(),
            };
            for backend in BACKENDS {
                let b = ("backend", backend);
                for mode in MODES {
                    for outcome in OUTCOMES {
                        let labels = [b, ("mode", mode.as_str()), ("outcome", outcome.label(true))];
                        keys.acquire_total.push(key(ACQUIRE_TOTAL, &labels));
                        keys.acquire_wait.push(key(ACQUIRE_WAIT_SECONDS, &labels));
                    }
                }
                keys.per_backend.push([
                    key(WAITING, &[b]),
                    key(HELD, &[b]),
                    key(HOLD_SECONDS, &[b]),
                ]);
                for cause in CAUSES {
                    keys.lost
                        .push(key(LOST_TOTAL, &[b, ("cause", cause.as_str())]));
                }
                for operation in OPERATIONS {
                    for outcome in OUTCOMES {
                        let labels = [
                            b,
                            ("operation", operation),
                            ("outcome", outcome.label(false)),
                        ];
                        keys.operations.push(key(OPERATIONS_TOTAL, &labels));
                    }
                    let labels = [b, ("operation", operation)];
                    keys.backend_errors.push(key(BACKEND_ERRORS_TOTAL, &labels));
                }
            }
            for outcome in LAYER_OUTCOMES {
                keys.layer
                    .push(key(LAYER_REQUESTS_TOTAL, &[("outcome", outcome.as_str())]));
            }
            #[cfg(any(feature = "redis", feature = "postgres"))]
            for (backend, connection) in CONNECTIONS {
                let labels = [("backend", backend), ("connection", connection)];
                keys.reconnects.push(key(RECONNECTS_TOTAL, &labels));
            }
            keys
        })
    }

    fn count(key: &Key) {
        metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA).increment(1));
    }

    fn backend_error(backend: usize, operation: &'static str) {
        count(&keys().backend_errors[backend * OPERATIONS.len() + at(&OPERATIONS, operation)]);
    }

    pub(crate) fn acquired(backend: &'static str, mode: Mode, outcome: Outcome, waited: Duration) {
        let b = backend_at(backend);
        let series = (b * MODES.len() + at(&MODES, mode)) * OUTCOMES.len() + at(&OUTCOMES, outcome);
        let keys = keys();
        count(&keys.acquire_total[series]);
        metrics::with_recorder(|recorder| {
            recorder
                .register_histogram(&keys.acquire_wait[series], &METADATA)
                .record(waited.as_secs_f64())
        });
        if outcome == Outcome::Error {
            backend_error(b, "acquire");
        }
    }

    fn gauge(backend: &'static str, which: usize, delta: f64) {
        let key = &keys().per_backend[backend_at(backend)][which];
        metrics::with_recorder(|recorder| recorder.register_gauge(key, &METADATA).increment(delta));
    }

    pub(crate) fn waiting(backend: &'static str, delta: f64) {
        gauge(backend, 0, delta);
    }

    pub(crate) fn held(backend: &'static str, delta: f64) {
        gauge(backend, 1, delta);
    }

    pub(crate) fn hold_ended(backend: &'static str, held_for: Duration) {
        let key = &keys().per_backend[backend_at(backend)][2];
        metrics::with_recorder(|recorder| {
            recorder
                .register_histogram(key, &METADATA)
                .record(held_for.as_secs_f64())
        });
    }

    pub(crate) fn lost(backend: &'static str, cause: LostCause) {
        count(&keys().lost[backend_at(backend) * CAUSES.len() + at(&CAUSES, cause)]);
    }

    pub(crate) fn operation(backend: &'static str, operation: &'static str, outcome: Outcome) {
        let b = backend_at(backend);
        let series = (b * OPERATIONS.len() + at(&OPERATIONS, operation)) * OUTCOMES.len()
            + at(&OUTCOMES, outcome);
        count(&keys().operations[series]);
        if outcome == Outcome::Error {
            backend_error(b, operation);
        }
    }

    pub(crate) fn layer_request(outcome: LayerOutcome) {
        count(&keys().layer[at(&LAYER_OUTCOMES, outcome)]);
    }

    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn reconnected(backend: &'static str, connection: &'static str) {
        if let Some(series) = CONNECTIONS.iter().position(|c| *c == (backend, connection)) {
            count(&keys().reconnects[series]);
        }
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
