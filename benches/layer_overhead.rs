//! What LockLayer costs: the same axum service with and without the layer, in one run, on the
//! in-memory backend with a distinct key per request.
//!
//! * `layer_http`: 32 concurrent HTTP/1.1 requests over loopback keep-alive connections, the
//!   way the layer runs in production.
//! * `layer_in_process`: one request through the router in-process (no sockets), which shows
//!   the layer's own cost with nothing to hide it.
//!
//! `cargo bench --bench layer_overhead` prints a RATIO line per group at the end.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig, LockLayer};
use tower::ServiceExt;

const CONCURRENCY: u64 = 32;

static NEXT_ORDER: AtomicU64 = AtomicU64::new(0);

fn next_path() -> String {
    format!("/orders/{}", NEXT_ORDER.fetch_add(1, Ordering::Relaxed))
}

async fn handler(Path(order): Path<u64>) -> String {
    format!("order {order} ok")
}

fn bare() -> Router {
    Router::new().route("/orders/{id}", post(handler))
}

fn locked() -> Router {
    let lock = InMemoryDistributedLock::new(LockConfig::new());
    bare().layer(LockLayer::new(lock, |req| {
        format!("order:{}", req.uri.path())
    }))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

async fn batch(client: &Client<HttpConnector, Empty<Bytes>>, address: SocketAddr) {
    let requests = (0..CONCURRENCY).map(|_| async {
        let request = http::Request::post(format!("http://{address}{}", next_path()))
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    });
    futures::future::join_all(requests).await;
}

fn layer_http(c: &mut Criterion) {
    let runtime = support::runtime();
    let (bare_address, locked_address) =
        runtime.block_on(async { (serve(bare()).await, serve(locked()).await) });
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY as usize)
        .build_http::<Empty<Bytes>>();
    let mut group = c.benchmark_group("layer_http");
    group.throughput(Throughput::Elements(CONCURRENCY));
    group.measurement_time(Duration::from_secs(8));
    for (name, address) in [("bare", bare_address), ("with_layer", locked_address)] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| batch(&client, address))
        });
    }
    group.finish();
}

fn layer_in_process(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("layer_in_process");
    group.throughput(Throughput::Elements(1));
    for (name, app) in [("bare", bare()), ("with_layer", locked())] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let app = app.clone();
                async move {
                    let request = http::Request::post(next_path())
                        .body(Body::empty())
                        .unwrap();
                    let response = app.oneshot(request).await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer_http, layer_in_process);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    support::print_ratio("layer_http", "with_layer", "bare", "bare");
    support::print_ratio("layer_in_process", "with_layer", "bare", "bare");
}
