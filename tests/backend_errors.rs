//! `LockError::BackendError` from real driver failures: walking `source()` reaches the driver's
//! own error (so it can be downcast), and the error's own text does not repeat it.

#[cfg(feature = "redis")]
mod common;

use std::error::Error as StdError;

use k1s0_distributed_lock::LockError;

/// A loopback port that nothing listens on.
#[cfg(feature = "postgres")]
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The first error of type `T` along the `source()` chain below `error`.
fn find_source<T: StdError + 'static>(error: &LockError) -> Option<&T> {
    let mut next = error.source();
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// What an error reporter prints for the lock error and its first source, joined by ": ".
/// (Below that is the driver's own chain, which may repeat itself: "broken pipe: broken pipe".)
fn report(error: &LockError) -> String {
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// Checks a backend error whose driver error is a `T`: the chain reaches it as the first
/// source, the error's own text does not contain it, and a report names it once.
fn check_driver_error<T: StdError + 'static>(error: &LockError) -> &T {
    assert!(matches!(error, LockError::BackendError(_)), "{error:?}");
    let driver = find_source::<T>(error).unwrap_or_else(|| {
        panic!(
            "no {} along the source chain of {error:?}",
            std::any::type_name::<T>()
        )
    });
    let first = error.source().expect("a backend error has a source");
    assert!(
        first.downcast_ref::<T>().is_some(),
        "the first source is not the driver's error: {first:?}"
    );
    let driver_text = driver.to_string();
    assert!(
        !error.to_string().contains(&driver_text),
        "Display repeats the source: {error}"
    );
    assert_eq!(
        report(error).matches(&driver_text).count(),
        1,
        "the report names the driver error more than once: {}",
        report(error)
    );
    driver
}

#[test]
fn a_wrapped_error_is_the_first_source_and_is_not_repeated() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by the test");
    let error = LockError::backend(io);
    let found = check_driver_error::<std::io::Error>(&error);
    assert_eq!(found.kind(), std::io::ErrorKind::ConnectionRefused);

    let error = LockError::backend_msg("a command took too long");
    assert_eq!(report(&error).matches("a command took too long").count(), 1);
}

/// A server that is not there: the sqlx pool gives up (its acquire timeout is shorter than the
/// lock's command timeout) with its own error.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_failure_carries_the_sqlx_error() {
    use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};

    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(300))
        .connect_lazy(&format!(
            "postgres://postgres@127.0.0.1:{}/test",
            closed_port()
        ))
        .unwrap();
    let lock = PostgresDistributedLock::builder(pool, LockConfig::new())
        .command_timeout(std::time::Duration::from_secs(10))
        .network_timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let error = lock.try_acquire("k").await.unwrap_err();
    let sqlx_error = check_driver_error::<sqlx::Error>(&error);
    assert!(
        matches!(sqlx_error, sqlx::Error::PoolTimedOut),
        "{sqlx_error:?}"
    );
}

/// A Redis connection cut under the lock (a fault proxy closes it and refuses new ones): the
/// next command fails in the redis client. (An unreachable port is no use here: the bb8 pool
/// retries connecting and reports only its own timeout.)
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_failure_carries_the_redis_error() {
    use common::backends::Backend;
    use common::proxy::FaultProxy;
    use k1s0_distributed_lock::bb8_redis::redis;
    use k1s0_distributed_lock::DistributedLock;

    let proxy = FaultProxy::start(Backend::Redis.server_address().await).await;
    let url = format!("redis://{}", proxy.address());
    let lock = common::redis_conn::plain_lock(&url, &common::unique_prefix("backend-errors")).await;
    // The lock's connection is open; then every connection is cut.
    common::redis_conn::take_and_release(&lock, "k").await;
    proxy.refuse_new();
    proxy.cut_all();
    let error = lock.try_acquire("k").await.unwrap_err();
    let redis_error = check_driver_error::<redis::RedisError>(&error);
    assert!(
        redis_error.is_io_error()
            || redis_error.is_connection_dropped()
            || redis_error.is_timeout(),
        "{redis_error:?}"
    );
}
