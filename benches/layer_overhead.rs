//! What LockLayer costs: the same axum service with and without the layer, in one run, on the
//! in-memory backend with a distinct key per request.
//!
//! * `layer_http`: 32 concurrent HTTP/1.1 requests over loopback keep-alive connections, the
//!   way the layer runs in production.
//! * `layer_in_process`: one request through the router in-process (no sockets), which shows
//!   the layer's own cost with nothing to hide it.
//! * `layer_keep_alive`: the same with a handler that awaits once, so that the layer starts its
//!   keep-alive task, against the layer without keep-alive: what the keep-alive costs a request
//!   that waits (one that runs to its end in one go never starts one).
//! * `layer_wrk` (after criterion, not a criterion group): the layer as users run it, under a
//!   real HTTP client. `axum::serve` serves `POST /orders/{id}/pay` on loopback; `wrk -t2 -c64`
//!   loads it with a distinct id, hence a distinct lock key, per request. It measures bare axum
//!   and the layer on every backend this build has (in-memory; Redis and PostgreSQL with
//!   `--all-features`, at `REDIS_URL` / `DATABASE_URL` or the local defaults), and on each
//!   backend the layer with `.permits(4)` (a permit of the request's key instead of its lock:
//!   `memory-permits`, `redis-permits`, `postgres-permits`), each on two
//!   servers: the default listener, and one that sets `TCP_NODELAY` on accepted sockets. A
//!   response written in pieces meets Nagle's algorithm and the client's delayed ACK only on
//!   the default server, so the pair shows whether the layer does that. The configurations run
//!   in interleaved rounds (`LAYER_WRK_ROUNDS`, default 5, of `LAYER_WRK_SECS`, default 3 s,
//!   each; 0 s leaves the scenario out), and each ratio is the median of the per-round ratios,
//!   so that a drift of the machine during the run touches both sides of a ratio alike.
//!   `LAYER_WRK_ONLY=bare,memory` measures only the apps it names.
//!   Needs `wrk` on the `PATH`; without it the scenario says how to install it and is skipped.
//!   It runs under `cargo bench` only (not `cargo test --benches`), and a criterion filter
//!   leaves it out unless the filter is part of `layer_wrk`.
//!
//! `cargo bench --bench layer_overhead` prints a RATIO line per group at the end, and
//! `cargo bench --all-features --bench layer_overhead` includes the server backends in
//! `layer_wrk`.

mod support;

use support::{env_number, median};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{
    DistributedLock, DistributedSemaphore, InMemoryDistributedLock, LockConfig, LockLayer,
};
use support::wrk::{self, Figures, Wrk};
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

/// One request through `app` in-process, its body read to the end.
async fn one_request(app: Router) {
    let request = http::Request::post(next_path())
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

fn layer_in_process(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("layer_in_process");
    group.throughput(Throughput::Elements(1));
    for (name, app) in [("bare", bare()), ("with_layer", locked())] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| one_request(app.clone()))
        });
    }
    group.finish();
}

/// What the keep-alive costs a request that waits (its handler awaits once, so the keep-alive
/// task starts): the layer with keep-alive against the same layer without.
fn layer_keep_alive(c: &mut Criterion) {
    async fn waits_once(Path(order): Path<u64>) -> String {
        tokio::task::yield_now().await;
        format!("order {order} ok")
    }
    let route = || Router::new().route("/orders/{id}", post(waits_once));
    let lock = || InMemoryDistributedLock::new(LockConfig::new());
    let key = |req: &http::request::Parts| format!("order:{}", req.uri.path());
    let runtime = support::runtime();
    let mut group = c.benchmark_group("layer_keep_alive");
    group.throughput(Throughput::Elements(1));
    for (name, app) in [
        (
            "with_keep_alive",
            route().layer(LockLayer::new(lock(), key)),
        ),
        (
            "without_keep_alive",
            route().layer(LockLayer::new(lock(), key).without_keep_alive()),
        ),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| one_request(app.clone()))
        });
    }
    group.finish();
}

criterion_group!(benches, layer_http, layer_in_process, layer_keep_alive);

// layer_wrk: the layer under wrk, on the default server and on a TCP_NODELAY one.

/// The two servers every app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `axum::serve` on a plain `TcpListener`, as most applications start it.
    Default,
    /// The same with `TCP_NODELAY` set on every accepted socket.
    NoDelay,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Default => "default",
            Server::NoDelay => "nodelay",
        }
    }
}

async fn pay(Path(order): Path<String>) -> String {
    format!("order {order} paid")
}

fn pay_route() -> Router {
    Router::new().route("/orders/{id}/pay", post(pay))
}

/// The route behind the layer, locking one key per path (the path holds the order id).
fn behind_layer<B: DistributedLock>(lock: B) -> Router {
    pay_route().layer(lock_layer(lock))
}

/// The route behind the layer taking one of 4 permits of a key per path instead of its lock.
fn behind_permits_layer<B: DistributedLock + DistributedSemaphore>(lock: B) -> Router {
    pay_route().layer(lock_layer(lock).permits(4))
}

