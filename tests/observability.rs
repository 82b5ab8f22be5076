//! The `tracing` spans of lock operations, on every backend: one per `try_acquire`, `acquire`,
//! `extend` and `release`, with the fields an operator filters on, and the key shown as the
//! configuration says (docs/observability.md).

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::backends::Backend;
use k1s0_distributed_lock::{DistributedLock, KeyVisibility, LockConfig, LockError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as it closed: its name and every field recorded on it.
#[derive(Debug, Clone)]
struct SpanSeen {
    name: &'static str,
    fields: HashMap<String, String>,
}

/// Keeps every closed span of the crate.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let span = ctx.span(id).expect("a new span");
        span.extensions_mut().insert(fields);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a recorded span");
        let mut extensions = span.extensions_mut();
        let fields = extensions
            .get_mut::<HashMap<String, String>>()
            .expect("fields");
        values.record(&mut Fields(fields));
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).expect("a closed span");
        if !span
            .metadata()
            .target()
            .starts_with("k1s0_distributed_lock")
        {
            return;
        }
        let fields = span
            .extensions()
            .get::<HashMap<String, String>>()
            .cloned()
            .unwrap_or_default();
        self.0.lock().unwrap().push(SpanSeen {
            name: span.name(),
            fields,
        });
    }
}

impl Spans {
    /// Collects the spans of the current thread until the guard is dropped.
    fn collect() -> (Spans, tracing::subscriber::DefaultGuard) {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        (spans.clone(), tracing::subscriber::set_default(subscriber))
    }

    fn named(&self, name: &str) -> Vec<SpanSeen> {
        let seen = self.0.lock().unwrap();
        seen.iter()
            .filter(|span| span.name == name)
            .cloned()
            .collect()
    }
}

fn backend_label(backend: Backend) -> &'static str {
    match backend {
        Backend::Memory => "memory",
        #[cfg(feature = "postgres")]
        Backend::Postgres => "postgres",
        #[cfg(feature = "redis")]
        Backend::Redis => "redis",
    }
}

backend_tests!(every_operation_has_a_span_with_its_outcome);

/// Acquired, conflict, timeout, extend and release: each a span named after the operation, with
/// backend, mode, outcome, time waited and fencing token, and the key hashed (the default).
async fn every_operation_has_a_span_with_its_outcome(backend: Backend) {
    let config = LockConfig::new()
        .ttl(Duration::from_secs(10))
        .retry_interval(Duration::from_millis(10))
        .wait_timeout(Duration::from_millis(50));
    let lock = backend.lock(config).await;
    let key = format!("{}order", common::unique_prefix("spans"));
    let (spans, _collecting) = Spans::collect();

    let guard = lock.try_acquire(&key).await.unwrap();
    assert!(matches!(
        lock.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(lock.acquire(&key).await, Err(LockError::Timeout)));
    guard.extend(Duration::from_secs(10)).await.unwrap();
    let fencing_token = guard.fencing_token();
    guard.release().await.unwrap();

    let label = backend_label(backend);
    let hashed = KeyVisibility::Hashed.render(&key).unwrap();
    let acquires = spans.named("lock.acquire");
    let outcomes: Vec<(&str, &str)> = acquires
        .iter()
        .map(|span| {
            assert_eq!(span.fields["backend"], label);
            assert_eq!(span.fields["key"], hashed);
            assert!(span.fields["waited_ms"].parse::<f64>().unwrap() >= 0.0);
            (
                span.fields["mode"].as_str(),
                span.fields["outcome"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("try", "acquired"),
            ("try", "conflict"),
            ("wait", "timeout")
        ],
        "{acquires:?}"
    );
    // The timed-out acquire waited its whole budget (50 ms).
    assert!(acquires[2].fields["waited_ms"].parse::<f64>().unwrap() >= 50.0);
    assert_eq!(
        acquires[0].fields["fencing_token"],
        fencing_token.to_string()
    );
    assert!(!acquires[1].fields.contains_key("fencing_token"));
    for name in ["lock.extend", "lock.release"] {
        let seen = spans.named(name);
        assert_eq!(seen.len(), 1, "{name}: {seen:?}");
        assert_eq!(seen[0].fields["outcome"], "ok");
        assert_eq!(seen[0].fields["backend"], label);
        assert_eq!(seen[0].fields["key"], hashed);
    }
}

/// `trace_keys` shows the key as given, or not at all.
#[tokio::test]
async fn spans_show_the_key_as_configured() {
    for (keys, expected) in [
        (KeyVisibility::Raw, Some("invoice:7")),
        (KeyVisibility::Hidden, None),
    ] {
        let lock =
            k1s0_distributed_lock::InMemoryDistributedLock::new(LockConfig::new().trace_keys(keys));
        let (spans, _collecting) = Spans::collect();
        lock.try_acquire("invoice:7")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        for name in ["lock.acquire", "lock.release"] {
            let seen = spans.named(name);
            assert_eq!(seen.len(), 1);
            assert_eq!(
                seen[0].fields.get("key").map(String::as_str),
                expected,
                "{name}"
            );
        }
    }
}

/// The side of the lock is a field of the acquire's span.
#[tokio::test]
async fn an_acquire_span_says_which_side_it_took() {
    use k1s0_distributed_lock::DistributedRwLock;
    let lock = k1s0_distributed_lock::InMemoryDistributedLock::new(LockConfig::new());
    let key = format!("{}order", common::unique_prefix("spans-side"));
    let (spans, _collecting) = Spans::collect();
    let reader = lock.try_acquire_shared(&key).await.unwrap();
    reader.release().await.unwrap();
    lock.acquire(&key).await.unwrap().release().await.unwrap();
    let sides: Vec<String> = spans
        .named("lock.acquire")
        .iter()
        .map(|span| span.fields["lock_mode"].clone())
        .collect();
    assert_eq!(sides, ["shared", "exclusive"]);
}
