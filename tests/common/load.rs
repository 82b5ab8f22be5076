//! An axum server with the layer under a load generator on loopback, for any backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k1s0_distributed_lock::{DistributedLock, LockLayer};
use rand::Rng;
use tokio::time::Instant;

use super::suites::becomes_free;

pub struct LoadPlan {
    pub connections: usize,
    pub duration: Duration,
    pub hot_keys: usize,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub conflicts: u64,
    pub abandoned: u64,
    pub other_statuses: Vec<StatusCode>,
    pub longest_wait: Duration,
    pub violations: u64,
    pub keys_left_locked: Vec<String>,
}

#[derive(Default)]
struct Ledger {
    /// Requests inside a handler, per key: more than one is a broken lock.
    inside: Mutex<HashMap<String, u32>>,
    /// A counter per key, updated by a read, a yield and a write.
    counters: Mutex<HashMap<String, u64>>,
    /// How many increments completed, per key, counted atomically.
    completed: Mutex<HashMap<String, u64>>,
    violations: AtomicU64,
}

/// Counts a handler as inside its key until it returns or is dropped (client gone).
struct Inside {
    ledger: Arc<Ledger>,
    key: String,
}

impl Inside {
    fn enter(ledger: &Arc<Ledger>, key: &str) -> Self {
        let mut inside = ledger.inside.lock().unwrap();
        let count = inside.entry(key.to_owned()).or_default();
        if *count > 0 {
            ledger.violations.fetch_add(1, Ordering::SeqCst);
        }
        *count += 1;
        Inside {
            ledger: ledger.clone(),
            key: key.to_owned(),
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        *self
            .ledger
            .inside
            .lock()
            .unwrap()
            .get_mut(&self.key)
            .unwrap() -= 1;
    }
}

async fn work(Path(key): Path<String>, State(ledger): State<Arc<Ledger>>) -> Body {
    let inside = Inside::enter(&ledger, &key);
    let value = ledger
        .counters
        .lock()
        .unwrap()
        .get(&key)
        .copied()
        .unwrap_or(0);
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_micros(200)).await;
    ledger
        .counters
        .lock()
        .unwrap()
        .insert(key.clone(), value + 1);
    *ledger
        .completed
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default() += 1;
    drop(inside);
    // A streamed body: the lock is held until its last frame.
    let frames = futures::stream::iter(["done", "."]).then(|part| async move {
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(Bytes::from_static(part.as_bytes()))
    });
    Body::from_stream(frames)
}

/// Runs the plan against a server whose layer uses `lock` (half the requests in wait mode, half
/// fail-fast), asserts that every counter kept under the lock is exact, and reports what the
/// caller checks: statuses, the longest wait, handlers that overlapped on a key, keys left locked.
pub async fn run_http_load<L>(lock: L, prefix: &str, plan: LoadPlan) -> LoadReport
where
    L: DistributedLock + Clone,
{
    let ledger = Arc::new(Ledger::default());
    // The same keys behind a waiting route and a fail-fast one.
    let key_prefix = prefix.to_owned();
    let layer = LockLayer::new(lock.clone(), move |req| {
        let (_route, key) = req.uri.path().trim_start_matches('/').split_once('/')?;
        Some(format!("{key_prefix}{key}"))
    });
    let app = Router::new()
        .route("/wait/{key}", post(work).layer(layer.clone().wait()))
        .route("/try/{key}", post(work).layer(layer))
        .with_state(ledger.clone());
    let address = super::http::serve(app).await;

    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.connections)
        .build_http::<Empty<Bytes>>();
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let distinct = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + plan.duration;
    let mut workers = Vec::new();
    for _ in 0..plan.connections {
        let (client, report, distinct) = (client.clone(), report.clone(), distinct.clone());
        let hot_keys = plan.hot_keys;
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (path, abandon_after) = {
                    let mut rng = rand::rng();
                    let route = if rng.random_bool(0.5) { "wait" } else { "try" };
                    let key = if rng.random_bool(0.5) {
                        format!("hot{}", rng.random_range(0..hot_keys))
                    } else {
                        format!("cold{}", distinct.fetch_add(1, Ordering::Relaxed))
                    };
                    let abandon = rng
                        .random_bool(0.1)
                        .then(|| Duration::from_micros(rng.random_range(0..3_000)));
                    (format!("/{route}/{key}"), abandon)
                };
                let started = Instant::now();
                let call = call(&client, address, &path);
                let outcome = match abandon_after {
                    Some(after) => tokio::time::timeout(after, call).await.ok(),
                    None => Some(call.await),
                };
                let waited = started.elapsed();
                let mut report = report.lock().unwrap();
                match outcome {
                    None => report.abandoned += 1,
                    Some(StatusCode::OK) => report.ok += 1,
                    Some(StatusCode::CONFLICT) => report.conflicts += 1,
                    Some(other) => report.other_statuses.push(other),
                }
                report.longest_wait = report.longest_wait.max(waited);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }

    let mut report = Arc::try_unwrap(report).unwrap().into_inner().unwrap();
    report.violations = ledger.violations.load(Ordering::SeqCst);
    let counters = ledger.counters.lock().unwrap().clone();
    let completed = ledger.completed.lock().unwrap().clone();
    assert_eq!(
        counters, completed,
        "a read-modify-write under the lock lost an update"
    );

    // Every key the run touched must be free again (background releases get a moment).
    let cold = distinct.load(Ordering::Relaxed);
    let keys = (0..plan.hot_keys)
        .map(|i| format!("hot{i}"))
        .chain((cold.saturating_sub(500)..cold).map(|i| format!("cold{i}")));
    for key in keys {
        let full = format!("{prefix}{key}");
        if !becomes_free(&lock, &full, Duration::from_secs(2)).await {
            report.keys_left_locked.push(full);
        }
    }
    report
}

async fn call(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
    path: &str,
) -> StatusCode {
    let request = http::Request::post(format!("http://{address}{path}"))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.expect("the server answers");
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .expect("a complete body");
    status
}
