//! The main demo: an axum server whose payment endpoint takes a lock per order, hit by
//! concurrent requests. Zero setup: it runs on the in-memory backend.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Each order is locked while it is being paid: of several simultaneous payments of the same
//! order exactly one runs (200) and the others are refused (409 Conflict), while payments of
//! different orders run side by side.
//!
//! The same demo runs on a server backend when built with its feature and pointed at a server:
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --features postgres --example quickstart
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --features redis --example quickstart
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{
    DistributedLock, InMemoryDistributedLock, LockConfig, LockInfo, LockLayer,
};

/// Pays an order; takes a while, as real payment providers do.
async fn pay(Path(order): Path<u32>, Extension(lock): Extension<LockInfo>) -> String {
    tokio::time::sleep(Duration::from_millis(300)).await;
    format!(
        "paid order {order} under {} (fencing token {})",
        lock.key(),
        lock.fencing_token()
    )
}

fn app<B: DistributedLock>(lock: B) -> Router {
    Router::new()
        .route("/orders/{id}/pay", post(pay))
        .layer(LockLayer::new(lock, |req| {
            format!("order:{}", req.uri.path())
        }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = LockConfig::new().ttl(Duration::from_secs(30));
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let pool = sqlx::PgPool::connect(&url).await?;
        println!("backend: PostgreSQL at {url}");
        return demo(k1s0_distributed_lock::PostgresDistributedLock::new(
            pool, config,
        ))
        .await;
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        use k1s0_distributed_lock::bb8_redis::{bb8, redis, RedisConnectionManager};
        let pool = bb8::Pool::builder()
            .build(RedisConnectionManager::new(url.as_str())?)
            .await?;
        let lock = k1s0_distributed_lock::RedisDistributedLock::builder(pool)
            .config(config)
            .wake_on_release(redis::Client::open(url.as_str())?)
            .build()?;
        println!("backend: Redis at {url}");
        return demo(lock).await;
    }
    println!("backend: in-memory");
    demo(InMemoryDistributedLock::new(config)).await
}

async fn demo<B: DistributedLock>(lock: B) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app(lock)).await });
    println!("serving on http://{address}\n");

    // Four payments of order 1 at once, and one each of orders 2, 3 and 4.
    let orders = [1, 1, 1, 1, 2, 3, 4];
    let started = Instant::now();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let requests = orders.iter().map(|&order| {
        let client = client.clone();
        async move { (order, pay_request(&client, address, order).await) }
    });
    let answers = futures::future::join_all(requests).await;

    let mut paid_once = [0u32; 5];
    for (order, answer) in &answers {
        let (status, body) = answer.as_ref().map_err(|e| e.to_string())?;
        println!("POST /orders/{order}/pay -> {status}  {body}");
        if *status == 200 {
            paid_once[*order as usize] += 1;
        }
    }
    println!("\nall answered in {:?}", started.elapsed());
    if paid_once[1..].iter().all(|&count| count == 1) {
        println!("every order was paid exactly once; the duplicates got 409 Conflict");
        Ok(())
    } else {
        Err(format!("payments per order: {:?}", &paid_once[1..]).into())
    }
}

async fn pay_request(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
    order: u32,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    let request =
        http::Request::post(format!("http://{address}/orders/{order}/pay")).body(Empty::new())?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
