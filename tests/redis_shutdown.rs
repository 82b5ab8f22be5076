//! A Redis guard dropped while its runtime shuts down: the release it starts in the background
//! can no longer run, and the lock stays until its TTL. That must not pass without a word: a
//! warning names the key.
#![cfg(feature = "redis")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, KeyVisibility, LockConfig};

/// Everything the subscriber writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capturing_subscriber(captured: &Captured) -> impl tracing::Subscriber {
    let captured = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_guard_dropped_by_a_runtime_shutdown_warns_that_its_lock_stays_until_the_ttl() {
    const TTL: Duration = Duration::from_secs(3);
    let prefix = common::unique_prefix("redis-shutdown");
    let key = format!("{prefix}k");
    let url = runtime().block_on(common::redis_url());

    let doomed = runtime();
    doomed.block_on(async {
        let lock = common::redis_conn::lock_builder(&url, &url)
            .await
            .config(LockConfig::new().ttl(TTL))
            .build()
            .unwrap();
        let guard = lock.try_acquire(&key).await.unwrap();
        // A task that owns the guard and is still running when the runtime shuts down.
        tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
    });

    let captured = Captured::default();
    // Shutting down drops the task, and with it the guard, whose release cannot run any more.
    tracing::subscriber::with_default(capturing_subscriber(&captured), || drop(doomed));

    // The key as log events show it by default (hashed, see docs/observability.md).
    let shown = KeyVisibility::Hashed.render(&key).unwrap();
    let log = captured.text();
    let warning = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains(&shown))
        .unwrap_or_else(|| panic!("no warning naming {key} ({shown}):\n{log}"));
    assert!(warning.contains("TTL"), "{warning}");

    // What it warns about is true: the key is still held (until its TTL).
    runtime().block_on(async {
        let observer = common::redis_conn::lock_builder(&url, &url)
            .await
            .build()
            .unwrap();
        assert!(observer.is_locked(&key).await.unwrap());
    });
}

#[test]
fn a_guard_dropped_in_a_running_runtime_is_released_without_a_warning() {
    let key = format!("{}k", common::unique_prefix("redis-drop-quiet"));
    let captured = Captured::default();
    tracing::subscriber::with_default(capturing_subscriber(&captured), || {
        runtime().block_on(async {
            let url = common::redis_url().await;
            let lock = common::redis_conn::lock_builder(&url, &url)
                .await
                .build()
                .unwrap();
            drop(lock.try_acquire(&key).await.unwrap());
            common::wait::assert_eventually("the dropped guard's lock is released", || async {
                !lock.is_locked(&key).await.unwrap()
            })
            .await;
        })
    });
    let log = captured.text();
    assert!(!log.contains("WARN"), "{log}");
}
