//! The shared helper finds both test servers (or fails loudly).
mod common;

#[tokio::test]
async fn postgres_and_redis_are_reachable() {
    let pg = common::postgres_url().await;
    let redis = common::redis_url().await;
    assert!(pg.starts_with("postgres://"), "{pg}");
    assert!(redis.starts_with("redis://"), "{redis}");
}
