//! What the crate tells an operator: a `tracing` span for every lock operation, and (feature
//! `metrics`) metrics through the [`metrics`](https://docs.rs/metrics) facade, so that any
//! exporter can publish them. docs/observability.md lists every span, field and metric.

mod acquire;
mod held;
mod keys;
mod outcome;
mod record;

pub(crate) use acquire::observe_acquire;
pub(crate) use held::Held;
pub use keys::KeyVisibility;
pub(crate) use keys::ShownKey;
pub(crate) use outcome::{Mode, Outcome};
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use record::reconnected;
pub(crate) use record::{guard_operation, layer_request, LayerOutcome};

/// `span`, or `Span::none()` if no subscriber wants it: recording into, entering and leaving
/// `Span::none()` costs nothing, where a disabled span still reaches `tracing`'s `log`
/// compatibility checks when some crate in the build turns that feature on.
pub(crate) fn wanted(span: tracing::Span) -> tracing::Span {
    if span.is_disabled() {
        tracing::Span::none()
    } else {
        span
    }
}
