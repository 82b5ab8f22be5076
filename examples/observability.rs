//! An axum service behind `LockLayer` that an operator can watch: `tracing` logs on stderr and
//! Prometheus metrics at `/metrics` (feature `metrics`, with `metrics-exporter-prometheus`).
//! A small load generator inside the example makes the numbers move: payments that conflict
//! (fail-fast, 409) and shipments that wait for each other.
//!
//! ```text
//! cargo run --features metrics --example observability              # 3 s of load, then the series
//! cargo run --features metrics --example observability -- --serve   # keep serving on 127.0.0.1:3000
//! cargo run --features metrics --example observability -- --serve --load-secs 60
//! ```
//!
//! With `--serve`, point Prometheus at `http://127.0.0.1:3000/metrics` and import
//! docs/grafana-dashboard.json. `RUST_LOG=k1s0_distributed_lock=debug` shows every span.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig, LockLayer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Installs the Prometheus recorder (the process's metrics recorder) and returns the handle
/// that renders the series.
pub fn install_prometheus() -> Result<PrometheusHandle, Error> {
    // Histograms with buckets (not summaries), so that quantiles can be taken over many
    // instances: `histogram_quantile` over `..._bucket`.
    let buckets = [
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0,
    ];
    Ok(PrometheusBuilder::new()
        .set_buckets(&buckets)?
        .install_recorder()?)
}

/// The service: `POST /orders/{id}/pay` refuses a second payment of the same order at once
/// (409), `POST /orders/{id}/ship` waits for the shipment before it; `/metrics` for Prometheus.
pub fn app(lock: InMemoryDistributedLock, metrics: PrometheusHandle) -> Router {
    let key = |req: &http::request::Parts| req.uri.path().to_owned();
    let pay = Router::new()
        .route("/orders/{id}/pay", post(|| work(Duration::from_millis(20))))
        .layer(LockLayer::new(lock.clone(), key));
    let ship = Router::new()
        .route("/orders/{id}/ship", post(|| work(Duration::from_millis(5))))
        .layer(LockLayer::new(lock, key).wait());
    Router::new().merge(pay).merge(ship).route(
        "/metrics",
        get(move || std::future::ready(metrics.render())),
    )
}

async fn work(takes: Duration) -> &'static str {
    tokio::time::sleep(takes).await;
    "done"
}

/// Serves `app` on `address` in a task of its own; returns the address it listens on.
pub async fn serve(app: Router, address: &str) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

/// 16 clients for `duration`, each paying or shipping one of 4 orders at random: conflicts on
/// payments, waits on shipments. Returns how many requests were answered.
pub async fn generate_load(address: SocketAddr, duration: Duration) -> u64 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let until = Instant::now() + duration;
    let clients: Vec<_> = (0..16u64)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while Instant::now() < until {
                    // xorshift: a cheap stream of pseudo-random choices
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let action = if state % 3 == 0 { "ship" } else { "pay" };
                    let uri = format!("http://{address}/orders/{}/{action}", state % 4);
                    let request = http::Request::post(uri).body(Empty::new()).unwrap();
                    if let Ok(response) = client.request(request).await {
                        let _ = response.into_body().collect().await;
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    let mut answered = 0;
    for client in clients {
        answered += client.await.unwrap_or(0);
    }
    answered
}

/// The text of `/metrics`.
pub async fn scrape(address: SocketAddr) -> Result<String, Error> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .get(format!("http://{address}/metrics").parse()?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let metrics = install_prometheus()?;
    let lock = InMemoryDistributedLock::new(LockConfig::new().wait_timeout(Duration::from_secs(2)));
    let args: Vec<String> = std::env::args().collect();
    let keep_serving = args.iter().any(|arg| arg == "--serve");
    let load_secs = args
        .iter()
        .position(|arg| arg == "--load-secs")
        .and_then(|at| args.get(at + 1)?.parse().ok())
        .unwrap_or(3);
    let address = serve(
        app(lock, metrics),
        if keep_serving {
            "127.0.0.1:3000"
        } else {
            "127.0.0.1:0"
        },
    )
    .await?;
    println!("serving on http://{address} (metrics at /metrics)");
    let answered = generate_load(address, Duration::from_secs(load_secs)).await;
    println!("{answered} requests answered in {load_secs} s; the lock's series:");
    for line in scrape(address).await?.lines() {
        if line.starts_with("distributed_lock_") {
            println!("  {line}");
        }
    }
    if keep_serving {
        println!("serving until interrupted; load again with another run");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
