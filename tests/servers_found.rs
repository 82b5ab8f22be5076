//! The shared helper finds the test servers of the compiled backends (or fails loudly).
#![cfg(any(feature = "postgres", feature = "redis"))]

mod common;

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_is_reachable() {
    let url = common::postgres_url().await;
    assert!(url.starts_with("postgres://"), "{url}");
    let pool = common::backends::postgres_pool(Some(url)).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_is_reachable() {
    let url = common::redis_url().await;
    assert!(url.starts_with("redis://"), "{url}");
    let mut connection = common::redis_conn::connection(&url).await;
    let pong: String = k1s0_distributed_lock::bb8_redis::redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
}
