//! A Redis server that may evict keys (`maxmemory-policy` other than `noeviction`) would drop
//! live locks silently: the lock warns when it first connects to one, and says nothing on a
//! server that never evicts. On `redis-server` processes of the test's own.
#![cfg(feature = "redis")]

mod common;

use std::sync::{Arc, Mutex};

use common::redis_server::RedisServer;

/// The log lines the lock writes while it takes and releases one key on `server`.
async fn log_of_first_lock(server: &RedisServer) -> String {
    let written = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let written = Arc::clone(&written);
        move || LogWriter(Arc::clone(&written))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    // This test's runtime has one thread: everything the lock logs goes to this subscriber.
    let _default = tracing::subscriber::set_default(subscriber);
    let prefix = common::unique_prefix("redis_eviction");
    let lock = common::redis_conn::plain_lock(&server.url(), &prefix).await;
    common::redis_conn::take_and_release(&lock, "k").await;
    let bytes = written.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_that_may_evict_locks_is_named_in_a_warning() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]).await;
    let log = log_of_first_lock(&server).await;
    assert!(
        log.contains("WARN") && log.contains("allkeys-lru"),
        "no warning: {log:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_that_never_evicts_gets_no_warning() {
    let server = RedisServer::start().await;
    let log = log_of_first_lock(&server).await;
    assert!(!log.contains("maxmemory-policy"), "{log:?}");
}
