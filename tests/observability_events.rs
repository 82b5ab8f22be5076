//! The crate's log events, on every backend (docs/observability.md): waits and hand-overs are
//! events inside the acquire's span, and no line shows a raw key unless the configuration
//! says so (spans, events of the operations, background work such as the release of a dropped
//! guard, keep-alives and clean-ups, and the layer's decisions all follow
//! `LockConfig::trace_keys`).

mod common;
#[cfg(feature = "postgres")]
mod pg_support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::backends::Backend;
use common::wait::eventually;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use k1s0_distributed_lock::{DistributedLock, KeyVisibility, LockConfig, LockError, LockLayer};
use tower::{service_fn, Layer, ServiceExt};
use tracing_subscriber::fmt::format::FmtSpan;

/// Everything the crate logged in this test binary, at every level, with span fields.
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(move || Appender(Arc::clone(&sink)))
            .init();
        log
    })
}

struct Appender(Arc<Mutex<Vec<u8>>>);

impl Write for Appender {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The logged lines that mention `text`.
fn lines_with(text: &str) -> Vec<String> {
    let log = log().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|line| line.contains(text))
        .map(str::to_owned)
        .collect()
}

backend_tests!(
    waits_and_hand_overs_are_events_of_the_acquire,
    no_log_line_shows_a_hidden_or_hashed_key
);

/// A waiter logs that it waits, inside its `lock.acquire` span, and (where the backend hands
/// the lock over directly: in memory, and between tasks of one Redis lock object) that the
/// lock was handed over to it.
async fn waits_and_hand_overs_are_events_of_the_acquire(backend: Backend) {
    log();
    let lock = backend
        .lock(LockConfig::new().wait_timeout(Duration::from_secs(10)))
        .await;
    let key = format!("{}order", common::unique_prefix("hand-over-events"));
    let hash = KeyVisibility::Hashed.render(&key).unwrap();
    let events = |message: &str| -> Vec<String> {
        lines_with(&hash)
            .into_iter()
            .filter(|line| line.contains(message) && line.contains("lock.acquire{"))
            .collect()
    };

    let holder = lock.try_acquire(&key).await.unwrap();
    let waiter = tokio::spawn({
        let (lock, key) = (lock.clone(), key.clone());
        async move { lock.acquire(&key).await }
    });
    assert!(
        eventually(Duration::from_secs(5), || {
            let waiting = events("waiting for the lock");
            async move { !waiting.is_empty() }
        })
        .await,
        "no waiting event in the waiter's span"
    );
    let holder_token = holder.fencing_token();
    holder.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > holder_token);
    let handed_over = events("lock handed over");
    match backend {
        Backend::Memory => assert_eq!(handed_over.len(), 1, "{handed_over:?}"),
        #[cfg(feature = "redis")]
        Backend::Redis => assert_eq!(handed_over.len(), 1, "{handed_over:?}"),
        // The next task of the process takes the lock itself once its turn comes.
        #[cfg(feature = "postgres")]
        Backend::Postgres => assert!(handed_over.is_empty(), "{handed_over:?}"),
    }
    next.release().await.unwrap();
}

/// Every path that logs about a key, with the key hashed (the default) and hidden: the raw key
/// appears nowhere in the log, and a hashed key's hash does.
async fn no_log_line_shows_a_hidden_or_hashed_key(backend: Backend) {
    log();
    for keys in [KeyVisibility::Hashed, KeyVisibility::Hidden] {
        let key = format!(
            "{}alice@example.com",
            common::unique_prefix("personal-data")
        );
        exercise_every_logged_path(backend, keys, &key).await;
        let leaked = lines_with(&key);
        assert!(
            leaked.is_empty(),
            "{keys:?}: the raw key was logged:\n{}",
            leaked.join("\n")
        );
        if let Some(hash) = KeyVisibility::Hashed.render(&key) {
            let seen = lines_with(&hash);
            match keys {
                KeyVisibility::Hashed => assert!(!seen.is_empty(), "the hash was never logged"),
                _ => assert!(seen.is_empty(), "a hidden key's hash was logged: {seen:?}"),
            }
        }
    }
}

