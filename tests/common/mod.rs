//! Shared helpers for the integration tests: where the test servers are, and unique keys.
//!
//! Every test binary that needs a server includes this module (`mod common;`). Servers are
//! found, in order, through `DATABASE_URL` / `REDIS_URL`, then the local defaults
//! (PostgreSQL on 127.0.0.1:5432 database `test`, Redis on 127.0.0.1:6379), then
//! testcontainers where a Docker engine answers. When none is there the test fails with a
//! message that says how to provide one: no backend test skips silently.
#![allow(dead_code)]

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OnceCell;

/// The local PostgreSQL that this project's machines and CI run.
pub const LOCAL_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The local Redis that this project's machines and CI run.
pub const LOCAL_REDIS_URL: &str = "redis://127.0.0.1:6379";

const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// A key prefix no other test (or earlier run) uses, so tests can share servers in parallel.
pub fn unique_prefix(test: &str) -> String {
    format!("t:{test}:{}:", uuid::Uuid::new_v4().simple())
}

/// The PostgreSQL connection URL for tests.
pub async fn postgres_url() -> String {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| {
        find_server(
            "DATABASE_URL",
            LOCAL_POSTGRES_URL,
            5432,
            start_postgres_container,
        )
    })
    .await
    .clone()
}

/// The Redis connection URL for tests.
pub async fn redis_url() -> String {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| find_server("REDIS_URL", LOCAL_REDIS_URL, 6379, start_redis_container))
        .await
        .clone()
}

async fn find_server<F, Fut>(
    variable: &str,
    local_url: &str,
    local_port: u16,
    start_container: F,
) -> String
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    if let Ok(url) = std::env::var(variable) {
        if !url.is_empty() {
            return url;
        }
    }
    if answers(&format!("127.0.0.1:{local_port}")).await {
        return local_url.to_owned();
    }
    if docker_answers().await {
        match start_container().await {
            Ok(url) => return url,
            Err(error) => panic!("{variable} is unset, nothing listens on 127.0.0.1:{local_port}, and starting a container failed: {error}"),
        }
    }
    panic!(
        "no server for this test: set {variable}, or run one on 127.0.0.1:{local_port} \
         (see README, 'Running the tests'), or start a Docker engine for testcontainers"
    );
}

async fn answers(address: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

async fn docker_answers() -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::UnixStream::connect(DOCKER_SOCKET)
        )
        .await,
        Ok(Ok(_))
    )
}

async fn start_postgres_container() -> Result<String, String> {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::ContainerAsync;

    // Kept for the life of the test process.
    static CONTAINER: OnceCell<ContainerAsync<Postgres>> = OnceCell::const_new();
    let container = CONTAINER
        .get_or_try_init(|| async { Postgres::default().start().await.map_err(|e| e.to_string()) })
        .await?;
    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "postgres://postgres:postgres@{host}:{port}/postgres"
    ))
}

async fn start_redis_container() -> Result<String, String> {
    use testcontainers_modules::redis::{Redis, REDIS_PORT};
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::ContainerAsync;

    static CONTAINER: OnceCell<ContainerAsync<Redis>> = OnceCell::const_new();
    let container = CONTAINER
        .get_or_try_init(|| async { Redis::default().start().await.map_err(|e| e.to_string()) })
        .await?;
    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(REDIS_PORT)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("redis://{host}:{port}"))
}

pub mod backends;
pub mod cancel;
pub mod counter;
pub mod failing;
pub mod faults;
pub mod grpc;
pub mod hostile;
pub mod http;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub mod in_flight;
pub mod load;
pub mod proxy;
#[cfg(feature = "redis")]
pub mod redis_children;
#[cfg(feature = "redis")]
pub mod redis_conn;
#[cfg(feature = "redis")]
pub mod redis_server;
pub mod slow_release;
pub mod suites;
pub mod wait;