fn lock_layer<B: DistributedLock>(lock: B) -> LockLayer<B> {
    let prefix = format!("wrk:{}:", uuid::Uuid::new_v4().simple());
    LockLayer::new(lock, move |req| format!("{prefix}{}", req.uri.path()))
}

#[cfg(feature = "redis")]
async fn redis_lock() -> k1s0_distributed_lock::RedisDistributedLock {
    use k1s0_distributed_lock::bb8_redis::{bb8::Pool, RedisConnectionManager};
    let pool = Pool::builder()
        .max_size(10)
        .build(RedisConnectionManager::new(support::redis_url()).expect("redis url"))
        .await
        .expect("redis pool");
    // A distinct key per request leaves a fencing counter per key for the retention time:
    // keep that short, so that a run does not leave millions of keys on a shared server.
    k1s0_distributed_lock::RedisDistributedLock::builder(pool)
        .fence_retention(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[cfg(feature = "postgres")]
async fn postgres_lock() -> k1s0_distributed_lock::PostgresDistributedLock {
    k1s0_distributed_lock::PostgresDistributedLock::new(
        support::pg::pool(10).await,
        LockConfig::new(),
    )
}

/// The apps to measure, by name: bare axum, then the layer on each backend of this build.
async fn wrk_apps() -> Vec<(&'static str, Router)> {
    vec![
        ("bare", pay_route()),
        (
            "memory",
            behind_layer(InMemoryDistributedLock::new(LockConfig::new())),
        ),
        (
            "memory-without-keep-alive",
            pay_route().layer(
                lock_layer(InMemoryDistributedLock::new(LockConfig::new())).without_keep_alive(),
            ),
        ),
        (
            "memory-permits",
            behind_permits_layer(InMemoryDistributedLock::new(LockConfig::new())),
        ),
        #[cfg(feature = "redis")]
        ("redis", behind_layer(redis_lock().await)),
        #[cfg(feature = "redis")]
        ("redis-permits", behind_permits_layer(redis_lock().await)),
        #[cfg(feature = "postgres")]
        ("postgres", behind_layer(postgres_lock().await)),
        #[cfg(feature = "postgres")]
        (
            "postgres-permits",
            behind_permits_layer(postgres_lock().await),
        ),
    ]
}

async fn serve_on(server: Server, app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    match server {
        Server::Default => tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
        Server::NoDelay => {
            let listener = listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    eprintln!("layer_wrk: cannot set TCP_NODELAY: {error}");
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() })
        }
    };
    address
}

/// One request, to find a broken setup (a backend that answers 503) before measuring it.
async fn check(address: SocketAddr) -> Result<(), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = http::Request::post(format!("http://{address}/orders/check/pay"))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    match status {
        http::StatusCode::OK => Ok(()),
        _ => Err(format!("{status} {}", String::from_utf8_lossy(&body))),
    }
}

/// Whether this run measures and its filter (if any) takes `layer_wrk`. `cargo bench` passes
/// `--bench`; `cargo test --benches` does not, and criterion then only checks each benchmark
/// once, which is no place for a minute of load.
fn wrk_wanted() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    if !has("--bench") || has("--test") || has("--list") {
        return false;
    }
    let filters: Vec<&String> = args.iter().filter(|arg| !arg.starts_with('-')).collect();
    let wanted = filters.is_empty() || filters.iter().any(|f| "layer_wrk".contains(f.as_str()));
    if !wanted {
        println!("layer_wrk: not run (the filter {filters:?} leaves it out)");
    }
    wanted
}

/// One app on one server, with what each round measured.
struct Configuration {
    name: &'static str,
    server: Server,
    address: SocketAddr,
    rounds: Vec<Figures>,
}

