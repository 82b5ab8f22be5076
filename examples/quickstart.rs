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
//! The backend is chosen when the demo starts, and the rest of it sees only an
//! `Arc<dyn DynDistributedLock>`: PostgreSQL if `DATABASE_URL` is set and the `postgres`
//! feature is compiled in, else Redis if `REDIS_URL` is set and the `redis` feature is, else
//! in-memory. A URL whose backend is not compiled in is reported and left aside.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --features postgres --example quickstart
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --features redis --example quickstart
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{
    DynDistributedLock, InMemoryDistributedLock, LockConfig, LockInfo, LockLayer,
};

type Error = Box<dyn std::error::Error>;

/// Pays an order; takes a while, as real payment providers do.
async fn pay(Path(order): Path<u32>, Extension(lock): Extension<LockInfo>) -> String {
    tokio::time::sleep(Duration::from_millis(300)).await;
    format!(
        "paid order {order} under {} (fencing token {})",
        lock.key(),
        lock.fencing_token()
    )
}

fn app(lock: Arc<dyn DynDistributedLock>) -> Router {
    Router::new()
        .route("/orders/{id}/pay", post(pay))
        .layer(LockLayer::new(lock, |req| {
            format!("order:{}", req.uri.path())
        }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = LockConfig::new().ttl(Duration::from_secs(30));
    let (backend, lock) = lock_from_environment(config).await?;
    println!("backend: {backend}");
    demo(lock).await
}

/// A set, non-empty environment variable.
fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The lock named by the environment, its description, behind one trait object type.
async fn lock_from_environment(
    config: LockConfig,
) -> Result<(String, Arc<dyn DynDistributedLock>), Error> {
    if let Some(url) = variable("DATABASE_URL") {
        #[cfg(feature = "postgres")]
        {
            let pool = sqlx::PgPool::connect(&url).await?;
            let lock = k1s0_distributed_lock::PostgresDistributedLock::try_new(pool, config)?;
            return Ok((format!("PostgreSQL at {url}"), Arc::new(lock)));
        }
        #[cfg(not(feature = "postgres"))]
        eprintln!(
            "DATABASE_URL is set ({url}), but this build has no PostgreSQL backend: ignoring it \
             (run with --features postgres to use it)"
        );
    }
    if let Some(url) = variable("REDIS_URL") {
        #[cfg(feature = "redis")]
        {
            use k1s0_distributed_lock::bb8_redis::{bb8, redis, RedisConnectionManager};
            let pool = bb8::Pool::builder()
                .build(RedisConnectionManager::new(url.as_str())?)
                .await?;
            let lock = k1s0_distributed_lock::RedisDistributedLock::builder(pool)
                .config(config)
                .wake_on_release(redis::Client::open(url.as_str())?)
                .build()?;
            return Ok((format!("Redis at {url}"), Arc::new(lock)));
        }
        #[cfg(not(feature = "redis"))]
        eprintln!(
            "REDIS_URL is set ({url}), but this build has no Redis backend: ignoring it \
             (run with --features redis to use it)"
        );
    }
    let lock = InMemoryDistributedLock::try_new(config)?;
    Ok(("in-memory".to_owned(), Arc::new(lock)))
}

async fn demo(lock: Arc<dyn DynDistributedLock>) -> Result<(), Error> {
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
