//! The fault proxy itself does what the fault tests rely on, checked against a plain echo server.

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                while let Ok(read) = socket.read(&mut buffer).await {
                    if read == 0 || socket.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

async fn round_trip(socket: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    socket.write_all(message).await.unwrap();
    let mut answer = vec![0u8; message.len()];
    socket.read_exact(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn forwards_stalls_cuts_and_refuses() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut socket = TcpStream::connect(proxy.address()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"hello").await, b"hello");

    proxy.stall();
    socket.write_all(b"stuck").await.unwrap();
    let mut answer = [0u8; 5];
    let stalled =
        tokio::time::timeout(Duration::from_millis(200), socket.read_exact(&mut answer)).await;
    assert!(stalled.is_err(), "a stalled proxy forwarded data");
    proxy.heal().await;
    socket.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"stuck");

    proxy.cut_all();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the cut connection stayed open"
    );

    proxy.refuse_new();
    // The aborted accept task closes its socket asynchronously; connects racing with that may
    // be accepted or reset, and then are refused for good.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match TcpStream::connect(proxy.address()).await {
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "the proxy kept accepting connections");
    proxy.heal().await;
    let mut socket = TcpStream::connect(proxy.address()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"back").await, b"back");
}

#[tokio::test(start_paused = true)]
async fn adds_latency() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut socket = TcpStream::connect(proxy.address()).await.unwrap();
    proxy.set_latency(Duration::from_millis(300));
    let start = tokio::time::Instant::now();
    assert_eq!(round_trip(&mut socket, b"slow").await, b"slow");
    // Once each way.
    assert!(start.elapsed() >= Duration::from_millis(600));
}