/// Acquired, conflict, timeout, hand-off to a waiter, extend, release, a dropped guard, a lost
/// lock, a keep-alive, and the layer's lock and conflict.
async fn exercise_every_logged_path(backend: Backend, keys: KeyVisibility, key: &str) {
    let lock = backend
        .lock(
            LockConfig::new()
                .trace_keys(keys)
                .ttl(Duration::from_millis(400))
                .retry_interval(Duration::from_millis(10))
                .wait_timeout(Duration::from_millis(100)),
        )
        .await;

    let guard = lock.try_acquire(key).await.unwrap();
    assert!(matches!(
        lock.try_acquire(key).await,
        Err(LockError::AlreadyLocked)
    ));
    assert!(matches!(lock.acquire(key).await, Err(LockError::Timeout)));
    guard.extend(Duration::from_millis(400)).await.unwrap();

    // A waiter with a budget of its own, while the holder releases: handed over or taken.
    let waiting = backend
        .lock(
            LockConfig::new()
                .trace_keys(keys)
                .ttl(Duration::from_millis(400))
                .wait_timeout(Duration::from_secs(5)),
        )
        .await;
    let (handed, released) = tokio::join!(waiting.acquire(key), guard.release());
    released.unwrap();
    let handed = handed.unwrap();

    // A waiter cancelled mid-wait: cleaned up behind it.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), waiting.acquire(key))
            .await
            .is_err()
    );

    // Dropped without release: released in the background.
    drop(handed);
    assert!(common::suites::becomes_free(&lock, key, Duration::from_secs(5)).await);

    // Lost: the lease runs out, then extend and release report it.
    let lost = lock.try_acquire(key).await.unwrap();
    lost.lost().await;
    assert!(matches!(
        lost.extend(Duration::from_secs(1)).await,
        Err(LockError::LockLost)
    ));
    assert!(matches!(lost.release().await, Err(LockError::LockLost)));
    assert!(common::suites::becomes_free(&lock, key, Duration::from_secs(5)).await);

    // The layer: a request that locks (kept alive while it runs), and one refused.
    let layer_key = key.to_owned();
    let service = LockLayer::new(lock.clone(), move |_: &http::request::Parts| {
        layer_key.clone()
    })
    .layer(service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let request = || Request::post("/").body(Full::new(Bytes::new())).unwrap();
    let locked = tokio::spawn(service.clone().oneshot(request()));
    assert!(
        eventually(Duration::from_secs(5), || async {
            lock.is_locked(key).await.unwrap()
        })
        .await
    );
    let refused = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(locked.await.unwrap().unwrap().status(), StatusCode::OK);
    assert!(common::suites::becomes_free(&lock, key, Duration::from_secs(5)).await);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_watchdog_logs_no_raw_key() {
    log();
    let url = common::redis_url().await;
    let prefix = common::unique_prefix("watchdog-keys");
    let lock = common::redis_conn::lock_builder(&url, &url)
        .await
        .config(
            LockConfig::new()
                .trace_keys(KeyVisibility::Hidden)
                .ttl(Duration::from_millis(200)),
        )
        .key_prefix(&prefix)
        .auto_extend(k1s0_distributed_lock::AutoExtend::new(Duration::from_secs(
            30,
        )))
        .build()
        .unwrap();
    let key = format!("{prefix}bob@example.com");
    let guard = lock.try_acquire(&key).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !lines_with("lock auto-extended").is_empty()
        })
        .await,
        "the watchdog never renewed the lock"
    );
    drop(guard);
    assert!(common::suites::becomes_free(&lock, &key, Duration::from_secs(5)).await);
    let leaked = lines_with(&key);
    assert!(
        leaked.is_empty(),
        "the raw key was logged:\n{}",
        leaked.join("\n")
    );
}