fn layer_wrk() {
    let seconds = env_number("LAYER_WRK_SECS", 3);
    let rounds = env_number("LAYER_WRK_ROUNDS", 5).max(1);
    if seconds == 0 {
        println!("layer_wrk: not run (LAYER_WRK_SECS=0)");
        return;
    }
    let Some(mut wrk) = Wrk::new(2, 64) else {
        println!("layer_wrk: skipped: {}", wrk::INSTALL_HINT);
        return;
    };
    let runtime = support::runtime();
    let mut configurations = Vec::new();
    let only = std::env::var("LAYER_WRK_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|wanted| wanted == name);
    for (name, app) in runtime.block_on(wrk_apps()) {
        if !wanted(name) {
            continue;
        }
        for server in [Server::Default, Server::NoDelay] {
            let address = runtime.block_on(serve_on(server, app.clone()));
            match runtime.block_on(check(address)) {
                Ok(()) => configurations.push(Configuration {
                    name,
                    server,
                    address,
                    rounds: Vec::new(),
                }),
                Err(problem) => println!(
                    "layer_wrk/{name}/{}: skipped: answered {problem}",
                    server.name()
                ),
            }
        }
    }
    println!(
        "layer_wrk: wrk -t{} -c{}, {rounds} rounds of {seconds} s per configuration, interleaved (each round runs every configuration once, after a 1 s warm-up each); load average {}",
        wrk.threads,
        wrk.connections,
        wrk::load_average()
    );
    for configuration in &configurations {
        wrk.run(configuration.address, Duration::from_secs(1));
    }
    for _ in 0..rounds {
        for configuration in &mut configurations {
            let figures = wrk.run(configuration.address, Duration::from_secs(seconds));
            configuration.rounds.push(figures);
        }
    }
    println!("layer_wrk: load average {}", wrk::load_average());
    for configuration in &configurations {
        print_figures(configuration);
    }

    let find = |name: &str, server: Server| {
        configurations
            .iter()
            .find(|c| c.name == name && c.server == server)
    };
    for (name, target) in [
        ("bare", None),
        ("memory", None),
        ("redis", Some(0.9)),
        ("postgres", Some(0.9)),
    ] {
        if let (Some(default), Some(nodelay)) =
            (find(name, Server::Default), find(name, Server::NoDelay))
        {
            print_ratio(
                &format!("{name}: default server vs TCP_NODELAY server"),
                default,
                nodelay,
                target,
            );
        }
    }
    for (name, label, target) in [
        ("memory", "in-memory", Some(0.85)),
        ("redis", "Redis", None),
        ("postgres", "PostgreSQL", None),
    ] {
        if let (Some(layer), Some(bare)) =
            (find(name, Server::Default), find("bare", Server::Default))
        {
            print_ratio(
                &format!("default server: {label} layer vs bare axum"),
                layer,
                bare,
                target,
            );
        }
    }
    for (permits, locks, label) in [
        ("memory-permits", "memory", "in-memory"),
        ("redis-permits", "redis", "Redis"),
        ("postgres-permits", "postgres", "PostgreSQL"),
    ] {
        if let (Some(permits), Some(locks)) =
            (find(permits, Server::Default), find(locks, Server::Default))
        {
            print_ratio(
                &format!("default server: {label} layer, .permits(4) vs a lock per request"),
                permits,
                locks,
                None,
            );
        }
    }
    if let (Some(with), Some(without)) = (
        find("memory", Server::Default),
        find("memory-without-keep-alive", Server::Default),
    ) {
        print_ratio(
            "default server: in-memory layer, keep-alive on vs off",
            with,
            without,
            None,
        );
    }
}

/// The median round of a configuration (by throughput), its range, and any errors seen.
fn print_figures(configuration: &Configuration) {
    let mut rounds: Vec<&Figures> = configuration.rounds.iter().collect();
    rounds.sort_by(|a, b| a.requests_per_sec().total_cmp(&b.requests_per_sec()));
    let middle = rounds[rounds.len() / 2];
    let (non_2xx, socket_errors) = rounds.iter().fold((0, 0), |(n, s), figures| {
        (n + figures.non_2xx, s + figures.socket_errors)
    });
    let mut problems = String::new();
    if non_2xx > 0 {
        problems += &format!(", {non_2xx} non-2xx responses");
    }
    if socket_errors > 0 {
        problems += &format!(", {socket_errors} socket errors");
    }
    println!(
        "layer_wrk/{}/{}: median {:.0} req/s (rounds {:.0}..{:.0}), mean latency {:.2} ms, p99 {:.2} ms{problems}",
        configuration.name,
        configuration.server.name(),
        middle.requests_per_sec(),
        rounds[0].requests_per_sec(),
        rounds[rounds.len() - 1].requests_per_sec(),
        middle.mean_latency.as_secs_f64() * 1e3,
        middle.p99_latency.as_secs_f64() * 1e3,
    );
}

/// The median over rounds of `measured / baseline`, each round's pair measured back to back.
fn print_ratio(
    what: &str,
    measured: &Configuration,
    baseline: &Configuration,
    target: Option<f64>,
) {
    let ratios: Vec<f64> = measured
        .rounds
        .iter()
        .zip(&baseline.rounds)
        .map(|(m, b)| m.requests_per_sec() / b.requests_per_sec())
        .collect();
    let (lowest, highest) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let ratio = median(ratios);
    let verdict = match target {
        Some(target) if ratio >= target => format!(" (target >= {target}: met)"),
        Some(target) => format!(" (target >= {target}: MISSED)"),
        None => String::new(),
    };
    println!(
        "RATIO layer_wrk {what}: median of per-round ratios {ratio:.3} (rounds {lowest:.3}..{highest:.3}){verdict}"
    );
}

fn main() {
    support::observe_from_env();
    benches();
    Criterion::default().configure_from_args().final_summary();
    support::print_ratio("layer_http", "with_layer", "bare", "bare");
    support::print_ratio("layer_in_process", "with_layer", "bare", "bare");
    support::print_ratio(
        "layer_keep_alive",
        "with_keep_alive",
        "without_keep_alive",
        "without_keep_alive",
    );
    if wrk_wanted() {
        layer_wrk();
    }
}
