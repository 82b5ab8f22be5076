//! A real tonic server (the standard gRPC health service, whose generated code ships with
//! tonic-health, so no `protoc` is needed) behind `LockLayer`, and a client that runs into the
//! lock and sees `ABORTED`.
//!
//! ```text
//! cargo run --example tonic_server
//! ```
//!
//! Every call locks the key `grpc:health`, with a TTL of 500 ms. A `Watch` call is a server
//! stream and holds the lock while the stream is open, however long: the layer extends the lock
//! every third of its TTL. A `Check` meanwhile is refused with `ABORTED`, three TTLs into the
//! stream as at its start; once the stream is cancelled the lock is free again.

use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, InMemoryDistributedLock, LockConfig, LockLayer};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const KEY: &str = "grpc:health";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ttl = Duration::from_millis(500);
    let lock = InMemoryDistributedLock::new(LockConfig::new().ttl(ttl));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let layer = LockLayer::new(lock.clone(), |_req| KEY.to_owned());
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    println!("gRPC health service behind LockLayer on {address}");

    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: String::new(),
    };

    let mut watch = client.watch(request()).await?.into_inner();
    let first = watch.message().await?.ok_or("the watch stream ended")?;
    println!(
        "Watch  -> stream open, status {:?}; the lock is held: {}",
        first.status(),
        lock.is_locked(KEY).await?
    );

    for moment in ["at once", "three TTLs later"] {
        if moment != "at once" {
            tokio::time::sleep(3 * ttl).await;
        }
        let status = client
            .check(request())
            .await
            .expect_err("the key is locked");
        println!(
            "Check {moment} -> {:?}: {}",
            status.code(),
            status.message()
        );
        if status.code() != tonic::Code::Aborted {
            return Err(format!("expected ABORTED, got {:?}", status.code()).into());
        }
    }

    drop(watch);
    // The server learns of the cancelled stream asynchronously.
    for _ in 0..500 {
        if !lock.is_locked(KEY).await? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = client.check(request()).await?.into_inner();
    println!("Watch cancelled; Check -> OK, status {:?}", answer.status());
    Ok(())
}
